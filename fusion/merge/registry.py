"""The merge-method registry, the `merge` entry point and the checks at its boundary.

A merge method is a thin frozen dataclass of its parameters, registered by name with its paper;
the arithmetic lives in `fusion.merge.kernels`. Names follow mergekit (`linear`, `ties`, …).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import torch
from torch import Tensor

from fusion.errors import ConfigError, UnknownNameError

StateDict = Mapping[str, Tensor]
Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # key -> (shape, dtype)

MERGE_METHODS: dict[str, type["MergeMethod"]] = {}


class MergeMethod(ABC):
    """Base of every registered method: a frozen dataclass of parameters plus `merge_state`.

    Class attributes describe the contract the boundary checks enforce:
    `needs_base` (a base model is required; otherwise one must not be given), `uses_weights`,
    `min_models` / `max_models`, `needs_data` (it takes inputs computed from a model and data:
    a scorer, Fishers or Gram matrices; `fusion merge` and the bundle compute them, `data_methods()`),
    and `streaming`: "elementwise" (any slice of an entry can be merged on its own), "tensor" (entry
    by entry), "global" (entry by entry after whole-model passes) or "none" (needs whole models or
    data: `merge_files` refuses it).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_base: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = True
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    streaming: ClassVar[str] = "none"

    @abstractmethod
    def merge_state(self, models: Sequence[StateDict], base: StateDict | None, weights: tuple[float, ...]) -> dict[str, Tensor]:
        """Merge checked state dicts (same keys, shapes, dtypes); weights has one entry per model."""


class TensorwiseMethod(MergeMethod):
    """A method whose result for each entry depends only on that entry of the members (and base)."""

    streaming: ClassVar[str] = "tensor"

    @abstractmethod
    def merge_tensor(self, key: str, xs: Sequence[Tensor], base: Tensor | None, weights: tuple[float, ...]) -> Tensor:
        """Merge one floating-point entry. xs: K tensors of shape S, base: S or None -> S (new tensor)."""

    def merge_state(self, models, base, weights):
        out = {}
        for key, ref in models[0].items():
            if not ref.is_floating_point():  # num_batches_tracked & co.: copied, averaging them means nothing
                out[key] = ref.clone()
                continue
            out[key] = self.merge_tensor(key, [m[key] for m in models], None if base is None else base[key], weights)
        return out


def register_merge(name: str, *, paper: str) -> Callable[[type[MergeMethod]], type[MergeMethod]]:
    """Register a `MergeMethod` subclass under `name` with its paper link (timm / mergekit style)."""

    def deco(cls: type[MergeMethod]) -> type[MergeMethod]:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method '{name}' is registered twice")
        cls.name = name
        cls.paper = paper
        MERGE_METHODS[name] = cls
        return cls

    return deco


def get_merge(name: str) -> type[MergeMethod]:
    """The registered method class for `name`; an unknown name raises UnknownNameError listing the valid ones."""
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown merge method '{name}'; expected one of {sorted(MERGE_METHODS)}") from None


def names() -> list[str]:
    """Every registered method name, in registration order (what `fusion merge --method` offers)."""
    return list(MERGE_METHODS)


def data_methods() -> list[str]:
    """The registered methods that need data besides the weights (`needs_data`), sorted."""
    return sorted(n for n, cls in MERGE_METHODS.items() if cls.needs_data)


def method_params(name: str) -> dict[str, Any]:
    """The parameters of method `name` with their defaults (dataclasses.MISSING when required)."""
    return {f.name: f.default for f in dataclasses.fields(get_merge(name)) if f.init}


def make_method(name: str, **params: Any) -> MergeMethod:
    """Instantiate method `name` with `params`; unknown or invalid parameters raise ConfigError."""
    cls = get_merge(name)
    accepted = method_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"merge method '{name}' expected parameters from {sorted(accepted)}; got unknown {unknown}")
    missing = sorted(k for k, v in accepted.items() if v is dataclasses.MISSING and k not in params)
    if missing:
        raise ConfigError(f"merge method '{name}' expected parameters {missing}; got none")
    return cls(**params)


# ---------------------------------------------------------------------------------------------
# boundary checks (messages say what was expected and what was got)


def check_counts(method: MergeMethod, n_models: int, has_base: bool) -> None:
    """Number of models and presence of a base against what the method takes."""
    if n_models < method.min_models:
        raise ConfigError(f"merge method '{method.name}' expected at least {method.min_models} models; got {n_models}")
    if method.max_models is not None and n_models > method.max_models:
        raise ConfigError(f"merge method '{method.name}' expected at most {method.max_models} models; got {n_models}")
    if method.needs_base and not has_base:
        raise ConfigError(f"merge method '{method.name}' expected a base model (base=...); got none")
    if not method.needs_base and has_base:
        raise ConfigError(f"merge method '{method.name}' expected no base model; got one (use task_arithmetic, ties, dare_* …)")


def plain(value: Any) -> Any:
    """numpy/torch scalars and arrays as the Python values they hold, for error messages: `nan`, `0.5`,
    `[1.0, 2.0]` rather than `np.float64(nan)` or `tensor([1., 2.])` (issue 21)."""
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def check_weights(weights: Any, n_models: int, method: MergeMethod | None = None) -> tuple[float, ...]:
    """One finite, non-negative weight per model, not all zero; None gives equal weights (1.0 each)."""
    if weights is None:
        return (1.0,) * n_models
    if method is not None and not method.uses_weights:
        raise ConfigError(f"merge method '{method.name}' expected no weights; got {plain(weights)!r}")
    if isinstance(weights, (str, bytes, Mapping)) or not hasattr(weights, "__len__"):
        raise ConfigError(f"expected a sequence of {n_models} weights, one per model; got {plain(weights)!r}")
    try:
        ws = tuple(float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights))
    except (TypeError, ValueError):
        raise ConfigError(f"expected {n_models} numeric weights; got {plain(weights)!r}") from None
    if len(ws) != n_models:
        raise ConfigError(f"expected {n_models} weights, one per model; got {len(ws)}")
    for i, w in enumerate(ws):
        if not math.isfinite(w):
            raise ConfigError(f"expected finite weights; got {w} at index {i}")
        if w < 0:
            raise ConfigError(f"expected non-negative weights; got {w} at index {i}")
    if not any(w > 0 for w in ws):
        raise ConfigError(f"expected at least one positive weight; got all zeros {list(ws)}")
    return ws


def layout_of(state: Any, what: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of a state dict, checking that it is a mapping of tensors."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"{what}: expected a state dict (mapping of name -> tensor); got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ConfigError(f"{what}, entry '{key}': expected a tensor; got {type(value).__name__}")
        out[key] = (tuple(value.shape), value.dtype)
    return out


def check_layouts(layouts: Sequence[Layout], names: Sequence[str]) -> None:
    """Every layout has the keys, shapes and dtypes of the first."""
    ref = layouts[0]
    for layout, what in zip(layouts[1:], names[1:]):
        missing = [k for k in ref if k not in layout]
        extra = [k for k in layout if k not in ref]
        if missing or extra:
            raise ConfigError(
                f"{what}: expected the entries of {names[0]}; got {len(missing)} missing {missing[:5]} and {len(extra)} extra {extra[:5]}"
            )
        for key, (shape, dtype) in ref.items():
            got = layout[key]
            if got != (shape, dtype):
                raise ConfigError(f"{what}, entry '{key}': expected shape {shape} {dtype}; got {got[0]} {got[1]}")


def check_models(models: Any, base: Any, method: MergeMethod) -> list[StateDict]:
    """The members (and base) as a list of state dicts with identical keys, shapes and dtypes."""
    if isinstance(models, Mapping):
        raise ConfigError("expected a sequence of state dicts; got a single state dict")
    models = list(models)
    check_counts(method, len(models), base is not None)
    states = models + ([base] if base is not None else [])
    names = [f"model {i}" for i in range(len(models))] + (["base"] if base is not None else [])
    check_layouts([layout_of(s, n) for s, n in zip(states, names)], names)
    return models


@torch.no_grad()
def merge(
    method: str, models: Sequence[StateDict], *, base: StateDict | None = None,
    weights: Sequence[float] | None = None, **params: Any,
) -> dict[str, Tensor]:
    """Merge state dicts with registered method `method`; returns a new state dict of the same layout.

    models: K state dicts of identical keys, shapes and dtypes; base: the shared pre-trained state
    for task-vector methods; weights: one non-negative weight per model (default equal); params:
    the method's own parameters (see `method_params(name)`). Pure: inputs are never modified and the
    result shares no storage with them. Integer buffers (BatchNorm's num_batches_tracked) are copied
    from the first model; BatchNorm running statistics are merged like any tensor and should be
    recomputed on data afterwards (`reset_bn`).
    """
    cfg = make_method(method, **params)
    models = check_models(models, base, cfg)
    ws = check_weights(weights, len(models), cfg)
    return cfg.merge_state(models, base, ws)


def literal_check(name: str, param: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"merge method '{name}': expected {param} in {list(options)}; got {plain(value)!r}")


def range_check(name: str, param: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ConfigError(f"merge method '{name}': expected {param} in {bracket}{lo}, {hi}]; got {plain(value)!r}")


def finite_check(name: str, param: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ConfigError(f"merge method '{name}': expected a finite number for {param}; got {plain(value)!r}")


Scope = Literal["tensor", "global"]
MergeFunc = Literal["mean", "sum"]
