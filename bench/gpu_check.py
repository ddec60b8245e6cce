"""GPU check for fusion-serve: one short script (< 2 minutes) for a machine with NVIDIA GPUs.

    python bench/gpu_check.py [--bundle DIR] [--gpu-ids 0,1] [--json OUT]

It verifies, with the service's own loader (service/runtime.py):
  1. onnxruntime's CUDA execution provider is really used: every session of the bundle runs on
     CUDAExecutionProvider (not a silent fallback to CPU when CUDA/cuDNN libraries are missing);
  2. members land on the intended devices: FUSION_GPU_IDS is honoured, members are spread
     round-robin over the listed GPUs (balanced), variants sit on the first one, and each session's
     device_id matches what the service reports;
  3. GPU outputs equal CPU outputs (the same bundle, max |difference| reported);
and reports the fused ensemble's latency on GPU vs CPU at batch 1, 64 and 256.

Needs the service's torch-free half (numpy, orjson, starlette) and onnxruntime-gpu, no torch:
    pip install onnxruntime-gpu numpy orjson starlette   # + onnx, only when no bundle is given (see below)
Without a bundle (no --bundle and no artifacts/bundle) it writes a small synthetic bundle (4 MLP
members + their soft-vote ensemble), which needs `pip install onnx`.

Without an NVIDIA GPU or without the CUDA provider it prints SKIP and why, and exits 0.
`--dry-run` runs every step on the CPU provider instead (to test this script where there is no GPU).
Exit status: 0 pass or skip, 1 a check failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INSTALL = "pip install onnxruntime-gpu numpy orjson starlette   (in the repo's venv, or: python3 -m venv .venv && .venv/bin/pip install ...)"
BATCHES = (1, 64, 256)
# The service turns TF32 off (service/runtime.py); with it on, an H200 differed by 2.05e-3, with it
# off by 1.5e-6 (2026-12-04), so this tolerance catches TF32 coming back.
PARITY_ATOL = 1e-4
BUDGET_PER_POINT_S = 2.0


def skip(reason: str, hint: str = "") -> int:
    print(f"SKIP: {reason}")
    if hint:
        print(f"      {hint}")
    return 0


def nvidia_gpus() -> tuple[list[int] | None, str]:
    """Indices of the GPUs this process can see (after CUDA_VISIBLE_DEVICES), and a description."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "nvidia-smi is not on PATH"
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi failed: {exc}"
    rows = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not rows:
        return None, f"nvidia-smi lists no GPU ({(out.stderr or out.stdout).strip()[:200]})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n = len(rows) if visible is None else len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
    return list(range(n)), "; ".join(rows)


def synthetic_bundle(out: Path, n_members: int = 4, n_features: int = 64, hidden: int = 512, n_classes: int = 10) -> Path:
    """A small bundle written with onnx.helper: MLP members and their soft-vote ensemble graph."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fusion.bundle import SCHEMA_VERSION, BundleWriter, InputSpec, Manifest, ModelEntry

    rng = np.random.default_rng(0)
    params = [(rng.normal(0, 0.1, (n_features, hidden)).astype(np.float32), np.zeros(hidden, np.float32),
               rng.normal(0, 0.1, (hidden, n_classes)).astype(np.float32), np.zeros(n_classes, np.float32))
              for _ in range(n_members)]

    def mlp_nodes(k: int, x: str):
        w1, b1, w2, b2 = params[k]
        inits = [numpy_helper.from_array(a, f"m{k}_{n}") for a, n in zip((w1, b1, w2, b2), ("w1", "b1", "w2", "b2"))]
        nodes = [helper.make_node("Gemm", [x, f"m{k}_w1", f"m{k}_b1"], [f"m{k}_h"]),
                 helper.make_node("Relu", [f"m{k}_h"], [f"m{k}_r"]),
                 helper.make_node("Gemm", [f"m{k}_r", f"m{k}_w2", f"m{k}_b2"], [f"m{k}_z"]),
                 helper.make_node("Softmax", [f"m{k}_z"], [f"m{k}_p"], axis=-1)]
        return nodes, inits, f"m{k}_p"

    def model(nodes, inits, out_name):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_features])],
                                  [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", n_classes])], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m.SerializeToString()

    names = [f"mlp_{k}" for k in range(n_members)]
    with BundleWriter(out) as w:
        (w.stage / "members").mkdir()
        members = {}
        all_nodes, all_inits, outs = [], [], []
        for k, name in enumerate(names):
            nodes, inits, p = mlp_nodes(k, "input")
            (w.stage / "members" / f"{name}.onnx").write_bytes(model(nodes, inits, p))
            members[name] = ModelEntry(file=f"members/{name}.onnx", sha256="", kind="member")
            all_nodes += nodes
            all_inits += inits
            outs.append(p)
        all_inits.append(numpy_helper.from_array(np.array(1.0 / n_members, np.float32), "inv_k"))
        all_nodes += [helper.make_node("Sum", outs, ["sum"]), helper.make_node("Mul", ["sum", "inv_k"], ["probabilities"])]
        (w.stage / "ensemble.onnx").write_bytes(model(all_nodes, all_inits, "probabilities"))
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, bundle_version="", created="", task="classification",
            input=InputSpec(name="input", shape=(-1, n_features), dtype="float32", scaling={"kind": "none"}),
            output_name="probabilities", classes=tuple(range(n_classes)),
            variants={"ensemble": ModelEntry(file="ensemble.onnx", sha256="", kind="ensemble",
                                             combiner={"name": "soft_vote", "weights": None}, members=tuple(names))},
            members=members, dataset={"name": "synthetic"},
        )
        w.commit(manifest)
    return out


def time_model(model, X, budget_s: float = BUDGET_PER_POINT_S, max_runs: int = 300) -> dict:
    """Median and p99 of `model(X)` over up to max_runs runs or budget_s seconds, after a warm-up."""
    import numpy as np

    for _ in range(5):
        model(X)
    times = []
    stop = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < 10 or time.perf_counter() < stop):
        t0 = time.perf_counter()
        model(X)
        times.append(time.perf_counter() - t0)
    a = np.asarray(times) * 1e3
    return {"runs": len(times), "median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="a fusion bundle directory (default: artifacts/bundle, else a synthetic one)")
    p.add_argument("--gpu-ids", help="GPUs to spread members over (default: every visible GPU)")
    p.add_argument("--dry-run", action="store_true", help="run every step on the CPU provider (tests this script)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    t_start = time.perf_counter()

    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as exc:
        return skip(f"{exc.name} is not installed, so nothing can run on a GPU here", f"to run this check: {INSTALL}")

    providers = ort.get_available_providers()
    if a.dry_run:
        gpus, gpu_desc = [int(g) for g in (a.gpu_ids or "0,1").split(",")], "dry run: CPU stands in for the GPUs"
    else:
        gpus, gpu_desc = nvidia_gpus()
        if "CUDAExecutionProvider" not in providers:
            if gpus is None:
                return skip(f"no NVIDIA GPU here ({gpu_desc}), and onnxruntime {ort.__version__} has no "
                            f"CUDAExecutionProvider (it has {providers})")
            return skip(f"GPUs found ({gpu_desc}) but onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                        f"(it has {providers}): the CPU-only package is installed",
                        f"pip uninstall -y onnxruntime && {INSTALL}")
        if gpus is None:
            gpus, gpu_desc = [0], f"CUDAExecutionProvider present; GPU list unknown ({gpu_desc}); assuming GPU 0"
        if a.gpu_ids:
            gpus = [int(g) for g in a.gpu_ids.split(",")]
    print(f"onnxruntime {ort.__version__}, providers {providers}")
    print(f"GPUs: {gpu_desc}; spreading members over {gpus}")

    tmp = None
    bundle = Path(a.bundle) if a.bundle else ROOT / "artifacts" / "bundle"
    if not (bundle / "manifest.json").exists():
        if a.bundle:
            print(f"no bundle at {bundle} (no manifest.json)", file=sys.stderr)
            return 2
        try:
            import onnx  # noqa: F401
        except ImportError:
            return skip("no bundle (artifacts/bundle is absent) and `onnx` is not installed to write a synthetic one",
                        "pass --bundle DIR, or: pip install onnx")
        tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        bundle = synthetic_bundle(tmp / "bundle")
        print(f"no bundle given: wrote a synthetic one at {bundle}")

    from service import runtime

    results: dict = {"onnxruntime": ort.__version__, "providers": providers, "gpus": gpus, "gpu_description": gpu_desc,
                     "bundle": str(bundle), "dry_run": a.dry_run, "checks": {}, "latency": {}}
    failures: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        results["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
        if not ok:
            failures.append(name)

    try:
        # 1 + 2: load as the service does, configured through its environment variables
        os.environ["FUSION_GPU_IDS"] = ",".join(map(str, gpus))
        os.environ["FUSION_DEVICE"] = "cpu" if a.dry_run else "cuda"
        from service import config  # the service's one reader of its settings

        cfg = config.load().runtime
        check("FUSION_GPU_IDS honoured", cfg.gpu_ids == tuple(gpus), f"RuntimeConfig.gpu_ids = {cfg.gpu_ids}")
        want_provider = "CPUExecutionProvider" if a.dry_run else "CUDAExecutionProvider"
        gpu = runtime.load(bundle, cfg)
        manifest = gpu.manifest
        placement = {}
        for name, model in gpu.models.items():
            sess_providers = model.session.get_providers()
            opts = model.session.get_provider_options().get("CUDAExecutionProvider", {})
            placement[name] = {"kind": manifest.entry(name).kind, "service_device": model.device,
                               "providers": sess_providers, "device_id": opts.get("device_id")}
        results["placement"] = placement
        on_provider = [n for n, pl in placement.items() if pl["providers"][0] == want_provider]
        check("CUDA provider used by every session" if not a.dry_run else "provider (dry run: CPU) used by every session",
              len(on_provider) == len(placement),
              f"{len(on_provider)}/{len(placement)} sessions run on {want_provider}"
              + ("" if len(on_provider) == len(placement) else
                 f"; the others fell back to {sorted({pl['providers'][0] for pl in placement.values()})}: "
                 "are the CUDA 12 and cuDNN 9 libraries installed (pip install 'onnxruntime-gpu[cuda,cudnn]')?"))
        if not a.dry_run:
            mismatched = [n for n, pl in placement.items() if pl["service_device"] != f"cuda:{pl['device_id']}"]
            check("session device_id matches the service's report", not mismatched,
                  "all match" if not mismatched else f"differ for {mismatched}")
            devices = {n: int(pl["device_id"]) if pl["device_id"] is not None else None for n, pl in placement.items()}
        else:  # no device_id on CPU: the service's own report is all there is
            devices = {n: None for n in placement}
        members = list(manifest.variants["ensemble"].members) if "ensemble" in manifest.variants else list(manifest.members)
        if not a.dry_run:
            counts = {g: sum(devices[m] == g for m in members) for g in gpus}
            off_list = [m for m in members if devices[m] not in gpus]
            balanced = max(counts.values()) - min(counts.values()) <= 1
            spread = len({devices[m] for m in members}) == min(len(gpus), len(members))
            check("members spread round-robin over the listed GPUs", not off_list and balanced and spread,
                  f"members per GPU {counts}" + (f"; not on a listed GPU: {off_list}" if off_list else ""))
            variants_off = [n for n, pl in placement.items() if pl["kind"] != "member" and devices[n] != gpus[0]]
            check("variants on the first listed GPU", not variants_off,
                  f"all on cuda:{gpus[0]}" if not variants_off else f"elsewhere: {variants_off}")

        # 3: the same outputs as on the CPU
        cpu = runtime.load(bundle, runtime.RuntimeConfig(device="cpu", intra_op_threads=os.cpu_count() or 1))
        X = np.random.default_rng(1).normal(0, 4, (256, manifest.input.n_features)).astype(np.float32)
        worst = {name: float(np.abs(gpu.models[name](X) - cpu.models[name](X)).max()) for name in gpu.models}
        check("GPU outputs equal CPU outputs", max(worst.values()) <= PARITY_ATOL,
              f"max |GPU - CPU| = {max(worst.values()):.2e} (tolerance {PARITY_ATOL})")
        results["parity_max_abs_diff"] = worst

        # 4: latency of the fused ensemble, GPU vs CPU, interleaved per batch size
        name = "ensemble" if "ensemble" in gpu.models else next(iter(gpu.models))
        print(f"latency of '{name}' ({'CPU provider twice, dry run' if a.dry_run else f'cuda:{gpus[0]} vs CPU'}, "
              f"CPU with {os.cpu_count()} threads):")
        for b in BATCHES:
            Xb = np.ascontiguousarray(X[:b]) if b <= len(X) else np.resize(X, (b, X.shape[1]))
            g = time_model(gpu.models[name], Xb)
            c = time_model(cpu.models[name], Xb)
            ratio = g["median_ms"] / c["median_ms"]
            results["latency"][str(b)] = {"gpu": g, "cpu": c, "gpu_over_cpu_median": ratio}
            print(f"  batch {b:4d}: GPU median {g['median_ms']:8.3f} ms (p99 {g['p99_ms']:.3f}) | "
                  f"CPU median {c['median_ms']:8.3f} ms (p99 {c['p99_ms']:.3f}) | GPU ÷ CPU {ratio:.2f}x")
        print("  (at batch 1 a small model is usually faster on the CPU: kernel launches and copies dominate)")
    except Exception as exc:  # noqa: BLE001 - report any failure as a failed check, with its reason
        check("ran to the end", False, f"{type(exc).__name__}: {exc}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    results["seconds"] = time.perf_counter() - t_start
    results["ok"] = not failures
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"GPU CHECK: {'PASS' if not failures else 'FAIL (' + ', '.join(failures) + ')'} in {results['seconds']:.1f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
