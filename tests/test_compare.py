"""The comparison report: statistics against hand computations and scipy, FLOPs against hand formulas,
the report's numbers against a direct recomputation from the ONNX files, and the int8 bound."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion.compare import (
    CompareConfig, compare_bundle, count_flops, expected_calibration_error, mcnemar_pairs,
    negative_log_likelihood, to_markdown, wilson_interval,
)


# --- statistics ----------------------------------------------------------------------------------


def test_ece_on_a_hand_made_example():
    # top-label confidences 0.9, 0.9 (one right, one wrong), 0.62 right, 0.55 wrong, 0.35 right (3 classes)
    probs = np.array([
        [0.90, 0.05, 0.05], [0.05, 0.90, 0.05], [0.62, 0.20, 0.18], [0.25, 0.55, 0.20], [0.33, 0.32, 0.35],
    ])
    y = np.array([0, 0, 0, 0, 2])
    # bins of width 1/15: 0.9 -> (13/15, 14/15]: acc 1/2, conf 0.9; 0.62 -> (9/15, 10/15]; 0.55 -> (8/15, 9/15];
    # 0.35 -> (5/15, 6/15]; ECE = 2/5·|0.5 − 0.9| + 1/5·(|1 − 0.62| + |0 − 0.55| + |1 − 0.35|)
    expected = 2 / 5 * 0.4 + 1 / 5 * (0.38 + 0.55 + 0.65)
    assert expected_calibration_error(probs, y, 15) == pytest.approx(expected, abs=1e-12)


def test_ece_bins_are_closed_on_the_right_and_zero_when_calibrated():
    # confidence exactly 1 belongs to the last bin; 3/4 right at confidence 0.75 is perfectly calibrated
    probs = np.array([[1.0, 0.0]] + [[0.75, 0.25]] * 4)
    y = np.array([0, 0, 0, 0, 1])
    assert expected_calibration_error(probs, y, 15) == pytest.approx(0.0, abs=1e-12)
    # two bins (0, 0.5], (0.5, 1]: a confidence of exactly 0.5 falls in the first
    probs = np.array([[0.5, 0.5], [0.9, 0.1]])
    assert expected_calibration_error(probs, np.array([0, 0]), 2) == pytest.approx(0.5 * 0.5 + 0.5 * 0.1)


def test_mcnemar_on_a_hand_made_table():
    # 2x2 table: both right 10, model right / ensemble wrong b = 1, model wrong / ensemble right c = 6, both wrong 3
    model = np.array([1] * 10 + [1] * 1 + [0] * 6 + [0] * 3, bool)
    ref = np.array([1] * 10 + [0] * 1 + [1] * 6 + [0] * 3, bool)
    res = mcnemar_pairs(model, ref)
    assert (res["b"], res["c"]) == (1, 6)
    # exact two-sided: 2 · P(X ≤ 1), X ~ Bin(7, 1/2) = 2 · (1 + 7) / 128
    assert res["p_value"] == pytest.approx(16 / 128, rel=1e-12)
    assert mcnemar_pairs(model, model)["p_value"] == 1.0  # no discordant pairs
    b5c5 = mcnemar_pairs(np.array([1] * 5 + [0] * 5, bool), np.array([0] * 5 + [1] * 5, bool))
    assert b5c5["p_value"] == pytest.approx(1.0)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (440, 450), (450, 450), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)


def test_nll_by_hand():
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [1.0, 0.0]])
    y = np.array([0, 0, 1])  # the last is exactly 0: clipped at 1e-12
    assert negative_log_likelihood(probs, y) == pytest.approx(-(math.log(0.7) + math.log(0.2) + math.log(1e-12)) / 3)


# --- FLOPs ---------------------------------------------------------------------------------------


def _onnx(model, tmp_path, name):
    import onnx

    from fusion.export import export_onnx
    from fusion.data import load_digits

    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, load_digits().X_test[:64])
    return onnx.load(str(path))


def test_flops_of_known_networks_equal_the_hand_formulas(tmp_path):
    from fusion.ensemble import make_combiner
    from fusion.export import FusedEnsemble, Probabilities
    from fusion.zoo import build_model

    torch.manual_seed(0)
    mlp = build_model("mlp", in_features=64, hidden=(32, 16), n_outputs=10).eval()
    cnn = build_model("cnn", in_features=64, image_shape=(1, 8, 8), channels=(4, 8), hidden=16, n_outputs=10).eval()
    mlp_macs = 64 * 32 + 32 * 16 + 16 * 10
    # conv 3x3 'same' on 8x8: out pixels · Cout · Cin · 9; then 2x2 pooling -> 8·4·4 = 128 features
    cnn_macs = 64 * 4 * 1 * 9 + 64 * 8 * 4 * 9 + 128 * 16 + 16 * 10
    assert count_flops(_onnx(Probabilities(mlp), tmp_path, "mlp")) == 2 * mlp_macs
    assert count_flops(_onnx(Probabilities(cnn), tmp_path, "cnn")) == 2 * cnn_macs
    fused = FusedEnsemble([mlp, cnn], make_combiner("soft_vote", 2)).eval()
    assert count_flops(_onnx(fused, tmp_path, "ens")) == 2 * (mlp_macs + cnn_macs)


def test_flops_of_hand_built_graphs():
    """A batched MatMul and a transposed Gemm, built with onnx.helper, counted by hand."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 6])
    w = helper.make_tensor("w", TensorProto.FLOAT, [5, 6], np.zeros(30, np.float32))
    a = helper.make_tensor("a", TensorProto.FLOAT, [12, 7], np.zeros(84, np.float32))  # Gemm uses aᵀ: (7, 12)
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [12, 6])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),  # (1, 3, 4, 5) @ (5, 6) -> (1, 3, 4, 6)
        helper.make_node("Reshape", ["h", "shape"], ["h2"]),  # (12, 6)
        helper.make_node("Gemm", ["a", "h2"], ["y"], transA=1),  # (7, 12) @ (12, 6) -> (7, 6)
    ]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, a, shape]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    assert count_flops(m) == 2 * (3 * 4 * 6 * 5 + 7 * 6 * 12)


def test_flops_refuse_unknown_matrix_ops():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4])
    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="bi,bj->bij")
    m = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    assert count_flops(m) is None  # a matrix op the counter does not know: no number rather than an undercount


# --- the report against the ONNX files ---------------------------------------------------------


def _ort_probs(path: Path, X: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X})[0]


def test_the_build_writes_the_report_into_bundle_and_manifest(tiny_bundle):
    from fusion.bundle import read_bundle, sha256_file

    b = read_bundle(tiny_bundle)  # digests of every variant and member verified
    m = b.manifest
    assert {"ensemble", "distilled"} <= set(m.variants) and m.variants["distilled"].kind == "distilled"
    assert m.variants["distilled"].parity["argmax_agreement"] == 1.0
    report = json.loads((tiny_bundle / "comparison.json").read_text())
    assert {k: v for k, v in m.comparison.items() if k != "artifacts"} == report
    for name, digest in m.comparison["artifacts"].items():
        assert sha256_file(tiny_bundle / name) == digest
    assert [r["name"] for r in report["rows"]] == list(m.variants) + list(m.members)
    md = (tiny_bundle / "comparison.md").read_text()
    assert all(f"`{name}`" in md for name in m.entries())
    assert (tiny_bundle / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_numbers_match_a_direct_recomputation(tiny_bundle, digits):
    report = json.loads((tiny_bundle / "comparison.json").read_text())
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    X, y = digits.X_test, digits.y_test
    assert report["split"] == "test" and report["n"] == len(y)
    ens = _ort_probs(tiny_bundle / "ensemble.onnx", X).argmax(-1)
    for row in report["rows"]:
        p = _ort_probs(tiny_bundle / row["file"], X).astype(np.float64)
        pred = p.argmax(-1)
        assert row["accuracy"] == pytest.approx(float((pred == y).mean()), abs=1e-12)
        assert row["agreement"] == pytest.approx(float((pred == ens).mean()), abs=1e-12)
        nll = float(np.mean([-math.log(max(p[i, y[i]], 1e-12)) for i in range(len(y))]))
        assert row["nll"] == pytest.approx(nll, rel=1e-6)
        assert row["size_bytes"] == (tiny_bundle / row["file"]).stat().st_size
        entry = {**manifest["variants"], **manifest["members"]}[row["name"]]
        assert row["n_parameters"] == entry["n_parameters"] > 0
        lo, hi = row["accuracy_ci95"]
        assert lo <= row["accuracy"] <= hi
        for b in ("1", "64"):
            lat = row["latency_ms"][b]
            assert 0 < lat["median_ms"] <= lat["p99_ms"]
        if row["kind"] == "ensemble":
            assert row["mcnemar"] is None and row["agreement"] == 1.0
        else:  # b + c = the rows where exactly one of the two is right
            mc = row["mcnemar"]
            assert mc["b"] + mc["c"] == int(((pred == y) != (ens == y)).sum())


def test_compare_bundle_reproduces_the_deterministic_numbers(tiny_bundle, digits):
    again = compare_bundle(tiny_bundle, digits, CompareConfig(rounds=5, warmup=1))
    stored = json.loads((tiny_bundle / "comparison.json").read_text())
    for a, b in zip(again["rows"], stored["rows"]):
        for key in ("accuracy", "accuracy_ci95", "nll", "ece", "agreement", "mcnemar", "flops_per_sample"):
            assert a[key] == b[key], (a["name"], key)
    assert "| `distilled` | distilled |" in to_markdown(again)


def test_compare_refuses_data_that_does_not_fit(tiny_bundle, digits):
    from fusion.errors import ConfigError

    with pytest.raises(ConfigError, match="rows"):
        compare_bundle(tiny_bundle, replace(digits, X_test=digits.X_test[:10], y_test=digits.y_test[:10]))


# --- int8: kept only within the bound; a build with every option -----------------------------


def test_quantized_variant_is_kept_only_within_the_bound(tiny_bundle, digits, tmp_path):
    from fusion.build import quantize_variants
    from fusion.bundle import read_bundle
    from fusion.recipe import Recipe, override

    variants = {k: v for k, v in read_bundle(tiny_bundle).manifest.variants.items() if k in ("ensemble", "distilled")}
    shutil.copy(tiny_bundle / "distilled.onnx", tmp_path / "distilled.onnx")
    shutil.copy(tiny_bundle / "ensemble.onnx", tmp_path / "ensemble.onnx")
    loose = override(Recipe(), "build", quantize=True, quantize_max_loss_pp=100.0)
    out = quantize_variants(loose, variants, tmp_path, digits)
    q = out["distilled_int8"]
    assert q.kind == "quantized" and q.method["source"] == "distilled" and q.parity["accepted"]
    assert set(out) == {"ensemble", "distilled", "distilled_int8"}  # the ensemble is not quantized
    assert out["distilled"].method["int8"] == q.parity
    # the recorded check equals a recomputation from the two files
    p32 = _ort_probs(tmp_path / "distilled.onnx", digits.X_val)
    p8 = _ort_probs(tmp_path / "distilled_int8.onnx", digits.X_val)
    loss = 100 * ((p32.argmax(-1) == digits.y_val).mean() - (p8.argmax(-1) == digits.y_val).mean())
    assert q.parity["val_accuracy_loss_pp"] == pytest.approx(loss, abs=1e-9)
    assert q.metrics["val_accuracy"] == pytest.approx((p8.argmax(-1) == digits.y_val).mean())
    (tmp_path / "distilled_int8.onnx").unlink()

    strict = override(loose, "build", quantize_max_loss_pp=-100.0)  # would need a 100-point gain
    out = quantize_variants(strict, variants, tmp_path, digits)
    assert "distilled_int8" not in out and not (tmp_path / "distilled_int8.onnx").exists()
    assert out["distilled"].method["int8"]["accepted"] is False
    off = override(loose, "build", quantize=False)
    assert quantize_variants(off, variants, tmp_path, digits) == variants


@pytest.fixture(scope="module")
def full_bundle(tiny_recipe, tmp_path_factory) -> Path:
    """Temperature-scaled soft vote + distilled + int8, with the report."""
    from fusion.build import build_bundle
    from fusion.recipe import override

    r = override(tiny_recipe, "ensemble", calibration="temperature")
    r = override(r, "build", out=str(tmp_path_factory.mktemp("full") / "bundle"), quantize=True,
                 quantize_max_loss_pp=100.0, compare_rounds=10)
    build_bundle(r)
    return Path(r.build.out)


def test_build_with_quantize_and_calibration(full_bundle, digits):
    from fusion.bundle import read_bundle

    m = read_bundle(full_bundle).manifest
    rows = {r["name"]: r for r in m.comparison["rows"]}
    assert list(rows) == list(m.variants) + list(m.members)  # every variant present is compared
    sources = [n for n, e in m.variants.items() if e.kind in ("merged", "distilled")]
    assert "distilled" in sources
    for name in sources:  # bound 100 pp: every int8 variant is kept, with the float file's FLOPs
        q = m.variants[f"{name}_int8"]
        assert q.kind == "quantized" and q.method["source"] == name and q.parity["accepted"]
        assert rows[f"{name}_int8"]["flops_per_sample"] == rows[name]["flops_per_sample"]
    cal = m.comparison["calibration"]
    assert set(cal["rows"]) == set(m.members) | {"ensemble"}
    assert cal["max_abs_diff_rebuilt_vs_graph"] < 1e-5  # the graph = the combiner over the scaled member files
    temps = m.variants["ensemble"].method["temperatures"]
    for name, c in cal["rows"].items():
        if name != "ensemble":
            assert c["temperature"] == temps[name]
            assert c["nll_before"] == pytest.approx(rows[name]["nll"])  # before = the member file as served
    assert "Temperature scaling" in (full_bundle / "comparison.md").read_text()


def test_every_file_of_the_full_bundle_is_servable(full_bundle):
    """The service refuses files naming operator domains outside onnxruntime's own, used or not."""
    import onnx

    from fusion.bundle import read_bundle
    from service.onnx_check import check_model

    b = read_bundle(full_bundle)
    for name, e in b.manifest.entries().items():
        check_model(b.read_verified(name), name)
        if e.kind == "quantized":  # onnxruntime's pre-processing declares unused domains: pruned
            m = onnx.load(str(full_bundle / e.file))
            assert {o.domain for o in m.opset_import} <= {n.domain for n in m.graph.node} | {""}


def test_cli_compare_prints_the_table_and_writes_the_files(tiny_bundle, tmp_path, capsys):
    from fusion.cli import main

    assert main(["compare", "--bundle", str(tiny_bundle), "--rounds", "3", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| `ensemble` | ensemble |" in out and "| `distilled` | distilled |" in out
    assert {p.name for p in tmp_path.iterdir()} == {"comparison.md", "comparison.json", "comparison.png", "diversity.png"}
    assert "Member diversity on the test split (4 members)" in out and "| cnn_0 · mlp_0 |" in out
