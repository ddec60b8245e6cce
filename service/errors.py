"""The one place where domain errors become HTTP responses: status code + one `{"error": ...}` object.

The service's own error classes (below, and UnsafeModelError in onnx_check.py) are drawn with the
rest of the tree, and the status each gets here, in fusion/errors.py's docstring; a test checks it.
"""

from __future__ import annotations

import logging
import os
import re

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from fusion.errors import (
    BundleError, FusionError, InputError, PayloadTooLargeError, UnavailableError, UnknownNameError,
)

log = logging.getLogger("fusion.service")


class AuthError(FusionError):
    """Missing or wrong bearer token (401), or a token without the needed scope (403)."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


class UnsupportedMediaError(InputError):
    """A request body of a content type the endpoint does not accept (415)."""


class NonFiniteOutputError(InputError):
    """A variant that answered NaN/Inf on the client's (finite) rows: 400, as the input is outside what the
    model handles, yet counted against the variant by Engine.predict (the rollout's error-rate guardrail),
    unlike other InputErrors: a candidate that overflows where the baseline does not is what it must catch."""


class DeadlineError(UnavailableError):
    """A member or a request that ran past its deadline (504)."""


class RequestTimeoutError(InputError):
    """A request body that did not arrive within the body deadline, FUSION_BODY_TIMEOUT_S (408; the
    connection is closed, as the rest of the body may still be on its way)."""


class OverloadedError(UnavailableError):
    """Every inference slot of this worker is taken (429 with Retry-After): service/traffic.py."""


# Most specific first: the first matching class decides the status.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (PayloadTooLargeError, 413),
    (UnsupportedMediaError, 415),
    (RequestTimeoutError, 408),
    (UnknownNameError, 404),
    (InputError, 400),
    (ClientDisconnect, 400),  # the client left mid-body: its fault, not a 500 with a traceback in the log
    (DeadlineError, 504),
    (OverloadedError, 429),
    (BundleError, 503),
    (UnavailableError, 503),
)


def status_for(exc: BaseException) -> int:
    if isinstance(exc, AuthError):
        return exc.status
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
        media_type="application/json", headers=headers,
    )


def error_response(exc: BaseException, request_id: str, headers: dict | None = None) -> Response:
    """One JSON object `{"error": message, "request_id": id}`; never a traceback or a server path."""
    status = status_for(exc)
    if status == 500:
        log.exception("internal error in request %s", request_id, exc_info=exc)
        message = "internal server error; the server log has the details under this request_id"
    else:
        # a message may quote client text: never one JSON cannot carry (a lone surrogate would make this a 500)
        message = (str(exc) or type(exc).__name__).encode("utf-8", "backslashreplace").decode("utf-8")
    headers = {**(headers or {}), "X-Request-ID": request_id}
    if status in (429, 503):
        headers.setdefault("Retry-After", "1")
    if status == 408:
        headers.setdefault("Connection", "close")  # the unread rest of the body must not be taken for a next request
    return json_response({"error": message, "request_id": request_id}, status, headers)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_from(given: str | None) -> str:
    """The client's X-Request-ID when it is a safe token (≤ 64 of A-Z a-z 0-9 . _ -), else a new one:
    32 random hex digits, as uuid4().hex, about 5x cheaper. Every answer, errors included, carries it."""
    return given if given and _REQUEST_ID.match(given) else os.urandom(16).hex()
