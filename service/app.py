"""The BentoML service: endpoints only. Parsing lives in payload.py, sessions in runtime.py,
the error mapping in errors.py.

Our routes are a Starlette app mounted on the service, so that every response, errors included,
has one shape (`{"error": ..., "request_id": ...}`) and the body limit is enforced while reading.
BentoML provides `/livez`, `/readyz` (ready only after the bundle is loaded and warmed up),
`/metrics` and the process model.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import dataclass

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fusion.errors import FusionError, InputError, PayloadTooLargeError
from service import payload, runtime
from service.errors import UnsupportedMediaError, error_response, json_response

log = logging.getLogger("fusion.service")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
INLINE_ROWS = 32  # smaller batches run on the event loop: a thread hop costs more than the model


@dataclass(frozen=True)
class Settings:
    bundle: str = "artifacts/bundle"
    max_rows: int = 1024
    max_body_bytes: int = 8 << 20
    default_variant: str = "ensemble"
    workers: int = 1
    timeout_s: float = 30.0
    max_concurrency: int = 64

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(
            bundle=env("FUSION_BUNDLE", cls.bundle),
            max_rows=int(env("FUSION_MAX_ROWS", cls.max_rows)),
            max_body_bytes=int(env("FUSION_MAX_BODY_BYTES", cls.max_body_bytes)),
            default_variant=env("FUSION_DEFAULT_VARIANT", cls.default_variant),
            workers=int(env("FUSION_WORKERS", cls.workers)),
            timeout_s=float(env("FUSION_TIMEOUT_S", cls.timeout_s)),
            max_concurrency=int(env("FUSION_MAX_CONCURRENCY", cls.max_concurrency)),
        )


SETTINGS = Settings.from_env()


def request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is read in full)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"expected a body of at most {limit} bytes; got {declared} (Content-Length)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"expected a body of at most {limit} bytes; got more")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_content_type(request: Request) -> None:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaError(f"expected Content-Type application/json; got {ctype}")


def service() -> "FusionService":
    return bentoml.get_current_service()


def format_prediction(loaded: runtime.LoadedBundle, out: np.ndarray) -> dict:
    """Model output (B, C) -> predictions (class labels) and probabilities; regression: values."""
    manifest = loaded.manifest
    if manifest.task == "regression":
        return {"predictions": out[:, 0] if out.shape[1] == 1 else out}
    labels = np.asarray(manifest.classes)[out.argmax(-1)]  # ties -> lowest class index
    return {"predictions": labels.tolist(), "probabilities": out}


async def predict(request: Request) -> Response:
    rid = request_id(request)
    svc = service()
    try:
        check_json_content_type(request)
        body = await read_body(request, svc.settings.max_body_bytes)
        data = payload.parse_json(body)
        if not isinstance(data, dict):
            raise InputError(f"expected a JSON object like {{\"inputs\": [[...], ...]}}; got {type(data).__name__}")
        unknown = sorted(set(data) - {"inputs", "variant"})
        if unknown:
            raise InputError(f"unexpected fields {unknown}; expected 'inputs' and optionally 'variant'")
        if "inputs" not in data:
            raise InputError("expected a field 'inputs' with a list of rows; got none")
        loaded = svc.holder.get()
        X = payload.rows_to_array(data["inputs"], loaded.manifest.input.n_features, svc.settings.max_rows)
        if b"true" in body or b"false" in body:
            payload.check_value_types(data["inputs"])
        variant = data.get("variant") or request.headers.get("x-variant") or svc.settings.default_variant
        if not isinstance(variant, str):
            raise InputError(f"expected 'variant' to be a string; got {type(variant).__name__}")
        model = loaded.model(variant)
        out = model(X) if len(X) <= INLINE_ROWS else await run_in_threadpool(model, X)
        body = {
            **format_prediction(loaded, out), "variant": variant,
            "bundle_version": loaded.version, "request_id": rid,
        }
        headers = {"X-Request-ID": rid, "X-Variant": variant, "X-Bundle-Version": loaded.version}
        return json_response(body, headers=headers)
    except Exception as exc:  # noqa: BLE001 - every error leaves as one JSON object
        return error_response(exc, rid)


async def info(request: Request) -> Response:
    """The served bundle: version, input spec, classes, variants and members with their offline metrics."""
    rid = request_id(request)
    try:
        loaded = service().holder.get()
        m = loaded.manifest
        entries = {
            name: {"kind": e.kind, "metrics": e.metrics, "device": loaded.models[name].device,
                   "combiner": e.combiner, "method": e.method, "n_parameters": e.n_parameters}
            for name, e in m.entries().items()
        }
        return json_response({
            "bundle_version": m.bundle_version, "created": m.created, "task": m.task,
            "input": {"name": m.input.name, "shape": m.input.shape, "dtype": m.input.dtype,
                      "scaling": m.input.scaling["kind"]},
            "classes": list(m.classes), "variants": {k: entries[k] for k in m.variants},
            "members": {k: entries[k] for k in m.members}, "request_id": rid,
        })
    except Exception as exc:  # noqa: BLE001
        return error_response(exc, rid)


routes = Starlette(routes=[
    Route("/predict", predict, methods=["POST"]),
    Route("/info", info, methods=["GET"]),
])


@bentoml.service(
    name="fusion_serve",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
)
@bentoml.asgi_app(routes, path="/")
class FusionService:
    """Serves a fusion bundle: the fused ensemble, its members, and merged/distilled variants."""

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.holder = runtime.BundleHolder()
        try:
            loaded = runtime.load(self.settings.bundle)
        except (FusionError, OSError) as exc:
            # stay up but not ready: /readyz answers 503 and /predict names the reason
            self.holder.error = str(exc)
            log.error("could not load bundle %s: %s", self.settings.bundle, exc)
            return
        self.holder.swap(loaded)
        log.info("serving bundle %s (%s) with %d models", loaded.version, self.settings.bundle, len(loaded.models))

    def __is_ready__(self) -> bool:
        return self.holder.current is not None
