"""Cases 13, 14, 15: hostile HTTP, auth, and the error contract, on the shared server.

13. Malformed JSON, 10k-deep nesting, pickle content types (415), slow and chunked bodies, bodies
    over the limit (413 before they are read in full, worker memory bounded): 4xx only, healthy after.
14. Missing or wrong token -> 401, the inference token on admin endpoints -> 403, health open,
    tokens never in the log nor in a response.
15. Every error from our routes is one `{"error", "request_id"}` object, the request id matches the
    X-Request-ID header, and no message holds a stack trace or a server path.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time

import httpx
import pytest

from tests.reliability import bundles
from tests.reliability.conftest import MAX_BODY
from tests.reliability.harness import ROOT, percentile_ms, record, worker_rss_mb, workers

pytestmark = pytest.mark.server

N = bundles.N_FEATURES
ROW = [1.0] * N
INFERENCE_POSTS = ("/predict", "/echo", "/feedback", "/v2/models/fusion/infer")


def assert_error_shape(r: httpx.Response, *, where: str = "") -> dict:
    assert r.headers.get("content-type", "").startswith("application/json"), (where, r.status_code, r.headers, r.text[:200])
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error", "request_id"}, (where, r.status_code, body)
    assert isinstance(body["error"], str) and body["error"], (where, body)
    assert body["request_id"] == r.headers.get("x-request-id"), (where, body, dict(r.headers))
    for leak in ("Traceback", 'File "', "site-packages", str(ROOT)):
        assert leak not in body["error"], (where, leak, body["error"])
    return body


def raw_request(port: int, head: str, body_chunks=(), *, wait_s: float = 10.0) -> tuple[int | None, int, bytes]:
    """Send `head` then each chunk; stop sending as soon as the server answers.
    Returns (status or None, body bytes sent, raw answer)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(head.encode())
        answer = b""
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:
                break  # the server answered: stop sending
            try:
                s.sendall(chunk)
            except OSError:  # the server closed the connection on us
                break
            sent += len(chunk)
        s.settimeout(wait_s)
        try:
            while b"\r\n\r\n" not in answer and (data := s.recv(65536)):
                answer += data
        except OSError:
            pass
    status = int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, sent, answer


def head(path: str, token: str, extra: str = "") -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\n{extra}\r\n")


# ---- case 13 -----------------------------------------------------------------------------------


def test_13_hostile_http(main_server, auth, tokens, tmp_path):
    url, port = main_server.url, main_server.port
    c = httpx.Client(base_url=url, headers=auth["inference"], timeout=30)
    pid_before = {p.pid for p in workers(main_server.proc.pid)}
    results: dict[str, dict] = {}

    def expect(name: str, r: httpx.Response, status: int) -> None:
        results.setdefault(name, {})
        results[name][r.status_code] = results[name].get(r.status_code, 0) + 1
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert_error_shape(r, where=name)

    # malformed JSON and 10k-deep nesting, on every JSON endpoint
    malformed = [b"{", b'{"inputs": [[1,2,', b"nul", b"\xff\xfe\x00", b"{'inputs': [[1]]}", b'{"inputs": [[1]]} trailing',
                 b'{"inputs": ' + b"1" * 100_000 + b"}", b"\x00" * 64, b'"\\ud800"']
    deep = [b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
            b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"]
    for path in INFERENCE_POSTS:
        for body in malformed:  # /feedback bodies are capped at 64 KiB (FUSION_MAX_SMALL_BODY_BYTES): 413 before parsing
            over = path == "/feedback" and len(body) > 65536
            expect("malformed_json", c.post(path, content=body, headers={"Content-Type": "application/json"}), 413 if over else 400)
        for body in deep:
            expect("nesting_10k", c.post(path, content=body, headers={"Content-Type": "application/json"}), 400)
    for body in malformed[:3] + deep:
        expect("malformed_json_admin", c.post("/admin/routing", content=body, headers={**auth["admin"], "Content-Type": "application/json"}), 400)

    # pickle (and other non-JSON) content types: 415, never unpickled
    canary = tmp_path / "CANARY"
    payload = bundles.pickle_payload(canary)
    for ctype in ("application/python-pickle", "application/x-python-pickle", "application/octet-stream", "text/plain",
                  "multipart/form-data; boundary=x"):
        for path in INFERENCE_POSTS[:3]:
            expect("non_json_content_type", c.post(path, content=payload, headers={"Content-Type": ctype}), 415)
        for path in ("/admin/bundle", "/admin/routing"):
            expect("non_json_content_type", c.post(path, content=payload, headers={**auth["admin"], "Content-Type": ctype}), 415)
    for ctype in ("application/python-pickle", "text/plain"):
        expect("non_json_content_type", c.post("/v2/models/fusion/infer", content=payload, headers={"Content-Type": ctype}), 415)
        expect("non_json_content_type", c.post("/v2/models/fusion/infer", content=payload,  # the binary extension too
                                               headers={"Content-Type": ctype, "Inference-Header-Content-Length": "10"}), 415)
    assert not canary.exists()

    # a slow body (2 s, 20 pieces) is answered 200, and the server answers others meanwhile
    body = json.dumps({"inputs": [ROW, ROW]}).encode()
    pieces = [body[i:i + len(body) // 20 + 1] for i in range(0, len(body), len(body) // 20 + 1)]
    fast, slow = [], {}

    def slow_client():
        def gen():
            for p in pieces:
                time.sleep(0.1)
                yield p
        t = time.perf_counter()
        r = httpx.post(url + "/predict", content=gen(), headers={**auth["inference"], "Content-Type": "application/json"}, timeout=30)
        slow.update(status=r.status_code, seconds=time.perf_counter() - t, chunked="content-length" not in r.request.headers)

    th = threading.Thread(target=slow_client)
    th.start()
    while th.is_alive() and len(fast) < 200:
        t = time.perf_counter()
        r = c.post("/predict", json={"inputs": [ROW]})
        assert r.status_code == 200
        fast.append(time.perf_counter() - t)
        time.sleep(0.02)
    th.join(30)
    assert slow.get("status") == 200 and slow["chunked"], slow
    assert len(fast) >= 10, "the server did not answer others while a slow body was arriving"
    results["slow_chunked_body"] = {200: 1, "others_answered_meanwhile": len(fast), "others_p99_ms": percentile_ms(fast, 99)}

    # bodies over the limit: declared (refused before any body byte) and chunked (refused once past the limit)
    rss0 = worker_rss_mb(main_server.proc.pid)
    t = time.perf_counter()
    status, sent, _ = raw_request(port, head("/predict", tokens["inference"], f"Content-Length: {64 << 20}\r\n"), ())
    declared_s = time.perf_counter() - t
    assert status == 413, status
    results["over_limit_declared"] = {413: 1, "body_bytes_sent": sent, "answered_s": round(declared_s, 3)}
    junk = b"1," * 32_768  # 64 KiB pieces
    chunks = (f"{len(junk):x}\r\n".encode() + junk + b"\r\n" for _ in range(1024))  # up to 64 MiB
    status, sent, answer = raw_request(port, head("/predict", tokens["inference"], "Transfer-Encoding: chunked\r\n"), chunks)
    assert status == 413, answer[:300]
    assert sent < 16 * MAX_BODY, f"{sent} bytes went in before the 413 (limit {MAX_BODY})"
    rss1 = worker_rss_mb(main_server.proc.pid)
    results["over_limit_chunked"] = {413: 1, "body_bytes_sent_before_answer": sent, "attempted_bytes": 64 << 20,
                                     "worker_rss_mb_before": rss0, "worker_rss_mb_after": rss1}
    assert rss1 - rss0 < 32, (rss0, rss1)

    # a body shorter than its Content-Length, then the client goes away
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head("/predict", tokens["inference"], "Content-Length: 1000\r\n").encode() + b'{"inputs": [[')
    # headers only, then silence: the server must not hang on it for others (checked below)
    idle = socket.create_connection(("127.0.0.1", port))
    idle.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")

    # still healthy, same workers
    assert httpx.get(url + "/readyz", timeout=5).status_code == 200
    assert c.post("/predict", json={"inputs": [ROW]}).status_code == 200
    idle.close()
    assert {p.pid for p in workers(main_server.proc.pid)} == pid_before, "a worker died"
    time.sleep(0.5)
    internal = [ln for ln in main_server.log().splitlines() if "internal error in request" in ln]
    assert not internal, f"hostile input reached a 500: {internal[:3]}"
    record("13_hostile_http", cases=results, requests_sent=sum(sum(v for k, v in r.items() if isinstance(k, int)) for r in results.values()),
           canary_created=canary.exists(), server_healthy_after=True)


# ---- case 14 -----------------------------------------------------------------------------------


def test_14_auth(main_server, auth, tokens):
    url = main_server.url
    inference = [("POST", "/predict", {"inputs": [ROW]}), ("POST", "/echo", {"a": 1}), ("GET", "/ab/report", None),
                 ("GET", "/info", None), ("GET", "/v2/models/fusion", None), ("GET", "/v2/models/fusion/ready", None),
                 ("POST", "/v2/models/fusion/infer", {"inputs": [{"name": "input", "shape": [1, N], "datatype": "FP32", "data": ROW}]}),
                 ("POST", "/feedback", {"request_id": "x", "label": 1})]
    admin = [("GET", "/admin/routing", None), ("POST", "/admin/routing", {}), ("POST", "/admin/bundle", {"path": "/nonexistent"})]
    health = ["/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2", "/docs.json"]
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {tokens['inference']}x"},
             {"Authorization": f"Basic {tokens['inference']}"}, {"Authorization": tokens["admin"]}, {"Authorization": "Bearer"}]
    seen = {"no_or_wrong_token": {}, "inference_token_on_admin": {}, "health_without_token": {}, "right_token": {}}

    def note(kind, r):
        seen[kind][r.status_code] = seen[kind].get(r.status_code, 0) + 1

    for method, path, body in inference + admin:
        for headers in wrong:
            r = httpx.request(method, url + path, json=body, headers=headers, timeout=10)
            note("no_or_wrong_token", r)
            assert r.status_code == 401, (path, headers, r.status_code, r.text)
            err = assert_error_shape(r, where=path)
            assert all(t not in err["error"] for t in tokens.values())
            assert r.headers.get("www-authenticate") is None or "Bearer" in r.headers["www-authenticate"]
    for method, path, body in admin:
        r = httpx.request(method, url + path, json=body, headers=auth["inference"], timeout=10)
        note("inference_token_on_admin", r)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert_error_shape(r, where=path)
    for path in health:
        r = httpx.get(url + path, timeout=10)
        note("health_without_token", r)
        assert r.status_code == 200, (path, r.status_code)
    for method, path, body in inference:
        for role in ("inference", "admin"):  # the admin token may also infer
            r = httpx.request(method, url + path, json=body, headers=auth[role], timeout=10)
            note("right_token", r)
            assert r.status_code not in (401, 403), (path, role, r.status_code)
            assert all(t not in r.text for t in tokens.values())
    r = httpx.get(url + "/admin/routing", headers=auth["admin"], timeout=10)
    assert r.status_code == 200
    log = main_server.log()
    leaked = [role for role, tok in tokens.items() if tok in log]
    record("14_auth", statuses=seen, log_bytes=len(log), tokens_in_log=leaked)
    assert not leaked, f"the server log holds the {leaked} token(s)"


# ---- case 15 -----------------------------------------------------------------------------------


def test_15_error_contract(main_server, auth, bundle_root):
    url = main_server.url
    h = {**auth["inference"]}
    cases = [
        ("POST", "/predict", {"json": {"inputs": [[1.0] * 3]}}, h, 400),
        ("POST", "/predict", {"json": {"inputs": [ROW], "variant": "nope"}}, h, 404),
        ("POST", "/predict", {"json": {"inputs": [ROW], "extra": 1}}, h, 400),
        ("POST", "/predict", {"content": b"x" * (MAX_BODY + 1), "headers": {"Content-Type": "application/json"}}, h, 413),
        ("POST", "/predict", {"content": b"{}", "headers": {"Content-Type": "text/csv"}}, h, 415),
        ("GET", "/predict", {}, h, 405),
        ("DELETE", "/admin/routing", {}, auth["admin"], 405),
        ("GET", "/no/such/path", {}, h, 404),
        ("POST", "/no/such/path", {}, {}, 404),
        ("GET", "/v2/models/nope", {}, h, 404),
        ("POST", "/v2/models/nope/infer", {"json": {}}, h, 404),
        ("POST", "/v2/models/fusion/infer", {"json": {"inputs": []}}, h, 400),
        ("POST", "/v2/models/fusion/infer", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "99"}}, h, 400),
        ("POST", "/feedback", {"json": {"request_id": "never-served", "label": 1}}, h, 404),
        ("POST", "/feedback", {"json": {"request_id": 5}}, h, 400),
        ("POST", "/echo", {"json": [1, 2]}, h, 400),
        ("POST", "/predict", {}, {}, 401),
        ("POST", "/admin/routing", {"json": {}}, h, 403),
        ("POST", "/admin/routing", {"json": {"weights": {"nope": 1}}}, auth["admin"], 400),
        ("POST", "/admin/routing", {"json": {"weights": {"ensemble": -1}}}, auth["admin"], 400),
        ("POST", "/admin/bundle", {"json": {"path": str(bundle_root / "no-such-bundle")}}, auth["admin"], 400),  # not 503: no retry
        ("POST", "/admin/bundle", {"json": {"path": "/etc"}}, auth["admin"], 400),
        ("POST", "/admin/bundle", {"json": {"path": "a\x00b"}}, auth["admin"], 400),
        ("POST", "/admin/bundle", {"json": {"path": 7}}, auth["admin"], 400),
    ]
    statuses = {}
    for method, path, kw, headers, status in cases:
        for rid in (None, "client-chosen.id_1", "not a valid id!"):
            hdrs = {**headers, **kw.get("headers", {}), **({"X-Request-ID": rid} if rid else {})}
            r = httpx.request(method, url + path, json=kw.get("json"), content=kw.get("content"), headers=hdrs, timeout=10)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code == status, (method, path, r.status_code, r.text[:300])
            body = assert_error_shape(r, where=f"{method} {path}")
            sent = json.dumps(kw.get("json")) if kw.get("json") is not None else ""
            if str(bundle_root) not in sent:
                assert str(bundle_root) not in body["error"], body["error"]
            if rid == "client-chosen.id_1":
                assert body["request_id"] == rid
            elif rid is not None:
                assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"]), body["request_id"]
    record("15_error_contract", requests_sent=sum(statuses.values()), statuses=statuses, violations=0)
