"""Admission control, request bodies and draining for our routes (one `Traffic` per worker process).

**Overload.** A per-worker limit on requests in flight (FUSION_MAX_CONCURRENCY split over the
workers, as BentoML's `traffic.max_concurrency` splits it); the excess is refused at once with 429,
`Retry-After` and the one error shape, never queued. BentoML's own limit is not used: it also
refused our health endpoints (`/v2/health/*` answered 429 under overload, so a probe could fail a
healthy pod) and answered without a request id. Health paths bypass the limit here.

**Bodies.** A request takes its slot only once its body is complete: GET/HEAD requests (no body) at
once, the others when the last body chunk arrives, inside `receive` (our handlers read bodies with
`Request.stream()`, after the token check). A client still sending its body holds no slot: 64 bodies
trickling in at 1 byte/s used to hold every slot, and every real client got 429 (issue 13, finding
3). The whole body must arrive within FUSION_BODY_TIMEOUT_S (default 5 s) of the request's start,
however it trickles; past that `receive` raises `RequestTimeoutError`, which the handler answers 408
(one error shape, request id, `Connection: close`). A full limit raises `OverloadedError` there: 429,
as a request without a body gets at once. Both are raised inside the handler's body read, so
`service.app.endpoint` maps them like any other error.

Headers are uvicorn's: a request reaches this middleware only once its headers are complete, so one
still sending them holds no slot either. uvicorn 0.55 has no header-read timeout (its keep-alive
timer starts after a first response) and BentoML passes it only `backlog`, `timeout_keep_alive` and
`timeout_graceful_shutdown`: such a connection holds a socket until the client gives up. Bound that
at the proxy in front (nginx `client_header_timeout`, an ingress' header timeout), as for any
uvicorn server.

**Large bodies** are parsed in a worker thread (`off_loop`) above INLINE_PARSE_BYTES, so that the
checks around a parse (Python loops over rows) never stall the event loop. orjson itself holds the
GIL while it builds values, so one parse call stalls the loop even from a thread (0.2-0.4 s for 8 MiB
of `0,`): batch bodies are refused by value count before they are parsed (service/payload.py,
`check_value_count`), and bodies small by nature (/feedback, /admin/*) have a much smaller byte
cap (FUSION_MAX_SMALL_BODY_BYTES, service/app.py).

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
import signal
import threading
import time

from starlette.concurrency import run_in_threadpool

from service.errors import OverloadedError, RequestTimeoutError, json_response, request_id_from
from service.metrics import ERRORS

log = logging.getLogger("fusion.service")

HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/livez", "/readyz", "/healthz", "/metrics"})
BODYLESS = frozenset({"GET", "HEAD"})  # admitted at once; every other method when its body is complete
# Bodies up to this size are parsed on the event loop: below it a parse costs less than the hop to a thread (~0.1 ms)
INLINE_PARSE_BYTES = 64 << 10


class Traffic:
    """Requests in flight on this worker, the inference slots they hold, the limit and the body
    deadline, and whether the worker is draining. Changed on the event loop only."""

    def __init__(self, limit: int, body_timeout_s: float = 5.0):
        self.limit = limit  # <= 0: no limit
        self.body_timeout_s = body_timeout_s  # <= 0: no deadline
        self.inflight = 0  # requests on our routes, at any stage, body still arriving included: the drain waits for them
        self.admitted = 0  # requests holding an inference slot (their body complete): the limit counts these
        self.refused = 0
        self.draining = False

    @classmethod
    def from_settings(cls, max_concurrency: int, workers: int, body_timeout_s: float = 5.0) -> "Traffic":
        return cls(-(-max_concurrency // max(1, workers)) if max_concurrency > 0 else 0, body_timeout_s)

    def admit(self) -> bool:
        """Take a slot; False (and counted as refused) when every slot is taken."""
        if 0 < self.limit <= self.admitted:
            self.refused += 1
            return False
        self.admitted += 1
        return True

    def overloaded(self) -> OverloadedError:
        return OverloadedError(f"too many requests in flight on this worker (limit {self.limit}); retry shortly")


def _request_id(scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return request_id_from(value.decode("latin-1"))
    return request_id_from(None)


class Admission:
    """ASGI middleware: count requests in flight; admit each to a slot once its body is complete and
    within the body deadline (the module docstring says why); refuse beyond the limit with 429.
    Health paths are exempt."""

    def __init__(self, app, traffic: Traffic, bypass: frozenset[str] = HEALTH_PATHS):
        self.app, self.traffic, self.bypass = app, traffic, bypass

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.bypass:
            return await self.app(scope, receive, send)
        t = self.traffic
        if scope["method"] in BODYLESS:
            if not t.admit():
                rid = _request_id(scope)
                ERRORS.labels("429").inc()
                response = json_response({"error": str(t.overloaded()), "request_id": rid}, 429,
                                         {"Retry-After": "1", "X-Request-ID": rid})
                return await response(scope, receive, send)
            slot = _Slot(t, send, admitted=True)
        else:
            slot = _Slot(t, send, admitted=False)
            receive = _BodyReceive(receive, t, slot)
        t.inflight += 1
        try:
            await self.app(scope, receive, slot.send)
        finally:
            t.inflight -= 1
            slot.release()


class _Slot:
    """A request's inference slot: taken when its body is complete (`_BodyReceive`), given back as soon
    as its response starts (the work is done then) or when the request ends, whichever comes first.
    A client that does not read its answer stalls only its own `send` (uvicorn waits for the socket to
    drain), never a slot: 64 such clients used to hold every slot like 64 slow bodies did."""

    __slots__ = ("traffic", "_send", "admitted")

    def __init__(self, traffic: Traffic, send, admitted: bool):
        self.traffic, self._send, self.admitted = traffic, send, admitted

    def release(self) -> None:
        if self.admitted:
            self.admitted = False
            self.traffic.admitted -= 1

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.release()
        await self._send(message)


class _BodyReceive:
    """A request's `receive` while its body arrives: the body deadline on every wait, then the slot
    when the last chunk is in. After that, a plain pass-through (disconnect notices have no deadline)."""

    __slots__ = ("receive", "traffic", "slot", "deadline", "received", "done")

    def __init__(self, receive, traffic: Traffic, slot: _Slot):
        self.receive, self.traffic, self.slot = receive, traffic, slot
        timeout = traffic.body_timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout if timeout > 0 else None
        self.received, self.done = 0, False

    async def __call__(self):
        if self.done:
            return await self.receive()
        if self.deadline is None:
            message = await self.receive()
        else:
            try:
                async with asyncio.timeout_at(self.deadline):
                    message = await self.receive()
            except TimeoutError:
                raise RequestTimeoutError(
                    f"expected the whole request body within {self.traffic.body_timeout_s:g} s (FUSION_BODY_TIMEOUT_S); "
                    f"got {self.received} bytes by then") from None
        if message["type"] == "http.request" and message.get("more_body", False):
            self.received += len(message.get("body", b""))
            return message
        self.done = True
        if message["type"] == "http.request":  # the body is complete: now it needs a slot
            if not self.traffic.admit():
                raise self.traffic.overloaded()
            self.slot.admitted = True
        return message


async def off_loop(nbytes: int, fn, *args):
    """`fn(*args)` (a parse of an `nbytes` body): inline up to INLINE_PARSE_BYTES, else in a worker
    thread, so that the event loop keeps serving while a large body is parsed and checked."""
    if nbytes <= INLINE_PARSE_BYTES:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def install_drain(traffic: Traffic, min_s: float = 0.0, max_s: float = 30.0) -> bool:
    """In a server worker's main thread, wrap uvicorn's SIGTERM handler with the drain described above
    (`min_s`, `max_s`: FUSION_DRAIN_S and FUSION_DRAIN_MAX_S, from service/config.py)."""
    from bentoml import server_context

    if server_context.worker_index is None or threading.current_thread() is not threading.main_thread():
        return False  # in-process use (tests, TestClient): leave signals alone
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return False

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
