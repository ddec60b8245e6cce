"""Permutation specs: which axes of which state-dict entries share a hidden-unit permutation.

Torch layout: `Linear.weight` is (out, in), `Conv2d.weight` is (out, in, kh, kw), so a layer's own
units sit on axis 0 of its weight and bias and on axis 1 of the next layer's weight (the Git
Re-Basin code's JAX kernels are (in, out): the axes swap). A permutation `perm[p]` is a LongTensor of
length n: unit i of the permuted model is unit perm[p][i] of the original (`index_select` semantics).
https://arxiv.org/abs/2209.04836 (Ainsworth et al. 2023, Git Re-Basin)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from fusion.errors import ConfigError, UnknownNameError

StateDict = Mapping[str, Tensor]
Perm = dict[str, Tensor]  # permutation name -> (n,) int64


@dataclass(frozen=True)
class AxisRef:
    """Axis `axis` of entry `key` is permuted; it holds `block` consecutive values per unit.

    block > 1 describes a flatten: fc1 of the CNN reads conv2's output flattened channel-major
    (C, H, W), so channel c owns the `block` = H·W consecutive input columns c·H·W … (c+1)·H·W − 1.
    """

    key: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class ActivationPoint:
    """Where a permutation's units can be observed: the output of `module` (channel dim 1), ReLU'd if `relu`."""

    module: str
    relu: bool = True


@dataclass(frozen=True)
class PermutationSpec:
    """Permutation name -> the axes it permutes, plus where its units' activations are observed.

    `cost_exclude` lists entries that follow a permutation but stay out of the weight-matching
    objective (BatchNorm running statistics: buffers, not learned weights).
    """

    perms: Mapping[str, tuple[AxisRef, ...]]
    activations: Mapping[str, ActivationPoint] = field(default_factory=dict)
    cost_exclude: frozenset[str] = frozenset()

    def axes_of(self, key: str) -> list[tuple[str, AxisRef]]:
        """(perm name, axis ref) pairs acting on entry `key`."""
        return [(p, ref) for p, refs in self.perms.items() for ref in refs if ref.key == key]

    def sizes(self, state: StateDict) -> dict[str, int]:
        """Units per permutation, checking the spec against a state dict (ConfigError on any mismatch)."""
        out: dict[str, int] = {}
        for p, refs in self.perms.items():
            for ref in refs:
                if ref.key not in state:
                    raise ConfigError(f"permutation '{p}': expected entry '{ref.key}' in the state dict; got keys {sorted(state)[:8]}…")
                t = state[ref.key]
                if ref.axis >= t.dim():
                    raise ConfigError(f"permutation '{p}': expected '{ref.key}' to have axis {ref.axis}; got shape {tuple(t.shape)}")
                length = t.shape[ref.axis]
                if length % ref.block:
                    raise ConfigError(f"permutation '{p}': expected axis {ref.axis} of '{ref.key}' to be a multiple of {ref.block}; got {length}")
                n = length // ref.block
                if out.setdefault(p, n) != n:
                    raise ConfigError(f"permutation '{p}': expected {out[p]} units on '{ref.key}' axis {ref.axis}; got {n}")
        return out


def _index(perm: Tensor, block: int) -> Tensor:
    """Unit permutation (n,) -> index over an axis of n·block values (channel-major blocks)."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def permuted_entry(spec: PermutationSpec, perm: Perm, key: str, tensor: Tensor, except_axis: int | None = None) -> Tensor:
    """Entry `key` with every permutation of the spec applied along its axes (but `except_axis`)."""
    for p, ref in spec.axes_of(key):
        if ref.axis == except_axis or p not in perm:
            continue
        tensor = torch.index_select(tensor, ref.axis, _index(perm[p], ref.block))
    return tensor


def apply_permutation(spec: PermutationSpec, perm: Perm, state: StateDict) -> dict[str, Tensor]:
    """A new state dict with the hidden units permuted; the network computes the same function.

    perm: name -> (n,) int64, unit i of the result is unit perm[name][i] of `state`.
    Entries the spec does not mention are cloned unchanged.
    """
    sizes = spec.sizes(state)
    for p, idx in perm.items():
        if p not in sizes:
            raise ConfigError(f"expected permutation names from {sorted(sizes)}; got '{p}'")
        idx = torch.as_tensor(idx)
        if idx.shape != (sizes[p],) or not torch.equal(torch.sort(idx).values, torch.arange(sizes[p])):
            raise ConfigError(f"permutation '{p}': expected a permutation of range({sizes[p]}); got shape {tuple(idx.shape)}")
    perm = {p: torch.as_tensor(v, dtype=torch.long) for p, v in perm.items()}
    return {k: permuted_entry(spec, perm, k, v).clone() for k, v in state.items()}


def identity_perm(spec: PermutationSpec, state: StateDict) -> Perm:
    return {p: torch.arange(n) for p, n in spec.sizes(state).items()}


def random_perm(spec: PermutationSpec, state: StateDict, seed: int = 0) -> Perm:
    """A seeded random permutation for every permutation of the spec."""
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=gen) for p, n in sorted(spec.sizes(state).items())}


def invert_perm(perm: Perm) -> Perm:
    """inv such that applying perm then inv is the identity."""
    return {p: torch.argsort(v) for p, v in perm.items()}


# ---------------------------------------------------------------------------------------------
# specs of the zoo's architectures


def mlp_spec(n_hidden: int) -> PermutationSpec:
    """MLP `layers.{i}` (Linear, ReLU between): permutation `layers.{i}` for each hidden layer i < n_hidden."""
    perms = {}
    acts = {}
    for i in range(n_hidden):
        perms[f"layers.{i}"] = (
            AxisRef(f"layers.{i}.weight", 0),
            AxisRef(f"layers.{i}.bias", 0),
            AxisRef(f"layers.{i + 1}.weight", 1),
        )
        acts[f"layers.{i}"] = ActivationPoint(f"layers.{i}", relu=True)
    return PermutationSpec(perms, acts)


def cnn_spec(image_shape=(1, 8, 8), channels=(16, 32)) -> PermutationSpec:
    """CNN conv1 -> bn1 -> conv2 -> bn2 -> maxpool -> flatten (C, H/2, W/2) -> fc1 -> fc2.

    BatchNorm affine parameters and running statistics follow their conv's channels; fc1's input
    columns follow conv2's channels in blocks of (H/2)·(W/2) spatial positions.
    """
    _, h, w = image_shape
    positions = (h // 2) * (w // 2)

    def conv_bn(conv: str, bn: str) -> tuple[AxisRef, ...]:
        return (
            AxisRef(f"{conv}.weight", 0), AxisRef(f"{conv}.bias", 0),
            AxisRef(f"{bn}.weight", 0), AxisRef(f"{bn}.bias", 0),
            AxisRef(f"{bn}.running_mean", 0), AxisRef(f"{bn}.running_var", 0),
        )

    perms = {
        "conv1": conv_bn("conv1", "bn1") + (AxisRef("conv2.weight", 1),),
        "conv2": conv_bn("conv2", "bn2") + (AxisRef("fc1.weight", 1, block=positions),),
        "fc1": (AxisRef("fc1.weight", 0), AxisRef("fc1.bias", 0), AxisRef("fc2.weight", 1)),
    }
    acts = {"conv1": ActivationPoint("bn1"), "conv2": ActivationPoint("bn2"), "fc1": ActivationPoint("fc1")}
    stats = frozenset(f"{bn}.{s}" for bn in ("bn1", "bn2") for s in ("running_mean", "running_var"))
    return PermutationSpec(perms, acts, stats)


SPECS: dict[str, Callable[..., PermutationSpec]] = {}


def _register_spec(arch: str):
    def deco(fn):
        SPECS[arch] = fn
        return fn

    return deco


def _bound_args(arch: str, args: Mapping) -> dict:
    """The architecture's constructor arguments with the zoo's defaults filled in."""
    from fusion.zoo import ARCHITECTURES

    try:
        bound = inspect.signature(ARCHITECTURES[arch]).bind(**dict(args))
    except TypeError as exc:
        raise ConfigError(f"architecture '{arch}': expected its constructor arguments; got {sorted(args)} ({exc})") from None
    bound.apply_defaults()
    return dict(bound.arguments)


@_register_spec("mlp")
def _mlp_from_args(args: Mapping) -> PermutationSpec:
    return mlp_spec(len(tuple(_bound_args("mlp", args)["hidden"])))


@_register_spec("cnn")
def _cnn_from_args(args: Mapping) -> PermutationSpec:
    a = _bound_args("cnn", args)
    return cnn_spec(tuple(a["image_shape"]), tuple(a["channels"]))


def spec_for(arch: str, args: Mapping | None = None) -> PermutationSpec:
    """The permutation spec of zoo architecture `arch` built with `args` (its constructor arguments)."""
    try:
        build = SPECS[arch]
    except (KeyError, TypeError):
        raise UnknownNameError(f"no permutation spec for architecture '{arch}'; expected one of {sorted(SPECS)}") from None
    return build(args or {})
