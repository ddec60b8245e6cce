"""Static int8 vs fp32 on the BYO image example's composed ensemble (issue 18): latency at batch 32, accuracy.

The fp32 file is the example bundle's `ensemble.onnx` (examples/byo_images: timm resnet10t, torchvision resnet18,
timm test_resnet over 3x32x32 digits, soft vote); the int8 file is the bundle's `ensemble_int8.onnx` when it was
built with `run.py --int8` (`[build] quantize = "static"`), else made here by the same code the build runs
(fusion.quantize.quantize_variant, static: QDQ, per-channel int8 weights, uint8 activations calibrated on 256
train rows). Accuracy: both files in onnxruntime on the example's validation and test splits (the split
`fusion build` makes from `data.npz`). Latency: both sessions opened as the service opens them
(service/runtime.make_session), interleaved rounds (bench/bench_fused.py's `measure`) per intra-op thread count
and batch size. Goal: int8 ÷ fp32 median latency at batch 32 ≤ 0.6 with ≤ 0.5 accuracy points lost (test split).

    python -m bench.bench_int8 [--smoke] [--json OUT] [--threads 1,2] [--batches 1,32] [--budget-s 15]

Needs the example's files: `.venv/bin/python examples/byo_images/run.py --no-serve` (add `--int8` for the
bundle's own int8 variant).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "byo_images"
WORK = "examples/byo_images/work"
GOAL_RATIO, GOAL_LOSS_PP = 0.6, 0.5


def load_example(work: Path):
    """(recipe, data split as `fusion build` splits it, bundle dir) of the BYO image example under `work`."""
    from fusion.data import load_named
    from fusion.recipe import parse_recipe

    recipe = parse_recipe(tomllib.loads((EXAMPLE / "recipe.toml").read_text().replace(WORK, str(work))))
    bundle, data_path = Path(recipe.build.out), Path(recipe.data.source)
    if not (bundle / "manifest.json").is_file() or not data_path.is_file():
        raise FileNotFoundError(f"expected the BYO image example's bundle and data under {work} (bundle/manifest.json, "
                                f"data.npz); run `.venv/bin/python examples/byo_images/run.py --no-serve` first")
    return recipe, load_named(data_path, recipe.inputs), bundle


def accuracy(path: Path, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    from fusion.quantize import _probs, _session

    p = _probs(_session(path), {"pixels": X})
    return float((p.argmax(-1) == y).mean()), p.argmax(-1)


def run(*, work: Path, smoke: bool = False, threads=(1, 2), batches=(1, 32), rounds: int | None = None,
        budget_s: float = 15.0) -> dict:
    import onnxruntime as ort

    from bench.bench_fused import measure
    from bench.run import machine
    from fusion.bundle import read_bundle
    from fusion.quantize import quantize_variant
    from service.runtime import make_session

    recipe, data, bundle = load_example(work)
    manifest = read_bundle(bundle).manifest
    rounds = rounds or (3 if smoke else 30)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        f32 = bundle / manifest.variants["ensemble"].file
        t = time.perf_counter()
        if "ensemble_int8" in manifest.variants:
            i8, origin, quant_s = bundle / manifest.variants["ensemble_int8"].file, "the bundle's ensemble_int8", None
            method = manifest.variants["ensemble_int8"].parity
        else:
            i8, origin = Path(tmp) / "ensemble_int8.onnx", "quantized here (fusion.quantize, static)"
            check = quantize_variant(f32, i8, data, max_loss_pp=float("inf"), source="ensemble", mode="static")
            quant_s, method = time.perf_counter() - t, check.to_dict()
        acc = {}
        for split in ("val", "test"):
            X, y = data.__dict__[f"X_{split}"]["pixels"], data.__dict__[f"y_{split}"]
            (a32, p32), (a8, p8) = accuracy(f32, X, y), accuracy(i8, X, y)
            acc[split] = {"fp32": a32, "int8": a8, "loss_pp": 100.0 * (a32 - a8), "argmax_agreement": float((p32 == p8).mean()),
                          "rows": int(len(y))}
        X_all = np.ascontiguousarray(data.X_test["pixels"][:max(batches)])
        rows = []
        b32, b8 = f32.read_bytes(), i8.read_bytes()  # the int8 file may live in `tmp`
        for th in threads:
            s32, s8 = (make_session(b, th, ["CPUExecutionProvider"]) for b in (b32, b8))
            for b in batches:
                X = X_all[:b]
                res = measure({"fp32": lambda X=X: s32.run(None, {"pixels": X}), "int8": lambda X=X: s8.run(None, {"pixels": X})},
                              rounds, 1, 1 if smoke else 3, budget_s, min_rounds=2 if smoke else 10)
                rows.append({"threads": th, "batch": b, "fp32_ms": res["fp32"]["median_ms"], "int8_ms": res["int8"]["median_ms"],
                             "fp32_p99_ms": res["fp32"]["p99_ms"], "int8_p99_ms": res["int8"]["p99_ms"], "n": res["fp32"]["n"],
                             "int8_over_fp32": res["int8"]["median_ms"] / res["fp32"]["median_ms"],
                             "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None})
    at32 = {r["threads"]: r["int8_over_fp32"] for r in rows if r["batch"] == 32}
    ratio = at32.get(1, next(iter(at32.values()), None))
    loss = acc["test"]["loss_pp"]
    return {"model": "the BYO image example's composed ensemble (" + ", ".join(m.source for m in recipe.members) + ")",
            "int8_origin": origin, "quantize_s": quant_s, "quantization": {k: method.get(k) for k in (
                "mode", "calibration", "float_nodes", "reduced_range_nodes", "val_accuracy_loss_pp", "max_loss_pp")},
            "fp32_bytes": len(b32), "int8_bytes": len(b8),
            "accuracy": acc, "rows": rows,
            "int8_over_fp32_batch32": ratio, "int8_over_fp32_batch32_by_threads": {str(k): v for k, v in at32.items()},
            "accuracy_loss_pp": loss, "goal": {"ratio_max": GOAL_RATIO, "loss_pp_max": GOAL_LOSS_PP},
            "goal_met": bool(ratio is not None and ratio <= GOAL_RATIO and loss <= GOAL_LOSS_PP),
            "rounds": rounds, "budget_s": budget_s, "smoke": smoke, "onnxruntime": ort.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "machine": machine(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cpu_int8_flags": cpu_int8_flags()}


def cpu_int8_flags() -> list[str]:
    """The CPU's vector extensions that decide int8 GEMM speed (Linux /proc/cpuinfo): VNNI does 4 int8
    multiply-adds per lane in one instruction; without it (AVX2 only) onnxruntime's u8s8 kernels use
    vpmaddubsw + vpmaddwd, about 2x float32 FMA at best."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]


def render(r: dict) -> str:
    a = r["accuracy"]
    lines = [f"int8 vs fp32, {r['model']}; int8: {r['int8_origin']} ({r['quantization']['mode']}, "
             f"{r['quantization']['calibration']}); {r['fp32_bytes'] / 1e6:.1f} MB -> {r['int8_bytes'] / 1e6:.1f} MB",
             f"accuracy test {a['test']['fp32']:.4f} -> {a['test']['int8']:.4f} ({a['test']['loss_pp']:+.2f} pp, "
             f"{a['test']['rows']} rows), validation {a['val']['fp32']:.4f} -> {a['val']['int8']:.4f} "
             f"({a['val']['loss_pp']:+.2f} pp); argmax agreement test {a['test']['argmax_agreement']:.4f}",
             "", f"{'threads':>7} {'batch':>5} {'n':>4} | {'fp32 ms':>8} | {'int8 ms':>8} | {'int8 ÷ fp32':>11} | load",
             "-" * 62]
    for x in r["rows"]:
        lines.append(f"{x['threads']:>7} {x['batch']:>5} {x['n']:>4} | {x['fp32_ms']:8.2f} | {x['int8_ms']:8.2f} | "
                     f"{x['int8_over_fp32']:11.3f} | {x['load_average']:.1f}")
    lines.append(f"goal: int8 ÷ fp32 at batch 32 ≤ {GOAL_RATIO} with ≤ {GOAL_LOSS_PP} pp test accuracy lost: "
                 f"{r['int8_over_fp32_batch32']:.3f}, {r['accuracy_loss_pp']:+.2f} pp -> {'met' if r['goal_met'] else 'not met'}")
    if r["smoke"]:
        lines.append("(smoke run: too few rounds for the numbers to mean anything)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_int8", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a few rounds: checks that it runs, not speed")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    p.add_argument("--work", default=WORK, help="the example's work directory (run.py --work)")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, help="interleaved rounds at most (default 30; smoke 3)")
    p.add_argument("--budget-s", type=float, default=15.0, help="seconds per thread count and batch, after 10 rounds")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    try:
        report = run(work=Path(a.work), smoke=a.smoke, threads=tuple(int(t) for t in a.threads.split(",")),
                     batches=tuple(int(b) for b in a.batches.split(",")), rounds=a.rounds, budget_s=a.budget_s)
    except FileNotFoundError as exc:
        print(f"bench_int8: {exc}", file=sys.stderr)
        return 2
    print(render(report))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
