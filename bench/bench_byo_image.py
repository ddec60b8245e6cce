"""An image ensemble of three real architectures, fused into one graph vs its members run one by one (issue 15).

Members (random weights: speed, not accuracy; 10 classes): timm `resnet18`, torchvision `mobilenet_v3_small`,
timm `vit_tiny_patch16_224`, over one `kind = "image"` input of 3x224x224 raw pixels. The bundle is built the way
`fusion build` builds a recipe's `[[members]]` (fusion/compose.py + fusion/imagenorm.py): each member exported
alone with the dynamo exporter, the image normalisation put in front of each, composed with the soft-vote combiner
into `ensemble.onnx`, parity-gated. Then, per batch size (1, 8, 32), interleaved rounds (bench/bench_fused.py's
`measure`) of

* fused   the one `ensemble.onnx` session (what the service runs for the `ensemble` variant);
* loop    the three `members/NAME.onnx` sessions called one after another, softmaxed and soft-voted in numpy
          (what members mode costs: service/members.py);

every session opened as the service opens it (service/runtime.make_session) with `--threads` intra-op threads.
Prints the table (median ms, fused ÷ loop) and the fused-vs-loop max |Δ| on the timed rows.

    python -m bench.bench_byo_image [--smoke] [--json OUT] [--threads 1] [--batches 1,8,32] [--budget-s 20]

Needs the [vision] extra (timm, torchvision). `--smoke` uses 32x32 images and a few rounds (checks that it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 8, 32)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # timm's pretrained_cfg for all three
MEMBERS = (("resnet18", "timm:resnet18"), ("mobilenet_v3_small", "torchvision:mobilenet_v3_small"),
           ("vit_tiny", "timm:vit_tiny_patch16_224"))


def make_modules(size: int) -> list:
    """(name, source, module) for the three members, random init (seeded)."""
    import torch

    from fusion.sources import resolve

    out = []
    for i, (name, source) in enumerate(MEMBERS):
        torch.manual_seed(i)
        args = {"num_classes": 10, **({"img_size": size} if "vit" in source and size != 224 else {})}
        out.append((name, source, resolve(source, args)))
    return out


def build(out: Path, size: int) -> dict:
    """The composed bundle in `out`; returns what was built and how long each step took."""
    from fusion.bundle import TensorSpec
    from fusion.compose import torch_member, write_onnx_bundle
    from fusion.ensemble import make_combiner
    from fusion.imagenorm import normalize_member

    spec = TensorSpec(name="pixels", dtype="float32", shape=("batch", 3, size, size), kind="image",
                      image={"mode": "RGB", "scale": 1 / 255, "mean": MEAN, "std": STD})
    t0 = time.perf_counter()
    modules = make_modules(size)
    members = [normalize_member(torch_member(name, module, [spec]), [spec]) for name, _, module in modules]
    t1 = time.perf_counter()
    manifest = write_onnx_bundle(out, members, make_combiner("soft_vote", len(members)), [spec])
    t2 = time.perf_counter()
    return {"members": {name: source for name, source, _ in modules},
            "parameters": {name: int(sum(p.numel() for p in m.parameters())) for name, _, m in modules},
            "export_s": t1 - t0, "compose_and_gate_s": t2 - t1, "gate": manifest.variants["ensemble"].parity}


def open_sessions(bundle_dir: Path, threads: int):
    from fusion.bundle import read_bundle
    from service.runtime import make_session

    b = read_bundle(bundle_dir)
    providers = ["CPUExecutionProvider"]
    names = list(b.manifest.variants["ensemble"].members)
    fused = make_session(b.read_verified("ensemble"), threads, providers)
    members = [make_session(b.read_verified(n), threads, providers) for n in names]
    return fused, members


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def run(*, smoke: bool = False, threads: int = 1, batches=BATCHES, rounds: int | None = None,
        budget_s: float = 20.0) -> dict:
    import onnxruntime as ort
    import torch

    from bench.bench_fused import measure
    from bench.run import machine
    from fusion.combine import combine

    size = 32 if smoke else 224
    rounds = rounds or (2 if smoke else 30)
    with tempfile.TemporaryDirectory(prefix="bench-byo-image-") as tmp:
        built = build(Path(tmp) / "bundle", size)
        fused, members = open_sessions(Path(tmp) / "bundle", threads)
        config = {"name": "soft_vote", "weights": None}

        def run_fused(X):
            return fused.run(None, {"pixels": X})[0]

        def run_loop(X):  # members mode: each member's logits -> probabilities -> the same soft vote
            return combine(config, np.stack([softmax(s.run(None, {"pixels": X})[0]) for s in members]))

        rng = np.random.default_rng(0)
        X_all = rng.integers(0, 256, size=(max(batches), 3, size, size)).astype(np.float32)
        rows, worst = [], 0.0
        for b in batches:
            X = np.ascontiguousarray(X_all[:b])
            worst = max(worst, float(np.abs(run_fused(X) - run_loop(X)).max()))
            res = measure({"fused": lambda X=X: run_fused(X), "loop": lambda X=X: run_loop(X)}, rounds, 1,
                          1 if smoke else 2, budget_s, min_rounds=2 if smoke else 5)
            rows.append({"batch": b, "fused_ms": res["fused"]["median_ms"], "loop_ms": res["loop"]["median_ms"],
                         "fused_p99_ms": res["fused"]["p99_ms"], "loop_p99_ms": res["loop"]["p99_ms"],
                         "n": res["fused"]["n"], "fused_over_loop": res["fused"]["median_ms"] / res["loop"]["median_ms"]})
    return {"members": built["members"], "parameters": built["parameters"], "image": [3, size, size],
            "export_s": built["export_s"], "compose_and_gate_s": built["compose_and_gate_s"],
            "gate_max_abs_diff": (built["gate"] or {}).get("max_abs_diff"), "max_abs_diff_fused_vs_loop": worst,
            "threads": threads, "rounds": rounds, "budget_s": budget_s, "rows": rows, "smoke": smoke,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def render(report: dict) -> str:
    members = ", ".join(f"{s} ({report['parameters'][n] / 1e6:.1f} M)" for n, s in report["members"].items())
    lines = [f"image ensemble, soft vote over {members}; {'x'.join(map(str, report['image']))} raw pixels, "
             f"normalised in the graph; onnxruntime {report['onnxruntime']}, CPU, {report['threads']} intra-op "
             f"thread(s), {report['cpu_count']} cores",
             f"built in {report['export_s']:.0f} s (dynamo exports) + {report['compose_and_gate_s']:.0f} s (compose, "
             f"batch probe, parity gate: max |Δ| {report['gate_max_abs_diff']:.2g}); fused vs loop on the timed rows: "
             f"max |Δprob| {report['max_abs_diff_fused_vs_loop']:.2g}",
             "", f"{'batch':>5} {'n':>4} | {'fused ms':>9} | {'loop ms':>9} | {'fused ÷ loop':>12}", "-" * 50]
    for r in report["rows"]:
        lines.append(f"{r['batch']:>5} {r['n']:>4} | {r['fused_ms']:9.2f} | {r['loop_ms']:9.2f} | {r['fused_over_loop']:12.3f}")
    if report["smoke"]:
        lines.append("(smoke run: 32x32 images, too few rounds for the numbers to mean anything)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_byo_image", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="32x32 images, a few rounds: checks that it runs, not speed")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every session")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--rounds", type=int, help="interleaved rounds at most (default 30; smoke 2)")
    p.add_argument("--budget-s", type=float, default=20.0, help="seconds per batch size, after the first rounds")
    a = p.parse_args(argv)
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        print(f"bench_byo_image needs the [vision] extra (timm, torchvision): pip install -e '.[vision]' ({exc})",
              file=sys.stderr)
        return 2
    report = run(smoke=a.smoke, threads=a.threads, batches=tuple(int(b) for b in a.batches.split(",")),
                 rounds=a.rounds, budget_s=a.budget_s)
    print(render(report))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
