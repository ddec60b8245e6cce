"""examples/byo_images/run.py --quick runs end to end (digits upscaled to RGB, three timm/torchvision members
trained from random init, `fusion build`, a distilled student, a served bundle, a PNG posted to /predict) and the
figures it prints are the bundle's, recomputed here in onnxruntime from the files and the data set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

pytest.importorskip("timm", reason="the [vision] extra: pip install -e '.[vision]'")
pytest.importorskip("torchvision", reason="the [vision] extra: pip install -e '.[vision]'")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.server]  # ~90 s: three real CNNs trained briefly, exported, distilled, served


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    work = tmp_path_factory.mktemp("byo-images-example")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "examples/byo_images/run.py", "--quick", "--work", str(work)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def run_file(path: Path, pixels: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: pixels.astype(np.float32)})[0]


def test_the_example_prints_the_bundles_figures(example):
    from fusion.bundle import read_bundle
    from fusion.data import load_named

    work, out = example
    m = read_bundle(work / "bundle").manifest
    printed = {name: float(acc) for name, acc in re.findall(r"^\s+(?:member )?(\w+)\s+test accuracy (\d\.\d{4})", out, re.M)}
    assert set(printed) == {"resnet10t", "resnet18", "small", "ensemble", "distilled"}, out
    for name, e in {**m.members, **m.variants}.items():
        assert printed[name] == pytest.approx(e.metrics["test_accuracy"], abs=5e-5)
    # independent reference: every test accuracy recomputed from the bundle's files and the data file
    data = load_named(work / "data.npz", m.inputs)
    X = data.X_test["pixels"]
    assert X.shape[1:] == (3, 32, 32) and X.min() >= 0 and X.max() <= 255 and (X == np.round(X)).all()
    assert (X[:, 0] == X[:, 1]).all() and (X[:, 0] == X[:, 2]).all()  # grey replicated to R, G, B
    files = {"ensemble": "ensemble.onnx", "distilled": "distilled.onnx",
             **{n: f"members/{n}.onnx" for n in m.members}}
    for name, file in files.items():
        acc = float((run_file(work / "bundle" / file, X).argmax(-1) == data.y_test).mean())
        assert printed[name] == pytest.approx(acc, abs=5e-5), name
    chosen = re.search(r"weights 'auto' chose: (\S+)", out).group(1)
    assert chosen == m.ensemble_selection["chosen"]
    assert m.variants["distilled"].method["teacher_runtime"].startswith("onnxruntime")
    assert re.search(r"fusion build: \d+ s", out), out


def test_each_member_file_on_raw_pixels_equals_its_trained_module_on_normalised_pixels(example):
    """Independent reference: the safetensors the example trained, loaded into timm/torchvision modules in torch,
    on pixels normalised here in numpy as the recipe says; the bundle's member files take the raw pixels."""
    import torch

    from fusion.bundle import read_bundle
    from fusion.data import load_named
    from fusion.sources import resolve

    work, _ = example
    m = read_bundle(work / "bundle").manifest
    X = load_named(work / "data.npz", m.inputs).X_test["pixels"][:16]
    normalised = (X / np.float32(255) - np.float32(0.5)) / np.float32(0.25)
    sources = {"resnet10t": "timm:resnet10t", "resnet18": "torchvision:resnet18", "small": "timm:test_resnet"}
    for name, source in sources.items():
        module = resolve(source, {"num_classes": 10}, str(work / f"{name}.safetensors"))
        with torch.no_grad():
            want = module(torch.from_numpy(normalised.astype(np.float32))).numpy()
        got = run_file(work / "bundle" / "members" / f"{name}.onnx", X)
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max()), (name, float(np.abs(got - want).max()))


def test_the_distilled_student_takes_raw_pixels_with_the_recipes_normalisation_inside(example):
    """Like every member's graph, the student's file starts with Mul(scale) -> Sub(mean) -> Div(std) on the raw
    pixels: it was trained on normalised pixels and is served the service's raw 0..255 values."""
    work, _ = example
    model = onnx.load(str(work / "bundle" / "distilled.onnx"))
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:  # constants folded into Constant nodes by the exporter
        if n.op_type == "Constant":
            v = onnx.helper.get_attribute_value(n.attribute[0])
            consts[n.output[0]] = numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)
    by_input = {i: n for n in g.node for i in n.input}
    mul = by_input[g.input[0].name]
    sub = by_input[mul.output[0]]
    div = by_input[sub.output[0]]
    assert [mul.op_type, sub.op_type, div.op_type] == ["Mul", "Sub", "Div"], (mul.op_type, sub.op_type, div.op_type)

    def other(node, used):
        (name,) = [i for i in node.input if i != used]
        return consts[name]

    assert float(other(mul, g.input[0].name)) == pytest.approx(1 / 255)
    np.testing.assert_allclose(other(sub, mul.output[0]).ravel(), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(other(div, sub.output[0]).ravel(), [0.25, 0.25, 0.25])


def test_the_png_posted_to_predict_got_the_ensembles_answer(example):
    from PIL import Image

    from fusion.bundle import read_bundle
    from fusion.data import load_named

    work, out = example
    m = read_bundle(work / "bundle").manifest
    data = load_named(work / "data.npz", m.inputs)
    line = re.search(r"POST /predict digit\.png \(Content-Type: image/png, a held-out '(\w+)'\) -> predictions "
                     r"\['(\w+)'\], p = (\S+); max \|Δ\| vs ensemble\.onnx (\S+)", out)
    assert line, out
    label, predicted, p, diff = line.groups()
    assert label == m.classes[int(data.y_test[0])] and float(diff) <= 1e-5  # the first held-out row's true label
    # independent reference: the PNG decoded by Pillow, run through ensemble.onnx
    pixels = np.asarray(Image.open(work / "digit.png").convert("RGB"), np.float32).transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(pixels[0], data.X_test["pixels"][0])  # the PNG holds the row's pixels exactly
    probs = run_file(work / "bundle" / "ensemble.onnx", pixels)[0]
    assert predicted == m.classes[int(probs.argmax())]
    assert float(p) == pytest.approx(float(probs.max()), abs=1e-3)
