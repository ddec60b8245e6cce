"""Mode connectivity: loss and accuracy along paths between two models, loss barriers, curves, task-vector diagnostics.

Every result is a JSON-serialisable dict (floats, lists, strings) that names its conventions.
Models take raw features X (n, n_features); y holds class indices (classification: cross-entropy
and accuracy) or float targets (regression: mean squared error, no accuracy).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from fusion.errors import ConfigError
from fusion.merge import kernels as K
from fusion.merge.estimates import _as_features, has_batchnorm, reset_bn as _reset_bn
from fusion.merge.registry import StateDict, check_layouts, layout_of

BARRIER_CONVENTION = "max_minus_mean_endpoints"  # Git Re-Basin code: max_λ L(λ) − ½(L_A + L_B)
ENTEZARI_CONVENTION = "max_minus_linear_interpolation_of_endpoints"  # Entezari et al.: max_λ L(λ) − ((1−λ)L_A + λL_B)


def _check_pair(*states: StateDict) -> None:
    names = [f"state {i}" for i in range(len(states))]
    check_layouts([layout_of(s, n) for s, n in zip(states, names)], names)


@torch.no_grad()
def combine_states(states: Sequence[StateDict], coefficients: Sequence[float]) -> dict[str, Tensor]:
    """Σ c_i θ_i / Σ c_i over floating entries (integer buffers from the first state). states: K dicts -> dict."""
    out = {}
    for key, ref in states[0].items():
        out[key] = K.linear_kernel([s[key] for s in states], list(coefficients)) if ref.is_floating_point() else ref.clone()
    return out


def lerp_state(sd_a: StateDict, sd_b: StateDict, lam: float) -> dict[str, Tensor]:
    """(1 − λ)θ_A + λθ_B; λ = 0 and λ = 1 give the endpoints exactly."""
    return combine_states([sd_a, sd_b], [1.0 - lam, lam])


def bezier_state(sd_a: StateDict, sd_c: StateDict, sd_b: StateDict, t: float) -> dict[str, Tensor]:
    """Quadratic Bezier (1 − t)²θ_A + 2t(1 − t)θ_c + t²θ_B (Garipov et al. 2018); t = 0, 1 give the endpoints."""
    return combine_states([sd_a, sd_c, sd_b], [(1.0 - t) ** 2, 2.0 * t * (1.0 - t), t**2])


def _targets(y, n: int) -> Tensor:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if y.shape[0] != n:
        raise ConfigError(f"expected {n} targets, one per row of X; got {y.shape[0]}")
    return y


def _loss(logits: Tensor, y: Tensor) -> Tensor:
    if y.dtype.is_floating_point:
        return torch.nn.functional.mse_loss(logits, y.reshape(logits.shape).to(logits.dtype))
    return torch.nn.functional.cross_entropy(logits, y.long())


@torch.no_grad()
def evaluate(model: nn.Module, X, y, *, batch_size: int = 1024) -> tuple[float, float | None]:
    """Mean loss (cross-entropy, or MSE for float targets) and accuracy (None for regression) on (X, y)."""
    X = _as_features(X)
    y = _targets(y, len(X))
    model.eval()
    logits = torch.cat([model(X[s : s + batch_size]) for s in range(0, len(X), batch_size)])  # (n, C)
    loss = float(_loss(logits, y))
    acc = None if y.dtype.is_floating_point else float((logits.argmax(-1) == y).double().mean())
    return loss, acc


def barriers(lambdas: Sequence[float], losses: Sequence[float], accuracies: Sequence[float | None] | None = None) -> dict:
    """Loss barrier in both conventions (and the accuracy drop) from a path's values; endpoints are the first and last.

    barrier = max_λ L(λ) − ½(L_A + L_B)  (Git Re-Basin; "max_minus_mean_endpoints")
    barrier_entezari = max_λ [L(λ) − ((1 − λ)L_A + λL_B)]  (Entezari et al. 2022)
    accuracy_barrier = ½(acc_A + acc_B) − min_λ acc(λ)
    https://arxiv.org/abs/2209.04836, https://arxiv.org/abs/2110.06296
    """
    la, lb = losses[0], losses[-1]
    lo, hi = lambdas[0], lambdas[-1]
    rel = [(lam - lo) / (hi - lo) for lam in lambdas]  # position along the path in [0, 1]
    i_max = max(range(len(losses)), key=lambda i: losses[i])
    out = {
        "barrier": losses[i_max] - 0.5 * (la + lb),
        "barrier_convention": BARRIER_CONVENTION,
        "barrier_argmax": lambdas[i_max],
        "barrier_entezari": max(l - ((1 - r) * la + r * lb) for l, r in zip(losses, rel)),
        "barrier_entezari_convention": ENTEZARI_CONVENTION,
    }
    if accuracies is not None and all(a is not None for a in accuracies):
        out["accuracy_barrier"] = 0.5 * (accuracies[0] + accuracies[-1]) - min(accuracies)
        out["accuracy_barrier_convention"] = "mean_endpoints_minus_min"
    return out


def _path(model, states, X, y, *, reset_bn, X_bn, batch_size, kind: str, variable: str) -> dict:
    work = copy.deepcopy(model)  # the caller's module is never modified
    do_reset = has_batchnorm(work) if reset_bn is None else bool(reset_bn)
    losses, accs, ts = [], [], []
    for t, state in states:
        work.load_state_dict(state)
        if do_reset:
            _reset_bn(work, X if X_bn is None else X_bn)
        loss, acc = evaluate(work, X, y, batch_size=batch_size)
        ts.append(float(t)), losses.append(loss), accs.append(acc)
    classification = accs[0] is not None
    result = {
        "path": kind,
        "variable": variable,
        "lambdas": ts,
        "loss": losses,
        "loss_name": "cross_entropy" if classification else "mse",
        "accuracy": accs if classification else None,
        "reset_bn": do_reset,
        "n_points": len(ts),
    }
    result.update(barriers(ts, losses, accs if classification else None))
    return result


def _check_points(n_points: int) -> None:
    if not isinstance(n_points, int) or n_points < 2:
        raise ConfigError(f"expected n_points >= 2; got {n_points!r}")


def interpolation_path(
    model: nn.Module, sd_a: StateDict, sd_b: StateDict, X, y, *, n_points: int = 11,
    reset_bn: bool | None = None, X_bn=None, batch_size: int = 1024,
) -> dict:
    """Loss and accuracy at n_points evenly spaced λ on the straight path (1 − λ)θ_A + λθ_B, with both barriers.

    model: a module of the architecture (copied, never modified); X, y: evaluation data; BatchNorm
    statistics are recomputed at every λ (including the endpoints) on X_bn (default X) when the
    model has BatchNorm (reset_bn=None) or when reset_bn=True.
    https://arxiv.org/abs/2209.04836 (Ainsworth et al. 2023), https://arxiv.org/abs/1912.05671 (Frankle et al. 2020)
    """
    _check_points(n_points)
    _check_pair(sd_a, sd_b)
    lambdas = [i / (n_points - 1) for i in range(n_points)]
    states = ((lam, lerp_state(sd_a, sd_b, lam)) for lam in lambdas)
    return _path(model, states, X, y, reset_bn=reset_bn, X_bn=X_bn, batch_size=batch_size, kind="linear", variable="lambda")


def bezier_path(
    model: nn.Module, sd_a: StateDict, sd_c: StateDict, sd_b: StateDict, X, y, *, n_points: int = 11,
    reset_bn: bool | None = None, X_bn=None, batch_size: int = 1024,
) -> dict:
    """Like `interpolation_path` along the quadratic Bezier curve through control point θ_c (see `train_bezier`)."""
    _check_points(n_points)
    _check_pair(sd_a, sd_c, sd_b)
    ts = [i / (n_points - 1) for i in range(n_points)]
    states = ((t, bezier_state(sd_a, sd_c, sd_b, t)) for t in ts)
    return _path(model, states, X, y, reset_bn=reset_bn, X_bn=X_bn, batch_size=batch_size, kind="bezier", variable="t")


def train_bezier(
    model: nn.Module, sd_a: StateDict, sd_b: StateDict, X, y, *, epochs: int = 20, lr: float = 1e-2,
    batch_size: int = 64, seed: int = 0,
) -> dict[str, Tensor]:
    """Train the control point θ_c of a quadratic Bezier curve between fixed endpoints; returns θ_c as a state dict.

    Minimises E_{t~U(0,1)} L((1 − t)²θ_A + 2t(1 − t)θ_c + t²θ_B) with Adam, one t per mini-batch,
    seeded shuffles and t; θ_c starts at the midpoint. Parameters only are trained: θ_c's buffers are
    the midpoint's (BatchNorm runs on batch statistics during training; reset it along the curve).
    https://arxiv.org/abs/1802.10026 (Garipov et al. 2018)
    """
    _check_pair(sd_a, sd_b)
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"expected epochs >= 1; got {epochs!r}")
    X = _as_features(X)
    y = _targets(y, len(X))
    work = copy.deepcopy(model).train()
    names = [k for k, _ in work.named_parameters()]
    a = {k: sd_a[k].detach() for k in names}
    b = {k: sd_b[k].detach() for k in names}
    mid = lerp_state(sd_a, sd_b, 0.5)
    c = {k: mid[k].clone().requires_grad_(True) for k in names}
    buffers = {k: v.detach().clone() for k, v in work.named_buffers()}  # scratch: BN updates them in train mode
    opt = torch.optim.Adam(list(c.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(X), generator=gen)
            for s in range(0, len(X), batch_size):
                idx = order[s : s + batch_size]
                t = float(torch.rand((), generator=gen))
                params = {k: (1 - t) ** 2 * a[k] + 2 * t * (1 - t) * c[k] + t**2 * b[k] for k in names}
                loss = _loss(functional_call(work, {**params, **buffers}, (X[idx],)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return {k: (c[k].detach().clone() if k in c else mid[k]) for k in mid}


@torch.no_grad()
def task_vector_diagnostics(models: Sequence[StateDict], base: StateDict, *, keys: Sequence[str] | None = None) -> dict:
    """Cosine similarity and sign conflicts of the task vectors τ_i = θ_i − θ_base (predictors of merge success).

    keys: entries to include (default every floating entry). Returns norms, the pairwise cosine
    matrix and its off-diagonal mean, the pairwise sign-conflict matrix (among entries where both τ
    are non-zero, the fraction with opposite signs) and `sign_conflict_rate`: among entries where at
    least two τ_i are non-zero, the fraction whose non-zero signs disagree (TIES' interference).
    https://arxiv.org/abs/2306.01708 (Yadav et al. 2023, §3)
    """
    models = list(models)
    if len(models) < 2:
        raise ConfigError(f"expected at least 2 models to compare; got {len(models)}")
    _check_pair(*models, base)
    keys = [k for k, v in base.items() if v.is_floating_point()] if keys is None else list(keys)
    unknown = [k for k in keys if k not in base or not base[k].is_floating_point()]
    if unknown:
        raise ConfigError(f"expected floating entries of the models; got {unknown[:5]}")
    n = len(models)
    dots = torch.zeros(n, n, dtype=torch.float64)
    both = torch.zeros(n, n, dtype=torch.float64)
    opposite = torch.zeros(n, n, dtype=torch.float64)
    multi = conflict = total = 0
    for key in keys:
        taus = torch.stack([t.double().reshape(-1) for t in K.task_vectors([m[key] for m in models], base[key])])  # (n, d)
        signs = torch.sign(taus)
        dots += taus @ taus.T
        nz = (signs != 0).double()
        both += nz @ nz.T
        opposite += (signs > 0).double() @ (signs < 0).double().T + (signs < 0).double() @ (signs > 0).double().T
        count = nz.sum(0)  # (d,) non-zero task vectors per entry
        has_both = ((signs > 0).any(0) & (signs < 0).any(0))
        multi += int((count >= 2).sum())
        conflict += int(has_both.sum())
        total += taus.shape[1]
    norms = dots.diagonal().sqrt()
    cos = dots / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    off = [float(cos[i, j]) for i in range(n) for j in range(n) if i < j]
    pair_conflict = (opposite / both.clamp_min(1)).tolist()
    return {
        "n_models": n,
        "n_entries": total,
        "norms": norms.tolist(),
        "cosine": cos.tolist(),
        "mean_pairwise_cosine": sum(off) / len(off),
        "sign_conflict": pair_conflict,
        "sign_conflict_rate": conflict / multi if multi else 0.0,
        "sign_conflict_convention": "fraction of entries with >= 2 non-zero task-vector values whose signs disagree",
    }


PATH_DPI = 110


def plot_path(results: Mapping | Sequence[Mapping], png_path: str | Path, *, title: str | None = None) -> Path:
    """Plot loss and accuracy along one or several paths (a result, a list, or a {label: result} dict) to a PNG."""
    fig = path_figure(results, title=title)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=PATH_DPI)
    return png_path


def path_figure(results: Mapping | Sequence[Mapping], *, title: str | None = None):
    """The figure `plot_path` saves: loss (and accuracy) against λ, one line per path.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). One legend for both
    panels, below them: inside an axes it covered part of a curve wherever it went.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(results, Mapping) and "loss" in results:
        series = {results.get("path", "path"): results}
    elif isinstance(results, Mapping):
        series = dict(results)
    else:
        series = {f"{r.get('path', 'path')} {i}": r for i, r in enumerate(results)}
    has_acc = any(r.get("accuracy") is not None for r in series.values())
    fig = Figure(figsize=(10 if has_acc else 5.5, 4.1), layout="constrained", dpi=PATH_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    for label, r in series.items():
        name = f"{label} (barrier {r['barrier']:.3f})"
        axes[0].plot(r["lambdas"], r["loss"], marker="o", ms=3, label=name)
        if has_acc and r.get("accuracy") is not None:
            axes[1].plot(r["lambdas"], r["accuracy"], marker="o", ms=3, label=label)
    variable = next(iter(series.values())).get("variable", "lambda")
    axes[0].set(xlabel="λ" if variable == "lambda" else variable, ylabel=next(iter(series.values())).get("loss_name", "loss"), title="loss")
    fig.legend(handles=axes[0].get_lines(), loc="outside lower center", ncols=min(len(series), 3), fontsize=8, frameon=False)
    if has_acc:
        axes[1].set(xlabel="λ" if variable == "lambda" else variable, ylabel="accuracy", title="accuracy")
    if title:
        fig.suptitle(title)
    return fig


__all__ = [
    "BARRIER_CONVENTION", "ENTEZARI_CONVENTION", "barriers", "bezier_path", "bezier_state", "combine_states",
    "evaluate", "interpolation_path", "lerp_state", "path_figure", "plot_path", "task_vector_diagnostics", "train_bezier",
]
