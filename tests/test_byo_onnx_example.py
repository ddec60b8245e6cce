"""examples/byo_onnx/run.py --quick runs end to end (data, members, the foreign ONNX file, `fusion build`,
a served bundle, requests) and the figures it prints are the bundle's, recomputed here in onnxruntime."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    work = tmp_path_factory.mktemp("byo-onnx-example")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "examples/byo_onnx/run.py", "--quick", "--work", str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def test_the_example_prints_the_bundles_figures(example):
    from fusion.bundle import read_bundle
    from fusion.data import load_named

    work, out = example
    m = read_bundle(work / "bundle").manifest
    printed = {name: float(acc) for name, acc in re.findall(r"^\s+(?:member )?(\w+)\s+test accuracy (\d\.\d{4})", out, re.M)}
    assert set(printed) == {"mlp", "cnn", "foreign", "ensemble", "distilled"}, out
    for name, e in {**m.members, **m.variants}.items():
        assert printed[name] == pytest.approx(e.metrics["test_accuracy"], abs=5e-5)
    # independent reference: the ensemble's test accuracy recomputed from the file and the data set
    data = load_named(work / "digits.npz", m.inputs)
    sess = ort.InferenceSession(str(work / "bundle" / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {"pixels": data.X_test["pixels"]})[0].argmax(-1) == data.y_test).mean())
    assert printed["ensemble"] == pytest.approx(acc, abs=5e-5)
    assert min(printed.values()) > 0.5  # ten classes: every model is far above chance (0.1)
    # the foreign member is the TorchScript file at opset 9 as it was given, composed, not re-exported
    foreign = m.members["foreign"]
    assert foreign.arch["opsets"] == {"": 9} and foreign.output_name == "probs" and foreign.input_map == {"x": "pixels"}
    assert (work / "bundle" / "members" / "foreign.onnx").read_bytes() == (work / "foreign_cnn.onnx").read_bytes()
    chosen = re.search(r"weights 'auto' chose: (\S+)", out).group(1)
    assert chosen == m.ensemble_selection["chosen"]
    assert m.variants["distilled"].method["teacher_runtime"].startswith("onnxruntime")


def test_the_example_served_the_bundle_and_checked_every_answer(example):
    _, out = example
    served = dict(re.findall(r"(\w+) max \|Δ\| vs onnxruntime (\S+)", out))
    assert set(served) == {"ensemble", "foreign", "mlp"}, out
    assert all(float(v.rstrip(",")) <= 1e-5 for v in served.values())
    assert np.isfinite([float(v.rstrip(",")) for v in served.values()]).all()
