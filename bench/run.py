"""`make bench`: run every benchmark once and write docs/BENCHMARKS.md (+ benchmarks.json + plots).

Every figure is a ratio of two things measured side by side in the same run; absolute numbers
come with the machine they were measured on.

    python -m bench.run [--bundle DIR] [--smoke] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (module, extra args, reproduce command)
BENCHES = {
    "fused": ("bench.bench_fused", ["--threads", "1,2"], "python -m bench.bench_fused --bundle artifacts/bundle"),
    "scale": ("bench.bench_scale", [], "python -m bench.bench_scale"),
    "payload": ("bench.bench_payload", [], "python -m bench.bench_payload --bundle artifacts/bundle"),
    "http": ("bench.bench_http", [], "python -m bench.bench_http --bundle artifacts/bundle"),
    "batching": ("bench.bench_batching", [], "python -m bench.bench_batching --bundle artifacts/bundle --clients 32"),
    "merge": ("bench.bench_merge", [], "python -m bench.bench_merge --params 100000000 --models 5"),
}
NEEDS_BUNDLE = {"fused", "payload", "http", "batching"}


def run_one(name: str, bundle: str, smoke: bool, tmp: Path) -> dict:
    module, extra, _ = BENCHES[name]
    out = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", module, *extra, *(["--smoke"] if smoke else [])]
    if name in NEEDS_BUNDLE:
        cmd += ["--bundle", bundle]
    if name != "merge":
        cmd += ["--json", str(out)]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "seconds": time.time() - t}
    data = json.loads(proc.stdout.strip().splitlines()[-1]) if name == "merge" else json.loads(out.read_text())
    data["seconds"] = time.time() - t
    return data


def variants_latency(bundle: str, smoke: bool) -> dict:
    """Single-model variants ÷ the ensemble at batch 1, 1 thread, measured side by side."""
    import numpy as np
    import onnxruntime as ort

    from bench.bench_scale import measure
    from fusion.bundle import read_bundle

    b = read_bundle(bundle)
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
    X = np.zeros((1, b.manifest.input.n_features), dtype=np.float32)
    names = [n for n, e in b.manifest.variants.items()]
    sess = {n: ort.InferenceSession(b.read_verified(n), o, providers=["CPUExecutionProvider"]) for n in names}
    res = measure({n: (lambda s=s: s.run(None, {"input": X})) for n, s in sess.items()}, 5 if smoke else 100, 20)
    ens = res["ensemble"]["median_us"]
    k = len(b.manifest.variants["ensemble"].members)
    return {"k": k, "median_us": {n: r["median_us"] for n, r in res.items()},
            "over_ensemble": {n: r["median_us"] / ens for n, r in res.items() if n != "ensemble"}}


def targets(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, goal, met) rows from the raw results."""
    rows = []

    def add(label, value, goal_text, ok, fmt="{:.2f}"):
        rows.append((label, fmt.format(value) if value is not None else "n/a", goal_text, ok if value is not None else None))

    fused = r.get("fused", {})
    for b, goal in ((1, 0.55), (32, 0.8), (256, 1.0)):
        row = next((x for x in fused.get("rows", []) if x["batch"] == b and x["threads"] == 1), None)
        v = row["fused_over_loop"] if row else None
        add(f"fused ensemble ÷ Python loop over member sessions, batch {b}, 1 thread", v, f"≤ {goal}", v is not None and v <= goal)
    sc = r.get("scale", {})
    k5 = [x for x in sc.get("members", []) if x["k"] == 5]  # homogeneous: K equal MLPs vs one of them
    for x in k5:
        v = x["ensemble_over_one"]
        add(f"fused ensemble ÷ one member, batch {x['batch']} (K = 5 MLPs)", v, "≤ 1.1·K = 5.5", v <= 5.5)
    v = sc.get("fused_b256_fraction_of_peak")
    add("fused ensemble at batch 256, 1 thread, ÷ single-core GEMM peak", v, "≥ 0.85", v is not None and v >= 0.85, "{:.0%}")
    h = r.get("http", {})
    v = h.get("predict_over_echo_median")
    add("served /predict (batch 1) ÷ echo endpoint, median", v, "≤ 1.25", v is not None and v <= 1.25)
    bt = r.get("batching", {})
    v = bt.get("batching_speedup")
    add(f"throughput with ÷ without adaptive batching, {bt.get('clients', 32)} single-row clients", v, "≥ 3", v is not None and v >= 3)
    pl = r.get("payload", {})
    row = next((x for x in pl.get("rows", []) if x["batch"] == 256), None)
    v = row["over_in_process"]["oip_binary"] if row else None
    add("served binary tensors (OIP) at batch 256 ÷ in-process inference", v, "≤ 1.5", v is not None and v <= 1.5)
    v = row["over_in_process"]["json_predict"] if row else None
    add("served JSON /predict at batch 256 ÷ in-process inference (for comparison)", v, "(no goal)", None)
    var = r.get("variants", {})
    for name, ratio in var.get("over_ensemble", {}).items():
        add(f"{name} ÷ ensemble latency, batch 1 (K = {var['k']})", ratio, f"≈ 1/K = {1 / var['k']:.2f}", ratio <= 1.5 / var["k"])
    m = r.get("merge", {})
    v = m.get("throughput_ratio")
    add("weight merge GB/s ÷ torch copy_ of the same bytes", v, "≥ 0.9", v is not None and v >= 0.9)
    v = m.get("stream_rss_over_model")
    add("streaming merge peak RSS ÷ one model's size", v, "≤ 1.5", v is not None and v <= 1.5)
    return rows


def plots(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    sc = r.get("scale", {})
    if sc.get("members"):
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for b in sorted({x["batch"] for x in sc["members"]}):
            pts = sorted((x["k"], x["ensemble_us"]) for x in sc["members"] if x["batch"] == b)
            ax[0].plot(*zip(*pts), marker="o", label=f"batch {b}")
            ax[1].plot([k for k, _ in pts], [b / (us * 1e-6) for _, us in pts], marker="o", label=f"batch {b}")
        ax[0].set(xlabel="members K", ylabel="fused graph latency (µs)", yscale="log", title="latency vs K (1 thread)")
        ax[1].set(xlabel="members K", ylabel="samples / s", yscale="log", title="throughput vs K (1 thread)")
        for a in ax:
            a.legend()
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "bench_scale.png", dpi=110)
        plt.close(fig)
        made.append("bench_scale.png")
    pl = r.get("payload", {})
    if pl.get("rows"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        fmts = list(pl["rows"][0]["over_in_process"])
        width = 0.8 / len(pl["rows"])
        for i, row in enumerate(pl["rows"]):
            ax.bar([j + i * width for j in range(len(fmts))], [row["over_in_process"][f] for f in fmts], width, label=f"batch {row['batch']}")
        ax.set_xticks([j + width / 2 for j in range(len(fmts))], fmts)
        ax.set(ylabel="× in-process inference", yscale="log", title="cost of a served request by payload format")
        ax.axhline(1.5, color="grey", ls="--", lw=1)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bench_payload.png", dpi=110)
        plt.close(fig)
        made.append("bench_payload.png")
    return made


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, no GPU"


NOTES = """
What the targets that are not met show on this kind of machine (2 shared cores, client and server
on the same cores), with the side measurements made while investigating them (2026-11-26):

* **/predict ÷ echo.** The default ensemble holds 3 CNNs (2.9 MFLOP per row): the model alone takes
  about 0.13 ms at batch 1, a large share of a ~0.5–1 ms round trip. Called in-process through the
  ASGI app (no sockets), echo took 0.47 ms, `/predict` on one MLP 0.69 ms and on the ensemble 0.88 ms;
  validation, statistics and Prometheus add about 0.05 ms. The ratio is bounded below by
  (echo + model) ÷ echo; an MLP-only ensemble (the reference's) is about 4x cheaper to run.
* **Adaptive batching.** With HTTP handling at ~1 ms per request and the model at 0.03–0.13 ms,
  coalescing can only save the model's per-call overhead: throughput with and without batching is
  equal within noise. Batching pays where the model costs as much as the request (larger models, a
  GPU); it stays off by default (`FUSION_BATCH_MAX_ROWS`).
* **GEMM efficiency.** The peak is torch's 1024³ float32 matmul on one thread; the ensemble's GEMMs
  are 64- and 256-wide (onnxruntime's MLAS), whose first layer (K = 64) cannot reach that peak.
* Ratios within a few per cent of their goal (fused ÷ loop at batch 32) move across the line from
  run to run on these shared machines.
"""


def render(r: dict, images: list[str], smoke: bool) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` ({time.strftime('%Y-%m-%d')}) on {machine()}. Every figure is a ratio of two",
        "things measured side by side in the same run; these machines are shared and noisy, so absolute",
        "numbers drift while the ratios hold. Client and server share the same cores in the served figures.",
        *(["", "**Smoke run: too few iterations for these numbers to mean anything.**"] if smoke else []),
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for label, value, goal, ok in targets(r):
        lines.append(f"| {label} | {value} | {goal} | {'yes' if ok else 'n/a' if ok is None else '**no**'} |")
    lines += ["", "## Reading the misses", "", *NOTES.strip().splitlines()]
    lines += ["", "## How to reproduce each figure", ""]
    for name, (_, _, cmd) in BENCHES.items():
        secs = r.get(name, {}).get("seconds")
        lines.append(f"* {name}: `.venv/bin/{cmd}`" + (f" ({secs:.0f} s here)" if secs else "") +
                     (f" — **failed**: {r[name]['error']}" if "error" in r.get(name, {}) else ""))
    lines.append("* variant latency (merged/distilled ÷ ensemble): part of `python -m bench.run`")
    sc = r.get("scale", {})
    if sc.get("members"):
        lines += ["", "## Scale: members and member size (fused graph, 1 thread)", "",
                  "| arch | K | hidden | batch | ensemble µs | one member µs | ensemble ÷ one | GFLOP/s |", "|---|---|---|---|---|---|---|---|"]
        for x in sc["members"] + sc.get("size", []):
            lines.append(f"| {x['arch']} | {x['k']} | {x['hidden']} | {x['batch']} | {x['ensemble_us']:.1f} | {x['one_member_us']:.1f} | {x['ensemble_over_one']:.2f} | {x['gflops']:.1f} |")
        lines += ["", "Cost per extra member (slope of latency over K): " +
                  ", ".join(f"batch {b}: {v:.1f} µs" for b, v in sc.get("us_per_member", {}).items()) +
                  f". Single-core GEMM peak in this run: {sc.get('gemm_peak_gflops_1thread', 0):.1f} GFLOP/s."]
    for img in images:
        lines += ["", f"![{img}]({img})"]
    lines += ["", "Raw results: [benchmarks.json](benchmarks.json).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every benchmark runs")
    p.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--out", default="docs", help="where BENCHMARKS.md, benchmarks.json and plots go")
    a = p.parse_args(argv)
    if not (Path(a.bundle) / "manifest.json").is_file():
        print(f"no bundle at {a.bundle}: run `make bundle` first", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.only.split(",") if a.only else list(BENCHES)
    previous = out / "benchmarks.json"
    # --only re-measures a subset and keeps the other figures of the last full run
    results: dict = json.loads(previous.read_text()) if a.only and previous.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"== {name}", flush=True)
            results[name] = run_one(name, a.bundle, a.smoke, Path(tmp))
    results["variants"] = variants_latency(a.bundle, a.smoke)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=2, default=str))
    images = plots(results, out)
    (out / "BENCHMARKS.md").write_text(render(results, images, a.smoke))
    print(f"wrote {out / 'BENCHMARKS.md'}")
    return 0 if all("error" not in results[n] for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
