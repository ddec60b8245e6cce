"""Streaming merge of a sharded Hugging Face checkpoint pair: peak RSS ÷ largest shard, GB/s ÷ torch `copy_`.

    python -m bench.bench_merge_sharded                  # two 2 GB bf16 checkpoints, 1 GB shards (6 GB of disk)
    python -m bench.bench_merge_sharded --gb 4 --shard-size 2GB
    python -m bench.bench_merge_sharded --smoke          # tiny sizes, for tests

The benchmark writes two synthetic checkpoints of random bf16 tensors shaped like a 7B decoder's
(embedding and head 32000x4096, per layer four 4096x4096 and three 11008x4096 matrices and two norms)
with huggingface_hub's `save_torch_state_dict` (independent of the code measured), sharded
differently (`--shard-size` and 0.7 of it, so keys fall in different files), under artifacts/ (or
`--dir`), and deletes them afterwards. `merge_files("linear", ...)` then merges them into a sharded
directory (`--shard-size` shards), bf16 accumulated in float32 and written back in bf16: the fused C
loop merges 1 MB of output at a time and writes it straight away, from cache, in two workers (the
intra-op thread and the one that used to write alone), into files reserved up front with fallocate.

Every measurement runs in a child of this launcher, which never imports torch (Linux carries a
parent's RSS into a forked child's ru_maxrss): the peak RSS is the child's ru_maxrss from os.wait4.
Children: a bare interpreter with torch and fusion.merge imported (baseline), the streaming merge,
and torch `copy_` of the same bytes (each entry of each input copied into a preallocated buffer,
the same entries in the same order, at the same thread count); beside them, for context, the writes
alone (the output's size written to new files from one buffer, reserved as the merge reserves them:
the page cache's write floor, in the merge's 1 MB blocks), the merge's arithmetic alone (`merge_blocked`
over in-memory buffers, same chunks and order), and the code path before the fused loop and mapped
reads (FUSION_MERGE_NATIVE=0 FUSION_MERGE_MMAP=0), whose output must be the same bytes. They
alternate, best of `--repeats`; the launcher syncs dirty pages to disk before each child, so no child
pays for the previous one's writeback. Throughput is GB/s of input read (2 checkpoints); the files
were just written, so they are read through the page cache as far as the machine's free memory allows. Goals: peak RSS ÷ largest output shard
≤ 1.5, merge GB/s ÷ copy_ GB/s ≥ 0.9. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def layout(total_bytes: int, hidden: int, ffn: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Decoder-shaped bf16 entries adding up to about total_bytes: embed, layers until full, norm, head."""
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    per_layer = [("self_attn.q_proj.weight", (hidden, hidden)), ("self_attn.k_proj.weight", (hidden, hidden)),
                 ("self_attn.v_proj.weight", (hidden, hidden)), ("self_attn.o_proj.weight", (hidden, hidden)),
                 ("mlp.gate_proj.weight", (ffn, hidden)), ("mlp.up_proj.weight", (ffn, hidden)),
                 ("mlp.down_proj.weight", (hidden, ffn)), ("input_layernorm.weight", (hidden,)),
                 ("post_attention_layernorm.weight", (hidden,))]
    layer_bytes = sum(2 * _numel(s) for _, s in per_layer)
    used = 2 * 2 * vocab * hidden + 2 * hidden
    i = 0
    while used < total_bytes or i == 0:  # at least total_bytes
        out += [(f"model.layers.{i}.{n}", s) for n, s in per_layer]
        used += layer_bytes
        i += 1
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _torch(threads: int):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(threads)
    return torch


def child_write(a, folder: Path) -> dict:
    """Write the two checkpoints, one at a time (each ~gb in memory here, in this child only)."""
    torch = _torch(a.threads)
    from huggingface_hub import save_torch_state_dict

    entries = layout(int(a.gb * 1e9), a.hidden, a.ffn, a.vocab)
    for i, shard in enumerate((a.shard_size, int(a.shard_size * 0.7))):
        g = torch.Generator().manual_seed(i)
        state = {k: torch.randn(s, generator=g).mul_(0.02).to(torch.bfloat16) for k, s in entries}
        (folder / f"m{i}").mkdir()
        save_torch_state_dict(state, folder / f"m{i}", max_shard_size=shard)
        del state
    (folder / "m0" / "config.json").write_text(json.dumps({"architectures": ["Synthetic"], "torch_dtype": "bfloat16"}))
    return {"entries": len(entries), "bytes": sum(2 * _numel(s) for _, s in entries)}


def child_stream(a, folder: Path) -> dict:
    _torch(a.threads)
    from fusion.merge import merge_files, native

    if os.environ.get("FUSION_MERGE_NATIVE", "1") != "0":
        ok, why = native.available()  # built (or found in the cache) before the clock starts
        if not ok:
            raise SystemExit(f"expected the fused merge loop; got: {why}")

    out = folder / "merged"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    summary = merge_files("linear", [folder / "m0", folder / "m1"], out, max_shard_bytes=a.shard_size)
    return {"seconds": time.perf_counter() - t, **summary}


def child_copy(a, folder: Path) -> dict:
    """copy_ of the same bytes: every entry of both inputs, in order, into a preallocated buffer."""
    torch = _torch(a.threads)
    from fusion.merge import open_checkpoint

    ckpts = [open_checkpoint(folder / "m0"), open_checkpoint(folder / "m1")]
    largest = max(e.nbytes for e in ckpts[0].entries.values())
    src = torch.empty(largest // 2, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    sizes = [e.nbytes // 2 for c in ckpts for e in c.entries.values()]
    t = time.perf_counter()
    for n in sizes:
        dst[:n].copy_(src[:n])
    return {"seconds": time.perf_counter() - t, "bytes": 2 * sum(sizes)}


def _entry_chunks(ckpt, key: str, chunk: int):
    """(first row, end row) pieces of an entry of at most `chunk` bytes, as the merge steps through it."""
    shape, dtype = ckpt.layout[key]
    if not shape:
        return [(None, None)]
    row = max(1, _numel(shape[1:]) * dtype.itemsize)
    step = max(1, chunk // row)
    return [(r, r + step) for r in range(0, shape[0], step)]


def child_io(a, folder: Path) -> dict:
    """The writes alone: the output's size written to a new file from one reused in-memory block of the size the
    merge writes (in cache), the file reserved up front as the merge's writer reserves them: the page cache's
    write floor, one writer."""
    torch = _torch(a.threads)
    from fusion.merge import open_checkpoint
    from fusion.merge.checkpoints import reserve
    from fusion.merge.streaming import WRITE_BLOCK as CHUNK_BYTES

    total = sum(e.nbytes for e in open_checkpoint(folder / "m0").entries.values())
    shutil.rmtree(folder / "merged", ignore_errors=True)  # as the merge deletes its previous output: see main()
    buf = torch.empty(CHUNK_BYTES, dtype=torch.uint8).fill_(1)
    view = memoryview(buf.numpy())
    t = time.perf_counter()
    with open(folder / "w.bin", "wb") as f:
        reserve(f.fileno(), total)
        for s in range(0, total, CHUNK_BYTES):
            f.write(view[: min(CHUNK_BYTES, total - s)])
    write_seconds = time.perf_counter() - t
    (folder / "w.bin").unlink()
    return {"write_seconds": write_seconds}


def child_compute(a, folder: Path) -> dict:
    """The merge's arithmetic alone, in memory: `merge_blocked` (what merge_files runs per chunk) over the same
    entries in the same chunks and order, from two preallocated bf16 buffers into a preallocated output:
    what the merge costs without its files, to set beside copy_ of the same bytes."""
    torch = _torch(a.threads)
    from fusion.merge import open_checkpoint
    from fusion.merge.registry import make_method
    from fusion.merge.streaming import CHUNK_BYTES, merge_blocked, native

    if os.environ.get("FUSION_MERGE_NATIVE", "1") != "0" and not native.available()[0]:
        raise SystemExit(f"expected the fused merge loop; got: {native.available()[1]}")
    ckpt = open_checkpoint(folder / "m0")
    cfg = make_method("linear")
    srcs = [torch.empty(CHUNK_BYTES // 2, dtype=torch.bfloat16).normal_() for _ in range(2)]
    out = torch.empty_like(srcs[0])
    sizes = []
    for key in ckpt.keys():
        shape, _ = ckpt.layout[key]
        row = _numel(shape[1:]) if shape else 1
        for lo, hi in _entry_chunks(ckpt, key, CHUNK_BYTES):
            sizes.append(_numel(shape) if lo is None else (min(hi, shape[0]) - lo) * row)
    t = time.perf_counter()
    for n in sizes:
        merge_blocked(cfg, "k", [x[:n] for x in srcs], None, None, torch.float32, out[:n])
    return {"seconds": time.perf_counter() - t, "bytes": 2 * 2 * sum(sizes)}


def child_check(a, folder: Path) -> dict:
    """The merged directory equals the in-memory merge, entry by entry (read with safetensors' loader)."""
    torch = _torch(a.threads)
    from safetensors.torch import load_file

    from fusion.merge import merge

    def load(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ins, got = [load(folder / "m0"), load(folder / "m1")], load(folder / "merged")
    expected = merge("linear", ins)
    return {"equal": set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)}


def child_baseline(a, folder: Path) -> dict:
    _torch(a.threads)
    import fusion.merge  # noqa: F401

    return {}


CHILDREN = {"write": child_write, "stream": child_stream, "copy": child_copy, "io": child_io, "check": child_check,
            "baseline": child_baseline, "compute": child_compute}
# the code path before the fused loop and the mapped reads (torch ops per block, reads copied into buffers)
TORCH_PATH = {"FUSION_MERGE_NATIVE": "0", "FUSION_MERGE_MMAP": "0"}


def run_child(mode: str, a, folder: Path, env: dict | None = None) -> tuple[int, dict]:
    """One measurement in a child process: its peak RSS in bytes (os.wait4's ru_maxrss) and its JSON."""
    args = [sys.executable, "-m", "bench.bench_merge_sharded", "--child", mode, str(folder), "--gb", str(a.gb),
            "--shard-size", str(a.shard_size), "--threads", str(a.threads), "--hidden", str(a.hidden),
            "--ffn", str(a.ffn), "--vocab", str(a.vocab)]
    # dirty pages of the previous child (the inputs just written, a merged output) go to disk first: otherwise
    # their writeback throttles this child's writes (several-fold, on a small VM) and the figures say which ran after which
    os.sync()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=ROOT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if code != 0:
            raise RuntimeError(f"child '{mode}' failed ({code}): {err.read().decode()[-3000:]}")
        lines = out.read().decode().strip().splitlines()
    return usage.ru_maxrss * 1024, json.loads(lines[-1])


def _digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        with open(p, "rb") as f:
            out[p.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def _size(s: str) -> int:
    """'1GB' -> 10^9, '500MB', '1GiB' -> 2^30 (as fusion.merge.checkpoints.parse_size; torch stays out of the launcher)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(s), flags=re.IGNORECASE)
    if not m:
        raise SystemExit(f"--shard-size: expected a size such as 500MB or 1GB; got {s!r}")
    unit = (m.group(2) or "B").upper()
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                                    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="size of each checkpoint in GB (10^9 bytes)")
    p.add_argument("--shard-size", default="1GB", help="output shard size (first input: the same; second: 0.7 of it)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the merge and for copy_ alike (default 1: the merge's reads and writes run in threads of their own)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dir", default=str(ROOT / "artifacts"), help="where the synthetic checkpoints go (deleted afterwards)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (for tests)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.shard_size = int(a.shard_size)
        print(json.dumps(CHILDREN[a.child[0]](a, Path(a.child[1]))))
        return {}
    if a.smoke:
        a.gb, a.shard_size, a.hidden, a.ffn, a.vocab, a.repeats = 0.004, "1MB", 64, 172, 500, 1
    a.shard_size = _size(a.shard_size)
    need = 3 * a.gb * 1e9
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(a.dir).free
    if free < need * 1.2:
        raise SystemExit(f"bench_merge_sharded: expected {need * 1.2 / 1e9:.1f} GB free under {a.dir}; got {free / 1e9:.1f} GB")

    folder = Path(tempfile.mkdtemp(prefix="bench_merge_sharded_", dir=a.dir))
    try:
        _, written = run_child("write", a, folder)
        rss_base, _ = run_child("baseline", a, folder)
        best = dict.fromkeys(["stream", "stream_torch", "copy", "write", "compute", "compute_torch"], float("inf"))
        rss_stream = rss_torch = 0
        same_as_torch = True
        copy_bytes = 0
        for _ in range(a.repeats):  # interleaved, so that load from other processes hits every figure alike
            rss_c, c = run_child("copy", a, folder)
            best["copy"] = min(best["copy"], c["seconds"])
            copy_bytes = c["bytes"]
            best["write"] = min(best["write"], run_child("io", a, folder)[1]["write_seconds"])
            best["compute"] = min(best["compute"], run_child("compute", a, folder)[1]["seconds"])
            best["compute_torch"] = min(best["compute_torch"], run_child("compute", a, folder, TORCH_PATH)[1]["seconds"])
            # every child that writes deletes the previous output before its clock starts (as a re-run of a
            # merge into the same place does), so each writes into page-cache memory just freed: keeping a
            # second output would make the next writes land in memory the VM has not touched yet, several
            # times slower on these machines, and the figures would say which child ran first
            rss, s = run_child("stream", a, folder, TORCH_PATH)
            best["stream_torch"] = min(best["stream_torch"], s["seconds"])
            rss_torch = max(rss_torch, rss)
            torch_digests = _digests(folder / "merged")
            rss, s = run_child("stream", a, folder)
            best["stream"] = min(best["stream"], s["seconds"])
            rss_stream = max(rss_stream, rss)
            same_as_torch = same_as_torch and _digests(folder / "merged") == torch_digests  # every byte of every file
        _, check = run_child("check", a, folder) if a.smoke or a.gb <= 0.5 else (0, {"equal": None})
        shards = sorted((folder / "merged").glob("*.safetensors"))
        shard_bytes = [f.stat().st_size for f in shards]
        in_shards = {i: len(list((folder / f"m{i}").glob("*.safetensors"))) for i in (0, 1)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    in_bytes = 2 * written["bytes"]
    assert copy_bytes == in_bytes, (copy_bytes, in_bytes)
    largest = max(shard_bytes)
    gbps_stream = in_bytes / best["stream"] / 1e9
    gbps_copy = in_bytes / best["copy"] / 1e9
    result = {
        "checkpoint_bytes": written["bytes"],
        "entries": written["entries"],
        "input_shards": [in_shards[0], in_shards[1]],
        "output_shards": len(shards),
        "largest_shard_bytes": largest,
        "max_shard_bytes": a.shard_size,
        "threads": a.threads,
        "stream_seconds": best["stream"],
        "copy_seconds": best["copy"],
        "stream_gbps_input": gbps_stream,
        "copy_gbps": gbps_copy,
        "throughput_ratio": gbps_stream / gbps_copy,
        "write_gbps_output": written["bytes"] / best["write"] / 1e9,
        "write_floor_gbps_input": in_bytes / best["write"] / 1e9,
        "write_floor_over_copy": (in_bytes / best["write"]) / (in_bytes / best["copy"]),
        "compute_gbps_input": in_bytes / best["compute"] / 1e9,
        "compute_over_copy": best["copy"] / best["compute"],
        "torch_path_stream_gbps_input": in_bytes / best["stream_torch"] / 1e9,
        "torch_path_throughput_ratio": best["copy"] / best["stream_torch"],
        "torch_path_compute_gbps_input": in_bytes / best["compute_torch"] / 1e9,
        "torch_path_peak_rss_bytes": rss_torch,
        "same_bytes_as_torch_path": same_as_torch,
        "load_average": list(os.getloadavg()),
        "baseline_rss_bytes": rss_base,
        "stream_peak_rss_bytes": rss_stream,
        "rss_over_largest_shard": rss_stream / largest,
        "rss_above_baseline_over_largest_shard": (rss_stream - rss_base) / largest,
        "streaming_equals_in_memory": check["equal"],
    }
    print(f"linear merge of 2 x {written['bytes'] / 1e9:.2f} GB bf16 checkpoints ({written['entries']} entries; "
          f"{in_shards[0]} and {in_shards[1]} input shards) -> {len(shards)} shards of <= {a.shard_size / 1e9:.2f} GB, "
          f"{a.threads} threads, best of {a.repeats}")
    print(f"  merge_files (streaming)   {gbps_stream:8.2f} GB/s of input   ({best['stream']:.2f} s)")
    print(f"  torch copy_ same bytes    {gbps_copy:8.2f} GB/s            ({best['copy']:.2f} s)")
    print(f"  ratio                     {result['throughput_ratio']:8.3f}   (goal >= 0.9)")
    print(f"  the arithmetic alone, in memory (merge_blocked, same chunks) {result['compute_gbps_input']:.2f} GB/s of input: "
          f"{result['compute_over_copy']:.3f}x copy_")
    print(f"  writing the output's bytes alone (a new file, 1 MB blocks, one writer) {result['write_gbps_output']:.2f} GB/s = "
          f"{result['write_floor_gbps_input']:.2f} GB/s of input: {result['write_floor_over_copy']:.3f}x copy_")
    print(f"  torch path (FUSION_MERGE_NATIVE=0 FUSION_MERGE_MMAP=0): merge {result['torch_path_stream_gbps_input']:.2f} GB/s "
          f"(ratio {result['torch_path_throughput_ratio']:.3f}), arithmetic alone {result['torch_path_compute_gbps_input']:.2f} GB/s; "
          f"same output bytes: {same_as_torch}")
    print(f"  load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"  peak RSS {rss_stream / MIB:.0f} MiB (interpreter + torch {rss_base / MIB:.0f} MiB), largest shard "
          f"{largest / MIB:.0f} MiB: {result['rss_over_largest_shard']:.3f}x (goal <= 1.5), "
          f"{result['rss_above_baseline_over_largest_shard']:.3f}x above the interpreter")
    if check["equal"] is not None:
        print(f"  streamed output equals the in-memory merge bit for bit: {check['equal']}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
