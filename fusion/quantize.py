"""Dynamic int8 quantization of an exported variant (onnxruntime `quantize_dynamic`), kept only within
an accuracy bound.

Dynamic quantization (Jacob et al. 2018, https://arxiv.org/abs/1712.05877, as implemented by
onnxruntime): weights of MatMul/Gemm/Conv are stored as int8 (symmetric, per tensor); activations are
quantized to uint8 at run time per call (`DynamicQuantizeLinear`), so no calibration data is needed.
The check compares the int8 file with its float source on the validation and test splits, both run
in onnxruntime; the decision uses the **validation** loss in accuracy points, so the test split
stays a report, not a selection criterion.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fusion.data import Dataset
from fusion.errors import ExportError

log = logging.getLogger(__name__)


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

    def to_dict(self) -> dict:
        return asdict(self)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _probs(sess, X: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(X, dtype=np.float32)})[0]


def quantize_file(src: str | Path, dst: str | Path) -> None:
    """int8 weights / uint8 dynamic activations for every MatMul, Gemm and Conv of `src`, written to `dst`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # ORT's recommended preparation
        quantize_dynamic(str(pre), str(raw), weight_type=QuantType.QInt8, per_channel=False)
        model = prune_opset_imports(onnx.load(str(raw)))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))


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
    src: str | Path, dst: str | Path, data: Dataset, *, max_loss_pp: float, source: str = "",
) -> QuantCheck:
    """Quantize `src` into `dst` and keep it only when the validation accuracy loss ≤ max_loss_pp.

    Returns the check either way; `dst` exists afterwards only when `accepted`. Raises ExportError
    when quantization itself fails.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
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
            max_loss_pp=float(max_loss_pp), accepted=bool(loss["val"] <= max_loss_pp),
        )
        if check.accepted:
            os.replace(tmp, dst)
        else:
            log.info("int8 %s rejected: validation accuracy loss %.2f pp > %.2f pp", check.source,
                     check.val_accuracy_loss_pp, max_loss_pp)
        return check
    except Exception as exc:
        raise ExportError(f"quantizing {src.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
