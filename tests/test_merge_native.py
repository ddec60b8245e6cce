"""The fused C loop of the streaming merge (fusion.merge.native) and the mapped row reads: same bits as the torch path."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from fusion.merge import native
from fusion.merge import streaming as S
from fusion.merge.checkpoints import open_checkpoint
from fusion.merge.registry import make_method
from fusion.merge.streaming import merge_blocked, merge_files, native_program, work_dtype

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"fused loop not built here: {native.available()[1]}")

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])  # compares -0.0 with 0.0 and NaN payloads too


def _spread(n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Values over many binades (rounding to bf16 differs between nearby paths there), some exact zeros and -0.0."""
    x = torch.randn(n, generator=g) * torch.pow(10.0, torch.randint(-4, 4, (n,), generator=g).float())
    if n > 4:
        x[:2] = torch.tensor([0.0, -0.0])
    return x.to(dtype)


def _both(monkeypatch, cfg, xs, base, weights, out_dtype):
    """merge_blocked through the torch path and through the fused loop -> (torch result, fused result, fused used?)."""
    work = work_dtype(xs[0].dtype, out_dtype)
    monkeypatch.setenv("FUSION_MERGE_NATIVE", "0")
    ref = merge_blocked(cfg, "k", xs, base, weights, work, torch.empty(xs[0].shape, dtype=out_dtype))
    monkeypatch.setenv("FUSION_MERGE_NATIVE", "1")
    calls = []
    real = native.fused_merge
    monkeypatch.setattr(native, "fused_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = merge_blocked(cfg, "k", xs, base, weights, work, torch.empty(xs[0].shape, dtype=out_dtype))
    monkeypatch.setattr(native, "fused_merge", real)
    return ref, got, bool(calls)


CASES = [("linear", {}, None), ("linear", {}, (0.3, 0.7, 0.11)), ("linear", {}, (0.25, 0.75, 0.5)), ("uniform_soup", {}, None),
         ("task_arithmetic", {}, None), ("task_arithmetic", {"scaling": 0.37}, (0.3, 1.0, 2.5)), ("task_arithmetic", {"scaling": 1.0}, (1.0, 1.0, 1.0))]


@pytest.mark.parametrize("name, params, weights", CASES)
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_fused_loop_equals_torch_path_bit_for_bit(monkeypatch, name, params, weights, in_dtype, out_dtype, k):
    cfg = make_method(name, **params)
    w = None if weights is None else weights[:k]
    g = torch.Generator().manual_seed(k)
    for shape in [(), (0,), (1,), (7,), (2047,), (2049,), (3, 1001), (100003,)]:  # odd sizes around the 2048-element tile
        n = math.prod(shape)
        xs = [_spread(n, in_dtype, g).reshape(shape) for _ in range(k)]
        base = _spread(n, in_dtype, g).reshape(shape) if cfg.needs_base else None
        ref, got, fused = _both(monkeypatch, cfg, xs, base, w, out_dtype)
        assert got.dtype == ref.dtype == out_dtype and got.shape == ref.shape == shape
        assert torch.equal(_bits(got), _bits(ref)), f"{name} {w} {in_dtype}->{out_dtype} k={k} shape={shape}: fused loop differs"
        assert fused == (n > 0), f"expected the fused loop on every non-empty slice; used: {fused} for shape {shape}"


@pytest.mark.parametrize("name, params, weights", [("linear", {}, None), ("linear", {}, (0.3, 0.7)), ("task_arithmetic", {"scaling": 0.5}, (2.0, 0.5))])
def test_nan_and_inf_slices_get_torchs_own_bits(monkeypatch, name, params, weights):
    """A NaN result sends the slice back to torch (NaN payloads depend on operand order); infinities stay exact."""
    cfg = make_method(name, **params)
    g = torch.Generator().manual_seed(1)
    for special in [float("nan"), float("inf"), -float("inf")]:
        xs = [_spread(5000, torch.bfloat16, g) for _ in range(2)]
        xs[0][::97] = special
        xs[1][::89] = -special if special == special else special
        base = _spread(5000, torch.bfloat16, g) if cfg.needs_base else None
        ref, got, fused = _both(monkeypatch, cfg, xs, base, weights, torch.bfloat16)
        assert fused and torch.equal(_bits(got), _bits(ref)), f"{name} with {special}: differs from torch"


def test_fused_loop_split_over_threads_equals_one_call(monkeypatch):
    cfg = make_method("task_arithmetic", scaling=0.7)
    g = torch.Generator().manual_seed(2)
    xs = [_spread(30011, torch.bfloat16, g) for _ in range(3)]
    base = _spread(30011, torch.bfloat16, g)
    one = merge_blocked(cfg, "k", xs, base, (0.5, 1.0, 1.5), torch.float32, torch.empty(30011, dtype=torch.bfloat16))
    threads = torch.get_num_threads()
    monkeypatch.setattr(S, "FUSED_MIN_SPLIT", 1)
    try:
        torch.set_num_threads(3)
        split = merge_blocked(cfg, "k", xs, base, (0.5, 1.0, 1.5), torch.float32, torch.empty(30011, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(split), _bits(one))


@pytest.mark.parametrize("name, params", [("ties", {}), ("dare_linear", {"density": 0.5}), ("breadcrumbs", {}),
                                          ("model_stock", {}), ("slerp", {}), ("dare_ties", {"density": 0.5})])
def test_methods_with_whole_tensor_statistics_keep_the_torch_path(name, params):
    assert native_program(make_method(name, **params), 2, None) is None, f"{name} needs whole-tensor statistics: expected no fused program"


def test_fp16_and_float64_stay_on_the_torch_path():
    assert not native.supports(torch.float16, torch.float16) and not native.supports(torch.float64, torch.float64)
    assert native.supports(torch.bfloat16, torch.bfloat16) and native.supports(torch.float32, torch.bfloat16)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("FUSION_MERGE_NATIVE", "0")
    ok, why = native.available()
    assert not ok and "FUSION_MERGE_NATIVE=0" in why
    with pytest.raises(RuntimeError, match="FUSION_MERGE_NATIVE=0"):
        native.fused_merge(0, [torch.zeros(3)], None, [1.0], [True], 1.0, False, 1.0, False, torch.empty(3))


def test_fused_loop_refuses_mismatched_tensors():
    with pytest.raises(ValueError, match="expected contiguous inputs of 4 elements"):
        native.fused_merge(0, [torch.zeros(4), torch.zeros(5)], None, [1.0, 1.0], [True, True], 2.0, True, 1.0, False, torch.empty(4))
    with pytest.raises(ValueError, match="float32/bfloat16 out"):
        native.fused_merge(0, [torch.zeros(4)], None, [1.0], [True], 1.0, False, 1.0, False, torch.empty(4, dtype=torch.float16))


def test_mapped_rows_equal_read_rows(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(37, 129, generator=g).to(torch.bfloat16), "s": torch.tensor(2.5), "e": torch.zeros(0, 4),
             "i": torch.arange(1000, dtype=torch.int64).reshape(100, 10)}
    save_file(state, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    for key, (lo, hi) in [("a", (0, 37)), ("a", (5, 6)), ("a", (30, 99)), ("a", (40, 50)), ("s", (0, 1)), ("e", (0, 1)), ("i", (3, 77))]:
        got, ref = ckpt.mapped_rows(key, lo, hi), ckpt.rows(key, lo, hi)
        assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref), (key, lo, hi)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_files_same_bytes_with_and_without_fused_loop_and_maps(tmp_path, monkeypatch, dtype):
    """Sharded in, sharded out, small chunks (rows split across steps): both code paths write identical files."""
    g = torch.Generator().manual_seed(4)
    models = [{"w": torch.randn(301, 67, generator=g).to(dtype), "b": torch.randn(67, generator=g).to(dtype), "s": torch.tensor(1.5, dtype=dtype),
               "n": torch.arange(6)} for _ in range(3)]
    for i, m in enumerate(models):
        save_file(m, str(tmp_path / f"m{i}.safetensors"))
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("FUSION_MERGE_NATIVE", flag)
        monkeypatch.setenv("FUSION_MERGE_MMAP", flag)
        for name, kw in [("linear", {"weights": [0.2, 0.3, 0.9]}), ("task_arithmetic", {"scaling": 0.4})]:
            out = tmp_path / f"{name}-{flag}"
            paths = [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"]
            base = tmp_path / "m2.safetensors" if name == "task_arithmetic" else None
            merge_files(name, paths, out, base_path=base, chunk_bytes=1000, max_shard_bytes=20_000,
                        **({"weights": kw["weights"][:2]} if "weights" in kw else {}), **{k: v for k, v in kw.items() if k != "weights"})
            outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert len(outs[0]) > 2  # several shards + index
    assert outs[0] == outs[2] and outs[1] == outs[3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slices_merged_and_written_block_by_block_equal_whole_slice_writes(tmp_path, monkeypatch, dtype):
    """merge_and_write: tiny blocks, two workers per slice, a NaN in one block (that block alone redone by torch):
    every file byte equals the whole-slice path, the torch path and the in-memory merge."""
    from safetensors.torch import load_file

    from fusion.merge import merge

    g = torch.Generator().manual_seed(5)
    models = [{"w": _spread(211 * 37, dtype, g).reshape(211, 37), "b": torch.randn(37, generator=g).to(dtype),
               "n": torch.arange(3)} for _ in range(3)]
    models[1]["w"][100, 5] = float("nan")
    for i, m in enumerate(models):
        save_file(m, str(tmp_path / f"m{i}.safetensors"))
    monkeypatch.setattr(S, "WRITE_BLOCK", 256)  # bytes: 64-128 elements a block, dozens of blocks a slice
    used = []
    real = S.merge_and_write
    monkeypatch.setattr(S, "merge_and_write", lambda *a, **k: used.append(a[1]) or real(*a, **k))
    redone = []  # blocks the torch path recomputed (fused=False): the NaN block alone
    real_blocked = S.merge_blocked
    monkeypatch.setattr(S, "merge_blocked", lambda *a, **k: (redone.append(a[1]) if k.get("fused") is False else None)
                        or real_blocked(*a, **k))
    cases = [("linear", {"weights": [0.2, 0.9]}, None), ("task_arithmetic", {"scaling": 0.4, "weights": [1.0, 0.3]}, 2)]
    for name, kw, base_i in cases:
        outs = {}
        for label, env in [("blocks", {}), ("whole", {"FUSION_MERGE_BLOCK_WRITES": "0"}), ("torch", {"FUSION_MERGE_NATIVE": "0"})]:
            for k, v in {"FUSION_MERGE_BLOCK_WRITES": "1", "FUSION_MERGE_NATIVE": "1", **env}.items():
                monkeypatch.setenv(k, v)
            out = tmp_path / f"{name}-{label}"
            merge_files(name, [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], out, chunk_bytes=3000,
                        max_shard_bytes=10_000, base_path=tmp_path / f"m{base_i}.safetensors" if base_i else None, **kw)
            if label == "blocks":
                assert redone == ["w"], redone  # one block of "w" holds the NaN; every other block ran the fused loop
            redone.clear()
            outs[label] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        assert len(outs["blocks"]) > 2 and outs["blocks"] == outs["whole"] == outs["torch"], name
        expected = merge(name, models[:2], base=models[base_i] if base_i else None, **kw)
        got = {}
        for f in sorted((tmp_path / f"{name}-blocks").glob("*.safetensors")):
            got.update(load_file(str(f)))
        assert all(_bits(got[k]).equal(_bits(expected[k])) for k in ("w", "b")) and got["n"].equal(expected["n"])
        assert torch.isnan(got["w"][100, 5])
    assert "w" in used and "b" in used  # the block path ran (not only the whole-slice one)


def test_a_failing_block_write_stops_the_workers_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """A write that fails mid-slice: the other workers stop at their next block and are waited for, the error
    reaches the caller, and neither the output nor its temporary sibling is left."""
    import threading

    from fusion.merge.checkpoints import CheckpointWriter

    g = torch.Generator().manual_seed(6)
    for i in range(2):
        save_file({"w": torch.randn(400, 50, generator=g).to(torch.bfloat16)}, str(tmp_path / f"m{i}.safetensors"))
    monkeypatch.setattr(S, "WRITE_BLOCK", 256)
    calls, lock = [], threading.Lock()
    real = CheckpointWriter.write_at

    def failing(self, key, offset, tensor):
        with lock:
            calls.append(offset)
            n = len(calls)
        if n == 5:
            raise OSError(28, "No space left on device")
        return real(self, key, offset, tensor)

    monkeypatch.setattr(CheckpointWriter, "write_at", failing)
    with pytest.raises(OSError, match="No space left on device"):
        merge_files("linear", [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], tmp_path / "out")
    assert len(calls) < 400 * 50 * 2 // 256  # stopped early, not every block written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors"]


def test_a_library_others_could_write_is_never_loaded(tmp_path, monkeypatch):
    """The cached library is code this process loads: a cache directory that group or others may write is not
    used (the loop is built in a private directory for this process instead), and a cached file that others may
    write is refused, as ssh refuses such keys."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("FUSION_NATIVE_CACHE", str(shared))
    lib = native._build()
    assert not str(lib._name).startswith(str(shared)) and list(shared.iterdir()) == []

    private = tmp_path / "private"
    monkeypatch.setenv("FUSION_NATIVE_CACHE", str(private))
    lib = native._build()
    (built,) = private.iterdir()
    assert str(lib._name) == str(built) and (private.stat().st_mode & 0o777) == 0o700
    built.chmod(0o666)
    with pytest.raises(RuntimeError, match="writable by others"):
        native._build()
