"""Data-dependent inputs of merging: diagonal Fishers, RegMean Gram matrices, BatchNorm statistics.

Models take raw features `(n, n_features)`; `X` may be a numpy array or a tensor. Fisher and RegMean
take any module and any batched inputs (images, token ids, several or named inputs: `model_inputs`).
"""

from __future__ import annotations

import inspect
from typing import Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

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
    X = _as_features(X) if not isinstance(X, Tensor) or X.dim() <= 2 else _as_inputs(X)[0]  # features, or images
    loader = [X[i : i + batch_size] for i in range(0, len(X), batch_size)]
    torch.optim.swa_utils.update_bn(loader, model)
    return model


def _as_inputs(X) -> tuple[Tensor, ...]:
    """A batch of model inputs as a tuple of positional tensors, each (n_samples, ...).

    X: features (n, F), images (n, C, H, W), token ids (n, T) (integers stay int64), or a tuple/list of
    such arrays (several positional inputs of equal n). Floating inputs become float32.
    """
    items = tuple(X) if isinstance(X, (tuple, list)) else (X,)
    out = []
    for x in items:
        t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        if t.is_floating_point():
            t = t.to(torch.float32)
        elif t.dtype != torch.bool:
            t = t.to(torch.long)
        if t.dim() < 2 or len(t) == 0:
            raise ConfigError(f"expected features of shape (n_samples >= 1, n_features); got {tuple(t.shape)} "
                              "(images (n, C, H, W), token ids (n, T) or a tuple of such inputs also work)")
        out.append(t)
    if len({len(t) for t in out}) != 1:
        raise ConfigError(f"expected every input to have the same number of rows; got {[len(t) for t in out]}")
    return tuple(out)


def model_inputs(model: nn.Module, X) -> tuple[Tensor, ...]:
    """`_as_inputs`, plus named inputs: a dict {input name: (n, ...)} ordered by the model's `input_names`
    (fusion.sources' HF wrapper has them) or its forward's parameter names."""
    if not isinstance(X, Mapping):
        return _as_inputs(X)
    names = tuple(getattr(model, "input_names", ()) or inspect.signature(model.forward).parameters)
    missing = [n for n in names if n not in X]
    extra = [n for n in X if n not in names]
    if extra or (missing and len(names) - len(missing) < 1):
        raise ConfigError(f"expected named inputs among the model's {list(names)}; got {sorted(X)}")
    used = [n for n in names if n in X]
    if names[: len(used)] != tuple(used):
        raise ConfigError(f"expected named inputs to be a prefix of the model's {list(names)} (positional); got {sorted(X)}")
    return _as_inputs([X[n] for n in used])


def _batches(inputs: tuple[Tensor, ...], size: int):
    for s in range(0, len(inputs[0]), size):
        yield tuple(t[s : s + size] for t in inputs)


class _PerExampleGrads:
    """Forward hooks on every leaf module owning parameters; at backward, per-example gradients of its
    parameters from its saved input and its output's gradient, `vmap(vjp(module))` over the batch.

    Exact for modules whose rows are independent (eval mode), batch on dim 0; a parameter used by
    several calls (a reused module, tied weights) sums its per-example gradients before squaring.
    """

    def __init__(self, model: nn.Module):
        self.handles = []
        self.inside = False  # the per-example vjp runs the module again: its own hook must not fire
        self.names: dict[int, str] = {}  # id(parameter) -> state-dict key (first owner)
        self.grads: dict[int, Tensor] = {}  # id(parameter) -> (B, *shape) summed over calls of one backward
        self.covered: list[str] = []
        self.batch = 0  # rows of the current batch, set before each forward
        self.shared: set[int] = set()  # parameters left without a Fisher: a call saw the whole batch as one
        # row, or took several inputs
        for mod_name, mod in model.named_modules():
            direct = dict(mod.named_parameters(recurse=False))
            if not direct or any(True for _ in mod.children()):
                continue
            for k, p in direct.items():
                self.names.setdefault(id(p), f"{mod_name}.{k}" if mod_name else k)
                self.covered.append(f"{mod_name}.{k}" if mod_name else k)
            self.handles.append(mod.register_forward_hook(self._hook(mod_name, mod), with_kwargs=True))

    def _hook(self, mod_name: str, mod: nn.Module):
        def hook(_m, args, kwargs, output):
            if self.inside or not isinstance(output, Tensor) or not output.requires_grad:
                return None
            if len(args) != 1 or not isinstance(args[0], Tensor) or kwargs:  # not one input: no per-example rule here
                self.shared.update(id(p) for p in mod.parameters(recurse=False))
                return None
            x = args[0].detach().clone()  # later in-place ops (x += identity) must not change it
            output.register_hook(lambda g: self._per_example(mod_name, mod, x, g))
            return None

        return hook

    def _per_example(self, mod_name: str, mod: nn.Module, x: Tensor, g: Tensor) -> None:
        if x.shape[0] != g.shape[0]:
            raise ConfigError(f"Fisher: expected '{mod_name}' to keep the batch on dim 0; got input {tuple(x.shape)}, "
                              f"output {tuple(g.shape)}")
        if x.shape[0] != self.batch:  # one call shared by the whole batch (BERT's position embeddings, broadcast):
            self.shared.update(id(p) for p in mod.parameters(recurse=False))  # no per-example gradients to square
            return
        params = {k: p.detach() for k, p in mod.named_parameters(recurse=False)}

        def one(xb, gb):
            _, vjp_fn = vjp(lambda p: functional_call(mod, p, (xb.unsqueeze(0),)), params)
            return vjp_fn(gb.unsqueeze(0))[0]

        self.inside = True
        try:
            per = vmap(one)(x, g.detach())
        finally:
            self.inside = False
        for k, p in mod.named_parameters(recurse=False):
            pid = id(p)
            self.grads[pid] = per[k].double() if pid not in self.grads else self.grads[pid] + per[k].double()

    def close(self):
        for h in self.handles:
            h.remove()


def diagonal_fisher(
    model: nn.Module, X, *, mode: FisherMode = "predicted", y=None, batch_size: int = 32, seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher of a classifier's parameters, estimated per example: mean over x of (∂ log p(ŷ|x)/∂θ)².

    model: any nn.Module returning logits (n, n_classes): the zoo's, timm, torchvision, or a Hugging Face
    classifier (fusion.sources' wrapper); evaluated in eval mode. Per-example gradients come from forward
    hooks on every leaf module owning parameters (Linear, Conv, norms, embeddings): its input is saved and
    its output's gradient turned into per-example parameter gradients (`_PerExampleGrads`). Parameters
    owned by a module that also has children (e.g. a ViT's cls token), used once for the whole batch
    (BERT's position embeddings, broadcast over rows), or of a layer called with several inputs get no
    Fisher: Fisher merging averages them. X: inputs (see `model_inputs`: features, images, token ids, a tuple or a dict of named
    inputs). Memory: batch_size × parameters doubles.
    mode: "predicted" ŷ = argmax (default), "sampled" ŷ ~ p(·|x) (seeded), "expected" the exact
    Σ_y p(y|x)(∂ log p(y|x))² over all classes (one backward per class), "empirical" ŷ = the true labels `y`.
    Returns parameter name (state-dict key) -> tensor of the parameter's shape (float32).
    https://arxiv.org/abs/2111.09832 (Matena & Raffel 2022, Fisher merging)
    """
    if mode not in ("predicted", "sampled", "expected", "empirical"):
        raise ConfigError(f"expected mode in ['predicted', 'sampled', 'expected', 'empirical']; got {mode!r}")
    inputs = model_inputs(model, X)
    n = len(inputs[0])
    if mode == "empirical":
        if y is None or len(y) != n:
            raise ConfigError(f"mode 'empirical' expected labels y of length {n}; got {None if y is None else len(y)}")
        y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    grads_on = {k: p.requires_grad for k, p in model.named_parameters()}
    rec = _PerExampleGrads(model)
    acc: dict[int, Tensor] = {}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        start = 0
        for xb in _batches(inputs, batch_size):
            rec.batch = len(xb[0])
            with torch.enable_grad():
                logits = model(*xb)
                if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
                    got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                    raise ConfigError(f"diagonal_fisher expected classifier logits (n, n_classes >= 2); got shape {got}")
                logp = torch.log_softmax(logits, dim=-1)  # (B, C)
                B, C = logp.shape
                if mode == "expected":
                    targets = [(torch.full((B,), c, dtype=torch.long), logp.detach().exp()[:, c].double()) for c in range(C)]
                else:
                    if mode == "empirical":
                        labels = y[start : start + B]
                    elif mode == "predicted":
                        labels = logp.detach().argmax(-1)
                    else:
                        labels = torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(1)
                    targets = [(labels, torch.ones(B, dtype=torch.float64))]
                for i, (labels, w) in enumerate(targets):
                    rec.grads = {}
                    # rows are independent in eval mode: the sum's gradient at module m is row b's own gradient
                    logp.gather(1, labels[:, None]).sum().backward(retain_graph=i < len(targets) - 1)
                    for pid, g in rec.grads.items():
                        contrib = torch.einsum("b,b...->...", w, g * g)
                        acc[pid] = contrib if pid not in acc else acc[pid] + contrib
            start += B
    finally:
        rec.close()
        for k, p in model.named_parameters():
            p.requires_grad_(grads_on[k])
            p.grad = None
        model.train(was_training)
    return {rec.names[pid]: (v / n).to(torch.float32) for pid, v in acc.items() if pid not in rec.shared}


@torch.no_grad()
def regmean_grams(model: nn.Module, X, *, batch_size: int = 256) -> dict[str, Tensor]:
    """Gram matrices XᵀX / n of every nn.Linear layer's inputs on X, keyed by that layer's weight name.

    model: any nn.Module (the zoo's, timm, torchvision, Hugging Face classifiers): forward pre-hooks on
    every nn.Linear collect its inputs. X: inputs (see `model_inputs`). Returns "<layer>.weight" ->
    (in, in) float64, averaged over the rows the layer saw (n, or n × positions / tokens for inputs
    with extra leading dims). Eval mode. Layers the data never reaches get no Gram (averaged). A weight tied
    across layers gets one Gram, its uses' inputs together (the sum of RegMean's objectives over its uses),
    under its first owner's name, as `named_parameters` gives it.
    https://arxiv.org/abs/2212.09849 (Jin et al. 2023, RegMean)
    """
    inputs = model_inputs(model, X)
    grams: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    owner = {id(p): k for k, p in model.named_parameters()}  # one name per parameter: the first owner's

    def make_hook(name: str, layer: nn.Linear):
        key = owner.get(id(layer.weight), f"{name}.weight" if name else "weight")  # a weight tied across layers: one Gram over its uses

        def hook(_module, args):
            x = args[0].detach().reshape(-1, layer.in_features).double()  # (rows, in)
            grams[key] = grams.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(make_hook(name, module)))
    was_training = model.training
    model.eval()
    try:
        for xb in _batches(inputs, batch_size):
            model(*xb)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: g / counts[k] for k, g in grams.items()}
