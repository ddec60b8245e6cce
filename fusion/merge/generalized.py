"""Generalized task arithmetic: one class behind task_arithmetic, ties, dare_linear, dare_ties and breadcrumbs.

    θ = θ_base + λ · combine(sparsify(τ_1), …, sparsify(τ_K)),   τ_i = θ_i − θ_base

as mergekit's `GeneralizedTaskArithmeticMerge` (merge_methods/generalized_task_arithmetic.py), which
its registry instantiates under several names with different options. Here the options are two class
attributes fixed at registration (`register_task_arithmetic`), and each registered name is a thin
frozen dataclass that declares only its parameters (so `method_params(name)` and the error messages
stay per name):

- sparsification: "none"; "magnitude" (TIES trim: keep the top max(1, int(density·n)) |τ| per tensor,
  or the whole-model kthvalue threshold with scope="global"); "random" (DARE: keep with probability
  density, rescale by 1/density, one seeded generator per (seed, model, entry)); "magnitude_outliers"
  (breadcrumbs: drop the γ·n largest and the smallest |τ| so int(density·n) survive).
- consensus: "none" (weighted sum Σ w_i τ̃_i) or "sign" (TIES: elect sgn(Σ w_i τ̃_i), a zero vote
  becoming +1 per tensor or the model's majority sign with scope="global"; then the disjoint mean or
  sum of the agreeing w_i τ̃_i).

With neither, the cache-blocked `task_arithmetic_kernel` runs, so task_arithmetic streams in row
slices ("elementwise"); every other combination is per tensor ("tensor"), global-scope TIES "global".
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from torch import Tensor

from fusion.errors import ConfigError
from fusion.merge import kernels as K
from fusion.merge.registry import (
    MergeMethod,
    StateDict,
    TensorwiseMethod,
    finite_check,
    literal_check,
    range_check,
    register_merge,
)

Sparsification = Literal["none", "magnitude", "random", "magnitude_outliers"]
Consensus = Literal["none", "sign"]


def tensor_generator(seed: int, key: str, index: int) -> torch.Generator:
    """A generator seeded from (seed, entry name, model index), so random masks do not depend on entry order."""
    digest = hashlib.sha256(f"{seed}/{index}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ---------------------------------------------------------------------------------------------
# global-scope TIES: whole-model thresholds and the majority sign


@dataclass(frozen=True)
class TiesGlobalStats:
    """Whole-model quantities of global-scope TIES: per-model magnitude thresholds and the majority sign."""

    thresholds: tuple[float | None, ...]  # keep |τ_i| >= threshold (None: keep all)
    majority_sign: int  # sign of the sum of elected signs over the model: resolves entries whose vote is 0
    select_dtype: torch.dtype  # magnitudes are compared in this dtype (float64 if any entry is)


def select_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """float64 when any floating entry is float64, else float32 (which holds every narrower float exactly)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def global_kth(d: int, density: float) -> int | None:
    """1-based rank of the threshold in ascending |τ| order (the original code's kthvalue rule); None keeps all."""
    return None if density >= 1.0 else d - int(d * density)


def trim_global(delta: Tensor, threshold: float | None, sel: torch.dtype) -> Tensor:
    """Zero |δ| < threshold (original TIES / FusionBench: kthvalue over the whole model). delta: S -> S."""
    if threshold is None:
        return delta
    keep = delta.abs().to(sel) >= torch.tensor(threshold, dtype=sel)
    return torch.where(keep, delta, torch.zeros((), dtype=delta.dtype))


def elected_balance(xs: Sequence[Tensor], base: Tensor, weights: tuple[float, ...], thresholds, sel) -> int:
    """(#entries elected +) − (#entries elected −) of one entry, for global-scope majority-sign resolution."""
    trimmed = [trim_global(d, t, sel) for d, t in zip(K.task_vectors(xs, base), thresholds)]
    sign = K.elect_sign(trimmed, weights)
    return int((sign > 0).sum()) - int((sign < 0).sum())


# ---------------------------------------------------------------------------------------------
# the generalized method


def _check_seed(m: "GeneralizedTaskArithmetic", value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"merge method '{m.name}': expected an integer seed; got {value!r}")


# parameter name -> its check; run in the order the registered dataclass declares its fields
PARAM_CHECKS: dict[str, Callable[["GeneralizedTaskArithmetic", Any], None]] = {
    "density": lambda m, v: range_check(m.name, "density", v, 0.0, 1.0, lo_open=True),
    "seed": _check_seed,
    "gamma": lambda m, v: range_check(m.name, "gamma", v, 0.0, 1.0),
    "scope": lambda m, v: literal_check(m.name, "scope", v, ("tensor", "global")),
    "merge": lambda m, v: literal_check(m.name, "merge", v, ("mean", "sum")),
    "scaling": lambda m, v: finite_check(m.name, "scaling", v),
}

# which parameters each option needs (checked once, at registration)
NEEDED = {"magnitude": {"density"}, "random": {"density", "seed"}, "magnitude_outliers": {"density", "gamma"}, "sign": {"merge"}}


class GeneralizedTaskArithmetic(TensorwiseMethod):
    """θ_base + λ · combine(sparsify(τ)) with `sparsification` and `consensus` fixed per registered name.

    Subclasses are frozen dataclasses declaring their parameters among density, seed, gamma, scope,
    merge and scaling (see `register_task_arithmetic`); this class holds every check and every step.
    """

    sparsification: ClassVar[Sparsification] = "none"
    consensus: ClassVar[Consensus] = "none"
    needs_base: ClassVar[bool] = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            PARAM_CHECKS[f.name](self, getattr(self, f.name))

    @property
    def scope(self) -> str:
        """`global` only for a method declaring a `scope` field set so (TIES); else per tensor."""
        return self.__dict__.get("scope", "tensor")

    @property
    def streaming(self) -> str:  # type: ignore[override]
        if self.scope == "global":
            return "global"
        return "elementwise" if self.sparsification == "none" and self.consensus == "none" else "tensor"

    # -- the two steps ------------------------------------------------------------------------

    def sparsify(self, key: str, deltas: Sequence[Tensor]) -> list[Tensor]:
        """Per-tensor sparsification of the K task vectors of entry `key` (each of shape S -> S)."""
        zero = torch.zeros((), dtype=deltas[0].dtype)
        if self.sparsification == "magnitude":
            return [torch.where(K.topk_mask(d, float(self.density)), d, zero) for d in deltas]
        if self.sparsification == "random":
            return [K.dare_sparsify(d, float(self.density), tensor_generator(self.seed, key, i)) for i, d in enumerate(deltas)]
        if self.sparsification == "magnitude_outliers":
            return [torch.where(K.breadcrumbs_mask(d, float(self.density), float(self.gamma)), d, zero) for d in deltas]
        return list(deltas)

    def combine(self, deltas: Sequence[Tensor], base: Tensor, weights: tuple[float, ...], zero_vote: float = 1.0) -> Tensor:
        """θ_base + λ · (Σ w_i δ_i, or the disjoint merge under the elected sign); deltas: K of shape S -> S."""
        if self.consensus == "none":
            return K.delta_sum_kernel(deltas, base, weights, float(self.scaling))
        sign = K.elect_sign(deltas, weights)
        sign = torch.where(sign == 0, torch.full((), zero_vote, dtype=sign.dtype), sign)
        return K.finish(base, K.disjoint_merge(deltas, weights, sign, self.merge), float(self.scaling))

    def merge_tensor(self, key, xs, base, weights):
        """Per-tensor scope (global scope needs `global_stats` first: see `merge_tensor_global`)."""
        if self.scope != "tensor":
            raise ConfigError(f"{self.name} with scope='global' needs whole-model thresholds; use merge_state or merge_tensor_global")
        if self.sparsification == "none" and self.consensus == "none":
            return K.task_arithmetic_kernel(xs, base, weights, float(self.scaling))  # blocked, no task-vector copies
        return self.combine(self.sparsify(key, K.task_vectors(xs, base)), base, weights)

    # -- global scope (magnitude sparsification over the whole model) -------------------------

    def merge_tensor_global(self, key, xs, base, weights, stats: TiesGlobalStats) -> Tensor:
        """One entry of global-scope TIES given the whole-model `stats`. xs: K of shape S, base: S -> S."""
        trimmed = [trim_global(d, t, stats.select_dtype) for d, t in zip(K.task_vectors(xs, base), stats.thresholds)]
        return self.combine(trimmed, base, weights, zero_vote=float(stats.majority_sign))

    def global_stats(self, models: Sequence[StateDict], base: StateDict, weights: tuple[float, ...]) -> TiesGlobalStats:
        """Per-model kthvalue thresholds over the whole flattened task vector, then the majority sign."""
        keys = [k for k, v in base.items() if v.is_floating_point()]
        sel = select_dtype([base[k].dtype for k in keys])
        if not keys:
            return TiesGlobalStats((None,) * len(models), 0, sel)
        thresholds = []
        for m in models:
            mags = torch.cat([K.task_vectors([m[k]], base[k])[0].abs().to(sel).reshape(-1) for k in keys])  # (d,)
            kth = global_kth(mags.numel(), self.density)
            thresholds.append(None if kth is None else float(mags.kthvalue(kth).values))
        balance = sum(elected_balance([m[k] for m in models], base[k], weights, thresholds, sel) for k in keys)
        return TiesGlobalStats(tuple(thresholds), (balance > 0) - (balance < 0), sel)

    def merge_state(self, models, base, weights):
        if self.scope == "tensor":
            return super().merge_state(models, base, weights)
        stats = self.global_stats(models, base, weights)
        out = {}
        for key, ref in models[0].items():
            if not ref.is_floating_point():
                out[key] = ref.clone()
                continue
            out[key] = self.merge_tensor_global(key, [m[key] for m in models], base[key], weights, stats)
        return out


def register_task_arithmetic(
    name: str, *, paper: str, sparsification: Sparsification = "none", consensus: Consensus = "none",
) -> Callable[[type], type[MergeMethod]]:
    """Make `cls` (a GeneralizedTaskArithmetic subclass declaring only parameters) a frozen dataclass with the
    given options and register it under `name` (mergekit registers its generalized class the same way).

    Fails at import when the declared parameters do not fit the options (every name takes `scaling`;
    a sparsification needs `density`, DARE a `seed`, breadcrumbs a `gamma`, sign consensus a `merge`;
    only magnitude sparsification may take a `scope`).
    """

    def deco(cls: type) -> type[MergeMethod]:
        if not issubclass(cls, GeneralizedTaskArithmetic):
            raise TypeError(f"merge method '{name}': expected a GeneralizedTaskArithmetic subclass; got {cls.__name__}")
        cls = dataclass(frozen=True)(cls)
        declared = {f.name for f in dataclasses.fields(cls)}
        allowed = {"scaling"} | NEEDED.get(sparsification, set()) | NEEDED.get(consensus, set())
        allowed |= {"scope"} if sparsification == "magnitude" else set()
        required = allowed - {"scope"}
        if not required <= declared <= allowed or sparsification not in ("none", *NEEDED) or consensus not in ("none", "sign"):
            raise ValueError(
                f"merge method '{name}' ({sparsification}, {consensus}): expected parameters {sorted(required)} "
                f"(optional scope only with magnitude); got {sorted(declared)}"
            )
        cls.sparsification = sparsification
        cls.consensus = consensus
        return register_merge(name, paper=paper)(cls)

    return deco
