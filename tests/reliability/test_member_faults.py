"""Cases 3 and 4: members mode with an injected fault (test-only FUSION_FAULT).

* strict policy, `mlp_1` raises: 503 naming the member, no traceback; the fused ensemble still answers.
* quorum:2, `mlp_1` raises and `mlp_3` hangs 5 s past a 300 ms deadline: 200 with `degraded: true`,
  equal to the soft vote of the members that answered (computed offline), within the deadline plus
  a margin; member threads (the in-flight member runs) never exceed their bound, and once the hung
  runs end the service answers again.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import numpy as np
import pytest

from tests.reliability import bundles
from tests.reliability.harness import env_threads, percentile_ms, record, worker_threads
from tests.server import Server

pytestmark = pytest.mark.server

DEADLINE_MS, HANG_S = 300, 5.0
MEMBERS = list(bundles.MEMBERS)
HEALTHY = ["mlp_0", "mlp_2"]
POOL_BOUND = 2 * len(MEMBERS)  # MembersEnsemble: one thread per member, at most 2x members in flight
SLACK = 2  # BentoML's own short-lived threads (readiness checks run in a thread pool)


@pytest.fixture(scope="module")
def servers(v1):
    strict = Server(v1, env={**env_threads(), "FUSION_FAILURE_POLICY": "strict", "FUSION_FAULT": "mlp_1=raise"},
                    wait_ready=False)
    quorum = Server(v1, env={**env_threads(), "FUSION_FAILURE_POLICY": "quorum:2", "FUSION_MEMBER_DEADLINE_MS": str(DEADLINE_MS),
                             "FUSION_FAULT": f"mlp_1=raise,mlp_3=hang:{HANG_S}"}, wait_ready=False)
    try:
        strict.start(), quorum.start()  # both boot at once
        strict.wait("/readyz", 200)
        quorum.wait("/readyz", 200)
        yield {"strict": strict, "quorum": quorum}
    finally:
        strict.stop()
        quorum.stop()


def predict(url: str, X: np.ndarray, variant: str | None = "members") -> tuple[httpx.Response, float]:
    t = time.perf_counter()
    r = httpx.post(url + "/predict", json={"inputs": X.tolist(), **({"variant": variant} if variant else {})}, timeout=30)
    return r, time.perf_counter() - t


def test_04_strict_member_failure_is_503_naming_it(servers, v1):
    X = bundles.digits_like(3, seed=4)
    r, _ = predict(servers["strict"].url, X)
    body = r.json()
    assert r.status_code == 503 and set(body) == {"error", "request_id"}, (r.status_code, body)
    assert "mlp_1" in body["error"] and "Traceback" not in body["error"] and 'File "' not in body["error"]
    assert r.headers.get("retry-after") == "1"
    ok, _ = predict(servers["strict"].url, X, variant=None)  # the fused ensemble does not use member sessions
    assert ok.status_code == 200
    assert np.allclose(ok.json()["probabilities"], bundles.offline(v1, "ensemble", X), atol=1e-5)
    record("04a_member_raises_strict", status=r.status_code, error=body["error"], fused_ensemble_status=ok.status_code)


def test_03_hanging_member_bounded_by_deadline_and_pool(servers):
    srv = servers["quorum"]
    X = bundles.digits_like(2, seed=3)
    base_threads = worker_threads(srv.proc.pid)
    samples, stop = [], threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.is_set() and time.monotonic() - t0 < 60:
            samples.append(worker_threads(srv.proc.pid))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: predict(srv.url, X), range(20)))
    finally:
        stop.set()
        sampler.join(5)
    statuses = {}
    for r, _ in results:
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        body = r.json()
        if r.status_code == 200:
            assert body["degraded"] is True and "mlp_3" in body["members_failed"], body
            assert "deadline" in body["members_failed"]["mlp_3"]
        else:  # members still hung from earlier requests: refused at once, not queued
            assert r.status_code == 503 and "saturated" in body["error"] and r.headers.get("retry-after"), body
    lat = [t for _, t in results]
    # the hung runs end HANG_S after they started; then the service answers again
    time.sleep(HANG_S + 0.5)
    again, t_again = predict(srv.url, X)
    record("03_member_hangs", deadline_ms=DEADLINE_MS, hang_s=HANG_S, requests_sent=len(results), statuses=statuses,
           p50_ms=percentile_ms(lat, 50), max_ms=percentile_ms(lat, 100), threads_baseline=base_threads,
           threads_max=max(samples), thread_bound=base_threads + POOL_BOUND + SLACK, after_hang_status=again.status_code)
    assert set(statuses) <= {200, 503} and statuses.get(200, 0) >= 1, statuses
    assert np.median(lat) <= DEADLINE_MS / 1e3 + 0.5, lat
    assert max(lat) <= DEADLINE_MS / 1e3 + 2.0 < HANG_S, f"an answer took {max(lat):.2f}s: it waited for the hung member"
    assert max(samples) <= base_threads + POOL_BOUND + SLACK, (base_threads, max(samples))
    assert again.status_code == 200 and again.json()["degraded"] is True


def test_04_quorum_answers_degraded_from_the_healthy_members(servers, v1):
    srv = servers["quorum"]
    X = bundles.digits_like(5, seed=5)
    oracle = bundles.offline_members(v1, HEALTHY, X)
    full = bundles.offline(v1, "ensemble", X)
    out = []
    for _ in range(3):
        r, t = predict(srv.url, X)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["degraded"] is True and body["members_answered"] == HEALTHY, body
        assert set(body["members_failed"]) == {"mlp_1", "mlp_3"}
        assert np.allclose(body["probabilities"], oracle, atol=1e-5)
        assert body["predictions"] == oracle.argmax(-1).tolist()
        out.append(t)
    record("04b_member_raises_quorum", requests=len(out), max_ms=percentile_ms(out, 100),
           max_abs_diff_vs_healthy_oracle=float(np.abs(np.asarray(body["probabilities"]) - oracle).max()),
           differs_from_full_ensemble=bool(not np.allclose(oracle, full, atol=1e-5)))
