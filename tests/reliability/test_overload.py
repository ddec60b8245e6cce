"""Case 2: a burst of 3x the concurrency limit. The excess is refused at once with 429 (+ Retry-After,
in the one error shape), nothing else fails, health endpoints stay 200, and the service recovers.

To make "the limit is full" certain rather than a matter of timing, `LIMIT` requests hold every
slot while the burst is sent: members-mode requests whose member `mlp_0` hangs for HOLD_S (the
test-only FUSION_FAULT). A slow *body* no longer holds a slot (a request is admitted once its body is
complete: issue 13, finding 3, tests/reliability/test_request_bodies.py). A second, natural burst of
large requests checks that nothing but 200 and 429 ever comes back.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest

from tests.reliability import bundles
from tests.reliability.harness import Load, SlowRequest, env_threads, percentile_ms, record, wait_until
from tests.server import Server

pytestmark = pytest.mark.server

LIMIT = 2  # members mode runs at most 2 requests at once (2x members threads): one per held slot
TIMEOUT_S = 4
HOLD_S = 2.5  # a held request's hang: below TIMEOUT_S, so that it answers 200
BURST = 3 * LIMIT
HEALTH = ("/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready")


@pytest.fixture(scope="module")
def server(v1):
    env = {**env_threads(), "FUSION_MAX_CONCURRENCY": str(LIMIT), "FUSION_TIMEOUT_S": str(TIMEOUT_S),
           "FUSION_FAULT": f"mlp_0=hang:{HOLD_S}", "FUSION_MEMBER_DEADLINE_MS": "30000",
           "FUSION_BODY_TIMEOUT_S": str(3 * TIMEOUT_S)}  # 02b's slow body meets the request timeout first
    with Server(v1, env=env) as srv:
        yield srv


def burst(url: str, n: int, body: dict) -> list[tuple[int, float, httpx.Response]]:
    """n requests released together (a barrier), each on its own connection: (status, seconds, response)."""
    gate = threading.Barrier(n)

    def one(_):
        with httpx.Client(timeout=30) as c:
            gate.wait(10)
            t = time.perf_counter()
            r = c.post(url + "/predict", json=body)
            return r.status_code, time.perf_counter() - t, r

    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_02_overload_refused_fast_health_stays_up(server):
    X = bundles.digits_like(256, seed=2)
    small = {"inputs": X[:2].tolist()}
    held = json.dumps({**small, "variant": "members"}).encode()
    holders = [SlowRequest(server.port, "/predict", held, first=len(held)) for _ in range(LIMIT)]
    time.sleep(0.5)  # their bodies are in: every slot is taken until mlp_0's hang ends
    held_since = time.monotonic()
    refused = burst(server.url, BURST, small)
    health = {p: httpx.get(server.url + p, timeout=5).status_code for p in HEALTH}
    held_for = time.monotonic() - held_since
    answers = [h.finish() for h in holders]
    released = time.monotonic()

    statuses = [s for s, _, _ in refused]
    for s, _, r in refused:
        assert s == 429, (s, r.text)
        body429 = r.json()
        assert set(body429) == {"error", "request_id"} and r.headers["retry-after"] == "1", (body429, dict(r.headers))
        assert r.headers["x-request-id"] == body429["request_id"]
    assert all(code == 200 for code in health.values()), health
    assert [status for status, _ in answers] == [200] * LIMIT, answers

    # recovery: the first success after the slots free up, then a full round at the limit's concurrency
    first_ok = wait_until(lambda: httpx.post(server.url + "/predict", json=small, timeout=5).status_code == 200, 10, 0.05)
    recovered_s = time.monotonic() - released
    after = Load(server.url, lambda i: {"path": "/predict", "json": small}, concurrency=LIMIT - 1, duration_s=20,
                 max_requests=200).run()

    # a natural burst: 3x the limit of 256-row requests (these run in threads, so they overlap)
    natural = []
    for _ in range(5):
        natural += burst(server.url, BURST, {"inputs": X.tolist()})
    natural_statuses = {}
    for s, _, r in natural:
        natural_statuses[s] = natural_statuses.get(s, 0) + 1
        if s != 200:
            assert s == 429 and set(r.json()) == {"error", "request_id"}, (s, r.text)

    lat = [t for _, t, _ in refused]
    record("02_overload", limit=LIMIT, burst=BURST, held_slots=LIMIT, held_s=round(held_for, 2),
           burst_statuses={s: statuses.count(s) for s in set(statuses)}, refusal_p99_ms=percentile_ms(lat, 99),
           refusal_max_ms=percentile_ms(lat, 100), health=health, held_requests_ok=sum(s == 200 for s, _ in answers),
           recovered_within_s=round(recovered_s, 2), after_recovery=after.summary(),
           natural_burst_requests=len(natural), natural_burst_statuses=natural_statuses)
    assert max(lat) < held_for, "a refusal waited for a slot instead of being answered at once"
    assert max(lat) < 2.0, f"refusals took up to {max(lat):.2f}s"
    assert first_ok and recovered_s < 5.0
    assert after.failed == 0 and after.sent == 200, after.summary()
    assert set(natural_statuses) <= {200, 429}, natural_statuses
    assert natural_statuses.get(200, 0) >= 5, "no request of the natural bursts got through"


def test_02_request_past_the_timeout_is_504_in_the_error_shape(server):
    """A request with no response after FUSION_TIMEOUT_S (here: its body never completes, and this
    server's FUSION_BODY_TIMEOUT_S is longer) gets 504 in the one error shape, and the server keeps
    answering."""
    body = json.dumps({"inputs": bundles.digits_like(1).tolist()}).encode()
    held = SlowRequest(server.port, "/predict", body, headers={"X-Request-ID": "slow-1"})
    time.sleep(TIMEOUT_S + 1.0)
    status, answer = held.finish()
    after = httpx.post(server.url + "/predict", json={"inputs": bundles.digits_like(1).tolist()}, timeout=10)
    payload = json.loads(answer or b"{}")
    record("02b_timeout", timeout_s=TIMEOUT_S, status=status, body=payload, next_request=after.status_code)
    assert status == 504 and payload == {"error": payload.get("error"), "request_id": "slow-1"}, (status, answer)
    assert after.status_code == 200
