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
    weights = "auto"             # "auto": equal, select, fit or stacking, whichever has the lowest
                                 # out-of-fold validation NLL; "equal" | "select" | "fit"; empty: equal;
                                 # a list: one per member, in member order;
                                 # a table {mlp_0 = 2, cnn_1 = 3}: by name, the rest 1
    calibration = "none"         # or "temperature": per-member temperature scaling before combining

    [distill]                    # the `distilled` variant (see DistillSection)
    enabled = true
    epochs = 60

    [build]
    out = "artifacts/bundle"
    compare = true               # comparison.md/.json/.png in the bundle and in the manifest
    quantize = false             # int8 variants of merged/distilled, kept within quantize_max_loss_pp
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


CALIBRATIONS = ("none", "temperature")
WEIGHT_MODES = ("auto", "equal", "select", "fit")  # fusion.ensemble.selection.MODES (kept torch-free here)


@dataclass(frozen=True)
class EnsembleSection:
    """The fused ensemble. `calibration = "temperature"` divides each member's logits by a temperature
    fitted on the validation split (Guo et al. 2017) before combining; it is exported inside the graph.

    `weights`: empty or "equal" for equal weights; a list with one weight per member in member order ([zoo]
    members when given, else the zoo's checkpoint names sorted: cnn_0, …, mlp_0, …); or a table {name = weight}
    in which unnamed members weigh 1. `fusion.build.member_weights` resolves it against the members.
    Chosen from the validation split (fusion/ensemble/selection.py): "select" (Caruana et al.'s ensemble
    selection, integer counts), "fit" (simplex weights minimising the NLL), "auto" (the default: equal, select,
    fit and stacking scored out of fold, the lowest NLL wins)."""

    combiner: str = "soft_vote"
    weights: tuple[float, ...] | dict[str, float] | str = "auto"
    params: dict = field(default_factory=dict)
    calibration: str = "none"  # "none" | "temperature"

    def __post_init__(self):
        if isinstance(self.weights, str) and self.weights not in WEIGHT_MODES:
            raise ConfigError(f"recipe: [ensemble].weights expected one of {list(WEIGHT_MODES)}, a list or a table "
                              f"{{name = weight}}; got {self.weights!r}")
        if isinstance(self.weights, dict):
            for name, w in self.weights.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)):
                    raise ConfigError(f"recipe: [ensemble].weights expected a number for {name}; got {w!r}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(
                f"recipe: [ensemble].calibration expected one of {list(CALIBRATIONS)}; got {self.calibration!r}"
            )


@dataclass(frozen=True)
class MergeSection:
    """The `merged` variant: by default the zoo's MLPs, aligned to the first by weight matching, then
    averaged (`linear`). `method = ""` turns it off."""

    method: str = "linear"
    zoo: str = ""  # the zoo to merge (default: the [zoo] dir); merging needs one architecture
    arch: str = "mlp"  # with no `members`: every member of this architecture in the zoo
    members: tuple[str, ...] = ()
    base: str = ""  # a base checkpoint name in that zoo, for task-vector methods
    weights: tuple[float, ...] = ()
    params: dict = field(default_factory=dict)
    align: str = "weight_matching"  # "" | "weight_matching" | "activation_matching"


AUGMENTATIONS = ("noise", "shift", "mixup")


@dataclass(frozen=True)
class DistillSection:
    """A `distilled` variant: on by default (see fusion/distill.py for the loss and the transfer set).

    arch/hidden/args: the student (`hidden` for "mlp"; `args` adds constructor arguments, e.g.
    `{channels = [8, 16]}` for "cnn"). Each epoch the transfer set is the train split plus `copies`
    augmented copies of it; training stops after `patience` epochs without a better validation
    agreement with the teacher, and the best epoch's weights are kept.
    """

    enabled: bool = True
    arch: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)
    args: dict = field(default_factory=dict)
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 15
    augment: tuple[str, ...] = ("noise", "shift")
    copies: int = 1
    noise_std: float = 0.1  # in units of each feature's train standard deviation
    max_shift: int = 1  # pixels, image-shaped rows only
    mixup_alpha: float = 0.2  # Beta(a, a) mixing weights
    seed: int = 0
    threads: int = 1  # torch intra-op threads while distilling (0: torch's default); small students run fastest on 1

    def __post_init__(self):
        def bad(key: str, expected: str):
            raise ConfigError(f"recipe: [distill].{key} expected {expected}; got {getattr(self, key)!r}")

        if not self.temperature > 0:
            bad("temperature", "a number > 0")
        if not 0.0 <= self.alpha <= 1.0:
            bad("alpha", "a number in [0, 1]")
        for key in ("epochs", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "an integer >= 1")
        for key in ("patience", "copies", "max_shift", "threads"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                bad(key, "an integer >= 0")
        if not self.lr > 0:
            bad("lr", "a number > 0")
        if self.weight_decay < 0 or self.noise_std < 0 or not self.mixup_alpha > 0:
            bad("weight_decay" if self.weight_decay < 0 else "noise_std" if self.noise_std < 0 else "mixup_alpha",
                "a non-negative number (mixup_alpha > 0)")
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"recipe: [distill].augment: unknown {unknown}; expected some of {list(AUGMENTATIONS)}")


@dataclass(frozen=True)
class BuildSection:
    """Output directory and the steps after export: int8 variants of merged/distilled (kept only when
    validation accuracy drops by at most `quantize_max_loss_pp` points) and the comparison report."""

    out: str = "artifacts/bundle"
    compare: bool = True
    compare_rounds: int = 300  # interleaved latency rounds per model and batch size
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


NAMED_WEIGHTS = {("ensemble", "weights")}  # (section, key) that also takes a table {member name = weight}


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
        if (name, key) in NAMED_WEIGHTS:
            if isinstance(value, (dict, str)):  # checked by the section itself; names against the members at build
                values[key] = dict(value) if isinstance(value, dict) else value
                continue
            if not isinstance(value, list):
                raise ConfigError(f"recipe: [{name}].{key} expected a list, a table {{name = weight}} or one of "
                                  f"{list(WEIGHT_MODES)}; got {value!r}")
            values[key] = tuple(value)
            continue
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
