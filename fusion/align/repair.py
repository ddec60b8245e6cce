"""REPAIR: after interpolating aligned models, restore each unit's activation statistics.

Interpolated networks suffer "variance collapse": hidden units' pre-activation std shrinks with
depth. REPAIR rescales every unit of the merged model so that its mean and std equal the
interpolation of the endpoints' (std, not variance). BatchNorm layers already normalise: for them
resetting the running statistics (`reset_bn`) is the repair.
https://arxiv.org/abs/2211.08403 (Jordan et al. 2023)
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.align.spec import PermutationSpec
from fusion.errors import ConfigError
from fusion.merge.estimates import _batches, has_batchnorm, model_inputs, reset_bn


@torch.no_grad()
def _unit_stats(model: nn.Module, module: nn.Module, X: tuple[torch.Tensor, ...], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and population std of `module`'s output over X (channel dim 1). -> (n,), (n,) float64."""
    acc = {}

    def hook(_m, _i, out):
        h = torch.movedim(out, 1, -1).reshape(-1, out.shape[1]).double()  # (rows, n)
        acc["n"] = acc.get("n", 0) + h.shape[0]
        acc["s"] = acc.get("s", 0) + h.sum(0)
        acc["ss"] = acc.get("ss", 0) + (h * h).sum(0)

    handle = module.register_forward_hook(hook)
    try:
        for xb in _batches(X, batch_size):
            model(*xb)
    finally:
        handle.remove()
    mean = acc["s"] / acc["n"]
    return mean, (acc["ss"] / acc["n"] - mean**2).clamp_min(0).sqrt()


@torch.no_grad()
def repair(
    merged: nn.Module, model_a: nn.Module, model_b: nn.Module, X, spec: PermutationSpec, *,
    lam: float = 0.5, batch_size: int = 512, eps: float = 1e-5,
) -> nn.Module:
    """REPAIR the interpolation (1 − lam)·A + lam·B of two aligned models in place; returns `merged`.

    X: training inputs, (n, n_features) raw features or any batched input (`model_inputs`). BatchNorm statistics are reset first. Then,
    layer by layer in the spec's order, every activation point whose module is an nn.Linear or
    nn.Conv2d gets its output rescaled: per unit, W' = W·σ*/σ_M and b' = (b − μ_M)·σ*/σ_M + μ*, with
    μ* = (1 − lam)μ_A + lam·μ_B and σ* likewise, μ_M, σ_M measured on the merged model after the
    earlier layers were repaired. Points on BatchNorm modules are covered by the reset.
    https://arxiv.org/abs/2211.08403
    """
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"expected lam in [0, 1]; got {lam}")
    X = model_inputs(merged, X)
    for m in (merged, model_a, model_b):
        m.eval()
    if has_batchnorm(merged):
        if len(X) != 1:
            raise ConfigError(f"REPAIR resets BatchNorm statistics on one input tensor; got {len(X)} inputs")
        reset_bn(merged, X[0])
    mods = {name: dict(m.named_modules()) for name, m in (("a", model_a), ("b", model_b), ("m", merged))}
    for p, point in spec.activations.items():
        layer = mods["m"].get(point.module)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        mean_a, std_a = _unit_stats(model_a, mods["a"][point.module], X, batch_size)
        mean_b, std_b = _unit_stats(model_b, mods["b"][point.module], X, batch_size)
        mean_m, std_m = _unit_stats(merged, layer, X, batch_size)
        target_mean = (1 - lam) * mean_a + lam * mean_b
        target_std = (1 - lam) * std_a + lam * std_b
        if layer.bias is None:  # adding one would change the state dict's keys
            raise ConfigError(f"REPAIR expected a bias on '{point.module}' to shift its units; got none")
        scale = target_std / (std_m + eps)  # (n,)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(scale.reshape(shape).to(layer.weight.dtype))
        layer.bias.copy_(((layer.bias.double() - mean_m) * scale + target_mean).to(layer.bias.dtype))
    return merged
