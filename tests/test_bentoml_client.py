"""BentoML's own clients against a real server: `bentoml.SyncHTTPClient(url).predict(...)`.

FusionService declares `@bentoml.api` twins of POST /predict and POST /feedback on the same paths
(service/app.py, "BentoML clients"), so `/schema.json` lists them and BentoML's clients, the
playground and `bentoml.depends` can call us; over HTTP both paths are served by our own handlers,
so a client's answer is POST /predict's answer, and its errors are ours (BentoML raises a
`BentoMLException` subclass by status whose message is our `{"error", "request_id"}` body).
Compared with the raw HTTP answer and with the bundle's ONNX files run offline.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from http import HTTPStatus

import bentoml
import httpx
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound

from tests.reliability import bundles
from tests.server import Server
from tests.serving_util import rows_json

TOKEN = "bc-" + secrets.token_hex(12)
ATOL = 1e-5

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bentoml-client") / "bundle"
    bundles.make_bundle(out, seed=3)
    return out


@pytest.fixture(scope="module")
def server(bundle):
    with Server(bundle, env={"FUSION_INFERENCE_TOKEN": TOKEN, "BENTO_CLOUD_API_KEY": ""}) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_cloud_key(monkeypatch):
    monkeypatch.delenv("BENTO_CLOUD_API_KEY", raising=False)  # BentoML's clients send it as the token when set


@pytest.fixture(scope="module")
def client(server):
    with bentoml.SyncHTTPClient(server.url, token=TOKEN, server_ready_timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


def our_error(exc: BentoMLException) -> dict:
    """BentoML's client puts the response text in the message: our one error shape."""
    body = json.loads(str(exc))
    assert set(body) == {"error", "request_id"} and body["request_id"], body
    return body


@pytest.mark.server
def test_schema_lists_the_twins_on_our_paths(server):
    schema = httpx.get(server.url + "/schema.json", timeout=10).json()
    routes = {r["name"]: r for r in schema["routes"]}
    assert {n: r["route"] for n, r in routes.items()} == {"predict": "/predict", "feedback": "/feedback"}, routes
    assert set(routes["predict"]["input"]["properties"]) == {"inputs", "variant", "routing_key"}
    assert routes["predict"]["input"]["required"] == ["inputs"]
    assert set(routes["feedback"]["input"]["properties"]) == {"feedback_id", "request_id", "label", "labels"}


def test_every_twin_path_is_one_of_our_routes_and_a_metrics_label():
    """TwinPaths hands these paths to our routes: each must be one (else BentoML's 404), with the
    method BentoML's clients use, and BentoML's metrics label it by itself (service/metrics.py)."""
    from service.app import TWIN_PATHS, FusionService, UnknownPath, endpoint_labels, routes

    assert TWIN_PATHS == {m.route for m in FusionService.apis.values()} == {"/predict", "/feedback"}
    ours = {r.path: r.methods for r in routes.routes if not isinstance(r, UnknownPath)}
    label = endpoint_labels()  # what FusionService() installs in BentoML's metrics middleware (service/patches.py)
    for path in TWIN_PATHS:
        assert "POST" in ours.get(path, ()), f"expected POST {path} among our routes; got {ours.get(path)}"
        assert label(path) == path, f"expected BentoML's metrics to label {path} as itself; got {label(path)}"


@pytest.mark.server
def test_our_handlers_serve_the_twin_paths_not_bentoml(server):
    """BentoML's router tries its api routes first; service.app.TwinPaths hands the paths to ours."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for method, headers, status in (("GET", auth, 405), ("POST", {**auth, "Content-Type": "application/vnd.bentoml+pickle"}, 415),
                                    ("POST", {"Content-Type": "application/json"}, 401)):  # no token: ours refuses first
        got = httpx.request(method, server.url + "/predict", headers=headers, content=b"{}", timeout=10)
        assert got.status_code == status and set(got.json()) == {"error", "request_id"}, (method, headers, got.text)
        assert got.headers["x-request-id"] == got.json()["request_id"]


@pytest.mark.server
def test_predict_equals_post_predict_and_the_offline_model(client, http, bundle):
    X = bundles.digits_like(7, seed=5)
    answers = {}
    for variant in ("ensemble", "mlp_2"):
        out = client.predict(inputs=rows_json(X), variant=variant)
        raw = http.post("/predict", json={"inputs": rows_json(X), "variant": variant}).json()
        assert set(out) == set(raw), (sorted(out), sorted(raw))
        assert out["variant"] == raw["variant"] == variant
        assert out["bundle_version"] == raw["bundle_version"] == bundles.version_of(bundle)
        assert out["predictions"] == raw["predictions"]
        np.testing.assert_allclose(out["probabilities"], raw["probabilities"], atol=ATOL)
        np.testing.assert_allclose(out["probabilities"], bundles.offline(bundle, variant, X), atol=ATOL)
        assert out["feedback_id"] and out["request_id"] and out["feedback_id"] != raw["feedback_id"]
        answers[variant] = out
    # positional arguments, and the routing key picks what POST /predict picks for it
    assert client.predict(rows_json(X[:2]), "ensemble")["predictions"] == answers["ensemble"]["predictions"][:2]
    for i in range(4):
        key = f"bentoml-user-{i}"
        raw = http.post("/predict", json={"inputs": rows_json(X[:1]), "routing_key": key}).json()
        assert client.predict(inputs=rows_json(X[:1]), routing_key=key)["variant"] == raw["variant"]


@pytest.mark.server
def test_feedback_scores_the_record_and_the_report_counts_it(client, http):
    before = http.get("/ab/report").json()["variants"].get("mlp_1", {}).get("labelled_rows", 0)
    X = bundles.digits_like(3, seed=6)
    out = client.predict(inputs=rows_json(X), variant="mlp_1")
    scored = client.feedback(feedback_id=out["feedback_id"], labels=out["predictions"])
    assert scored["rows"] == 3 and "mlp_1" in scored["variants"] and scored["request_id"], scored
    one = client.predict(inputs=rows_json(X[:1]), variant="mlp_1")
    client.feedback(feedback_id=one["feedback_id"], label=one["predictions"][0])
    entry = http.get("/ab/report").json()["variants"]["mlp_1"]
    assert entry["labelled_rows"] == before + 4 and entry["accuracy"] == 1.0, entry
    with pytest.raises(NotFound) as err:  # scored once: 404, as POST /feedback answers
        client.feedback(feedback_id=one["feedback_id"], label=one["predictions"][0])
    assert err.value.error_code == HTTPStatus.NOT_FOUND and "awaits its label" in our_error(err.value)["error"]


@pytest.mark.server
def test_bad_input_raises_a_bentoml_exception_with_our_message(client):
    with pytest.raises(InvalidArgument) as err:
        client.predict(inputs=[[1.0] * 10])
    assert err.value.error_code == HTTPStatus.BAD_REQUEST
    assert our_error(err.value)["error"] == f"inputs[0]: expected {bundles.N_FEATURES} features per row; got 10"
    with pytest.raises(NotFound) as err:
        client.predict(inputs=rows_json(bundles.digits_like(1)), variant="no_such_variant")
    assert "no_such_variant" in our_error(err.value)["error"]
    with pytest.raises(InvalidArgument) as err:  # neither id: the same check as POST /feedback
        client.feedback(label=1)
    assert "exactly one of 'feedback_id' or 'request_id'" in our_error(err.value)["error"]


@pytest.mark.server
def test_the_inference_token_is_required_as_on_our_routes(server):
    X = rows_json(bundles.digits_like(1))
    for token in (None, "wrong"):
        with bentoml.SyncHTTPClient(server.url, token=token, server_ready_timeout=30) as anonymous:
            with pytest.raises(BentoMLException) as err:
                anonymous.predict(inputs=X)
            assert err.value.error_code == HTTPStatus.UNAUTHORIZED, err.value
            assert "Bearer" in our_error(err.value)["error"] or "wrong bearer token" in our_error(err.value)["error"]
            with pytest.raises(BentoMLException) as err:
                anonymous.feedback(feedback_id="x", label=1)
            assert err.value.error_code == HTTPStatus.UNAUTHORIZED


@pytest.mark.server
def test_bentoml_depends_by_url(server, bundle):
    """A service with `bentoml.depends(FusionService, url=...)` (tests/bentoml_depends_app.py): BentoML's
    remote proxy validates with the twins' signatures and sends every field, unset ones as null
    (/feedback reads null as absent); its token is BENTO_CLOUD_API_KEY."""
    X = bundles.digits_like(2, seed=7)
    env = {"FUSION_DEPENDS_URL": server.url, "BENTO_CLOUD_API_KEY": TOKEN}
    with Server(None, env=env, target="tests.bentoml_depends_app:Caller") as caller:
        got = httpx.post(caller.url + "/predict_then_label", json={"inputs": rows_json(X)}, timeout=30)
    assert got.status_code == 200, got.text
    out, scored = got.json()["predict"], got.json()["feedback"]
    assert out["variant"] == "ensemble" and out["bundle_version"] == bundles.version_of(bundle)
    np.testing.assert_allclose(out["probabilities"], bundles.offline(bundle, "ensemble", X), atol=ATOL)
    assert scored["rows"] == 2 and "ensemble" in scored["variants"], scored


@pytest.mark.server
def test_async_client(server, bundle):
    X = bundles.digits_like(3, seed=8)

    async def run():
        async with bentoml.AsyncHTTPClient(server.url, token=TOKEN, server_ready_timeout=30) as c:
            out = await c.predict(inputs=rows_json(X), variant="ensemble")
            scored = await c.feedback(feedback_id=out["feedback_id"], labels=out["predictions"])
            with pytest.raises(InvalidArgument) as err:
                await c.predict(inputs=[[0.0] * 3])
            return out, scored, err.value

    out, scored, err = asyncio.run(run())
    np.testing.assert_allclose(out["probabilities"], bundles.offline(bundle, "ensemble", X), atol=ATOL)
    assert scored["rows"] == 3 and "features per row; got 3" in our_error(err)["error"]


def test_in_process_calls_run_the_same_parser_and_answer(bundle):
    """`FusionService()` in this process (BentoML calls a dependency so when it is not served apart):
    the twins' own bodies, compared with the offline model; errors as BentoML's HTTP client raises them."""
    from service import config
    from service.app import FusionService

    svc = FusionService.inner(config.load({"FUSION_BUNDLE": str(bundle)}))  # the class itself, with its own settings (no token)
    X = bundles.digits_like(3, seed=9)

    async def run():
        out = await svc.predict(inputs=X, variant="mlp_0")  # an array works too: serialised as the client would
        scored = await svc.feedback(feedback_id=out["feedback_id"], labels=out["predictions"])
        with pytest.raises(InvalidArgument) as bad:
            await svc.predict(inputs=[[1.0] * 5])
        with pytest.raises(NotFound) as unknown:
            await svc.feedback(request_id="never-served", label=1)
        return out, scored, bad.value, unknown.value

    out, scored, bad, unknown = asyncio.run(run())
    assert out["variant"] == "mlp_0" and out["bundle_version"] == bundles.version_of(bundle)
    assert isinstance(out["probabilities"], list)  # plain JSON values, as a client gets them
    np.testing.assert_allclose(out["probabilities"], bundles.offline(bundle, "mlp_0", X), atol=ATOL)
    assert scored["rows"] == 3, scored
    assert our_error(bad)["error"] == f"inputs[0]: expected {bundles.N_FEATURES} features per row; got 5"
    assert unknown.error_code == HTTPStatus.NOT_FOUND and "never-served" in our_error(unknown)["error"]
