"""Tools for the reliability suite: a bounded load generator, slow raw-socket clients, process memory,
and the figures each test records (printed, and written to test-artifacts/reliability/<case>.json,
from which docs/RELIABILITY.md's table is regenerated: `python -m tests.reliability.report`).

Every loop here is bounded twice, by a request count and by a wall-clock deadline; all traffic is
on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "reliability"


# ---- figures ---------------------------------------------------------------------------------


def record(case: str, **figures) -> dict:
    """Print the figures of one case and write them to test-artifacts/reliability/<case>.json."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    figures = {"case": case, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}
    (ARTIFACTS / f"{case}.json").write_text(json.dumps(figures, indent=2, default=_jsonable) + "\n")
    print(f"\n[reliability] {case}: " + json.dumps({k: v for k, v in figures.items() if k not in ("case", "recorded")},
                                                   default=_jsonable))
    return figures


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def percentile_ms(latencies_s: list[float], q: float) -> float | None:
    return round(float(np.percentile(latencies_s, q)) * 1e3, 2) if latencies_s else None


# ---- server processes ------------------------------------------------------------------------


def workers(server_pid: int) -> list[psutil.Process]:
    """The BentoML worker processes (the ones that serve requests) below a `bentoml serve` process."""
    out = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker.service" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def worker_rss_mb(server_pid: int) -> float:
    total = 0
    for p in workers(server_pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


def worker_threads(server_pid: int) -> int:
    return sum(p.num_threads() for p in workers(server_pid))


# ---- load ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    sent: int = 0
    statuses: dict = field(default_factory=dict)  # status (or exception name) -> count
    latencies: list = field(default_factory=list)  # seconds, successful requests
    failures: list = field(default_factory=list)  # (t, what) for anything not accepted by `check`
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def summary(self) -> dict:
        return {
            "requests_sent": self.sent, "failed": self.failed, "statuses": dict(self.statuses),
            "seconds": round(self.seconds, 1), "rps": round(self.sent / self.seconds, 1) if self.seconds else None,
            "p50_ms": percentile_ms(self.latencies, 50), "p99_ms": percentile_ms(self.latencies, 99),
            "max_ms": percentile_ms(self.latencies, 100),
        }


class Load:
    """`concurrency` threads, each with its own keep-alive client, send `make_request(i)` until
    `duration_s` passes or `max_requests` are sent; `check(request, response)` returns None when
    the answer is right, else a description of what is wrong (counted as a failure)."""

    def __init__(self, url: str, make_request: Callable[[int], dict], *, concurrency: int = 8,
                 duration_s: float = 30.0, max_requests: int = 200_000, headers: dict | None = None,
                 check: Callable[[dict, httpx.Response], str | None] | None = None, timeout_s: float = 10.0):
        self.url, self.make_request, self.concurrency = url, make_request, concurrency
        self.duration_s, self.max_requests, self.headers, self.timeout_s = duration_s, max_requests, headers or {}, timeout_s
        self.check = check or (lambda req, r: None if r.status_code == 200 else f"status {r.status_code}: {r.text[:200]}")
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0

    def _next(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self.result.sent >= self.max_requests or time.monotonic() - self._t0 > self.duration_s:
                return None
            self.result.sent += 1
            return self.result.sent - 1

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout_s) as client:
            while (i := self._next()) is not None:
                req = self.make_request(i)
                t = time.perf_counter()
                try:
                    r = client.request(req.get("method", "POST"), req["path"], json=req.get("json"), headers=req.get("headers"))
                except httpx.HTTPError as exc:
                    self._count(type(exc).__name__, None, (time.monotonic() - self._t0, f"{type(exc).__name__}: {exc}"))
                    continue
                dt = time.perf_counter() - t
                problem = self.check(req, r)
                self._count(r.status_code, dt if problem is None else None,
                            None if problem is None else (time.monotonic() - self._t0, problem))

    def _count(self, key, latency, failure) -> None:
        with self._lock:
            self.result.statuses[key] = self.result.statuses.get(key, 0) + 1
            if latency is not None:
                self.result.latencies.append(latency)
            if failure is not None:
                self.result.failures.append(failure)

    def start(self) -> "Load":
        self._t0 = time.monotonic()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        return self.join()

    def join(self) -> LoadResult:
        for t in self._threads:
            t.join(self.duration_s + self.timeout_s + 30)
        self.result.seconds = time.monotonic() - self._t0
        return self.result

    def run(self) -> LoadResult:
        return self.start().join()


# ---- slow raw-socket requests ----------------------------------------------------------------


class SlowRequest:
    """An HTTP/1.1 request sent by hand: headers and part of the body now, the rest when `finish()` is
    called. The server has accepted it once the headers are in, but admits it to an inference slot
    only once the body is complete, and answers 408 if that takes longer than FUSION_BODY_TIMEOUT_S
    (service/traffic.py); `local_port` identifies its connection in the server's socket table."""

    def __init__(self, port: int, path: str, body: bytes, headers: dict | None = None, first: int = 5):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.local_port = self.sock.getsockname()[1]
        self.body, self.first = body, first
        head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[:first])
        self.started = time.monotonic()

    def finish(self) -> tuple[int | None, bytes]:
        """Send the rest of the body and read the answer: (status, body), or (None, reason) when the
        connection broke (reset, or closed without an answer)."""
        try:
            self.sock.sendall(self.body[self.first:])
            data = b""
            while chunk := self.sock.recv(65536):
                data += chunk
        except OSError as exc:
            return None, f"{type(exc).__name__}: {exc}".encode()
        finally:
            self.sock.close()
        if not data.startswith(b"HTTP/1.1 "):
            return None, b"closed without an answer"
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body


def connections_by_worker(server_pid: int) -> dict[int, int]:
    """client port -> worker pid, for the established connections each worker holds."""
    out = {}
    for p in workers(server_pid):
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_ESTABLISHED and c.raddr:
                    out[c.raddr.port] = p.pid
        except psutil.NoSuchProcess:
            pass
    return out


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def get_status(url: str, timeout_s: float = 2.0) -> int | str:
    try:
        return httpx.get(url, timeout=timeout_s).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def env_threads() -> dict:
    """Server settings for a shared 2-core machine: one intra-op thread per session."""
    return {"FUSION_INTRA_OP_THREADS": "1", "FUSION_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
            "BENTOML_DO_NOT_TRACK": "true", "FUSION_DRAIN_S": os.environ.get("FUSION_DRAIN_S", "0")}
