"""Permutation specs derived from a `torch.fx` trace, for architectures nobody wrote a spec for.

Every tensor in the traced graph carries (at most) one "hidden-unit space" on one axis; spaces live in
a union-find:
  * Linear and Conv (groups = 1) open a new space on their output (weight axis 0, bias) and record
    their input axis (weight axis 1) in the input's space; a depthwise conv keeps its input's space.
  * BatchNorm (affine and running statistics), LayerNorm over that axis, activations, dropout,
    pooling (over axes after the unit axis), identity and mean/sum over other axes pass the space
    through; a per-channel PReLU's slopes follow the space.
  * `add`/`sub`/`mul`/`div` of two tensors join their spaces (a residual stream shares one
    permutation); a scalar operand passes the space through.
  * flatten (or a view/reshape to (B, -1)) after a conv makes a blocked space: channel c owns the
    H·W consecutive features c·H·W … (c+1)·H·W − 1 (`AxisRef.block`).
  * anything else, the model's inputs and its outputs are frozen: their spaces stay the identity.
What remains unfrozen is one permutation per space, named after the module that opened it, in the
same `PermutationSpec` type as the hand-written specs of spec.py (which stay as overrides, see
`spec_for_module`), so weight matching, activation matching and REPAIR consume it unchanged.

Transformers are refused with a clear error: aligning attention heads is research code; merging
fine-tunes of one shared base needs no alignment (the path FusionBench and mergekit take).
https://arxiv.org/abs/2209.04836 (Git Re-Basin), https://pytorch.org/docs/stable/fx.html
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fusion.align.spec import SPECS, ActivationPoint, AxisRef, PermutationSpec, spec_for
from fusion.errors import ConfigError

# modules that leave every unit where it is (elementwise or per-channel spatial ops)
PASS_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_F = torch.nn.functional
PASS_FUNCTIONS = {
    torch.relu, _F.relu, _F.relu6, _F.leaky_relu, _F.gelu, _F.silu, _F.mish, _F.elu, _F.selu, _F.hardswish,
    _F.hardsigmoid, _F.hardtanh, _F.softplus, torch.sigmoid, torch.tanh, _F.sigmoid, _F.tanh, _F.dropout,
    _F.dropout2d, _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d,
    _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d, _F.adaptive_max_pool2d,
    torch.max_pool2d, torch.avg_pool1d, torch.max_pool1d, torch.adaptive_avg_pool1d, torch.clone,
}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "type_as", "detach", "clamp", "clamp_min"}
JOIN_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                  operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
JOIN_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
REDUCE_METHODS = {"mean", "sum", "amax"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _pooled_dims(op: Any) -> int:
    """How many trailing axes a pooling module or function slides over (0 for anything else): the unit axis
    must lie before them, or the pool mixes neighbouring units (a 1-d pool of a Linear's (B, F) output)."""
    name = type(op).__name__ if isinstance(op, nn.Module) else getattr(op, "__name__", "")
    if "pool" not in name.lower():
        return 0
    return next((k for k in (1, 2, 3) if name.endswith(f"{k}d")), 0)


class _Spaces:
    """Union-find over hidden-unit spaces: each holds its axis refs, whether it is frozen, the module that opened it."""

    def __init__(self):
        self.parent: list[int] = []
        self.frozen: list[bool] = []
        self.refs: list[list[AxisRef]] = []
        self.opener: list[str | None] = []
        self.order: list[int] = []  # graph position of the opening node: permutation names sort by it

    def new(self, opener: str | None = None, position: int = 0, frozen: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.frozen.append(frozen)
        self.refs.append([])
        self.opener.append(opener)
        self.order.append(position)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.order[b] < self.order[a]:  # the earlier opener names the joined space
            a, b = b, a
        self.parent[b] = a
        self.frozen[a] = self.frozen[a] or self.frozen[b]
        self.refs[a].extend(self.refs[b])
        return a

    def freeze(self, s: int) -> None:
        self.frozen[self.find(s)] = True

    def add(self, s: int, ref: AxisRef) -> None:
        self.refs[self.find(s)].append(ref)


class _Val:
    """A traced tensor's space: `space` on axis `axis` (negative, counted from the end), `block` values per unit."""

    __slots__ = ("space", "axis", "block", "shape")

    def __init__(self, space: int, axis: int, block: int, shape: tuple[int, ...]):
        self.space, self.axis, self.block, self.shape = space, axis, block, shape


def transformer_reason(model: nn.Module) -> str | None:
    """The module that makes `model` a transformer (attention), or None."""
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return f"{name or 'the model'} ({cls.__name__})"
        if any(c.__name__ == "PreTrainedModel" for c in cls.__mro__) or "attention" in cls.__name__.lower():
            return f"{name or 'the model'} ({cls.__name__})"
    return None


def refuse_transformers(model: nn.Module) -> None:
    why = transformer_reason(model)
    if why:
        raise ConfigError(
            f"permutation alignment expected an MLP, CNN or ResNet; got a transformer ({why}): aligning attention "
            "heads and residual streams of transformers is not supported. Merge fine-tunes of one shared base "
            "instead (linear, task_arithmetic, ties, dare_linear, fisher, regmean need no alignment), as "
            "FusionBench and mergekit do")


def _trace(model: nn.Module):
    import torch.fx as fx

    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises TraceError, TypeError, NotImplementedError… on dynamic code
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"automatic permutation spec: torch.fx could not trace {type(model).__name__} "
                          f"({type(exc).__name__}: {msg}); expected a traceable module, or write a PermutationSpec "
                          "by hand (fusion/align/spec.py)") from None


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


@torch.no_grad()
def fx_spec(model: nn.Module, example_inputs) -> PermutationSpec:
    """The permutation spec of `model`, derived from its torch.fx graph (rules: the module docstring).

    example_inputs: one batch (a tensor or a tuple of positional tensors, batch >= 1) that fixes the
    shapes of flattened features; the model runs once on it in eval mode (its mode is restored).
    Raises ConfigError for transformers and for modules torch.fx cannot trace.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    refuse_transformers(model)
    gm = _trace(model)
    was_training = model.training
    gm.eval()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints its own traceback before raising
            ShapeProp(gm).propagate(*_as_tuple(example_inputs))
    except Exception as exc:  # noqa: BLE001
        cause = exc.__cause__ or exc  # ShapeProp wraps the model's own error
        raise ConfigError(f"automatic permutation spec: running {type(model).__name__} on the example inputs of shape "
                          f"{[tuple(t.shape) for t in _as_tuple(example_inputs)]} failed ({type(cause).__name__}: "
                          f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}); expected inputs of the "
                          "shape the model takes") from None
    finally:
        model.train(was_training)
    modules = dict(gm.named_modules())
    S = _Spaces()
    vals: dict[Any, _Val | None] = {}
    chains: dict[int, list[tuple[int, Any]]] = {}  # space id -> (position, node) of modules producing it
    calls: dict[str, list[list[_Val | None]]] = {}  # module with parameters -> the values of each call

    def fresh_frozen(node, pos):
        shape = _shape(node)
        return _Val(S.new(position=pos, frozen=True), -1, 1, shape) if shape else None

    def freeze_args(node):
        for a in node.all_input_nodes:
            v = vals.get(a)
            if v is not None:
                S.freeze(v.space)

    def pass_through(node, src, pooled: int = 0):
        v = vals.get(src)
        shape = _shape(node)
        if v is None or shape is None:
            return None
        if len(shape) != len(v.shape) or shape[v.axis] != v.shape[v.axis] or v.axis >= -pooled:
            S.freeze(v.space)
            return None
        return _Val(v.space, v.axis, v.block, shape)

    for pos, node in enumerate(gm.graph.nodes):
        shape = _shape(node)
        out: _Val | None = None
        if node.op == "placeholder":
            out = fresh_frozen(node, pos)
        elif node.op == "get_attr":
            out = None  # a constant: elementwise ops with it freeze (handled at the op)
        elif node.op == "output":
            freeze_args(node)
            continue
        elif node.op == "call_module":
            mod = modules[node.target]
            src = node.args[0] if node.args and hasattr(node.args[0], "op") else None
            v = vals.get(src) if src is not None else None
            if v is not None and S.frozen[S.find(v.space)] and isinstance(mod, (nn.Linear, *CONV_TYPES)):
                v = _Val(S.new(position=pos, frozen=True), -1 if isinstance(mod, nn.Linear) else -(mod.weight.dim() - 1), 1, v.shape)
            if isinstance(mod, nn.Linear) and v is not None and v.axis == -1 and len(node.args) == 1 and not node.kwargs:
                S.add(v.space, AxisRef(f"{node.target}.weight", 1, v.block))
                s = S.new(node.target, pos)
                S.add(s, AxisRef(f"{node.target}.weight", 0))
                if mod.bias is not None:
                    S.add(s, AxisRef(f"{node.target}.bias", 0))
                out = _Val(s, -1, 1, shape)
                chains.setdefault(s, []).append((pos, node))
            elif isinstance(mod, CONV_TYPES) and v is not None and v.block == 1 and v.axis == -(mod.weight.dim() - 1) \
                    and len(node.args) == 1 and not node.kwargs and mod.padding_mode == "zeros":
                if mod.groups == 1:
                    S.add(v.space, AxisRef(f"{node.target}.weight", 1))
                    s = S.new(node.target, pos)
                elif mod.groups == mod.in_channels == mod.out_channels:  # depthwise: unit c only sees channel c
                    s = v.space
                else:
                    S.freeze(v.space)
                    out = fresh_frozen(node, pos)
                    vals[node] = out
                    continue
                S.add(s, AxisRef(f"{node.target}.weight", 0))
                if mod.bias is not None:
                    S.add(s, AxisRef(f"{node.target}.bias", 0))
                out = _Val(s, v.axis, 1, shape)
                chains.setdefault(S.find(s), []).append((pos, node))
            elif isinstance(mod, BN_TYPES) and v is not None and v.block == 1 and len(v.shape) >= 2 \
                    and v.axis == 1 - len(v.shape) and len(node.args) == 1:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(mod, name, None) is not None:
                        S.add(v.space, AxisRef(f"{node.target}.{name}", 0))
                out = pass_through(node, src)
                if out is not None:
                    chains.setdefault(S.find(v.space), []).append((pos, node))
            elif isinstance(mod, nn.LayerNorm) and v is not None and v.block == 1 and v.axis == -1 \
                    and len(mod.normalized_shape) == 1 and len(node.args) == 1:
                for name in ("weight", "bias"):
                    if getattr(mod, name, None) is not None:
                        S.add(v.space, AxisRef(f"{node.target}.{name}", 0))
                out = pass_through(node, src)
                if out is not None:
                    chains.setdefault(S.find(v.space), []).append((pos, node))
            elif isinstance(mod, nn.PReLU) and mod.num_parameters > 1 and len(node.args) == 1:
                # one slope per channel (axis 1): the slopes follow the channel space, anything else is frozen
                if v is not None and v.block == 1 and len(v.shape) >= 2 and v.axis == 1 - len(v.shape):
                    S.add(v.space, AxisRef(f"{node.target}.weight", 0))
                    out = pass_through(node, src)
                else:
                    freeze_args(node)
                    out = fresh_frozen(node, pos)
            elif isinstance(mod, PASS_MODULES) and len(node.args) == 1:
                out = pass_through(node, src, _pooled_dims(mod))
            elif isinstance(mod, nn.Flatten) and len(node.args) == 1:
                out = _flatten(S, vals.get(src), shape, mod.start_dim, mod.end_dim)
            else:
                freeze_args(node)
                out = fresh_frozen(node, pos)
        elif node.op in ("call_function", "call_method"):
            fn, name = node.target, node.target if node.op == "call_method" else None
            tensor_args = [a for a in node.args if hasattr(a, "op")]
            first = node.args[0] if node.args and hasattr(node.args[0], "op") else None
            if shape is None:  # x.size(0), getattr(x, "shape"), python values: no tensor, no space
                if any(vals.get(a) is not None for a in tensor_args) and fn not in (getattr, "size", "dim") \
                        and name not in ("size", "dim"):
                    freeze_args(node)
                out = None
            elif (node.op == "call_function" and fn in PASS_FUNCTIONS) or name in PASS_METHODS:
                others = [a for a in node.all_input_nodes if a is not first]
                if first is not None and not any(vals.get(a) is not None or a.op == "get_attr" for a in others):
                    out = pass_through(node, first, _pooled_dims(fn) if node.op == "call_function" else 0)
                else:
                    freeze_args(node)
                    out = fresh_frozen(node, pos)
            elif (node.op == "call_function" and fn in JOIN_FUNCTIONS) or name in JOIN_METHODS:
                out = _join(S, node, vals, shape)
                if out is None:
                    freeze_args(node)
                    out = fresh_frozen(node, pos)
            elif (node.op == "call_function" and fn is torch.flatten) or name == "flatten":
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                out = _flatten(S, vals.get(first), shape, start, end)
            elif name in ("view", "reshape") or (node.op == "call_function" and fn is torch.reshape):
                v = vals.get(first)
                if v is not None and len(shape) == 2 and len(v.shape) >= 2 and v.shape[0] == shape[0]:
                    out = _flatten(S, v, shape, 1, -1)
                else:
                    freeze_args(node)
                    out = fresh_frozen(node, pos)
            elif (node.op == "call_function" and fn in REDUCE_FUNCTIONS) or name in REDUCE_METHODS:
                out = _reduce(S, node, vals.get(first), shape)
                if out is None:
                    freeze_args(node)
                    out = fresh_frozen(node, pos)
            else:
                freeze_args(node)
                out = fresh_frozen(node, pos)
        vals[node] = out
        mod_here = modules[node.target] if node.op == "call_module" else None
        if mod_here is not None and any(True for _ in (*mod_here.parameters(recurse=False), *mod_here.buffers(recurse=False))):
            calls.setdefault(node.target, []).append([vals.get(a) for a in node.all_input_nodes] + [out])

    # a module with parameters or buffers (BatchNorm statistics) called more than once (shared weights) would need one permutation on
    # every space it touches: keep those spaces fixed instead
    for target, seen in calls.items():
        if len(seen) > 1:
            for v in (v for vs in seen for v in vs if v is not None):
                S.freeze(v.space)
    return _collect(S, chains, gm)


def _flatten(S: _Spaces, v: _Val | None, shape, start: int, end: int) -> _Val | None:
    """flatten(start..end) of a value: the channel axis becomes a blocked axis when it is the first flattened one."""
    if v is None or shape is None:
        return None
    nd = len(v.shape)
    start, end = start % nd, end % nd
    axis = v.axis % nd
    if axis < start or axis > end:  # the channel axis is not flattened: it only moves
        new_axis = axis - (end - start) if axis > end else axis
        return _Val(v.space, new_axis - len(shape), v.block, shape)
    if axis != start:
        S.freeze(v.space)
        return None
    block = v.block * math.prod(v.shape[axis + 1 : end + 1])
    return _Val(v.space, start - len(shape), block, shape)


def _join(S: _Spaces, node, vals, shape) -> _Val | None:
    """add/sub/mul/div: tensors of the same axis join their spaces; a python scalar passes the space through."""
    tensors = [a for a in node.args if hasattr(a, "op")]
    scalars_ok = all(isinstance(a, (int, float, bool)) or hasattr(a, "op") for a in node.args)
    if not tensors or not scalars_ok or node.kwargs.get("alpha") is not None and not isinstance(node.kwargs.get("alpha"), (int, float)):
        return None
    vs = [vals.get(a) for a in tensors]
    if any(v is None for v in vs):  # a constant (get_attr) or an untracked tensor: not permuted along
        return None
    axis, block = vs[0].axis, vs[0].block
    n = vs[0].shape[axis]
    if any(v.axis != axis or v.block != block or v.shape[v.axis] != n for v in vs) or shape[axis] != n:
        return None
    s = vs[0].space
    for v in vs[1:]:
        s = S.union(s, v.space)
    return _Val(s, axis, block, shape)


def _reduce(S: _Spaces, node, v: _Val | None, shape) -> _Val | None:
    """mean/sum/amax over axes other than the channel axis keep the space (at its new position)."""
    if v is None or v.block != 1:
        return None
    nd = len(v.shape)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None
    dims = {d % nd for d in ((dims,) if isinstance(dims, int) else dims)}
    axis = v.axis % nd
    if axis in dims:
        return None
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    new_axis = axis if keep else axis - sum(1 for d in dims if d < axis)
    return _Val(v.space, new_axis - len(shape), 1, shape)


def _collect(S: _Spaces, chains, gm) -> PermutationSpec:
    """Unfrozen spaces -> permutations named after their opening module; activation points; BN statistics."""
    roots = sorted({S.find(i) for i in range(len(S.parent))}, key=lambda r: S.order[r])
    perms: dict[str, tuple[AxisRef, ...]] = {}
    acts: dict[str, ActivationPoint] = {}
    stats: set[str] = set()
    by_root: dict[int, list[tuple[int, Any]]] = {}
    for s, items in chains.items():
        by_root.setdefault(S.find(s), []).extend(items)
    modules = dict(gm.named_modules())
    for r in roots:
        if S.frozen[r] or not S.refs[r] or S.opener[r] is None:
            continue
        name = S.opener[r]
        seen, refs = set(), []
        for ref in S.refs[r]:
            if ref not in seen:
                seen.add(ref)
                refs.append(ref)
        perms[name] = tuple(refs)
        stats.update(ref.key for ref in refs if ref.key.endswith((".running_mean", ".running_var")))
        items = sorted(by_root.get(r, []))
        producers = {n for _, n in items}
        for _, n in items:  # the end of the first chain: its output is the units before any nonlinearity
            if not any(u in producers for u in n.users):
                users = list(n.users)
                relu = len(users) == 1 and _is_relu(users[0], modules)
                acts[name] = ActivationPoint(n.target, relu=relu)
                break
    return PermutationSpec(perms, acts, frozenset(stats))


def _is_relu(node, modules) -> bool:
    """Whether `node` is a ReLU, looking through Identity/Dropout modules with one user (timm's drop_block, aa)."""
    while node.op == "call_module" and isinstance(modules[node.target], (nn.Identity, nn.Dropout)) and len(node.users) == 1:
        node = next(iter(node.users))
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, _F.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def spec_for_module(model: nn.Module, example_inputs, *, arch: str | None = None, args: Mapping | None = None) -> PermutationSpec:
    """The hand-written spec of zoo architecture `arch` when there is one (an override), else `fx_spec`."""
    if arch is not None and arch in SPECS:
        return spec_for(arch, args or {})
    return fx_spec(model, example_inputs)


def same_groups(a: PermutationSpec, b: PermutationSpec) -> bool:
    """Whether two specs permute the same sets of axes together (permutation names aside)."""
    def groups(spec: PermutationSpec) -> list[list[tuple]]:
        return sorted(sorted({(r.key, r.axis, r.block) for r in refs}) for refs in spec.perms.values())

    return groups(a) == groups(b)


__all__: Sequence[str] = ("fx_spec", "spec_for_module", "refuse_transformers", "transformer_reason", "same_groups")
