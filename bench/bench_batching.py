"""Served throughput with and without adaptive batching, at N concurrent single-row clients, for
ensembles of growing cost: where does batching pay?

For each bundle, two servers run side by side: one with `FUSION_BATCH_MAX_ROWS=0` (off: cheap calls
on the event loop, expensive ones in worker threads, so the baseline already uses both cores) and
one with batching on (`FUSION_BATCH_MAX_ROWS=256`, `FUSION_BATCH_INSTANCES=2`). They are driven
alternately, round after round, by the same closed-loop load generator (wrk when installed, see
bench/loadgen.py). The bundles:

* `default`: the bundle given (--bundle), the product's default 8-member ensemble;
* `mlp-<H>`: 5 MLPs 64-H-H-10 trained on digits for one epoch (quality is not the point here),
  built once into artifacts/bench/ (--wide, default 1024,2048,4096). Their batch-1 cost grows from
  ~1 ms to ~25-35 ms, as for larger models: a batch of 32 rows costs far less than 32 calls of one.

Batching can only save model time: with HTTP at ~0.3 ms of server CPU per request, the gain grows
with the model's batch-1 cost (reported in-process beside each row, 1 thread) and the plot shows it.

    python -m bench.bench_batching [--bundle DIR] [--clients 32] [--seconds 5] [--wide 1024,2048,4096]
                                   [--smoke] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from bench import metric_sums, missing_bundle

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WIDE = (1024, 2048, 4096)
BENCH_DIR = ROOT / "artifacts" / "bench"


def wide_bundle(hidden: int, root: Path = BENCH_DIR, n_members: int = 5, epochs: int = 1) -> Path:
    """A bundle of `n_members` MLPs 64-hidden-hidden-10 (seeded, trained `epochs` on digits); built once."""
    out = root / f"mlp-{hidden}" / "bundle"
    if (out / "manifest.json").exists():
        return out
    from fusion.build import build_bundle
    from fusion.data import load_digits
    from fusion.recipe import Recipe, override
    from fusion.zoo import TrainConfig, ZooConfig, train_zoo

    zoo = out.parent / "zoo"
    train_zoo(load_digits(), zoo, ZooConfig(n_mlp=n_members, n_cnn=0, mlp_hidden=(hidden, hidden),
                                            train=TrainConfig(epochs=epochs)))
    r = override(Recipe(), "zoo", dir=str(zoo))
    r = override(r, "distill", enabled=False)
    r = override(r, "merge", method="")
    r = override(r, "build", out=str(out), compare=False)
    build_bundle(r)
    return out


def batch1_ms(bundle: Path, rows: np.ndarray, reps: int = 20) -> float:
    """Median in-process latency of the bundle's ensemble at batch 1 on 1 thread."""
    from fusion.bundle import read_bundle
    from service.runtime import make_session

    b = read_bundle(bundle)
    s = make_session(b.read_verified("ensemble"), 1, ["CPUExecutionProvider"])
    name = b.manifest.input.name
    x = np.ascontiguousarray(rows[:1], dtype=np.float32)
    s.run(None, {name: x})
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, {name: x})
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def batch_stats(url: str) -> dict:
    """Mean rows per model call, from the batcher's Prometheus histogram (summed over models)."""
    total = metric_sums(httpx.get(url + "/metrics", timeout=10).text, ("fusion_batch_rows_sum", "fusion_batch_rows_count"))
    calls = total["fusion_batch_rows_count"]
    return {"calls": calls, "mean_rows": total["fusion_batch_rows_sum"] / calls if calls else None}


def check_answers(url: str, rows: np.ndarray, expected: np.ndarray) -> int:
    """Wrong or failed answers among a few concurrent requests (the batched path must answer each exactly)."""
    import asyncio

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            rs = await asyncio.gather(*(c.post("/predict", json={"inputs": [r.tolist()]}) for r in rows))
        bad = 0
        for r, e in zip(rs, expected):
            bad += r.status_code != 200 or not np.allclose(r.json()["probabilities"][0], e, atol=1e-5)
        return bad

    return asyncio.run(go())


def scenario(name: str, bundle: Path, rows: np.ndarray, clients: int, seconds: float, rounds: int) -> dict:
    from bench.loadgen import run_load
    from fusion.bundle import read_bundle
    from service.runtime import make_session
    from tests.server import Server

    bodies = [orjson.dumps({"inputs": [r.tolist()]}) for r in rows]
    b = read_bundle(bundle)
    ref = make_session(b.read_verified("ensemble"), 1, ["CPUExecutionProvider"])
    expected = ref.run(None, {b.manifest.input.name: rows[:16]})[0]
    # a wide bundle loads and warms up slowly on busy cores: a refused load would end the benchmark
    common = {"FUSION_MAX_CONCURRENCY": str(4 * clients), "FUSION_INTRA_OP_THREADS": "1", "FUSION_LOAD_TIMEOUT_S": "600",
              "FUSION_AB_WEIGHTS": "ensemble=1", "FUSION_ACCESS_LOG": "0"}
    runs: dict = {"off": [], "on": []}
    with Server(bundle, env={**common, "FUSION_BATCH_MAX_ROWS": "0"}) as off, \
         Server(bundle, env={**common, "FUSION_BATCH_MAX_ROWS": "256", "FUSION_BATCH_INSTANCES": "2"}) as on:
        wrong = sum(check_answers(s.url, rows[:16], expected) for s in (off, on))
        for srv in (off, on):  # warm-up
            run_load(srv.url, "/predict", bodies, clients, min(seconds, 1.0))
        for r in range(rounds):  # alternate (and swap the order) so that drift hits both alike
            for mode, srv in ((("off", off), ("on", on)) if r % 2 == 0 else (("on", on), ("off", off))):
                runs[mode].append(run_load(srv.url, "/predict", bodies, clients, seconds))
        stats = batch_stats(on.url)
    med = {k: float(np.median([x["rps"] for x in v])) for k, v in runs.items()}
    lat = {f"{q}_ms_{k}": float(np.median([x[f"{q}_ms"] for x in v])) for k, v in runs.items() for q in ("p50", "p99")}
    return {"name": name, "bundle": str(bundle), "members": len(b.manifest.variants["ensemble"].members),
            "batch1_ms": batch1_ms(bundle, rows), "rps_off": med["off"], "rps_on": med["on"],
            "speedup": med["on"] / med["off"], "mean_batch_rows": stats["mean_rows"], "runs": runs, **lat,
            "tool": runs["on"][0]["tool"], "errors": sum(x["errors"] for v in runs.values() for x in v),
            "wrong": wrong}


def run(bundle: str, clients: int = 32, seconds: float = 5.0, rounds: int = 3, smoke: bool = False,
        wide: tuple[int, ...] = WIDE, bench_dir: Path = BENCH_DIR) -> dict:
    from fusion.data import load_digits

    if smoke:
        clients, seconds, rounds = 4, 1.0, 1
        wide = (16,) if wide == WIDE else wide  # a tiny extra bundle: the path, not the figure
    X = np.ascontiguousarray(load_digits().X_test, dtype=np.float32)
    plan = [("default", Path(bundle))] + [(f"mlp-{h}", wide_bundle(h, bench_dir)) for h in wide]
    out = {"clients": clients, "seconds_per_run": seconds, "rounds": rounds, "cpu_count": os.cpu_count(),
           "scenarios": [scenario(n, b, X, clients, seconds, rounds) for n, b in plan]}
    d = out["scenarios"][0]
    out |= {"rps_off": d["rps_off"], "rps_on": d["rps_on"], "batching_speedup": d["speedup"],
            "failed": sum(s["errors"] for s in out["scenarios"]), "wrong": sum(s["wrong"] for s in out["scenarios"])}
    top = max(out["scenarios"], key=lambda s: s["batch1_ms"])
    out["max_cost_speedup"] = top["speedup"]
    out["max_cost_scenario"] = top["name"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--wide", default=",".join(map(str, WIDE)), help="hidden widths of the extra bundles ('' for none)")
    p.add_argument("--bench-dir", default=str(BENCH_DIR), help="where the extra bundles are built (once)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if missing_bundle(a.bundle):
        return 2
    wide = tuple(int(w) for w in a.wide.split(",") if w.strip())
    res = run(a.bundle, a.clients, a.seconds, a.rounds, smoke=a.smoke, wide=wide, bench_dir=Path(a.bench_dir))
    print(f"{res['clients']} concurrent single-row clients ({res['scenarios'][0]['tool']}), "
          f"{res['cpu_count']} cores shared by client and server")
    print(f"  {'bundle':10s} {'batch-1 ms':>10s} {'off req/s':>10s} {'on req/s':>9s} {'on÷off':>7s} {'rows/call':>9s}")
    for s in res["scenarios"]:
        rows = f"{s['mean_batch_rows']:.1f}" if s["mean_batch_rows"] else "-"
        print(f"  {s['name']:10s} {s['batch1_ms']:10.2f} {s['rps_off']:10.0f} {s['rps_on']:9.0f} {s['speedup']:7.2f} {rows:>9s}")
    print(f"  failed requests: {res['failed']}, wrong answers: {res['wrong']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 1 if res["failed"] or res["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
