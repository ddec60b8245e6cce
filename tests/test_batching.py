"""Adaptive batching: concurrent requests are coalesced, each gets exactly its own rows back, and one
failing call fails only the requests in it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.batching import AdaptiveBatcher


class Recorder:
    """A deterministic 'model' (row sums times a weight) that records the size of every call."""

    def __init__(self, fail_on_rows: int | None = None):
        self.calls: list[int] = []
        self.fail_on_rows = fail_on_rows

    def __call__(self, X: np.ndarray) -> np.ndarray:
        self.calls.append(len(X))
        if self.fail_on_rows is not None and (X[:, 0] == self.fail_on_rows).any():
            raise RuntimeError("boom")
        return np.stack([X.sum(1), X.max(1)], axis=1)  # (B, 2)


def reference(X):
    return np.stack([X.sum(1), X.max(1)], axis=1)


@pytest.mark.parametrize("inline_rows", [32, 0])  # on the event loop, and in worker threads
def test_concurrent_requests_are_coalesced_and_answered_exactly(inline_rows):
    rng = np.random.default_rng(0)
    requests = [rng.normal(size=(int(rng.integers(1, 5)), 8)).astype(np.float32) for _ in range(60)]
    model = Recorder()
    batcher = AdaptiveBatcher(max_rows=64, inline_rows=inline_rows)

    async def main():
        return await asyncio.gather(*(batcher.run(model, X) for X in requests))

    outs = asyncio.run(main())
    for X, out in zip(requests, outs):
        np.testing.assert_array_equal(out, reference(X))
    assert sum(model.calls) == sum(len(X) for X in requests)  # every row computed exactly once
    assert len(model.calls) < len(requests)  # and in fewer calls than requests
    assert max(model.calls) <= 64


def test_a_request_larger_than_max_rows_runs_alone():
    model = Recorder()
    batcher = AdaptiveBatcher(max_rows=4)
    X = np.ones((10, 3), dtype=np.float32)
    out = asyncio.run(batcher.run(model, X))
    np.testing.assert_array_equal(out, reference(X))
    assert model.calls == [10]


def test_a_failing_call_fails_only_its_own_requests():
    model = Recorder(fail_on_rows=7)
    batcher = AdaptiveBatcher(max_rows=2)  # two single-row requests per call

    async def main():
        rows = [np.full((1, 3), v, dtype=np.float32) for v in (1, 7, 2, 3)]
        return await asyncio.gather(*(batcher.run(model, X) for X in rows), return_exceptions=True)

    res = asyncio.run(main())
    assert isinstance(res[0], RuntimeError) and isinstance(res[1], RuntimeError)  # the call holding row 7
    np.testing.assert_array_equal(res[2], reference(np.full((1, 3), 2, dtype=np.float32)))
    np.testing.assert_array_equal(res[3], reference(np.full((1, 3), 3, dtype=np.float32)))


@pytest.mark.server
def test_bench_batching_smoke(tiny_bundle, tmp_path):
    from bench.bench_batching import run

    res = run(str(tiny_bundle), smoke=True, bench_dir=tmp_path)
    assert [s["name"] for s in res["scenarios"]] == ["default", "mlp-16"]  # the given bundle, then a built one
    assert res["failed"] == 0 and res["wrong"] == 0  # every answer checked against onnxruntime offline
    for s in res["scenarios"]:
        assert s["rps_on"] > 0 and s["rps_off"] > 0 and s["batch1_ms"] > 0
        assert s["mean_batch_rows"] >= 1  # the batching server did batch (its own Prometheus histogram)
        assert abs(s["speedup"] - s["rps_on"] / s["rps_off"]) < 1e-9
    from fusion.bundle import read_bundle

    built = read_bundle(tmp_path / "mlp-16" / "bundle").manifest  # verified: digests and parity as any bundle
    assert len(built.variants["ensemble"].members) == 5


class SlowModel(Recorder):
    """A model whose calls take `seconds` in a worker thread, reporting how many ran at once."""

    inline_ok = staticmethod(lambda rows: False)  # as runtime.Model says for an expensive model

    def __init__(self, seconds: float):
        super().__init__()
        import threading

        self.seconds, self.running, self.most = seconds, 0, 0
        self._lock = threading.Lock()

    def __call__(self, X):
        import time

        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return super().__call__(X)


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_bound_the_calls_in_flight_and_answers_stay_exact(instances):
    model = SlowModel(0.02)
    batcher = AdaptiveBatcher(max_rows=4, instances=instances)
    rows = [np.full((1, 3), v, dtype=np.float32) for v in range(24)]

    async def main():
        async def one(X, delay):
            await asyncio.sleep(delay)  # requests arrive while calls are running
            return await batcher.run(model, X)

        return await asyncio.gather(*(one(X, 0.004 * i) for i, X in enumerate(rows)))

    res = asyncio.run(main())
    for X, out in zip(rows, res):
        np.testing.assert_array_equal(out, reference(X))
    assert model.most == instances  # never more calls at once than instances, and all of them used
    assert sum(model.calls) == len(rows) and max(model.calls) <= 4
    assert batcher.queues[id(model)].running == 0  # every drain task finished


def test_batcher_refuses_nonsense_settings():
    with pytest.raises(ValueError, match="instances >= 1"):
        AdaptiveBatcher(max_rows=4, instances=0)
    with pytest.raises(ValueError, match="max_rows >= 1"):
        AdaptiveBatcher(max_rows=0)


def test_simultaneous_arrivals_make_no_empty_calls():
    """Two instances woken by one burst: the second finds the queue taken and makes no call."""
    model = Recorder()
    batcher = AdaptiveBatcher(max_rows=64, instances=2)
    rows = [np.full((1, 3), v, dtype=np.float32) for v in range(10)]

    async def main():
        return await asyncio.gather(*(batcher.run(model, X) for X in rows))  # all in one loop turn

    res = asyncio.run(main())
    for X, out in zip(rows, res):
        np.testing.assert_array_equal(out, reference(X))
    assert batcher.calls == len(model.calls) == 1 and model.calls == [10]
    assert batcher.requests == len(rows) and not batcher._tasks  # finished tasks are let go
