"""The registered merge methods: thin frozen configs over `fusion.merge.kernels`.

The task-arithmetic family (task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs) is one class,
`fusion.merge.generalized.GeneralizedTaskArithmetic`, registered under five names with their options;
the classes here only declare each name's parameters.

θ are parameters, τ_i = θ_i − θ_base task vectors, w_i the per-model weights (default 1), λ `scaling`.
Where mergekit and the original code / FusionBench disagree, both are available behind an option
and the default is named in the docstring (see /work/shared/NOTES-algorithms.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from fusion.errors import ConfigError
from fusion.merge import kernels as K
from fusion.merge.generalized import (  # noqa: F401  (TiesGlobalStats, tensor_generator: re-exported)
    GeneralizedTaskArithmetic,
    TiesGlobalStats,
    register_task_arithmetic,
    tensor_generator,
)
from fusion.merge.registry import (
    MergeFunc,
    MergeMethod,
    Scope,
    StateDict,
    TensorwiseMethod,
    plain,
    range_check,
    register_merge,
)


@register_merge("linear", paper="https://arxiv.org/abs/2203.05482")
@dataclass(frozen=True)
class Linear(TensorwiseMethod):
    """Weighted mean Σ w_i θ_i / Σ w_i (weights default equal: the uniform soup)."""

    streaming: ClassVar[str] = "elementwise"

    def merge_tensor(self, key, xs, base, weights):
        return K.linear_kernel(xs, weights)


@register_merge("uniform_soup", paper="https://arxiv.org/abs/2203.05482")
@dataclass(frozen=True)
class UniformSoup(Linear):
    """Uniform model soup (Wortsman et al. 2022): the plain mean of the members; takes no weights."""

    uses_weights: ClassVar[bool] = False


@dataclass(frozen=True)
class GreedySoupResult:
    """The greedy soup, the indices of its ingredients in the order added, and the scores seen."""

    state_dict: dict[str, Tensor]
    selected: tuple[int, ...]
    ingredient_scores: tuple[float, ...]  # score of each model alone, in input order
    soup_score: float


def _score(score: Callable[[dict[str, Tensor]], float], state: Mapping[str, Tensor], what: str) -> float:
    value = score(state)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"greedy_soup: expected score(state_dict) to return a number for {what}; got {plain(value)!r:.80}") from None
    if not math.isfinite(value):
        raise ConfigError(f"greedy_soup: expected a finite score for {what}; got {value}")
    return value


@torch.no_grad()
def greedy_soup(models: Sequence[StateDict], score: Callable[[dict[str, Tensor]], float]) -> GreedySoupResult:
    """Greedy soup (Wortsman et al. 2022): add ingredients by decreasing held-out score while it strictly improves.

    models: K state dicts; score(state_dict) -> float, higher is better, on held-out data (not the
    data the merge is reported on). The soup is the uniform mean of the selected ingredients; a
    candidate joins only if the soup's score becomes strictly greater (the official code's `>`).
    https://arxiv.org/abs/2203.05482
    """
    linear = Linear()
    scores = [_score(score, m, f"model {i}") for i, m in enumerate(models)]
    order = sorted(range(len(models)), key=lambda i: -scores[i])  # stable: equal scores keep input order
    selected = [order[0]]
    soup = linear.merge_state([models[order[0]]], None, (1.0,))
    best = scores[order[0]]
    for i in order[1:]:
        candidate = linear.merge_state([models[j] for j in selected + [i]], None, (1.0,) * (len(selected) + 1))
        s = _score(score, candidate, f"the soup with model {i}")
        if s > best:
            selected.append(i)
            soup, best = candidate, s
    # integer buffers: from the first model, like every other method (not from the first ingredient)
    soup = {k: (v if v.is_floating_point() else models[0][k].clone()) for k, v in soup.items()}
    return GreedySoupResult(soup, tuple(selected), tuple(scores), best)


@register_merge("greedy_soup", paper="https://arxiv.org/abs/2203.05482")
@dataclass(frozen=True)
class GreedySoup(MergeMethod):
    """Greedy soup; `score(state_dict) -> float` evaluates a candidate on held-out data (see `greedy_soup`)."""

    score: Callable[[dict[str, Tensor]], float] | None = None
    uses_weights: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True

    def __post_init__(self):
        if not callable(self.score):
            raise ConfigError(f"merge method 'greedy_soup': expected score=callable(state_dict) -> float; got {self.score!r}")

    def merge_state(self, models, base, weights):
        return greedy_soup(models, self.score).state_dict


@register_task_arithmetic("task_arithmetic", paper="https://arxiv.org/abs/2212.04089")
class TaskArithmetic(GeneralizedTaskArithmetic):
    """θ_base + λ Σ w_i τ_i (Ilharco et al. 2023); λ = `scaling`, default 1.0 (0.3–1.0 typical, pick on validation)."""

    scaling: float = 1.0


@register_task_arithmetic("ties", paper="https://arxiv.org/abs/2306.01708", sparsification="magnitude", consensus="sign")
class Ties(GeneralizedTaskArithmetic):
    """TIES merging (Yadav et al. 2023): trim each τ_i, elect a sign per entry, disjoint merge, θ_base + λ·merged.

    density (default 0.2): fraction of each task vector kept by magnitude.
    scope (default "tensor"): "tensor" is mergekit's convention: top max(1, int(density·n)) per tensor,
    a zero elected sign becomes +1. "global" is the original code / FusionBench's: the kthvalue
    threshold over the whole flattened model (every floating entry), a zero elected sign becomes the
    model-wide majority sign.
    merge (default "mean", mergekit's; FusionBench defaults to "sum"): disjoint mean Σ w τ m / Σ w m, or sum.
    Signs are elected on weighted task vectors, sgn(Σ w_i τ̂_i). Reproduce FusionBench with
    scope="global", merge="sum".
    """

    density: float = 0.2
    scope: Scope = "tensor"
    merge: MergeFunc = "mean"
    scaling: float = 1.0


@register_task_arithmetic("dare_linear", paper="https://arxiv.org/abs/2311.03099", sparsification="random")
class DareLinear(GeneralizedTaskArithmetic):
    """DARE (Yu et al. 2024) + task arithmetic: keep each τ entry with probability `density` (drop p = 1 − density),
    rescale survivors by 1/(1 − p), then θ_base + λ Σ w_i τ̃_i. density default 0.5; `seed` seeds a
    generator per (entry, model). density = 1 equals task_arithmetic bit for bit.
    """

    density: float = 0.5
    seed: int = 0
    scaling: float = 1.0


@register_task_arithmetic("dare_ties", paper="https://arxiv.org/abs/2311.03099", sparsification="random", consensus="sign")
class DareTies(GeneralizedTaskArithmetic):
    """DARE sparsification + TIES sign election and disjoint merge (`merge` "mean" default, or "sum").

    density = 1 equals ties(density=1) bit for bit. Zero elected sign -> +1 (mergekit).
    """

    density: float = 0.5
    seed: int = 0
    scaling: float = 1.0
    merge: MergeFunc = "mean"


@register_merge("slerp", paper="https://dl.acm.org/doi/10.1145/325165.325242")
@dataclass(frozen=True)
class Slerp(TensorwiseMethod):
    """Spherical interpolation of two models, per tensor; t = 0 gives the first, t = 1 the second (default 0.5).

    Falls back to lerp where |cos| > 0.9995 (mergekit's threshold) or an endpoint is zero.
    """

    t: float = 0.5
    uses_weights: ClassVar[bool] = False
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = 2

    def __post_init__(self):
        range_check(self.name, "t", self.t, 0.0, 1.0)

    def merge_tensor(self, key, xs, base, weights):
        return K.slerp_kernel(xs[0], xs[1], float(self.t))


@register_task_arithmetic("breadcrumbs", paper="https://arxiv.org/abs/2312.06795", sparsification="magnitude_outliers")
class Breadcrumbs(GeneralizedTaskArithmetic):
    """Model Breadcrumbs (Davari & Belilovsky 2023): per tensor drop the largest `gamma` (default 0.01) and the
    smallest |τ| so that `density` (default 0.9) survive, then θ_base + λ Σ w_i τ̃_i.
    """

    density: float = 0.9
    gamma: float = 0.01
    scaling: float = 1.0


@register_merge("model_stock", paper="https://arxiv.org/abs/2403.19522")
@dataclass(frozen=True)
class ModelStock(TensorwiseMethod):
    """Model Stock (Jang et al. 2024): per tensor t = N·cos/(1 + (N−1)·cos), θ = t·mean(θ_i) + (1 − t)·θ_base.

    cos is the mean pairwise cosine of the task vectors (clamped to [0, 1]); needs N ≥ 2 and a base.
    """

    needs_base: ClassVar[bool] = True
    uses_weights: ClassVar[bool] = False
    min_models: ClassVar[int] = 2

    def merge_tensor(self, key, xs, base, weights):
        return K.model_stock_kernel(xs, base)


def _check_side_inputs(method: str, what: str, side: Any, models: Sequence[StateDict], expected_shape) -> list[Mapping[str, Tensor]]:
    """Per-model dicts of extra tensors (Fishers, Grams): one per model, same keys, known entries, right shapes."""
    if isinstance(side, Mapping) or not isinstance(side, Sequence):
        raise ConfigError(f"merge method '{method}': expected {what} as a sequence with one dict per model; got {type(side).__name__}")
    if len(side) != len(models):
        raise ConfigError(f"merge method '{method}': expected {len(models)} {what}, one per model; got {len(side)}")
    keys = set(side[0]) if side else set()
    for i, (s, m) in enumerate(zip(side, models)):
        if set(s) != keys:
            raise ConfigError(f"merge method '{method}': expected {what}[{i}] to have the keys of {what}[0]; got {sorted(set(s) ^ keys)[:5]} differing")
        for key, t in s.items():
            if key not in m or not m[key].is_floating_point():
                raise ConfigError(f"merge method '{method}': {what}[{i}] has entry '{key}'; expected a floating entry of the models")
            want = expected_shape(m[key])
            if not isinstance(t, Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ConfigError(f"merge method '{method}': {what}[{i}]['{key}'] expected shape {want}; got {got}")
            if not bool(torch.isfinite(t).all()):
                raise ConfigError(f"merge method '{method}': {what}[{i}]['{key}'] expected finite values; got NaN or inf")
    return list(side)


@register_merge("fisher", paper="https://arxiv.org/abs/2111.09832")
@dataclass(frozen=True)
class Fisher(MergeMethod):
    """Fisher merging (Matena & Raffel 2022): Σ w_i F̃_i θ_i / Σ w_i F̃_i per entry, F̃ = max(F, floor).

    fishers: one dict per model of diagonal Fishers (entry name -> tensor of the entry's shape), e.g.
    from `diagonal_fisher`; entries without a Fisher (buffers) get the weighted mean. floor default 1e-6.
    """

    fishers: Sequence[Mapping[str, Tensor]] | None = None
    floor: float = 1e-6
    needs_data: ClassVar[bool] = True

    def __post_init__(self):
        if self.fishers is None:
            raise ConfigError("merge method 'fisher': expected fishers=[{entry: diagonal Fisher}, ...] one per model (see diagonal_fisher); got none")
        range_check(self.name, "floor", self.floor, 0.0, math.inf, lo_open=True)

    def merge_state(self, models, base, weights):
        fishers = _check_side_inputs(self.name, "fishers", self.fishers, models, lambda t: tuple(t.shape))
        for i, f in enumerate(fishers):
            for key, t in f.items():
                if bool((t < 0).any()):
                    raise ConfigError(f"merge method 'fisher': expected non-negative fishers[{i}]['{key}']; got negative values")
        out = Linear().merge_state(models, None, weights)
        for key in fishers[0]:
            out[key] = K.fisher_kernel([m[key] for m in models], [f[key] for f in fishers], weights, float(self.floor))
        return out


@register_merge("regmean", paper="https://arxiv.org/abs/2212.09849")
@dataclass(frozen=True)
class RegMean(MergeMethod):
    """RegMean (Jin et al. 2023): W* = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ per Linear weight, G̃ = αG + (1 − α)diag(G).

    grams: one dict per model, Linear weight name (out, in) -> Gram matrix (in, in) of that layer's
    inputs (see `regmean_grams`); alpha (default 0.9) scales the off-diagonal. Every other entry gets
    the weighted mean; weights scale each model's Gram matrices.
    """

    grams: Sequence[Mapping[str, Tensor]] | None = None
    alpha: float = 0.9
    needs_data: ClassVar[bool] = True

    def __post_init__(self):
        if self.grams is None:
            raise ConfigError("merge method 'regmean': expected grams=[{linear weight name: (in, in) Gram}, ...] one per model (see regmean_grams); got none")
        range_check(self.name, "alpha", self.alpha, 0.0, 1.0)

    def merge_state(self, models, base, weights):
        def gram_shape(t: Tensor):
            if t.dim() != 2:
                raise ConfigError(f"merge method 'regmean': expected 2-D (out, in) Linear weights for the Gram entries; got shape {tuple(t.shape)}")
            return (t.shape[1], t.shape[1])

        grams = _check_side_inputs(self.name, "grams", self.grams, models, gram_shape)
        out = Linear().merge_state(models, None, weights)
        for key in grams[0]:
            out[key] = K.regmean_kernel([m[key] for m in models], [g[key] for g in grams], weights, float(self.alpha))
        return out
