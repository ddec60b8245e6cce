"""The build recipe (TOML): frozen dataclasses, unknown keys are errors.

    [data]
    source = "digits"            # or a path to .npz (X, y) / .csv
    label_column = "label"       # .csv only
    task = "classification"

    [zoo]
    dir = "artifacts/zoo/independent"
    members = []                 # empty: every member in dir

    [ensemble]
    combiner = "soft_vote"
    weights = []                 # empty: equal weights

    [build]
    out = "artifacts/bundle"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from fusion.errors import ConfigError


@dataclass(frozen=True)
class DataSection:
    source: str = "digits"
    label_column: str = "label"
    task: str = "classification"


@dataclass(frozen=True)
class ZooSection:
    dir: str = "artifacts/zoo/independent"
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnsembleSection:
    combiner: str = "soft_vote"
    weights: tuple[float, ...] = ()
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MergeSection:
    """A `merged` variant: off unless `method` is set."""

    method: str = ""
    zoo: str = ""  # the zoo to merge (default: the [zoo] dir); merging needs one architecture
    members: tuple[str, ...] = ()
    base: str = ""  # a base checkpoint name in that zoo, for task-vector methods
    weights: tuple[float, ...] = ()
    params: dict = field(default_factory=dict)
    align: str = ""  # "" | "weight_matching" | "activation_matching"


@dataclass(frozen=True)
class DistillSection:
    """A `distilled` variant: on by default."""

    enabled: bool = True
    arch: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 60
    augment: tuple[str, ...] = ("noise", "shift")
    seed: int = 0


@dataclass(frozen=True)
class BuildSection:
    out: str = "artifacts/bundle"
    compare: bool = True
    quantize: bool = False
    quantize_max_loss_pp: float = 0.5


@dataclass(frozen=True)
class Recipe:
    data: DataSection = DataSection()
    zoo: ZooSection = ZooSection()
    ensemble: EnsembleSection = EnsembleSection()
    merge: MergeSection = MergeSection()
    distill: DistillSection = DistillSection()
    build: BuildSection = BuildSection()


def _section(cls, name: str, raw: dict):
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe: expected [{name}] to be a table; got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"recipe: unknown keys in [{name}]: {unknown}; expected some of {sorted(known)}")
    values = {}
    for key, value in raw.items():
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list):
                raise ConfigError(f"recipe: [{name}].{key} expected a list; got {value!r}")
            value = tuple(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"recipe: [{name}].{key} expected true/false; got {value!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"recipe: [{name}].{key} expected a number; got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"recipe: [{name}].{key} expected a string; got {value!r}")
        elif isinstance(default, dict) and not isinstance(value, dict):
            raise ConfigError(f"recipe: [{name}].{key} expected a table; got {value!r}")
        values[key] = value
    return cls(**values)


def parse_recipe(data: dict) -> Recipe:
    sections = {f.name: f.type for f in fields(Recipe)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"recipe: unknown sections {unknown}; expected some of {sorted(sections)}")
    kwargs = {}
    for f in fields(Recipe):
        if f.name in data:
            kwargs[f.name] = _section(type(getattr(Recipe(), f.name)), f.name, data[f.name])
    return Recipe(**kwargs)


def load_recipe(path: str | Path | None) -> Recipe:
    if path is None:
        return Recipe()
    path = Path(path)
    try:
        return parse_recipe(tomllib.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"recipe: {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe: {path}: not valid TOML ({exc})") from None


def override(recipe: Recipe, section: str, **values) -> Recipe:
    """A copy with the given, non-None values replaced in one section (CLI flags over the recipe)."""
    values = {k: v for k, v in values.items() if v is not None}
    return replace(recipe, **{section: replace(getattr(recipe, section), **values)}) if values else recipe
