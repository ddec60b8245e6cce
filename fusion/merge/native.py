"""A fused C loop for the streaming merge's elementwise slices (linear, uniform soup, task arithmetic).

torch runs `merge_blocked`'s steps as separate passes (widen each bf16 input to float32, add, scale,
divide, round back), ~0.3–0.5 ns per element each even in cache, so a bf16 linear merge computes at
~1 GB/s of input on one core while `copy_` moves ~6 GB/s. This module compiles (once per machine,
with the system C compiler, cached under ~/.cache/fusion/native or $FUSION_NATIVE_CACHE) a loop that
does the same operations per element in one pass over small tiles that stay in L1.

Exactness: the loop performs the same IEEE float32 operations in the same order as
`kernels.linear_kernel` / `kernels.task_arithmetic_kernel` on widened inputs (built with
-ffp-contract=off: no fused multiply-add; scalars rounded to float32 as torch rounds a Python scalar
for a float32 tensor), and rounds to bfloat16 to nearest even as torch does, so the bits equal the
torch path. A tile whose result holds a NaN reports it and the caller recomputes that slice with
torch (NaN payloads depend on operand order, and torch's own vector and scalar bf16 casts differ on
them). Anything else (fp16, float64, other methods) stays on the torch path.

FUSION_MERGE_NATIVE=0 turns the loop off; without a C compiler it is off (`available()` says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define TILE 2048

static inline void load(int kind, const void *p, int64_t off, int m, float *dst) {
    if (kind == 1) {
        const uint16_t *s = (const uint16_t *)p + off;
        uint32_t *d = (uint32_t *)dst;
        for (int i = 0; i < m; i++) d[i] = (uint32_t)s[i] << 16;
    } else {
        memcpy(dst, (const float *)p + off, (size_t)m * 4);
    }
}

static inline __attribute__((always_inline)) float ld(int kind, const void *p, int64_t i) {
    if (kind == 1) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void st(int kind, void *p, int64_t i, float f) {
    if (kind == 1) {
        uint32_t u;
        memcpy(&u, &f, 4);
        ((uint16_t *)p)[i] = (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
    } else {
        ((float *)p)[i] = f;
    }
}

/* Two inputs in one pass per element (the usual pair merge). A weight of 1 or a scaling of 1 is applied
   anyway: x * 1 == x exactly for every non-NaN x (and a NaN result sends the slice back to torch). */
static inline __attribute__((always_inline)) int pair(int kind, int ik, int ok, int do_div, int64_t n, const void *x0,
                                                    const void *x1, const void *b, float w0, float w1, float total,
                                                    float scaling, void *out) {
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        float a = ld(ik, x0, i), c = ld(ik, x1, i), acc, bb = 0.0f;
        if (kind == 0) {
            acc = a + c;
        } else if (kind == 1) {
            float p = a * w0, q = c * w1;
            acc = p + q;
        } else {
            bb = ld(ik, b, i);
            float d0 = (a - bb) * w0, d1 = (c - bb) * w1;
            acc = d0 + d1;
        }
        if (do_div) acc = acc / total;
        if (kind == 2) acc = acc * scaling + bb; /* -ffp-contract=off: two roundings, as torch's mul_ then add_ */
        nan |= acc != acc;
        st(ok, out, i, acc);
    }
    return nan;
}

#define PAIR(K, I, O, D) pair(K, I, O, D, n, xs[0], xs[1], base, w0, w1, total, sc, out)
#define PAIR_D(K, I, O) (do_div ? PAIR(K, I, O, 1) : PAIR(K, I, O, 0))
#define PAIR_O(K, I) (out_kind ? PAIR_D(K, I, 1) : PAIR_D(K, I, 0))
#define PAIR_I(K) (in_kind ? PAIR_O(K, 1) : PAIR_O(K, 0))

static int fused_pair(int kind, int in_kind, int out_kind, int64_t n, const void *const *xs, const void *base,
                      const float *w, const int *mul, float total, int do_div, float scaling, int do_scale, void *out) {
    float w0 = (kind == 1 || mul[0]) ? w[0] : 1.0f, w1 = (kind == 1 || mul[1]) ? w[1] : 1.0f;
    float sc = do_scale ? scaling : 1.0f;
    return kind == 0 ? PAIR_I(0) : kind == 1 ? PAIR_I(1) : PAIR_I(2);
}

/* kind 0: linear, equal weights: x0 + x1 + ... (then / total)
   kind 1: linear, weights: x0*w0 + x1*w1 + ... (then / total)
   kind 2: task arithmetic: ((x0-b)[*w0] + (x1-b)[*w1] + ...)[*scaling] + b
   in_kind/out_kind: 0 float32, 1 bfloat16. Returns 1 when a result is NaN (the caller recomputes). */
int fused_merge(int kind, int in_kind, int out_kind, int64_t n, int k, const void *const *xs, const void *base,
                const float *w, const int *mul, float total, int do_div, float scaling, int do_scale, void *out) {
    if (k == 2) return fused_pair(kind, in_kind, out_kind, n, xs, base, w, mul, total, do_div, scaling, do_scale, out);
    float acc[TILE], tmp[TILE], bt[TILE];
    int nan = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        int m = (int)((n - s) < TILE ? (n - s) : TILE);
        load(in_kind, xs[0], s, m, acc);
        if (kind == 2) {
            load(in_kind, base, s, m, bt);
            for (int i = 0; i < m; i++) acc[i] = acc[i] - bt[i];
        }
        if ((kind == 1) || (kind == 2 && mul[0])) {
            float w0 = w[0];
            for (int i = 0; i < m; i++) acc[i] = acc[i] * w0;
        }
        for (int j = 1; j < k; j++) {
            load(in_kind, xs[j], s, m, tmp);
            if (kind == 2)
                for (int i = 0; i < m; i++) tmp[i] = tmp[i] - bt[i];
            if ((kind == 1) || (kind == 2 && mul[j])) {
                float wj = w[j];
                for (int i = 0; i < m; i++) tmp[i] = tmp[i] * wj;
            }
            for (int i = 0; i < m; i++) acc[i] = acc[i] + tmp[i];
        }
        if (do_div)
            for (int i = 0; i < m; i++) acc[i] = acc[i] / total;
        if (kind == 2) {
            if (do_scale)
                for (int i = 0; i < m; i++) acc[i] = acc[i] * scaling;
            for (int i = 0; i < m; i++) acc[i] = acc[i] + bt[i];
        }
        int bad = 0;
        for (int i = 0; i < m; i++) bad |= acc[i] != acc[i];
        nan |= bad;
        if (out_kind == 1) {
            const uint32_t *u = (const uint32_t *)acc;
            uint16_t *o = (uint16_t *)out + s;
            for (int i = 0; i < m; i++) o[i] = (uint16_t)((u[i] + (((u[i] >> 16) & 1u) + 0x7FFFu)) >> 16);
        } else {
            memcpy((float *)out + s, acc, (size_t)m * 4);
        }
    }
    return nan;
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
KINDS = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why: str | None = None


def _cache_dir() -> Path:
    return Path(os.environ.get("FUSION_NATIVE_CACHE") or Path.home() / ".cache" / "fusion" / "native")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _private(path: Path) -> bool:
    """Whether `path` belongs to this user and no one else may write it (as ssh checks its keys): the cached
    library is code this process loads, so a directory or file others can write could hand it theirs."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not (st.st_mode & 0o022)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    # -march=native: the library is keyed by the CPU's flags too, so a shared home never hands it to another CPU
    key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), version, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    cache = _cache_dir()
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass
    if not _private(cache):  # a library others could have written is never loaded: build it here, for this process
        cache = Path(tempfile.mkdtemp(prefix="fusion-native-"))
    lib_path = cache / f"fused_merge-{key}.so"
    if lib_path.is_file() and not _private(lib_path):
        raise RuntimeError(f"{lib_path} is writable by others or not owned by this user: not loading it")
    if not lib_path.is_file():
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            src, so = Path(tmp) / "fused_merge.c", Path(tmp) / "fused_merge.so"
            src.write_text(SOURCE)
            done = subprocess.run([cc, *FLAGS, str(src), "-o", str(so)], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            os.replace(so, lib_path)  # atomic: concurrent builders each write their own temporary
    lib = ctypes.CDLL(str(lib_path))
    f = lib.fused_merge
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                  ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int), ctypes.c_float, ctypes.c_int,
                  ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
    return lib


def available() -> tuple[bool, str]:
    """(whether the fused loop is usable, why not). Builds it on first call."""
    global _lib, _why
    if os.environ.get("FUSION_MERGE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, "FUSION_MERGE_NATIVE=0"
    with _lock:
        if _lib is None and _why is None:
            try:
                _lib = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _why = f"fused merge loop unavailable: {exc}"
    return _lib is not None, _why or ""


def supports(in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    return in_dtype in KINDS and out_dtype in KINDS


def fused_merge(kind: int, xs: Sequence[Tensor], base: Tensor | None, weights: Sequence[float], mul: Sequence[bool],
                total: float, do_div: bool, scaling: float, do_scale: bool, out: Tensor) -> bool:
    """Run the loop over flat contiguous tensors (xs, base: one dtype among KINDS; out: one of KINDS).
    Returns False when some result is NaN (out is then incomplete: recompute it with torch)."""
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    n = out.numel()
    for x in [*xs, *([base] if base is not None else [])]:
        if x.numel() != n or not x.is_contiguous() or x.dtype != xs[0].dtype:
            raise ValueError(f"expected contiguous inputs of {n} elements and one dtype; got {tuple(x.shape)} {x.dtype}")
    if not out.is_contiguous() or not supports(xs[0].dtype, out.dtype):
        raise ValueError(f"expected a contiguous float32/bfloat16 out and inputs; got {out.dtype} out, {xs[0].dtype} inputs")
    k = len(xs)
    ptrs = (ctypes.c_void_p * k)(*[x.data_ptr() for x in xs])
    ws = (ctypes.c_float * k)(*[float(w) for w in weights])
    muls = (ctypes.c_int * k)(*[int(bool(m)) for m in mul])
    nan = _lib.fused_merge(kind, KINDS[xs[0].dtype], KINDS[out.dtype], n, k, ptrs, base.data_ptr() if base is not None else None,
                           ws, muls, float(total), int(do_div), float(scaling), int(do_scale), out.data_ptr())
    return nan == 0
