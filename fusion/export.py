"""ONNX export with a parity gate: nothing is written unless onnxruntime agrees with torch.

The gate (timm's convention, tightened): `onnx.checker` full check, then on the check rows at
several batch sizes max |Δ output| ≤ `atol` and, for classification, 100 % argmax agreement.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fusion.ensemble.base import Combiner
from fusion.errors import ExportError

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
OPSET = 17
PARITY_ATOL = 1e-5


class Probabilities(nn.Module):
    """A member as served on its own: logits -> softmax probabilities (identity for regression)."""

    def __init__(self, model: nn.Module, task: str = "classification"):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, C)
        out = self.model(x)
        return torch.softmax(out, -1) if self.task == "classification" else out


class FusedEnsemble(nn.Module):
    """All members and the combiner as one module, exported as one graph. x: (B, F) -> (B, C)."""

    def __init__(self, members: Sequence[nn.Module], combiner: Combiner):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combiner = combiner

    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])  # (M, B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combiner(self.member_outputs(x))


@dataclass(frozen=True)
class ParityReport:
    """What the gate measured: worst |Δ| over all checked rows and batch sizes, and argmax agreement."""

    rows: int
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    argmax_agreement: float
    atol: float

    def to_dict(self) -> dict:
        return {**asdict(self), "batch_sizes": list(self.batch_sizes)}  # JSON-shaped: equal after a round trip


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | Path,
    X_check: np.ndarray,
    *,
    task: str = "classification",
    atol: float = PARITY_ATOL,
    batch_sizes: Sequence[int] = (1, 64),
) -> ParityReport:
    """Export `model` (raw features (B, F) -> (B, C)) to `path` only if it passes the parity gate.

    X_check: (n, F) float32 rows the gate compares on (the test split); the full set is run once and
    every batch size in `batch_sizes` over its leading rows. Raises ExportError, writing nothing,
    when the check or the gate fails.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    model = model.eval()
    X = np.ascontiguousarray(X_check, dtype=np.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (torch.from_numpy(X[:2]),), str(tmp),
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, dynamo=False,
            )
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
        report = check_parity(model, tmp, X, task=task, atol=atol, batch_sizes=batch_sizes)
        os.replace(tmp, path)
        return report
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"exporting {path.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def check_parity(
    model: nn.Module, onnx_path: str | Path, X: np.ndarray, *, task: str = "classification",
    atol: float = PARITY_ATOL, batch_sizes: Sequence[int] = (1, 64),
) -> ParityReport:
    """Compare onnxruntime with torch on X (n, F); raise ExportError when they disagree."""
    sess = _session(Path(onnx_path))
    expected = model(torch.from_numpy(X)).numpy()
    worst, agree = 0.0, 1.0
    for b in (len(X), *[b for b in batch_sizes if b <= len(X)]):
        got = np.concatenate([sess.run(None, {INPUT_NAME: X[i : i + b]})[0] for i in range(0, len(X), b)])
        worst = max(worst, float(np.abs(got - expected).max()))
        if task == "classification":
            agree = min(agree, float((got.argmax(-1) == expected.argmax(-1)).mean()))
    report = ParityReport(len(X), tuple(batch_sizes), worst, agree, atol)
    if worst > atol or agree < 1.0:
        raise ExportError(
            f"{Path(onnx_path).name}: onnxruntime disagrees with torch: max |Δ| = {worst:.3g} "
            f"(allowed {atol:g}), argmax agreement {agree:.2%} (required 100%)"
        )
    return report
