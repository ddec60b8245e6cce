"""The Open Inference Protocol's versioned model routes, through tritonclient.http's `model_version=`.

`/v2/models/{name}/versions/{version}`, `.../ready` and `.../infer` serve the same model as the
unversioned routes when `version` is the served bundle version (a model's only version: its
metadata lists `[bundle_version]`); any other version is a 404 in the one error shape that says
which version is served. Expected outputs: the bundle's ONNX files run offline (tests/reliability/bundles.py).
"""

from __future__ import annotations

import secrets

import httpx
import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.reliability import bundles  # noqa: E402
from tests.server import Server  # noqa: E402
from tests.serving_util import assert_error_shape  # noqa: E402

pytestmark = pytest.mark.server

TOKEN = "oipv-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ATOL = 1e-5
WRONG = "0123456789ab"  # a well-formed version that is not the served one


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("oip-versions") / "bundle"
    bundles.make_bundle(out, seed=3)
    return out


@pytest.fixture(scope="module")
def version(bundle) -> str:
    return bundles.version_of(bundle)


@pytest.fixture(scope="module")
def server(bundle):
    with Server(bundle, env={"FUSION_INFERENCE_TOKEN": TOKEN, "FUSION_AB_WEIGHTS": "ensemble=1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def triton(server):
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=30, network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def infer(triton, model, X, version=""):
    inp = tritonhttp.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X, binary_data=True)
    outputs = [tritonhttp.InferRequestedOutput("probabilities", binary_data=True),
               tritonhttp.InferRequestedOutput("label", binary_data=False)]
    return triton.infer(model, [inp], outputs=outputs, model_version=version, headers=dict(AUTH))


def test_versioned_metadata_and_readiness(triton, version):
    for model in ("fusion", "ensemble", "members", "mlp_0"):
        meta = triton.get_model_metadata(model, model_version=version, headers=dict(AUTH))
        assert meta["name"] == model and meta["versions"] == [version], meta
        assert meta == triton.get_model_metadata(model, headers=dict(AUTH))
        assert triton.is_model_ready(model, model_version=version, headers=dict(AUTH)) is True
        assert triton.is_model_ready(model, model_version=WRONG, headers=dict(AUTH)) is False


def test_versioned_infer_equals_the_offline_model(triton, bundle, version):
    X = bundles.digits_like(12, seed=5)
    for model in ("ensemble", "mlp_1"):
        res = infer(triton, model, X, version)
        body = res.get_response()
        assert body["model_name"] == model and body["model_version"] == version, body
        assert body["parameters"]["bundle_version"] == version and body["parameters"]["variant"] == model
        ref = bundles.offline(bundle, model, X)
        np.testing.assert_allclose(res.as_numpy("probabilities"), ref, atol=ATOL)
        assert res.as_numpy("label").tolist() == ref.argmax(-1).tolist()
        np.testing.assert_array_equal(res.as_numpy("probabilities"), infer(triton, model, X).as_numpy("probabilities"))
    routed = infer(triton, "fusion", X, version).get_response()  # the A/B-routed model, all weight on ensemble
    assert routed["model_name"] == "fusion" and routed["parameters"]["variant"] == "ensemble"


def test_a_wrong_version_is_404_naming_the_served_one(triton, http, version):
    X = bundles.digits_like(2)
    for call in (lambda: infer(triton, "ensemble", X, WRONG),
                 lambda: triton.get_model_metadata("ensemble", model_version=WRONG, headers=dict(AUTH))):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "404", (err.value.status(), err.value.message())
        assert WRONG in err.value.message() and version in err.value.message(), err.value.message()
    body = {"inputs": [{"name": "input", "shape": [1, bundles.N_FEATURES], "datatype": "FP32", "data": X[0].tolist()}]}
    for r in (http.get(f"/v2/models/ensemble/versions/{WRONG}"), http.get(f"/v2/models/ensemble/versions/{WRONG}/ready"),
              http.post(f"/v2/models/ensemble/versions/{WRONG}/infer", json=body)):
        err = assert_error_shape(r, 404)
        assert WRONG in err["error"] and version in err["error"], err
    # an unknown model is still named as such, whatever the version
    err = assert_error_shape(http.get(f"/v2/models/no_such_model/versions/{version}"), 404)
    assert "no_such_model" in err["error"], err
    # the versioned routes need the token as the others do
    with httpx.Client(base_url=http.base_url, timeout=10) as anonymous:
        assert_error_shape(anonymous.get(f"/v2/models/ensemble/versions/{version}"), 401)
        assert_error_shape(anonymous.post(f"/v2/models/ensemble/versions/{version}/infer", json=body), 401)


def test_versioned_routes_are_labelled_by_template_in_metrics(http, version):
    """BentoML's HTTP metrics label the versioned routes by their templates: no version string a client
    sends becomes a label value (service/metrics.py)."""
    tag = "zz" + secrets.token_hex(6)
    assert http.get(f"/v2/models/ensemble/versions/{tag}/ready").status_code == 404
    assert http.get(f"/v2/models/ensemble/versions/{version}/ready").status_code == 200
    text = http.get("/metrics").text
    assert 'endpoint="/v2/models/{name}/versions/{version}/ready"' in text, "expected the route template as the label"
    assert tag not in text, f"expected no client-sent version in /metrics; found '{tag}'"


def test_versioned_routes_are_in_the_openapi_document_and_off_the_trace_paths():
    import re

    from service import openapi
    from service.app import INFERENCE_PATHS, UnknownPath, routes

    doc = openapi.document(n_features=64, max_rows=8, max_body_bytes=1 << 20, version="v")
    served = {r.path for r in routes.routes if not isinstance(r, UnknownPath) and r.path.startswith("/v2/models/")}
    assert {"/v2/models/{name}/versions/{version}", "/v2/models/{name}/versions/{version}/ready",
            "/v2/models/{name}/versions/{version}/infer"} <= served and served <= set(doc["paths"]), (served, sorted(doc["paths"]))
    for path in served:
        for op in doc["paths"][path].values():
            names = [p["name"] for p in op["parameters"] if p["in"] == "path"]
            assert names == re.findall(r"\{(\w+)\}", path), (path, names)
    # OpenTelemetry skips every inference route (service/app.py INFERENCE_PATHS), the versioned one too
    for url, excluded in {"/v2/models/fusion/versions/abc/infer": True, "/v2/models/fusion/versions/abc": False,
                          "/v2/models/fusion/versions/abc/ready": False, "/v2/models/f/versions/a/b/infer": False}.items():
        assert any(re.search(p, "http://h:3000" + url) for p in INFERENCE_PATHS) is excluded, url
