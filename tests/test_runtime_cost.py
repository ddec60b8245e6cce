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
    samples = [0.004, 0.001, 0.002, 0.010, 0.003]
    naive = samples[0]
    for s in samples[1:]:
        naive = (1 - alpha) * naive + alpha * s  # the textbook recurrence, seeded with the first sample
    for s in samples:
        cost.observe(1, s)
    assert cost.small_s == pytest.approx(naive) and cost.calls == len(samples)
    cost.observe(INLINE_ROWS + 1, 9.0)  # large calls do not move the small-call estimate
    assert cost.small_s == pytest.approx(naive) and cost.calls == len(samples)


class _Sleeper:
    """A stand-in onnxruntime session whose run takes `seconds` and returns one row per input row."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def run(self, _outputs, feeds):
        X = next(iter(feeds.values()))
        time.sleep(self.seconds)
        return [np.zeros((len(X), 2), dtype=np.float32)]


def test_a_model_is_inline_only_while_its_small_calls_are_cheap():
    m = Model("m", _Sleeper(0.0), "input", "cpu")
    X = np.zeros((1, 3), dtype=np.float32)
    m(X)
    assert m.inline_ok(1, budget_s=0.001)
    assert not m.inline_ok(INLINE_ROWS + 1, budget_s=0.001)  # many rows: always a thread
    m.session.seconds = 0.005  # the model became expensive (or the machine slow): after a few calls...
    for _ in range(20):
        m(X)
    assert m.cost.small_s > 0.003 and not m.inline_ok(1, budget_s=0.001)  # ...it leaves the event loop
    m.session.seconds = 0.0
    for _ in range(60):
        m(X)
    assert m.inline_ok(1, budget_s=0.001)  # and comes back once it is cheap again


def test_settings_keep_tracing_off_the_inference_paths_unless_asked():
    from service.app import INFERENCE_PATHS, Settings

    assert Settings.from_env({}).tracing is False and Settings.from_env({}).access_log is True
    assert Settings.from_env({"FUSION_TRACING": "1"}).tracing is True
    assert Settings.from_env({"FUSION_ACCESS_LOG": "0"}).access_log is False
    assert Settings.from_env({}).batch_instances == 2
    # OpenTelemetry's ExcludeList matches with re.search on the URL: every inference route, nothing else
    urls = {"/predict": True, "/echo": True, "/feedback": True, "/v2/models/fusion/infer": True,
            "/v2/models/fusion": False, "/info": False, "/ab/report": False, "/metrics": False}
    for url, excluded in urls.items():
        assert any(re.search(p, "http://h:3000" + url) for p in INFERENCE_PATHS) is excluded, url


def test_the_service_config_excludes_the_inference_paths_from_tracing():
    from service.app import INFERENCE_PATHS, SETTINGS, FusionService

    if SETTINGS.tracing:
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
