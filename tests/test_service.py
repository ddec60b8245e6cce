"""The service through a real `bentoml serve` subprocess: predictions equal the offline graphs and
torch, variants, every bad input -> one JSON error object, limits, readiness on a corrupted bundle,
and no torch on the serving side.

One good server serves the whole module; the corrupted-bundle server starts beside it (not waited
for) so the two start-ups overlap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.server import ROOT, Server

pytestmark = pytest.mark.server

MAX_ROWS = 16
MAX_BODY = 32768
ENV = {
    "FUSION_MAX_ROWS": str(MAX_ROWS), "FUSION_MAX_BODY_BYTES": str(MAX_BODY),
    "FUSION_INTRA_OP_THREADS": "1", "FUSION_WORKERS": "1",
    "FUSION_INFERENCE_TOKEN": "", "FUSION_ADMIN_TOKEN": "",  # open endpoints, whatever the caller's env
}
TAMPERED = "members/mlp_1.onnx"


@pytest.fixture(scope="module")
def servers(tiny_bundle, tmp_path_factory):
    bad_dir = tmp_path_factory.mktemp("corrupt") / "bundle"
    shutil.copytree(tiny_bundle, bad_dir)
    target = bad_dir / TAMPERED
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x55
    target.write_bytes(bytes(data))
    bad = Server(bad_dir, env=ENV, wait_ready=False).start()
    good = None
    try:
        good = Server(tiny_bundle, env=ENV).start()
        yield good, bad
    finally:
        if good is not None:
            good.stop()
        bad.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def manifest(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def offline(tiny_bundle, manifest):
    """name -> function running that bundle file directly in onnxruntime (no service code)."""
    runs = {}
    for name, entry in {**manifest["variants"], **manifest["members"]}.items():
        sess = ort.InferenceSession(str(tiny_bundle / entry["file"]), providers=["CPUExecutionProvider"])
        runs[name] = lambda X, s=sess: s.run(None, {"input": np.ascontiguousarray(X, np.float32)})[0]
    return runs


def good_rows(digits, n=3) -> list:
    return digits.X_test[:n].tolist()


def post(client, body, headers=None, raw: bytes | None = None, content_type="application/json"):
    h = {"content-type": content_type, **(headers or {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return client.post("/predict", content=content, headers=h)


def error_of(r, status: int) -> str:
    """The response is exactly one JSON object {"error": str, "request_id": str} with `status`."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    body = json.loads(r.content)
    assert isinstance(body, dict) and set(body) == {"error", "request_id"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text and "site-packages" not in r.text
    return body["error"]


# ---------------------------------------------------------------- correct answers

def test_predictions_equal_the_offline_ensemble(client, digits, offline, manifest, tiny_zoo):
    import torch

    from fusion.ensemble import make_combiner
    from fusion.export import FusedEnsemble
    from fusion.zoo import load_zoo

    X = digits.X_test
    preds, probs = [], []
    for i in range(0, len(X), MAX_ROWS):
        r = post(client, {"inputs": X[i:i + MAX_ROWS].tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        preds += body["predictions"]
        probs += body["probabilities"]
    probs = np.asarray(probs)
    ref = offline["ensemble"](X)
    np.testing.assert_allclose(probs, ref, atol=1e-5, rtol=0)
    assert preds == [manifest["classes"][i] for i in ref.argmax(-1)]
    # and torch, independently of every ONNX file: the soft vote of the zoo's members
    zoo = {s.name: m for m, s in load_zoo(tiny_zoo)}
    names = manifest["variants"]["ensemble"]["members"]
    fused = FusedEnsemble([zoo[n] for n in names], make_combiner("soft_vote", len(names))).eval()
    with torch.no_grad():
        expected = fused(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert preds == expected.argmax(-1).tolist()
    assert (np.asarray(preds) == digits.y_test).mean() >= 0.8


def test_response_fields(client, digits, manifest):
    r = post(client, {"inputs": good_rows(digits, 2)}, headers={"x-request-id": "my-req.1"})
    assert r.status_code == 200
    body = r.json()
    assert {"predictions", "probabilities", "variant", "bundle_version", "request_id"} <= set(body)
    assert body["variant"] == "ensemble"
    assert body["bundle_version"] == manifest["bundle_version"]
    assert body["request_id"] == "my-req.1" == r.headers["x-request-id"]
    assert len(body["predictions"]) == 2 and np.asarray(body["probabilities"]).shape == (2, 10)
    np.testing.assert_allclose(np.asarray(body["probabilities"]).sum(1), 1.0, atol=1e-5)
    assert all(isinstance(p, int) for p in body["predictions"])


def test_generated_request_ids_differ(client, digits):
    a = post(client, {"inputs": good_rows(digits, 1)}).json()["request_id"]
    b = post(client, {"inputs": good_rows(digits, 1)}).json()["request_id"]
    assert a and b and a != b


def test_member_variant_by_body_field_and_header(client, digits, offline):
    X = digits.X_test[:MAX_ROWS]
    r = post(client, {"inputs": X.tolist(), "variant": "mlp_0"})
    assert r.status_code == 200 and r.json()["variant"] == "mlp_0"
    np.testing.assert_allclose(r.json()["probabilities"], offline["mlp_0"](X), atol=1e-5)
    r = post(client, {"inputs": X.tolist()}, headers={"x-variant": "cnn_0"})
    assert r.status_code == 200 and r.json()["variant"] == "cnn_0"
    np.testing.assert_allclose(r.json()["probabilities"], offline["cnn_0"](X), atol=1e-5)
    assert not np.allclose(offline["mlp_0"](X), offline["cnn_0"](X), atol=1e-3)  # the variants differ


def test_unknown_variant_is_404_json(client, digits):
    for r in (post(client, {"inputs": good_rows(digits), "variant": "no_such_model"}),
              post(client, {"inputs": good_rows(digits)}, headers={"x-variant": "no_such_model"})):
        msg = error_of(r, 404)
        assert "no_such_model" in msg and "ensemble" in msg and "mlp_0" in msg


def test_content_type_with_charset_is_json(client, digits):
    r = post(client, {"inputs": good_rows(digits)}, content_type="application/json; charset=utf-8")
    assert r.status_code == 200


# ---------------------------------------------------------------- bad input

ROW = "[" + ", ".join(["0"] * 63) + "]"  # 63 zeros: append one value to make a full row


def row_with(first: str) -> bytes:
    return f'{{"inputs": [[{first}, {ROW[1:]}]}}'.encode()


BAD = {  # name: (raw body, what the message must contain)
    "wrong width": (json.dumps({"inputs": [[0] * 63]}).encode(), "expected 64 features per row; got 63"),
    "too wide": (json.dumps({"inputs": [[0] * 65]}).encode(), "expected 64 features per row; got 65"),
    "ragged rows": (json.dumps({"inputs": [[0] * 64, [0] * 63]}).encode(), "inputs[1]: expected 64 features per row; got 63"),
    "empty row": (json.dumps({"inputs": [[]]}).encode(), "got 0"),
    "string": (json.dumps({"inputs": [["a"] * 64]}).encode(), "expected a number; got str"),
    "numeric string": (json.dumps({"inputs": [[0] * 10 + ["1.5"] + [0] * 53]}).encode(), "inputs[0][10]: expected a number; got str"),
    "boolean among numbers": (row_with("true"), "inputs[0][0]: expected a number; got boolean true"),
    "all booleans": (json.dumps({"inputs": [[False] * 64]}).encode(), "got boolean"),
    "null value": (row_with("null"), "expected a number; got null"),
    "nested list value": (row_with("[1]"), "expected a number; got list"),
    "NaN": (row_with("NaN"), "expected a finite number"),
    "Infinity": (row_with("Infinity"), "expected a finite number"),
    "-Infinity": (row_with("-Infinity"), "expected a finite number"),
    "huge 1e400": (row_with("1e400"), "expected a finite number"),
    "beyond float32 1e39": (row_with("1e39"), "within float32 range"),
    "huge integer": (row_with("1" + "0" * 40), "expected"),
    "empty list": (b'{"inputs": []}', "expected at least one row in 'inputs'; got an empty list"),
    "flat list": (json.dumps({"inputs": [0, 0, 0]}).encode(), "inputs[0]: expected a row (list) of 64 numbers; got int"),
    "rows nested too deep": (json.dumps({"inputs": [[[0] * 64]]}).encode(),
                             "inputs[0]: expected a row of 64 numbers; got a list of 1 list(s): one level of nesting too many"),
    "inputs not a list": (b'{"inputs": "0,0,0"}', "expected 'inputs' to be a list of rows of 64 numbers; got str"),
    "inputs null": (b'{"inputs": null}', "got null"),
    "missing inputs": (b'{"rows": [[0]]}', "unexpected fields ['rows']"),
    "empty object": (b"{}", "expected a field 'inputs' with a list of rows; got none"),
    "non-object body": (b"[[0, 1, 2]]", "expected a JSON object"),
    "JSON string body": (b'"hello"', "expected a JSON object"),
    "invalid JSON": (b'{"inputs": [[1, 2', "expected a JSON body; got invalid JSON"),
    "not UTF-8": (b"\xff\xfe\x00garbage", "invalid JSON"),
    "empty body": (b"", "expected a JSON body; got an empty body"),
    "too many rows": (json.dumps({"inputs": [[0] * 64] * (MAX_ROWS + 1)}).encode(),
                      f"expected at most {MAX_ROWS} rows per request; got {MAX_ROWS + 1}"),
    "variant not a string": (json.dumps({"inputs": [[0] * 64], "variant": 3}).encode(), "expected 'variant' to be a string; got int"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_400_with_one_json_object(client, case):
    raw, needle = BAD[case]
    msg = error_of(post(client, None, raw=raw), 400)
    assert needle in msg, msg
    assert "expected" in msg.lower()


def test_an_empty_variant_or_routing_key_in_the_body_is_none(client):
    """The body's field wins over the header (tests/test_serving.py); an empty string there is no choice at all."""
    row = {"inputs": [[0] * 64]}
    r = client.post("/predict", json={**row, "variant": ""}, headers={"X-Variant": "mlp_0"})
    assert r.status_code == 200 and r.json()["variant"] == "mlp_0"
    r = client.post("/predict", json={**row, "variant": "", "routing_key": ""})
    assert r.status_code == 200


def test_body_over_the_limit_is_413(client):
    raw = json.dumps({"inputs": [[1.0] * 64] * 200}).encode()
    assert len(raw) > MAX_BODY
    msg = error_of(post(client, None, raw=raw), 413)
    assert f"at most {MAX_BODY} bytes" in msg and "got" in msg
    # chunked, without a Content-Length: refused while reading
    chunks = [raw[i:i + 4096] for i in range(0, len(raw), 4096)]
    r = client.post("/predict", content=iter(chunks), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert f"at most {MAX_BODY} bytes" in error_of(r, 413)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream"])
def test_wrong_content_type_is_415(client, digits, ctype):
    msg = error_of(post(client, {"inputs": good_rows(digits)}, content_type=ctype), 415)
    assert "expected Content-Type application/json" in msg and ctype in msg


def test_server_is_healthy_after_every_bad_request(client, digits, offline):
    # run every bad case again back to back, then the service must still answer correctly
    for raw, _ in BAD.values():
        assert post(client, None, raw=raw).status_code == 400
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200
    X = digits.X_test[:5]
    r = post(client, {"inputs": X.tolist()})
    assert r.status_code == 200
    assert r.json()["predictions"] == offline["ensemble"](X).argmax(-1).tolist()


# ---------------------------------------------------------------- a corrupted bundle

def test_corrupted_bundle_is_never_ready_and_predict_names_the_file(servers):
    _, bad = servers
    bad.wait("/livez", 200)  # the process is up and answering
    deadline = time.monotonic() + 3.0
    statuses = set()
    while time.monotonic() < deadline:  # bounded poll: it must never turn ready
        statuses.add(httpx.get(bad.url + "/readyz", timeout=2.0).status_code)
        time.sleep(0.2)
    assert statuses == {503}, statuses
    r = httpx.post(bad.url + "/predict", json={"inputs": [[0] * 64]}, timeout=10.0)
    msg = error_of(r, 503)
    assert TAMPERED in msg and "sha256" in msg
    assert bad.proc.poll() is None  # stayed up, not crash-looping out


# ---------------------------------------------------------------- the serving half has no torch

def test_service_imports_no_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import service.app, sys; assert 'torch' not in sys.modules, 'torch imported'"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
