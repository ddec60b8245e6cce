"""Admission control and draining for our routes (one `Traffic` per worker process).

**Overload.** A per-worker limit on requests in flight (FUSION_MAX_CONCURRENCY split over the
workers, as BentoML's `traffic.max_concurrency` splits it); the excess is refused at once with 429,
`Retry-After` and the one error shape, never queued. BentoML's own limit is not used: it also
refused our health endpoints (`/v2/health/*` answered 429 under overload, so a probe could fail a
healthy pod) and answered without a request id. Health paths bypass the limit here.

**Drain.** On SIGTERM the worker reports not ready at once (`/readyz` and `/v2/health/ready` answer
503) and keeps serving, new requests included, until nothing is in flight and at least
FUSION_DRAIN_S seconds have passed (default 0; at most FUSION_DRAIN_MAX_S, default 30); then it
hands over to uvicorn's own shutdown: stop accepting, finish what is left, run the shutdown hooks,
exit. Stock BentoML closed the listener at once, so a readiness probe during the drain hung
instead of reading 503. A second SIGTERM stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

from service.errors import json_response, request_id_from
from service.stats import ERRORS

log = logging.getLogger("fusion.service")

HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/livez", "/readyz", "/healthz", "/metrics"})


class Traffic:
    """Requests in flight on this worker, the limit, and whether the worker is draining."""

    def __init__(self, limit: int):
        self.limit = limit  # <= 0: no limit
        self.inflight = 0  # changed on the event loop only
        self.refused = 0
        self.draining = False

    @classmethod
    def from_settings(cls, max_concurrency: int, workers: int) -> "Traffic":
        return cls(-(-max_concurrency // max(1, workers)) if max_concurrency > 0 else 0)


def _request_id(scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return request_id_from(value.decode("latin-1"))
    return request_id_from(None)


class Admission:
    """ASGI middleware: count requests in flight; refuse beyond the limit with 429 (health paths exempt)."""

    def __init__(self, app, traffic: Traffic, bypass: frozenset[str] = HEALTH_PATHS):
        self.app, self.traffic, self.bypass = app, traffic, bypass

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.bypass:
            return await self.app(scope, receive, send)
        t = self.traffic
        if 0 < t.limit <= t.inflight:
            t.refused += 1
            rid = _request_id(scope)
            ERRORS.labels("429").inc()
            response = json_response(
                {"error": f"too many requests in flight on this worker (limit {t.limit}); retry shortly", "request_id": rid},
                429, {"Retry-After": "1", "X-Request-ID": rid},
            )
            return await response(scope, receive, send)
        t.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            t.inflight -= 1


def install_drain(traffic: Traffic, env=os.environ) -> bool:
    """In a server worker's main thread, wrap uvicorn's SIGTERM handler with the drain described above."""
    from bentoml import server_context

    if server_context.worker_index is None or threading.current_thread() is not threading.main_thread():
        return False  # in-process use (tests, TestClient): leave signals alone
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return False
    min_s = float(env.get("FUSION_DRAIN_S", "0"))
    max_s = float(env.get("FUSION_DRAIN_MAX_S", "30"))

    def wait_then_stop(sig, frame) -> None:
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= max_s or (elapsed >= min_s and traffic.inflight == 0):
                break
            time.sleep(0.05)
        log.info("drained after %.2f s (%d in flight); shutting down", time.monotonic() - t0, traffic.inflight)
        previous(sig, frame)  # uvicorn: stop accepting, finish in-flight requests, run shutdown hooks

    def on_sigterm(sig, frame) -> None:
        if traffic.draining:
            previous(sig, frame)
            return
        traffic.draining = True
        log.info("SIGTERM: draining; readiness is 503, %d request(s) in flight", traffic.inflight)
        threading.Thread(target=wait_then_stop, args=(sig, frame), name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def patch_bentoml_timeout() -> None:
    """Make BentoML's TimeoutMiddleware cancel its per-request timer once the request is done.

    bentoml 1.4.40 (`bentoml/_internal/server/http/traffic.py`) calls `loop.call_later(timeout, ...)`
    for every request and never cancels the handle; the handle keeps a copy of the request's
    contextvars (its OpenTelemetry spans, ~5 KB) alive until the timer fires. With the 30 s timeout,
    a worker at 600 req/s held ~18k of them: +140 MB RSS (tests/reliability, case 1), growing with
    the request rate. Same behaviour otherwise: 504 when no response has started in time, now in the
    one error shape with the request id.
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    if getattr(TimeoutMiddleware, "_fusion_patched", False):
        return

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if task.cancel():
                rid = _request_id(scope)
                ERRORS.labels("504").inc()
                response = json_response({"error": f"no response within {self.timeout:g} s (FUSION_TIMEOUT_S)", "request_id": rid},
                                         504, {"X-Request-ID": rid})
                await response(scope, receive, send)
        else:
            await task
        finally:
            timer.cancel()  # the fix: release the handle (and the request context it holds) now

    TimeoutMiddleware.__call__ = __call__
    TimeoutMiddleware._fusion_patched = True
