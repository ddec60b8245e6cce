"""Closed-loop HTTP load: wrk (C, Debian's `wrk` package) when it is installed, else a Python client.

Client and server share this machine's cores, so the client's own CPU cost caps what a server can
show: wrk spends ~0.02 ms of CPU per request where an asyncio Python client spends ~0.5 ms, which
on 2 cores leaves the server most of a core more. Both report the same fields:

    {"tool", "connections", "client_threads", "seconds", "requests", "rps", "p50_ms", "p99_ms",
     "mean_ms", "errors" (socket errors + 4xx/5xx answers; wrk counts no other status as an error)}

wrk drives POSTs of the given bodies in turn (one body per line of a file, read by a Lua script) and
prints its summary as JSON from the script's `done` hook, so nothing is scraped from its text output.

    python -m bench.loadgen URL PATH BODIES.jsonl [--connections 32] [--seconds 5]
    python -m bench.loadgen URL PATH BODIES.jsonl --rate 20 [--seconds 5]     # open loop (run_open_loop)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MARKER = "FUSION_WRK_JSON "
WRK_SCRIPT = r"""
local bodies, i = {}, 0
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  -- into wrk.headers, beside the -H ones: a header table passed to wrk.format would replace them all
  wrk.headers["Content-Type"] = args[2] or "application/json"
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    "__MARKER__", summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
""".replace("__MARKER__", MARKER)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, path: str, bodies: list[bytes], connections: int, seconds: float,
            threads: int = 1, headers: dict | None = None) -> dict:
    """wrk -t{threads} -c{connections} -d{seconds}s against url+path, POSTing `bodies` in turn."""
    exe = wrk_path()
    if exe is None:
        raise FileNotFoundError("wrk is not installed (apt-get install wrk)")
    if any(b"\n" in b for b in bodies):
        raise ValueError("expected one-line bodies (compact JSON); got a body with a newline")
    with tempfile.TemporaryDirectory() as d:
        script, data = Path(d) / "post.lua", Path(d) / "bodies.jsonl"
        script.write_text(WRK_SCRIPT)
        data.write_bytes(b"\n".join(bodies) + b"\n")
        cmd = [exe, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
               "-s", str(script)]
        for k, v in (headers or {}).items():
            if k.lower() != "content-type":
                cmd += ["-H", f"{k}: {v}"]
        ctype = (headers or {}).get("Content-Type", "application/json")
        cmd += [url.rstrip("/") + path, "--", str(data), ctype]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {proc.stderr[-500:] or proc.stdout[-500:]}")
    r = json.loads(line[len(MARKER):])
    secs = r["duration_us"] / 1e6
    return {"tool": "wrk", "connections": connections, "client_threads": threads, "seconds": secs,
            "requests": r["requests"], "rps": r["requests"] / secs, "p50_ms": r["p50_us"] / 1e3,
            "p99_ms": r["p99_us"] / 1e3, "mean_ms": r["mean_us"] / 1e3,
            "errors": r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]}


async def _drive_httpx(url: str, path: str, bodies: list[bytes], connections: int, seconds: float,
                       headers: dict) -> dict:
    import httpx

    sent = failed = 0
    lat: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        async def worker(w: int) -> None:
            nonlocal sent, failed
            i = w
            while time.perf_counter() < deadline:
                sent += 1
                t = time.perf_counter()
                try:
                    r = await c.post(path, content=bodies[i % len(bodies)], headers=headers)
                    failed += r.status_code >= 400  # as wrk counts
                except httpx.HTTPError:
                    failed += 1
                lat.append(time.perf_counter() - t)
                i += connections

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(connections)))
        elapsed = time.perf_counter() - t0
    a = np.asarray(lat) * 1e3
    return {"tool": "httpx", "connections": connections, "client_threads": 1, "seconds": elapsed,
            "requests": sent, "rps": sent / elapsed, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "errors": failed}


async def _drive_steady(url: str, path: str, bodies: list[bytes], connections: int, seconds: float, headers: dict,
                        warmup_max_s: float) -> dict:
    import httpx

    lat: list[float] = []
    counted = failed = 0
    state = {"phase": "warmup", "t_start": 0.0, "t_end": 0.0}
    first_done: set[int] = set()
    all_done = asyncio.Event()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=warmup_max_s + seconds + 60) as c:
        async def worker(w: int) -> None:
            nonlocal counted, failed
            i = w
            while state["phase"] != "done":
                t = time.perf_counter()
                try:
                    r = await c.post(path, content=bodies[i % len(bodies)], headers=headers)
                    bad = r.status_code >= 400
                except httpx.HTTPError:
                    bad = True
                now = time.perf_counter()
                if state["t_start"] and state["t_start"] <= now <= state["t_end"]:  # answered inside the window
                    counted += 1
                    failed += bad
                    lat.append(now - t)
                first_done.add(w)
                if len(first_done) == connections:
                    all_done.set()
                i += connections

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(worker(w)) for w in range(connections)]
        try:
            await asyncio.wait_for(all_done.wait(), warmup_max_s)
        except asyncio.TimeoutError:
            pass
        warm = time.perf_counter() - t0
        state.update(phase="measure", t_start=time.perf_counter(), t_end=time.perf_counter() + seconds)
        await asyncio.sleep(seconds)
        state["phase"] = "done"
        done, pending = await asyncio.wait(tasks, timeout=warmup_max_s + 60)
        for t in pending:
            t.cancel()
    a = np.asarray(lat or [float("nan")]) * 1e3
    return {"tool": "httpx-steady", "connections": connections, "client_threads": 1, "seconds": seconds,
            "requests": counted, "rps": counted / seconds, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "errors": failed,
            "warmup_s": warm, "warmed_up": len(first_done) == connections}


def run_steady(url: str, path: str, bodies: list[bytes], connections: int, seconds: float,
               headers: dict | None = None, warmup_max_s: float = 120.0) -> dict:
    """Closed loop measured in steady state, for slow servers: `connections` clients send back to back; the
    window of `seconds` opens once every client has had one answer (the first wave, where a server that
    answers one request per second shows latencies of 1..N s, is left out; at most `warmup_max_s`), and counts
    the answers inside it (requests/s) with their latencies. wrk would count only a window's answers from its start, so with
    32 clients on a 1 request/s server a 30 s window holds almost none. Same fields as run_load, plus
    `warmup_s` and `warmed_up`."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    return asyncio.run(_drive_steady(url, path, bodies, connections, seconds, headers, warmup_max_s))


async def _drive_open_loop(url: str, path: str, bodies: list[bytes], rate: float, seconds: float, headers: dict,
                           drain_s: float) -> dict:
    import httpx

    n = max(1, int(rate * seconds))
    lat: list[float] = []
    failed = unfinished = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=seconds + drain_s) as c:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal failed
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                r = await c.post(path, content=bodies[i % len(bodies)], headers=headers)
                failed += r.status_code >= 400
            except httpx.HTTPError:
                failed += 1
            lat.append(time.perf_counter() - due)  # from when it was due, not sent: no coordinated omission

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=seconds + drain_s)
        for t in pending:
            t.cancel()
        unfinished = len(pending)
        elapsed = time.perf_counter() - t0
        now = time.perf_counter()
        lat += [now - (t0 + i / rate) for i, t in enumerate(tasks) if t in pending]  # lower bounds
    a = np.asarray(lat) * 1e3
    completed = n - failed - unfinished
    return {"tool": "httpx-open-loop", "rate": rate, "seconds": elapsed, "requests": n, "completed": completed,
            "rps": completed / elapsed, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "errors": failed + unfinished, "unfinished": unfinished}


def run_open_loop(url: str, path: str, bodies: list[bytes], rate: float, seconds: float,
                  headers: dict | None = None, drain_s: float = 30.0) -> dict:
    """Open loop (wrk2-style): `rate` requests/s sent on a fixed schedule for `seconds`, whatever the answers;
    each latency counted from when its request was due, so a server that falls behind shows its queue in the
    tail (a closed loop would wait for it and hide it). Requests still open `drain_s` after the last was due
    are cancelled, counted in `errors` and `unfinished`, with their time so far as latency (a lower bound).
    A Python client (asyncio + httpx): ~0.5 ms of CPU a request, fine at the rates of real-size models."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"expected a positive rate and duration; got rate {rate}, seconds {seconds}")
    return asyncio.run(_drive_open_loop(url, path, bodies, rate, seconds, headers, drain_s))


def run_load(url: str, path: str, bodies: list[bytes], connections: int, seconds: float,
             headers: dict | None = None, tool: str = "auto") -> dict:
    """Closed-loop load with wrk when available (tool="auto"|"wrk"), else httpx (tool="httpx")."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    if tool == "wrk" or (tool == "auto" and wrk_path()):
        return run_wrk(url, path, bodies, connections, seconds, headers=headers)
    return asyncio.run(_drive_httpx(url, path, bodies, connections, seconds, headers))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("path")
    p.add_argument("bodies", help="a file with one request body per line")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tool", choices=["auto", "wrk", "httpx"], default="auto")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s on a fixed schedule (0: closed loop)")
    a = p.parse_args(argv)
    bodies = [ln for ln in Path(a.bodies).read_bytes().splitlines() if ln.strip()]
    if a.rate > 0:
        print(json.dumps(run_open_loop(a.url, a.path, bodies, a.rate, a.seconds), indent=2))
        return 0
    print(json.dumps(run_load(a.url, a.path, bodies, a.connections, a.seconds, tool=a.tool), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
