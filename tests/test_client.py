"""service/client.py: the typed Python client.

The happy path runs against a real server (a synthetic bundle, tests/reliability/bundles.py): the
client's answers equal the raw HTTP answers and the bundle's ONNX files run offline; feedback scores
and the report counts it. The retry logic runs against httpx.MockTransport: deterministic, no sleeping
(the client's `sleep` is recorded instead), so the waits are asserted exactly.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import secrets
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from service.client import AsyncFusionClient, ClientError, FusionClient, Prediction, retry_after_s
from tests.reliability import bundles
from tests.server import ROOT, Server
from tests.serving_util import rows_json

TOKEN = "cli-" + secrets.token_hex(12)
ATOL = 1e-5


# ---- against a real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("client") / "bundle"
    bundles.make_bundle(out, seed=2)
    return out


@pytest.fixture(scope="module")
def server(bundle):
    with Server(bundle, env={"FUSION_INFERENCE_TOKEN": TOKEN, "FUSION_AB_WEIGHTS": "ensemble=0.5,mlp_0=0.5"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with FusionClient(server.url, token=TOKEN, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


@pytest.mark.server
def test_predict_equals_the_raw_answer_and_the_offline_model(client, http, bundle):
    X = bundles.digits_like(9, seed=4)
    for variant in ("ensemble", "mlp_2"):
        p = client.predict(X, variant=variant)
        raw = http.post("/predict", json={"inputs": rows_json(X), "variant": variant}).json()
        assert isinstance(p, Prediction) and p.variant == variant and p.bundle_version == bundles.version_of(bundle)
        assert p.predictions == raw["predictions"] and p.extra == {}
        np.testing.assert_allclose(p.probabilities, raw["probabilities"], atol=ATOL)
        np.testing.assert_allclose(p.probabilities, bundles.offline(bundle, variant, X), atol=ATOL)
        assert p.feedback_id and p.request_id and p.feedback_id != raw["feedback_id"]
    # a list of lists works as an array does; a routing key picks what the raw API picks for it
    assert client.predict(X.tolist(), variant="ensemble").predictions == client.predict(X, variant="ensemble").predictions
    for i in range(6):
        key = f"client-user-{i}"
        raw = http.post("/predict", json={"inputs": rows_json(X[:1]), "routing_key": key}).json()
        assert client.predict(X[:1], routing_key=key).variant == raw["variant"]
    members = client.predict(X[:3], variant="members")  # a mode's extra fields land in `extra`
    assert members.extra["degraded"] is False and sorted(members.extra["members_answered"]) == sorted(bundles.MEMBERS)


@pytest.mark.server
def test_feedback_scores_and_the_report_counts_it(client, bundle):
    before = client.report()["variants"].get("mlp_1", {}).get("labelled_rows", 0)
    X = bundles.digits_like(4, seed=8)
    p = client.predict(X, variant="mlp_1")
    scored = client.feedback(p.feedback_id, labels=p.predictions)
    assert scored["rows"] == 4 and "mlp_1" in scored["variants"], scored
    one = client.predict(X[:1], variant="mlp_1")
    client.feedback(one.feedback_id, label=one.predictions[0])
    entry = client.report()["variants"]["mlp_1"]
    assert entry["labelled_rows"] == before + 5, entry
    assert entry["accuracy"] == 1.0  # labelled with its own predictions
    with pytest.raises(ClientError) as err:  # a record is scored once
        client.feedback(one.feedback_id, label=one.predictions[0])
    assert err.value.status == 404 and err.value.request_id, err.value
    info = client.info()
    assert info["bundle_version"] == bundles.version_of(bundle) and set(info["members"]) == set(bundles.MEMBERS)


@pytest.mark.server
def test_errors_raise_client_error_with_status_message_and_request_id(client, server):
    with pytest.raises(ClientError) as err:
        client.predict([[1.0] * 10])
    assert err.value.status == 400 and "64" in err.value.error and err.value.request_id, err.value
    assert err.value.request_id in str(err.value) and "HTTP 400" in str(err.value)
    with pytest.raises(ClientError) as err:
        client.predict(bundles.digits_like(1), variant="no_such_variant")
    assert err.value.status == 404 and "no_such_variant" in err.value.error
    with FusionClient(server.url, retries=0) as anonymous, pytest.raises(ClientError) as err:
        anonymous.info()
    assert err.value.status == 401 and err.value.request_id
    with FusionClient(server.url, token="wrong", retries=0) as wrong, pytest.raises(ClientError) as err:
        wrong.report()
    assert err.value.status == 401


@pytest.mark.server
def test_async_client_against_the_server(server, bundle):
    X = bundles.digits_like(3, seed=9)

    async def run():
        async with AsyncFusionClient(server.url, token=TOKEN) as c:
            p = await c.predict(X, variant="ensemble")
            scored = await c.feedback(p.feedback_id, labels=p.predictions)
            return p, scored, await c.info()

    p, scored, info = asyncio.run(run())
    np.testing.assert_allclose(p.probabilities, bundles.offline(bundle, "ensemble", X), atol=ATOL)
    assert scored["rows"] == 3 and info["bundle_version"] == p.bundle_version


def test_the_client_imports_without_torch_or_bentoml():
    code = ("import sys, service.client; bad = sorted(m for m in ('torch', 'bentoml', 'onnxruntime', 'numpy') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"expected service.client to import none of torch/bentoml/onnxruntime/numpy; got {out.stdout}{out.stderr}"


# ---- retries, with a mock transport ------------------------------------------------------------------


OK = {"predictions": [3], "probabilities": [[0.0, 1.0]], "variant": "ensemble", "bundle_version": "v1",
      "request_id": "r-ok", "feedback_id": "f-ok"}


def error(status: int, message: str, rid: str = "r-err", **headers) -> httpx.Response:
    return httpx.Response(status, json={"error": message, "request_id": rid}, headers={"X-Request-ID": rid, **headers})


class Script:
    """A MockTransport handler answering from a list, recording each request."""

    def __init__(self, *answers: httpx.Response):
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert self.answers, f"expected no more than {len(self.requests) - 1} requests; got another to {request.url}"
        return self.answers.pop(0)


def mock_client(script: Script, **kwargs) -> tuple[FusionClient, list[float]]:
    slept: list[float] = []
    return FusionClient("http://fusion.test", token="t0k", transport=httpx.MockTransport(script), sleep=slept.append,
                        **kwargs), slept


def test_429_and_503_are_retried_after_retry_after():
    script = Script(error(429, "busy", **{"Retry-After": "1"}), error(503, "loading", **{"Retry-After": "2.5"}),
                    httpx.Response(200, json=OK))
    client, slept = mock_client(script)
    p = client.predict([[1, 2]], variant="ensemble", routing_key="k")
    assert p == Prediction(**OK) and slept == [1.0, 2.5] and len(script.requests) == 3
    for r in script.requests:  # the same request each time: JSON, the token, the body
        assert r.method == "POST" and r.url.path == "/predict"
        assert r.headers["content-type"] == "application/json" and r.headers["authorization"] == "Bearer t0k"
        assert r.read() == script.requests[0].read()
    assert json.loads(script.requests[0].read()) == {"inputs": [[1, 2]], "variant": "ensemble", "routing_key": "k"}


def test_retries_are_bounded_and_the_last_error_raises():
    script = Script(*[error(503, "no bundle loaded", rid=f"r{i}", **{"Retry-After": "1"}) for i in range(3)])
    client, slept = mock_client(script, retries=2)
    with pytest.raises(ClientError) as err:
        client.info()
    assert (err.value.status, err.value.error, err.value.request_id) == (503, "no bundle loaded", "r2")
    assert slept == [1.0, 1.0] and len(script.requests) == 3
    client, slept = mock_client(Script(error(429, "busy")), retries=0)
    with pytest.raises(ClientError) as err:
        client.report()
    assert err.value.status == 429 and slept == []


def test_waits_are_capped_and_default_to_a_backoff():
    script = Script(error(429, "busy", **{"Retry-After": "3600"}), error(429, "busy"), error(429, "busy", **{"Retry-After": "soon"}),
                    error(429, "busy", **{"Retry-After": "-5"}), httpx.Response(200, json={"ok": True}))
    client, slept = mock_client(script, retries=4, max_retry_wait_s=7.0)
    assert client.report() == {"ok": True}
    assert slept == [7.0, 0.5, 1.0, 0.0]  # capped; backoff 0.25 * 2**attempt without a usable value; never negative


def test_retry_after_as_an_http_date():
    now = time.time()
    date = email.utils.formatdate(now + 4, usegmt=True)
    wait = retry_after_s(httpx.Response(429, headers={"Retry-After": date}), 0, 60.0, now=now)
    assert 3.0 <= wait <= 4.0, wait  # the date has whole seconds
    assert retry_after_s(httpx.Response(429, headers={"Retry-After": date}), 0, 2.0, now=now) == 2.0


def test_other_errors_are_not_retried_and_carry_the_error_shape():
    for status in (400, 401, 404, 413, 415, 500, 504):
        script = Script(error(status, f"expected x; got y ({status})", rid=f"rid-{status}", **{"Retry-After": "1"}))
        client, slept = mock_client(script)
        with pytest.raises(ClientError) as err:
            client.feedback("f1", label=2)
        assert (err.value.status, err.value.error, err.value.request_id) == (status, f"expected x; got y ({status})", f"rid-{status}")
        assert slept == [] and len(script.requests) == 1
    # not our error shape (a proxy's page): the text and the header's request id
    client, _ = mock_client(Script(httpx.Response(502, text="<html>bad gateway</html>", headers={"X-Request-ID": "px"})))
    with pytest.raises(ClientError) as err:
        client.info()
    assert err.value.status == 502 and "bad gateway" in err.value.error and err.value.request_id == "px"


def test_feedback_body_and_argument_checks():
    script = Script(httpx.Response(200, json={"variants": ["ensemble"], "rows": 1}),
                    httpx.Response(200, json={"variants": ["ensemble"], "rows": 2}))
    client, _ = mock_client(script)
    client.feedback("f1", label=0)  # 0 is a label, not "no label"
    client.feedback("f2", labels=["a", "b"])
    assert [json.loads(r.read()) for r in script.requests] == [{"feedback_id": "f1", "label": 0},
                                                               {"feedback_id": "f2", "labels": ["a", "b"]}]
    for call in (lambda: client.feedback("f1"), lambda: client.feedback("f1", label=1, labels=[1]),
                 lambda: client.feedback("", label=1), lambda: client.predict([]), lambda: client.predict([1.0, 2.0]),
                 lambda: client.predict(5)):
        with pytest.raises(ValueError):
            call()
    assert len(script.requests) == 2  # nothing sent for a bad call
    with pytest.raises(ValueError):
        FusionClient("http://x", retries=-1)


def test_async_client_retries_the_same_way():
    script = Script(error(429, "busy", **{"Retry-After": "2"}), httpx.Response(200, json=OK))
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async def run():
        async with AsyncFusionClient("http://fusion.test", transport=httpx.MockTransport(script), sleep=sleep) as c:
            return await c.predict(np.zeros((1, 2), np.float32))

    assert asyncio.run(run()) == Prediction(**OK) and slept == [2.0] and len(script.requests) == 2


@pytest.mark.server
def test_the_readme_client_example_runs(server, capsys):
    """The README's Python block (HTTP API section) runs as written against a real server."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "from service.client import" in b]
    assert len(blocks) == 1, f"expected one README python block using service.client; got {len(blocks)}"
    code = blocks[0].replace("http://localhost:3000", server.url).replace("token=None", f"token={TOKEN!r}")
    exec(compile(code, "README.md", "exec"), {})
    labelled, version = capsys.readouterr().out.split()
    assert int(labelled) >= 1 and version == bundles.version_of(server.env["FUSION_BUNDLE"])
