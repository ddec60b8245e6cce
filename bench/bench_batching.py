"""Served throughput with and without adaptive batching, at N concurrent single-row clients.

Two servers on the same bundle, one with `FUSION_BATCH_MAX_ROWS=0` (off) and one with batching on,
driven alternately by the same bounded asyncio client (loopback only). Client and server share
this machine's cores: the report says how many there are.

    python -m bench.bench_batching [--bundle DIR] [--clients 32] [--seconds 5] [--smoke] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson


async def drive(url: str, rows: list[bytes], clients: int, seconds: float, max_requests: int) -> dict:
    """Closed loop: `clients` workers each send one request after the other until the time or count runs out."""
    sent = failed = 0
    lat: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        async def worker(w: int):
            nonlocal sent, failed
            i = w
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t = time.perf_counter()
                r = await c.post("/predict", content=rows[i % len(rows)], headers={"Content-Type": "application/json"})
                lat.append(time.perf_counter() - t)
                failed += r.status_code != 200
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"requests": sent, "failed": failed, "rps": sent / elapsed,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3)}


def run(bundle: str, clients: int = 32, seconds: float = 5.0, rounds: int = 3, smoke: bool = False) -> dict:
    from fusion.data import load_digits
    from tests.server import Server

    if smoke:
        clients, seconds, rounds = 4, 0.5, 1
    X = load_digits().X_test
    rows = [orjson.dumps({"inputs": [r.tolist()]}) for r in X]
    common = {"FUSION_MAX_CONCURRENCY": str(4 * clients), "FUSION_INTRA_OP_THREADS": "1"}
    results: dict = {"off": [], "on": []}
    with Server(bundle, env={**common, "FUSION_BATCH_MAX_ROWS": "0"}) as off, \
         Server(bundle, env={**common, "FUSION_BATCH_MAX_ROWS": "256"}) as on:
        for srv in (off, on):  # warm-up
            asyncio.run(drive(srv.url, rows, clients, min(seconds, 1.0), 10**6))
        for _ in range(rounds):  # alternate so that drift hits both alike
            for name, srv in (("off", off), ("on", on)):
                results[name].append(asyncio.run(drive(srv.url, rows, clients, seconds, 10**6)))
    best = {k: max(v, key=lambda r: r["rps"]) for k, v in results.items()}
    return {"clients": clients, "seconds": seconds, "rounds": rounds, "cpu_count": os.cpu_count(),
            "runs": results, "rps_off": best["off"]["rps"], "rps_on": best["on"]["rps"],
            "batching_speedup": best["on"]["rps"] / best["off"]["rps"],
            "failed": sum(r["failed"] for v in results.values() for r in v)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not (Path(a.bundle) / "manifest.json").exists():
        print(f"no bundle at {a.bundle}: run `make bundle` first", file=sys.stderr)
        return 2
    res = run(a.bundle, a.clients, a.seconds, smoke=a.smoke)
    print(f"{res['clients']} concurrent single-row clients, {res['cpu_count']} cores shared by client and server")
    print(f"  batching off: {res['rps_off']:8.0f} req/s")
    print(f"  batching on : {res['rps_on']:8.0f} req/s  ({res['batching_speedup']:.2f}x), failed requests: {res['failed']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
