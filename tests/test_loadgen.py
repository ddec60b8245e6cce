"""bench/loadgen.py: wrk (when installed) and the Python fallback drive a real server and report the
same fields; errors (non-2xx answers) are counted, not hidden."""

from __future__ import annotations

import json

import pytest

from bench.loadgen import run_load, wrk_path
from tests.server import Server

TOOLS = ["httpx", pytest.param("wrk", marks=pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed (make test installs it as root)"))]
FIELDS = {"tool", "connections", "client_threads", "seconds", "requests", "rps", "p50_ms", "p99_ms", "mean_ms", "errors"}


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with Server(tiny_bundle) as srv:
        yield srv


@pytest.mark.server
@pytest.mark.parametrize("tool", TOOLS)
def test_load_reports_requests_and_latency(server, tool):
    bodies = [json.dumps({"value": i}).encode() for i in range(5)]
    r = run_load(server.url, "/echo", bodies, connections=2, seconds=1, tool=tool)
    assert set(r) == FIELDS and r["tool"] == tool
    assert r["requests"] > 10 and r["errors"] == 0
    assert abs(r["rps"] - r["requests"] / r["seconds"]) < 1e-6 * r["rps"]
    assert 0 < r["p50_ms"] <= r["p99_ms"]


@pytest.mark.server
@pytest.mark.parametrize("tool", TOOLS)
def test_error_answers_are_counted(server, tool):
    r = run_load(server.url, "/echo", [b"not json"], connections=1, seconds=1, tool=tool)  # 400 every time
    assert r["requests"] > 0 and r["errors"] == r["requests"]


def test_wrk_refuses_multiline_bodies():
    if wrk_path() is None:
        pytest.skip("wrk is not installed")
    from bench.loadgen import run_wrk

    with pytest.raises(ValueError, match="one-line bodies"):
        run_wrk("http://127.0.0.1:1", "/echo", [b'{"a":\n1}'], 1, 1)


@pytest.mark.server
@pytest.mark.parametrize("tool", TOOLS)
def test_request_headers_reach_the_server(tiny_bundle, tool):
    """A token server: with the Authorization header every request passes, without it every one is 401."""
    with Server(tiny_bundle, env={"FUSION_INFERENCE_TOKEN": "s3cret"}) as srv:
        body = [json.dumps({"x": 1}).encode()]
        ok = run_load(srv.url, "/echo", body, 1, 1, headers={"Authorization": "Bearer s3cret"}, tool=tool)
        refused = run_load(srv.url, "/echo", body, 1, 1, tool=tool)
    assert ok["requests"] > 0 and ok["errors"] == 0
    assert refused["requests"] > 0 and refused["errors"] == refused["requests"]
