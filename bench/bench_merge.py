"""Merge throughput vs torch `copy_`, and peak memory of the streaming merge vs one model, measured side by side.

    python bench/bench_merge.py                 # 5 checkpoints x 100M float32 parameters (2 GB of input)
    python bench/bench_merge.py --params 20_000_000 --models 3
    python bench/bench_merge.py --smoke         # tiny sizes, for tests

Throughput is GB/s of *input* read: a K-model merge reads K·S bytes; the reference copies the same
K·S bytes with `Tensor.copy_` into preallocated buffers, at the same thread count, in the same
process, repeats interleaved, best of each reported (goal: merge >= 0.9x copy).

Peak memory is each child process's ru_maxrss from os.wait4. Every measurement runs in a child of
this small launcher, which never imports torch: Linux carries the parent's RSS at fork into the
child's ru_maxrss, so a launcher holding the test models would inflate every figure. Children: a
bare interpreter with torch and fusion.merge imported (baseline), the streaming `merge_files`, and
loading every checkpoint + merging in memory (which also checks the streamed file bit for bit).
Compared with one checkpoint's size (goal: streaming <= 1.5x). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _torch_setup(threads: int):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(threads)
    return torch


def make_checkpoint(torch, n_params: int, seed: int, tensor_params: int) -> dict:
    """n_params float32 values as (rows, cols) matrices of ~tensor_params each, plus a 1-D remainder."""
    gen = torch.Generator().manual_seed(seed)
    cols = 1024 if tensor_params >= 1024 * 64 else 64
    rows = max(1, tensor_params // cols)
    out, left, i = {}, n_params, 0
    while left >= rows * cols:
        out[f"layers.{i}.weight"] = torch.randn(rows, cols, generator=gen)
        left -= rows * cols
        i += 1
    if left:
        out["rest"] = torch.randn(left, generator=gen)
    return out


def _best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Interleaved repeats after one warm-up each; the minimum wall time of each."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def child_throughput(a, folder: Path) -> dict:
    """Time copy_ and the merge kernels on in-memory checkpoints, then write them as safetensors files."""
    torch = _torch_setup(a.threads)
    from safetensors.torch import save_file

    from fusion.merge import kernels as K
    from fusion.merge import merge

    k = a.models
    tensor_params = min(4 << 20, max(4096, a.params // 16))
    states = [make_checkpoint(torch, a.params, seed, tensor_params) for seed in range(k)]
    base = make_checkpoint(torch, a.params, 1000, tensor_params)
    size = sum(t.numel() * t.element_size() for t in states[0].values())
    keys = list(states[0])
    dst = [{key: torch.empty_like(v) for key, v in s.items()} for s in states]
    out = {key: torch.empty_like(v) for key, v in states[0].items()}
    weights = [1.0 + 0.25 * i for i in range(k)]

    def copy():
        for d, s in zip(dst, states):
            for key in keys:
                d[key].copy_(s[key])

    fns = {
        "copy_": copy,
        "linear": lambda: [K.linear_kernel([s[key] for s in states], out=out[key]) for key in keys],
        "linear_weighted": lambda: [K.linear_kernel([s[key] for s in states], weights, out=out[key]) for key in keys],
        "task_arithmetic": lambda: [K.task_arithmetic_kernel([s[key] for s in states], base[key], None, 0.5, out=out[key]) for key in keys],
        "merge_api_linear": lambda: merge("linear", states),  # allocates its output: first-touch page faults included
    }
    times = _best_of(fns, a.repeats)
    in_bytes = {name: (k + 1 if name == "task_arithmetic" else k) * size for name in fns}
    del dst, out
    for i, s in enumerate(states):
        save_file(s, str(folder / f"m{i}.safetensors"))
    return {"model_bytes": size, "gbps": {n: in_bytes[n] / t / 1e9 for n, t in times.items()}}


def child_stream(a, folder: Path) -> dict:
    _torch_setup(a.threads)
    from fusion.merge import merge_files

    t = time.perf_counter()
    summary = merge_files("linear", [folder / f"m{i}.safetensors" for i in range(a.models)], folder / "out_stream.safetensors")
    return {"seconds": time.perf_counter() - t, **summary}


def child_memory(a, folder: Path) -> dict:
    """Load every checkpoint, merge in memory, and compare with the streamed file bit for bit."""
    torch = _torch_setup(a.threads)
    from safetensors.torch import load_file

    from fusion.merge import merge

    t = time.perf_counter()
    merged = merge("linear", [load_file(str(folder / f"m{i}.safetensors")) for i in range(a.models)])
    seconds = time.perf_counter() - t
    streamed = load_file(str(folder / "out_stream.safetensors"))
    equal = set(streamed) == set(merged) and all(torch.equal(streamed[k], merged[k]) for k in merged)
    return {"seconds": seconds, "equal": equal}


def child_baseline(a, folder: Path) -> dict:
    _torch_setup(a.threads)
    import fusion.merge  # noqa: F401

    return {}


CHILDREN = {"throughput": child_throughput, "stream": child_stream, "memory": child_memory, "baseline": child_baseline}


def run_child(mode: str, a, folder: Path) -> tuple[int, dict]:
    """Run one measurement as a child of this launcher; its peak RSS in bytes (os.wait4) and its JSON."""
    args = [sys.executable, __file__, "--child", mode, str(folder), "--params", str(a.params),
            "--models", str(a.models), "--threads", str(a.threads), "--repeats", str(a.repeats)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"child '{mode}' failed ({proc.returncode}): {err.read().decode()[-3000:]}")
        lines = out.read().decode().strip().splitlines()
    return usage.ru_maxrss * 1024, json.loads(lines[-1])  # Linux reports ru_maxrss in KiB


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=100_000_000, help="parameters per checkpoint")
    p.add_argument("--models", type=int, default=5, help="checkpoints merged")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (for tests)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child[0]](a, Path(a.child[1]))))
        return {}
    if a.smoke:
        a.params, a.models, a.repeats = 300_000, 3, 2

    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        folder = Path(tmp)
        _, tp = run_child("throughput", a, folder)
        rss_base, _ = run_child("baseline", a, folder)
        rss_stream, stream = run_child("stream", a, folder)
        rss_memory, memory = run_child("memory", a, folder)

    size, gbps, k = tp["model_bytes"], tp["gbps"], a.models
    result = {
        "models": k,
        "params_per_model": a.params,
        "model_bytes": size,
        "threads": a.threads,
        "gbps_input": gbps,
        "throughput_ratio": gbps["linear"] / gbps["copy_"],
        "throughput_ratio_weighted": gbps["linear_weighted"] / gbps["copy_"],
        "throughput_ratio_task_arithmetic": gbps["task_arithmetic"] / gbps["copy_"],
        "throughput_ratio_merge_api": gbps["merge_api_linear"] / gbps["copy_"],
        "stream_seconds": stream["seconds"],
        "stream_gbps_input": k * size / stream["seconds"] / 1e9,
        "baseline_rss_bytes": rss_base,
        "stream_peak_rss_bytes": rss_stream,
        "stream_rss_over_model": rss_stream / size,
        "stream_rss_above_baseline_over_model": (rss_stream - rss_base) / size,
        "in_memory_peak_rss_bytes": rss_memory,
        "in_memory_rss_over_model": rss_memory / size,
        "streaming_equals_in_memory": memory["equal"],
    }
    print(f"merge of {k} x {a.params:,} float32 parameters ({size / MIB:.1f} MiB each), {a.threads} threads, best of {a.repeats}")
    print(f"{'':30s}{'GB/s of input':>14s}{'vs copy_':>10s}")
    for name in ("copy_", "linear", "linear_weighted", "task_arithmetic", "merge_api_linear"):
        print(f"  {name:28s}{gbps[name]:14.2f}{gbps[name] / gbps['copy_']:9.2f}x")
    print(f"  {'merge_files (streaming)':28s}{result['stream_gbps_input']:14.2f}{result['stream_gbps_input'] / gbps['copy_']:9.2f}x   (page cache, {stream['seconds']:.2f} s)")
    print(f"{'peak RSS (child ru_maxrss)':30s}{'MiB':>14s}{'/ model':>10s}")
    print(f"  {'interpreter + torch':28s}{rss_base / MIB:14.0f}{rss_base / size:9.2f}x")
    print(f"  {'streaming merge_files':28s}{rss_stream / MIB:14.0f}{rss_stream / size:9.2f}x   ({(rss_stream - rss_base) / size:.2f}x above the interpreter)")
    print(f"  {'load all + merge in memory':28s}{rss_memory / MIB:14.0f}{rss_memory / size:9.2f}x")
    print(f"streaming output equals the in-memory merge bit for bit: {memory['equal']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
