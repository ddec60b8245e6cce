"""int8 quantization of an exported variant (onnxruntime), kept only within an accuracy bound.

Two ways, chosen by what the graph holds (`choose_mode`; the recipe's `[build] quantize`):

* **dynamic** (Jacob et al. 2018, https://arxiv.org/abs/1712.05877, as implemented by onnxruntime's
  `quantize_dynamic`): weights of MatMul/Gemm/Conv stored as int8 (symmetric, per tensor); activations quantized
  to uint8 at run time per call (`DynamicQuantizeLinear`), so no calibration data is needed. What MLPs want;
  it does little for convolution networks (the per-call range search and the float Conv kernels remain).
* **static** (`quantize_static`, QDQ format): activation ranges calibrated once on real rows of the train split
  (`CALIBRATION_ROWS`, seeded, percentile of a histogram so one outlier does not stretch a range), weights int8
  per output channel, activations uint8; onnxruntime fuses each DequantizeLinear -> Conv -> QuantizeLinear into
  an int8 QLinearConv. Chosen when the graph has a Conv and calibration rows exist. Kept in float on purpose
  (`float_nodes`): the classifier heads (a Gemm/MatMul whose output reaches the graph's output without another
  Conv/Gemm/MatMul; few FLOPs, and its error goes straight into the probabilities) and a composed bundle's
  combiner (`combiner/` nodes: softmax, temperature, weights). The first convolution(s) on the input get 7-bit
  weights (`reduce_range`): raw pixels fill the whole uint8 range, and on x86 CPUs without VNNI onnxruntime's
  u8 x s8 kernels add pairs of products in int16, which saturates at 255 x 127 x 2 (the BYO image example lost
  1.1 test points to it; with the override it loses 0.2).

The check compares the int8 file with its float source on the validation and test splits, both run in
onnxruntime; the decision uses the **validation** loss in accuracy points, so the test split stays a report,
not a selection criterion.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fusion.data import Dataset
from fusion.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

MODES = ("dynamic", "static")
CALIBRATION_ROWS = 256  # train rows the static ranges are calibrated on (more did not help the BYO image example)
CALIBRATION_BATCH = 32
CALIBRATION_METHOD = "Percentile"  # MinMax lost 0.7-1.3 test points more on the BYO image example
# the rest stays float. Relu/Clip share their conv's output range, so onnxruntime folds them into the QLinearConv;
# left out, every conv output was requantized (7 % of the BYO image ensemble's int8 time)
STATIC_OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_PREFIXES = ("combiner/",)  # fusion/compose.py names the combiner's nodes so
SCORE_ROWS = 256  # rows per onnxruntime call while checking


@dataclass(frozen=True)
class QuantCheck:
    """The int8 file against its float source, both in onnxruntime: what the acceptance rests on."""

    source: str
    weight_type: str
    rows: int  # validation + test rows compared
    max_abs_diff: float  # of probabilities
    argmax_agreement: float
    val_accuracy: float
    test_accuracy: float
    val_accuracy_loss_pp: float  # float − int8, percentage points
    test_accuracy_loss_pp: float
    max_loss_pp: float
    accepted: bool
    mode: str = "dynamic"  # "dynamic" | "static"
    calibration: str = ""  # static: method and rows
    float_nodes: tuple[str, ...] = field(default_factory=tuple)  # static: nodes kept in float on purpose
    reduced_range_nodes: tuple[str, ...] = field(default_factory=tuple)  # static: convs on 7-bit weights

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "float_nodes": list(self.float_nodes), "reduced_range_nodes": list(self.reduced_range_nodes)}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _rows(X) -> int:
    return len(next(iter(X.values()))) if isinstance(X, dict) else len(X)


def _feeds(sess_inputs: list[str], X, rows=slice(None)) -> dict:
    """The session's feeds from X: a dict of named arrays (named inputs) or one array (the flat input)."""
    if isinstance(X, dict) and len(X) == 1 and len(sess_inputs) == 1:  # one input, whatever its name (a student's `input`)
        X = next(iter(X.values()))
    if isinstance(X, dict):
        missing = [n for n in sess_inputs if n not in X]
        if missing:
            raise ExportError(f"quantization expected the data to hold the graph's inputs {sess_inputs}; missing {missing}")
        return {n: np.ascontiguousarray(X[n][rows]) for n in sess_inputs}
    return {sess_inputs[0]: np.ascontiguousarray(X[rows], dtype=np.float32)}


def _probs(sess, X) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    n = _rows(X)
    return np.concatenate([sess.run(None, _feeds(names, X, slice(i, i + SCORE_ROWS)))[0] for i in range(0, n, SCORE_ROWS)])


def graph_ops(path: str | Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def choose_mode(src: str | Path, requested: bool | str, *, calibration: bool) -> str:
    """"static" or "dynamic" for `src`. requested: the recipe's `[build] quantize` (true: static when the graph has
    a Conv and calibration rows exist, else dynamic, today's meaning for MLPs; "static" / "dynamic": as asked)."""
    if requested in MODES:
        if requested == "static" and not calibration:
            raise ConfigError("[build] quantize = \"static\" expected calibration rows (the recipe's [data] train split); got none")
        return str(requested)
    if requested is True:
        return "static" if calibration and "Conv" in graph_ops(src) else "dynamic"
    raise ConfigError(f"[build] quantize expected true, false, \"static\" or \"dynamic\"; got {requested!r}")


def quantize_file(src: str | Path, dst: str | Path) -> None:
    """int8 weights / uint8 dynamic activations for every MatMul, Gemm and Conv of `src`, written to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # ORT's recommended preparation
        quantize_dynamic(str(pre), str(raw), weight_type=QuantType.QInt8, per_channel=False)
        _save_checked(raw, dst)


def _save_checked(raw: Path, dst: str | Path) -> None:
    import onnx

    model = prune_opset_imports(onnx.load(str(raw)))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))


def static_plan(model) -> tuple[list[str], list[str]]:
    """(nodes kept in float, convs on 7-bit weights) of a pre-processed `onnx.ModelProto` (module docstring):
    the heads and the combiner; the first convolutions on each graph input."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}

    def reaches(start: list[str], ends: set[str], step) -> bool:
        """Whether a tensor in `ends` is reached from `start` through nodes that are not compute ops."""
        seen, todo = set(), list(start)
        while todo:
            t = todo.pop()
            if t in ends:
                return True
            if t in seen:
                continue
            seen.add(t)
            for n in step(t):
                if n.op_type not in COMPUTE_OPS:
                    todo.extend(n.output if step is downstream else n.input)
        return False

    def downstream(t):
        return consumers.get(t, [])

    def upstream(t):
        return [producer[t]] if t in producer else []

    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul") and reaches(list(n.output), outputs, downstream)]
    combiner = [n.name for n in nodes if n.name.startswith(FLOAT_PREFIXES) and n.op_type in STATIC_OPS]
    first = [n.name for n in nodes if n.op_type == "Conv" and reaches([n.input[0]], inputs, upstream)]
    return heads + combiner, first


class _Rows:
    """onnxruntime's CalibrationDataReader over `rows` rows of X, in batches (seeded choice, no replacement)."""

    def __init__(self, names: list[str], X, rows: int, seed: int = 0):
        n = _rows(X)
        pick = np.sort(np.random.default_rng(seed).permutation(n)[: min(rows, n)])
        self.batches = iter([_feeds(names, X, pick[i:i + CALIBRATION_BATCH]) for i in range(0, len(pick), CALIBRATION_BATCH)])

    def get_next(self):
        return next(self.batches, None)


def quantize_static_file(src: str | Path, dst: str | Path, X_calibration, *, rows: int = CALIBRATION_ROWS) -> dict:
    """QDQ int8 of `src` calibrated on `rows` rows of X_calibration (a dict of named arrays or one array),
    written to `dst`; returns what was kept in float and the calibration used."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Rows, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as tmp:
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        float_nodes, first = static_plan(model)
        weights = {n.name: n.input[1] for n in model.graph.node if n.op_type == "Conv"}
        names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        reader = Reader(names, X_calibration, rows)
        quantize_static(
            str(pre), str(raw), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHOD),
            op_types_to_quantize=list(STATIC_OPS), nodes_to_exclude=float_nodes,
            extra_options={"TensorQuantOverrides": {weights[f]: [{"reduce_range": True}] for f in first}},
        )
        _save_checked(raw, dst)
    return {"calibration": f"{CALIBRATION_METHOD} over {min(rows, _rows(X_calibration))} train rows",
            "float_nodes": tuple(float_nodes), "reduced_range_nodes": tuple(first)}


def prune_opset_imports(model):
    """Drop opset imports no node uses. onnxruntime's pre-processing declares every domain it knows
    (`ai.onnx.training`, `org.pytorch.aten`, ...); the service refuses files that name domains outside
    onnxruntime's built-in ones, used or not. model: `onnx.ModelProto`, changed in place and returned."""
    used = {n.domain for n in model.graph.node} | {""}
    for f in model.functions:
        used |= {f.domain} | {n.domain for n in f.node}
    keep = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def quantize_variant(
    src: str | Path, dst: str | Path, data: Dataset, *, max_loss_pp: float, source: str = "", mode: str = "dynamic",
) -> QuantCheck:
    """Quantize `src` into `dst` (mode "dynamic" or "static", the latter calibrated on the train split) and keep
    it only when the validation accuracy loss ≤ max_loss_pp.

    Returns the check either way; `dst` exists afterwards only when `accepted`. Raises ExportError
    when quantization itself fails.
    """
    if mode not in MODES:
        raise ConfigError(f"quantization mode expected one of {MODES}; got {mode!r}")
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        extra = quantize_static_file(src, tmp, data.X_train) if mode == "static" else {}
        if mode == "dynamic":
            quantize_file(src, tmp)
        f32, i8 = _session(src), _session(tmp)
        acc, agree, worst = {}, [], 0.0
        for split, X, y in (("val", data.X_val, data.y_val), ("test", data.X_test, data.y_test)):
            p, q = _probs(f32, X), _probs(i8, X)
            worst = max(worst, float(np.abs(p - q).max()))
            agree.append(q.argmax(-1) == p.argmax(-1))
            acc[split] = (float((p.argmax(-1) == y).mean()), float((q.argmax(-1) == y).mean()))
        loss = {s: 100.0 * (a - b) for s, (a, b) in acc.items()}
        check = QuantCheck(
            source=source or src.stem, weight_type="QInt8", rows=int(sum(len(a) for a in agree)),
            max_abs_diff=worst, argmax_agreement=float(np.concatenate(agree).mean()),
            val_accuracy=acc["val"][1], test_accuracy=acc["test"][1],
            val_accuracy_loss_pp=loss["val"], test_accuracy_loss_pp=loss["test"],
            max_loss_pp=float(max_loss_pp), accepted=bool(loss["val"] <= max_loss_pp), mode=mode, **extra,
        )
        if check.accepted:
            os.replace(tmp, dst)
        else:
            log.warning("int8 %s (%s) rejected, no %s_int8 variant: validation accuracy loss %.2f pp > %.2f pp "
                        "([build] quantize_max_loss_pp)", check.source, mode, check.source, check.val_accuracy_loss_pp,
                        max_loss_pp)
        return check
    except (ConfigError, ExportError):
        raise
    except Exception as exc:
        raise ExportError(f"quantizing {src.name} ({mode}) failed: {type(exc).__name__}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
