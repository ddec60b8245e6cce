"""Issue 20's done-when, on real `bentoml serve` processes: with FUSION_WORKERS=2 on the default SQLite
store, and with two server processes sharing a real PostgreSQL, every /feedback right after its
/predict is accepted (0 of 200 refused), /ab/report is the same across 10 consecutive reads (whichever
worker answers), every count survives a restart of every process, and stopping PostgreSQL mid-run
loses no label that was answered 200 (labels are refused with 503 while it is down; observations spool
to local disk and are replayed)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.pg import Postgres, pg_bin
from tests.reliability import bundles
from tests.reliability.harness import env_threads
from tests.server import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

N = 200
SHADOW = bundles.MEMBERS[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ab-store")
    bundles.make_bundle(root / "v1", seed=0)
    return root / "v1"


def _rows(n: int) -> list[list[float]]:
    return bundles.digits_like(n, seed=3).tolist()


def _predict_and_label(predict_on: list[Server], label_on: list[Server], n: int = N) -> dict:
    """n predictions, each labelled at once (its first label: the prediction, so the accuracy is known),
    alternating the servers; returns the status counts of the feedback calls and the rows labelled."""
    statuses: dict[int, int] = {}
    labelled = 0
    rows = _rows(n)
    with httpx.Client(timeout=30) as c:
        for i in range(n):
            srv = predict_on[i % len(predict_on)]
            r = c.post(srv.url + "/predict", json={"inputs": [rows[i]]}, headers={"Connection": "close"})
            assert r.status_code == 200, r.text
            body = r.json()
            fb = c.post(label_on[(i + 1) % len(label_on)].url + "/feedback", headers={"Connection": "close"},
                        json={"feedback_id": body["feedback_id"], "label": body["predictions"][0]})
            statuses[fb.status_code] = statuses.get(fb.status_code, 0) + 1
            labelled += fb.status_code == 200
    return {"statuses": statuses, "labelled": labelled}


def _stable(report: dict) -> dict:
    """The report less what names the answering process (worker_pid, uptime, request id, queue state)."""
    out = {k: v for k, v in report.items() if k not in ("uptime_s", "request_id")}
    covers = dict(out["covers"])
    covers.pop("worker_pid")
    covers["store"] = {k: v for k, v in covers["store"].items() if k in ("url", "retention_days")}
    out["covers"] = covers
    return out


def _reports(servers: list[Server], reads: int = 10) -> tuple[list[dict], set[int]]:
    out, pids = [], set()
    with httpx.Client(timeout=30) as c:
        for i in range(reads):
            r = c.get(servers[i % len(servers)].url + "/ab/report", headers={"Connection": "close"})
            assert r.status_code == 200, r.text
            pids.add(r.json()["covers"]["worker_pid"])
            out.append(_stable(r.json()))
    return out, pids


def _counts(report: dict) -> dict:
    return {name: (v["requests"], v["rows"], v["labelled_rows"], v["accuracy"], v.get("compared_rows"))
            for name, v in report["variants"].items()}


def _settle(servers: list[Server], want_requests: int, timeout: float = 30.0) -> dict:
    """The report once every observation reached the store (the writers batch every ~20 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(servers[0].url + "/ab/report", timeout=30)
        if r.status_code != 200 and time.monotonic() < deadline:  # 503 while the store is unreachable
            time.sleep(0.2)
            continue
        assert r.status_code == 200, r.text
        rep = r.json()
        got = rep["variants"].get("ensemble", {}).get("requests", 0)
        shadows_done = rep["variants"].get(SHADOW, {}).get("shadow_latency_ms", {}).get("samples", 0)
        if (got == want_requests and shadows_done == want_requests) or time.monotonic() > deadline:
            return rep
        time.sleep(0.2)


def _check_consistent_and_complete(servers: list[Server], n_requests: int) -> dict:
    rep = _settle(servers, n_requests)
    reads, pids = _reports(servers)
    assert all(r == reads[0] for r in reads), "expected /ab/report identical across 10 consecutive reads"
    ens = reads[0]["variants"]["ensemble"]
    assert (ens["requests"], ens["labelled_rows"], ens["accuracy"]) == (n_requests, n_requests, 1.0), ens
    shadow = reads[0]["variants"][SHADOW]
    # the shadow member, paired with the ensemble on every labelled row (agreement and the paired test)
    assert shadow["compared_rows"] == n_requests and shadow["labelled_rows"] == n_requests, shadow
    assert shadow["vs_ensemble"]["test"] == "mcnemar_exact" and shadow["vs_ensemble"]["paired_rows"] == n_requests
    assert rep["covers"]["pending_feedback"]["records"] == 0
    return reads[0]


def _env(**extra) -> dict:
    return {**env_threads(), "FUSION_SHADOW": SHADOW, "FUSION_ACCESS_LOG": "0", **extra}


def test_two_workers_on_sqlite_share_labels_and_report_and_survive_a_restart(bundle, tmp_path):
    state = tmp_path / "state"
    env = _env(FUSION_WORKERS="2", FUSION_STATE_DIR=str(state))
    srv = Server(bundle, env=env).start()
    try:
        done = _predict_and_label([srv], [srv])
        assert done["statuses"] == {200: N}, f"expected 0 of {N} feedback calls refused; got {done['statuses']}"
        before = _check_consistent_and_complete([srv], N)
        _, pids = _reports([srv], reads=20)
    finally:
        srv.stop()
    assert (state / "ab.db").exists(), "expected the default SQLite store in FUSION_STATE_DIR"
    again = Server(bundle, env=env).start()
    try:
        after = _settle([again], N)
        assert _counts(after) == _counts(before), "expected every count preserved across the restart"
        assert after["covers"]["bundle_versions"] == before["covers"]["bundle_versions"]
    finally:
        again.stop()
    print(f"\nFUSION_WORKERS=2, SQLite: {N}/{N} labels accepted; reports answered by {len(pids)} worker pid(s)")


@pytest.fixture(scope="module")
def postgres():
    if pg_bin() is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql: `make test` "
                    "installs Debian's postgresql package")
    pg = Postgres().start()
    yield pg
    pg.close()


def test_two_servers_sharing_postgresql(bundle, tmp_path, postgres):
    """Two `bentoml serve` processes (separate state directories: only PostgreSQL is shared): predictions
    on one, labels on the other; then both restarted; then PostgreSQL stopped mid-run and started again."""
    envs = [_env(FUSION_AB_STORE=postgres.url, FUSION_STATE_DIR=str(tmp_path / f"state{i}"),
                 FUSION_AB_FEEDBACK_WAIT_MS="3000") for i in range(2)]
    servers = [Server(bundle, env=e).start() for e in envs]
    try:
        done = _predict_and_label(servers, servers)
        assert done["statuses"] == {200: N}, f"expected 0 of {N} feedback calls refused; got {done['statuses']}"
        before = _check_consistent_and_complete(servers, N)
    finally:
        for s in servers:
            s.stop()
    servers = [Server(bundle, env=e).start() for e in envs]
    try:
        after = _settle(servers, N)
        assert _counts(after) == _counts(before), "expected every count preserved across the restart of both servers"

        # the store dies mid-run: predictions still answer; labels are refused (503), never lost after a 200
        postgres.stop()
        try:
            down = _predict_and_label(servers, servers, n=8)
        finally:
            postgres.start()
        assert set(down["statuses"]) <= {200, 503}, down
        assert down["statuses"].get(503, 0) > 0, f"expected labels refused while PostgreSQL is down; got {down}"
        total, labelled = N + 8, N + down["labelled"]
        rep = _settle(servers, total, timeout=60)  # the spools are replayed once PostgreSQL answers
        ens = rep["variants"]["ensemble"]
        assert ens["requests"] == total, f"expected the {total} spooled observations replayed; got {ens['requests']}"
        assert ens["labelled_rows"] == labelled, f"expected every label answered 200 kept ({labelled}); got {ens}"
        metrics = "".join(httpx.get(s.url + "/metrics", timeout=30).text for s in servers)
        lost = [ln for ln in metrics.splitlines() if ln.startswith("fusion_ab_store_lost_total") and not ln.endswith(" 0.0")]
        assert not lost, f"expected no observation lost; got {lost}"
        # after the outage every label is accepted again, on either server
        again = _predict_and_label(servers, servers, n=10)
        assert again["statuses"] == {200: 10}, again
    finally:
        for s in servers:
            s.stop()
