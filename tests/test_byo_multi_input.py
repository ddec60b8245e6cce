"""Distillation of a bundle of several named inputs read from `[data]` (issue 15): a float tensor `x` and
int64 ids; the student (`[distill] source`, a python: factory whose forward takes both) learns the
composed graph's probabilities (onnxruntime), is exported with the dynamo exporter and gated at batch 1/2/7.

Members: foreign ONNX files over both inputs (tests/byo_bundles.tensor_model); labels: member m1's argmax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fusion.bundle import read_bundle
from tests import byo_bundles as bb

N_ROWS = 300


def recipe(root: Path, distill: str) -> Path:
    members = "".join(f'\n[[members]]\nname = "m{i}"\nsource = "onnx:{root / f"m{i}.onnx"}"\noutput = "probabilities"\n'
                      for i in (1, 2))
    path = root / "recipe.toml"
    path.write_text(
        f'[data]\nsource = "{root / "two.npz"}"\n\n[ensemble]\ncombiner = "soft_vote"\nweights = "auto"\n\n'
        f'[distill]\n{distill}\n\n[merge]\nmethod = ""\n\n[build]\nout = "{root / "bundle"}"\ncompare = false\n\n'
        f'[[inputs]]\nname = "x"\ndtype = "float32"\nshape = ["batch", 4]\n\n'
        f'[[inputs]]\nname = "ids"\ndtype = "int64"\nshape = ["batch", 3]\n{members}')
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byo-two-inputs")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_ROWS, 4)).astype(np.float32)
    ids = rng.integers(0, 10, (N_ROWS, 3)).astype(np.int64)
    for i, seed in ((1, 4), (2, 5)):
        (root / f"m{i}.onnx").write_bytes(bb.tensor_model(seed))
    y = ort.InferenceSession(str(root / "m1.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x, "ids": ids})[0].argmax(-1)
    np.savez(root / "two.npz", x=x, ids=ids, y=y)
    return root


def test_a_student_over_both_inputs_is_distilled_exported_and_gated(root):
    from fusion.build import build_bundle
    from fusion.recipe import load_recipe
    from service import runtime

    build_bundle(load_recipe(recipe(root, 'source = "python:tests.byo_bundles:two_input_student"\nepochs = 30\n'
                                          'lr = 0.01\npatience = 0\nbatch_size = 32')))
    m = read_bundle(root / "bundle").manifest
    d = m.variants["distilled"]
    assert d.arch["inputs"] == ["x", "ids"] and d.parity["cases"] == [[1], [2], [7]] and d.parity["max_abs_diff"] <= 1e-5
    assert d.method["teacher_runtime"].startswith("onnxruntime") and d.method["val_agreement"] > 0.6
    assert 0.5 < d.metrics["test_accuracy"] <= 1.0
    loaded = runtime.load(root / "bundle")  # the service binds the file's inputs by name and warms it up
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32), "ids": rng.integers(0, 10, (5, 3)).astype(np.int64)}
    want = ort.InferenceSession(str(root / "bundle" / "distilled.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(loaded.model("distilled")(feeds), want, atol=1e-6)


def test_without_a_student_source_the_variant_is_skipped_with_a_note(root, caplog):
    from fusion.build import build_bundle
    from fusion.recipe import load_recipe

    with caplog.at_level("WARNING"):
        build_bundle(load_recipe(recipe(root, "epochs = 2")))
    assert "distilled" not in read_bundle(root / "bundle").manifest.variants
    assert any("distilled variant skipped" in r.message and "[distill] source" in r.message for r in caplog.records)
