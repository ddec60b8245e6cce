"""Where a call runs: runtime.CallCost (a running mean of small calls' wall time) decides between the
event loop and a worker thread; and the serving settings that keep the HTTP floor low."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from service.runtime import INLINE_ROWS, CallCost, Model


def test_call_cost_is_an_exponentially_weighted_mean_of_small_calls():
    cost, alpha = CallCost(alpha=0.25), 0.25
    samples = [(1, 0.004), (4, 0.001), (1, 0.002), (8, 0.010), (2, 0.003)]
    naive_s, naive_rows = samples[0][1], samples[0][0]
    for rows, s in samples[1:]:  # the textbook recurrence, seeded with the first sample
        naive_s = (1 - alpha) * naive_s + alpha * s
        naive_rows = (1 - alpha) * naive_rows + alpha * rows
    for rows, s in samples:
        cost.observe(rows, s)
    assert cost.small_s == pytest.approx(naive_s) and cost.small_rows == pytest.approx(naive_rows)
    assert cost.calls == len(samples)
    cost.observe(INLINE_ROWS + 1, 9.0)  # large calls do not move the small-call estimate
    assert cost.small_s == pytest.approx(naive_s) and cost.calls == len(samples)
    # a call of more rows than usual is expected to cost proportionally more; fewer, never less
    assert cost.expected_s(int(naive_rows * 4)) == pytest.approx(naive_s * int(naive_rows * 4) / naive_rows)
    assert cost.expected_s(1) == pytest.approx(naive_s)


class _Sleeper:
    """A stand-in onnxruntime session whose run takes at least `seconds` and returns one row per input row."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def run(self, _outputs, feeds):
        X = next(iter(feeds.values()))
        if self.seconds:
            time.sleep(self.seconds)
        return [np.zeros((len(X), 2), dtype=np.float32)]


def test_a_model_times_its_calls_and_runs_inline_only_while_cheap():
    m = Model("m", _Sleeper(0.002), "input", "cpu")
    m(np.zeros((1, 3), dtype=np.float32))
    assert m.cost.calls == 1 and m.cost.small_s >= 0.002  # sleep() takes at least that long
    assert not m.inline_ok(1, budget_s=0.001) and m.inline_ok(1, budget_s=1.0)
    assert not m.inline_ok(INLINE_ROWS + 1, budget_s=1.0)  # many rows: always a thread
    for _ in range(60):  # the model became cheap (fixed timings, not the clock)...
        m.cost.observe(1, 0.0001)
    assert m.inline_ok(1, budget_s=0.001)  # ...and is back on the event loop
    assert not m.inline_ok(16, budget_s=0.001)  # but 16 rows at ~0.1 ms a row are expected to take too long


def test_settings_keep_tracing_off_the_inference_paths_unless_asked():
    from service import config
    from service.app import INFERENCE_PATHS

    assert config.load({}).http.tracing is False and config.load({}).http.access_log is True
    assert config.load({"FUSION_TRACING": "1"}).http.tracing is True
    assert config.load({"FUSION_ACCESS_LOG": "0"}).http.access_log is False
    assert config.load({}).engine.batch_instances == 2
    # OpenTelemetry's ExcludeList matches with re.search on the URL: every inference route, nothing else
    urls = {"/predict": True, "/echo": True, "/feedback": True, "/v2/models/fusion/infer": True,
            "/v2/models/fusion": False, "/info": False, "/ab/report": False, "/metrics": False,
            "/predict/x": False, "/ui/predict": False, "/v2/models/a/b/infer": False}
    for url, excluded in urls.items():
        assert any(re.search(p, "http://h:3000" + url) for p in INFERENCE_PATHS) is excluded, url


def test_the_service_config_excludes_the_inference_paths_from_tracing():
    from service.app import CONFIG, INFERENCE_PATHS, FusionService

    if CONFIG.http.tracing:
        pytest.skip("FUSION_TRACING is set in this environment")
    assert FusionService.config["tracing"]["excluded_urls"] == INFERENCE_PATHS


@pytest.mark.server
def test_calls_sent_to_worker_threads_answer_like_the_event_loop(tiny_bundle, digits):
    """FUSION_INLINE_BUDGET_MS=0: every call is 'expensive' and runs in a worker thread; concurrent
    answers must still equal onnxruntime run offline on the same rows."""
    import asyncio

    import httpx
    import onnxruntime as ort

    from fusion.bundle import read_bundle
    from tests.server import Server

    X = digits.X_test[:24]
    b = read_bundle(tiny_bundle)
    ref = ort.InferenceSession(b.read_verified("ensemble"), providers=["CPUExecutionProvider"])
    expected = ref.run(None, {b.manifest.input.name: X})[0]
    with Server(tiny_bundle, env={"FUSION_INLINE_BUDGET_MS": "0"}) as srv:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                return await asyncio.gather(*(c.post("/predict", json={"inputs": [r.tolist()]}) for r in X))

        answers = asyncio.run(go())
    assert all(r.status_code == 200 for r in answers)
    got = np.array([r.json()["probabilities"][0] for r in answers], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
