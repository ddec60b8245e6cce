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

from bench import missing_bundle

ROOT = Path(__file__).resolve().parents[1]

# name -> (module, extra args, reproduce command)
BENCHES = {
    "fused": ("bench.bench_fused", ["--threads", "1,2"], "python -m bench.bench_fused --bundle artifacts/bundle"),
    "scale": ("bench.bench_scale", [], "python -m bench.bench_scale"),
    "payload": ("bench.bench_payload", [], "python -m bench.bench_payload --bundle artifacts/bundle"),
    "http": ("bench.bench_http", [], "python -m bench.bench_http --bundle artifacts/bundle"),
    "batching": ("bench.bench_batching", [], "python -m bench.bench_batching --bundle artifacts/bundle --clients 32 --wide 1024,2048,4096"),
    "merge": ("bench.bench_merge", [], "python -m bench.bench_merge --params 100000000 --models 5"),
    "merge_sharded": ("bench.bench_merge_sharded", [], "python -m bench.bench_merge_sharded --gb 2 --shard-size 1GB"),  # issue 16
    "byo_image": ("bench.bench_byo_image", [], "python -m bench.bench_byo_image"),  # needs the [vision] extra
    "fused_real": ("bench.bench_fused_real", [], "python -m bench.bench_fused_real"),  # issue 18; the peers' ensembles
    "int8": ("bench.bench_int8", [], "python -m bench.bench_int8"),  # issue 18; needs examples/byo_images/work
    "remote": ("bench.bench_remote", [], "python -m bench.bench_remote --zoo artifacts/zoo/independent"),  # issue 19
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
    floor = ort.InferenceSession(identity_model(X.shape[1]), o, providers=["CPUExecutionProvider"])
    fns = {n: (lambda s=s: s.run(None, {"input": X})) for n, s in sess.items()}
    fns[FLOOR] = lambda: floor.run(None, {"input": X})
    res = measure(fns, 5 if smoke else 100, 20)
    floor_us = res.pop(FLOOR)["median_us"]
    ens = res["ensemble"]["median_us"]
    k = len(b.manifest.variants["ensemble"].members)
    return {"k": k, "median_us": {n: r["median_us"] for n, r in res.items()}, "floor_us": floor_us,
            "over_ensemble": {n: r["median_us"] / ens for n, r in res.items() if n != "ensemble"},
            # the model's own time: each median less the cost of calling onnxruntime at all
            "model_over_ensemble": {n: max(r["median_us"] - floor_us, 0.0) / max(ens - floor_us, 1e-9)
                                    for n, r in res.items() if n != "ensemble"}}


FLOOR = "__identity__"


def identity_model(n_features: int) -> bytes:
    """A one-node graph (Identity) with the bundle's input: what one onnxruntime call costs with no model in it."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_features])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_features])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "floor", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def scenario_label(sc: dict) -> str:
    what = ("the default ensemble" if sc["name"] == "default"
            else f"{sc['members']} MLPs 64-{sc['name'].split('-')[1]}-{sc['name'].split('-')[1]}-10")
    return f"{what} ({sc['batch1_ms']:.2f} ms at batch 1)"


def targets(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, goal, met) rows from the raw results."""
    rows = []

    def add(label, value, goal_text, ok, fmt="{:.3f}"):  # 3 decimals: 0.551 is not "0.55 ≤ 0.55, no"
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
    n = sc.get("gemm_peak_n", 1024)
    add(f"fused ensemble (5 MLPs) at batch 256, 1 thread, ÷ single-core GEMM peak ({n}³ matmul, the faster of "
        "torch and onnxruntime, medians of the same rounds)", v, "≥ 0.85", v is not None and v >= 0.85, "{:.0%}")
    h = r.get("http", {})
    v = h.get("predict_over_echo_median")
    # issue 18 dropped this goal (≤ 1.25): a 0.13 ms model costs more than a quarter of a 0.7 ms floor
    add("served /predict (batch 1, the default 8-member ensemble) ÷ echo endpoint, median", v,
        "(for comparison; goal dropped, see below)", None)
    v = h.get("one_over_echo_median")
    add(f"served /predict (batch 1, one model: {h.get('single_model_variant', '?')}) ÷ echo endpoint, median", v, "(for comparison)", None)
    v = h.get("non_model_over_echo_mean")
    add("served /predict less the model's own time in the server ÷ echo, means (what serving adds)", v, "(for comparison)", None)
    bt = r.get("batching", {})
    for sc_ in bt.get("scenarios", []):
        v = sc_["speedup"]  # issue 18 moved the ≥ 3 goal to real models: the peers section's rows
        add(f"throughput with ÷ without adaptive batching, {bt.get('clients', 32)} single-row clients: {scenario_label(sc_)}",
            v, "(for comparison; the goal is on real models below)", None)
    pl = r.get("payload", {})
    row = next((x for x in pl.get("rows", []) if x["batch"] == 256), None)
    v = row["over_in_process"]["oip_binary"] if row else None
    add("served binary tensors (OIP) at batch 256 ÷ in-process inference", v, "≤ 1.5", v is not None and v <= 1.5)
    v = row["over_in_process"]["json_predict"] if row else None
    add("served JSON /predict at batch 256 ÷ in-process inference (for comparison)", v, "(no goal)", None)
    var = r.get("variants", {})
    for name, ratio in var.get("over_ensemble", {}).items():
        model = var.get("model_over_ensemble", {}).get(name)
        if model is None:  # a run before the onnxruntime call floor was measured
            add(f"{name} ÷ ensemble latency, batch 1 (K = {var['k']})", ratio, f"≈ 1/K = {1 / var['k']:.2f}", ratio <= 1.5 / var["k"])
            continue
        add(f"{name} ÷ ensemble latency, batch 1 (K = {var['k']}), each less one onnxruntime call's cost "
            f"({var['floor_us']:.1f} µs, an Identity graph in the same rounds)", model, f"≈ 1/K = {1 / var['k']:.2f}",
            model <= 1.5 / var["k"])
        add(f"{name} ÷ ensemble latency, batch 1, whole calls", ratio, "(for comparison)", None)
    fr = r.get("fused_real", {})
    for kind, e in fr.get("ensembles", {}).items():  # issue 18: fusion never costs, on real-size members
        for x in e["rows"]:
            add(f"fused ensemble ÷ its members run one after another, {kind} ({' + '.join(e['members'])}), "
                f"batch {x['batch']}, {fr.get('threads', 1)} thread(s)", x["fused_over_loop"], "≤ 1.0",
                x["fused_over_loop"] <= 1.0)
    q = r.get("int8", {})
    if q.get("int8_over_fp32_batch32") is not None:
        v, loss = q["int8_over_fp32_batch32"], q["accuracy_loss_pp"]
        add(f"int8 (static, QDQ) ÷ float32 latency of the BYO image ensemble, batch 32, 1 thread, with its test "
            f"accuracy loss ({loss:+.2f} pp; goal ≤ 0.5 pp)", v, "≤ 0.6", v <= 0.6 and loss <= 0.5)
    for x in r.get("remote", {}).get("rows", []):
        add(f"front + 3 remote members (OIP binary, loopback) ÷ fused single-process ensemble, batch {x['batch']}",
            x["split_over_fused"], "(the hop's cost; no goal)", None)
    m = r.get("merge", {})
    v = m.get("throughput_ratio")
    add("weight merge GB/s ÷ torch copy_ of the same bytes", v, "≥ 0.9", v is not None and v >= 0.9)
    v = m.get("stream_rss_above_baseline_over_model")
    add("streaming merge peak RSS above the interpreter (torch imported) ÷ one model's size", v, "≤ 1.5",
        v is not None and v <= 1.5)
    v = m.get("stream_rss_over_model")
    add("streaming merge peak RSS ÷ one model's size, interpreter included", v, "(for comparison)", None)
    ms = r.get("merge_sharded", {})
    if ms.get("checkpoint_bytes"):
        what = f"2 x {ms['checkpoint_bytes'] / 1e9:.1f} GB bf16 HF checkpoints, sharded in and out"
        v = ms.get("rss_over_largest_shard")
        add(f"streaming merge of {what}: peak RSS ÷ largest shard ({ms['largest_shard_bytes'] / 1e9:.2f} GB)", v, "≤ 1.5",
            v is not None and v <= 1.5)
        v = ms.get("throughput_ratio")
        add(f"streaming merge of {what}: GB/s ÷ torch copy_ of the same bytes ({ms['threads']} thread(s))", v, "≥ 0.9",
            v is not None and v >= 0.9)
    return rows


def plots(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

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
        save(fig, "bench_scale.png")
    bt = r.get("batching", {})
    if bt.get("scenarios"):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        pts = sorted((x["batch1_ms"], x["speedup"], x["name"]) for x in bt["scenarios"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        for ms, sp, name in pts:
            ax.annotate(name, (ms, sp), textcoords="offset points", xytext=(4, -12), fontsize=8)
        ax.axhline(3, color="grey", ls="--", lw=1)
        ax.axhline(1, color="grey", ls=":", lw=1)
        ax.set(xscale="log", xlabel="ensemble latency at batch 1, in-process (ms)",
               ylabel="req/s with ÷ without batching",
               title=f"adaptive batching, {bt.get('clients', 32)} single-row clients ({bt['scenarios'][0].get('tool', '?')})")
        ax.grid(alpha=0.3)
        save(fig, "bench_batching.png")
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
        save(fig, "bench_payload.png")
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


def notes(r: dict) -> list[str]:
    """What the targets that are not met show, with this run's figures where they come from it."""
    h, sc, bt = r.get("http", {}), r.get("scale", {}), r.get("batching", {})
    out = []
    if h.get("predict"):
        out += [
            "* **/predict ÷ echo: the goal (≤ 1.25) is dropped** (issue 18: it cannot hold on tiny models); the "
            "row stays for comparison, and the served goals now compare whole servers on real models (§ Side by "
            f"side with the peers). In this run: echo {h['echo']['median_ms']:.3f} ms, /predict of one model "
            f"({h.get('single_model_variant')}) {h['predict_one']['median_ms']:.3f} ms, of the default ensemble "
            f"{h['predict']['median_ms']:.3f} ms (medians, one keep-alive connection). The ensemble's own time in the "
            f"server was {h['model_in_server_mean_ms']:.3f} ms on average: 8 members, 3 of them CNNs, whose weights "
            "(2.2 MB) no longer sit in the core's cache when the next request arrives (0.13–0.16 ms in a hot loop, "
            "measured separately). "
            "The ratio cannot reach 1.25 while the model alone costs more than a quarter of the floor. "
            "What serving itself adds, the round trip less the model's time, is the third row. Even the merged MLP "
            "takes longer in the server than in a benchmark loop (measured separately on 2026-11-26: 68 µs on average "
            "under one-connection load against 19 µs back to back; a loop that sleeps 0.3–1 ms between calls, as a "
            "server idles between requests, takes 31–51 µs): caches and the virtual CPU go cold between requests. "
            "Cutting the handler short step by step put the rest of the gap over echo (~30 µs before the model call) "
            "in the model call and the response.",
            "* **The floor got 3x lower, which raised the ratio** (measured separately on 2026-11-26, not by this run). "
            "With h11 + asyncio and BentoML's OpenTelemetry middleware on every request (no exporter configured), "
            "echo answered ~885 req/s at 8 connections (wrk) and /predict ~545; keeping the inference paths out of "
            "tracing gave echo ~2,100 (`FUSION_TRACING=1` brings it back), httptools + uvloop then ~2,800–3,000, "
            "/predict ~1,200–1,300. Every request is faster; the ratio is worse because its denominator shrank most.",
        ]
    if bt.get("scenarios"):
        d = next((x for x in bt["scenarios"] if x["name"] == "default"), None)
        if d:
            out.append(
                f"* **Adaptive batching on the default ensemble: {d['speedup']:.2f}x**; the ≥ 3x goal now applies to "
                "the real image and text ensembles (issue 18; § Side by side with the peers). Batching saves model "
                f"time only; at {d['batch1_ms']:.2f} ms per call the model is a small share of a request's server CPU. "
                "The gain grows with the model's cost (table and plot below): it passes 3x once a batch-1 call costs "
                "several times the HTTP floor, as with larger models or a GPU. The service turns batching on by "
                "itself only for models above that cost (FUSION_BATCH_MAX_ROWS=auto, the default).")
    if sc.get("gemm"):
        g = sc["gemm"]
        out.append(
            f"* **GEMM efficiency.** Peak in this run: torch {g['peak_torch']['gflops']:.0f}, onnxruntime "
            f"{g['peak_onnxruntime']['gflops']:.0f} GFLOP/s (1024³, 1 thread, medians of the same rounds as the ensemble). "
            "The members' GEMMs are 256x64 by 64x256 (K = 64: C is written after only 64 multiply-adds per element), "
            "256x256 by 256x256, and 256x256 by 256x10 (N = 10 fills less than one 16-wide vector tile); on their own, "
            "outside the ensemble (5 per graph, outputs copied out), they measured ~70–80, ~130 and ~50–60 GFLOP/s "
            "(measured separately on 2026-11-26, not by this run). Rewriting the members as batched (K, B, H) matmuls was tried: 0.8–0.9x the latency at "
            "batch 1 but 1.1–1.2x at 32 and 256 (likely because onnxruntime pre-packs only 2-D constant weights), so "
            "the graph keeps one Gemm chain per member.")
    ms = r.get("merge_sharded", {})
    if ms.get("throughput_ratio") is not None and ms["throughput_ratio"] < 0.9:
        text = (f"* **Sharded bf16 merge ÷ copy_: {ms['throughput_ratio']:.2f}.** copy_ moves the inputs' bytes once, "
                f"in memory ({ms['copy_gbps']:.2f} GB/s here); the merge ({ms['stream_gbps_input']:.2f} GB/s of input) "
                "reads every shard mapped from the page cache, computes in a fused C loop (fusion/merge/native.py: "
                "widen bf16, weigh, add, round back, in one pass over L1-sized tiles), and its workers (intra-op threads + 1) write "
                "every 1 MB block they merge at once, from cache, into shards whose blocks were reserved up front")
        if ms.get("compute_over_copy") is not None and ms.get("write_floor_over_copy"):
            text += (f". The arithmetic alone, in memory, ran at {ms['compute_over_copy']:.2f}x copy_; writing the "
                     f"output's bytes alone into new page-cache pages at {ms['write_floor_over_copy']:.2f}x copy_ (per "
                     "byte of input): the output's writes bound the merge (a file takes one write at a time). The "
                     "torch path (widen, scale, add and round as separate passes) ran at "
                     f"{ms.get('torch_path_throughput_ratio', float('nan')):.2f}x copy_ in the same run, to the same "
                     f"bytes ({'checked' if ms.get('same_bytes_as_torch_path') else 'NOT checked'}).")
        else:
            text += "; copy_ of bytes already in memory is no floor for a merge that has to read and write files."
        out.append(text)
    fr = r.get("fused_real", {})
    for kind, e in fr.get("ensembles", {}).items():
        for x in (x for x in e["rows"] if x["fused_over_loop"] > 1.0):
            gap_ms = x["fused_ms"] - x["loop_ms"]
            out.append(
                f"* **Fused ÷ members one after another, {kind} at batch {x['batch']}: {x['fused_over_loop']:.3f}.** "
                f"The two medians differ by {gap_ms:.2f} ms of {x['loop_ms']:.0f} ms ({x['n']} interleaved rounds): the "
                f"same member subgraphs run in both, and what fusion saves (one onnxruntime call instead of "
                f"{len(e['members'])}, ~10 µs each, and the Python combiner) is below this run's spread at this "
                f"cost, in either direction (the other rows of the same ensembles: "
                + ", ".join(f"{k} b{y['batch']} {y['fused_over_loop']:.3f}" for k, f in fr['ensembles'].items()
                            for y in f['rows'] if y is not x)
                + "). Fusion does not cost here; it cannot be shown to gain on a model of hundreds of ms either.")
    q = r.get("int8", {})
    if q.get("int8_over_fp32_batch32") is not None and not q.get("goal_met", True):
        by = q.get("int8_over_fp32_batch32_by_threads", {})
        b1 = {x["threads"]: x["int8_over_fp32"] for x in q.get("rows", []) if x["batch"] == 1}
        flags = q.get("cpu_int8_flags")
        vnni = [f for f in flags or [] if "vnni" in f or "amx" in f]
        cpu = ("" if flags is None else
               f" This CPU has {', '.join(flags) or 'none of AVX2, AVX-512, VNNI, AMX'}"
               + (": VNNI is there, so the int8 kernels already run at their best here" if vnni else
                  ": no VNNI, so onnxruntime's u8s8 kernels multiply int8 with vpmaddubsw + vpmaddwd, about twice "
                  "float32 FMA at best, before the QuantizeLinear/DequantizeLinear steps left between the float "
                  "parts (the heads, the combiner) and the residual adds")
               + ".")
        out.append(
            f"* **int8 ÷ float32 at batch 32: {q['int8_over_fp32_batch32']:.3f}** ("
            + ", ".join(f"{t} thread(s) {v:.3f}" for t, v in by.items())
            + f"; at batch 1 " + ", ".join(f"{t} thread(s) {v:.3f}" for t, v in b1.items())
            + f"; test accuracy {q['accuracy_loss_pp']:+.2f} pp; files {q['int8_bytes'] / q['fp32_bytes']:.2f}x)."
            + cpu + " What would reach 0.6: a CPU with AVX-512 VNNI or AVX-VNNI (4 int8 multiply-adds per lane in "
            "one instruction; common in servers since 2019) or AMX, with the same bundle (not measured here: "
            "no such CPU was at hand).")
    m = r.get("merge", {})
    if m.get("baseline_rss_bytes"):
        out.append(
            f"* **Streaming merge peak RSS: {m['stream_rss_above_baseline_over_model']:.2f} of one model above the "
            f"interpreter, {m['stream_rss_over_model']:.2f} with it.** The goal is on what the merge holds: a process "
            f"that has only imported torch already holds {m['baseline_rss_bytes'] / 1e6:.0f} MB here (torch's PyPI "
            f"build loads its CUDA libraries even on a CPU machine), a constant that has nothing to do with the "
            f"merge and that a {m['model_bytes'] / 1e6:.0f} MB test model cannot outweigh; on the 2 GB sharded "
            "checkpoints below the same total stays under one shard. Loading the models and merging in memory "
            f"reaches {m['in_memory_rss_over_model']:.2f}.")
    var = r.get("variants", {})
    if var.get("floor_us") is not None:
        whole = ", ".join(f"{n} {v:.3f}" for n, v in var["over_ensemble"].items())
        out.append(
            f"* **Single models ÷ the ensemble at batch 1.** One onnxruntime call costs {var['floor_us']:.1f} µs here "
            f"with no model in it (an Identity graph, the same rounds), against {var['median_us']['ensemble']:.1f} µs "
            f"for the {var['k']}-member ensemble; a one-MLP variant is mostly that fixed cost, so the whole calls' "
            f"ratios ({whole}) say little about the models; the target compares the models' own time.")
    out.append("* Ratios within a few per cent of their goal (fused ÷ loop at batch 32) move across the line from "
               "run to run on these shared machines.")
    return out



def _full_run(r: dict) -> dict:
    """When and where the last full run measured (today, here, for results without the stamp)."""
    return r.get("full_run") or {"date": time.strftime("%Y-%m-%d"), "machine": machine()}


def _partial_runs(r: dict) -> str:
    """`--only` runs since the last full run, named so a reader knows which figures are newer."""
    parts = [f"{', '.join(x['benches'])} re-measured {x['date']} on {x['machine']}" for x in r.get("partial_runs", [])]
    return f" ({'; '.join(parts)})" if parts else ""


def peers_section(pr: dict | None) -> tuple[list[str], list[str], list[str]]:
    """(target rows, notes, section lines) from `make bench-peers`' results (docs/peers.json), or nothing."""
    if not pr or not pr.get("ensembles"):
        return [], [], []
    from bench.peers.report import NAMES, TRITON, goals, servers, table

    rows, why = goals(pr)
    load = pr.get("loadavg", {})
    lines = ["", "## Side by side with the peers (issue 18)", "",
             f"From `make bench-peers` on {pr['date']} ({pr['machine']}; load average {load.get('start', '?')} at the "
             f"start, {load.get('end', '?')} at the end; whole run {pr.get('total_s', 0):.0f} s): every server serves "
             "the same ensemble on this machine, one at a time, driven by the same load generator; req/s · p50 · p99 "
             "ms per point. How each point is measured, and the drift of ours between its two runs: "
             "[PEERS.md](PEERS.md).", "",
             "![requests/s and p99 per server](peers.png)", ""]
    for kind, ens in pr["ensembles"].items():
        lines += [f"### {NAMES.get(kind, kind)}", "", *table(ens, pr), ""]
    lines += ["### The servers: versions, settings, commands", "", *servers(pr), "", TRITON, ""]
    return rows, why, lines


def render(r: dict, images: list[str], smoke: bool, peers: dict | None = None) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` ({_full_run(r)['date']}) on {_full_run(r)['machine']}{_partial_runs(r)}. Every figure is a ratio of two",
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
    peer_rows, peer_notes, peer_lines = peers_section(peers)
    lines += [row.replace("| no |", "| **no** |") for row in peer_rows]
    lines += ["", "## Reading the misses", "", *notes(r), *peer_notes, *peer_lines]
    h = r.get("http", {})
    if h.get("predict"):
        lines += ["", "## Served path (one server, batch 1)", "",
                  "| endpoint | median ms | p99 ms | req/s at 8 connections |", "|---|---|---|---|"]
        rps = h.get("rps", {})
        for key, label in (("echo", "/echo (no model)"), ("predict_one", f"/predict, {h.get('single_model_variant')}"),
                           ("predict", "/predict, ensemble")):
            rate = rps.get(key, {}).get("rps")
            lines.append(f"| {label} | {h[key]['median_ms']:.3f} | {h[key]['p99_ms']:.3f} | "
                         + (f"{rate:.0f} ({rps[key].get('tool', '?')})" if rate else "") + " |")
    bt = r.get("batching", {})
    if bt.get("scenarios"):
        lines += ["", f"## Adaptive batching: {bt.get('clients', 32)} single-row clients "
                      f"({bt['scenarios'][0].get('tool', '?')}, {bt.get('rounds')} alternating rounds of {bt.get('seconds_per_run')} s)", "",
                  "| ensemble | batch-1 ms (in-process) | req/s off | req/s on | on ÷ off | rows per call "
                  "| p50 / p99 ms off | p50 / p99 ms on |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in bt["scenarios"]:
            rows = f"{x['mean_batch_rows']:.1f}" if x.get("mean_batch_rows") else "-"
            lat = (f"{x['p50_ms_off']:.1f} / {x['p99_ms_off']:.1f} | {x['p50_ms_on']:.1f} / {x['p99_ms_on']:.1f}"
                   if "p50_ms_off" in x else " | ")
            lines.append(f"| {scenario_label(x)} | {x['batch1_ms']:.2f} | {x['rps_off']:.0f} | {x['rps_on']:.0f} | "
                         f"{x['speedup']:.2f} | {rows} | {lat} |")
        lines += ["", "Off: cheap calls on the event loop, expensive ones in worker threads (both cores). On: "
                  "`FUSION_BATCH_MAX_ROWS=256`, `FUSION_BATCH_INSTANCES=2`. Rows per call from the server's "
                  "`fusion_batch_rows` histogram."]
    bi = r.get("byo_image", {})
    if bi.get("rows"):
        members = ", ".join(f"{s} ({bi['parameters'][n] / 1e6:.1f} M parameters)" for n, s in bi["members"].items())
        lines += ["", "## Bring-your-own image ensemble: fused ÷ members loop", "",
                  f"Soft vote over {members}, random weights, {'x'.join(map(str, bi['image']))} raw pixels normalised "
                  f"inside the graphs; built like a recipe's `[[members]]` (each exported alone, composed into one "
                  f"graph). Fused: the one `ensemble.onnx` session; loop: the three member sessions one after another, "
                  f"softmaxed and soft-voted in numpy (members mode). {bi['threads']} intra-op thread(s), "
                  + (f"measured {bi['date']} on {bi['machine']} (1-minute load average {bi['load_average']:.1f} at the "
                     f"end: the machine was shared), " if bi.get("date") and bi.get("load_average") is not None else "")
                  + f"torch {bi.get('torch', '?')}" + ("" if bi.get("machine") else f", onnxruntime {bi.get('onnxruntime', '?')}")
                  + f"; fused vs loop max |Δprob| "
                  f"{bi['max_abs_diff_fused_vs_loop']:.1g}.", "",
                  "| batch | fused ms | loop ms | fused ÷ loop |", "|---|---|---|---|"]
        for x in bi["rows"]:
            lines.append(f"| {x['batch']} | {x['fused_ms']:.2f} | {x['loop_ms']:.2f} | {x['fused_over_loop']:.3f} |")
    rm = r.get("remote", {})
    if rm.get("rows"):
        lines += ["", f"## Split layout: front + {len(rm['members'])} remote members on loopback", "",
                  f"Members {', '.join(rm['members'])}; each a `bentoml serve` of its own split bundle, the front calling "
                  f"them over OIP with binary tensors and pooled keep-alive connections; the single process serves the "
                  f"same bundle (fused graph, and members mode: the member sessions combined in numpy). Medians of "
                  f"{rm['rounds']} alternating rounds, 1 intra-op thread everywhere, client and 5 servers on the same cores.", "",
                  "| batch | fused ms | members mode ms | front + remote ms | front ÷ fused | front ÷ members mode | max abs diff |",
                  "|---|---|---|---|---|---|---|"]
        for x in rm["rows"]:
            lines.append(f"| {x['batch']} | {x['fused_ms']:.3f} | {x['members_ms']:.3f} | {x['split_ms']:.3f} | "
                         f"{x['split_over_fused']:.2f} | {x['split_over_members']:.2f} | {x['max_abs_diff']:.1g} |")
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
                  f". Single-core GEMM peak in this run: {sc.get('gemm_peak_gflops_1thread', 0):.1f} GFLOP/s "
                  f"(torch {sc.get('gemm', {}).get('peak_torch', {}).get('gflops', 0):.1f}, onnxruntime "
                  f"{sc.get('gemm', {}).get('peak_onnxruntime', {}).get('gflops', 0):.1f})."]
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
    p.add_argument("--render", action="store_true", help="only re-write BENCHMARKS.md from the saved JSON files")
    a = p.parse_args(argv)
    if a.render:
        rerender(Path(a.out))
        return 0
    if missing_bundle(a.bundle):
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.only.split(",") if a.only else list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES) - {"variants"})
    if unknown:
        p.error(f"--only expected names from {', '.join([*BENCHES, 'variants'])}; got {', '.join(unknown)}")
    previous = out / "benchmarks.json"
    # --only re-measures a subset and keeps the other figures of the last full run
    results: dict = json.loads(previous.read_text()) if a.only and previous.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (n for n in names if n != "variants"):
            print(f"== {name}", flush=True)
            results[name] = run_one(name, a.bundle, a.smoke, Path(tmp))
    if not a.only or "variants" in names:  # --only re-measures only what it names
        results["variants"] = variants_latency(a.bundle, a.smoke)
    stamp = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    if a.only:
        # an earlier --only run is the source only of what this one did not re-measure (none left: dropped)
        runs = [{**x, "benches": [b for b in x["benches"] if b not in names]} for x in results.get("partial_runs", [])]
        results["partial_runs"] = [*(x for x in runs if x["benches"]), {**stamp, "benches": names}]
    else:
        results["full_run"] = stamp
        results.pop("partial_runs", None)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=2, default=str))
    write_doc(results, out, a.smoke)
    return 0 if all("error" not in results[n] for n in names) else 1


def write_doc(results: dict, out: Path, smoke: bool = False) -> Path:
    """docs/BENCHMARKS.md (+ plots) from `make bench`'s results and, when present, `make bench-peers`' (peers.json)."""
    images = plots(results, out)
    peers = out / "peers.json"
    doc = out / "BENCHMARKS.md"
    doc.write_text(render(results, images, smoke, json.loads(peers.read_text()) if peers.is_file() else None))
    print(f"wrote {doc}")
    return doc


def rerender(out: Path) -> Path:
    """Re-write BENCHMARKS.md from the saved results (after `make bench-peers`), measuring nothing."""
    previous = out / "benchmarks.json"
    return write_doc(json.loads(previous.read_text()) if previous.is_file() else {}, out)


if __name__ == "__main__":
    sys.exit(main())
