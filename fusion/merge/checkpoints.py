"""Checkpoints on disk for the streaming merge: one safetensors file or a Hugging Face model directory.

    ckpt = open_checkpoint("path/to/model")         # model.safetensors, or shards + model.safetensors.index.json
    ckpt.keys(), ckpt.layout["bert.pooler.dense.weight"]  # ((768, 768), torch.float32)
    ckpt.get(key), ckpt.rows(key, 0, 128)            # one entry, or rows [0, 128) of it

Headers are parsed here (8-byte length + JSON) rather than through `safe_open`, and entries are read
with plain `readinto` into fresh tensors (or a caller's reused buffer: `rows(..., out=buf)`): a read
goes through the page cache into one buffer and nothing stays mapped, so the process holds only the
entries it is merging (a memory map of a whole file would keep every page it touched resident until the
handle closes, and count it in the RSS). `mapped_rows` maps just one slice of rows, populated up front
and unmapped when its tensor is dropped: the streaming merge reads its row slices so, without a copy.

`CheckpointWriter` writes a single file or a directory of shards of bounded size with the index
`save_pretrained` writes (same split rule as huggingface_hub's `split_torch_state_dict_into_shards`,
same file names, `metadata.total_size`), entry by entry: each shard's header is known up front
(a merge keeps every shape), so each entry's bytes go straight to their offset in their shard and a
shard is closed as soon as it is full; nothing is held in memory.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from fusion.errors import ConfigError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers / huggingface_hub's "5GB"
MAX_HEADER_BYTES = 100 << 20
# copied next to a merged directory's shards when present in the source directory
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
)

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PICKLE_HINT = " (pickled weights are not read: convert them to safetensors first, e.g. save_pretrained(..., safe_serialization=True))"
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def parse_size(value: Any) -> int:
    """Bytes from an int or a string: "500MB" (10^6, as transformers), "5GB", "1GiB" (2^30), "123"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"expected a shard size >= 1 byte; got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"expected a size such as 500MB, 5GB or 1GiB; got {value!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
    if n < 1:
        raise ConfigError(f"expected a shard size >= 1 byte; got {value!r}")
    return n


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """None, a torch dtype, or one of float32 / bfloat16 / float16 (also fp32, bf16, fp16)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    alias = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    name = alias.get(str(value).lower(), str(value).lower())
    if name not in OUT_DTYPES:
        raise ConfigError(f"expected an output dtype in {sorted(OUT_DTYPES)}; got {value!r}")
    return OUT_DTYPES[name]


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: its file, absolute byte offset, size, shape and dtype."""

    file: Path
    start: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Entries of one safetensors file in data order (the order it was written), and its metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConfigError(f"{path}: expected a safetensors file (8-byte header length); got {size} bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ConfigError(f"{path}: expected a safetensors header of at most {min(MAX_HEADER_BYTES, size - 8)} bytes; got a length of {n}")
            header = json.loads(f.read(n))
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # unreadable file, JSON or UTF-8 errors
        raise ConfigError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: expected a JSON object as safetensors header; got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ConfigError(f"{path}: expected '__metadata__' to be a JSON object; got {type(metadata).__name__}")
    entries = []
    for key, e in header.items():
        try:
            code, shape, (lo, hi) = e["dtype"], e["shape"], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}, entry '{key}': expected dtype, shape and data_offsets; got {e!r:.200}") from None
        # an untrusted header: offsets and dims must be plain non-negative JSON integers (not strings, floats, bools)
        if not all(type(o) is int for o in (lo, hi)):
            raise ConfigError(f"{path}, entry '{key}': expected integer data_offsets; got {[lo, hi]!r:.200}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise ConfigError(f"{path}, entry '{key}': expected a shape of non-negative integers; got {shape!r:.200}")
        shape = tuple(shape)
        if not isinstance(code, str) or code not in DTYPES:
            raise ConfigError(f"{path}, entry '{key}': expected a dtype in {sorted(DTYPES)}; got {code!r:.80}")
        dtype = DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if hi - lo != nbytes or lo < 0 or 8 + n + hi > size:
            raise ConfigError(f"{path}, entry '{key}': expected {nbytes} bytes inside the file for {shape} {code}; got offsets [{lo}, {hi}] in a {size}-byte file")
        entries.append((lo, key, Entry(path, 8 + n + lo, nbytes, shape, dtype)))
    entries.sort(key=lambda t: t[0])
    return {key: e for _, key, e in entries}, {str(k): str(v) for k, v in metadata.items()}


def _read_into(entry: Entry, offset: int, nbytes: int, out: Tensor | None = None) -> Tensor:
    if out is not None and (out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < nbytes):
        raise ValueError(f"expected a 1-d uint8 buffer of at least {nbytes} bytes; got {out.dtype} {tuple(out.shape)}")
    buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
    view = memoryview(buf.numpy())
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start + offset)
        got = 0
        while got < nbytes:  # one read() returns at most ~2 GiB on Linux
            n = f.readinto(view[got:])
            if not n:
                raise ConfigError(f"{entry.file}: expected {nbytes} bytes at offset {entry.start + offset}; got {got} (truncated file)")
            got += n
    return buf


_frombuffer_lock = threading.Lock()


def _map_range(entry: Entry, offset: int, nbytes: int) -> Tensor:
    """Bytes [offset, offset + nbytes) of an entry as a read-only view of a shared memory map of its file,
    populated up front (MAP_POPULATE: the page tables are filled here, in the caller's thread, and no byte
    is copied). The map is unmapped when the last tensor viewing it is freed; until then its pages count
    in the RSS, so callers map slices (rows), not whole models."""
    at = entry.start + offset
    lo = at - at % mmap.ALLOCATIONGRANULARITY
    with open(entry.file, "rb", buffering=0) as f:
        try:
            mm = mmap.mmap(f.fileno(), at + nbytes - lo, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ, offset=lo)
        except ValueError as exc:  # beyond the end of the file
            raise ConfigError(f"{entry.file}: expected {nbytes} bytes at offset {at}; got {exc}") from None
    with _frombuffer_lock, warnings.catch_warnings():  # the merge only reads its inputs: the tensor is never written
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=at - lo)


class Checkpoint:
    """A safetensors file or a Hugging Face model directory, read entry by entry (see `open_checkpoint`)."""

    def __init__(self, path: Path, entries: dict[str, Entry], *, is_dir: bool, metadata: dict[str, str], index_metadata: dict):
        self.path = path
        self.is_dir = is_dir
        self.entries = entries
        self.metadata = metadata  # the (first) file's __metadata__
        self.index_metadata = index_metadata  # the directory index's "metadata" (total_size, total_parameters, …)
        self.layout: Layout = {k: (e.shape, e.dtype) for k, e in entries.items()}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.entries)} entries, dir={self.is_dir})"

    def keys(self) -> list[str]:
        """Entry names in storage order (shard by shard, each in data order)."""
        return list(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _entry(self, key: str) -> Entry:
        try:
            return self.entries[key]
        except KeyError:
            raise ConfigError(f"{self.path}: expected an entry '{key}'; got none") from None

    def get(self, key: str) -> Tensor:
        """The whole entry as a new tensor (nothing stays mapped)."""
        e = self._entry(key)
        return _read_into(e, 0, e.nbytes).view(e.dtype).reshape(e.shape)

    def rows(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Rows [start, stop) along the first axis (clamped to the entry); the whole entry for 0-d entries.
        out: a 1-d uint8 buffer to read into (reused across reads, it saves fresh pages); the result views it."""
        e = self._entry(key)
        if not e.shape:
            return self.get(key)
        start, stop = max(0, start), min(stop, e.shape[0])
        row = math.prod(e.shape[1:]) * e.dtype.itemsize
        shape = (max(0, stop - start), *e.shape[1:])
        return _read_into(e, start * row, max(0, stop - start) * row, out).view(e.dtype).reshape(shape)


    def mapped_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) like `rows`, but a read-only view of the file's pages in the page cache (a shared
        memory map, no copy; see `_map_range`): never write into it. Empty and 0-d entries are read instead."""
        e = self._entry(key)
        if not e.shape or e.nbytes == 0:
            return self.rows(key, start, stop)
        start, stop = max(0, start), min(stop, e.shape[0])
        row = math.prod(e.shape[1:]) * e.dtype.itemsize
        shape = (max(0, stop - start), *e.shape[1:])
        if stop <= start or row == 0:
            return torch.empty(shape, dtype=e.dtype)
        return _map_range(e, start * row, (stop - start) * row).view(e.dtype).reshape(shape)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A `.safetensors` file, or a directory with `model.safetensors` or `model.safetensors.index.json` + shards."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:  # never opened: unpickling runs arbitrary code
            raise ConfigError(f"{path}: expected a .safetensors file; got a {path.suffix} file{PICKLE_HINT}")
        entries, metadata = read_header(path)
        return Checkpoint(path, entries, is_dir=False, metadata=metadata, index_metadata={})
    if not path.is_dir():
        raise ConfigError(f"{path}: expected a safetensors file or a Hugging Face model directory; got no such file or directory")
    index_path = path / SAFE_INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise ConfigError(f"{index_path}: expected JSON with a 'weight_map' of entry -> shard file name") from None
        entries: dict[str, Entry] = {}
        metadata: dict[str, str] = {}
        for name in sorted(set(weight_map.values())):
            shard = path / name
            if Path(name).name != name or not shard.is_file():
                raise ConfigError(f"{index_path}: expected shard '{name}' in {path}; got no such file")
            found, meta = read_header(shard)
            metadata = metadata or meta
            listed = {k for k, v in weight_map.items() if v == name}
            missing = sorted(listed - set(found))
            if missing:
                raise ConfigError(f"{shard}: expected the entries the index assigns to it; got {len(missing)} missing {missing[:5]}")
            for k, e in found.items():
                if k in listed:
                    entries[k] = e
        return Checkpoint(path, entries, is_dir=True, metadata=metadata, index_metadata=dict(index.get("metadata") or {}))
    single = path / SAFE_WEIGHTS
    if single.is_file():
        entries, metadata = read_header(single)
        return Checkpoint(path, entries, is_dir=True, metadata=metadata, index_metadata={})
    present = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    hint = PICKLE_HINT if any(not n.endswith(".safetensors") for n in present) else ""
    raise ConfigError(f"{path}: expected {SAFE_WEIGHTS} or {SAFE_INDEX}; got {present or 'no weight files'}{hint}")


def layout_differences(ref: Layout, other: Layout, limit: int = 5) -> list[str]:
    """The first `limit` differences of `other` from `ref`: missing and extra entries, shape or dtype changes."""
    diffs = [f"entry '{k}': expected shape {ref[k][0]} {ref[k][1]}; got missing" for k in ref if k not in other][:limit]
    diffs += [f"entry '{k}': expected no such entry; got shape {other[k][0]} {other[k][1]}" for k in other if k not in ref][: limit - len(diffs)]
    for k, (shape, dtype) in ref.items():
        if len(diffs) >= limit:
            break
        if k in other and other[k] != (shape, dtype):
            diffs.append(f"entry '{k}': expected shape {shape} {dtype}; got {other[k][0]} {other[k][1]}")
    return diffs


def check_same_layout(checkpoints: Sequence[Checkpoint]) -> None:
    """Every checkpoint has the entries, shapes and dtypes of the first (storage order and shards may differ)."""
    ref = checkpoints[0]
    for c in checkpoints[1:]:
        diffs = layout_differences(ref.layout, c.layout)
        if diffs:
            n_missing = sum(k not in c.layout for k in ref.layout)
            n_extra = sum(k not in ref.layout for k in c.layout)
            n_changed = sum(k in c.layout and c.layout[k] != v for k, v in ref.layout.items())
            raise ConfigError(
                f"{c.path}: expected the entries, shapes and dtypes of {ref.path}; got {n_missing} missing, {n_extra} extra and "
                f"{n_changed} changed; first differences: " + "; ".join(diffs)
            )


# ---------------------------------------------------------------------------------------------
# writing


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split entries (in order) into shards as huggingface_hub's `split_torch_state_dict_into_shards`:
    an entry larger than the limit gets a shard of its own; otherwise a shard is closed when the next
    entry would tip it over the limit."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key, nbytes in sizes:
        if nbytes > max_shard_bytes:
            shards.append([key])
            continue
        if size + nbytes > max_shard_bytes and current:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        shards.append(current)
    return shards or [[]]


def shard_names(n: int) -> list[str]:
    """save_pretrained's names: model.safetensors, or model-0000i-of-0000n.safetensors."""
    return [SAFE_WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


_fallocate = None  # libc's fallocate(2), looked up once


def reserve(fd: int, size: int) -> bool:
    """Reserve the file's blocks up front with fallocate(2) (Linux; mode 0: the file gets `size` bytes, unwritten
    extents read as zeros): writes then fill reserved blocks instead of the filesystem reserving them page by
    page (on ext4, 1.5x faster page-cache writes here). False where the filesystem or platform has no
    fallocate: the writes then allocate as they go. Unlike os.posix_fallocate, never falls back to writing
    zeros."""
    global _fallocate
    if not sys.platform.startswith("linux") or size <= 0:
        return False
    try:
        if _fallocate is None:
            libc = ctypes.CDLL(None, use_errno=True)
            fallocate = getattr(libc, "fallocate64", None) or libc.fallocate  # 64-bit offsets on 32-bit glibc too
            fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fallocate.restype = ctypes.c_int
            _fallocate = fallocate
        return _fallocate(fd, 0, 0, size) == 0
    except (OSError, AttributeError):
        return False


class _FileWriter:
    """One safetensors file: header first (8-byte aligned data), then each entry's bytes at its offset, in any
    entry order (rows of one entry in order)."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str] | None):
        header: dict[str, Any] = {}
        offset = 0
        for key, shape, dtype in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        self.path, self.total, self.written = path, offset, 0
        self.spans = {k: tuple(h["data_offsets"]) for k, h in header.items() if k != "__metadata__"}
        self.done = dict.fromkeys(self.spans, 0)  # bytes of each entry written so far
        self.data_start = 8 + len(raw)
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)
        self.fh.flush()  # the header is on the file before any `write_at` (os.pwrite bypasses the buffer)
        reserve(self.fh.fileno(), self.data_start + offset)
        self.pos = self.data_start
        self.placed: set[str] = set()  # entries written by `write_at` (at offsets), never by `write` (appends)

    def write(self, key: str, tensor: Tensor) -> None:
        if key in self.placed:
            raise RuntimeError(f"safetensors writer {self.path}, entry '{key}': written at offsets before; got an append")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        lo, hi = self.spans[key]
        at = lo + self.done[key]
        if at + data.nbytes > hi:
            raise RuntimeError(f"safetensors writer {self.path}, entry '{key}': expected {hi - lo} bytes; got {at + data.nbytes - lo}")
        if self.pos != self.data_start + at:
            self.fh.seek(self.data_start + at)
        self.fh.write(memoryview(data))
        self.pos = self.data_start + at + data.nbytes
        self.done[key] += data.nbytes
        self.written += data.nbytes

    def span_check(self, key: str, offset: int, nbytes: int) -> int:
        """The file position of bytes [offset, offset + nbytes) of entry `key`, checked against its span."""
        lo, hi = self.spans[key]
        if offset < 0 or lo + offset + nbytes > hi:
            raise RuntimeError(f"safetensors writer {self.path}, entry '{key}': expected bytes within [0, {hi - lo}); "
                               f"got [{offset}, {offset + nbytes})")
        return self.data_start + lo + offset

    def pwrite(self, at: int, data) -> None:
        """os.pwrite all of `data` at file position `at` (no shared file position: threads may call it at once)."""
        view = memoryview(data).cast("B")
        fd = self.fh.fileno()
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n

    @property
    def complete(self) -> bool:
        return self.written == self.total

    def close(self) -> None:
        self.fh.close()
        if self.written != self.total:
            raise RuntimeError(f"safetensors writer {self.path}: expected {self.total} data bytes; wrote {self.written}")


class CheckpointWriter:
    """Writes merged entries, in a declared order, to a `.safetensors` file or a Hugging Face directory.

    entries: (key, shape, dtype) in output order; write(key, tensor) appends a whole entry or its next
    rows, entries taken in `order` (shard by shard). A directory gets shards of at most `max_shard_bytes` (one larger entry gets its own), the
    index when there are several, and `companions` (config, tokenizer files) copied from
    `companions_from`. Everything goes to a temporary sibling first and is renamed into place on
    success, so a failed merge leaves no partial output. Use as a context manager.
    """

    def __init__(
        self, out: str | os.PathLike, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], *, as_dir: bool,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: Mapping[str, str] | None = None,
        companions_from: Path | None = None, index_metadata: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, Path | str] | None = None,
    ):
        if sys.byteorder != "little":
            raise ConfigError("safetensors is little-endian; expected a little-endian machine")
        self.out = Path(out)
        self.as_dir = as_dir
        self.layout = {k: (tuple(s), d) for k, s, d in entries}
        sizes = [(k, math.prod(s) * d.itemsize) for k, s, d in entries]
        self.total_size = sum(n for _, n in sizes)
        self.metadata = dict(metadata) if metadata is not None else {"format": "pt"}
        self.companions_from = companions_from
        # name -> a file to copy (Path) or text to write (str), after the companions (so they win): part of
        # the output, written before the rename like everything else
        self.extra_files = dict(extra_files or {})
        if self.extra_files and not as_dir:
            raise ConfigError(f"--out {self.out}: expected a directory output for extra files {sorted(self.extra_files)}; got a single file")
        for name in self.extra_files:
            if Path(name).name != name or name in ("", ".", ".."):
                raise ConfigError(f"checkpoint writer: expected a plain file name for an extra file; got '{name}'")
        self.index_metadata = dict(index_metadata or {})
        if as_dir:
            if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
                raise ConfigError(f"--out {self.out}: expected a new or empty directory; got an existing {'directory with files' if self.out.is_dir() else 'file'}")
            self.shards = plan_shards(sizes, parse_size(max_shard_bytes))
        else:
            self.shards = [[k for k, _ in sizes]]
        self.names = shard_names(len(self.shards)) if as_dir else [self.out.name]
        self.shard_of = {k: i for i, keys in enumerate(self.shards) for k in keys}
        # the order write() takes entries in: shard by shard (an entry larger than a shard gets its own shard
        # where it comes, ahead of the shard still filling, as huggingface_hub does)
        self.order = [k for keys in self.shards for k in keys]
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.open_files: dict[int, _FileWriter] = {}
        self.closed: set[int] = set()
        self.largest_shard_bytes = 0
        self._lock = threading.Lock()  # `write_at` from several threads: shard opening and byte counts

    def __enter__(self) -> "CheckpointWriter":
        if self.tmp.exists():
            self._cleanup()
        if self.as_dir:
            self.tmp.mkdir(parents=True)
        else:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return self

    def _shard_path(self, i: int) -> Path:
        return self.tmp / self.names[i] if self.as_dir else self.tmp

    def _open(self, i: int) -> _FileWriter:
        if i in self.closed:
            raise RuntimeError(f"checkpoint writer: shard {self.names[i]} is complete; got more bytes for it")
        if i not in self.open_files:
            f = _FileWriter(self._shard_path(i), [(k, *self.layout[k]) for k in self.shards[i]], self.metadata)
            self.open_files[i] = f
            self.largest_shard_bytes = max(self.largest_shard_bytes, f.total)
        return self.open_files[i]

    def write(self, key: str, tensor: Tensor) -> None:
        """Append bytes of entry `key` (whole, or its next rows in order). Entries may come in any order; in
        `order` (shard by shard) each shard is finished, closed and never reopened before the next starts."""
        if key not in self.shard_of:
            raise RuntimeError(f"checkpoint writer: expected one of the declared entries; got '{key}'")
        if tensor.dtype != self.layout[key][1]:
            raise RuntimeError(f"checkpoint writer, entry '{key}': expected {self.layout[key][1]}; got {tensor.dtype}")
        i = self.shard_of[key]
        with self._lock:
            f = self._open(i)
            f.write(key, tensor)
            if f.complete:
                f.close()
                del self.open_files[i]
                self.closed.add(i)

    def write_at(self, key: str, offset: int, tensor: Tensor) -> None:
        """Write `tensor`'s bytes at byte `offset` of entry `key`: pieces of one entry in any order, from several
        threads at once (each piece once; the bytes go out with os.pwrite, outside the lock). The entry's
        shard is closed when its last byte is in, as with `write`; an entry written here takes no `write`."""
        if key not in self.shard_of:
            raise RuntimeError(f"checkpoint writer: expected one of the declared entries; got '{key}'")
        if tensor.dtype != self.layout[key][1]:
            raise RuntimeError(f"checkpoint writer, entry '{key}': expected {self.layout[key][1]}; got {tensor.dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        i = self.shard_of[key]
        with self._lock:
            f = self._open(i)
            at = f.span_check(key, offset, data.nbytes)
            lo, hi = f.spans[key]
            if f.done[key] + data.nbytes > hi - lo:  # a piece written twice: the entry could look complete with a gap
                raise RuntimeError(f"safetensors writer {f.path}, entry '{key}': expected {hi - lo} bytes in all; "
                                   f"got {f.done[key] + data.nbytes} (a piece written twice)")
            f.placed.add(key)
        f.pwrite(at, data)
        with self._lock:
            f.done[key] += data.nbytes
            f.written += data.nbytes
            if f.complete:
                f.close()
                del self.open_files[i]
                self.closed.add(i)

    def _finish(self) -> None:
        for i in range(len(self.shards)):
            if i not in self.closed:  # a shard with no entries (an empty checkpoint) or one left incomplete
                self._open(i).close()
                self.closed.add(i)
                del self.open_files[i]
        if self.as_dir:
            if len(self.shards) > 1:
                index = {"metadata": {**self.index_metadata, "total_size": self.total_size},
                         "weight_map": {k: self.names[self.shard_of[k]] for k in self.layout}}
                (self.tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            if self.companions_from is not None:
                copy_companions(self.companions_from, self.tmp, self._out_dtype())
            for name, what in self.extra_files.items():
                if isinstance(what, Path):
                    shutil.copyfile(what, self.tmp / name)
                else:
                    (self.tmp / name).write_text(what, encoding="utf-8")
            if self.out.is_dir():
                self.out.rmdir()  # checked empty at construction
        os.replace(self.tmp, self.out)

    def _out_dtype(self) -> torch.dtype | None:
        floats = {d for _, d in self.layout.values() if d.is_floating_point}
        return floats.pop() if len(floats) == 1 else None

    def _cleanup(self) -> None:
        with self._lock:  # no `write_at` opens, closes or counts a shard meanwhile
            for f in list(self.open_files.values()):
                if not f.fh.closed:
                    f.fh.close()
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp.exists():
            self.tmp.unlink()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._cleanup()

    @property
    def files(self) -> list[Path]:
        return [self.out / n for n in self.names] if self.as_dir else [self.out]


def copy_companions(src: Path, dst: Path, dtype: torch.dtype | None) -> list[str]:
    """Copy config.json, generation_config.json and tokenizer files from `src` to `dst`; when the weights
    are all of one float dtype, config.json's `torch_dtype` / `dtype` says so."""
    copied = []
    names = list(CONFIG_FILES) + list(TOKENIZER_FILES) + sorted(p.name for p in src.glob("tokenizer*") if p.name not in TOKENIZER_FILES)
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    cfg_path = dst / "config.json"
    if dtype is not None and cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError:
            raise ConfigError(f"{src / 'config.json'}: expected JSON; got unreadable text") from None
        name = str(dtype).removeprefix("torch.")
        changed = False
        for field in ("torch_dtype", "dtype"):
            if field in cfg and cfg[field] != name:
                cfg[field] = name
                changed = True
        if changed:
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return copied
