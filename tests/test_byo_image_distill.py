"""A bring-your-own image recipe with [data] and no `[distill] source`: the built-in student (fusion/zoo.py's mlp
or cnn over flat rows, standardised by its own scaler) is distilled and exported over the input's own shape.

It used to stop the build: the rows reached the flat student reshaped to (B, C, H, W)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest

from tests.byo_bundles import IMAGE, IMAGE_SHAPE, N_CLASSES, image_member

pytest.importorskip("torch")


def _run(path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("student", ["", 'arch = "cnn"\nargs = {channels = [4, 8]}'], ids=["mlp", "cnn"])
def test_builtin_student_distils_an_image_bundle(tmp_path, student):
    from fusion.build import build_bundle
    from fusion.recipe import load_recipe

    rng = np.random.default_rng(0)
    for seed in (1, 2):
        (tmp_path / f"m{seed}.onnx").write_bytes(image_member(seed))
    X = rng.uniform(0, 255, size=(240, *IMAGE_SHAPE)).astype(np.float32)
    # labels the two members' mean gets right: the teacher is worth learning
    y = np.mean([_run(tmp_path / f"m{s}.onnx", {"x": X}) for s in (1, 2)], axis=0).argmax(1)
    np.savez(tmp_path / "data.npz", pixels=X, y=y)
    image = ", ".join(f"{k} = {json.dumps(v)}" for k, v in IMAGE.items())
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(textwrap.dedent(f"""
        [data]
        source = "{tmp_path / 'data.npz'}"

        [ensemble]
        weights = "equal"

        [merge]
        method = ""

        [build]
        out = "{tmp_path / 'bundle'}"
        compare = false

        [[inputs]]
        name = "pixels"
        dtype = "float32"
        shape = ["batch", {", ".join(map(str, IMAGE_SHAPE))}]
        kind = "image"
        image = {{{image}}}

        [[members]]
        name = "a"
        source = "onnx:{tmp_path / 'm1.onnx'}"
        input_map = {{x = "pixels"}}

        [[members]]
        name = "b"
        source = "onnx:{tmp_path / 'm2.onnx'}"
        input_map = {{x = "pixels"}}
    """) + ("[distill]\nepochs = 3\n" + student + "\n"))
    build_bundle(load_recipe(recipe))
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    entry = manifest["variants"]["distilled"]
    assert entry["arch"]["arch"] == ("cnn" if student else "mlp")
    if student:
        assert entry["arch"]["args"]["image_shape"] == list(IMAGE_SHAPE)
    # the file takes the input's own shape, raw pixels, and answers probabilities
    sess = ort.InferenceSession(str(tmp_path / "bundle" / "distilled.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == list(IMAGE_SHAPE)
    probs = sess.run(None, {sess.get_inputs()[0].name: X[:7]})[0]
    assert probs.shape == (7, N_CLASSES)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert entry["parity"]["max_abs_diff"] < 1e-4
