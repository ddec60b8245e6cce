"""Scale curve and hardware efficiency of the fused ensemble graph, measured side by side in one run.

* K = 1, 3, 5, 9 members (MLP 64-256-256-10): latency at batch 1 / 32 / 256 and the cost per member;
* member size: a wider MLP (64-1024-1024-10) and the small CNN, K = 5;
* fused ensemble throughput at batch 256 on 1 thread as GFLOP/s against a single-core GEMM peak:
  a 1024^3 float32 matmul on 1 thread in torch (MKL) and in onnxruntime (MLAS, the library the
  ensemble runs on), timed in the same interleaved rounds and with the same statistic (median) as
  the ensemble; the peak is the faster of the two;

Models are randomly initialised (latency does not depend on the weights' values) and exported
through the same parity gate as real bundles.

    python -m bench.bench_scale [--smoke] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def macs_per_sample(model) -> int:
    """Multiply-accumulates of one forward pass: Linear in*out, Conv2d k*k*cin*cout*H*W (8x8 'same' convs)."""
    from torch import nn

    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += kh * kw * (m.in_channels // m.groups) * m.out_channels * 8 * 8
    return total


def build_fused(arch: str, k: int, args: dict, tmp: Path):
    import torch

    from fusion.ensemble import make_combiner
    from fusion.export import FusedEnsemble, Probabilities, export_onnx
    from fusion.zoo import build_model

    torch.manual_seed(0)
    members = [build_model(arch, **args).eval() for _ in range(k)]
    X = np.random.default_rng(0).uniform(0, 16, (64, 64)).astype(np.float32)
    fused = FusedEnsemble(members, make_combiner("soft_vote", k)).eval()
    tag = f"{arch}_{k}_{'x'.join(map(str, args.get('hidden', [])))}"
    ens_path, one_path = tmp / f"{tag}.onnx", tmp / f"{tag}_one.onnx"  # one member of this very config
    export_onnx(fused, ens_path, X)
    export_onnx(Probabilities(members[0]).eval(), one_path, X)
    return ens_path, one_path, macs_per_sample(fused)


def session(path: Path, threads: int = 1):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def measure(fns: dict, rounds: int, reps: int) -> dict:
    """Median and p99 µs per call of each fn, interleaved round by round so that drift hits all alike."""
    samples = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter_ns()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter_ns() - t) / reps / 1e3)
    return {k: {"median_us": float(np.median(v)), "p99_us": float(np.percentile(v, 99))} for k, v in samples.items()}


def gemm_model(m: int, k: int, n: int, relu: bool = False, bias: bool = False, copies: int = 1):
    """An ONNX graph of `copies` independent (m, k) x (k, n) float32 GEMMs (+ bias, + ReLU) of one input,
    weights as initializers."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        inits.append(numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), f"W{c}"))
        inputs = ["x", f"W{c}"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{c}"))
            inputs.append(f"b{c}")
        nodes.append(helper.make_node("Gemm", inputs, [f"h{c}" if relu else f"y{c}"], transB=1))  # as torch exports nn.Linear
        if relu:
            nodes.append(helper.make_node("Relu", [f"h{c}"], [f"y{c}"]))
        outputs.append(helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, [m, n]))
    g = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def gemm_fns(n: int) -> dict:
    """Zero-argument callables: an n^3 float32 matmul on 1 thread in torch and in onnxruntime."""
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
    s = ort.InferenceSession(gemm_model(n, n, n), o, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    return {"peak_torch": lambda: torch.matmul(a, b), "peak_onnxruntime": lambda: s.run(None, {"x": x})}


def run(smoke: bool = False) -> dict:
    rounds, reps = (5, 3) if smoke else (40, 20)
    batches = (1, 32, 256)
    rng = np.random.default_rng(1)
    Xs = {b: rng.uniform(0, 16, (b, 64)).astype(np.float32) for b in batches}
    mlp = {"in_features": 64, "hidden": [256, 256], "n_outputs": 10}
    configs = [("mlp", k, mlp) for k in ((1, 3) if smoke else (1, 3, 5, 9))]
    if not smoke:
        configs += [("mlp", 5, {**mlp, "hidden": [1024, 1024]}), ("cnn", 5, {"in_features": 64, "n_outputs": 10})]
    out: dict = {"members": [], "size": []}
    with tempfile.TemporaryDirectory() as d:
        built = {(a, k, str(args.get("hidden"))): build_fused(a, k, args, Path(d)) for a, k, args in configs}
        sessions = {key: (session(e), session(o), macs) for key, (e, o, macs) in built.items()}
        n_peak = 256 if smoke else 1024
        for b in batches:
            fns = {}
            for key, (ens, one, _) in sessions.items():
                fns[(key, "ensemble")] = lambda s=ens, x=Xs[b]: s.run(None, {"input": x})
                fns[(key, "one")] = lambda s=one, x=Xs[b]: s.run(None, {"input": x})
            if b == 256:  # the peak and the shape ceiling, in the same rounds as the ensemble they judge
                fns |= gemm_fns(n_peak)
            res = measure(fns, rounds, max(1, reps // max(1, b // 32)))
            if b == 256:
                out["gemm"] = {name: {"median_us": res[name]["median_us"],
                                      "gflops": 2 * n_peak**3 / (res[name]["median_us"] * 1e-6) / 1e9}
                               for name in ("peak_torch", "peak_onnxruntime")}
            for key, (_, _, macs) in sessions.items():
                arch, k, hidden = key
                e, o = res[(key, "ensemble")], res[(key, "one")]
                row = {"arch": arch, "k": k, "hidden": hidden, "batch": b, "ensemble_us": e["median_us"],
                       "ensemble_p99_us": e["p99_us"], "one_member_us": o["median_us"],
                       "ensemble_over_one": e["median_us"] / o["median_us"], "macs_per_sample": macs,
                       "gflops": 2 * macs * b / (e["median_us"] * 1e-6) / 1e9}
                (out["members"] if (arch == "mlp" and hidden == "[256, 256]") else out["size"]).append(row)
    g = out["gemm"]
    peak = max(g["peak_torch"]["gflops"], g["peak_onnxruntime"]["gflops"])
    out["gemm_peak_gflops_1thread"] = peak
    out["gemm_peak_n"] = 256 if smoke else 1024
    five = [r for r in out["members"] if r["batch"] == 256 and r["k"] == (3 if smoke else 5)]
    if five:
        out["fused_b256_gflops"] = five[0]["gflops"]
        out["fused_b256_fraction_of_peak"] = five[0]["gflops"] / peak
    # cost growth per member: slope of a least-squares line through (K, latency) at each batch size
    out["us_per_member"] = {}
    for b in batches:
        pts = [(r["k"], r["ensemble_us"]) for r in out["members"] if r["batch"] == b]
        if len(pts) >= 2:
            ks, us = np.array(pts).T
            out["us_per_member"][str(b)] = float(np.polyfit(ks, us, 1)[0])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a quick correctness run")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    res = run(a.smoke)
    print(f"{'arch':5s} {'K':>2s} {'hidden':12s} {'batch':>5s} {'ens µs':>9s} {'one µs':>8s} {'ens/one':>7s} {'GFLOP/s':>8s}")
    for r in res["members"] + res["size"]:
        print(f"{r['arch']:5s} {r['k']:2d} {r['hidden']:12s} {r['batch']:5d} {r['ensemble_us']:9.1f} "
              f"{r['one_member_us']:8.1f} {r['ensemble_over_one']:7.2f} {r['gflops']:8.1f}")
    g = res["gemm"]
    print(f"single-core GEMM peak ({res['gemm_peak_n']}^3, median): torch {g['peak_torch']['gflops']:.1f}, "
          f"onnxruntime {g['peak_onnxruntime']['gflops']:.1f} GFLOP/s")
    print(f"fused b=256: {res.get('fused_b256_gflops', float('nan')):.1f} GFLOP/s = "
          f"{res.get('fused_b256_fraction_of_peak', float('nan')):.0%} of peak")
    print("µs per extra member:", {k: round(v, 1) for k, v in res["us_per_member"].items()})
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
