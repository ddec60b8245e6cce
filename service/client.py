"""A small typed Python client for the JSON API: `/predict`, `/feedback`, `/ab/report`, `/info`.

    from service.client import FusionClient

    with FusionClient("http://localhost:3000", token=TOKEN) as client:
        p = client.predict([[0.0] * 64])
        client.feedback(p.feedback_id, label=p.predictions[0])

Torch-free and light: it needs httpx only, which every install that serves already has (bentoml
depends on it). `AsyncFusionClient` is the same client for asyncio.

Retries: 429 (this worker's in-flight slots are all taken) and 503 (no bundle loaded yet, a member
failed under the strict policy) are answered before anything is recorded, so the same request is
sent again, after the server's `Retry-After` (seconds or an HTTP date; a short backoff without one),
each wait capped at `max_retry_wait_s` and at most `retries` times. Every other error, and the last
429/503, raises `ClientError` with the status and the server's one error shape (`error`, `request_id`).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3
DEFAULT_MAX_RETRY_WAIT_S = 10.0
BACKOFF_S = 0.25  # the first wait when the server sends no usable Retry-After; doubled each retry
_UNSET = object()  # `label` not given (None and 0 are labels a caller may mean)

# the fields of a /predict answer Prediction names; the rest (members mode, cascade) go to `extra`
_PREDICTION_FIELDS = ("predictions", "probabilities", "variant", "bundle_version", "request_id", "feedback_id")


class ClientError(Exception):
    """An error answer: the HTTP status, the server's message (`error`) and its `request_id` (quote it
    in a report: the server logs under it). `request_id` is None when the answer did not carry one."""

    def __init__(self, status: int, error: str, request_id: str | None = None):
        super().__init__(f"HTTP {status}: {error}" + (f" (request_id {request_id})" if request_id else ""))
        self.status, self.error, self.request_id = status, error, request_id


@dataclass(frozen=True)
class Prediction:
    """One `/predict` answer. `probabilities` is None for a regression bundle; `extra` holds what some
    modes add (`degraded`, `members_answered`, `members_failed`, `escalated`, `cascade`)."""

    predictions: list
    probabilities: list[list[float]] | None
    variant: str
    bundle_version: str
    request_id: str
    feedback_id: str
    extra: dict = field(default_factory=dict, hash=False)

    @classmethod
    def from_json(cls, body: dict) -> "Prediction":
        missing = [k for k in _PREDICTION_FIELDS if k != "probabilities" and k not in body]
        if missing:
            raise ClientError(200, f"expected a /predict answer with {list(_PREDICTION_FIELDS)}; got one without {missing}",
                              body.get("request_id"))
        return cls(**{k: body.get(k) for k in _PREDICTION_FIELDS},
                   extra={k: v for k, v in body.items() if k not in _PREDICTION_FIELDS})


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    json: dict | None = None


def _rows(inputs: Any) -> list:
    """Rows as JSON lists: a numpy array (or anything with `tolist`) or a sequence of sequences."""
    try:
        rows = inputs.tolist() if hasattr(inputs, "tolist") else [list(r) for r in inputs]
    except TypeError:  # not iterable, or rows that are not
        rows = None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"expected inputs as a non-empty list of rows (lists of numbers) or a 2-D array; got {inputs!r:.80}")
    return rows


def _predict_request(inputs, variant: str | None, routing_key: str | None) -> _Request:
    body: dict = {"inputs": _rows(inputs)}
    if variant is not None:
        body["variant"] = variant
    if routing_key is not None:
        body["routing_key"] = routing_key
    return _Request("POST", "/predict", body)


def _feedback_request(feedback_id: str, label, labels: Sequence | None) -> _Request:
    if (label is _UNSET) == (labels is None):
        raise ValueError("expected exactly one of label= (one row) or labels= (a list, one per row)")
    if not isinstance(feedback_id, str) or not feedback_id:
        raise ValueError(f"expected feedback_id (a string from a Prediction); got {feedback_id!r:.60}")
    body = {"feedback_id": feedback_id, **({"label": label} if label is not _UNSET else {"labels": list(labels)})}
    return _Request("POST", "/feedback", body)


def retry_after_s(response: httpx.Response, attempt: int, max_wait_s: float, now: float | None = None) -> float:
    """How long to wait before retry number `attempt` (0-based): the server's Retry-After, in seconds
    or as an HTTP date, else an exponential backoff; never negative, never more than `max_wait_s`."""
    value = (response.headers.get("retry-after") or "").strip()
    wait = None
    if value:
        try:
            wait = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                wait = when.timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError, IndexError, OverflowError):
                wait = None
    if wait is None or wait != wait:  # absent, unreadable or NaN
        wait = BACKOFF_S * 2 ** attempt
    return min(max(wait, 0.0), max_wait_s)


def _result(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer, else ClientError from the one error shape (or the raw text when a
    proxy or another server answered)."""
    rid = response.headers.get("x-request-id")
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success:
        if body is None:
            raise ClientError(response.status_code, f"expected a JSON answer; got {response.text[:200]!r}", rid)
        return body
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        raise ClientError(response.status_code, body["error"], body.get("request_id") or rid)
    raise ClientError(response.status_code, response.text[:200] or response.reason_phrase, rid)


class _Base:
    def __init__(self, url: str, token: str | None, timeout: float, retries: int, max_retry_wait_s: float):
        if retries < 0 or max_retry_wait_s < 0:
            raise ValueError(f"expected retries >= 0 and max_retry_wait_s >= 0; got {retries} and {max_retry_wait_s}")
        self.url, self.retries, self.max_retry_wait_s = url.rstrip("/"), retries, max_retry_wait_s
        self._options = {"base_url": self.url, "timeout": httpx.Timeout(timeout),
                         "headers": {"Authorization": f"Bearer {token}"} if token else {}}

    def _wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before sending again, or None: answer (or raise) now."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
            return None
        return retry_after_s(response, attempt, self.max_retry_wait_s)


class FusionClient(_Base):
    """The JSON API over one connection pool. `timeout`: seconds per HTTP exchange; `retries`: how many
    times a 429/503 is sent again (0: never); `max_retry_wait_s`: the cap on each wait. `transport`
    and `sleep` replace httpx's transport and `time.sleep` (tests, custom TLS)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep):
        super().__init__(url, token, timeout, retries, max_retry_wait_s)
        self._http = httpx.Client(transport=transport, **self._options)
        self._sleep = sleep

    def _send(self, req: _Request) -> Any:
        attempt = 0
        while True:
            response = self._http.request(req.method, req.path, json=req.json)
            wait = self._wait(response, attempt)
            if wait is None:
                return _result(response)
            self._sleep(wait)
            attempt += 1

    def predict(self, inputs, variant: str | None = None, routing_key: str | None = None) -> Prediction:
        """Predict rows (a list of lists of numbers, or a 2-D array); `variant` names one, else the A/B
        policy decides (sticky per `routing_key`)."""
        return Prediction.from_json(self._send(_predict_request(inputs, variant, routing_key)))

    def feedback(self, feedback_id: str, label=_UNSET, *, labels: Sequence | None = None) -> dict:
        """Score an earlier prediction: `label` for one row, or `labels`, one per row. Returns what was scored."""
        return self._send(_feedback_request(feedback_id, label, labels))

    def report(self) -> dict:
        """The live A/B report (`/ab/report`)."""
        return self._send(_Request("GET", "/ab/report"))

    def info(self) -> dict:
        """The served bundle (`/info`): version, input spec, classes, variants, members, routing."""
        return self._send(_Request("GET", "/info"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FusionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncFusionClient(_Base):
    """FusionClient for asyncio: the same methods, awaited, and the same retries (waits with asyncio.sleep)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S,
                 transport: httpx.AsyncBaseTransport | None = None, sleep: Callable[[float], Any] = asyncio.sleep):
        super().__init__(url, token, timeout, retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(transport=transport, **self._options)
        self._sleep = sleep

    async def _send(self, req: _Request) -> Any:
        attempt = 0
        while True:
            response = await self._http.request(req.method, req.path, json=req.json)
            wait = self._wait(response, attempt)
            if wait is None:
                return _result(response)
            await self._sleep(wait)
            attempt += 1

    async def predict(self, inputs, variant: str | None = None, routing_key: str | None = None) -> Prediction:
        return Prediction.from_json(await self._send(_predict_request(inputs, variant, routing_key)))

    async def feedback(self, feedback_id: str, label=_UNSET, *, labels: Sequence | None = None) -> dict:
        return await self._send(_feedback_request(feedback_id, label, labels))

    async def report(self) -> dict:
        return await self._send(_Request("GET", "/ab/report"))

    async def info(self) -> dict:
        return await self._send(_Request("GET", "/info"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncFusionClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
