"""Streaming merge of safetensors checkpoints: entry by entry, never a whole model in memory.

Members are `.safetensors` files or Hugging Face directories (sharded or not), read lazily through
`fusion.merge.checkpoints` one entry (or one slice of rows of an entry, for elementwise methods) at a
time: whole entries into fresh buffers, row slices as read-only maps of the page cache that are
dropped after their step (FUSION_MERGE_MMAP=0: copied into reused buffers instead); the output, one
file or a directory of bounded shards, is written as it is computed (each shard's header is known up front because a merge keeps
every shape), so peak memory is a few entries, not a model, and needs no architecture.

Every entry goes through the same `merge_tensor` as the in-memory `merge`, so both give the same
bits; row slices of linear / uniform_soup / task_arithmetic with bf16 or float32 inputs and outputs run
instead through a fused C loop (`fusion.merge.native`) that performs the same float32 operations in
the same order, so it gives the same bits too (FUSION_MERGE_NATIVE=0 turns it off). Methods that need
whole-tensor statistics (TIES, DARE, breadcrumbs, model stock, SLERP) keep the whole-entry torch path.
Global-scope TIES takes extra passes: an exact radix select of each model's magnitude threshold (two
histogram passes for float32, four for float64), one pass for the majority sign, one to merge.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from fusion.errors import ConfigError
from fusion.merge import kernels as K
from fusion.merge import native
from fusion.merge.checkpoints import (
    DEFAULT_MAX_SHARD_BYTES,
    Checkpoint,
    CheckpointWriter,
    check_same_layout,
    open_checkpoint,
    parse_dtype,
    parse_size,
)
from fusion.merge.generalized import GeneralizedTaskArithmetic, TiesGlobalStats, elected_balance, global_kth, select_dtype
from fusion.merge.registry import MERGE_METHODS, MergeMethod, check_counts, check_weights, make_method

CHUNK_BYTES = 32 << 20  # rows of an elementwise entry merged per step, per input (in the working dtype)


class _Work:
    """A checkpoint seen in the merge's working dtypes: float entries cast on read (exactly, to a wider type)."""

    def __init__(self, ckpt: Checkpoint, work: dict[str, torch.dtype]):
        self.ckpt, self.path, self.work = ckpt, ckpt.path, work
        self.layout = {k: (s, work.get(k, d)) for k, (s, d) in ckpt.layout.items()}

    def get(self, key: str) -> Tensor:
        return self._cast(key, self.ckpt.get(key))

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        return self._cast(key, self.ckpt.rows(key, start, stop))

    def _cast(self, key: str, t: Tensor) -> Tensor:
        d = self.work.get(key)
        return t if d is None or d == t.dtype else t.to(d)


SUB_BLOCK = 1 << 18  # elements widened and merged at a time by `merge_blocked` (1 MiB of float32 per input: cache-sized)


def merge_blocked(cfg: MergeMethod, key: str, xs: Sequence[Tensor], base: Tensor | None, weights: tuple,
                  work: torch.dtype, out: Tensor, fused: bool = True) -> Tensor:
    """One slice of an elementwise entry (linear, task arithmetic) merged SUB_BLOCK elements at a time into
    `out` (its dtype is the output's), half-precision inputs widened to `work` block by block: the widened
    copies and each block's result stay in cache instead of making more passes over memory. Elementwise
    kernels give the same bits whatever the slicing (kernels.py). When `native_program` mirrors cfg and the
    dtypes are bf16/float32, the fused C loop does the whole slice in one pass instead (same bits; a slice
    with a NaN result is redone here, so NaN payloads are torch's). xs: K tensors of shape S in the file's
    dtype, base: S or None, out: S -> out."""
    flat_out = out.reshape(-1)
    flats = [x.reshape(-1) for x in xs]
    flat_base = base.reshape(-1) if base is not None else None
    n = flat_out.numel()
    program = fused_program(cfg, xs, weights, work, out.dtype) if fused and n else None
    if program is not None and _fused(program, flats, flat_base, flat_out):
        return out  # else a NaN somewhere: the torch path below gives torch's own bits
    m = min(n, SUB_BLOCK)
    widen = xs[0].dtype != work
    scratch = [torch.empty(m, dtype=work) for _ in range(len(xs) + (base is not None))] if widen else []
    for s in range(0, n, SUB_BLOCK):
        e = min(n, s + SUB_BLOCK)
        if widen:
            ys = [buf[: e - s].copy_(f[s:e]) for buf, f in zip(scratch, flats)]
            b = scratch[-1][: e - s].copy_(flat_base[s:e]) if base is not None else None
        else:
            ys = [f[s:e] for f in flats]
            b = flat_base[s:e] if base is not None else None
        flat_out[s:e].copy_(cfg.merge_tensor(key, ys, b, weights))
    return out


def native_program(cfg: MergeMethod, k: int, weights: tuple | None) -> tuple | None:
    """The fused loop's arguments (`native.fused_merge`, after the tensors) doing what `cfg.merge_tensor` does on
    float32 inputs, operation for operation, or None when cfg is not one it mirrors: `kernels.linear_kernel`
    (linear, uniform_soup) and `kernels.task_arithmetic_kernel` (task_arithmetic: no sparsification, no consensus)."""
    from fusion.merge.methods import Linear

    ws = [float(w) for w in weights] if weights is not None else [1.0] * k
    if isinstance(cfg, Linear) and type(cfg).merge_tensor is Linear.merge_tensor:
        uniform = weights is None or all(w == weights[0] for w in weights)  # as linear_kernel (normalize=True)
        total = float(k) if uniform else math.fsum(ws)
        return (0 if uniform else 1), ws, [True] * k, total, total != 1.0, 1.0, False
    if (isinstance(cfg, GeneralizedTaskArithmetic) and type(cfg).merge_tensor is GeneralizedTaskArithmetic.merge_tensor
            and cfg.scope == "tensor" and cfg.sparsification == "none" and cfg.consensus == "none"):
        scaling = float(cfg.scaling)
        return 2, ws, [w != 1.0 for w in ws], 1.0, False, scaling, scaling != 1.0
    return None


_pool: ThreadPoolExecutor | None = None  # shared by every merge of the process (threads idle between slices)
_pool_size = 0
FUSED_MIN_SPLIT = 1 << 20  # elements: below this a slice runs in one call (threads cost more than they save)


def _fused(program: tuple, flats: list[Tensor], flat_base: Tensor | None, flat_out: Tensor) -> bool:
    """Run the fused loop over one slice, split over torch's intra-op thread count (the loop releases the GIL).
    False when a result was NaN."""
    global _pool, _pool_size
    kind, ws, mul, total, do_div, scaling, do_scale = program
    n = flat_out.numel()
    threads = max(1, torch.get_num_threads()) if n >= FUSED_MIN_SPLIT else 1

    def part(s: int, e: int) -> bool:
        return native.fused_merge(kind, [f[s:e] for f in flats], flat_base[s:e] if flat_base is not None else None,
                                  ws, mul, total, do_div, scaling, do_scale, flat_out[s:e])

    if threads == 1:
        return part(0, n)
    if _pool is None or _pool_size < threads:
        _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="merge-fused"), threads
    step = -(-n // threads)
    return all(f.result() for f in [_pool.submit(part, s, min(n, s + step)) for s in range(0, n, step)])


WRITE_BLOCK = 1 << 20  # bytes of output `merge_and_write` merges and then writes at a time: written from cache


def fused_program(cfg: MergeMethod, xs: Sequence[Tensor], weights: tuple, work: torch.dtype, out_dtype: torch.dtype) -> tuple | None:
    """The fused loop's program for this slice (`native_program`), or None when the loop cannot run it."""
    if work != torch.float32 or not native.supports(xs[0].dtype, out_dtype) or not native.available()[0]:
        return None
    return native_program(cfg, len(xs), weights)


def merge_and_write(cfg: MergeMethod, key: str, program: tuple, xs: Sequence[Tensor], base: Tensor | None, weights: tuple,
                    work: torch.dtype, out_dtype: torch.dtype, write_at: Callable[[int, Tensor], None],
                    pool: ThreadPoolExecutor | None, workers: int) -> None:
    """One slice of an elementwise entry merged by the fused loop WRITE_BLOCK bytes of output at a time, each
    block handed to `write_at(byte offset in the slice, block)` as soon as it is computed, while it is still
    in cache: the output never makes a trip through memory between the arithmetic and the write's copy into
    the page cache (merging a whole slice into a buffer and writing it afterwards reads every output byte
    back from memory). `workers` threads of `pool` each take a contiguous part of the slice and alternate
    merging and writing, so one merges while another's write copies (the loop and os.pwrite release the
    GIL). A block whose result holds a NaN is recomputed on the torch path (`merge_blocked(..., fused=False)`):
    torch's own bits, as `merge_blocked` does for a slice. When a part fails (or the wait is interrupted) the
    others stop at their next block and are waited for before the error goes on, so no thread is still
    writing when the caller cleans up. xs: K tensors of shape S, base: S or None."""
    kind, ws, mul, total, do_div, scaling, do_scale = program
    flats = [x.reshape(-1) for x in xs]
    flat_base = base.reshape(-1) if base is not None else None
    n = flats[0].numel()
    size = out_dtype.itemsize
    block = max(1, WRITE_BLOCK // size)  # elements
    stop = threading.Event()

    def part(lo: int, hi: int) -> None:
        buf = torch.empty(min(block, hi - lo), dtype=out_dtype)
        for s in range(lo, hi, block):
            if stop.is_set():
                return
            e = min(hi, s + block)
            o = buf[: e - s]
            ys = [f[s:e] for f in flats]
            b = flat_base[s:e] if flat_base is not None else None
            if not native.fused_merge(kind, ys, b, ws, mul, total, do_div, scaling, do_scale, o):
                merge_blocked(cfg, key, ys, b, weights, work, o, fused=False)
            write_at(s * size, o)

    parts = max(1, min(workers, -(-n // block)))
    if parts == 1 or pool is None:
        return part(0, n)
    step = -(-(-(-n // parts)) // block) * block  # whole blocks per worker
    futures = [pool.submit(part, s, min(n, s + step)) for s in range(0, n, step)]
    try:
        for f in futures:
            f.result()
    finally:
        stop.set()
        wait(futures)


def work_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype an entry is merged in: float32 for half-precision entries (bf16, fp16, fp8), float64 when
    the entry or the output is float64, else the entry's own.

    The kernels accumulate half-precision entries in float32 anyway (`kernels.compute_dtype`) and round
    once at the end, so widening the inputs first gives the same bits after the final cast, while
    torch's mixed-dtype in-place ops (float32 += bfloat16) are an order of magnitude slower than
    float32 ones."""
    if in_dtype == out_dtype and in_dtype.itemsize >= 4:
        return in_dtype
    return torch.float64 if torch.float64 in (in_dtype, out_dtype) else torch.float32


def radix_kth(histogram, k: Sequence[int], bits: int) -> list[int]:
    """Exact k-th smallest (1-based) of several multisets of non-negative floats by 16-bit radix passes.

    histogram(prefixes, shift) -> list of (65536,) int64 counts, one per multiset, of the 16-bit digit
    (bits >> shift) & 0xFFFF over values whose higher bits (bits >> (shift + 16)) equal that multiset's
    prefix (no filter on the first pass). bits: 32 (float32) or 64 (float64). The IEEE bit patterns of
    non-negative floats sort like the floats, so digit-by-digit selection is exact.
    Returns the bit pattern of each k-th value.
    """
    prefixes = [0] * len(k)
    remaining = list(k)
    for shift in range(bits - 16, -1, -16):
        hists = histogram(None if shift == bits - 16 else prefixes, shift)
        for i, h in enumerate(hists):
            cum = torch.cumsum(h, 0)  # (65536,)
            digit = int(torch.searchsorted(cum, remaining[i]))  # first bin reaching rank
            below = int(cum[digit - 1]) if digit > 0 else 0
            prefixes[i] = (prefixes[i] << 16) | digit
            remaining[i] -= below
    return prefixes


def _bits_of(mag: Tensor) -> Tensor:
    return mag.view(torch.int32 if mag.dtype == torch.float32 else torch.int64).reshape(-1)


def _float_of(bits: int, sel: torch.dtype) -> float:
    int_dtype = torch.int32 if sel == torch.float32 else torch.int64
    return float(torch.tensor([bits], dtype=int_dtype).view(sel)[0])


def _ties_global_stats_streaming(ties: GeneralizedTaskArithmetic, sources, base: "_Work", keys: list[str], weights) -> TiesGlobalStats:
    sel = select_dtype([base.layout[k][1] for k in keys])
    d = sum(math.prod(base.layout[k][0]) for k in keys)
    kth = global_kth(d, float(ties.density)) if d else None
    thresholds: list[float | None] = [None] * len(sources)
    if kth is not None:
        def histogram(prefixes, shift):
            hists = [torch.zeros(65536, dtype=torch.int64) for _ in sources]
            for key in keys:
                b = base.get(key)
                for i, src in enumerate(sources):
                    bits = _bits_of(K.task_vectors([src.get(key)], b)[0].abs().to(sel))  # (n,)
                    if prefixes is not None:
                        bits = bits[(bits >> (shift + 16)) == prefixes[i]]
                    hists[i] += torch.bincount(((bits >> shift) & 0xFFFF).long(), minlength=65536)
            return hists

        found = radix_kth(histogram, [kth] * len(sources), 32 if sel == torch.float32 else 64)
        thresholds = [_float_of(b, sel) for b in found]
    balance = sum(elected_balance([s.get(k) for s in sources], base.get(k), weights, thresholds, sel) for k in keys)
    return TiesGlobalStats(tuple(thresholds), (balance > 0) - (balance < 0), sel)


def streamable_methods() -> list[str]:
    return sorted(n for n, cls in MERGE_METHODS.items() if cls.streaming != "none")  # task-arithmetic family: a per-instance property


def _per_key(method: str, cfg: MergeMethod, params: dict, ws: tuple, n_models: int, params_for) -> Callable[[str], tuple[MergeMethod, tuple]]:
    """key -> (method instance, weights) with `params_for(key)` merged over the global params (cached per distinct set)."""
    if params_for is None:
        return lambda key: (cfg, ws)
    if cfg.streaming == "global":
        raise ConfigError(f"merge method '{method}' with scope='global' takes whole-model thresholds; expected no per-tensor parameters (params_for); got some")
    cache: dict[tuple, tuple[MergeMethod, tuple]] = {}

    def resolve(key: str):
        extra = params_for(key) or {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"params_for('{key}'): expected a mapping of parameter -> value; got {type(extra).__name__}")
        extra = dict(extra)
        w = extra.pop("weights", None)
        sig = (repr(sorted(extra.items())), repr(w))
        if sig not in cache:
            try:
                c = make_method(method, **{**params, **extra}) if extra else cfg
                cache[sig] = (c, ws if w is None else check_weights(w, n_models, c))
            except ConfigError as exc:
                raise ConfigError(f"entry '{key}': {exc}") from None
        return cache[sig]

    return resolve


def merge_files(
    method: str, paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
    base_path: str | os.PathLike | None = None, weights: Sequence[float] | None = None, *,
    metadata: dict[str, str] | None = None, chunk_bytes: int = CHUNK_BYTES,
    params_for: Callable[[str], dict] | None = None, out_dtype: str | torch.dtype | None = None,
    max_shard_bytes: int | str | None = None, **params: Any,
) -> dict[str, Any]:
    """Merge checkpoints entry by entry into `out_path`; equals `merge` on the loaded state dicts bit for bit.

    paths: K members, each a `.safetensors` file or a Hugging Face directory (`open_checkpoint`), with
    identical entries, shapes and dtypes (shards may split them differently); base_path: the base for
    task-vector methods; weights, params: as for `merge`. Methods: those whose entries merge
    independently (linear, uniform_soup, task_arithmetic, ties, dare_linear, dare_ties, slerp,
    breadcrumbs, model_stock); greedy_soup, fisher and regmean need whole models and are refused.

    params_for(key) -> dict: per-entry parameters merged over `params` (e.g. a density or `weights`
    that vary by layer; not with global-scope TIES). out_dtype: float entries are written in it
    (float32 / bfloat16 / float16); by default in their own dtype (half-precision entries are
    accumulated in float32 either way). out_path: a `.safetensors` path gets one file; any other path a
    Hugging Face directory: shards of at most `max_shard_bytes` (default 5 GB; "500MB" style accepted)
    + `model.safetensors.index.json`, and the config and tokenizer files of the base (else the first
    member) when that is a directory. Elementwise methods (linear, uniform_soup, task_arithmetic) read
    `chunk_bytes` of rows at a time, so even one huge entry streams; peak memory is about one entry
    (or chunk) per input plus the merged one. Written atomically (temporary sibling + rename).
    Returns a JSON-serialisable summary (method, entries, bytes read and written, passes, files).
    """
    cfg = make_method(method, **params)
    if cfg.streaming == "none":
        raise ConfigError(f"merge method '{method}' needs whole models in memory; expected one of {streamable_methods()} for streaming")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ConfigError(f"expected chunk_bytes >= 1; got {chunk_bytes!r}")
    out_path = Path(out_path)
    as_dir = out_path.suffix != ".safetensors"
    if not as_dir and out_path.is_dir():
        raise ConfigError(f"expected a new .safetensors file path; got an existing directory '{out_path}' "
                          "(an --out without .safetensors writes a Hugging Face directory)")
    if max_shard_bytes is not None and not as_dir:
        raise ConfigError(f"max_shard_bytes applies to a directory output; expected an --out without .safetensors; got '{out_path}'")
    shard_bytes = parse_size(DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)
    odt = parse_dtype(out_dtype)
    paths = [Path(p) for p in paths]
    check_counts(cfg, len(paths), base_path is not None)
    ws = check_weights(weights, len(paths), cfg)
    ckpts = [open_checkpoint(p) for p in paths]
    base_ckpt = open_checkpoint(base_path) if base_path is not None else None
    everything = ckpts + ([base_ckpt] if base_ckpt is not None else [])
    check_same_layout(everything)
    in_layout = ckpts[0].layout
    keys = ckpts[0].keys()
    float_keys = [k for k in keys if in_layout[k][1].is_floating_point]
    out_layout = {k: (s, odt if (odt is not None and d.is_floating_point) else d) for k, (s, d) in in_layout.items()}
    work = {k: work_dtype(in_layout[k][1], out_layout[k][1]) for k in float_keys}
    sources = [_Work(c, work) for c in ckpts]
    base = _Work(base_ckpt, work) if base_ckpt is not None else None
    per_key = _per_key(method, cfg, dict(params), ws, len(paths), params_for)

    passes = 1
    if cfg.streaming == "global":
        stats = _ties_global_stats_streaming(cfg, sources, base, float_keys, ws)
        passes += 1 + (0 if stats.thresholds[0] is None else (32 if stats.select_dtype == torch.float32 else 64) // 16)

        def merge_entry(key, xs, b):
            return cfg.merge_tensor_global(key, xs, b, ws, stats)
    else:

        def merge_entry(key, xs, b):
            c, w = per_key(key)
            return c.merge_tensor(key, xs, b, w)

    companions = next((c.path for c in ([base_ckpt] if base_ckpt is not None else []) + ckpts if c.is_dir), None)
    ref_index = (base_ckpt if base_ckpt is not None and base_ckpt.is_dir else ckpts[0]).index_metadata
    index_metadata = {"total_parameters": ref_index["total_parameters"]} if "total_parameters" in ref_index else {}
    every = sources + ([base] if base is not None else [])

    def steps():
        """(key, first row, end row or None for the whole entry, bytes read per input, floating?) in output order."""
        for key in writer.order:
            shape, dtype = in_layout[key]
            nbytes = math.prod(shape) * dtype.itemsize
            if not dtype.is_floating_point:  # integer buffers are copied from the first model
                yield key, None, None, nbytes, False
                continue
            c, _ = per_key(key) if cfg.streaming != "global" else (cfg, ws)
            if c.streaming == "elementwise" and shape:
                row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
                step = max(1, chunk_bytes // row_bytes)
                for r in range(0, shape[0], step):
                    yield key, r, r + step, min(step, shape[0] - r) * row_bytes, True
            else:
                yield key, None, None, nbytes, True

    mapped = os.environ.get("FUSION_MERGE_MMAP", "1").strip().lower() not in ("0", "false", "no", "off")
    # fused elementwise slices are merged and written block by block (`merge_and_write`) by the intra-op threads
    # plus the one that otherwise writes; FUSION_MERGE_BLOCK_WRITES=0: merged whole, then written by the writer thread
    blocks_written = os.environ.get("FUSION_MERGE_BLOCK_WRITES", "1").strip().lower() not in ("0", "false", "no", "off")
    workers = max(1, torch.get_num_threads()) + 1

    def read(src, key, lo, hi, buf):  # row slices (elementwise steps) stay in the file's dtype: `merge_blocked` widens them
        if lo is None:
            return src.get(key)
        # mapped: the page-cache pages themselves (no copy; `merge_blocked` only reads them), unmapped when dropped
        return src.ckpt.mapped_rows(key, lo, hi) if mapped else src.ckpt.rows(key, lo, hi, out=buf)

    # elementwise steps read into and merge into reused buffers (two of each, alternating: the next
    # step's reads and the previous step's write overlap this step), so pages are not faulted in afresh
    in_bufs: dict[tuple[int, int], Tensor] = {}
    out_bufs: dict[int, Tensor] = {}

    def buffer(pool: dict, slot, nbytes: int) -> Tensor:
        if slot not in pool or pool[slot].numel() < nbytes:
            pool[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return pool[slot]

    # Reads of one step run in parallel (one thread per input), the next step's reads while this one
    # merges (only for steps of at most chunk_bytes, so whole large entries are never held twice), and
    # each merged piece is written by a writer thread while the next one merges: file I/O releases the GIL.
    # Slices the fused loop runs are instead merged and written block by block by `workers` threads.
    with CheckpointWriter(out_path, [(k, *out_layout[k]) for k in keys], as_dir=as_dir, max_shard_bytes=shard_bytes,
                          metadata=({"format": "pt", **(metadata or {})} if as_dir else metadata),
                          companions_from=companions if as_dir else None, index_metadata=index_metadata) as writer, \
            ThreadPoolExecutor(len(every), thread_name_prefix="merge-read") as readers, \
            ThreadPoolExecutor(1, thread_name_prefix="merge-write") as writes, \
            ThreadPoolExecutor(workers, thread_name_prefix="merge-write-blocks") as block_writers:

        def fetch(st, j):
            key, lo, hi, nbytes, is_float = st
            return [readers.submit(read, src, key, lo, hi, None if lo is None or mapped else buffer(in_bufs, (j % 2, i), nbytes))
                    for i, src in enumerate(every if is_float else sources[:1])]

        todo = steps()
        cur = next(todo, None)
        j = 0  # step number: buffer slot j % 2
        pending = fetch(cur, j) if cur is not None else None
        last_write = None
        while cur is not None:
            nxt = next(todo, None)
            ahead = nxt is not None and nxt[3] <= chunk_bytes
            futures, pending = pending, (fetch(nxt, j + 1) if ahead else None)
            vals = [f.result() for f in futures]
            key, lo, _, _, is_float = cur
            if is_float and lo is not None:
                c, w = per_key(key)
                step_dtype = out_layout[key][1]
                xs, b = vals[: len(sources)], (vals[len(sources)] if base is not None else None)
                program = fused_program(c, xs, w, work[key], step_dtype) if blocks_written else None
                if program is not None:  # merged and written block by block, from cache, here
                    if last_write is not None:
                        last_write.result()  # entries reach the writer in order (shard by shard)
                        last_write = None
                    at = lo * math.prod(vals[0].shape[1:]) * step_dtype.itemsize  # the slice's first byte in the entry
                    merge_and_write(c, key, program, xs, b, w, work[key], step_dtype,
                                    lambda off, t, key=key, at=at: writer.write_at(key, at + off, t), block_writers,
                                    workers)
                    merged = None  # written
                else:
                    shape = vals[0].shape
                    nbytes = math.prod(shape) * step_dtype.itemsize
                    out = buffer(out_bufs, j % 2, nbytes)[:nbytes].view(step_dtype).reshape(shape)
                    merged = merge_blocked(c, key, xs, b, w, work[key], out)
                del xs, b
            elif is_float:
                merged = merge_entry(key, vals[: len(sources)], vals[len(sources)] if base is not None else None)
                merged = merged.to(out_layout[key][1])
            else:
                merged = vals[0]
            del vals, futures
            if merged is not None:
                if last_write is not None:
                    last_write.result()
                last_write = writes.submit(writer.write, key, merged)
                del merged
            cur = nxt
            j += 1
            if cur is not None and pending is None:
                pending = fetch(cur, j)
        if last_write is not None:
            last_write.result()
    entry_bytes = sum(math.prod(s) * d.itemsize for s, d in in_layout.values())
    return {
        "method": method,
        "params": {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))},
        "n_models": len(paths),
        "entries": len(keys),
        "bytes_read": entry_bytes * len(everything) * passes,
        "bytes_written": writer.total_size,
        "passes": passes,
        "out_path": str(out_path),
        "out_dir": as_dir,
        "out_dtype": None if odt is None else str(odt).removeprefix("torch."),
        "files": [p.name for p in writer.files],
        "largest_shard_bytes": writer.largest_shard_bytes,
        "per_tensor_params": params_for is not None,
    }
