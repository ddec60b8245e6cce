"""Data-dependent inputs of merging: diagonal Fishers, RegMean Gram matrices, BatchNorm statistics.

Models take raw features `(n, n_features)`; `X` may be a numpy array or a tensor.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from fusion.errors import ConfigError

FisherMode = Literal["predicted", "sampled", "expected", "empirical"]


def _as_features(X) -> Tensor:
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, Tensor) else X, dtype=torch.float32)
    if X.dim() != 2 or len(X) == 0:
        raise ConfigError(f"expected features of shape (n_samples >= 1, n_features); got {tuple(X.shape)}")
    return X


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model holds a BatchNorm layer whose running statistics a merge invalidates."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_bn(model: nn.Module, X, *, batch_size: int = 256) -> nn.Module:
    """Recompute BatchNorm running statistics on X with `torch.optim.swa_utils.update_bn`; returns the model.

    X: (n, n_features) raw features. Modifies the model in place (its training mode is restored);
    a model without BatchNorm is returned untouched. The running mean is the exact mean over X; the
    running variance is the mean of the per-batch unbiased variances (update_bn's cumulative average),
    exact when batch_size >= n.
    https://arxiv.org/abs/1803.05407 (SWA), https://arxiv.org/abs/2211.08403 (REPAIR: "reset")
    """
    if not has_batchnorm(model):
        return model
    X = _as_features(X)
    loader = [X[i : i + batch_size] for i in range(0, len(X), batch_size)]
    torch.optim.swa_utils.update_bn(loader, model)
    return model


def diagonal_fisher(
    model: nn.Module, X, *, mode: FisherMode = "predicted", y=None, batch_size: int = 128, seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher of a classifier's parameters, estimated per example: mean over x of (∂ log p(ŷ|x)/∂θ)².

    model: returns logits (n, n_classes) from raw features X (n, n_features); evaluated in eval mode
    (BatchNorm uses running statistics) with per-example gradients (torch.func.vmap).
    mode: "predicted" ŷ = argmax (default), "sampled" ŷ ~ p(·|x) (seeded), "expected" the exact
    Σ_y p(y|x)(∂ log p(y|x))² over all classes, "empirical" ŷ = the true labels `y`.
    Returns parameter name (state-dict key) -> tensor of the parameter's shape (float32).
    https://arxiv.org/abs/2111.09832 (Matena & Raffel 2022, Fisher merging)
    """
    if mode not in ("predicted", "sampled", "expected", "empirical"):
        raise ConfigError(f"expected mode in ['predicted', 'sampled', 'expected', 'empirical']; got {mode!r}")
    X = _as_features(X)
    if mode == "empirical":
        if y is None or len(y) != len(X):
            raise ConfigError(f"mode 'empirical' expected labels y of length {len(X)}; got {None if y is None else len(y)}")
        y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    gen = torch.Generator().manual_seed(seed)

    def log_probs(p: dict[str, Tensor], x: Tensor) -> Tensor:  # x: (F,) -> (C,)
        return torch.log_softmax(functional_call(model, (p, buffers), (x.unsqueeze(0),)), dim=-1).squeeze(0)

    def log_prob_at(p, x, onehot):  # scalar log p(label | x); one-hot because vmap cannot index by a batched label
        return (log_probs(p, x) * onehot).sum()

    acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    try:
        with torch.no_grad():
            logits0 = model(X[:1])
        if logits0.dim() != 2 or logits0.shape[1] < 2:
            raise ConfigError(f"diagonal_fisher expected classifier logits (n, n_classes >= 2); got shape {tuple(logits0.shape)}")
        n_classes = logits0.shape[1]
        step = max(1, batch_size // n_classes) if mode == "expected" else batch_size  # jacobians are C times larger
        for s in range(0, len(X), step):
            xb = X[s : s + step]
            if mode == "expected":
                with torch.no_grad():
                    probs = torch.softmax(model(xb), dim=-1).double()  # (B, C)
                jac = vmap(jacrev(log_probs), in_dims=(None, 0))(params, xb)  # name -> (B, C, *shape)
                for k, j in jac.items():
                    acc[k] += torch.einsum("bc,bc...->...", probs, j.double() ** 2)
                continue
            if mode == "empirical":
                labels = y[s : s + step]
            else:
                with torch.no_grad():
                    logits = model(xb)  # (B, C)
                labels = logits.argmax(-1) if mode == "predicted" else torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
            onehot = torch.nn.functional.one_hot(labels.long(), n_classes).to(xb.dtype)  # (B, C)
            g = vmap(grad(log_prob_at), in_dims=(None, 0, 0))(params, xb, onehot)  # name -> (B, *shape)
            for k, gk in g.items():
                acc[k] += (gk.double() ** 2).sum(0)
    finally:
        model.train(was_training)
    return {k: (v / len(X)).to(torch.float32) for k, v in acc.items()}


@torch.no_grad()
def regmean_grams(model: nn.Module, X, *, batch_size: int = 256) -> dict[str, Tensor]:
    """Gram matrices XᵀX / n of every nn.Linear layer's inputs on X, keyed by that layer's weight name.

    X: (n, n_features) raw features. Returns "<layer>.weight" -> (in, in) float64, averaged over the
    rows the layer saw (n, or n × positions for inputs with extra leading dims). Eval mode.
    https://arxiv.org/abs/2212.09849 (Jin et al. 2023, RegMean)
    """
    X = _as_features(X)
    grams: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name: str, layer: nn.Linear):
        key = f"{name}.weight" if name else "weight"

        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, layer.in_features).double()  # (rows, in)
            grams[key] = grams.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(make_hook(name, module)))
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(X), batch_size):
            model(X[s : s + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: g / counts[k] for k, g in grams.items()}
