"""Open Inference Protocol v2 (KServe v2 / Triton REST) through a real protocol client: tritonclient.http.

The client is unchanged from PyPI: if it can talk to the service, existing KServe/Triton clients can.
Expected outputs: /predict on the same server, and the bundle's ONNX files run offline.
"""

from __future__ import annotations

import secrets

import httpx
import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.server import Server  # noqa: E402
from tests.serving_util import Oracle, assert_error_shape, rows_json  # noqa: E402

pytestmark = pytest.mark.server

TOKEN = "oip-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ATOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_bundle):
    env = {"FUSION_AB_WEIGHTS": "ensemble=0.5,mlp_0=0.5", "FUSION_INFERENCE_TOKEN": TOKEN, "FUSION_MAX_ROWS": "128"}
    with Server(tiny_bundle, env=env) as srv:
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


@pytest.fixture(scope="module")
def oracle(tiny_bundle):
    return Oracle(tiny_bundle)


@pytest.fixture(scope="module")
def X(digits):
    return np.ascontiguousarray(digits.X_test[:40], dtype=np.float32)


def infer(triton, model, X, *, binary_in, binary_out, headers=AUTH, datatype="FP32", request_id=""):
    inp = tritonhttp.InferInput("input", list(X.shape), datatype)
    inp.set_data_from_numpy(X, binary_data=binary_in)
    outputs = [tritonhttp.InferRequestedOutput("probabilities", binary_data=binary_out),
               tritonhttp.InferRequestedOutput("label", binary_data=binary_out)]
    # a copy: tritonclient writes Inference-Header-Content-Length into the dict it is given
    return triton.infer(model, [inp], outputs=outputs, headers=dict(headers), request_id=request_id)


def test_server_live_ready_and_metadata(triton, server):
    assert triton.is_server_live() is True
    assert triton.is_server_ready() is True
    meta = triton.get_server_metadata()
    assert meta["name"] == "fusion-serve" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(triton, oracle):
    n_features = oracle.manifest["input"]["shape"][1]
    n_classes = len(oracle.classes)
    for model in ["fusion", "ensemble", "members", *oracle.members, *oracle.manifest["variants"]]:
        meta = triton.get_model_metadata(model, headers=dict(AUTH))
        assert meta["name"] == model and meta["versions"] == [oracle.version]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, n_features]}]
        outs = {o["name"]: o for o in meta["outputs"]}
        assert outs["probabilities"]["shape"] == [-1, n_classes] and outs["label"]["datatype"] == "INT64"
        assert triton.is_model_ready(model, headers=dict(AUTH)) is True
    assert triton.is_model_ready("no_such_model", headers=dict(AUTH)) is False


@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_infer_json_and_binary_tensors_equal_predict(triton, http, oracle, X, binary_in, binary_out):
    res = infer(triton, "ensemble", X, binary_in=binary_in, binary_out=binary_out, request_id="req-7")
    probs, labels = res.as_numpy("probabilities"), res.as_numpy("label")
    assert probs.dtype == np.float32 and probs.shape == (len(X), len(oracle.classes))
    body = res.get_response()
    assert body["model_name"] == "ensemble" and body["model_version"] == oracle.version and body["id"] == "req-7"
    assert body["parameters"]["variant"] == "ensemble" and body["parameters"]["request_id"]
    ref = http.post("/predict", json={"inputs": rows_json(X)}, headers={"X-Variant": "ensemble"}).json()
    np.testing.assert_allclose(probs, ref["probabilities"], atol=ATOL)
    np.testing.assert_allclose(probs, oracle("ensemble", X), atol=ATOL)
    assert labels.tolist() == ref["predictions"]


def test_every_variant_and_member_is_a_model(triton, oracle, X):
    for model in [*oracle.manifest["variants"], *oracle.members]:
        res = infer(triton, model, X[:8], binary_in=True, binary_out=True)
        np.testing.assert_allclose(res.as_numpy("probabilities"), oracle(model, X[:8]), atol=ATOL)
        assert res.get_response()["parameters"]["variant"] == model
    res = infer(triton, "members", X[:8], binary_in=True, binary_out=False)
    np.testing.assert_allclose(res.as_numpy("probabilities"), oracle.soft_vote(oracle.members, X[:8]), atol=ATOL)
    assert res.get_response()["parameters"]["degraded"] is False


def test_routed_model_follows_the_routing_key(triton, http, X):
    """Model "fusion" is A/B-routed: with X-Routing-Key it picks what /predict picks for that key."""
    seen = set()
    for i in range(30):
        key = {"X-Routing-Key": f"oip-user-{i}"}
        res = infer(triton, "fusion", X[:2], binary_in=True, binary_out=True, headers={**AUTH, **key})
        ref = http.post("/predict", json={"inputs": rows_json(X[:2])}, headers=key).json()
        assert res.get_response()["parameters"]["variant"] == ref["variant"]
        np.testing.assert_allclose(res.as_numpy("probabilities"), ref["probabilities"], atol=ATOL)
        seen.add(ref["variant"])
    assert seen == {"ensemble", "mlp_0"}


def test_other_input_datatypes_are_converted(triton, oracle, X):
    res = infer(triton, "ensemble", X.astype(np.float64), binary_in=True, binary_out=True, datatype="FP64")
    np.testing.assert_allclose(res.as_numpy("probabilities"), oracle("ensemble", X), atol=ATOL)
    res = infer(triton, "ensemble", X.astype(np.int32), binary_in=False, binary_out=True, datatype="INT32")
    np.testing.assert_allclose(res.as_numpy("probabilities"), oracle("ensemble", X.astype(np.int32)), atol=ATOL)


def test_errors_reach_the_client_with_status_and_message(triton, X):
    cases = [
        (lambda: infer(triton, "ensemble", X[:, :10], binary_in=False, binary_out=False), "400", "features"),
        (lambda: infer(triton, "ensemble", X[:, :10], binary_in=True, binary_out=True), "400", "features"),
        (lambda: infer(triton, "ensemble", np.full((1, 64), np.nan, np.float32), binary_in=True, binary_out=True),
         "400", "finite"),
        (lambda: infer(triton, "ensemble", np.zeros((129, 64), np.float32), binary_in=True, binary_out=True), "400", "128"),
        (lambda: infer(triton, "no_such_model", X[:1], binary_in=True, binary_out=True), "404", "no_such_model"),
        (lambda: triton.get_model_metadata("no_such_model", headers=dict(AUTH)), "404", "no_such_model"),
        (lambda: infer(triton, "ensemble", X[:1], binary_in=True, binary_out=True, headers={}), "401", "Bearer"),
        (lambda: infer(triton, "ensemble", X[:1], binary_in=True, binary_out=True,
                       headers={"Authorization": "Bearer nope"}), "401", "wrong"),
    ]
    for call, status, word in cases:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == status, (status, err.value.message())
        assert word in err.value.message()


def test_error_bodies_are_one_json_object(http, X):
    base = {"name": "input", "shape": [1, 64], "datatype": "FP32"}
    for body, status in [
        ({"inputs": [{**base, "data": X[0].tolist()[:10]}]}, 400),
        ({"inputs": [{**base, "datatype": "BYTES", "data": X[0].tolist()}]}, 400),
        ({"inputs": [{**base, "shape": [1, 64, 1], "data": X[0].tolist()}]}, 400),
        ({"inputs": [{**base, "data": X[0].tolist()}, {**base, "data": X[0].tolist()}]}, 400),
        ({"inputs": [{**base, "data": X[0].tolist()}], "outputs": [{"name": "logits"}]}, 400),
        ({"inputs": []}, 400),
        ({}, 400),
    ]:
        assert_error_shape(http.post("/v2/models/ensemble/infer", json=body), status)
    strings = http.post("/v2/models/ensemble/infer", json={"inputs": [{**base, "data": ["a"] * 64}]})
    assert_error_shape(strings, 400)
    assert "expected 64 numbers in 'data' for shape [1, 64]; got 64 strings" in strings.json()["error"]
    assert_error_shape(http.post("/v2/models/nope/infer", json={}), 404)
    assert_error_shape(http.get("/v2/models/nope"), 404)
    assert_error_shape(http.get("/v2/models/nope/ready"), 404)
    # binary extension: a header length beyond the body, and missing tensor bytes
    head = b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}'
    for content, hlen in [(head, str(len(head) + 10)), (head + b"\0" * 100, str(len(head))), (head, "abc")]:
        r = http.post("/v2/models/ensemble/infer", content=content,
                      headers={"Inference-Header-Content-Length": hlen, "Content-Type": "application/octet-stream"})
        assert_error_shape(r, 400)


def test_health_is_open_but_models_need_the_token(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert_error_shape(c.get("/v2/models/fusion"), 401)
        assert_error_shape(c.get("/v2/models/fusion/ready"), 401)
