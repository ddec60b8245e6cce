"""Fused ensemble ÷ its members run one after another, on the real-size ensembles of `make bench-peers` (issue 18).

Issue 18's goal "fusion never costs": the one fused `ensemble.onnx` session of a bundle against its members'
own sessions (`members/NAME.onnx`) called in turn, each output softmaxed when it is logits and combined in
numpy by the bundle's combiner (what members mode does, service/members.py), at batch 1 and 32. The bundles are
the ones bench/peers/ensembles.py builds for the peers' comparison: (a) resnet18 + resnet50 + ViT-S over
3x224x224 images, (b) three BERT-minis over 128 tokens (built on first use, cached under artifacts/peers/work/).
Random inputs: pixels 0..255 (normalised inside the graphs); token ids below 100 with a full attention mask at
the bundle's max_length (every row as long as requests get). Interleaved rounds (bench/bench_fused.py's
`measure`), every session opened as the service opens it (service/runtime.make_session) with `--threads`.

    python -m bench.bench_fused_real [--smoke] [--json OUT] [--threads 1] [--only image|text] [--budget-s 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 32)


def feeds_for(sess, batch: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random feeds for every input of the fused session, by name (a sequence dimension gets `seq`)."""
    out = {}
    for i in sess.get_inputs():
        shape = [batch if k == 0 else (d if isinstance(d, int) else seq) for k, d in enumerate(i.shape)]
        if "float" in i.type:
            out[i.name] = rng.integers(0, 256, shape).astype(np.float32)
        elif "mask" in i.name:
            out[i.name] = np.ones(shape, np.int64)
        elif "type" in i.name:
            out[i.name] = np.zeros(shape, np.int64)
        else:
            out[i.name] = rng.integers(0, 100, shape).astype(np.int64)
    return out


def member_runner(entry, sess, bundle_inputs: list[str]):
    """A callable feeds -> probabilities for one member, as members mode runs it."""
    from service.runtime import softmax_rows

    names = [i.name for i in sess.get_inputs()]
    sources = [entry.input_map.get(n, n) if entry.input_map else (n if n in bundle_inputs else bundle_inputs[k])
               for k, n in enumerate(names)]
    outs = [o.name for o in sess.get_outputs()]
    index = outs.index(entry.output_name) if entry.output_name in outs else 0
    logits = entry.output == "logits"

    def run(feeds):
        y = sess.run(None, {n: feeds[s] for n, s in zip(names, sources)})[index]
        return softmax_rows(y) if logits else y

    return run


def bench_bundle(bundle_dir: Path, threads: int, batches, rounds: int, budget_s: float, smoke: bool) -> dict:
    from bench.bench_fused import measure
    from fusion.bundle import read_bundle
    from fusion.combine import combine
    from service.runtime import make_session

    b = read_bundle(bundle_dir)
    ens = b.manifest.variants["ensemble"]
    providers = ["CPUExecutionProvider"]
    fused = make_session(b.read_verified("ensemble"), threads, providers)
    bundle_inputs = [i.name for i in fused.get_inputs()]
    members = [member_runner(b.manifest.members[n], make_session(b.read_verified(n), threads, providers), bundle_inputs)
               for n in ens.members]
    text = next((s.text for s in b.manifest.inputs if s.kind == "text"), None)
    seq = int(text.get("max_length", 128)) if text else 1
    rng = np.random.default_rng(0)
    rows, worst = [], 0.0
    for batch in batches:
        feeds = feeds_for(fused, batch, seq, rng)

        def run_fused(f=feeds):
            return fused.run(None, f)[0]

        def run_loop(f=feeds):
            return combine(ens.combiner, np.stack([m(f) for m in members]))

        worst = max(worst, float(np.abs(run_fused() - run_loop()).max()))
        res = measure({"fused": run_fused, "loop": run_loop}, rounds, 1, 1 if smoke else 2, budget_s,
                      min_rounds=2 if smoke else 5)
        rows.append({"batch": batch, "fused_ms": res["fused"]["median_ms"], "loop_ms": res["loop"]["median_ms"],
                     "n": res["fused"]["n"], "fused_over_loop": res["fused"]["median_ms"] / res["loop"]["median_ms"]})
    return {"members": list(ens.members), "combiner": ens.combiner.get("name"), "rows": rows,
            "max_abs_diff_fused_vs_loop": worst, **({"max_length": seq} if text else {})}


def run(*, smoke: bool = False, threads: int = 1, only: str | None = None, rounds: int | None = None,
        budget_s: float = 20.0, work: Path | None = None) -> dict:
    import onnxruntime as ort

    from bench.peers import ensembles
    from bench.peers.harness import PEERS_DIR
    from bench.run import machine

    size = "tiny" if smoke else "full"
    work = work or PEERS_DIR / ("work-tiny" if smoke else "work")
    specs = ensembles.build(work, size, only)
    out = {"threads": threads, "size": size, "ensembles": {}, "onnxruntime": ort.__version__,
           "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    for kind, spec in specs.items():
        out["ensembles"][kind] = bench_bundle(Path(spec["bundle"]), threads, BATCHES, rounds or (2 if smoke else 30),
                                              budget_s, smoke)
    out["load_average"] = os.getloadavg()[0]
    return out


def render(report: dict) -> str:
    lines = [f"fused ÷ members one after another, {report['threads']} intra-op thread(s), {report['size']} ensembles",
             f"{'ensemble':>9} {'batch':>5} | {'fused ms':>9} | {'loop ms':>9} | {'fused ÷ loop':>12}", "-" * 56]
    for kind, e in report["ensembles"].items():
        for r in e["rows"]:
            lines.append(f"{kind:>9} {r['batch']:>5} | {r['fused_ms']:9.2f} | {r['loop_ms']:9.2f} | {r['fused_over_loop']:12.3f}")
        lines.append(f"{'':>9} members {', '.join(e['members'])}; fused vs loop max |Δp| {e['max_abs_diff_fused_vs_loop']:.1g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_fused_real", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the tiny ensembles, a few rounds: checks that it runs")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every session")
    p.add_argument("--only", choices=("image", "text"))
    p.add_argument("--rounds", type=int, help="interleaved rounds at most (default 30; smoke 2)")
    p.add_argument("--budget-s", type=float, default=20.0, help="seconds per batch size, after the first rounds")
    a = p.parse_args(argv)
    report = run(smoke=a.smoke, threads=a.threads, only=a.only, rounds=a.rounds, budget_s=a.budget_s)
    print(render(report))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
