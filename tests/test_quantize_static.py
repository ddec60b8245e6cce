"""Static int8 quantization (onnxruntime `quantize_static`, QDQ, per-channel weights, calibrated on the train
split) of a tiny seeded conv network on scikit-learn's digits: the file holds QDQ nodes and runs in
onnxruntime, agrees with its float source, and the accuracy gate keeps or drops it (issue 18)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def conv_file(digits, tmp_path_factory):
    """A small CNN (Conv -> BN -> ReLU x2 -> MaxPool -> Linear x2, fusion/zoo.py) trained 6 epochs, seeded,
    exported as the flat path exports (raw features in, logits out)."""
    from fusion.export import export_onnx
    from fusion.zoo import TrainConfig, build_model, init_scaler, seed_everything, train

    seed_everything(7)
    model = build_model("cnn", in_features=64, image_shape=(1, 8, 8), channels=(8, 16), hidden=32, n_outputs=10)
    init_scaler(model, digits.scaling)
    train(model, digits, TrainConfig(epochs=6), seed=7)
    path = tmp_path_factory.mktemp("conv") / "cnn.onnx"
    export_onnx(model, path, digits.X_test)
    return path


@pytest.fixture(scope="module")
def mlp_file(digits, tmp_path_factory):
    from fusion.export import export_onnx
    from fusion.zoo import TrainConfig, build_model, init_scaler, seed_everything, train

    seed_everything(8)
    model = build_model("mlp", in_features=64, hidden=(32,), n_outputs=10)
    init_scaler(model, digits.scaling)
    train(model, digits, TrainConfig(epochs=3), seed=8)
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    export_onnx(model, path, digits.X_test)
    return path


def _run(path, X: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(X, dtype=np.float32)})[0]


def _all_rows(digits) -> np.ndarray:
    return np.concatenate([digits.X_train, digits.X_val, digits.X_test])


def test_static_int8_has_qdq_nodes_runs_and_agrees_with_float(conv_file, digits, tmp_path):
    from fusion.quantize import quantize_variant

    dst = tmp_path / "cnn_int8.onnx"
    check = quantize_variant(conv_file, dst, digits, max_loss_pp=100.0, mode="static")
    assert check.accepted and check.mode == "static" and dst.is_file()
    ops = Counter(n.op_type for n in onnx.load(str(dst)).graph.node)
    assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 4, f"expected QDQ nodes around the convs; got {dict(ops)}"
    assert "DynamicQuantizeLinear" not in ops, f"expected static (calibrated) activations; got {dict(ops)}"
    # every Conv of the float file takes a dequantized (int8) weight, except those kept in float on purpose
    model = onnx.load(str(dst))
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    int8_convs = [n for n in convs if produced_by.get(n.input[1]) == "DequantizeLinear"]
    assert len(int8_convs) >= 1 and len(convs) == 2, f"expected 2 convs, one or more on int8 weights; got {len(convs)}, {len(int8_convs)}"
    assert set(check.float_nodes) <= {n.name for n in onnx.load(str(conv_file)).graph.node}
    # the service loads it: only onnxruntime's own domains declared (pre-processing declares more), checker clean
    from service.onnx_check import check_model

    check_model(dst.read_bytes(), "cnn_int8")
    assert {o.domain for o in model.opset_import} <= {n.domain for n in model.graph.node} | {""}
    # independent reference: both files in onnxruntime over every digits row
    X = _all_rows(digits)
    p32, p8 = _run(conv_file, X), _run(dst, X)
    agree = float((p32.argmax(-1) == p8.argmax(-1)).mean())
    assert agree >= 0.95, f"expected the int8 file to agree with the float one on >= 95% of {len(X)} rows; got {agree:.4f}"
    loss = 100 * ((_run(conv_file, digits.X_val).argmax(-1) == digits.y_val).mean()
                  - (_run(dst, digits.X_val).argmax(-1) == digits.y_val).mean())
    assert check.val_accuracy_loss_pp == pytest.approx(loss, abs=1e-9)


def test_the_gate_drops_a_static_variant_beyond_the_limit(conv_file, digits, tmp_path):
    from fusion.quantize import quantize_variant

    dst = tmp_path / "cnn_int8.onnx"
    check = quantize_variant(conv_file, dst, digits, max_loss_pp=-100.0, mode="static")  # would need a 100-point gain
    assert check.mode == "static" and not check.accepted and not dst.exists()
    assert check.max_loss_pp == -100.0 and check.val_accuracy_loss_pp > -100.0


def test_the_mode_follows_the_graph_and_the_data(conv_file, mlp_file):
    from fusion.errors import ConfigError
    from fusion.quantize import choose_mode

    assert choose_mode(conv_file, True, calibration=True) == "static"  # Conv and rows to calibrate on
    assert choose_mode(conv_file, True, calibration=False) == "dynamic"
    assert choose_mode(mlp_file, True, calibration=True) == "dynamic"  # no Conv: today's meaning of `true`
    assert choose_mode(mlp_file, "static", calibration=True) == "static"
    assert choose_mode(conv_file, "dynamic", calibration=True) == "dynamic"
    with pytest.raises(ConfigError, match="calibration"):
        choose_mode(conv_file, "static", calibration=False)


def test_build_records_the_static_method(conv_file, digits, tmp_path):
    import shutil

    from fusion.build import quantize_variants
    from fusion.bundle import ModelEntry
    from fusion.recipe import Recipe, override

    shutil.copy(conv_file, tmp_path / "distilled.onnx")
    variants = {"distilled": ModelEntry(file="distilled.onnx", sha256="", kind="distilled")}
    out = quantize_variants(override(Recipe(), "build", quantize=True, quantize_max_loss_pp=100.0), variants, tmp_path, digits)
    q = out["distilled_int8"]
    assert q.method["name"] == "static_int8" and "quantize_static" in q.method["tool"] and q.parity["mode"] == "static"
    assert (tmp_path / "distilled_int8.onnx").is_file()
    out = quantize_variants(override(Recipe(), "build", quantize="dynamic", quantize_max_loss_pp=100.0), variants, tmp_path, digits)
    assert out["distilled_int8"].method["name"] == "dynamic_int8" and out["distilled_int8"].parity["mode"] == "dynamic"


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("static", True), ("dynamic", True), ("int4", False), (1, False)])
def test_the_recipe_takes_the_quantize_modes(value, ok, tmp_path):
    import json

    from fusion.errors import ConfigError
    from fusion.recipe import load_recipe

    path = tmp_path / "recipe.toml"
    path.write_text(f"[build]\nquantize = {json.dumps(value)}\n")
    if ok:
        assert load_recipe(path).build.quantize == value
    else:
        with pytest.raises(ConfigError, match="quantize"):
            load_recipe(path)
