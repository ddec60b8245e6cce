"""The fused ensemble graph vs a Python loop over the member sessions + numpy combine, in one run.

For each thread setting (1 intra-op thread, then 2) and batch size (1, 32, 256) the measured
configurations run interleaved in rounds (the order rotates every round), so machine drift hits
them alike:

* fused        one onnxruntime session over the whole ensemble graph (members + combiner)
* loop         one session per member, called in a Python loop, combined in numpy with the
               service's own `members`-mode combiner (service/combine.py)
* member:NAME  one member alone (the first member of each architecture)

Every session is built as the service builds it (service/runtime.make_session) with the same
thread count. Prints median and p99 latency, fused ÷ loop (goal ≤ 0.6 at batch 1) and fused ÷ one
member, plus a correctness check (loop-combined probabilities vs the fused graph's).

    python -m bench.bench_fused [--bundle DIR] [--smoke] [--json OUT] [--threads 1,2] [--rounds N] [--budget-s S]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BATCHES = (1, 32, 256)
THREADS = (1, 2)
GOAL_B1 = 0.6


@dataclass
class Sessions:
    """The bundle's fused graph and its members, opened with `threads` intra-op threads each."""

    threads: int
    input_name: str
    fused: object
    members: dict  # name -> InferenceSession, in the ensemble's member order
    combiner: dict
    weights: np.ndarray

    def run_fused(self, X: np.ndarray) -> np.ndarray:
        return self.fused.run(None, {self.input_name: X})[0]

    def run_member(self, name: str, X: np.ndarray) -> np.ndarray:
        return self.members[name].run(None, {self.input_name: X})[0]

    def run_loop(self, X: np.ndarray) -> np.ndarray:
        from service.combine import combine

        probs = np.stack([s.run(None, {self.input_name: X})[0] for s in self.members.values()])  # (M, B, C)
        return combine(self.combiner, probs, self.weights)


def open_sessions(bundle, threads: int) -> Sessions:
    """bundle: a verified fusion.bundle.Bundle."""
    from service.combine import member_weights
    from service.runtime import make_session

    m = bundle.manifest
    ens = m.variants["ensemble"]
    providers = ["CPUExecutionProvider"]
    members = {n: make_session(bundle.read_verified(n), threads, providers) for n in ens.members}
    combiner = dict(ens.combiner or {"name": "soft_vote", "weights": None})
    return Sessions(
        threads=threads, input_name=m.input.name,
        fused=make_session(bundle.read_verified("ensemble"), threads, providers),
        members=members, combiner=combiner, weights=member_weights(combiner, len(members)),
    )


def sample_rows(manifest, n: int) -> np.ndarray:
    """(n, F) raw float32 rows: the digits test split when the bundle was built on digits, else seeded noise."""
    F = manifest.input.n_features
    if manifest.dataset.get("name") == "digits" and F == 64:
        from fusion.data import load_digits  # numpy + scikit-learn only

        X = load_digits().X_test
    else:
        sc = manifest.input.scaling
        rng = np.random.default_rng(0)
        X = (rng.standard_normal((512, F)) * np.asarray(sc["std"]) + np.asarray(sc["mean"])).astype(np.float32)
    reps = -(-n // len(X))
    return np.ascontiguousarray(np.tile(X, (reps, 1))[:n], dtype=np.float32)


def outputs(bundle, X: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(fused, loop-combined) outputs on X: what the correctness check compares."""
    s = open_sessions(bundle, threads)
    return s.run_fused(X), s.run_loop(X)


def first_of_each_arch(manifest) -> list[str]:
    seen, names = set(), []
    for n in manifest.variants["ensemble"].members:
        arch = (manifest.members[n].arch or {}).get("arch", n)
        if arch not in seen:
            seen.add(arch)
            names.append(n)
    return names


def stats_ms(ns: list[int]) -> dict:
    a = np.asarray(ns, dtype=np.float64) / 1e6
    return {"median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "n": int(a.size)}


def measure(configs: dict, rounds: int, block: int, warmup: int, budget_s: float = float("inf"),
            min_rounds: int = 20) -> dict:
    """configs: name -> zero-argument callable. Interleaved rounds, order rotated each round; stops
    after `rounds`, or earlier once `min_rounds` are done and `budget_s` has passed (big batches)."""
    names = list(configs)
    for name in names:
        for _ in range(warmup):
            configs[name]()
    samples = {n: [] for n in names}
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    start = time.monotonic()
    try:
        for r in range(rounds):
            if r >= min(min_rounds, rounds) and time.monotonic() - start > budget_s:
                break
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn, out = configs[name], samples[name]
                for _ in range(block):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: stats_ms(v) for n, v in samples.items()}


def run(bundle_dir: str | Path, *, smoke: bool = False, threads=THREADS, batches=BATCHES,
        rounds: int | None = None, block: int = 5, budget_s: float = 5.0) -> dict:
    import onnxruntime as ort

    from fusion.bundle import read_bundle

    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    rounds = rounds or (3 if smoke else 200)
    block = 2 if smoke else block
    warmup = 2 if smoke else 20
    singles = first_of_each_arch(m)
    X_all = sample_rows(m, max(batches))

    # correctness first: the loop must compute what the fused graph computes
    X_check = sample_rows(m, 450)
    fused_out, loop_out = outputs(bundle, X_check)
    check = {
        "rows": len(X_check),
        "max_abs_diff": float(np.abs(fused_out - loop_out).max()),
        "argmax_agreement": float((fused_out.argmax(-1) == loop_out.argmax(-1)).mean()),
    }

    rows = []
    for t in threads:
        s = open_sessions(bundle, t)
        for b in batches:
            X = np.ascontiguousarray(X_all[:b])
            configs = {"fused": lambda X=X, s=s: s.run_fused(X), "loop": lambda X=X, s=s: s.run_loop(X)}
            configs |= {f"member:{n}": (lambda X=X, n=n, s=s: s.run_member(n, X)) for n in singles}
            res = measure(configs, rounds, block, warmup, budget_s)
            fused = res["fused"]["median_ms"]
            rows.append({
                "threads": t, "batch": b, "latency": res,
                "fused_over_loop": fused / res["loop"]["median_ms"],
                "fused_over_loop_p99": res["fused"]["p99_ms"] / res["loop"]["p99_ms"],
                "fused_over_member": {n: fused / res[f"member:{n}"]["median_ms"] for n in singles},
            })
        del s
    ens = m.variants["ensemble"]
    return {
        "bundle": str(bundle_dir), "bundle_version": m.bundle_version,
        "combiner": ens.combiner, "members": list(ens.members), "single_members": singles,
        "onnxruntime": ort.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "smoke": smoke, "rounds": rounds, "block": block, "budget_s": budget_s, "correctness": check, "rows": rows,
        "goal_b1": GOAL_B1,
    }


def render(report: dict) -> str:
    singles = report["single_members"]
    c = report["correctness"]
    ens = report["combiner"] or {}
    lines = [
        f"bundle {report['bundle']} ({report['bundle_version']}): ensemble = {ens.get('name')} over "
        f"{len(report['members'])} members; onnxruntime {report['onnxruntime']}, CPU, {report['cpu_count']} cores",
        f"correctness: loop vs fused on {c['rows']} rows: max |Δprob| {c['max_abs_diff']:.2g}, "
        f"argmax agreement {c['argmax_agreement']:.2%}",
        f"up to {report['rounds']} interleaved rounds (at least {min(20, report['rounds'])}, then about "
        f"{report['budget_s']:g} s per row) x "
        f"{report['block']} calls per configuration; latency in ms (median / p99; n = samples per configuration)",
        "",
    ]
    head = f"{'threads':>7} {'batch':>5} {'n':>5} | {'fused':>15} | {'loop':>15} | {'fused/loop':>10}"
    for n in singles:
        head += f" | {n:>15} | {'fused/' + n:>12}"
    lines += [head, "-" * len(head)]
    for r in report["rows"]:
        lat = r["latency"]

        def cell(name):
            return f"{lat[name]['median_ms']:7.3f}/{lat[name]['p99_ms']:7.3f}"

        line = f"{r['threads']:>7} {r['batch']:>5} {lat['fused']['n']:>5} | {cell('fused')} | {cell('loop')} | {r['fused_over_loop']:10.2f}"
        for n in singles:
            line += f" | {cell('member:' + n)} | {r['fused_over_member'][n]:12.2f}"
        lines.append(line)
    b1 = [r for r in report["rows"] if r["batch"] == 1]
    if b1:
        worst = max(r["fused_over_loop"] for r in b1)
        verdict = "met" if worst <= report["goal_b1"] else "NOT met"
        per = ", ".join(f"{r['threads']} thread(s): {r['fused_over_loop']:.2f}" for r in b1)
        lines += ["", f"goal fused ÷ loop ≤ {report['goal_b1']} at batch 1: {verdict} ({per})"]
    if report["smoke"]:
        lines.append("(smoke run: too few iterations for the numbers to mean anything)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_fused", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--smoke", action="store_true", help="a few iterations: checks that it runs, not speed")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    p.add_argument("--threads", default=",".join(map(str, THREADS)), help="intra-op thread settings, e.g. 1,2")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--rounds", type=int, help="interleaved rounds at most (default 200; smoke 3)")
    p.add_argument("--budget-s", type=float, default=5.0, help="seconds per (threads, batch) row, after 20 rounds")
    args = p.parse_args(argv)
    from bench import missing_bundle

    if missing_bundle(args.bundle):
        return 2
    try:
        threads = tuple(int(v) for v in args.threads.split(",") if v.strip())
        batches = tuple(int(v) for v in args.batches.split(",") if v.strip())
    except ValueError:
        print("bench_fused: --threads and --batches expect comma-separated integers", file=sys.stderr)
        return 2
    report = run(args.bundle, smoke=args.smoke, threads=threads, batches=batches, rounds=args.rounds,
                 budget_s=args.budget_s)
    print(render(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
