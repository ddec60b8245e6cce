"""The OpenAPI 3 document of our routes, served at `/docs.json`.

BentoML's own `/docs.json` lists only `@bentoml.api` endpoints, and this service has none: its API
is the Starlette app mounted in app.py. That mount is matched before BentoML adds its `/docs.json`
route, so app.py's `Route("/docs.json", ...)` replaces it (and the Swagger UI at `/` reads ours).

The document is built per request from the running configuration: the served bundle's feature
count, the row and body limits. It describes what the code does, errors included (every error is
`{"error", "request_id"}`), so that schema-based fuzzing (tests/reliability/test_fuzz.py) can hold
the service to it.

It is the same whether or not tokens are set (it is served to anonymous clients, who must not learn
that: issue 13, finding 13): every inference and admin operation declares the bearer scheme and its
401 (and, for admin, 403) answers; the scheme's description says when a token is actually needed.
"""

from __future__ import annotations

FLOAT32_MAX = 3.4028234663852886e38

ERROR = {
    "type": "object",
    "description": "Every 4xx/5xx from our routes. No stack trace, no server path.",
    "properties": {
        "error": {"type": "string", "description": "what was expected and what was got"},
        "request_id": {"type": "string", "description": "the request id (X-Request-ID) to quote in a report"},
    },
    "required": ["error", "request_id"],
    "additionalProperties": False,
}

_STATUS_TEXT = {
    400: "invalid input: shape, type, value or JSON; or inputs the model cannot answer finitely",
    401: "missing or wrong bearer token (where the server sets one)",
    403: "an inference token on an admin endpoint; an admin request from another Origin, or one without a token that "
         "is not from a direct local client (proxy headers, a non-loopback Host; FUSION_ADMIN_LOOPBACK=0)",
    404: "unknown variant, model, request id or path",
    405: "method not allowed on this path",
    408: "the body did not arrive within FUSION_BODY_TIMEOUT_S (the connection is closed)",
    413: "body over the limit (refused before it is read in full)",
    415: "a missing Content-Type or one other than JSON (admin endpoints: application/json only)",
    429: "too many requests in flight on this worker; retry after Retry-After seconds",
    503: "no bundle loaded yet, a member failed (strict policy), or a bundle that cannot be used",
    504: "a member missed its deadline (strict policy)",
}


def _errors(*codes: int) -> dict:
    out = {}
    for code in codes:
        resp = {"description": _STATUS_TEXT[code], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if code in (429, 503):
            resp["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
        out[str(code)] = resp
    return out


def _ok(schema: dict, description: str = "OK", extra_content: dict | None = None) -> dict:
    return {"200": {"description": description, "content": {"application/json": {"schema": schema}, **(extra_content or {})}}}


def _json_body(schema: dict, required: bool = True) -> dict:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict, required=(), additional: bool | dict = True) -> dict:
    out = {"type": "object", "properties": properties, "additionalProperties": additional}
    if required:
        out["required"] = list(required)
    return out


NUMBER = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
LABEL = {"anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "string"}]}
STR = {"type": "string"}
ANY_OBJECT = {"type": "object"}


def _named_inputs(inputs: list[dict], max_rows: int) -> dict:
    """The schema of /predict's `inputs` for a bundle with named inputs (service/inputs.Inputs.describe)."""

    def value(d: dict) -> dict:
        if d["kind"] == "text":
            strings = {"type": "array", "items": STR, "minItems": 1, "maxItems": max_rows}
            return {"anyOf": [strings, STR], "description": f"text ({d['text'].get('max_length')} tokens at most)"}
        scalar = {"bool": {"type": "boolean"}, "float32": NUMBER, "float16": {"type": "number"}}.get(
            d["dtype"], {"type": "integer"} if d["kind"] == "tensor" else NUMBER)
        for dim in reversed(d["shape"][1:]):
            scalar = {"type": "array", "items": scalar, **({"minItems": dim, "maxItems": dim} if isinstance(dim, int) else {"minItems": 1})}
        tensor = {"type": "array", "items": scalar, "minItems": 1, "maxItems": max_rows}
        if d["kind"] == "image":
            encoded = {"type": "array", "items": {"type": "string", "format": "byte"}, "minItems": 1, "maxItems": max_rows}
            return {"anyOf": [encoded, tensor], "description": "base64 PNG/JPEG images, or uint8/float pixels (batch, C, H, W)"}
        return {**tensor, "description": f"{d['dtype']} {d['shape']}"}

    named = _object({d["name"]: value(d) for d in inputs}, required=[d["name"] for d in inputs], additional=False)
    if len(inputs) == 1:  # a bundle with one input also takes its value as `inputs` itself
        return {"anyOf": [named, value(inputs[0])]}
    return named


def _predict_body(schema: dict, inputs: list[dict] | None) -> dict:
    """/predict's request body: JSON, and for a bundle whose one input is an image, a raw PNG or JPEG (one row)."""
    body = _json_body(schema)
    if inputs and len(inputs) == 1 and inputs[0]["kind"] == "image":
        raw = {"schema": {"type": "string", "format": "binary"}, "description": "one image: a row of the one input"}
        body["content"] |= {"image/png": raw, "image/jpeg": raw}
    return body


def document(*, n_features: int | None, max_rows: int, max_body_bytes: int, version: str | None,
             inputs: list[dict] | None = None) -> dict:
    """The OpenAPI 3.0 document for the current limits and served bundle (never for the tokens set);
    `inputs`: a bundle's named inputs (service/inputs.Inputs.describe), None for the flat feature rows."""
    row = {"type": "array", "items": NUMBER, "description": "one row of raw features"}
    if n_features:
        row |= {"minItems": n_features, "maxItems": n_features}
    rows = {"type": "array", "items": row, "minItems": 1, "maxItems": max_rows}
    if inputs:
        rows = _named_inputs(inputs, max_rows)
    variant_headers = {
        "X-Variant": {"schema": STR, "description": "the variant that answered"},
        "X-Bundle-Version": {"schema": STR, "description": "the bundle version that answered"},
        "X-Request-ID": {"schema": STR},
    }
    predict_request = _object({
        "inputs": rows,
        "variant": {"type": "string", "nullable": True,
                    "description": "a variant or member by name, 'members' or 'cascade'; null or \"\": the routing policy"},
        "routing_key": {"type": "string", "nullable": True, "description": "sticky assignment: the same key always gets the same variant"},
    }, required=["inputs"], additional=False)
    predict_response = _object({
        "predictions": {"type": "array", "items": LABEL},
        "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "variant": STR, "bundle_version": STR, "request_id": STR,
        "feedback_id": {"type": "string", "description": "the server's id of this answer's record: POST /feedback names it"},
        "degraded": {"type": "boolean"},
        "members_answered": {"type": "array", "items": STR},
        "members_failed": {"type": "object", "additionalProperties": STR},
        "escalated": {"type": "array", "items": {"type": "boolean"}},
        "cascade": ANY_OBJECT,
    }, required=["predictions", "variant", "bundle_version", "request_id", "feedback_id"])
    feedback_request = {
        **_object({
            "feedback_id": {"type": "string", "description": "from a /predict response: the server's id of its record"},
            "request_id": {"type": "string", "description": "from a /predict response: names the record when the server "
                           "made it, or the client's own X-Request-ID sent from the same client while unambiguous"},
            "label": LABEL,
            "labels": {"type": "array", "items": LABEL, "minItems": 1},
        }),
        "allOf": [{"oneOf": [{"required": ["feedback_id"]}, {"required": ["request_id"]}]},
                  {"oneOf": [{"required": ["label"]}, {"required": ["labels"]}]}],
    }
    routing = _object({
        "weights": {"oneOf": [{"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
                              {"type": "string", "description": "name=weight pairs, comma-separated"}]},
        "shadow": {"type": "array", "items": STR},
        "cascade": {**_object({"cheap": STR, "threshold": {"type": "number", "minimum": 0, "maximum": 1}, "fallback": STR},
                              required=["cheap", "threshold"], additional=False), "nullable": True},
    }, additional=False)
    tensor = _object({
        "name": STR,
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2},
        "datatype": {"type": "string", "enum": ["FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64",
                                                  "UINT8", "UINT16", "UINT32", "UINT64"]},
        **({"name": {"type": "string", "enum": [d["name"] for d in inputs]},  # named inputs: one tensor each, any rank
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            "datatype": {"type": "string", "enum": ["BYTES", "FP32", "FP16", "INT64", "INT32", "UINT8", "BOOL"]}}
           if inputs else {}),
        "data": {"type": "array"},
        "parameters": ANY_OBJECT,
    }, required=["name", "shape", "datatype"])
    infer_request = _object({
        "id": STR,
        "inputs": {"type": "array", "items": tensor, "minItems": len(inputs or [1]), "maxItems": len(inputs or [1])},
        "outputs": {"type": "array", "items": _object({"name": {"type": "string", "enum": ["probabilities", "label"]},
                                                       "parameters": ANY_OBJECT}, required=["name"])},
        "parameters": ANY_OBJECT,
    }, required=["inputs"])
    infer_response = _object({
        "model_name": STR, "model_version": STR, "id": STR,
        "outputs": {"type": "array", "items": _object({"name": STR, "datatype": STR,
                                                       "shape": {"type": "array", "items": {"type": "integer"}},
                                                       "data": {"type": "array"}, "parameters": ANY_OBJECT},
                                                      required=["name", "datatype", "shape"])},
        "parameters": ANY_OBJECT,
    }, required=["model_name", "outputs"])
    name_param = [{"name": "name", "in": "path", "required": True, "schema": STR,
                   "description": "'fusion' (routed by the A/B policy), a variant, a member, 'members' or 'cascade'"}]
    version_params = [*name_param, {"name": "version", "in": "path", "required": True, "schema": STR,
                                     "description": "the served bundle_version (a model's only version); any other: 404"}]
    infer_binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                                 "description": "binary tensor extension: JSON header + raw tensors"}}

    # the same whatever tokens are set: an anonymous reader must not learn which are (see the module docstring)
    inference_sec, admin_sec = [{"bearer": []}], [{"bearer": []}]
    inf_auth, adm_auth = (401,), (401, 403)
    # every route behind the admission limit can answer 429; health paths are exempt
    body_errors = (400, 408, 413, 415, 429)

    def op(summary, responses, *, security, body=None, params=None, tags=("inference",)):
        out = {"summary": summary, "tags": list(tags), "responses": responses, "security": security}
        if body:
            out["requestBody"] = body
        if params:
            out["parameters"] = params
        return out

    paths = {
        "/predict": {"post": op(
            "Predict with the routed (or the named) variant",
            {"200": {**_ok(predict_response)["200"], "headers": variant_headers},
             **_errors(*body_errors, *inf_auth, 404, 503, 504)},
            security=inference_sec, body=_predict_body(predict_request, inputs),
            params=[{"name": "X-Variant", "in": "header", "schema": STR, "required": False},
                    {"name": "X-Routing-Key", "in": "header", "schema": STR, "required": False}],
        )},
        "/feedback": {"post": op(
            "Label an earlier prediction (by its feedback_id or request_id) for live accuracy",
            {**_ok(ANY_OBJECT), **_errors(*body_errors, *inf_auth, 404, 503)},
            security=inference_sec, body=_json_body(feedback_request),
        )},
        "/ab/report": {"get": op("Live A/B comparison per variant", {**_ok(ANY_OBJECT), **_errors(429, *inf_auth)},
                                 security=inference_sec)},
        "/info": {"get": op("The served bundle: version, input, variants, members, routing",
                            {**_ok(_object({"bundle_version": STR}, required=["bundle_version"])), **_errors(429, *inf_auth, 503)},
                            security=inference_sec)},
        "/echo": {"post": op("Parse and return a JSON object (the framework floor for benchmarks)",
                             {**_ok(ANY_OBJECT), **_errors(*body_errors, *inf_auth)},
                             security=inference_sec, body=_json_body(ANY_OBJECT))},
        "/admin/bundle": {"post": op(
            "Hot swap: verify, load, probe and warm a bundle, then swap it in atomically",
            {**_ok(_object({"bundle_version": STR, "previous_version": {"type": "string", "nullable": True}, "request_id": STR},
                           required=["bundle_version", "request_id"])),
             **_errors(*body_errors, *adm_auth, 404, 503)},
            security=admin_sec, body=_json_body(_object({"path": {"type": "string", "minLength": 1}}, required=["path"])),
            tags=("admin",),
        )},
        "/admin/routing": {
            "get": op("The routing policy", {**_ok(routing), **_errors(429, *adm_auth)}, security=admin_sec, tags=("admin",)),
            "post": op("Replace (part of) the routing policy atomically", {**_ok(routing), **_errors(*body_errors, *adm_auth, 404, 503)},
                       security=admin_sec, body=_json_body(routing), tags=("admin",)),
        },
        "/admin/rollout": {
            "get": op("The progressive rollout: stage, percent, status and history", {**_ok(ANY_OBJECT), **_errors(429, *adm_auth, 404)},
                      security=admin_sec, tags=("admin",)),
            "post": op("Pause, resume or abort the progressive rollout", {**_ok(ANY_OBJECT), **_errors(*body_errors, *adm_auth, 404, 503)},
                       security=admin_sec, body=_json_body(_object({"action": {"type": "string", "enum": ["pause", "resume", "abort"]}},
                                                                   required=["action"])), tags=("admin",)),
        },
        "/v2": {"get": op("OIP server metadata", {**_ok(_object({"name": STR, "version": STR, "extensions": {"type": "array", "items": STR}},
                                                                 required=["name", "version", "extensions"])), **_errors(429)},
                          security=[], tags=("oip",))},
        "/v2/health/live": {"get": op("OIP liveness (never limited)", _ok(_object({"live": {"type": "boolean"}}, required=["live"])),
                                      security=[], tags=("health",))},
        "/v2/health/ready": {"get": op(
            "OIP readiness (never limited): 503 until the bundle is loaded and while draining",
            {**_ok(_object({"ready": {"type": "boolean"}}, required=["ready"])),
             "503": {"description": "not ready", "content": {"application/json": {"schema": _object({"ready": {"type": "boolean"}})}}}},
            security=[], tags=("health",))},
        "/v2/models/{name}": {"get": op("OIP model metadata", {**_ok(ANY_OBJECT), **_errors(429, *inf_auth, 404, 503)},
                                        security=inference_sec, params=name_param, tags=("oip",))},
        "/v2/models/{name}/ready": {"get": op("OIP model readiness",
                                              {**_ok(_object({"name": STR, "ready": {"type": "boolean"}}, required=["name", "ready"])),
                                               **_errors(429, *inf_auth, 404, 503)},
                                              security=inference_sec, params=name_param, tags=("oip",))},
        "/v2/models/{name}/infer": {"post": op(
            "OIP inference: JSON tensors (or the binary tensor extension)",
            {**_ok(infer_response, extra_content=infer_binary), **_errors(*body_errors, *inf_auth, 404, 503, 504)},
            security=inference_sec, params=name_param, body=_json_body(infer_request), tags=("oip",),
        )},
    }
    for path, methods in list(paths.items()):  # the same operations pinned to one version (tritonclient's model_version=)
        if path.startswith("/v2/models/{name}"):
            versioned = path.replace("/v2/models/{name}", "/v2/models/{name}/versions/{version}", 1)
            paths[versioned] = {method: {**o, "summary": o["summary"] + ", for the served version", "parameters": version_params}
                                for method, o in methods.items()}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "fusion-serve",
            "version": version or "no bundle loaded",
            "description": (f"Serves a fusion bundle. Limits: {max_rows} rows per request, {max_body_bytes} bytes per body. "
                            "BentoML also serves /livez, /readyz and /metrics (not listed)."),
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": ("Needed where the server sets a token: FUSION_INFERENCE_TOKEN for the inference endpoints "
                                "(the admin token is accepted there too), FUSION_ADMIN_TOKEN for the admin endpoints."),
            }},
        },
    }
