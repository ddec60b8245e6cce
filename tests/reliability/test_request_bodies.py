"""Issue 13, findings 3, 7 and 4 (Content-Type), against a real `bentoml serve`.

3. Slow bodies. A request takes one of the FUSION_MAX_CONCURRENCY slots only once its body is
   complete, and a body not complete within FUSION_BODY_TIMEOUT_S is answered 408 (one error shape,
   request id, connection closed). 3x the limit of bodies trickling in at 2 bytes/s (and connections
   still sending their headers) leave every real client answered 200. With a token set, the token is
   checked before any body byte is read (401/403 rather than a wait for the body).
7. Large bodies. /feedback and /admin/* bodies are capped at FUSION_MAX_SMALL_BODY_BYTES (413 before
   the body is read); batch bodies with more values than FUSION_MAX_ROWS allows are refused before
   parsing (413); the others are parsed once, in a worker thread when large, while /livez answers.
4. Content-Type. /predict, /feedback and /echo refuse a request without one (415); admin endpoints
   take only application/json (no `+json`, no form or text types: a browser cannot send it
   cross-origin without a CORS preflight). OIP infer still reads a body without one as JSON (or as
   binary tensors after the header length): Triton's own client sends no Content-Type.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import select
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from tests.reliability import bundles
from tests.reliability.harness import env_threads, percentile_ms, record
from tests.server import Server

pytestmark = pytest.mark.server

LIMIT = 4
BODY_TIMEOUT_S = 3.0
SMALL_CAP = 65536  # FUSION_MAX_SMALL_BODY_BYTES's default
ROW = bundles.digits_like(1)[0].tolist()


@pytest.fixture(scope="module")
def server(v1, tokens):
    env = {**env_threads(), "FUSION_MAX_CONCURRENCY": str(LIMIT), "FUSION_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
           "FUSION_INFERENCE_TOKEN": tokens["inference"], "FUSION_ADMIN_TOKEN": tokens["admin"]}
    with Server(v1, env=env) as srv:
        yield srv


class RawRequest:
    """A request written by hand on its own socket: the head (and `first` body bytes) now, more body
    bytes one `drip()` at a time, never the whole declared body unless `complete()` is called."""

    def __init__(self, port: int, path: str, *, length: int, headers: dict, body: bytes = b"", first: int = 0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.body = body or b" " * length
        self.length, self.sent = length, first
        head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"] + [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + self.body[:first])
        self.started = time.monotonic()
        self.answered_at: float | None = None

    def drip(self, n: int = 1) -> None:
        if self.answered_at is None and self.sent + n < self.length:  # never the last byte
            try:
                self.sock.sendall(self.body[self.sent:self.sent + n])
                self.sent += n
            except OSError:
                pass

    def answer(self, wait_s: float) -> tuple[int | None, dict, bytes, bool]:
        """(status, headers, body, closed by the server) of the answer, waiting at most `wait_s`."""
        data, closed, deadline = b"", False, time.monotonic() + wait_s
        self.sock.setblocking(False)
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                if self._complete(data):
                    break
                continue
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                closed = True
                break
            if self.answered_at is None and chunk:
                self.answered_at = time.monotonic()
            if not chunk:
                closed = True
                break
            data += chunk
        if not data.startswith(b"HTTP/1.1 "):
            return None, {}, data, closed
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(ln.split(": ", 1) for ln in lines[1:] if ": " in ln)
        return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body, closed

    @staticmethod
    def _complete(data: bytes) -> bool:
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            return False
        for ln in head.split(b"\r\n"):
            if ln.lower().startswith(b"content-length:"):
                return len(body) >= int(ln.split(b":")[1])
        return False

    def close(self) -> None:
        self.sock.close()


def _error(body: bytes) -> dict:
    doc = json.loads(body)
    assert set(doc) == {"error", "request_id"}, doc
    return doc


# ---- finding 3 ----------------------------------------------------------------------------------


SLOW_PATHS = ("/predict", "/feedback", "/echo", "/v2/models/fusion/infer", "/admin/routing", "/admin/bundle")


def test_03_slow_bodies_hold_no_slot_and_are_cut_at_the_deadline(server, tokens, auth):
    slow, header_only = [], []
    try:
        for i in range(3 * LIMIT):
            path = SLOW_PATHS[i % len(SLOW_PATHS)]
            token = tokens["admin"] if path.startswith("/admin") else tokens["inference"]
            slow.append(RawRequest(server.port, path, length=4096, first=5, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {token}", "X-Request-ID": f"slow-{i}"}))
        for _ in range(LIMIT):  # still sending their headers: uvicorn's business, must not hold a slot either
            s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            header_only.append(s)
        stop = threading.Event()

        def dripper():
            while not stop.wait(0.5):
                for r in slow:
                    r.drip()
                for s in header_only:
                    try:
                        s.send(b"a")
                    except OSError:
                        pass

        threading.Thread(target=dripper, daemon=True).start()
        time.sleep(0.3)

        # real clients while every slow body is still arriving
        def client(_):
            with httpx.Client(base_url=server.url, headers=auth["inference"], timeout=10) as c:
                return [c.post("/predict", json={"inputs": [ROW]}) for _ in range(3)]

        t_real = time.monotonic()
        with cf.ThreadPoolExecutor(LIMIT) as pool:
            real = [r for rs in pool.map(client, range(LIMIT)) for r in rs]
        real_done = time.monotonic()
        real_statuses = sorted({r.status_code for r in real})
        assert real_statuses == [200], [(r.status_code, r.text[:200]) for r in real if r.status_code != 200]
        livez = httpx.get(server.url + "/livez", timeout=5).status_code

        answers = [r.answer(BODY_TIMEOUT_S + 15) for r in slow]
        stop.set()
        took = [r.answered_at - r.started if r.answered_at else None for r in slow]
        headers_still_open = 0
        for s in header_only:
            s.setblocking(False)
            try:
                s.recv(1)  # b"": closed by the server; bytes: answered
            except BlockingIOError:
                headers_still_open += 1  # no answer, not closed: uvicorn has no header timeout
            except OSError:
                pass
    finally:
        for r in slow:
            r.close()
        for s in header_only:
            s.close()

    record("sec_03_slow_bodies", limit=LIMIT, body_timeout_s=BODY_TIMEOUT_S, slow_bodies=len(slow),
           slow_paths=list(SLOW_PATHS), header_trickles=len(header_only), real_requests=len(real),
           real_statuses={s: sum(r.status_code == s for r in real) for s in real_statuses},
           real_seconds=round(real_done - t_real, 2), slow_statuses=sorted({a[0] for a in answers}, key=str),
           slow_answered_s_min=min(t for t in took if t) if any(took) else None,
           slow_answered_s_max=max(t for t in took if t) if any(took) else None,
           closed_after_408=sum(a[3] for a in answers), header_trickles_still_open=headers_still_open, livez=livez)
    assert livez == 200
    for i, (status, headers, body, closed) in enumerate(answers):
        assert status == 408, (i, SLOW_PATHS[i % len(SLOW_PATHS)], status, body[:300])
        doc = _error(body)
        assert doc["request_id"] == f"slow-{i}" == headers.get("x-request-id"), (doc, headers)
        assert "FUSION_BODY_TIMEOUT_S" in doc["error"], doc
        assert headers.get("connection") == "close", headers
    assert all(t is not None and BODY_TIMEOUT_S - 0.2 <= t <= BODY_TIMEOUT_S + 10 for t in took), took
    assert real_done < min(r.answered_at for r in slow), "the real clients were served only after the slow bodies were cut"


@pytest.mark.parametrize("path, authorization, status", [
    ("/predict", None, 401), ("/predict", "Bearer wrong", 401), ("/v2/models/fusion/infer", None, 401),
    ("/feedback", "Basic abc", 401), ("/admin/bundle", None, 401), ("/admin/routing", "inference", 403),
])
def test_03_the_token_is_checked_before_any_body_byte(server, tokens, path, authorization, status):
    """The body is declared (1 MiB) and never sent: a server that read it first would answer 408."""
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = f"Bearer {tokens['inference']}" if authorization == "inference" else authorization
    r = RawRequest(server.port, path, length=1 << 20, headers=headers)
    try:
        got, _, body, _ = r.answer(BODY_TIMEOUT_S + 10)
    finally:
        r.close()
    assert got == status, (path, got, body[:200])
    _error(body)
    assert r.answered_at - r.started < BODY_TIMEOUT_S, "the answer waited for the body"


# ---- finding 7 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/feedback", "/admin/routing", "/admin/bundle"])
def test_07_small_endpoints_refuse_bodies_over_their_cap_before_reading(server, tokens, path):
    token = tokens["admin"] if path.startswith("/admin") else tokens["inference"]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    declared = RawRequest(server.port, path, length=SMALL_CAP + 1, headers=headers)  # no body byte sent
    try:
        status, _, body, _ = declared.answer(BODY_TIMEOUT_S + 10)
    finally:
        declared.close()
    assert status == 413 and str(SMALL_CAP) in _error(body)["error"], (status, body[:300])
    assert declared.answered_at - declared.started < BODY_TIMEOUT_S

    def chunks():  # chunked (no Content-Length): refused once the cap is passed
        for _ in range(64):
            yield b" " * 8192

    r = httpx.post(server.url + path, content=chunks(), headers=headers, timeout=30)
    assert r.status_code == 413 and str(SMALL_CAP) in _error(r.content)["error"], (r.status_code, r.text[:300])
    ok = httpx.post(server.url + path, content=b" " * (SMALL_CAP - 200) + b"{}", headers=headers, timeout=30)
    assert ok.status_code != 413, ok.text[:300]  # at the cap: read and parsed (its own 4xx or 200)


def test_07_large_bodies_are_parsed_once_off_the_event_loop(server, auth):
    """/livez is polled while large bodies arrive: /predict with the most rows the server takes and
    a NaN at the very end (parsed once: orjson's error names the NaN), near-8 MiB /predict and OIP
    bodies with far more values than FUSION_MAX_ROWS allows (413 before any parse: 4M `0,`s held
    the loop ~0.3 s even in a worker thread, as orjson holds the GIL), and a 6 MB /echo."""
    rng = np.random.default_rng(0)
    rows = ",".join("[" + ",".join(f"{v:.6f}" for v in rng.random(64) * 16) + "]" for _ in range(256))
    max_rows = 1024  # the server's FUSION_MAX_ROWS (default)
    nan_tail = ('{"inputs": [' + ",".join([rows] * (max_rows // 256)) + ',[NaN' + ",1" * 63 + ']]}').encode()
    too_many = ('{"inputs": [' + ",".join([rows] * 32) + ',[NaN' + ",1" * 63 + ']]}').encode()
    oip_big = (b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ['
               + b",".join([b"0"] * 3_900_000) + b"]}]}")
    echo_big = json.dumps({"x": ["a" * 6400] * 1000}).encode()
    cases = [("/predict", nan_tail, 400, "got NaN at line 1"), ("/predict", too_many, 413, "refused before parsing"),
             ("/v2/models/fusion/infer", oip_big, 413, "refused before parsing"), ("/echo", echo_big, 200, None)]
    assert all(len(b) < 8 << 20 for _, b, _, _ in cases), [len(b) for _, b, _, _ in cases]

    polls, stop = [], threading.Event()

    def poll():
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                t = time.perf_counter()
                status = c.get(server.url + "/livez").status_code
                polls.append((time.perf_counter() - t, status))
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.3)
    took = {}
    try:
        with httpx.Client(base_url=server.url, headers={**auth["inference"], "Content-Type": "application/json"}, timeout=60) as c:
            for path, body, want, word in cases * 2:
                t = time.perf_counter()
                r = c.post(path, content=body)
                took.setdefault(f"{path} {want}", []).append(time.perf_counter() - t)
                assert r.status_code == want, (path, r.status_code, r.text[:300])
                if word:
                    assert word in r.json()["error"], r.text[:300]
    finally:
        time.sleep(0.2)
        stop.set()
        poller.join(15)
    lat = [t for t, _ in polls]
    record("sec_07_large_bodies", body_mb={f"{p} {want}": round(len(b) / 2**20, 2) for p, b, want, _ in cases},
           request_s={p: [round(t, 3) for t in ts] for p, ts in took.items()}, livez_polls=len(polls),
           livez_p50_ms=percentile_ms(lat, 50), livez_max_ms=percentile_ms(lat, 100))
    assert polls and all(s == 200 for _, s in polls)
    assert max(lat) < 2.0, f"/livez waited {max(lat):.2f} s while a large body was parsed"


# ---- finding 4: Content-Type ----------------------------------------------------------------------


def test_04_content_type_is_required(server, auth):
    inference, admin = auth["inference"], auth["admin"]
    oip_body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}).encode()
    predict_body = json.dumps({"inputs": [ROW]}).encode()
    cases = [  # (path, headers, body, expected status)
        ("/predict", inference, predict_body, 415),
        ("/feedback", inference, b'{"request_id": "x", "label": 1}', 415),
        ("/echo", inference, b"{}", 415),
        # OIP infer is the one exception: Triton's client (tritonclient.http) sends no Content-Type at all
        ("/v2/models/fusion/infer", inference, oip_body, 200),
        ("/v2/models/fusion/infer", {**inference, "Inference-Header-Content-Length": str(len(oip_body))}, oip_body, 200),
        ("/v2/models/fusion/infer", {**inference, "Content-Type": "text/plain"}, oip_body, 415),
        ("/admin/routing", admin, b"{}", 415),
        ("/admin/bundle", admin, b'{"path": "x"}', 415),
    ]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/vnd.api+json", "application/jsonx", "application/json-patch+json"):
        cases += [("/admin/routing", {**admin, "Content-Type": ctype}, b"{}", 415),
                  ("/admin/bundle", {**admin, "Content-Type": ctype}, b'{"path": "x"}', 415)]
    cases += [("/admin/routing", {**admin, "Content-Type": "application/json; charset=utf-8"}, b"{}", 200),
              ("/admin/routing", {**admin, "Content-Type": "Application/JSON"}, b"{}", 200),
              ("/predict", {**inference, "Content-Type": "application/json"}, predict_body, 200),
              ("/predict", {**inference, "Content-Type": "application/vnd.api+json"}, predict_body, 200)]
    seen = {}
    for path, headers, body, want in cases:
        r = httpx.post(server.url + path, content=body, headers=headers, timeout=10)
        assert "content-type" in r.request.headers or "Content-Type" not in headers
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code == want, (path, headers.get("Content-Type"), r.status_code, r.text[:300])
        if want == 415:
            msg = _error(r.content)["error"]
            assert "expected Content-Type application/" in msg and "got" in msg, msg
            if "Content-Type" not in headers:
                assert "got none" in msg, msg
    record("sec_04_content_type", requests=len(cases), statuses=seen)
