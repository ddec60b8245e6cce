"""Streaming merge of safetensors checkpoints: entry by entry, never a whole model in memory.

Each member is read lazily with `safetensors.safe_open`, one entry (or one slice of rows of an
entry, for elementwise methods) at a time; the output is written as it is computed (the header is
known up front because a merge keeps every shape and dtype), so peak memory is a few entries,
not a model. A handle is opened per read because safetensors maps the whole file and pages read
through a handle stay resident until the handle closes.

Every entry goes through the same `merge_tensor` as the in-memory `merge`, so both give the same
bits. Global-scope TIES takes extra passes: an exact radix select of each model's magnitude
threshold (two histogram passes for float32, four for float64), one pass for the majority sign,
one to merge.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from fusion.errors import ConfigError
from fusion.merge import kernels as K
from fusion.merge.generalized import GeneralizedTaskArithmetic, TiesGlobalStats, elected_balance, global_kth, select_dtype
from fusion.merge.registry import MERGE_METHODS, check_counts, check_layouts, check_weights, make_method

CHUNK_BYTES = 64 << 20  # rows of an elementwise entry read per step, per input file

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in _DTYPES.items()}


class SafetensorsSource:
    """One safetensors file: its layout from the header, entries read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: expected a safetensors file; got no such file")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata() or {}
                self.layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    code = sl.get_dtype()
                    if code not in _DTYPES:
                        raise ConfigError(f"{self.path}, entry '{key}': expected a dtype in {sorted(_DTYPES)}; got {code}")
                    self.layout[key] = (tuple(sl.get_shape()), _DTYPES[code])
        except ConfigError:
            raise
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise ConfigError(f"{self.path}: not a readable safetensors file ({exc})") from None

    def get(self, key: str) -> Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) along the first axis; the whole entry for 0-d entries."""
        with safe_open(str(self.path), framework="pt") as f:
            if not self.layout[key][0]:
                return f.get_tensor(key)
            return f.get_slice(key)[start:stop]


class SafetensorsWriter:
    """Writes a safetensors file entry by entry, in a fixed order declared up front (header first)."""

    def __init__(self, fh, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None):
        if sys.byteorder != "little":
            raise ConfigError("safetensors is little-endian; expected a little-endian machine")
        header: dict[str, Any] = {}
        offset = 0
        self.sizes = []
        for key, shape, dtype in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.sizes.append((key, nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)  # keep the data 8-byte aligned
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        self.fh, self.index, self.written, self.total = fh, 0, 0, offset

    def write(self, tensor: Tensor) -> None:
        """Append bytes of the current entry (a whole entry or its next rows)."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.fh.write(memoryview(data))
        self.written += data.nbytes

    def close(self) -> None:
        if self.written != self.total:
            raise RuntimeError(f"safetensors writer: expected {self.total} data bytes; wrote {self.written}")


@contextmanager
def _atomic_path(out_path: Path):
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def _ties_global_stats_streaming(ties: GeneralizedTaskArithmetic, sources, base: SafetensorsSource, keys: list[str], weights) -> TiesGlobalStats:
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


def merge_files(
    method: str, paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
    base_path: str | os.PathLike | None = None, weights: Sequence[float] | None = None, *,
    metadata: dict[str, str] | None = None, chunk_bytes: int = CHUNK_BYTES, **params: Any,
) -> dict[str, Any]:
    """Merge safetensors checkpoints entry by entry into `out_path`; equals `merge` on the loaded state dicts bit for bit.

    paths: K member files with identical entries, shapes and dtypes; base_path: the base for
    task-vector methods; weights, params: as for `merge`. Methods: those whose entries merge
    independently (linear, uniform_soup, task_arithmetic, ties, dare_linear, dare_ties, slerp,
    breadcrumbs, model_stock); greedy_soup, fisher and regmean need whole models and are refused.
    Elementwise methods (linear, uniform_soup, task_arithmetic) read `chunk_bytes` of rows at a time,
    so even a single huge entry streams. The file is written atomically (temporary file + rename).
    Returns a JSON-serialisable summary (method, entries, bytes read and written, passes).
    """
    cfg = make_method(method, **params)
    if cfg.streaming == "none":
        raise ConfigError(f"merge method '{method}' needs whole models in memory; expected one of {streamable_methods()} for streaming")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ConfigError(f"expected chunk_bytes >= 1; got {chunk_bytes!r}")
    paths = [Path(p) for p in paths]
    check_counts(cfg, len(paths), base_path is not None)
    ws = check_weights(weights, len(paths), cfg)
    sources = [SafetensorsSource(p) for p in paths]
    base = SafetensorsSource(base_path) if base_path is not None else None
    everything = sources + ([base] if base is not None else [])
    check_layouts([s.layout for s in everything], [str(s.path) for s in everything])
    out_path = Path(out_path)
    layout = sources[0].layout
    keys = list(layout)
    float_keys = [k for k in keys if layout[k][1].is_floating_point]

    passes = 1
    if cfg.streaming == "global":
        stats = _ties_global_stats_streaming(cfg, sources, base, float_keys, ws)
        passes += 1 + (0 if stats.thresholds[0] is None else (32 if stats.select_dtype == torch.float32 else 64) // 16)

        def merge_entry(key, xs, b):
            return cfg.merge_tensor_global(key, xs, b, ws, stats)
    else:

        def merge_entry(key, xs, b):
            return cfg.merge_tensor(key, xs, b, ws)

    with _atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
        writer = SafetensorsWriter(fh, [(k, *layout[k]) for k in keys], metadata)
        for key in keys:
            shape, dtype = layout[key]
            if not dtype.is_floating_point:  # integer buffers are copied from the first model
                writer.write(sources[0].get(key))
            elif cfg.streaming == "elementwise" and shape:
                row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
                step = max(1, chunk_bytes // row_bytes)
                for r in range(0, shape[0], step):
                    xs = [s.rows(key, r, r + step) for s in sources]
                    writer.write(merge_entry(key, xs, None if base is None else base.rows(key, r, r + step)))
                    del xs
            else:
                xs = [s.get(key) for s in sources]
                writer.write(merge_entry(key, xs, None if base is None else base.get(key)))
                del xs
        writer.close()
    entry_bytes = sum(math.prod(s) * d.itemsize for s, d in layout.values())
    return {
        "method": method,
        "params": {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))},
        "n_models": len(paths),
        "entries": len(keys),
        "bytes_read": entry_bytes * len(everything) * passes,
        "bytes_written": entry_bytes,
        "passes": passes,
        "out_path": str(out_path),
    }
