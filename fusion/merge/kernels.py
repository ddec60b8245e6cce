"""Merge kernels: pure functions on tensors (no state dicts, no registry, no I/O).

Every kernel takes the K member tensors of **one** state-dict entry (all of one shape and dtype) and
returns a new tensor of that shape and dtype; none writes into its inputs. Half-precision inputs are
accumulated in float32 and cast back at the end.

Elementwise kernels (`linear_kernel`, `task_arithmetic_kernel`, `delta_sum_kernel`) run in
cache-sized blocks into one preallocated output and use only correctly rounded elementwise IEEE
operations (no fused multiply-add), so an entry's result does not depend on the block size, on the
thread count or on whether it is computed whole or in slices (which is what lets the streaming merge
in `fusion.merge.streaming` equal the in-memory merge bit for bit).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor

BLOCK_PER_THREAD = 1 << 16  # elements per thread per block: accumulator + scratch (2 x 256 KiB float32) stay in L2


def block_size() -> int:
    """Elements per block: each intra-op thread gets BLOCK_PER_THREAD of them."""
    return BLOCK_PER_THREAD * max(1, torch.get_num_threads())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an entry of `dtype` is accumulated in: float32 for narrower floats (half, bf16, fp8), else itself."""
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1)  # a view for contiguous tensors (the usual state-dict case)


def _blocked(shape: torch.Size, dtype: torch.dtype, body, out: Tensor | None) -> Tensor:
    """Run `body(s, e, acc, tmp)` over blocks [s, e) of the flattened output; return the output.

    `acc` is the block of the output itself when no cast is needed, else a float32 scratch block that
    is cast into the output afterwards; `tmp` is a scratch block of the compute dtype.
    """
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype) if out is None else out
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"expected a contiguous out of shape {tuple(shape)} and {dtype}; got {tuple(out.shape)} {out.dtype}")
    flat_out = _flat(out)
    cd = compute_dtype(dtype)
    block = block_size()
    m = min(n, block)
    tmp = torch.empty(m, dtype=cd)
    scratch = torch.empty(m, dtype=cd) if cd != dtype else None
    for s in range(0, n, block):
        e = min(n, s + block)
        acc = flat_out[s:e] if scratch is None else scratch[: e - s]
        body(s, e, acc, tmp[: e - s])
        if scratch is not None:
            flat_out[s:e].copy_(acc)
    return out


def _scaled(src: Tensor, w: float, dst: Tensor, same: bool) -> None:
    """dst = src · w in dst's (compute) dtype; one pass when no widening is needed."""
    if same:
        torch.mul(src, w, out=dst)
    else:
        dst.copy_(src)
        dst.mul_(w)


def _delta(src: Tensor, base: Tensor, dst: Tensor, same: bool) -> None:
    """dst = src − base in dst's (compute) dtype."""
    if same:
        torch.sub(src, base, out=dst)
    else:
        dst.copy_(src)
        dst.sub_(base)


def _check_same(xs: Sequence[Tensor], base: Tensor | None = None) -> None:
    ref = base if base is not None else xs[0]
    for x in xs:
        if x.shape != ref.shape or x.dtype != ref.dtype:
            raise ValueError(f"expected tensors of shape {tuple(ref.shape)} and {ref.dtype}; got {tuple(x.shape)} and {x.dtype}")


def linear_kernel(
    xs: Sequence[Tensor], weights: Sequence[float] | None = None, *, out: Tensor | None = None, normalize: bool = True,
) -> Tensor:
    """Weighted mean Σ w_i x_i / Σ w_i of K tensors, cache-blocked (Wortsman et al. 2022, uniform soup).

    xs: K tensors of shape S -> S. Equal (or absent) weights take the unweighted path
    (x_0 + … + x_{K-1}) / K, which saves K multiplications per element. normalize=False gives the
    weighted sum Σ w_i x_i instead (mergekit's linear with `normalize: false`; default True).
    https://arxiv.org/abs/2203.05482
    """
    _check_same(xs)
    k = len(xs)
    flats = [_flat(x) for x in xs]
    uniform = normalize and (weights is None or all(w == weights[0] for w in weights))
    ws = [float(w) for w in weights] if weights is not None else [1.0] * k
    total = (float(k) if uniform else math.fsum(ws)) if normalize else 1.0
    same = compute_dtype(xs[0].dtype) == xs[0].dtype

    def body(s, e, acc, tmp):
        if uniform:
            if same and k > 1:
                torch.add(flats[0][s:e], flats[1][s:e], out=acc)
                start = 2
            else:  # half inputs: widen before adding
                acc.copy_(flats[0][s:e])
                start = 1
            for f in flats[start:]:
                acc.add_(f[s:e])
        else:
            _scaled(flats[0][s:e], ws[0], acc, same)
            for f, w in zip(flats[1:], ws[1:]):
                _scaled(f[s:e], w, tmp, same)
                acc.add_(tmp)
        if total != 1.0:
            acc.div_(total)

    return _blocked(xs[0].shape, xs[0].dtype, body, out)


def task_arithmetic_kernel(
    xs: Sequence[Tensor], base: Tensor, weights: Sequence[float] | None = None, scaling: float = 1.0,
    *, out: Tensor | None = None,
) -> Tensor:
    """θ_base + λ Σ w_i (θ_i − θ_base), cache-blocked (Ilharco et al. 2023, task arithmetic).

    xs: K tensors of shape S, base: S -> S. Same element-wise operations, in the same order, as
    `delta_sum_kernel` on deltas x_i − base, so both agree bit for bit.
    https://arxiv.org/abs/2212.04089
    """
    _check_same(xs, base)
    flats = [_flat(x) for x in xs]
    fb = _flat(base)
    ws = [float(w) for w in weights] if weights is not None else [1.0] * len(xs)

    same = compute_dtype(base.dtype) == base.dtype

    def body(s, e, acc, tmp):
        b = fb[s:e]
        _delta(flats[0][s:e], b, acc, same)  # τ_0
        if ws[0] != 1.0:
            acc.mul_(ws[0])
        for f, w in zip(flats[1:], ws[1:]):
            _delta(f[s:e], b, tmp, same)  # τ_i
            if w != 1.0:
                tmp.mul_(w)
            acc.add_(tmp)
        if scaling != 1.0:
            acc.mul_(scaling)
        acc.add_(b)

    return _blocked(base.shape, base.dtype, body, out)


def task_vectors(xs: Sequence[Tensor], base: Tensor) -> list[Tensor]:
    """τ_i = θ_i − θ_base in the compute dtype. xs: K tensors of shape S -> K tensors of shape S."""
    _check_same(xs, base)
    cd = compute_dtype(base.dtype)
    b = base.to(cd)
    return [x.to(cd) - b for x in xs]


def delta_sum_kernel(
    deltas: Sequence[Tensor], base: Tensor, weights: Sequence[float] | None = None, scaling: float = 1.0,
    *, out: Tensor | None = None,
) -> Tensor:
    """θ_base + λ Σ w_i δ_i for already sparsified task vectors δ_i (DARE, breadcrumbs).

    deltas: K tensors of shape S in the compute dtype, base: S -> S in base's dtype.
    """
    flats = [_flat(d) for d in deltas]
    fb = _flat(base)
    ws = [float(w) for w in weights] if weights is not None else [1.0] * len(deltas)

    def body(s, e, acc, tmp):
        acc.copy_(flats[0][s:e])
        if ws[0] != 1.0:
            acc.mul_(ws[0])
        for f, w in zip(flats[1:], ws[1:]):
            tmp.copy_(f[s:e])
            if w != 1.0:
                tmp.mul_(w)
            acc.add_(tmp)
        if scaling != 1.0:
            acc.mul_(scaling)
        acc.add_(fb[s:e])

    return _blocked(base.shape, base.dtype, body, out)


# ---------------------------------------------------------------------------------------------
# sparsification of task vectors


def topk_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the max(1, int(density·n)) largest |δ| of one tensor (mergekit's TIES trim); bool mask of δ's shape.

    Equal magnitudes are ranked by position (stable sort), so the mask is deterministic.
    https://arxiv.org/abs/2306.01708
    """
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    k = max(1, int(density * n))
    order = torch.argsort(_flat(delta).abs(), descending=True, stable=True)  # (n,)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(delta.shape)


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the largest γ·n and the smallest |δ| so that int(density·n) survive (Model Breadcrumbs); bool mask.

    delta: S -> S. Follows mergekit's `magnitude_outliers`: when density + γ > 1 the top cut shrinks
    so that exactly int(density·n) entries survive; density >= 1 keeps everything.
    https://arxiv.org/abs/2312.06795
    """
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.argsort(_flat(delta).abs(), descending=False, stable=True)  # ascending magnitudes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot : n - n_top]] = True
    return mask.reshape(delta.shape)


def rescale_l1(delta: Tensor, kept: Tensor, eps: float = 1e-7) -> Tensor:
    """`kept` (δ with entries zeroed) scaled so its L1 norm equals δ's: mergekit's `rescale: true`
    (sparsify.py `rescaled_masked_tensor`, RescaleNorm.l1), not DARE's 1/density. Either norm below
    eps leaves `kept` unscaled. delta, kept: S -> S.
    """
    before = delta.abs().sum()
    after = kept.abs().sum()
    if float(before) < eps or float(after) < eps:
        return kept
    return kept * (before / after)


def dare_sparsify(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Drop each entry with probability p = 1 − density and rescale survivors by 1/(1 − p) (DARE).

    delta: S -> S. density 1 returns δ unchanged bit for bit (δ / 1 = δ). The rescale is the paper's,
    not mergekit's L1-norm matching.
    https://arxiv.org/abs/2311.03099
    """
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density  # P(keep) = density
    return torch.where(keep, delta / density, torch.zeros((), dtype=delta.dtype))


# ---------------------------------------------------------------------------------------------
# TIES sign election and disjoint merge


def elect_sign(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sgn(Σ w_i δ_i) per entry as float (−1, 0, +1). deltas: K tensors of shape S -> S."""
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        total.add_(d if w == 1.0 else d * w)
    return torch.sign(total)


def disjoint_merge(
    deltas: Sequence[Tensor], weights: Sequence[float], sign: Tensor, merge: Literal["mean", "sum"],
) -> Tensor:
    """TIES disjoint merge: combine only the entries whose sign agrees with the elected `sign`.

    deltas: K tensors of shape S (trimmed task vectors), sign: S of ±1 (0 keeps negatives, as the
    original code's `where(sign > 0, δ > 0, δ < 0)`) -> S.
    mean: Σ w_i δ_i m_i / Σ w_i m_i (0 where nothing agrees); sum: Σ w_i δ_i m_i.
    https://arxiv.org/abs/2306.01708
    """
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0]) if merge == "mean" else None
    positive = sign > 0
    for d, w in zip(deltas, weights):
        agree = torch.where(positive, d > 0, d < 0)  # S, bool; zero entries never agree
        num.add_(torch.where(agree, d * w if w != 1.0 else d, 0.0))
        if den is not None:
            den.add_(agree.to(den.dtype) * w)
    if den is not None:
        num.div_(torch.where(den == 0, torch.ones((), dtype=den.dtype), den))
    return num


def finish(base: Tensor, merged_delta: Tensor, scaling: float) -> Tensor:
    """θ_base + λ·δ, cast to base's dtype. base: S, merged_delta: S (compute dtype) -> S."""
    if scaling != 1.0:
        merged_delta = merged_delta * scaling
    return (base.to(merged_delta.dtype) + merged_delta).to(base.dtype)


# ---------------------------------------------------------------------------------------------
# geometric kernels


def slerp_kernel(
    a: Tensor, b: Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8,
    zero_norm: Literal["lerp", "unit"] = "lerp",
) -> Tensor:
    """Spherical interpolation of two tensors viewed as flat vectors; lerp when |cos| > dot_threshold.

    a, b: S -> S. The angle is computed in float64; the combination s0·a + s1·b in the compute dtype.
    zero_norm="lerp" (default): a zero (norm < eps) endpoint has no direction, so it falls back to
    lerp. zero_norm="unit" is mergekit's: a norm <= eps counts as 1, so a zero endpoint gives cos 0,
    an angle of π/2 and s1 = sin(tπ/2). t = 0 and t = 1 return a and b exactly.
    https://dl.acm.org/doi/10.1145/325165.325242 (Shoemake 1985)
    """
    _check_same([a], b)
    cd = compute_dtype(a.dtype)
    fa, fb = a.to(cd), b.to(cd)
    a64, b64 = _flat(a).double(), _flat(b).double()
    na, nb = float(a64.norm()), float(b64.norm())
    if zero_norm == "unit":
        na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
        cos = max(-1.0, min(1.0, float((a64 / na) @ (b64 / nb)))) if a64.numel() else 1.0
    else:
        cos = float(a64 @ b64) / (na * nb) if na >= eps and nb >= eps else 1.0
    if abs(cos) > dot_threshold:
        s0, s1 = 1.0 - t, t
    else:
        theta0 = math.acos(max(-1.0, min(1.0, cos)))
        sin0 = math.sin(theta0)
        theta_t = theta0 * t
        s0 = math.sin(theta0 - theta_t) / sin0
        s1 = math.sin(theta_t) / sin0
    return (fa * s0 + fb * s1).to(a.dtype)


def model_stock_ratio(deltas: Sequence[Tensor], eps: float = 1e-8, *, convention: Literal["clamped", "mergekit"] = "clamped") -> float:
    """t = N·cos / (1 + (N−1)·cos) from the mean pairwise cosine of N ≥ 2 task vectors (Model Stock).

    deltas: N tensors of shape S. Cosines are computed in float64.
    convention="clamped" (default): a negative mean cosine would make t negative (and unbounded near
    −1/(N−1)), so the mean cos is clamped to [0, 1]: such a layer keeps the base.
    convention="mergekit" (merge_methods/model_stock.py): each pairwise cos is clamped to [−1, 1] with
    the norm product floored at 1e-6, the mean is not clamped, and t = 0 where |1 + (N−1)·cos| < 1e-6.
    https://arxiv.org/abs/2403.19522
    """
    flats = [_flat(d).double() for d in deltas]
    norms = [float(f.norm()) for f in flats]
    n = len(flats)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            if convention == "mergekit":
                cosines.append(max(-1.0, min(1.0, float(flats[i] @ flats[j]) / max(norms[i] * norms[j], 1e-6))))
            else:
                cosines.append(float(flats[i] @ flats[j]) / max(norms[i] * norms[j], eps))
    cos = sum(cosines) / len(cosines)
    if convention == "mergekit":
        den = 1.0 + (n - 1) * cos
        return 0.0 if abs(den) < 1e-6 else n * cos / den
    cos = min(1.0, max(0.0, cos))
    return n * cos / (1.0 + (n - 1) * cos)


def model_stock_kernel(xs: Sequence[Tensor], base: Tensor, *, convention: Literal["clamped", "mergekit"] = "clamped") -> Tensor:
    """θ = t·mean(θ_i) + (1 − t)·θ_base with t from `model_stock_ratio` (one layer = one tensor).

    xs: N ≥ 2 tensors of shape S, base: S -> S; convention: see `model_stock_ratio`.
    https://arxiv.org/abs/2403.19522
    """
    t = model_stock_ratio(task_vectors(xs, base), convention=convention)
    cd = compute_dtype(base.dtype)
    avg = linear_kernel([x.to(cd) for x in xs])  # S, in the compute dtype
    return (avg * t + base.to(avg.dtype) * (1.0 - t)).to(base.dtype)


# ---------------------------------------------------------------------------------------------
# data-aware kernels


def fisher_kernel(xs: Sequence[Tensor], fishers: Sequence[Tensor], weights: Sequence[float], floor: float = 1e-6) -> Tensor:
    """Σ w_i F̃_i θ_i / Σ w_i F̃_i with F̃ = max(F, floor) (Matena & Raffel 2022, Fisher merging).

    xs: K tensors of shape S, fishers: K diagonal Fishers of shape S -> S.
    https://arxiv.org/abs/2111.09832
    """
    _check_same(xs)
    cd = compute_dtype(xs[0].dtype)
    num = torch.zeros(xs[0].shape, dtype=cd)
    den = torch.zeros(xs[0].shape, dtype=cd)
    for x, f, w in zip(xs, fishers, weights):
        fw = f.to(cd).clamp_min(floor) * w
        num.add_(fw * x.to(cd))
        den.add_(fw)
    return (num / den).to(xs[0].dtype)


def regmean_kernel(ws: Sequence[Tensor], grams: Sequence[Tensor], weights: Sequence[float], alpha: float) -> Tensor:
    """W* = (Σ w_i G̃_i)⁻¹ Σ w_i G̃_i W_iᵀ with G̃ = αG + (1 − α)diag(G) (Jin et al. 2023, RegMean).

    ws: K weights of shape (out, in) (torch layout), grams: K input Gram matrices (in, in) -> (out, in).
    Solved in float64. Input features that never fire (zero Gram diagonal in every model; their
    Gram rows are then zero too, G being PSD) decouple from the system: their weight columns are
    the weighted mean instead of an arbitrary least-squares value.
    https://arxiv.org/abs/2212.09849
    """
    lhs = torch.zeros(grams[0].shape, dtype=torch.float64)  # (in, in)
    rhs = torch.zeros(ws[0].shape[::-1], dtype=torch.float64)  # (in, out)
    for w_mat, g, c in zip(ws, grams, weights):
        g = g.double()
        g_tilde = g * alpha + torch.diag(torch.diagonal(g)) * (1.0 - alpha)  # (in, in)
        lhs.add_(g_tilde * c)
        rhs.add_((g_tilde @ w_mat.double().T) * c)
    diag = torch.diagonal(lhs)
    active = diag > diag.max().clamp_min(0) * 1e-12  # (in,) features with any energy
    mean_t = linear_kernel([w.double() for w in ws], weights).T  # (in, out): fallback rows
    solved = mean_t.clone()
    if bool(active.any()):
        a = lhs[active][:, active]
        try:
            solved[active] = torch.linalg.solve(a, rhs[active])
        except RuntimeError:  # singular despite the diagonal check (collinear inputs): least squares
            solved[active] = torch.linalg.lstsq(a, rhs[active], driver="gelsd").solution
    return solved.T.contiguous().to(ws[0].dtype)
