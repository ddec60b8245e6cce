"""GPU benchmark of real-architecture ensembles (issue 18, part 3): one prepared script for a machine
with NVIDIA GPUs and a torch that imports timm and transformers (the lent GPU machines' image has both).

    python bench/gpu_models.py [--json OUT] [--iters 50] [--dry-run]

Ensembles (random weights: speed only, not accuracy):
  image: timm resnet18 + resnet50 + vit_small_patch16_224, 3x224x224, 10 classes;
  text:  three BERT-mini encoders (4 layers, hidden 256, 4 heads), sequence length 128, 10 classes.
For each: every member and the fused ensemble (members + soft vote in ONE graph) are exported to ONNX
(opset 17, dynamic batch), then timed in onnxruntime on the CUDA provider at batch 1, 8 and 32:
  - fused ensemble, float32 with TF32 off (what the service runs: service/runtime.py);
  - fused ensemble, float32 with TF32 on (onnxruntime's own default);
  - fused ensemble exported in float16;
  - the members run one after another plus the soft vote in numpy (members mode's cost);
  - the fused ensemble on the CPU provider (all cores) at batch 1 and 8, for scale.
It also reports max |GPU - CPU| of the fused float32 graph (TF32 off and on) and of float16.

`--dry-run` shrinks every model and runs on the CPU provider (checks the script where there is no GPU).
Needs: torch, timm, transformers, onnx, onnxruntime-gpu, numpy.
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


def image_members(dry: bool):
    import timm

    if dry:
        names = ("resnet18", "resnet18", "vit_tiny_patch16_224")
        return [timm.create_model(n, pretrained=False, num_classes=10, **({"img_size": 32} if "vit" in n else {}))
                for n in names], names, (3, 32, 32)
    names = ("resnet18", "resnet50", "vit_small_patch16_224")
    return [timm.create_model(n, pretrained=False, num_classes=10) for n in names], names, (3, 224, 224)


def text_members(dry: bool):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden = (1, 32) if dry else (4, 256)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=4 * hidden, num_labels=10, max_position_embeddings=512)
        models.append(BertForSequenceClassification(cfg))
    return models, ("bert_mini_0", "bert_mini_1", "bert_mini_2"), (16 if dry else 128,)


def logits_of(model, kind):
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *xs):
            if kind == "text":
                return self.m(input_ids=xs[0], attention_mask=xs[1]).logits
            return self.m(xs[0])

    return Logits(model).eval()


def fused_of(members, kind):
    import torch

    class Fused(torch.nn.Module):  # (B, ...) -> (B, C): mean of member softmaxes (soft vote)
        def __init__(self, ms):
            super().__init__()
            self.ms = torch.nn.ModuleList([logits_of(m, kind) for m in ms])

        def forward(self, *xs):
            return torch.stack([m(*xs).float().softmax(-1) for m in self.ms]).mean(0)

    return Fused(members).eval()


def example_inputs(kind, shape, batch, dtype="float32"):
    import torch

    g = torch.Generator().manual_seed(batch)
    if kind == "text":
        seq = shape[0]
        ids = torch.randint(0, 30522, (batch, seq), generator=g)
        return (ids, torch.ones(batch, seq, dtype=torch.int64))
    x = torch.rand(batch, *shape, generator=g)
    return (x.half() if dtype == "float16" else x,)


def export(module, args, path: Path, kind: str) -> None:
    import torch

    names = ["input_ids", "attention_mask"] if kind == "text" else ["pixels"]
    dyn = {n: {0: "batch"} for n in names}
    dyn["probabilities"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["probabilities"],
                          dynamic_axes=dyn, opset_version=17, dynamo=False)


def session(path: Path, provider: str, tf32: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": "1" if tf32 else "0"})]
    else:
        opts.intra_op_num_threads = os.cpu_count() or 1
        providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    return sess


def feeds(sess, inputs):
    return {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}


def timed(fn, iters: int) -> dict:
    for _ in range(3):
        fn()
    t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    t = np.array(t) * 1e3
    return {"median_ms": round(float(np.median(t)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3)}


def run_ensemble(kind: str, dry: bool, iters: int, provider: str, tmp: Path) -> dict:
    import torch

    members, names, shape = image_members(dry) if kind == "image" else text_members(dry)
    for m in members:
        m.eval()
    fused = fused_of(members, kind)
    ex = example_inputs(kind, shape, 2)
    paths = {}
    t0 = time.perf_counter()
    for i, (m, n) in enumerate(zip(members, names)):
        paths[f"member{i}"] = tmp / f"{kind}_{i}_{n}.onnx"
        export(logits_of(m, kind), ex, paths[f"member{i}"], kind)
    paths["fused"] = tmp / f"{kind}_fused.onnx"
    export(fused, ex, paths["fused"], kind)
    half_ok = provider == "cuda" and kind == "image"  # fp16 export needs CUDA kernels for half convolutions
    if half_ok:
        paths["fused16"] = tmp / f"{kind}_fused16.onnx"
        export(fused_of([m.cuda().half() for m in members], kind).cuda(),
               tuple(x.cuda().half() for x in ex), paths["fused16"], kind)
    export_s = time.perf_counter() - t0
    sizes = {k: round(p.stat().st_size / 2**20, 1) for k, p in paths.items()}
    params = [sum(p.numel() for p in m.parameters()) for m in members]

    fused32 = session(paths["fused"], provider)
    fused_tf32 = session(paths["fused"], provider, tf32=True) if provider == "cuda" else None
    fused16 = session(paths["fused16"], provider) if half_ok else None
    mems = [session(paths[f"member{i}"], provider) for i in range(len(members))]
    cpu = session(paths["fused"], "cpu")

    def loop(inputs):
        outs = []
        for s in mems:
            z = s.run(None, feeds(s, inputs))[0].astype(np.float64)
            z = np.exp(z - z.max(-1, keepdims=True))
            outs.append(z / z.sum(-1, keepdims=True))
        return np.mean(outs, axis=0)

    rows, parity = [], {}
    for b in BATCHES:
        inputs = example_inputs(kind, shape, b)
        row = {"batch": b}
        ref_cpu = cpu.run(None, feeds(cpu, inputs))[0]
        out32 = fused32.run(None, feeds(fused32, inputs))[0]
        parity[f"fp32_tf32_off_b{b}"] = float(np.abs(out32 - ref_cpu).max())
        parity[f"members_loop_vs_fused_b{b}"] = float(np.abs(loop(inputs) - out32).max())
        row["fused_fp32"] = timed(lambda: fused32.run(None, feeds(fused32, inputs)), iters)
        if fused_tf32 is not None:
            parity[f"fp32_tf32_on_b{b}"] = float(np.abs(fused_tf32.run(None, feeds(fused_tf32, inputs))[0] - ref_cpu).max())
            row["fused_fp32_tf32"] = timed(lambda: fused_tf32.run(None, feeds(fused_tf32, inputs)), iters)
        if fused16 is not None:
            in16 = example_inputs(kind, shape, b, "float16")
            parity[f"fp16_b{b}"] = float(np.abs(fused16.run(None, feeds(fused16, in16))[0].astype(np.float32) - ref_cpu).max())
            row["fused_fp16"] = timed(lambda: fused16.run(None, feeds(fused16, in16)), iters)
        row["members_loop"] = timed(lambda: loop(inputs), iters)
        row["fused_over_loop"] = round(row["fused_fp32"]["median_ms"] / row["members_loop"]["median_ms"], 3)
        if b <= 8:
            row["cpu_fused_fp32"] = timed(lambda: cpu.run(None, feeds(cpu, inputs)), max(3, iters // 10))
        rows.append(row)
        print(f"  {kind} batch {b:3d}: " + " | ".join(
            f"{k} {v['median_ms']:.2f} ms" for k, v in row.items() if isinstance(v, dict))
            + f" | fused/loop {row['fused_over_loop']:.2f}", flush=True)
    return {"members": list(names), "parameters": params, "onnx_mib": sizes, "export_s": round(export_s, 1),
            "rows": rows, "max_abs_diff": {k: float(f"{v:.3g}") for k, v in parity.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU provider")
    p.add_argument("--only", choices=("image", "text"))
    a = p.parse_args(argv)
    import onnxruntime as ort
    import torch

    provider = "cpu" if a.dry_run else "cuda"
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"SKIP: onnxruntime {ort.__version__} has no CUDAExecutionProvider")
        return 0
    info = {"date": time.strftime("%Y-%m-%d"), "onnxruntime": ort.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "provider": provider,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "ensembles": {}}
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {info['device']}, {info['cpus']} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("image", "text"):
            if a.only and kind != a.only:
                continue
            try:
                info["ensembles"][kind] = run_ensemble(kind, a.dry_run, a.iters, provider, Path(tmp))
            except Exception as exc:  # one ensemble failing still reports the other
                info["ensembles"][kind] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {kind}: FAILED {type(exc).__name__}: {exc}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(info, indent=2))
    print(json.dumps({k: v.get("max_abs_diff", v) for k, v in info["ensembles"].items()}, indent=1))
    return 0 if all("error" not in v for v in info["ensembles"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
