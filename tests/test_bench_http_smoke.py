"""The serving benchmarks run and their outputs are right (no timing is asserted: that is the
benchmark's job, not a test's): bench/bench_http.py in smoke mode, bench/gpu_check.py here without
a GPU (a clean SKIP, and its --dry-run on the CPU provider), and its synthetic bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", **env})


@pytest.mark.server
def test_bench_http_smoke(tiny_bundle, tmp_path):
    out = tmp_path / "http.json"
    proc = run(["bench/bench_http.py", "--smoke", "--bundle", str(tiny_bundle), "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["correct"] is True and res["failed"] == 0 and res["wrong"] == 0
    for endpoint in ("predict", "predict_one", "echo"):
        fig = res[endpoint]
        assert fig["n"] == 3 * 20 and 0 < fig["median_ms"] <= fig["p99_ms"]
    assert res["predict_over_echo_median"] == pytest.approx(res["predict"]["median_ms"] / res["echo"]["median_ms"])
    assert res["one_over_echo_median"] == pytest.approx(res["predict_one"]["median_ms"] / res["echo"]["median_ms"])
    assert res["meets_goal"] == (res["predict_over_echo_median"] <= 1.25)
    assert res["single_model_variant"] == "merged"  # the tiny bundle has a merged MLP; every answer was checked
    # the model's own time, from the server's histogram: positive, and less than the whole round trip
    assert 0 < res["model_in_server_mean_ms"] < res["predict"]["mean_ms"]
    expected = (res["predict"]["mean_ms"] - res["model_in_server_mean_ms"]) / res["echo"]["mean_ms"]
    assert res["non_model_over_echo_mean"] == pytest.approx(expected)
    for endpoint in ("predict", "echo"):
        r = res["rps"][endpoint]
        assert r["connections"] == 8 and r["requests"] > 0 and r["rps"] == pytest.approx(r["requests"] / r["seconds"])
        assert r["errors"] == 0
    assert "predict ÷ echo" in proc.stdout and "8 concurrent connections" in proc.stdout


def test_bench_http_refuses_a_missing_bundle(tmp_path):
    proc = run(["bench/bench_http.py", "--smoke", "--bundle", str(tmp_path / "none")], timeout=60)
    assert proc.returncode == 2 and "no bundle" in proc.stderr


def test_gpu_check_skips_cleanly_without_a_gpu():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider: gpu_check would run for real")
    proc = run(["bench/gpu_check.py"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SKIP: ") and "CUDAExecutionProvider" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_gpu_check_dry_run_on_cpu(tiny_bundle, tmp_path):
    out = tmp_path / "gpu.json"
    proc = run(["bench/gpu_check.py", "--dry-run", "--bundle", str(tiny_bundle), "--json", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ok"] is True and res["dry_run"] is True
    assert all(c["ok"] for c in res["checks"].values())
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(res["placement"]) == set(manifest["variants"]) | set(manifest["members"])
    assert set(res["latency"]) == {"1", "64", "256"}
    assert "GPU CHECK: PASS" in proc.stdout


def test_gpu_check_synthetic_bundle_is_a_soft_vote(tmp_path):
    """The bundle gpu_check writes when it has none: verified by the service's reader, and its ensemble
    graph equals the mean of its members run one by one."""
    pytest.importorskip("onnx")
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from fusion.bundle import read_bundle

    path = gpu_check.synthetic_bundle(tmp_path / "b", n_members=3, hidden=16)
    bundle = read_bundle(path)  # every digest verified
    m = bundle.manifest
    assert list(m.variants["ensemble"].members) == ["mlp_0", "mlp_1", "mlp_2"]
    X = np.random.default_rng(0).normal(size=(5, m.input.n_features)).astype(np.float32)

    def run_file(rel):
        s = ort.InferenceSession(str(path / rel), providers=["CPUExecutionProvider"])
        return s.run(None, {"input": X})[0]

    members = [run_file(m.members[n].file) for n in m.variants["ensemble"].members]
    np.testing.assert_allclose(run_file("ensemble.onnx"), np.mean(members, 0), atol=1e-6)
    np.testing.assert_allclose(members[0].sum(-1), 1.0, atol=1e-5)
    assert not np.allclose(members[0], members[1])
