"""Permutation alignment: Git Re-Basin weight matching, activation matching, aligning K models to one.

Both matchers return `perm` (name -> (n,) int64) such that `apply_permutation(spec, perm, other)`
is aligned to the reference (unit i of the result is unit perm[name][i] of `other`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fusion.align.spec import Perm, PermutationSpec, StateDict, apply_permutation, identity_perm, permuted_entry
from fusion.errors import ConfigError
from fusion.merge.estimates import _batches, model_inputs


def _unit_rows(t: Tensor, axis: int, n: int) -> Tensor:
    """Move `axis` first and group it into n units: (…, n·block, …) -> (n, block·rest), channel-major."""
    return torch.movedim(t, axis, 0).reshape(n, -1)


@torch.no_grad()
def weight_matching(
    spec: PermutationSpec, ref_sd: StateDict, other_sd: StateDict, max_iter: int = 100, seed: int = 0,
) -> Perm:
    """Git Re-Basin weight matching: permute `other`'s units to maximise Σ ⟨W_ref, P(W_other)⟩ over the spec's entries.

    Coordinate descent over the permutations in a seeded random order; each step solves a linear
    assignment (`scipy.optimize.linear_sum_assignment(maximize=True)`) on the (n, n) similarity
    A = Σ W_ref[unit] · P_rest(W_other)[unit]ᵀ, in float64; stops after a sweep with no improvement
    (> 1e-12, the paper's code) or `max_iter` sweeps. Entries in `spec.cost_exclude` follow but do not
    vote. A permuted copy is recovered exactly.
    https://arxiv.org/abs/2209.04836 (Ainsworth et al. 2023)
    """
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"expected max_iter >= 1; got {max_iter!r}")
    sizes = spec.sizes(ref_sd)
    other_sizes = spec.sizes(other_sd)
    if other_sizes != sizes:
        raise ConfigError(f"expected the other model to have units {sizes}; got {other_sizes}")
    perm = identity_perm(spec, ref_sd)
    names = sorted(sizes)
    rng = np.random.default_rng(seed)
    ref64 = {k: v.double() for k, v in ref_sd.items() if v.is_floating_point()}
    other64 = {k: v.double() for k, v in other_sd.items() if v.is_floating_point()}
    for _ in range(max_iter):
        progress = False
        for p in (names[i] for i in rng.permutation(len(names))):
            n = sizes[p]
            A = torch.zeros(n, n, dtype=torch.float64)  # A[i, j]: ref unit i vs other unit j
            for ref_axis in spec.perms[p]:
                if ref_axis.key in spec.cost_exclude:
                    continue
                wa = _unit_rows(ref64[ref_axis.key], ref_axis.axis, n)  # (n, block·rest)
                wb = permuted_entry(spec, perm, ref_axis.key, other64[ref_axis.key], except_axis=ref_axis.axis)
                A += wa @ _unit_rows(wb, ref_axis.axis, n).T
            rows, cols = linear_sum_assignment(A.numpy(), maximize=True)
            cols = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(np.argsort(rows))]
            old = float(A[torch.arange(n), perm[p]].sum())
            new = float(A[torch.arange(n), cols].sum())
            progress = progress or new > old + 1e-12
            if new > old + 1e-12:  # keep the old permutation on ties, so the loop cannot oscillate
                perm[p] = cols
        if not progress:
            break
    return perm


class _Recorder:
    """Forward hooks collecting (rows, channels) activations at the spec's activation points."""

    def __init__(self, model: nn.Module, spec: PermutationSpec):
        modules = dict(model.named_modules())
        missing = [a.module for a in spec.activations.values() if a.module not in modules]
        if missing:
            raise ConfigError(f"expected modules {missing} in the model (activation points of the spec); got {sorted(m for m in modules if m)[:10]}")
        self.out: dict[str, Tensor] = {}
        self.hooks = []
        for p, point in spec.activations.items():
            self.hooks.append(modules[point.module].register_forward_hook(self._hook(p, point.relu)))

    def _hook(self, p: str, relu: bool):
        def hook(_module, _inputs, output):
            h = torch.relu(output) if relu else output
            self.out[p] = torch.movedim(h, 1, -1).reshape(-1, h.shape[1]).double()  # (rows, channels)

        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def activation_stats(model_a: nn.Module, model_b: nn.Module, X, spec: PermutationSpec, *, batch_size: int = 512) -> dict[str, dict[str, Tensor]]:
    """Per activation point: means, stds (population) and the cross-correlation (n_a, n_b) of the two models' units on X."""
    inputs = model_inputs(model_a, X)  # features (n, F), images (n, C, H, W), token ids, a tuple or dict
    rec_a, rec_b = _Recorder(model_a, spec), _Recorder(model_b, spec)
    modes = (model_a.training, model_b.training)
    model_a.eval(), model_b.eval()
    sums: dict[str, dict[str, Tensor]] = {}
    try:
        for xb in _batches(inputs, batch_size):
            model_a(*xb), model_b(*xb)
            for p in spec.activations:
                a, b = rec_a.out[p], rec_b.out[p]  # (rows, n)
                acc = sums.setdefault(p, {"n": torch.zeros((), dtype=torch.float64), "sa": 0, "sb": 0, "saa": 0, "sbb": 0, "sab": 0})
                acc["n"] += a.shape[0]
                acc["sa"] = acc["sa"] + a.sum(0)
                acc["sb"] = acc["sb"] + b.sum(0)
                acc["saa"] = acc["saa"] + (a * a).sum(0)
                acc["sbb"] = acc["sbb"] + (b * b).sum(0)
                acc["sab"] = acc["sab"] + a.T @ b  # (n, n)
    finally:
        rec_a.close(), rec_b.close()
        model_a.train(modes[0]), model_b.train(modes[1])
    out = {}
    for p, acc in sums.items():
        n = acc["n"]
        mean_a, mean_b = acc["sa"] / n, acc["sb"] / n
        std_a = (acc["saa"] / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (acc["sbb"] / n - mean_b**2).clamp_min(0).sqrt()
        cov = acc["sab"] / n - mean_a[:, None] * mean_b[None, :]
        corr = cov / (std_a[:, None] * std_b[None, :] + 1e-12)  # dead units correlate with nothing
        out[p] = {"mean_a": mean_a, "mean_b": mean_b, "std_a": std_a, "std_b": std_b, "corr": corr}
    return out


def activation_matching(model_ref: nn.Module, model_other: nn.Module, X, spec: PermutationSpec, *, batch_size: int = 512) -> Perm:
    """Activation matching: per permutation, the assignment maximising the correlation of the two models' units on X.

    X: a batch of inputs, (n, n_features) raw features or any batched input the models take (images
    (n, C, H, W), a tuple of inputs); both models in eval mode. Convolutional units count each
    spatial position as an observation. Layers are matched independently (each model's activations
    are computed in its own basis).
    https://arxiv.org/abs/2209.04836 (Ainsworth et al. 2023, §3.1)
    """
    stats = activation_stats(model_ref, model_other, X, spec, batch_size=batch_size)
    perm = {}
    for p, st in stats.items():
        rows, cols = linear_sum_assignment(st["corr"].numpy(), maximize=True)
        perm[p] = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(np.argsort(rows))]
    return perm


@dataclass(frozen=True)
class AlignResult:
    """The other models permuted into the reference's basis, and the permutation applied to each."""

    state_dicts: list[dict[str, Tensor]]
    perms: list[Perm]


def _load(model: nn.Module, state: StateDict) -> nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m.eval()


def align_to_reference(
    ref: StateDict, others: Sequence[StateDict], spec: PermutationSpec, *,
    method: Literal["weight", "activation"] = "weight", model: nn.Module | None = None, X=None,
    max_iter: int = 100, seed: int = 0,
) -> AlignResult:
    """Align K models to one reference (hub alignment): each of `others` is matched to `ref` independently.

    method "weight": `weight_matching` on the state dicts. "activation": `activation_matching` on X,
    which needs `model` (a module of the architecture; it is copied, not modified) and X.
    https://arxiv.org/abs/2209.04836
    """
    if method not in ("weight", "activation"):
        raise ConfigError(f"expected method in ['weight', 'activation']; got {method!r}")
    if method == "activation" and (model is None or X is None):
        raise ConfigError("method 'activation' expected model=<nn.Module of the architecture> and X=<features>; got none")
    aligned, perms = [], []
    ref_model = _load(model, ref) if method == "activation" else None
    for other in others:
        if method == "weight":
            perm = weight_matching(spec, ref, other, max_iter=max_iter, seed=seed)
        else:
            perm = activation_matching(ref_model, _load(model, other), X, spec)
        perms.append(perm)
        aligned.append(apply_permutation(spec, perm, other))
    return AlignResult(aligned, perms)
