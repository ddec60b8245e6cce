"""Members given only as ONNX files (`onnx:PATH`, issue 15) composed into the fused ensemble graph.

A file from another exporter (tf2onnx, paddle2onnx, skl2onnx, an old torch) cannot be re-exported, so
the ensemble graph is assembled from the files themselves with `onnx.compose`:

    bundle inputs ──Identity fan-out──► name_a/<a's inputs> ─ member a ─► name_a/<output> ─┐
                 └─────────────────────► name_b/<b's inputs> ─ member b ─► name_b/<output> ─┴► combiner ─► probabilities

* every member is prefixed `name/` (`onnx.compose.add_prefix`), keeps only the output it was given
  (`output_name`, default its first) and the nodes that output needs;
* every member, and the combiner, is raised to the highest IR version and default-domain opset present
  (`onnx.version_converter`; `merge_models` refuses differing ones, and converting *down* 18 -> 17 made an
  invalid ReduceMean); an IR < 4 file lists its initializers as graph inputs: they are removed there;
  other domains (`ai.onnx.ml`, `com.microsoft`) cannot be converted: they are kept when every member
  that uses one uses the same version, refused otherwise;
* the combiner is the one of fusion/ensemble (same weights, output temperature, stacking head), exported
  alone from torch with the dynamo exporter (opset 18) as a module over M member-output tensors, with
  the per-member steps in front of it: an output of shape (B, C, 1, 1) is flattened to (B, C), a member
  declared `output = "probabilities"` goes through Log (floored at float32's smallest subnormal) so the
  combiner always sees logit-like scores (softmax(log p) = p: the combiners take logits, and log p
  differs from the member's logits by a per-row constant, which every softmax-based combiner cancels),
  and a calibrated member is divided by its temperature.

A member whose batch dimension is fixed, or that hard-codes batch 1 in a Reshape (legacy graphs do), is
found by `probe_batch` (batch 1, 2 and 7 in onnxruntime, and row 0 of batch 7 against batch 1) and
refused with MemberError, unless it is declared `fixed_batch = "one_row"`: then it must run at batch 1,
and it is run one row at a time, in the fused graph by an ONNX Loop over the rows around its own nodes
(`loop_rows`: the graph still takes any batch), in the gate and the scoring by one onnxruntime call per
row (`run_rows`), and in the service likewise (ModelEntry.fixed_batch, service/runtime.Model). Also
refused: sklearn ZipMap outputs (maps, not tensors: convert with `options={id(model): {"zipmap": False}}`),
input maps naming inputs that do not exist, and operator domains onnxruntime does not implement. Merging and alignment need weights: `fusion.fuse.refuse_onnx_members`.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from fusion.bundle import (SCHEMA_VERSION, BundleWriter, InputSpec, Manifest, ModelEntry, TensorSpec)
from fusion.errors import ConfigError, ExportError, MemberError

OUTPUT_KINDS = ("logits", "probabilities")
HEAD_OPSET = 18  # the dynamo exporter's own opset (asking it for less exports at 18 and converts down)
PROBE_BATCHES = (1, 2, 7)
COMPOSE_ATOL = 1e-5
# operator domains onnxruntime implements itself (service/onnx_check.BUILTIN_DOMAINS; the service refuses others)
KEPT_DOMAINS = ("ai.onnx.ml", "com.microsoft")
DEFAULT_DOMAINS = ("", "ai.onnx")
SMALLEST = float(np.finfo(np.float32).smallest_subnormal)  # Log's floor: as service/combine.py's _log
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
          "int32": TensorProto.INT32, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL}
SEQ_DIM = 5  # the size a named dynamic dimension other than "batch" gets in the probe
PROBE_VALUES = 1 << 16  # at most this many input values recorded in the manifest's probe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxMember:
    """One member given as an ONNX model.

    input_map: {member input -> bundle input}; empty: the member's inputs take the bundle's by position.
    output: what the chosen output holds, "logits" or "probabilities".
    output_name: which graph output to use; empty: the first.
    fixed_batch: a member whose batch is fixed is refused ("refuse") or run one row at a time ("one_row").
    path: the file it was read from (copied into the bundle as it is); empty: serialised from `model`.
    """

    name: str
    model: onnx.ModelProto
    input_map: dict = field(default_factory=dict)
    output: str = "logits"
    output_name: str = ""
    path: str = ""
    fixed_batch: str = "refuse"  # "refuse" | "one_row": see the module docstring

    @classmethod
    def load(cls, name: str, path: str | Path, **kw) -> "OnnxMember":
        path = Path(path)
        if not path.is_file():
            raise MemberError(f"member '{name}': expected an ONNX file at {path}; got no such file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf's decode errors vary
            raise MemberError(f"member '{name}': {path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
        if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
            # torch.onnx.export's default (the dynamo exporter) writes FILE.onnx + FILE.onnx.data: the weights are
            # read in here and the bundle gets one self-contained file (the service loads no external data)
            return cls(name, _inline_external_data(name, path, model), path="", **kw)
        return cls(name, model, path=str(path), **kw)


MAX_INLINE_BYTES = 2**31 - 1  # protobuf's limit on one serialised model


def _inline_external_data(name: str, path: Path, model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its external tensors read from their files beside `path`: each location a relative path that
    stays in that directory and names a regular file; the whole model within protobuf's 2 GB."""
    from onnx.external_data_helper import load_external_data_for_model

    from fusion.bundle import _safe_path
    from fusion.errors import ManifestError

    base = path.parent.resolve()
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        try:
            _safe_path(base, location or ".")  # relative, inside `base` (links resolved), an existing file
        except ManifestError:
            raise MemberError(f"member '{name}': {path} keeps tensor '{t.name}' in external data at {location!r}; "
                              f"expected a file beside it, inside {base}") from None
    try:
        load_external_data_for_model(model, str(base))
    except Exception as exc:  # noqa: BLE001 - a short or unreadable data file
        raise MemberError(f"member '{name}': {path}: its external data could not be read ({type(exc).__name__}: {exc})") from None
    if model.ByteSize() > MAX_INLINE_BYTES:
        raise MemberError(f"member '{name}': {path} with its external data is {model.ByteSize() / 2**30:.1f} GiB; expected "
                          f"at most 2 GiB, what one self-contained ONNX file can hold")
    return model


def as_member(m) -> OnnxMember:
    """An OnnxMember from itself or a tuple (name, model, input_map, output, output_name)."""
    if isinstance(m, OnnxMember):
        return m
    if isinstance(m, (tuple, list)) and 2 <= len(m) <= 5:
        name, model, *rest = m
        fields = dict(zip(("input_map", "output", "output_name"), rest))
        fields = {k: v for k, v in fields.items() if v is not None}
        if isinstance(model, (str, Path)):
            return OnnxMember.load(name, model, **fields)
        if isinstance(model, onnx.ModelProto):
            return OnnxMember(name, model, **fields)
    raise ConfigError(f"expected an OnnxMember or (name, ModelProto or path, input_map, output, output_name); "
                      f"got {type(m).__name__}{' of ' + str(len(m)) + ' items' if isinstance(m, (tuple, list)) else ''}")


# ---- reading a member ----------------------------------------------------------------------------------------


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: IR < 4 files also list every initializer as a graph input."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _dtype_name(elem: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem).name if elem else "undefined"


def resolve_input_map(member: OnnxMember, specs: Sequence[TensorSpec]) -> dict[str, str]:
    """{member input -> bundle input}, checked: every name exists and every member input is fed."""
    own = [i.name for i in graph_inputs(member.model)]
    bundle = [s.name for s in specs]
    if not member.input_map:
        if len(own) != len(bundle):
            raise MemberError(f"member '{member.name}': expected as many inputs as the bundle to map by position "
                              f"({len(bundle)}: {bundle}); got {len(own)}: {own}; give input_map = {{member input = bundle input}}")
        return dict(zip(own, bundle))
    unknown = sorted(set(member.input_map) - set(own))
    if unknown:
        raise MemberError(f"member '{member.name}': input_map names member input(s) {unknown} that the file does not "
                          f"have; its inputs are {own}")
    bad = sorted({v for v in member.input_map.values() if v not in bundle})
    if bad:
        raise MemberError(f"member '{member.name}': input_map names bundle input(s) {bad} that do not exist; "
                          f"the bundle's inputs are {bundle}")
    missing = [n for n in own if n not in member.input_map]
    if missing:
        raise MemberError(f"member '{member.name}': input_map feeds {sorted(member.input_map)} but the file also needs "
                          f"{missing}; expected every one of its inputs {own} mapped to a bundle input {bundle}")
    return {k: member.input_map[k] for k in own}


def check_input_shapes(member: OnnxMember, imap: Mapping[str, str], specs: Sequence[TensorSpec]) -> None:
    """Rank, static dimensions and dtype of each member input against the bundle input feeding it."""
    by_name = {s.name: s for s in specs}
    for vi in graph_inputs(member.model):
        spec, dims = by_name[imap[vi.name]], _dims(vi)
        elem = vi.type.tensor_type.elem_type
        if elem and elem != DTYPES[spec.dtype]:
            raise MemberError(f"member '{member.name}': input '{vi.name}' expects {_dtype_name(elem)}; bundle input "
                              f"'{spec.name}' is {spec.dtype}")
        if dims and (len(dims) != len(spec.shape) or any(
                isinstance(d, int) and d > 0 and isinstance(s, int) and d != s for d, s in zip(dims, spec.shape))):
            raise MemberError(f"member '{member.name}': input '{vi.name}' expects shape {dims}; bundle input "
                              f"'{spec.name}' has shape {list(spec.shape)}")


def chosen_output(member: OnnxMember) -> str:
    """The output the ensemble uses; refuses maps/sequences (sklearn's ZipMap) and non-float tensors."""
    outs = {o.name: o for o in member.model.graph.output}
    if not outs:
        raise MemberError(f"member '{member.name}': expected a graph with at least one output; got none")
    name = member.output_name or member.model.graph.output[0].name
    if name not in outs:
        raise MemberError(f"member '{member.name}': output_name '{name}' is not an output of the file; its outputs "
                          f"are {list(outs)}")
    producer = next((n for n in member.model.graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "ZipMap" or outs[name].type.WhichOneof("value") != "tensor_type":
        raise MemberError(
            f"member '{member.name}': output '{name}' is a {'ZipMap ' if producer is not None and producer.op_type == 'ZipMap' else ''}"
            f"{outs[name].type.WhichOneof('value')} (maps or sequences, not a tensor); expected a float tensor of shape "
            f"(batch, classes): convert the sklearn model with options={{id(model): {{'zipmap': False}}}}, or choose "
            f"another output_name among {list(outs)}")
    elem = outs[name].type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        raise MemberError(f"member '{member.name}': output '{name}' is {_dtype_name(elem)}; expected float scores "
                          f"(logits or probabilities); its outputs are {list(outs)}")
    return name


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read, outer-scope ones among them."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_inputs(n)
    return names


def prepare(member: OnnxMember) -> onnx.ModelProto:
    """A copy with initializers out of the graph inputs, only the chosen output, and the nodes it needs."""
    out = chosen_output(member)
    m = onnx.ModelProto()
    m.CopyFrom(member.model)
    g = m.graph
    inits = {t.name for t in g.initializer}
    keep_inputs = [i for i in g.input if i.name not in inits]
    del g.input[:]
    g.input.extend(keep_inputs)
    keep_out = [o for o in g.output if o.name == out]
    del g.output[:]
    g.output.extend(keep_out)
    needed, kept = {out}, []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed |= _subgraph_inputs(node)
    del g.node[:]
    g.node.extend(reversed(kept))
    live = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(live)
    return m


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain in DEFAULT_DOMAINS else o.domain): o.version for o in model.opset_import}


def check_domains(members: Sequence[OnnxMember]) -> None:
    """Refuse operator domains onnxruntime lacks, and one domain imported at two versions (no converter)."""
    seen: dict[str, tuple[int, str]] = {}
    for m in members:
        local = {f.domain for f in m.model.functions}
        used = {n.domain for n in m.model.graph.node} - local
        for dom in sorted(used - {*DEFAULT_DOMAINS, *KEPT_DOMAINS}):
            raise MemberError(f"member '{m.name}': uses operator domain '{dom}', which onnxruntime does not implement "
                              f"(and the service refuses); expected operators of {['ai.onnx', *KEPT_DOMAINS]}")
        for dom, ver in _opsets(m.model).items():
            if dom == "" or dom in local:
                continue
            if dom in seen and seen[dom][0] != ver:
                raise MemberError(
                    f"members '{seen[dom][1]}' and '{m.name}' import operator domain '{dom}' at versions {seen[dom][0]} "
                    f"and {ver}; onnx.version_converter converts only the default domain: re-export one of them at "
                    f"{dom} version {max(ver, seen[dom][0])}")
            seen.setdefault(dom, (ver, m.name))


def upgrade(model: onnx.ModelProto, ir_version: int, opset: int, what: str) -> onnx.ModelProto:
    """Raise the default-domain opset to `opset` (version_converter) and the IR version to `ir_version`."""
    # the IR version first: IR < 4 requires every initializer to be a graph input, and the converter's
    # importer then drops the initializers `prepare` took out of the inputs ("Input ... is undefined")
    model.ir_version = max(ir_version, model.ir_version)
    have = _opsets(model).get("")
    if have is not None and have < opset:
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/ValueError with its own text
            raise MemberError(f"{what}: converting from opset {have} to {opset} failed ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); re-export it at opset {opset}") from None
    elif have is None:
        model.opset_import.append(helper.make_opsetid("", opset))
    model.ir_version = max(ir_version, model.ir_version)
    return model


# ---- probing the batch dimension -----------------------------------------------------------------------------


def random_feeds(specs: Mapping[str, TensorSpec], batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs drawn from the specs (keyed by the name to feed): normal floats, small integer ids
    (0 or 1: valid token ids and mask values for any vocabulary), uint8 pixels, booleans."""
    out = {}
    for name, spec in specs.items():
        shape = [batch if i == 0 else (d if isinstance(d, int) else SEQ_DIM) for i, d in enumerate(spec.shape)]
        if spec.dtype in ("float32", "float16"):
            out[name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype in ("int64", "int32"):
            out[name] = rng.integers(0, 2, shape).astype(spec.dtype)
        elif spec.dtype == "uint8":
            out[name] = rng.integers(0, 256, shape).astype(np.uint8)
        else:
            out[name] = rng.integers(0, 2, shape).astype(bool)
    return out


def session(model: onnx.ModelProto | bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # failures are raised, with the member's name, not logged
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _ort_message(exc: BaseException) -> str:
    """onnxruntime's error in one line: the failing node and the end of its message (the source path cut)."""
    msg = " ".join(str(exc).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", msg)
    msg = re.sub(r"/onnxruntime_src/\S+ \S+::\S+\([^)]*\)( \S+)* was false\. ", "", msg.rsplit(" : ", 1)[-1])
    msg = msg.split("Status Message: ", 1)[-1]
    return (f"{node[1]} node '{node[2]}': " if node else "") + (msg if len(msg) <= 240 else "..." + msg[-240:])


ONE_ROW = "one_row"
FIXED_BATCH = ("refuse", ONE_ROW)


def run_rows(sess, outputs, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """`sess.run(outputs, feeds)` one row at a time (a member whose batch is fixed at 1), rows concatenated."""
    n = len(next(iter(feeds.values())))
    parts = [sess.run(outputs, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def run_member(sess, outputs, feeds: Mapping[str, np.ndarray], one_row: bool = False) -> list[np.ndarray]:
    """A member's session on `feeds`: in one call, or one row per call when it is declared one_row."""
    return run_rows(sess, outputs, feeds) if one_row else sess.run(outputs, dict(feeds))


def probe_batch(model: onnx.ModelProto, specs: Mapping[str, TensorSpec], *, name: str = "model",
                batch_sizes: Sequence[int] = PROBE_BATCHES, seed: int = 0, one_row: bool = False) -> dict[int, tuple[int, ...]]:
    """Run `model` in onnxruntime at each batch size on random inputs drawn from `specs` ({model input:
    spec}); its first output must have that many rows, and row 0 of the largest batch must equal the
    same row run alone. Returns {batch: output shape}; raises MemberError naming the member, the batch
    sizes that failed and what each gave (a fixed batch dimension, a Reshape that hard-codes batch 1).
    one_row: the member is run one row per call (`fixed_batch = "one_row"`); it must answer one row at batch 1."""
    try:
        sess = session(model)
    except Exception as exc:  # noqa: BLE001
        raise MemberError(f"member '{name}': onnxruntime cannot load it: {str(exc).rsplit(' : ', 1)[-1][:300]}") from None
    rng = np.random.default_rng(seed)
    big = max(batch_sizes)
    feeds_big = random_feeds(specs, big, rng)
    if one_row:
        try:
            out = np.asarray(sess.run(None, {k: v[:1] for k, v in feeds_big.items()})[0])
            why = "" if out.ndim >= 1 and out.shape[0] == 1 else f"an output of shape {tuple(out.shape)}"
        except Exception as exc:  # noqa: BLE001
            why = f"onnxruntime: {_ort_message(exc)}"
        if why:
            raise MemberError(f"member '{name}': fixed_batch = \"one_row\" expected a member that runs at batch 1 and "
                              f"answers one row; got {why}")
    shapes, failed, first_rows = {}, {}, None
    for b in batch_sizes:
        feeds = {k: v[:b] for k, v in feeds_big.items()}
        try:
            out = np.asarray(run_member(sess, None, feeds, one_row)[0])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's error for a shape it cannot take
            failed[b] = f"onnxruntime: {_ort_message(exc)}"
            continue
        shapes[b] = tuple(out.shape)
        if out.ndim < 1 or out.shape[0] != b:
            failed[b] = f"output of shape {tuple(out.shape)}"
        elif b == 1:
            first_rows = out[:1]
        elif b == big and first_rows is not None:
            diff = float(np.abs(out[:1].astype(np.float64) - first_rows).max())
            if not diff <= 1e-4 * max(1.0, float(np.abs(first_rows).max())):
                failed[b] = f"row 0 differs from row 0 run alone by {diff:.3g} (rows mixed across the batch)"
    if failed:
        got = "; ".join(f"batch {b}: {why}" for b, why in failed.items())
        raise MemberError(
            f"member '{name}': expected outputs whose first dimension follows the batch (probed at batch "
            f"{', '.join(map(str, batch_sizes))}); batch {', '.join(map(str, failed))} failed: {got}. A fixed batch "
            f"dimension or a Reshape that hard-codes batch 1: re-export it with a dynamic batch axis, or declare the member "
            f"fixed_batch = \"one_row\" to run it one row at a time")
    return shapes


def loop_rows(model: onnx.ModelProto, output: str, row_shape: Sequence[int]) -> onnx.ModelProto:
    """A member that runs at batch 1 only, as a model over any batch: an ONNX Loop over the rows whose body
    takes row i of every input (Gather, keeping the batch axis of 1), runs the member's own nodes (names
    prefixed `row/`) and yields its one-row output; the Loop stacks them to (B, 1, ...), squeezed to (B, ...).

    `model`: prepared (only real inputs, the one chosen `output`) and upgraded (opset >= 13: Squeeze takes
    its axes as an input); `row_shape`: its output's shape on one row (the probe's, (1, ...)). Inputs and
    output keep their names, with the batch dimension made dynamic."""
    inner = onnx.compose.add_prefix(model, "row/")
    g = inner.graph
    outer_inputs = []
    for vi in model.graph.input:
        o = onnx.ValueInfoProto()
        o.CopyFrom(vi)
        if o.type.tensor_type.HasField("shape") and o.type.tensor_type.shape.dim:
            o.type.tensor_type.shape.dim[0].Clear()
            o.type.tensor_type.shape.dim[0].dim_param = "batch"
        outer_inputs.append(o)
    elem = model.graph.output[0].type.tensor_type.elem_type
    body_nodes = [helper.make_node("Reshape", ["loop/i", "loop/index_shape"], ["loop/index"], name="loop/index")]
    body_nodes += [helper.make_node("Gather", [vi.name, "loop/index"], [f"row/{vi.name}"], axis=0, name=f"loop/row/{vi.name}")
                   for vi in model.graph.input]
    body_nodes += list(g.node)
    body_nodes.append(helper.make_node("Identity", ["loop/cond_in"], ["loop/cond_out"], name="loop/cond"))
    body = helper.make_graph(
        body_nodes, "one_row",
        [helper.make_tensor_value_info("loop/i", TensorProto.INT64, []),
         helper.make_tensor_value_info("loop/cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("loop/cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(f"row/{output}", elem, list(row_shape))],
        [*g.initializer, helper.make_tensor("loop/index_shape", TensorProto.INT64, [1], [1])],
        value_info=list(g.value_info))
    nodes = [
        helper.make_node("Shape", [model.graph.input[0].name], ["loop/shape"], name="loop/shape"),
        helper.make_node("Gather", ["loop/shape", "loop/zero"], ["loop/n"], axis=0, name="loop/n"),
        helper.make_node("Loop", ["loop/n", ""], ["loop/rows"], body=body, name="loop/rows"),
        helper.make_node("Squeeze", ["loop/rows", "loop/one"], [output], name="loop/squeeze"),
    ]
    graph = helper.make_graph(nodes, f"{model.graph.name or 'member'}_one_row", outer_inputs,
                              [helper.make_tensor_value_info(output, elem, ["batch", *row_shape[1:]])],
                              [helper.make_tensor("loop/zero", TensorProto.INT64, [], [0]),
                               helper.make_tensor("loop/one", TensorProto.INT64, [1], [1])])
    out = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(inner.functions))
    out.ir_version = model.ir_version
    return out


# ---- the combiner head ---------------------------------------------------------------------------------------


def _head_module(combiner, kinds: Sequence[str], temperatures: Sequence[float] | None):
    import torch
    from torch import nn

    class Head(nn.Module):
        """M member outputs (B, ...) -> flatten to (B, C), Log for probabilities, / T, then the combiner."""

        def __init__(self):
            super().__init__()
            self.combiner, self.kinds = combiner, list(kinds)
            t = torch.tensor(list(temperatures) if temperatures is not None else [1.0] * len(kinds), dtype=torch.float32)
            self.register_buffer("t", t)
            self.calibrated = temperatures is not None

        def forward(self, *zs):
            scores = []
            for i, (z, kind) in enumerate(zip(zs, self.kinds)):
                z = z.float().reshape(z.shape[0], -1)
                if kind == "probabilities":
                    z = torch.log(z.clamp_min(SMALLEST))  # softmax(log p) = p
                scores.append(z / self.t[i] if self.calibrated else z)
            return self.combiner(torch.stack(scores))  # (M, B, C) -> (B, C)

    return Head().eval()


def export_head(combiner, kinds: Sequence[str], examples: Sequence[np.ndarray], *,
                temperatures: Sequence[float] | None = None, opset: int = HEAD_OPSET) -> onnx.ModelProto:
    """The combiner alone as an ONNX model over inputs z0..z{M-1} (dynamo exporter, dynamic batch)."""
    import torch
    from fusion.export import OUTPUT_NAME

    head = _head_module(combiner, kinds, temperatures)
    args = tuple(torch.from_numpy(np.ascontiguousarray(e)) for e in examples)
    batch = torch.export.Dim("batch", min=1)
    names = [f"z{i}" for i in range(len(examples))]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(head, args, dynamo=True, opset_version=opset, input_names=names,
                                     output_names=[OUTPUT_NAME], dynamic_shapes={"zs": tuple({0: batch} for _ in args)},
                                     verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter's errors are many
        raise ExportError(f"exporting the combiner '{getattr(combiner, 'name', combiner)}' failed: "
                          f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    return prog.model_proto


# ---- composing ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    member: OnnxMember
    model: onnx.ModelProto  # stripped and pruned, at its own IR/opset
    input_map: dict  # member input -> bundle input
    output_name: str
    shapes: dict  # the probe's {batch: output shape}

    @property
    def one_row(self) -> bool:
        return self.member.fixed_batch == ONE_ROW


def prepare_members(members: Sequence, inputs: Sequence[TensorSpec]) -> list[Prepared]:
    """Every check that needs no composing: names, input maps, shapes, outputs, domains, the batch probe."""
    members = [as_member(m) for m in members]
    if not members:
        raise ConfigError("expected at least one member; got none")
    if not inputs:
        raise ConfigError("expected the bundle's inputs (TensorSpecs); got none")
    for s in inputs:
        if s.dtype not in DTYPES or not s.shape or s.shape[0] != "batch":
            raise ConfigError(f"input '{s.name}': expected dtype in {list(DTYPES)} and shape ['batch', ...]; "
                              f"got {s.dtype} {list(s.shape)}")
    names = [m.name for m in members]
    for m in members:
        if not isinstance(m.name, str) or not NAME.match(m.name) or names.count(m.name) > 1:
            raise MemberError(f"member name {m.name!r}: expected a unique name of letters, digits, '_', '.', '-'; "
                              f"got the members {names}")
        if m.output not in OUTPUT_KINDS:
            raise MemberError(f"member '{m.name}': output expected one of {list(OUTPUT_KINDS)}; got {m.output!r}")
        if m.fixed_batch not in FIXED_BATCH:
            raise MemberError(f"member '{m.name}': fixed_batch expected one of {list(FIXED_BATCH)}; got {m.fixed_batch!r}")
    check_domains(members)
    specs = {s.name: s for s in inputs}
    out = []
    for m in members:
        imap = resolve_input_map(m, inputs)
        check_input_shapes(m, imap, inputs)
        out_name = chosen_output(m)
        model = prepare(m)
        shapes = probe_batch(model, {k: specs[v] for k, v in imap.items()}, name=m.name,
                             one_row=m.fixed_batch == ONE_ROW)
        out.append(Prepared(m, model, imap, out_name, shapes))
    widths = {p.member.name: int(np.prod(p.shapes[max(p.shapes)][1:], dtype=np.int64)) for p in out}
    if len(set(widths.values())) != 1:
        raise MemberError(f"expected every member to output the same number of classes per row; got {widths}")
    return out


def compose(members: Sequence, combiner, inputs: Sequence[TensorSpec], *, temperatures: Sequence[float] | None = None,
            prepared: Sequence[Prepared] | None = None) -> onnx.ModelProto:
    """One ONNX graph: the bundle's inputs fanned out to every member, each member's chosen output (Log
    for probability members), the combiner last, output `fusion.export.OUTPUT_NAME` (B, C).

    members: OnnxMembers or tuples (name, ModelProto, input_map, output "logits"|"probabilities",
    output_name); combiner: a fusion.ensemble Combiner over len(members) members; inputs: the bundle's
    TensorSpecs. Passes `onnx.checker.check_model(full_check=True)`; raises MemberError for a member
    that cannot be composed."""
    from fusion.export import OUTPUT_NAME

    prepared = list(prepared) if prepared is not None else prepare_members(members, inputs)
    n = len(prepared)
    if getattr(combiner, "n_members", n) != n:
        raise ConfigError(f"expected a combiner over {n} members; got one over {combiner.n_members}")
    if temperatures is not None and (len(temperatures) != n or not all(0 < float(t) < float("inf") for t in temperatures)):
        raise ConfigError(f"expected {n} member temperatures > 0 (one per member); got {list(temperatures)}")
    examples = []
    for p in prepared:
        shape = p.shapes[max(p.shapes)]  # the probe's output shape at its largest batch
        elem = p.model.graph.output[0].type.tensor_type.elem_type
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        e = np.random.default_rng(0).random(shape).astype(dtype) + 0.5
        examples.append(e / e.sum(tuple(range(1, e.ndim)), keepdims=True))  # positive rows summing to 1
    head = export_head(combiner, [p.member.output for p in prepared], examples, temperatures=temperatures)
    ir = max([p.model.ir_version for p in prepared] + [head.ir_version])
    opset = max([_opsets(p.model).get("", 0) for p in prepared] + [_opsets(head)[""]])
    head = upgrade(head, ir, opset, "the combiner")
    models = [upgrade(p.model, ir, opset, f"member '{p.member.name}'") for p in prepared]
    models = [loop_rows(m, p.output_name, p.shapes[1]) if p.one_row else m for p, m in zip(prepared, models)]
    for p in prepared:
        if p.one_row:
            log.info("member '%s' (fixed_batch = \"one_row\"): its batch is fixed at 1; the fused graph runs it one row "
                     "at a time inside a Loop, and members mode calls it once per row", p.member.name)

    # the fan-out: bundle input -> Identity -> one tensor per (member, member input)
    fan_nodes, fan_outs = [], []
    for p in prepared:
        for own, src in p.input_map.items():
            out = f"fanout/{p.member.name}/{own}"
            fan_nodes.append(helper.make_node("Identity", [src], [out], name=out))
            spec = next(s for s in inputs if s.name == src)
            fan_outs.append(helper.make_tensor_value_info(out, DTYPES[spec.dtype], list(spec.shape)))
    fan_in = [helper.make_tensor_value_info(s.name, DTYPES[s.dtype], list(s.shape)) for s in inputs]
    domains = {d: v for m in models for d, v in _opsets(m).items()}
    merged = helper.make_model(helper.make_graph(fan_nodes, "fused_ensemble", fan_in, fan_outs),
                               opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(domains.items())])
    merged.ir_version = ir
    chosen: list[str] = []
    for i, (p, model) in enumerate(zip(prepared, models)):
        prefix = f"{p.member.name}/"
        pm = onnx.compose.add_prefix(model, prefix)
        pm.opset_import.extend(helper.make_opsetid(d, v) for d, v in domains.items() if d not in _opsets(pm))
        chosen.append(prefix + p.output_name)
        later = [o.name for o in merged.graph.output if o.name.startswith("fanout/")
                 and not o.name.startswith(f"fanout/{p.member.name}/")]
        try:
            merged = onnx.compose.merge_models(
                merged, pm, io_map=[(f"fanout/{p.member.name}/{own}", prefix + own) for own in p.input_map],
                outputs=later + chosen, name="fused_ensemble")
        except Exception as exc:  # noqa: BLE001 - onnx raises ValueError / ValidationError
            raise MemberError(f"member '{p.member.name}': onnx.compose could not merge it: {type(exc).__name__}: "
                              f"{str(exc)[:300]}") from None
    ph = onnx.compose.add_prefix(head, "combiner/")
    ph.opset_import.extend(helper.make_opsetid(d, v) for d, v in domains.items() if d not in _opsets(ph))
    merged.opset_import.extend(helper.make_opsetid(d, v) for d, v in _opsets(ph).items() if d not in _opsets(merged))
    try:
        merged = onnx.compose.merge_models(merged, ph, io_map=[(c, f"combiner/z{i}") for i, c in enumerate(chosen)],
                                           outputs=[f"combiner/{OUTPUT_NAME}"], name="fused_ensemble")
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnx.compose could not attach the combiner: {type(exc).__name__}: {str(exc)[:300]}") from None
    opsets = _opsets(merged)  # merge_models concatenates the two import lists: one entry per domain
    del merged.opset_import[:]
    merged.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    for node in merged.graph.node:  # the bundle's output name, unprefixed
        node.output[:] = [OUTPUT_NAME if o == f"combiner/{OUTPUT_NAME}" else o for o in node.output]
    merged.graph.output[0].name = OUTPUT_NAME
    merged.producer_name, merged.producer_version = "fusion.compose", onnx.__version__
    merged.doc_string = "fused ensemble of " + ", ".join(f"{p.member.name} ({p.member.output})" for p in prepared)
    try:
        onnx.checker.check_model(merged, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the composed ensemble fails onnx.checker: {type(exc).__name__}: {str(exc)[:300]}") from None
    return merged


# ---- the gate: the composed graph against the members run separately ----------------------------------------


def member_scores(prepared: Sequence[Prepared], feeds: Mapping[str, np.ndarray],
                  temperatures: Sequence[float] | None = None) -> np.ndarray:
    """(M, B, C) float32 scores the combiner sees: each member's *original* file run alone in onnxruntime,
    flattened, Log for probability members, / T."""
    out = []
    for i, p in enumerate(prepared):
        sess = session(p.member.model)
        z = run_member(sess, [p.output_name], {k: feeds[v] for k, v in p.input_map.items()}, p.one_row)[0]
        z = np.asarray(z, dtype=np.float32).reshape(len(z), -1)
        if p.member.output == "probabilities":
            z = np.log(np.maximum(z, np.float32(SMALLEST)))
        out.append(z / np.float32(temperatures[i]) if temperatures is not None else z)
    return np.stack(out)


def check_composed(composed: onnx.ModelProto | bytes, prepared: Sequence[Prepared], combiner, inputs: Sequence[TensorSpec],
                   *, temperatures: Sequence[float] | None = None, atol: float = COMPOSE_ATOL,
                   batch_sizes: Sequence[int] = PROBE_BATCHES, seed: int = 1) -> dict:
    """The parity gate of a composed ensemble: on random inputs at each batch size, the graph equals the
    members run separately in onnxruntime and combined with `combiner` in torch. Raises ExportError."""
    import torch
    from fusion.export import OUTPUT_NAME

    sess = session(composed)
    rng = np.random.default_rng(seed)
    specs = {s.name: s for s in inputs}
    worst, agree, rows = 0.0, 1.0, 0
    for b in batch_sizes:
        feeds = random_feeds(specs, b, rng)
        got = sess.run([OUTPUT_NAME], feeds)[0]
        with torch.no_grad():
            want = combiner(torch.from_numpy(member_scores(prepared, feeds, temperatures))).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
        agree = min(agree, float((got.argmax(-1) == want.argmax(-1)).mean()))
        rows += b
    report = {"rows": rows, "batch_sizes": list(batch_sizes), "max_abs_diff": worst, "argmax_agreement": agree,
              "atol": atol, "reference": "members run separately in onnxruntime, combined in torch"}
    if not worst <= atol or agree < 1.0:
        raise ExportError(f"the composed ensemble disagrees with its members run separately: max |Δ| = {worst:.3g} "
                          f"(allowed {atol:g}), argmax agreement {agree:.2%} (required 100%)")
    return report


# ---- a torch member as an ONNX member, and the bundle -------------------------------------------------------


def torch_member(name: str, module, inputs: Sequence[TensorSpec], *, output: str = "logits",
                 input_names: Sequence[str] | None = None, opset: int = HEAD_OPSET) -> OnnxMember:
    """A torch module exported with the dynamo exporter (opset >= 18, every named dimension dynamic)
    as an OnnxMember that takes the bundle inputs by position (or `input_names` for its own names)."""
    import torch

    rng = np.random.default_rng(0)
    feeds = random_feeds({s.name: s for s in inputs}, 3, rng)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in inputs)
    dims: dict[str, object] = {}
    shapes = tuple({i: dims.setdefault(d, torch.export.Dim(d, min=1)) for i, d in enumerate(s.shape) if isinstance(d, str)}
                   for s in inputs)
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(*inputs) (the hf: wrapper)
        shapes = (shapes,)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=opset,
                                     input_names=list(input_names or [s.name for s in inputs]),
                                     output_names=[output], dynamic_shapes=shapes, verbose=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"member '{name}': the dynamo export failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return OnnxMember(name, prog.model_proto, output=output)


def _input_spec(inputs: Sequence[TensorSpec]) -> InputSpec:
    """The manifest's legacy single-input record: the first input, dynamic dimensions as -1."""
    first = inputs[0]
    return InputSpec(name=first.name, shape=tuple(d if isinstance(d, int) else -1 for d in first.shape),
                     dtype=first.dtype, scaling={"kind": "none"})


def write_onnx_bundle(out: str | Path, members: Sequence, combiner, inputs: Sequence[TensorSpec], *,
                      classes: Sequence | None = None, task: str = "classification",
                      temperatures: Sequence[float] | None = None, dataset: dict | None = None,
                      prepared: Sequence[Prepared] | None = None, finish=None,
                      bundle_inputs: Sequence[TensorSpec] | None = None, files: Mapping[str, str | Path] | None = None,
                      gate=None) -> Manifest:
    """Write a verified bundle of ONNX members: the composed `ensemble.onnx` (gated against the members
    run separately), each member's original file under `members/`, and a manifest whose member entries
    carry `input_map`, `output` and `output_name` and whose `inputs` are the TensorSpecs.

    The recipe helper (fusion/build.py) calls this for `onnx:PATH` members and for torch members it has
    exported with `torch_member`; merging, alignment and distillation from weights are not possible
    for ONNX members (fusion.fuse.refuse_onnx_members).

    prepared: `prepare_members`' result when the caller already has it (the probe is not run twice);
    finish(stage_dir, manifest) -> manifest: called on the staged bundle before it is committed, to add
    what needs the written files (fusion/byo_pipeline.py: metrics, the distilled variant, the comparison).

    Text bundles (fusion/text.py): `inputs` are the graph's inputs (input_ids, attention_mask...),
    `bundle_inputs` the manifest's client-facing ones (the text spec), `files` {name: path} copied into the
    bundle and listed in `Manifest.files` with their sha256 (the tokenizer.json), and `gate(composed bytes)`
    a further parity check whose report is kept under the ensemble's `parity["text"]`."""
    from fusion.export import OUTPUT_NAME

    members = [as_member(m) for m in members]
    prepared = list(prepared) if prepared is not None else prepare_members(members, inputs)
    composed = compose(members, combiner, inputs, temperatures=temperatures, prepared=prepared)
    data = composed.SerializeToString()
    parity = check_composed(data, prepared, combiner, inputs, temperatures=temperatures)
    if gate is not None:
        parity = {**parity, "text": gate(data)}
    n_classes = int(np.prod(prepared[0].shapes[max(prepared[0].shapes)][1:]))
    classes = tuple(classes) if classes is not None else tuple(range(n_classes))
    if len(classes) != n_classes:
        raise ConfigError(f"expected {n_classes} class names (the members' outputs); got {len(classes)}")
    specs = {s.name: s for s in inputs}
    per_row = sum(int(np.prod([d if isinstance(d, int) else SEQ_DIM for d in s.shape[1:]])) for s in inputs)
    probe_rows = max(1, min(8, PROBE_VALUES // max(per_row, 1)))  # the manifest stays small for wide inputs
    probe_feeds = random_feeds(specs, probe_rows, np.random.default_rng(2))
    with BundleWriter(out) as w:
        (w.stage / "members").mkdir()
        (w.stage / "ensemble.onnx").write_bytes(data)
        entries = {}
        for p in prepared:
            dest = w.stage / "members" / f"{p.member.name}.onnx"
            if p.member.path:
                shutil.copyfile(p.member.path, dest)
            else:
                dest.write_bytes(p.member.model.SerializeToString())
            entries[p.member.name] = ModelEntry(
                file=f"members/{p.member.name}.onnx", sha256="", kind="member",
                arch={"arch": "onnx", "args": {}, "producer": f"{p.member.model.producer_name} {p.member.model.producer_version}".strip(),
                      "ir_version": p.member.model.ir_version, "opsets": _opsets(p.member.model),
                      **({"source": f"onnx:{os.path.basename(p.member.path)}"} if p.member.path else {})},
                n_parameters=sum(int(np.prod(t.dims, dtype=np.int64)) for t in p.model.graph.initializer),
                input_map=dict(p.input_map), output=p.member.output, output_name=p.output_name,
                fixed_batch=ONE_ROW if p.one_row else "")
        config = combiner.config() if hasattr(combiner, "config") else {"name": str(combiner)}
        method = {"compose": "onnx.compose", "ir_version": composed.ir_version, "opset": _opsets(composed)[""]}
        if temperatures is not None:
            method |= {"calibration": "temperature", "temperatures": dict(zip([p.member.name for p in prepared],
                                                                           map(float, temperatures)))}
        ensemble = ModelEntry(file="ensemble.onnx", sha256="", kind="ensemble", combiner=config, method=method,
                              members=tuple(p.member.name for p in prepared), parity=parity,
                              n_parameters=sum(int(np.prod(t.dims, dtype=np.int64)) for t in composed.graph.initializer))
        probe = None
        for name, src in (files or {}).items():
            shutil.copyfile(src, w.stage / name)
        if bundle_inputs is None and all(s.kind == "tensor" for s in inputs):  # the service re-runs these rows on load (runtime.check_probe)
            probe = {"inputs": {k: v.tolist() for k, v in probe_feeds.items()},
                     "outputs": {"ensemble": session(data).run([OUTPUT_NAME], probe_feeds)[0].tolist()}}
        elif bundle_inputs is not None and any(s.kind == "text" for s in bundle_inputs):  # fixed strings, tokenized as the service does
            from fusion.text import text_probe

            probe = text_probe(data, bundle_inputs, files or {})
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, bundle_version="", created="", task=task, input=_input_spec(bundle_inputs or inputs),
            output_name=OUTPUT_NAME, classes=classes, variants={"ensemble": ensemble}, members=entries,
            dataset=dataset or {"source": "none", "note": "no data: the gate ran on random inputs drawn from the spec"},
            probe=probe, inputs=tuple(bundle_inputs or inputs), files={name: "" for name in files or {}})
        if finish is not None:
            manifest = finish(w.stage, manifest)
        return w.commit(manifest)


__all__ = ["OnnxMember", "MemberError", "Prepared", "as_member", "check_composed", "compose", "export_head",
           "probe_batch", "prepare_members", "resolve_input_map", "torch_member", "write_onnx_bundle"]
