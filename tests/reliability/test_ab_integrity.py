"""Issue 13, findings 8 and 9, and issue 21 item 11: the A/B figures cannot be tampered with, stay
cheap to report, and say what they cover.

* Records awaiting feedback are keyed by a server-generated `feedback_id`. A client's own
  X-Request-ID is echoed (header, body `request_id`) and may name its record in /feedback while it is
  unambiguous, but it never overwrites, wipes or collides with a record.
* Eviction is fair: when the store is full, the oldest record of the client holding the most goes,
  so one client's flood evicts its own records, never another client's.
* A label must be one of the bundle's classes with the same JSON type: `true` is not 1, nor is 1.0
  or "1"; anything else is a 400 that says what was expected and what was got.
* /ab/report says what it covers (this worker, since when, which bundle versions), and its p-values
  cost the same at any count.

In-process cases run on `Stats` and `Engine`; the `server` ones on the shared server (tests/reliability/
conftest.py: both tokens set).
"""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest

from fusion.errors import InputError, UnknownNameError
from service.ab import Stats
from service.feedback import check_labels
from tests.reliability import bundles

ROW = [1.0] * bundles.N_FEATURES
CLASSES = tuple(range(bundles.N_CLASSES))


# ---- keys: a client's id never overwrites a record -----------------------------------------------


def test_a_reused_client_request_id_keeps_both_records():
    """Today's bug: the second request with the same X-Request-ID wiped the first record."""
    st = Stats()
    k1 = st.observe("ensemble", 1, 0.001, None, [3], client="10.0.0.1", alias="dup", version="v1")
    k2 = st.observe("merged", 1, 0.001, None, [5], client="10.0.0.1", alias="dup", version="v1")
    assert k1 != k2 and re.fullmatch(r"[0-9a-f]{32}", k1) and re.fullmatch(r"[0-9a-f]{32}", k2)
    assert len(st.records) == 2 and st.stored_rows == 2 and st.reused_ids == 1
    # the client id names two records now: refused (never scored against the wrong answer)
    with pytest.raises(ValueError, match="2 pending requests.*feedback_id"):
        st.feedback("dup", [3], client="10.0.0.1")
    # each record is still there, under its own server id, with its own prediction
    assert st.feedback(k1, [3]) == {"variants": ["ensemble"], "rows": 1}
    assert st.feedback(k2, [3]) == {"variants": ["merged"], "rows": 1}
    rep = st.report()["variants"]
    assert rep["ensemble"]["accuracy"] == 1.0 and rep["merged"]["accuracy"] == 0.0


def test_a_client_id_names_its_record_only_for_that_client_and_while_unambiguous():
    st = Stats()
    mine = st.observe("ensemble", 2, 0.001, None, [1, 2], client="10.0.0.1", alias="order-7")
    theirs = st.observe("ensemble", 1, 0.001, None, [4], client="10.0.0.2", alias="order-7")
    with pytest.raises(KeyError):
        st.feedback("order-7", [1, 2], client="10.0.0.3")  # another client: its alias names nothing
    with pytest.raises(KeyError):
        st.feedback("order-7", [1, 2], client="10.0.0.1", alias=False)  # a feedback_id lookup only
    assert st.feedback("order-7", [1, 2], client="10.0.0.1") == {"variants": ["ensemble"], "rows": 2}
    assert st.feedback("order-7", [4], client="10.0.0.2")["rows"] == 1
    assert mine not in st.records and theirs not in st.records and not st.store._aliases


def test_a_key_is_never_overwritten_even_when_offered_twice():
    """The engine offers the request id as the key when the server made it; a key already taken gets a
    fresh one instead of replacing the record (defence in depth: random 128-bit ids do not repeat)."""
    st = Stats()
    a = st.observe("ensemble", 1, 0.001, "k", [1])
    b = st.observe("merged", 1, 0.001, "k", [2])
    assert a == "k" and b != "k"
    assert st.feedback("k", [1])["variants"] == ["ensemble"]
    assert st.feedback(b, [1])["variants"] == ["merged"]


@pytest.mark.parametrize("host, client", [
    ("10.1.2.3", "10.1.2.3"), ("::ffff:10.1.2.3", "10.1.2.3"), ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:1:2:3", "2001:db8:1:2::/64"), ("testclient", "testclient"), ("", ""),
])
def test_a_client_is_its_address_and_an_ipv6_client_its_64(host, client):
    """One IPv6 host usually holds a whole /64: counting each address as a client would let it claim
    2^64 shares of the record store."""
    from service.app import _client_address

    assert _client_address(host) == client


# ---- fair eviction ---------------------------------------------------------------------------------


def test_a_flood_from_one_client_does_not_evict_another_clients_records():
    """Today's bug: 196 requests of 1,024 rows from anyone evicted every pending record."""
    st = Stats()  # the defaults: 100,000 records, 200,000 rows
    victims = {f"10.0.1.{i}": st.observe("ensemble", 3, 0.001, None, [i % 10] * 3, client=f"10.0.1.{i}") for i in range(50)}
    flood = [st.observe("merged", 1024, 0.001, None, [0] * 1024, client="10.0.0.66") for _ in range(400)]
    assert st.stored_rows <= st.max_rows and len(st.records) <= st.max_records
    for client, key in victims.items():
        assert key in st.records, f"{client}'s pending record was evicted by another client's flood"
    kept = [k for k in flood if k in st.records]
    assert kept == flood[-len(kept):] and 150 <= len(kept) < 400  # the flooder loses its own oldest
    assert st.feedback(victims["10.0.1.7"], [7, 7, 7])["rows"] == 3


def test_eviction_takes_from_the_client_holding_the_most():
    st = Stats(max_records=10, max_rows=1000)
    small = [st.observe("ensemble", 1, 0.001, None, [0], client="small") for _ in range(3)]
    big = [st.observe("ensemble", 1, 0.001, None, [0], client="big") for _ in range(7)]
    extra = st.observe("ensemble", 1, 0.001, None, [0], client="small")  # 11 records: one must go
    assert len(st.records) == 10
    assert big[0] not in st.records and all(k in st.records for k in small + big[1:] + [extra])
    # a third client with nothing yet: its record evicts from "big" (6 left) until the two are level
    for _ in range(3):
        st.observe("ensemble", 1, 0.001, None, [0], client="new")
    counts = {c: len(keys) for c, keys in st.store._by_client.items()}
    assert counts == {"small": 4, "big": 3, "new": 3}


def test_the_store_stays_bounded_with_many_clients():
    st = Stats(max_records=100, max_rows=150)
    for i in range(1000):
        st.observe("ensemble", 1 + i % 3, 0.001, None, [0] * (1 + i % 3), client=f"c{i}", alias=f"a{i}")
        assert len(st.records) <= 100 and st.stored_rows <= 150
    assert len(st.store._aliases) == len(st.records) and set(st.store._by_client) <= {r.client for r in st.records.values()}
    assert len(st.store._heap) <= 4 * len(st.store._by_client) + 64  # the lazy heap is compacted


# ---- labels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, why", [
    (True, r"got true \(a boolean\)"),
    (False, r"got false \(a boolean\)"),
    (1.0, r"got 1\.0 \(a number with a fraction\).*class 1 is an integer"),
    ("1", r"got \"1\" \(a string\).*class 1 is an integer"),
    (10, r"got 10 \(an integer\) at row 2, which is not one of them"),
    (-1, r"got -1 \(an integer\) at row 2, which is not one of them"),
])
def test_labels_must_be_classes_of_the_same_json_type(label, why):
    with pytest.raises(ValueError, match=r"expected labels among the classes \[0, 1, .*9\]") as info:
        check_labels([0, 3, label], CLASSES, "classification")
    assert re.search(why, str(info.value)) and "row 2" in str(info.value), str(info.value)


def test_string_classes_and_regression_labels():
    check_labels(["cat", "dog"], ("cat", "dog"), "classification")
    with pytest.raises(ValueError, match=r"got 0 \(an integer\)"):
        check_labels(["cat", 0], ("cat", "dog"), "classification")
    check_labels([0.5, -3, 1e6], (), "regression")
    with pytest.raises(ValueError, match=r"expected finite numbers.*got true \(a boolean\) at row 1"):
        check_labels([0.5, True], (), "regression")
    with pytest.raises(ValueError, match=r"got \"1\" \(a string\) at row 0"):
        check_labels(["1"], (), "regression")


# ---- the engine: feedback errors, and what the report covers across a hot swap --------------------


@pytest.fixture(scope="module")
def engine(v1):
    from service.config import EngineConfig
    from service.engine import Engine
    from service.routing import RoutingPolicy

    eng = Engine(EngineConfig(bundle=str(v1)), RoutingPolicy())
    eng.start()
    assert eng.ready, eng.error
    yield eng
    eng.close()


def test_engine_feedback_refuses_bad_labels_with_what_was_expected(engine):
    X = np.ones((2, bundles.N_FEATURES), np.float32)
    res = asyncio.run(engine.predict(X, variant="ensemble", key=None, request_id=engine.stats.new_key()))
    fid = res.extra["feedback_id"]
    for labels, why in [([True, 0], "a boolean"), ([0, 1.0], "a number with a fraction"), (["0", 1], "a string"),
                        ([0, 42], "not one of them")]:
        with pytest.raises(InputError, match=why):
            engine.feedback(fid, labels)
    with pytest.raises(UnknownNameError, match="feedback_id"):
        engine.feedback("0" * 32, [0, 1])
    assert engine.feedback(fid, [int(y) for y in res.labels()])["rows"] == 2  # still pending after the refusals


def test_engine_client_ids_are_aliases_and_the_report_covers_every_version_it_counts(engine, v2, v1):
    """Issue 21 item 11: after a hot swap the report named the new version but counted the old one's
    traffic. It now says whose figures these are: this process, since when, and every bundle version."""
    X = np.ones((1, bundles.N_FEATURES), np.float32)
    before = engine.report()["covers"]["bundle_versions"]
    old = engine.current().version
    r_old = asyncio.run(engine.predict(X, variant="ensemble", key=None, request_id=engine.stats.new_key()))
    served = engine.current()
    r_alias = asyncio.run(engine.predict(X, variant="ensemble", key=None, request_id="client-7", client="10.0.0.9",
                                         client_chose_id=True, served=served))
    assert r_alias.extra["feedback_id"] != "client-7"  # the client's id is an alias, never the key
    try:
        engine.swap(str(v2))
        new = engine.current().version
        asyncio.run(engine.predict(X, variant="ensemble", key=None, request_id=engine.stats.new_key()))
        rep = engine.report()
    finally:
        engine.swap(str(v1))
    covers = rep["covers"]
    assert rep["bundle_version"] == new != old
    versions = covers["bundle_versions"]
    assert {old, new} <= set(versions), covers
    assert versions[old]["requests"] - before.get(old, {}).get("requests", 0) == 2
    assert versions[new]["requests"] - before.get(new, {}).get("requests", 0) == 1
    assert covers["worker_pid"] > 0 and covers["since"].endswith("Z") and "worker" in covers["scope"]
    assert "every bundle version" in covers["scope"]
    # the old version's record is still labelled after the swap, by its alias from the same client
    engine.feedback("client-7", [int(r_alias.labels()[0])], client="10.0.0.9")
    assert engine.report()["covers"]["bundle_versions"][old]["labelled_rows"] >= 1
    engine.feedback(r_old.extra["feedback_id"], [int(r_old.labels()[0])])


def test_report_stays_cheap_at_any_count():
    """Issue 13, finding 8: /ab/report cost grew with the discordant count (0.72 s per variant at 10^6
    pairs, under the stats lock). 10^9 labelled pairs for 8 variants now report at once."""
    st = Stats()
    st.observe("ensemble", 1, 0.001, None, [0])
    for i in range(8):
        st.observe(f"v{i}", 1, 0.001, None, [0])
        st.paired[f"v{i}"] = [400_000_000, 300_000_000 + i, 300_000_000 - i, 1]
    t0 = time.perf_counter()
    rep = st.report()
    took = time.perf_counter() - t0
    assert took < 1.0, f"expected the report in well under 1 s at 10^9 pairs x 8 variants; took {took:.2f} s"
    from scipy.stats import binom

    for i in range(8):  # and the p-values are the exact ones: 2·P(X ≤ min(b, c)), X ~ Binomial(b + c, 1/2)
        b, c = 300_000_000 + i, 300_000_000 - i
        ref = 1.0 if b - c <= 1 else 2 * binom.cdf(c, b + c, 0.5)
        assert rep["variants"][f"v{i}"]["vs_ensemble"]["p_value"] == pytest.approx(ref, rel=1e-9)


# ---- on the shared server ------------------------------------------------------------------------


def _predict(srv, auth, headers=None):
    import httpx

    r = httpx.post(srv.url + "/predict", json={"inputs": [ROW], "variant": "ensemble"},
                   headers={**auth["inference"], **(headers or {})}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _feedback(srv, auth, body, headers=None):
    import httpx

    return httpx.post(srv.url + "/feedback", json=body, headers=headers if headers is not None else auth["inference"], timeout=30)


@pytest.mark.server
def test_server_reused_x_request_id_keeps_both_records(main_server, auth):
    a = _predict(main_server, auth, {"X-Request-ID": "dup-req-1"})
    b = _predict(main_server, auth, {"X-Request-ID": "dup-req-1"})
    for r in (a, b):  # the client's id is echoed for tracing, as before
        assert r.headers["x-request-id"] == r.json()["request_id"] == "dup-req-1"
    fa, fb = a.json()["feedback_id"], b.json()["feedback_id"]
    assert fa != fb and re.fullmatch(r"[0-9a-f]{32}", fa) and re.fullmatch(r"[0-9a-f]{32}", fb)
    label = a.json()["predictions"][0]
    r = _feedback(main_server, auth, {"request_id": "dup-req-1", "label": label})
    assert r.status_code == 400 and "feedback_id" in r.json()["error"], r.text
    for fid in (fa, fb):
        r = _feedback(main_server, auth, {"feedback_id": fid, "label": label})
        assert r.status_code == 200 and r.json()["rows"] == 1, r.text
    # without a client id, request_id is the server's and labels the record as the README shows
    c = _predict(main_server, auth).json()
    assert c["request_id"] == c["feedback_id"]
    r = _feedback(main_server, auth, {"request_id": c["request_id"], "label": c["predictions"][0]})
    assert r.status_code == 200, r.text
    # a client id used once names its record, from the same client
    d = _predict(main_server, auth, {"X-Request-ID": "once-req-2"}).json()
    r = _feedback(main_server, auth, {"request_id": "once-req-2", "labels": d["predictions"]})
    assert r.status_code == 200, r.text
    # OIP answers carry the feedback_id in their parameters, and it labels the answer the same way
    import httpx

    body = {"inputs": [{"name": "input", "shape": [1, len(ROW)], "datatype": "FP32", "data": ROW}]}
    r = httpx.post(main_server.url + "/v2/models/ensemble/infer", json=body, timeout=30,
                   headers={**auth["inference"], "X-Request-ID": "dup-req-1"})
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert params["request_id"] == "dup-req-1" != params["feedback_id"]
    label = next(o["data"][0] for o in r.json()["outputs"] if o["name"] == "label")
    assert _feedback(main_server, auth, {"feedback_id": params["feedback_id"], "label": label}).status_code == 200


@pytest.mark.server
@pytest.mark.parametrize("label, why", [(True, "a boolean"), (1.0, "a number with a fraction"), ("1", "a string"),
                                        (10, "not one of them")])
def test_server_refuses_labels_that_are_not_classes(main_server, auth, label, why):
    fid = _predict(main_server, auth).json()["feedback_id"]
    r = _feedback(main_server, auth, {"feedback_id": fid, "label": label})
    assert r.status_code == 400 and set(r.json()) == {"error", "request_id"}, r.text
    assert why in r.json()["error"] and "expected labels among the classes" in r.json()["error"], r.text


@pytest.mark.server
def test_server_feedback_needs_the_token_and_the_report_says_what_it_covers(main_server, auth):
    body = _predict(main_server, auth).json()
    fb = {"feedback_id": body["feedback_id"], "label": body["predictions"][0]}
    assert _feedback(main_server, auth, fb, headers={}).status_code == 401
    assert _feedback(main_server, auth, fb, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _feedback(main_server, auth, {**fb, "request_id": body["request_id"]}).status_code == 400  # one id only
    assert _feedback(main_server, auth, fb, headers=auth["admin"]).status_code == 200  # admin holds inference too
    import httpx

    rep = httpx.get(main_server.url + "/ab/report", headers=auth["inference"], timeout=30).json()
    covers = rep["covers"]
    assert rep["bundle_version"] in covers["bundle_versions"], covers
    assert covers["worker_pid"] > 0 and covers["since"].endswith("Z")
