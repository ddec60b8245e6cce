"""A/B serving through a real `bentoml serve`: keyed split, sticky keys across processes, explicit
variants, admin routing at run time, shadow (agreement, and a failing/slow shadow), cascade,
feedback -> accuracy and McNemar, auth, limits, the one error shape, and /metrics.

Every expected number comes from outside the service: the bundle's ONNX files run offline in
onnxruntime (tests/serving_util.Oracle), scipy for intervals and tests.
"""

from __future__ import annotations

import json
import secrets
import socket
import statistics
import threading
import time

import httpx
import numpy as np
import pytest
from scipy.stats import binom, binomtest

from fusion.sequential import NonInferiority, decide_paired
from tests.server import Server
from tests.serving_util import Oracle, assert_error_shape, rows_json, wait_for

pytestmark = pytest.mark.server

N_SPLIT = 5000
N_SECOND = 500  # keys replayed on the second server process
WEIGHTS = "ensemble=0.5,mlp_0=0.5"
INF_TOKEN = "inf-" + secrets.token_hex(16)
ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
WRONG_TOKEN = "wrong-" + secrets.token_hex(16)
MAX_ROWS = 64
MAX_BODY = 65536
ATOL = 1e-5


@pytest.fixture(scope="module")
def oracle(tiny_bundle):
    return Oracle(tiny_bundle)


@pytest.fixture(scope="module")
def xy(digits):
    return np.ascontiguousarray(digits.X_test, dtype=np.float32), np.asarray(digits.y_test)


@pytest.fixture(scope="module")
def server_a(tiny_bundle):
    env = {
        "FUSION_AB_WEIGHTS": WEIGHTS, "FUSION_SHADOW": "ensemble,mlp_1",
        "FUSION_INFERENCE_TOKEN": INF_TOKEN, "FUSION_ADMIN_TOKEN": ADMIN_TOKEN,
        "FUSION_MAX_ROWS": str(MAX_ROWS), "FUSION_MAX_BODY_BYTES": str(MAX_BODY),
    }
    with Server(tiny_bundle, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server_a):
    with httpx.Client(base_url=server_a.url, headers={"Authorization": f"Bearer {INF_TOKEN}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server_a):
    with httpx.Client(base_url=server_a.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def initial_policy(admin):
    r = admin.get("/admin/routing")
    assert r.status_code == 200, r.text
    body = r.json()
    return {k: body[k] for k in ("weights", "shadow", "cascade")}


@pytest.fixture
def reset_policy(admin, initial_policy):
    """Every test that touches routing starts from, and leaves, the policy the server started with."""
    assert admin.post("/admin/routing", json=initial_policy).status_code == 200
    yield
    assert admin.post("/admin/routing", json=initial_policy).status_code == 200


def report(c: httpx.Client) -> dict:
    r = c.get("/ab/report")
    assert r.status_code == 200, r.text
    return r.json()


def variant_figures(rep: dict, name: str) -> dict:
    return rep["variants"].get(name) or {"requests": 0, "rows": 0, "compared_rows": 0, "agreement_with_ensemble": None,
                                         "labelled_rows": 0}


def agree_count(entry: dict) -> int:
    return round((entry["agreement_with_ensemble"] or 0) * (entry["compared_rows"] or 0))


def keyed_run(c: httpx.Client, X: np.ndarray, n: int, prefix: str = "user-") -> list[dict]:
    """n requests of one row each, row i % len(X), routing key prefix+i; returns the parsed responses."""
    out = []
    for i in range(n):
        r = c.post("/predict", json={"inputs": rows_json(X[i % len(X)][None])}, headers={"X-Routing-Key": f"{prefix}{i}"})
        assert r.status_code == 200, (i, r.text)
        body = r.json()
        assert r.headers["x-variant"] == body["variant"]
        assert r.headers["x-request-id"] == body["request_id"]
        out.append(body)
    return out


@pytest.fixture(scope="module")
def split_run(client, xy, initial_policy):
    X, _ = xy
    t0 = time.perf_counter()
    responses = keyed_run(client, X, N_SPLIT)
    return {"responses": responses, "seconds": time.perf_counter() - t0}


# ---- routing --------------------------------------------------------------------------------------


def test_keyed_split_of_5000_requests_within_999_binomial_interval(split_run, oracle, xy):
    X, _ = xy
    responses = split_run["responses"]
    variants = [r["variant"] for r in responses]
    n = len(variants)
    lo, hi = binom.interval(0.999, n, 0.5)
    for name in ("ensemble", "mlp_0"):
        k = variants.count(name)
        assert lo <= k <= hi, (name, k, (lo, hi))
    assert set(variants) == {"ensemble", "mlp_0"}
    # every response: a unique request id, the served version, and the chosen variant's offline output
    assert len({r["request_id"] for r in responses}) == n
    assert {r["bundle_version"] for r in responses} == {oracle.version}
    expected = {name: oracle(name, X) for name in ("ensemble", "mlp_0")}
    got = np.array([r["probabilities"][0] for r in responses])
    want = np.array([expected[v][i % len(X)] for i, v in enumerate(variants)])
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert [r["predictions"][0] for r in responses] == oracle.labels(want)


def test_shadow_agreement_of_the_split_run_in_report(client, split_run, oracle, xy):
    """The mlp_0-routed requests of the split were shadowed by the ensemble: agreement equals offline."""
    X, _ = xy
    responses = split_run["responses"][:N_SPLIT]
    idx = [i % len(X) for i, r in enumerate(responses) if r["variant"] == "mlp_0"]
    ens, m0 = oracle.labels(oracle("ensemble", X)), oracle.labels(oracle("mlp_0", X))
    expected_agree = sum(ens[i] == m0[i] for i in idx)

    def settled():
        rep = report(client)
        entry = variant_figures(rep, "mlp_0")
        return rep if entry["compared_rows"] >= len(idx) or rep["shadow_failures"] else None

    rep = wait_for(settled, what="shadow runs of the split")
    assert rep["shadow_failures"] == {}
    entry = rep["variants"]["mlp_0"]
    # runs right after the split: no other mlp_0 traffic has been shadowed yet
    assert entry["compared_rows"] == len(idx)
    assert agree_count(entry) == expected_agree
    assert entry["requests"] >= len(idx) and entry["latency_ms"]["p50"] > 0


def test_same_key_same_variant_again_and_in_a_second_server_process(split_run, client, tiny_bundle, xy):
    X, _ = xy
    first = [r["variant"] for r in split_run["responses"][:N_SECOND]]
    again = [r["variant"] for r in keyed_run(client, X, 200)]
    assert again == first[:200]
    # a separate server process (its own BentoML home; no tokens) routes every key identically
    with Server(tiny_bundle, env={"FUSION_AB_WEIGHTS": WEIGHTS}) as other, httpx.Client(base_url=other.url, timeout=30) as c2:
        second = [r["variant"] for r in keyed_run(c2, X, N_SECOND)]
    assert second == first


def test_explicit_variant_by_header_and_body(client, oracle, xy):
    X, _ = xy
    rows = rows_json(X[:5])
    for name in ("ensemble", "mlp_0", "mlp_1", "mlp_2", "cnn_0", "members"):
        by_header = client.post("/predict", json={"inputs": rows}, headers={"X-Variant": name, "X-Routing-Key": "user-0"})
        by_body = client.post("/predict", json={"inputs": rows, "variant": name})
        for r in (by_header, by_body):
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["variant"] == name == r.headers["x-variant"]
            assert r.headers["x-bundle-version"] == body["bundle_version"] == oracle.version
            ref = oracle.soft_vote(oracle.members, X[:5]) if name == "members" else oracle(name, X[:5])
            np.testing.assert_allclose(body["probabilities"], ref, atol=ATOL)
            assert body["predictions"] == oracle.labels(ref)
    # the body's field wins over the header; an explicit choice wins over the routing key
    r = client.post("/predict", json={"inputs": rows, "variant": "mlp_1"}, headers={"X-Variant": "mlp_2"})
    assert r.json()["variant"] == "mlp_1"
    r = client.post("/predict", json={"inputs": rows, "routing_key": "user-0", "variant": "cnn_0"})
    assert r.json()["variant"] == "cnn_0"


def test_routing_key_in_body_equals_header(client, split_run, xy):
    X, _ = xy
    for i in range(20):
        r = client.post("/predict", json={"inputs": rows_json(X[:1]), "routing_key": f"user-{i}"})
        assert r.json()["variant"] == split_run["responses"][i]["variant"]


def test_unknown_variant_is_404_and_names_the_choices(client, xy):
    X, _ = xy
    r = client.post("/predict", json={"inputs": rows_json(X[:1])}, headers={"X-Variant": "nope"})
    body = assert_error_shape(r, 404)
    assert "nope" in body["error"] and "ensemble" in body["error"]
    r = client.post("/predict", json={"inputs": rows_json(X[:1]), "variant": 3})
    assert_error_shape(r, 400)


def test_request_id_in_every_response_and_client_id_kept(client, admin, xy):
    X, _ = xy
    r = client.post("/predict", json={"inputs": rows_json(X[:1])}, headers={"X-Request-ID": "client-id.42"})
    assert r.json()["request_id"] == "client-id.42" == r.headers["x-request-id"]
    r = client.post("/predict", json={"inputs": rows_json(X[:1])}, headers={"X-Request-ID": "bad id with spaces/.."})
    assert r.json()["request_id"] != "bad id with spaces/.." and len(r.json()["request_id"]) == 32
    for resp in (client.get("/ab/report"), client.get("/info"), admin.get("/admin/routing"),
                 client.post("/echo", json={"a": 1})):
        assert resp.status_code == 200
        assert resp.headers["x-request-id"]
    for resp in (client.get("/ab/report"), client.get("/info"), admin.get("/admin/routing")):
        assert resp.json()["request_id"] == resp.headers["x-request-id"]


# ---- admin routing at run time -----------------------------------------------------------------


def test_admin_weights_change_at_run_time(client, admin, split_run, xy, reset_policy):
    X, _ = xy
    r = admin.post("/admin/routing", json={"weights": {"mlp_2": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["weights"] == {"mlp_2": 1.0}
    assert admin.get("/admin/routing").json()["weights"] == {"mlp_2": 1.0}
    assert {b["variant"] for b in keyed_run(client, X, 50)} == {"mlp_2"}
    # string form, normalised; shadow and cascade untouched
    r = admin.post("/admin/routing", json={"weights": "ensemble=3,mlp_1=1"})
    assert r.json()["weights"] == {"ensemble": 0.75, "mlp_1": 0.25}
    assert r.json()["shadow"] == ["ensemble", "mlp_1"]
    # a bad change is refused (naming the problem) and the policy stays as it was
    for bad, word in (({"weights": {"nope": 1}}, "nope"), ({"weights": {"ensemble": -1}}, "non-negative"),
                      ({"shadow": ["ghost"]}, "ghost"), ({"cascade": {"cheap": "mlp_0", "threshold": 2}}, "[0, 1]"),
                      ({"bogus": 1}, "bogus")):
        body = assert_error_shape(admin.post("/admin/routing", json=bad), 400)
        assert word in body["error"]
    assert admin.get("/admin/routing").json()["weights"] == {"ensemble": 0.75, "mlp_1": 0.25}
    # back to the start-up weights: every key maps where it did before
    admin.post("/admin/routing", json={"weights": {"ensemble": 1, "mlp_0": 1}})
    assert [b["variant"] for b in keyed_run(client, X, 300)] == [r["variant"] for r in split_run["responses"][:300]]


def test_admin_weight_changes_under_traffic_are_atomic(client, admin, xy, reset_policy, server_a):
    """Flip between two one-variant policies while requests flow: every answer is 200 from one of them."""
    X, _ = xy
    stop, seen, failures = threading.Event(), [], []

    def stream():
        with httpx.Client(base_url=server_a.url, headers={"Authorization": f"Bearer {INF_TOKEN}"}, timeout=30) as c:
            for i in range(5000):
                if stop.is_set():
                    break
                r = c.post("/predict", json={"inputs": rows_json(X[:2])}, headers={"X-Routing-Key": f"k{i}"})
                (seen if r.status_code == 200 else failures).append(r.json().get("variant", r.text))

    t = threading.Thread(target=stream)
    t.start()
    try:
        for i in range(30):
            assert admin.post("/admin/routing", json={"weights": {("mlp_1" if i % 2 else "mlp_2"): 1}}).status_code == 200
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(30)
    assert not failures
    assert len(seen) > 10 and set(seen) <= {"mlp_1", "mlp_2"}


# ---- shadow, feedback, the report -------------------------------------------------------------------


def test_feedback_gives_accuracy_interval_and_mcnemar_verdict(client, oracle, xy, reset_policy):
    """Primary ensemble with the mlp_1 shadow on 300 labelled test rows; every figure recomputed offline."""
    X, y = xy
    n, batch = 300, 30
    before = report(client)
    compared0 = variant_figures(before, "mlp_1")["compared_rows"] or 0
    agree0 = agree_count(variant_figures(before, "mlp_1"))
    rids = []
    for s in range(0, n, batch):
        r = client.post("/predict", json={"inputs": rows_json(X[s:s + batch])}, headers={"X-Variant": "ensemble"})
        assert r.status_code == 200
        rids.append(r.json()["request_id"])
    wait_for(lambda: (variant_figures(report(client), "mlp_1")["compared_rows"] or 0) >= compared0 + n,
             what="mlp_1 shadow runs")
    ens = oracle.labels(oracle("ensemble", X[:n]))
    m1 = oracle.labels(oracle("mlp_1", X[:n]))
    truth = [int(v) for v in y[:n]]
    rep = report(client)
    assert agree_count(rep["variants"]["mlp_1"]) - agree0 == sum(a == b for a, b in zip(ens, m1))

    for k, rid in enumerate(rids):
        labels = truth[k * batch:(k + 1) * batch]
        r = client.post("/feedback", json={"request_id": rid, "labels": labels})
        assert r.status_code == 200, r.text
        assert r.json()["variants"] == ["ensemble", "mlp_1"] and r.json()["rows"] == batch
    # labelling twice, unknown ids, and bad labels are refused in the one error shape
    assert_error_shape(client.post("/feedback", json={"request_id": rids[0], "labels": truth[:batch]}), 404)
    assert_error_shape(client.post("/feedback", json={"request_id": "never-served", "label": 1}), 404)
    r = client.post("/predict", json={"inputs": rows_json(X[:2])}, headers={"X-Variant": "mlp_2"})
    rid = r.json()["request_id"]
    assert "expected 2 labels" in assert_error_shape(client.post("/feedback", json={"request_id": rid, "labels": [1]}), 400)["error"]
    assert "among the classes" in assert_error_shape(client.post("/feedback", json={"request_id": rid, "labels": [1, 99]}), 400)["error"]
    assert_error_shape(client.post("/feedback", json={"request_id": rid, "label": 1, "labels": [1]}), 400)
    assert_error_shape(client.post("/feedback", json={"request_id": rid}), 400)
    assert_error_shape(client.post("/feedback", json={"labels": [1, 2]}), 400)

    rep = report(client)
    k_ens = sum(a == t for a, t in zip(ens, truth))
    k_m1 = sum(a == t for a, t in zip(m1, truth))
    e, m = rep["variants"]["ensemble"], rep["variants"]["mlp_1"]
    assert e["labelled_rows"] == m["labelled_rows"] == n
    assert e["accuracy"] == pytest.approx(k_ens / n) and m["accuracy"] == pytest.approx(k_m1 / n)
    for entry, k in ((e, k_ens), (m, k_m1)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert entry["accuracy_ci95"] == pytest.approx([ci.low, ci.high], abs=1e-9)
    only_m1 = sum(b == t != a for a, b, t in zip(ens, m1, truth))
    only_ens = sum(a == t != b for a, b, t in zip(ens, m1, truth))
    test = m["vs_ensemble"]
    assert test["test"] == "mcnemar_exact" and test["paired_rows"] == n
    assert test["discordant"] == [only_m1, only_ens]
    p = 1.0 if only_m1 + only_ens == 0 else binomtest(only_m1, only_m1 + only_ens, 0.5).pvalue
    assert test["p_value"] == pytest.approx(p, rel=1e-9)
    # the verdict: anytime-valid non-inferiority on the same paired counts (fusion/sequential.py)
    ref = decide_paired(n, only_m1, only_ens, NonInferiority())
    assert test["analysis"] == "paired" and test["decision"] == ref.decision
    assert (test["ci_low"], test["ci_high"], test["margin_pp"]) == (ref.ci_low, ref.ci_high, 1.0)
    assert test["verdict"].startswith(ref.decision)
    # latency figures per variant
    assert e["latency_ms"]["p50"] > 0 and e["latency_ms"]["p99"] >= e["latency_ms"]["p50"]


# ---- cascade -------------------------------------------------------------------------------------------


def test_cascade_escalation(client, admin, oracle, xy, reset_policy):
    X, _ = xy
    Xc = X[:MAX_ROWS]
    cheap, ens = oracle("mlp_0", Xc), oracle("ensemble", Xc)
    assert_error_shape(client.post("/predict", json={"inputs": rows_json(Xc[:1])}, headers={"X-Variant": "cascade"}), 404)
    totals = []
    for threshold in (1.0, 0.0, 0.9):
        r = admin.post("/admin/routing", json={"cascade": {"cheap": "mlp_0", "threshold": threshold}})
        assert r.status_code == 200 and r.json()["cascade"]["threshold"] == threshold
        before = report(client)["cascade"]
        r = client.post("/predict", json={"inputs": rows_json(Xc)}, headers={"X-Variant": "cascade"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["variant"] == "cascade" == r.headers["x-variant"]
        escalate = cheap.max(-1) < np.float32(threshold)
        assert body["escalated"] == escalate.tolist()
        np.testing.assert_allclose(body["probabilities"], np.where(escalate[:, None], ens, cheap), atol=ATOL)
        after = report(client)["cascade"]
        assert after["escalated"] - before["escalated"] == int(escalate.sum())
        assert after["answered"] - before["answered"] == int((~escalate).sum())
        totals.append(after)
        if threshold == 1.0:
            assert escalate.mean() > 0.9  # (a row at probability exactly 1.0 would stay with the cheap model)
            if escalate.all():
                np.testing.assert_allclose(body["probabilities"], ens, atol=ATOL)
        if threshold == 0.0:
            assert not escalate.any()
            np.testing.assert_allclose(body["probabilities"], cheap, atol=ATOL)
    last = totals[-1]
    assert last["escalation_rate"] == pytest.approx(last["escalated"] / (last["escalated"] + last["answered"]))
    # the cascade as a routed variant: keyed traffic goes through it
    r = admin.post("/admin/routing", json={"weights": {"cascade": 1}})
    assert r.status_code == 200, r.text
    r = client.post("/predict", json={"inputs": rows_json(Xc[:3])}, headers={"X-Routing-Key": "someone"})
    assert r.json()["variant"] == "cascade" and len(r.json()["escalated"]) == 3


# ---- a failing, slow shadow never changes or delays the primary ----------------------------------------------


@pytest.fixture(scope="module")
def server_b(tiny_bundle):
    """Shadow = members mode with one member raising and one hanging 0.2 s, strict: every shadow run fails."""
    env = {"FUSION_AB_WEIGHTS": WEIGHTS, "FUSION_SHADOW": "members", "FUSION_FAILURE_POLICY": "strict",
           "FUSION_FAULT": "mlp_1=raise,mlp_2=hang:0.2"}
    with Server(tiny_bundle, env=env) as srv:
        yield srv


def test_failing_shadow_does_not_change_or_delay_the_primary(server_b, oracle, xy):
    X, _ = xy
    with httpx.Client(base_url=server_b.url, timeout=30) as c:
        # the shadow really fails (members mode itself answers 503 naming the raising member)
        r = c.post("/predict", json={"inputs": rows_json(X[:1])}, headers={"X-Variant": "members"})
        assert "mlp_1" in assert_error_shape(r, 503)["error"]
        responses = keyed_run(c, X, 300)
        want = np.array([oracle(b["variant"], X[i % len(X)][None])[0] for i, b in enumerate(responses)])
        np.testing.assert_allclose([b["probabilities"][0] for b in responses], want, atol=ATOL)
        assert all("degraded" not in b for b in responses)
        rep = wait_for(lambda: (lambda x: x if x["shadow_failures"] else None)(report(c)), what="shadow failures")
        assert set(rep["shadow_failures"]) <= {"members:UnavailableError", "members:queue_full"}
        assert rep["shadow_failures"].get("members:UnavailableError", 0) >= 1
        assert variant_figures(rep, "members")["compared_rows"] in (0, None)

        # latency with the failing shadow vs with no shadow, interleaved rounds on the same server
        body = {"inputs": rows_json(X[:1])}
        on, off = [], []
        for rnd in range(6):
            shadow = ["members"] if rnd % 2 == 0 else []
            assert c.post("/admin/routing", json={"shadow": shadow}).status_code == 200
            for _ in range(40):
                t0 = time.perf_counter()
                r = c.post("/predict", json=body, headers={"X-Variant": "ensemble"})
                (on if shadow else off).append(time.perf_counter() - t0)
                assert r.status_code == 200
        med_on, med_off = statistics.median(on), statistics.median(off)
        assert med_on <= med_off * 1.5 + 0.002, (med_on, med_off)


# ---- auth ---------------------------------------------------------------------------------------------


def test_auth_tokens(server_a, xy):
    X, _ = xy
    body = {"inputs": rows_json(X[:1])}
    url = server_a.url
    inference = [("POST", "/predict", body), ("POST", "/feedback", {"request_id": "x", "label": 1}),
                 ("GET", "/ab/report", None), ("GET", "/info", None), ("POST", "/echo", body),
                 ("GET", "/v2/models/fusion", None), ("GET", "/v2/models/fusion/ready", None),
                 ("POST", "/v2/models/fusion/infer", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                                  "data": X[0].tolist()}]})]
    admin_routes = [("GET", "/admin/routing", None), ("POST", "/admin/routing", {"shadow": []}),
                    ("POST", "/admin/bundle", {"path": "/nonexistent"})]
    with httpx.Client(base_url=url, timeout=30) as c:
        def call(method, path, json_body, token=None, raw=None):
            headers = {"Authorization": raw if raw is not None else f"Bearer {token}"} if (token or raw) else {}
            return c.request(method, path, json=json_body, headers=headers)

        for method, path, b in inference + admin_routes:
            assert "Bearer" in assert_error_shape(call(method, path, b), 401)["error"]
            assert_error_shape(call(method, path, b, WRONG_TOKEN), 401)
            assert_error_shape(call(method, path, b, raw=f"Basic {INF_TOKEN}"), 401)
            assert_error_shape(call(method, path, b, raw="Bearer"), 401)
        for method, path, b in inference:
            for token in (INF_TOKEN, ADMIN_TOKEN):  # the admin token also works for inference
                assert call(method, path, b, token).status_code in (200, 404), path  # 404: unknown feedback id
            assert call(method, path, b, raw=f"bearer {INF_TOKEN}").status_code in (200, 404)
        for method, path, b in admin_routes:
            assert "admin token" in assert_error_shape(call(method, path, b, INF_TOKEN), 403)["error"]
        assert call("GET", "/admin/routing", None, ADMIN_TOKEN).status_code == 200
        # health and protocol liveness stay open
        for path in ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2"):
            assert c.get(path).status_code == 200, path
        # no token is ever echoed back
        r = call("POST", "/predict", body, WRONG_TOKEN)
        assert WRONG_TOKEN not in r.text and INF_TOKEN not in r.text


# ---- limits and the one error shape -----------------------------------------------------------------------


def test_body_limit_413_by_content_length_and_chunked(client, xy):
    X, _ = xy
    big = json.dumps({"inputs": [[1.0] * 64] * 400}).encode()
    assert len(big) > MAX_BODY
    body = assert_error_shape(client.post("/predict", content=big, headers={"Content-Type": "application/json"}), 413)
    assert str(MAX_BODY) in body["error"]

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_error_shape(r, 413)
    for path in ("/echo", "/v2/models/fusion/infer", "/feedback"):
        assert_error_shape(client.post(path, content=big, headers={"Content-Type": "application/json"}), 413)
    # just under the limit is fine
    ok = json.dumps({"inputs": rows_json(X[:MAX_ROWS])}).encode()
    assert len(ok) < MAX_BODY
    assert client.post("/predict", content=ok, headers={"Content-Type": "application/json"}).status_code == 200


def test_body_limit_refuses_before_the_whole_body_is_read(server_a):
    """Send headers and 2x the limit of a chunked body that never ends: the 413 comes back anyway."""
    sock = socket.create_connection(("127.0.0.1", server_a.port), timeout=10)
    try:
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {INF_TOKEN}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        sock.sendall(head)
        chunk = b"x" * 8192
        sent = 0
        try:
            while sent < 2 * MAX_BODY:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:
            pass  # the server may close its side once it has answered
        data = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            part = sock.recv(65536)
            if not part:
                break
            data += part
        assert data.startswith(b"HTTP/1.1 413"), data[:200]  # the terminating 0-chunk was never sent
    finally:
        sock.close()


def test_row_limit_and_value_checks(client, xy):
    X, _ = xy
    too_many = np.concatenate([X[:MAX_ROWS], X[:1]])
    body = assert_error_shape(client.post("/predict", json={"inputs": rows_json(too_many)}), 400)
    assert str(MAX_ROWS) in body["error"] and str(MAX_ROWS + 1) in body["error"]
    oip = {"inputs": [{"name": "input", "shape": [MAX_ROWS + 1, 64], "datatype": "FP32", "data": too_many.ravel().tolist()}]}
    assert_error_shape(client.post("/v2/models/fusion/infer", json=oip), 400)
    row = X[0].tolist()
    for bad, word in ((f'{{"inputs": [[NaN{", 0" * 63}]]}}', "finite"), (f'{{"inputs": [[Infinity{", 0" * 63}]]}}', "finite"),
                      (f'{{"inputs": [[1e39{", 0" * 63}]]}}', "float32"), (f'{{"inputs": [[true{", 0" * 63}]]}}', "boolean"),
                      ('{"inputs": [[1, 2]]}', "64"), ('{"inputs": []}', "at least one"), ('{"inputs": "x"}', "list"),
                      ('{"inputs": [[' + ", ".join(map(str, row)) + '], [1]]}', "64"), ('{"rows": [[1]]}', "unexpected"),
                      ('{"inputs": [["a"' + ", 0" * 63 + "]]}", "number"), ("[1, 2]", "object"), ("{bad json", "JSON")):
        r = client.post("/predict", content=bad.encode(), headers={"Content-Type": "application/json"})
        assert word in assert_error_shape(r, 400)["error"], (bad[:40], r.text)


def test_every_error_is_one_json_object(client, admin, server_a):
    cases = [
        client.post("/predict", content=b"", headers={"Content-Type": "application/json"}),
        client.post("/predict", content=b"{}", headers={"Content-Type": "text/plain"}),
        client.get("/predict"),
        client.delete("/admin/routing"),
        client.get("/no/such/endpoint"),
        client.post("/v2/models/nope/infer", json={}),
        client.get("/v2/models/nope"),
        client.post("/v2/models/fusion/infer", json={"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                                                 "data": [1, 2, 3]}]}),
        client.post("/v2/models/fusion/infer", json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "BYTES",
                                                                 "data": [1] * 64}]}),
        admin.post("/admin/bundle", json={"path": 5}),
        admin.post("/admin/routing", content=b"[1", headers={"Content-Type": "application/json"}),
    ]
    statuses = []
    for r in cases:
        assert_error_shape(r)
        statuses.append(r.status_code)
    assert statuses == [400, 415, 405, 405, 404, 404, 404, 400, 400, 400, 400]
    assert "allowed: POST" in client.get("/predict").json()["error"]
    assert_error_shape(client.post("/v2/models/fusion", json={}), 405)
    # the catch-all 404 leaves BentoML's own pages alone
    for path in ("/docs.json", "/metrics", "/livez", "/readyz"):
        assert httpx.get(server_a.url + path).status_code == 200, path
    # `/` is ours: the dashboard, not BentoML's Swagger page (which loads Google Tag Manager)
    root = httpx.get(server_a.url + "/")
    assert (root.status_code, root.headers["location"]) == (307, "/ui") and "googletagmanager" not in root.text
    assert httpx.get(server_a.url + "/", follow_redirects=True).headers["content-type"].startswith("text/html")
    # the error counter is exposed too
    assert 'fusion_errors_total{status="404"}' in httpx.get(server_a.url + "/metrics").text


# ---- metrics, and the log ----------------------------------------------------------------------------------


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample, labels in any order; 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(kv.split("=", 1) for kv in line[len(name) + 1:line.index("}")].split(","))
        got = {k: v.strip('"') for k, v in got.items() if k != "pid"}  # gauges in liveall mode add a pid
        if got == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_mirror_the_report(client, server_a):
    rep = report(client)
    text = httpx.get(server_a.url + "/metrics").text
    for name in ("ensemble", "mlp_0", "mlp_1"):
        entry = rep["variants"][name]
        assert metric(text, "fusion_requests_total", variant=name) == entry["requests"]
        assert metric(text, "fusion_rows_total", variant=name) == entry["rows"]
    for name in ("mlp_0", "mlp_1"):
        entry = rep["variants"][name]
        agree = metric(text, "fusion_agreement_total", variant=name, agree="true")
        disagree = metric(text, "fusion_agreement_total", variant=name, agree="false")
        assert agree + disagree == entry["compared_rows"] > 0
        assert agree == agree_count(entry)
    for name in ("ensemble", "mlp_1"):
        entry = rep["variants"][name]
        right = metric(text, "fusion_feedback_total", variant=name, correct="true")
        wrong = metric(text, "fusion_feedback_total", variant=name, correct="false")
        assert right + wrong == entry["labelled_rows"] > 0
        assert right == round(entry["accuracy"] * entry["labelled_rows"])
    assert metric(text, "fusion_cascade_rows_total", outcome="escalated") == rep["cascade"]["escalated"]
    assert metric(text, "fusion_bundle_info", version=rep["bundle_version"]) == 1
    assert "fusion_request_latency_seconds_bucket" in text


def test_tokens_never_in_the_server_log(server_a, client):
    client.get("/info")  # at least one more authorised request after all the others
    log = server_a.log()
    assert "/predict" in log  # the access log is really there
    for token in (INF_TOKEN, ADMIN_TOKEN, WRONG_TOKEN):
        assert token not in log
    assert "Traceback" not in log
