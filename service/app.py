"""The BentoML service: endpoints only. Parsing lives in payload.py / oip.py, serving logic in
engine.py, sessions in runtime.py, the error mapping in errors.py.

Our routes are a Starlette app mounted on the service, so that every response, errors included,
has one shape (`{"error": ..., "request_id": ...}`), the body limit is enforced while reading, and
path parameters work (`/v2/models/{name}/infer`). BentoML provides `/livez`, `/readyz` (ready only
after the bundle is loaded, probed and warmed up), `/metrics`, the request timeout and the workers;
admission control and draining are ours (service/traffic.py). POST /predict and POST /feedback are
also `@bentoml.api` methods of FusionService, for BentoML's clients (/schema.json); over HTTP our
routes still answer them (TwinPaths, at the end of this module).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
from http import HTTPStatus
from typing import Awaitable, Callable

import bentoml
import numpy as np
import orjson
from bentoml.exceptions import BentoMLException
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from fusion.errors import InputError, PayloadTooLargeError, UnknownNameError
from service import config, inputs, oip, openapi, patches, payload, rollout
from service import ui  # the A/B dashboard: GET /ui
from service.engine import Engine
from service.errors import UnsupportedMediaError, error_response, json_response, request_id_from
from service.metrics import ERRORS, EndpointLabels
from service.routing import CASCADE
from service.traffic import Admission, Traffic, install_drain, off_loop

log = logging.getLogger("fusion.service")

# The one read of the settings in a server process (service/config.py): `@bentoml.service(...)` needs the
# workers, timeout, tracing and access log when the class is defined, and the admission middleware its
# limit when `routes` is built; FusionService.__init__ builds everything else from this same object.
CONFIG = config.load()

# Paths BentoML's OpenTelemetry middleware skips unless FUSION_TRACING=1: with no exporter configured
# its spans go nowhere, yet it cost 2-3x our whole echo round trip (docs/BENCHMARKS.md, "HTTP floor").
# OpenTelemetry matches each with re.search on "scheme://host/path" (no query): anchored, nothing else matches.
INFERENCE_PATHS = [rf"^[a-z]+://[^/]+{p}$" for p in ("/predict", "/echo", "/feedback", "/v2/models/[^/]+/infer",
                                                     "/v2/models/[^/]+/versions/[^/]+/infer")]
# our admission limit (per worker) and drain state: service/traffic.py says why not BentoML's max_concurrency
TRAFFIC = Traffic.from_settings(CONFIG.http.max_concurrency, CONFIG.http.workers, CONFIG.http.body_timeout_s)


def request_id(request: Request) -> str:
    return request_id_from(request.headers.get("x-request-id"))


@functools.lru_cache(maxsize=4096)
def _client_address(host: str) -> str:
    """An IPv4 address as is; an IPv6 one by its /64 (one host's usual allocation)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def client_of(request: Request, svc: "FusionService") -> str:
    """Who sent a request, for fair eviction of the records awaiting /feedback (service/feedback.py): the
    client's address and, with FUSION_INFERENCE_TOKEN set, which (checked) token it presented, as a
    digest. Behind a proxy that does not preserve addresses, its clients share one address."""
    host = _client_address(request.client.host if request.client else "")
    if svc.tokens.inference:
        token = (request.headers.get("authorization") or "").partition(" ")[2]
        return f"{host} {hashlib.sha256(token.encode()).hexdigest()[:12]}"
    return host


async def read_body(request: Request, limit: int, setting: str = "FUSION_MAX_BODY_BYTES") -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is read in full).
    The body deadline and the admission slot are taken while it is read (service/traffic.py)."""
    declared = request.headers.get("content-length")  # the server checked its syntax: digits only
    if declared is not None and declared.isascii() and declared.isdigit() and len(declared) <= 18 and int(declared) > limit:
        raise PayloadTooLargeError(f"expected a body of at most {limit} bytes ({setting}); got {declared} (Content-Length)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"expected a body of at most {limit} bytes ({setting}); got more")
        chunks.append(chunk)
    return b"".join(chunks)


def content_type(request: Request) -> str:
    """The media type, lower-cased, without parameters; "" when the header is missing."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_json(request: Request, *, admin: bool = False) -> None:
    """415 unless the Content-Type says JSON; a missing one is refused too (it used to be read as JSON,
    which let a browser page post to us with a no-cors `fetch`). Admin endpoints take
    `application/json` only (parameters such as charset aside): a browser cannot send that
    cross-origin without a CORS preflight, which we never answer, so a web page cannot drive them."""
    ctype = content_type(request)
    if ctype == "application/json" or (not admin and ctype.endswith("+json")):
        return
    raise UnsupportedMediaError(f"expected Content-Type application/json{'' if admin else ' (or another +json type)'}; "
                                f"got {ctype or 'none'}")


def service() -> "FusionService":
    return bentoml.get_current_service()


Handler = Callable[[Request, "FusionService", str], Awaitable[Response]]


def endpoint(scope: str | None):
    """Wrap a handler: request id, bearer-token check for `scope`, one error shape for every failure."""

    def deco(fn: Handler):
        @functools.wraps(fn)
        async def wrapper(request: Request) -> Response:
            rid = request_id(request)
            try:
                svc = service()
                if scope:
                    svc.tokens.check(request.headers.get("authorization"), scope,  # Host, Origin, proxy headers too
                                     request.client.host if request.client else None, request.headers)
                response = await fn(request, svc, rid)
                response.headers.setdefault("X-Request-ID", rid)
                return response
            except Exception as exc:  # noqa: BLE001 - every error leaves as one JSON object
                response = error_response(exc, rid)
                ERRORS.labels(str(response.status_code)).inc()
                return response

        return wrapper

    return deco


async def json_body(request: Request, svc: "FusionService", *, small: bool = False, admin: bool = False,
                    max_values: int | None = None) -> dict:
    """A JSON object body; `small`: capped at FUSION_MAX_SMALL_BODY_BYTES (/feedback, /admin/*);
    `max_values`: refused (413) before parsing beyond that many values (payload.check_value_count)."""
    require_json(request, admin=admin)
    if small:
        body = await read_body(request, svc.settings.max_small_body_bytes, "FUSION_MAX_SMALL_BODY_BYTES")
    else:
        body = await read_body(request, svc.settings.max_body_bytes)
    if max_values is not None:
        payload.check_value_count(body, max_values, "as /predict: FUSION_MAX_ROWS rows of the bundle's features")
    data = await off_loop(len(body), payload.parse_json, body)
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object; got {type(data).__name__}")
    return data


# ---- our JSON API ---------------------------------------------------------------------------


@endpoint("inference")
async def predict(request: Request, svc: "FusionService", rid: str) -> Response:
    if content_type(request) in inputs.IMAGE_MEDIA_TYPES:  # one image row, for a bundle whose one input is an image
        served, req = await predict_image_body(request, svc)
    else:
        require_json(request)
        body = await read_body(request, svc.settings.max_body_bytes)
        served = svc.engine.current()
        named = served.loaded.inputs  # None: the single flat input (the digits default), parsed as always
        if named is None:
            req = await off_loop(len(body), payload.parse_predict, body, served.loaded.manifest.input.n_features, svc.settings.max_rows)
        else:
            req = await off_loop(len(body), payload.parse_predict_named, body, named, svc.settings.input_limits())
    variant = req.variant or request.headers.get("x-variant") or None  # the body's field wins; "" is none
    key = req.routing_key or request.headers.get("x-routing-key") or None
    out, headers = await predict_answer(svc, served, req.X, variant, key, rid, client=client_of(request, svc),
                                        client_chose_id=rid == request.headers.get("x-request-id"))
    return json_response(out, headers=headers)


async def predict_image_body(request: Request, svc: "FusionService") -> tuple:
    """A raw image/png or image/jpeg /predict body: one row of a bundle whose one input is an image
    (service/inputs.py decodes it); variant and routing key from the X-Variant / X-Routing-Key headers."""
    body = await read_body(request, svc.settings.max_body_bytes)
    served = svc.engine.current()
    named = served.loaded.inputs
    if named is None:
        raise UnsupportedMediaError(f"expected Content-Type application/json; got {content_type(request)} (this bundle "
                                    "takes rows of features, not images)")
    feeds = await off_loop(len(body), named.parse_image_body, body, svc.settings.input_limits())
    return served, payload.PredictRequest(feeds, None, None)  # the version the image was checked against, and it


async def predict_answer(svc: "FusionService", served, X: np.ndarray, variant: str | None, key: str | None, rid: str, *,
                         client: str, client_chose_id: bool) -> tuple[dict, dict]:
    """A checked /predict request's answer (body, headers): for POST /predict and for its BentoML twin
    (FusionService.predict), so both run and format a prediction in one place."""
    result = await svc.engine.predict(X, variant=variant, key=key, request_id=rid, client=client,
                                      client_chose_id=client_chose_id, served=served)
    out = {"predictions": result.labels(), "variant": result.variant, "bundle_version": result.version, "request_id": rid,
           "feedback_id": result.extra["feedback_id"]}
    if result.task == "classification":
        out["probabilities"] = result.output
    out.update(result.extra)
    return out, {"X-Variant": result.variant, "X-Bundle-Version": result.version}


@endpoint("inference")
async def feedback(request: Request, svc: "FusionService", rid: str) -> Response:
    data = await json_body(request, svc, small=True)
    # in a thread: the shared A/B store is a database, and may wait briefly for another worker's write
    return json_response(await run_in_threadpool(feedback_answer, svc, data, rid, client=client_of(request, svc)))


def feedback_answer(svc: "FusionService", data: dict, rid: str, *, client: str) -> dict:
    """A /feedback body's answer: for POST /feedback and for its BentoML twin (FusionService.feedback).
    A field that is null counts as absent: BentoML's clients built with `service=` (as `bentoml.depends`
    builds them) send every field of the twin's signature, the unset ones as null."""
    data = {k: v for k, v in data.items() if v is not None}
    if ("feedback_id" in data) == ("request_id" in data):
        raise InputError("expected exactly one of 'feedback_id' or 'request_id' (from the /predict response)")
    id_field = "feedback_id" if "feedback_id" in data else "request_id"
    target = data[id_field]
    if not isinstance(target, str):
        raise InputError(f"expected '{id_field}' (a string from a /predict response); got {target!r:.60}")
    if ("label" in data) == ("labels" in data):
        raise InputError("expected exactly one of 'label' (one row) or 'labels' (a list, one per row)")
    labels = [data["label"]] if "label" in data else data["labels"]
    if not isinstance(labels, list) or not labels or any(isinstance(y, (list, dict)) or y is None for y in labels):
        raise InputError(f"expected 'labels' as a non-empty list of class labels; got {labels!r:.60}")
    scored = svc.engine.feedback(target, labels, client=client, by_feedback_id=id_field == "feedback_id")
    return {**scored, "request_id": rid}


@endpoint("inference")
async def ab_report(request: Request, svc: "FusionService", rid: str) -> Response:
    report = await run_in_threadpool(svc.engine.report)  # percentiles and tests: off the event loop
    return json_response({**report, "request_id": rid})


@endpoint("inference")
async def info(request: Request, svc: "FusionService", rid: str) -> Response:
    """The served bundle: version, input spec, classes, variants and members with their offline metrics, and
    each local model's effective intra-op threads and adaptive batching, and why (`tuning`: service/tuning.py)."""
    served = svc.engine.current()
    return json_response({**svc.engine.describe(served), "tuning": svc.engine.predictor.tuning(served), "request_id": rid})


@endpoint("inference")
async def echo(request: Request, svc: "FusionService", rid: str) -> Response:
    """The framework floor for benchmarks: parse and return the JSON body, no model (as many values as /predict takes)."""
    served = svc.engine.served
    limit = None
    if served is not None and served.loaded.inputs is None:
        limit = svc.settings.max_rows * served.loaded.manifest.input.n_features
    elif served is not None and served.loaded.inputs.values_per_row() is not None:
        limit = svc.settings.max_rows * served.loaded.inputs.values_per_row()
    return json_response(await json_body(request, svc, max_values=limit))


# ---- admin -----------------------------------------------------------------------------------


@endpoint("admin")
async def admin_bundle(request: Request, svc: "FusionService", rid: str) -> Response:
    data = await json_body(request, svc, small=True, admin=True)
    path = data.get("path")
    if not isinstance(path, str) or not path:
        raise InputError(f"expected 'path' to a bundle directory on the server; got {path!r:.60}")
    result = await run_in_threadpool(svc.engine.swap, path)
    return json_response({**result, "request_id": rid})


@endpoint("admin")
async def admin_routing(request: Request, svc: "FusionService", rid: str) -> Response:
    if request.method == "POST":  # in a thread: it takes a lock a hot swap also takes (never on the event loop)
        await run_in_threadpool(svc.engine.set_policy, await json_body(request, svc, small=True, admin=True))
    return json_response({**svc.engine.policy.to_dict(), "request_id": rid})


@endpoint("admin")
async def admin_rollout(request: Request, svc: "FusionService", rid: str) -> Response:
    """GET: the rollout's state; POST {"action": "pause"|"resume"|"abort"} (service/rollout.py)."""
    if request.method == "POST":  # in a thread: the state store may be a database
        data = await json_body(request, svc, small=True, admin=True)
        unknown = sorted(set(data) - {"action"})
        if unknown:
            raise InputError(f"unexpected fields {unknown}; expected only 'action' (one of {list(rollout.ACTIONS)})")
        action = data.get("action")
        if not isinstance(action, str) or action not in rollout.ACTIONS:
            raise InputError(f"expected 'action' to be one of {list(rollout.ACTIONS)}; got {action!r:.60}")
        state = await run_in_threadpool(svc.engine.rollout_action, action)
    else:
        if svc.engine.rollout is None:
            raise UnknownNameError("no rollout is configured; set FUSION_ROLLOUT (e.g. distilled:1,5,25,50,100)")
        state = await run_in_threadpool(svc.engine.rollout.state)
    return json_response({**state, "request_id": rid})


# ---- Open Inference Protocol v2 ----------------------------------------------------------------

ROUTED_MODEL = "fusion"  # the A/B-routed model; every variant is also a model of its own name


@endpoint(None)
async def v2_server(request: Request, svc: "FusionService", rid: str) -> Response:
    from fusion import __version__

    return json_response({"name": "fusion-serve", "version": __version__, "extensions": ["binary_tensor_data"]})


@endpoint(None)
async def v2_live(request: Request, svc: "FusionService", rid: str) -> Response:
    return json_response({"live": True})


@endpoint(None)
async def v2_ready(request: Request, svc: "FusionService", rid: str) -> Response:
    ready = svc.engine.ready and not TRAFFIC.draining
    return json_response({"ready": ready}, 200 if ready else 503)


def _oip_model(svc: "FusionService", request: Request):
    """(the served bundle version, the variant) for the path's OIP model; variant None routes by the
    A/B policy. The version is read once: the whole request uses it. A versioned path
    (`/v2/models/{name}/versions/{version}/...`) must name that version, a model's only one (its
    metadata lists `[bundle_version]`); any other is a 404 that says which version is served."""
    served, name = svc.engine.current(), request.path_params["name"]
    if name != ROUTED_MODEL and name not in served.names() and name != CASCADE:
        cascade = {CASCADE} if svc.engine.policy.cascade is not None else set()
        raise UnknownNameError(f"unknown model '{name}'; expected '{ROUTED_MODEL}' or one of {sorted(served.names() | cascade)}")
    version = request.path_params.get("version")
    if version is not None and version != served.version:
        raise UnknownNameError(f"model '{name}' has no version '{version:.80}'; expected '{served.version}' "
                               f"(the served bundle version, a model's only version)")
    return served, None if name == ROUTED_MODEL else name


@endpoint("inference")
async def v2_model(request: Request, svc: "FusionService", rid: str) -> Response:
    """Also `/v2/models/{name}/versions/{version}` (as v2_model_ready and v2_infer): the version is checked by _oip_model."""
    served, _ = _oip_model(svc, request)
    m = served.loaded.manifest
    return json_response(oip.metadata(request.path_params["name"], served.version, m.input.n_features,
                                      m.classes if m.task == "classification" else (),
                                      inputs=served.loaded.inputs.oip_metadata() if served.loaded.inputs else None))


@endpoint("inference")
async def v2_model_ready(request: Request, svc: "FusionService", rid: str) -> Response:
    _oip_model(svc, request)
    return json_response({"name": request.path_params["name"], "ready": True})


@endpoint("inference")
async def v2_infer(request: Request, svc: "FusionService", rid: str) -> Response:
    name = request.path_params["name"]
    served, variant = _oip_model(svc, request)  # the version the body is checked against and run on
    header_len = request.headers.get(oip.HEADER_LENGTH)
    ctype = content_type(request)  # none at all is JSON here, and only here: Triton's own client sends none (OIP needs none)
    if header_len is None:
        if ctype:
            require_json(request)
    elif ctype not in ("", "application/octet-stream", "application/json"):
        raise UnsupportedMediaError(f"expected Content-Type application/octet-stream (binary tensors) or application/json; got {ctype}")
    body = await read_body(request, svc.settings.max_body_bytes)
    if served.loaded.inputs is None:
        req = await off_loop(len(body), oip.parse, body, header_len, served.loaded.manifest.input.n_features, svc.settings.max_rows)
    else:  # named inputs: one tensor each (BYTES for encoded images and strings)
        req = await off_loop(len(body), oip.parse_named, body, header_len, served.loaded.inputs, svc.settings.input_limits())
    result = await svc.engine.predict(req.X, variant=variant, key=request.headers.get("x-routing-key"), request_id=rid,
                                      client=client_of(request, svc),
                                      client_chose_id=rid == request.headers.get("x-request-id"), served=served)
    extra = {"variant": result.variant, "request_id": rid, "feedback_id": result.extra["feedback_id"],
             "bundle_version": result.version}
    if "degraded" in result.extra:
        extra["degraded"] = result.extra["degraded"]
    labels = result.labels() if result.task == "classification" else None
    content, headers = oip.response(name, result.version, req, result.output, labels, extra)
    headers |= {"X-Variant": result.variant, "X-Bundle-Version": result.version}
    return Response(content, headers=headers, media_type=headers.pop("Content-Type"))


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown path 404, wrong method 405) in the one error shape too."""
    rid = request_id(request)
    ERRORS.labels(str(exc.status_code)).inc()
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}; allowed: {(exc.headers or {}).get('Allow', '?')}"
    elif exc.status_code == 404:
        message = f"no endpoint at {request.url.path}; see the README for the endpoints"
    else:
        message = str(exc.detail)
    return json_response({"error": message, "request_id": rid}, exc.status_code, {**(exc.headers or {}), "X-Request-ID": rid})


# ---- the A/B dashboard (service/ui/) ------------------------------------------------------------


@endpoint(None)
async def ui_file(request: Request, svc: "FusionService", rid: str) -> Response:
    """The dashboard's fixed static files; open, as they hold no data (the page sends the token itself)."""
    content, media = ui.asset(request.url.path)
    return Response(content, media_type=media, headers=ui.HEADERS)


@endpoint("inference")
async def ui_comparison_plot(request: Request, svc: "FusionService", rid: str) -> Response:
    """The served bundle's offline comparison plot, as read and checked when the bundle was loaded."""
    return Response(svc.engine.current().loaded.comparison_plot(), media_type="image/png", headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@endpoint(None)
async def index(request: Request, svc: "FusionService", rid: str) -> Response:
    """`GET /`: to the dashboard. It replaces BentoML's Swagger page, which lists none of these routes and loads a
    third-party script (Google Tag Manager) whatever BENTOML_DO_NOT_TRACK says; the API is in /docs.json."""
    return Response(status_code=307, headers={"Location": "/ui", "Cache-Control": "no-cache"})


@endpoint(None)
async def docs_json(request: Request, svc: "FusionService", rid: str) -> Response:
    """The OpenAPI document of these routes (service/openapi.py); BentoML's own lists none of them.
    Open, and so the same whatever tokens are set: it must not tell anyone which are."""
    served = svc.engine.served
    return json_response(openapi.document(
        n_features=served.loaded.manifest.input.n_features if served and not served.loaded.inputs else None,
        inputs=served.loaded.inputs.describe() if served and served.loaded.inputs else None, max_rows=svc.settings.max_rows,
        max_body_bytes=svc.settings.max_body_bytes, version=served.version if served else None,
    ))


class UnknownPath(Route):
    """The last route: any path nothing else serves answers 404 in the one error shape. BentoML mounts
    this app passively, so without it an unknown path falls through to BentoML's plain-text 404.
    BentoML's own paths stay BentoML's, and a known path with another method stays the router's 405."""

    BENTOML_PATHS = ("/docs.json", "/schema.json", "/livez", "/readyz", "/healthz", "/metrics")
    BENTOML_PREFIXES = ("/static_content/", "/assets/")

    def __init__(self):
        async def not_found(request: Request) -> Response:
            raise HTTPException(404)

        # every method: a function endpoint with methods=None would be GET-only, so POST /nope answered 405
        super().__init__("/{path:path}", not_found, include_in_schema=False,
                         methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])

    def matches(self, scope):
        path = scope.get("path", "")
        if scope.get("type") != "http" or path in self.BENTOML_PATHS or path.startswith(self.BENTOML_PREFIXES):
            return Match.NONE, {}
        if any(r is not self and r.matches(scope)[0] != Match.NONE for r in routes.routes):
            return Match.NONE, {}
        return super().matches(scope)


routes = Starlette(routes=[
    Route("/predict", predict, methods=["POST"]),
    Route("/feedback", feedback, methods=["POST"]),
    Route("/ab/report", ab_report, methods=["GET"]),
    Route("/info", info, methods=["GET"]),
    Route("/echo", echo, methods=["POST"]),
    Route("/admin/bundle", admin_bundle, methods=["POST"]),
    Route("/admin/routing", admin_routing, methods=["GET", "POST"]),
    Route("/admin/rollout", admin_rollout, methods=["GET", "POST"]),
    Route("/v2", v2_server, methods=["GET"]),
    Route("/v2/health/live", v2_live, methods=["GET"]),
    Route("/v2/health/ready", v2_ready, methods=["GET"]),
    Route("/v2/models/{name}", v2_model, methods=["GET"]),
    Route("/v2/models/{name}/ready", v2_model_ready, methods=["GET"]),
    Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
    # the same handlers for one version: the served bundle's (tritonclient's model_version=)
    Route("/v2/models/{name}/versions/{version}", v2_model, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/ready", v2_model_ready, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/infer", v2_infer, methods=["POST"]),
    *[Route(path, ui_file, methods=["GET"]) for path in ui.FILES],  # /ui, /ui/app.js, /ui/style.css
    Route("/ui/comparison.png", ui_comparison_plot, methods=["GET"]),
    Route("/docs.json", docs_json, methods=["GET"]),  # ours replaces BentoML's (matched first)
    Route("/", index, methods=["GET"]),  # ours replaces BentoML's Swagger page
    UnknownPath(),  # last: any other path answers 404 in the one error shape
], exception_handlers={HTTPException: http_error}, middleware=[Middleware(Admission, traffic=TRAFFIC)])


def endpoint_labels() -> EndpointLabels:
    """BentoML's HTTP metrics label a request by its route's template, an unknown path by one value,
    never by the raw path: each unknown path made ~20 new series (service/metrics.py)."""
    return EndpointLabels([r.path for r in routes.routes if not isinstance(r, UnknownPath)] + list(UnknownPath.BENTOML_PATHS),
                          UnknownPath.BENTOML_PREFIXES)


@bentoml.service(
    name="fusion_serve",
    workers=CONFIG.http.workers,
    traffic={"timeout": CONFIG.http.timeout_s},  # the concurrency limit is ours (TRAFFIC), not BentoML's
    **({} if CONFIG.http.tracing else {"tracing": {"excluded_urls": INFERENCE_PATHS}}),
    **({} if CONFIG.http.access_log else {"logging": {"access": {"enabled": False}}}),
)
@bentoml.asgi_app(routes, path="/")
class FusionService:
    """Serves a fusion bundle: the fused ensemble, its members, and merged/distilled variants, A/B-routed."""

    def __init__(self, cfg: config.ServiceConfig | None = None) -> None:
        cfg = cfg or CONFIG  # the settings the class was defined with (tests may pass their own)
        if logging.getLogger("fusion").level == logging.NOTSET:  # BentoML leaves the root at WARNING: our INFO lines were lost
            logging.getLogger("fusion").setLevel(cfg.http.log_level)
        # BentoML's timeout and metrics middleware fixed, after checking the installed version (service/patches.py);
        # idempotent, and before any request: BentoML builds this instance before the worker serves
        patches.apply(endpoint_labels())
        self.cfg = cfg  # the whole ServiceConfig (service/config.py)
        self.settings = cfg.http
        self.tokens = cfg.tokens
        self.engine = Engine(cfg.engine, cfg.routing, runtime=cfg.runtime, load_limits=cfg.load_limits, rollout=cfg.rollout,
                             remote=cfg.remote)
        self.engine.start()  # a bundle that fails to load leaves the service up and not ready
        # the admission middleware was built with the import-time settings; this instance's own rule
        limits = Traffic.from_settings(cfg.http.max_concurrency, cfg.http.workers, cfg.http.body_timeout_s)
        TRAFFIC.limit, TRAFFIC.body_timeout_s = limits.limit, limits.body_timeout_s
        # SIGTERM: readiness 503 while in-flight requests finish (service/traffic.py)
        install_drain(TRAFFIC, cfg.http.drain_s, cfg.http.drain_max_s)
        if not self.settings.tracing:
            log.info("OpenTelemetry spans are off on the inference paths (set FUSION_TRACING=1 to trace them)")

    def __is_ready__(self) -> bool:
        return self.engine.ready and not TRAFFIC.draining

    @bentoml.on_shutdown
    def close_ab_store(self) -> None:
        """SIGTERM: write the A/B observations still queued to the shared store (service/abstore.py)."""
        self.engine.stats.close()

    @bentoml.on_shutdown
    def stop_rollout(self) -> None:
        """SIGTERM: stop the rollout's evaluator (service/rollout.py); the stored stage stays for the other workers."""
        if self.engine.rollout is not None:
            self.engine.rollout.stop()

    # ---- BentoML's clients: twins of POST /predict and POST /feedback -------------------------------
    # They put the two endpoints in /schema.json, so that bentoml.SyncHTTPClient / AsyncHTTPClient,
    # `bentoml.depends` and the BentoCloud playground can call them. Over HTTP, TwinPaths (below) hands
    # their paths to our routes: same handler, limits, token check, admission and answers. These bodies
    # run only for in-process calls (`FusionService().predict(...)`), through the same parser and the
    # same predict_answer / feedback_answer.

    @bentoml.api(route="/predict")
    async def predict(self, inputs: list[list[float]], variant: str | None = None,
                      routing_key: str | None = None) -> dict:
        """Predict a batch (POST /predict): `inputs` rows of the bundle's features; `variant` pins one,
        `routing_key` routes sticky by key. Errors: a BentoMLException by status (InvalidArgument 400,
        NotFound 404, ...) whose message is the `{"error", "request_id"}` body."""
        rid = request_id_from(None)
        try:  # the very parser POST /predict uses: same checks, limits and messages
            body = orjson.dumps({"inputs": inputs, "variant": variant, "routing_key": routing_key},
                                option=orjson.OPT_SERIALIZE_NUMPY)
            served = self.engine.current()
            if served.loaded.inputs is not None:  # named inputs (service/inputs.py)
                req = await off_loop(len(body), payload.parse_predict_named, body, served.loaded.inputs,
                                     self.settings.input_limits())
            else:
                req = await off_loop(len(body), payload.parse_predict, body, served.loaded.manifest.input.n_features,
                                     self.settings.max_rows)
            out, _ = await predict_answer(self, served, req.X, req.variant, req.routing_key, rid, client=IN_PROCESS,
                                          client_chose_id=False)
            return orjson.loads(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY))  # the values an HTTP client gets
        except Exception as exc:  # noqa: BLE001 - as the endpoint wrapper: one shape, by status
            raise bentoml_error(exc, rid) from None

    @bentoml.api(route="/feedback")
    async def feedback(self, feedback_id: str | None = None, request_id: str | None = None,
                       label: int | float | str | None = None, labels: list[int | float | str] | None = None) -> dict:
        """Label a /predict answer (POST /feedback): exactly one of `feedback_id` (from the answer) or
        `request_id`, and exactly one of `label` (one row) or `labels` (one per row)."""
        rid = request_id_from(None)
        try:
            return await run_in_threadpool(feedback_answer, self, {"feedback_id": feedback_id, "request_id": request_id,
                                                                   "label": label, "labels": labels}, rid, client=IN_PROCESS)
        except Exception as exc:  # noqa: BLE001
            raise bentoml_error(exc, rid) from None


IN_PROCESS = "in-process"  # the client of an in-process call to a twin (for fair eviction of feedback records)


def bentoml_error(exc: BaseException, rid: str) -> BentoMLException:
    """A failed in-process twin call as BentoML's HTTP client reports the same failure: the
    BentoMLException subclass for the status (InvalidArgument 400, NotFound 404, ServiceUnavailable
    503, else BentoMLException with `error_code`) whose message is our error body."""
    response = error_response(exc, rid)
    ERRORS.labels(str(response.status_code)).inc()
    status = HTTPStatus(response.status_code)
    return BentoMLException.error_mapping.get(status, BentoMLException)(response.body.decode(), error_code=status)


class TwinPaths:
    """ASGI middleware (service-level, inside BentoML's timeout, metrics and access log): requests to
    the twins' paths go to our routes. BentoML's router tries its api routes before the app mounted at
    "/", so it would otherwise serve POST /predict itself: its own body parsing (no size limit), error
    bodies (`[{"error": ...}]`), no token check and no admission limit. Every method of those paths
    goes to us (GET /predict stays our 405). BentoML's CORS middleware, off unless configured, is
    inside this one and not applied to them; we answer no CORS preflight anyway (service/auth.py)."""

    def __init__(self, app, paths: frozenset[str]):
        self.app, self.paths = app, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            return await routes(scope, receive, send)
        return await self.app(scope, receive, send)


TWIN_PATHS = frozenset(m.route for m in FusionService.apis.values())  # each one of our routes (tests/test_bentoml_client.py)
FusionService.add_asgi_middleware(TwinPaths, paths=TWIN_PATHS)
