"""Check a bundle in a child process bounded in time and memory before the worker loads it.

Loading a bundle runs code its author chose: a few hundred bytes of ONNX `Loop` with 2^62 iterations
never return from warm-up, an `Expand` to tens of GB allocates them. Inside the worker either one
takes the serving version down with it (a swap that never ends, an OOM kill of the process). So
every new bundle, at start and on a hot swap, first goes through the whole load (manifest size cap,
digests, bundle version, ONNX check, sessions, warm-up, probe: `runtime.load` + `check_probe`) in
`python -m service.preflight BUNDLE`, a child process which

* is killed past a wall-clock limit (`FUSION_LOAD_TIMEOUT_S`), and kills itself a little later
  (`alarm`) should the worker die while it runs;
* runs under an address-space limit (`RLIMIT_AS`, `FUSION_LOAD_MAX_MEMORY_MB`): an allocation past
  it fails inside the child (onnxruntime or numpy raise), which reports it and exits;
* is the kernel OOM killer's first choice (`oom_score_adj` 1000) should the machine run short anyway;
* always runs on the CPU: CUDA reserves far more address space than it uses, which an address-space
  limit cannot tell apart from a bomb (a bundle that only misbehaves on a GPU is not covered).

Only after the child succeeds does the worker load the bundle itself, parsing exactly the bytes the
child checked (`runtime.load(..., manifest_sha256=...)`).

A subprocess rather than `multiprocessing`: forking a threaded server is unsafe, and `spawn` would
re-import the BentoML worker's main module. The child imports numpy, onnxruntime and the few
torch-free modules the load needs (~0.3 s), never torch or BentoML; it reports one JSON line on
stdout and exits 0 (loaded) or 1 (refused).
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fusion import errors
from fusion.errors import BundleError, UnavailableError

RESULT = "fusion-preflight-result "  # prefix of the child's one result line on stdout
# what an allocation failure looks like from onnxruntime (BFC arena, std::bad_alloc) and numpy
ALLOCATION_FAILURES = ("Failed to allocate memory", "bad_alloc", "bad allocation", "Unable to allocate")
ALARM_GRACE_S = 5  # the child's own deadline: the parent's limit plus this


def machine_memory_mb() -> int:
    """Memory this process may use: physical memory, or the cgroup's limit when lower (containers)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 0
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (total == 0 or int(text) < total):
            total = int(text)
    return total >> 20


def default_memory_mb() -> int:
    """Half the memory this process may use, at least 1 GiB. The worker keeps the serving version
    and loads the new one after the check; the check of a real bundle peaks at a few hundred MB of
    address space (python + numpy + onnxruntime: ~220 MB, plus ~2-3x the models' size)."""
    return max(1024, machine_memory_mb() // 2)


MAX_AUTO_BUDGET_S = 240.0  # the size-scaled budget's ceiling: below the deployment's startup probe (5 s x 60)


@dataclass(frozen=True)
class LoadLimits:
    """Bounds on checking one bundle: wall-clock seconds and address space (MB; 0 = none).

    The time budget is `timeout_s` + `s_per_gb` × the size of the ONNX files the bundle's manifest lists, at
    most MAX_AUTO_BUDGET_S: checking costs the ONNX check, session creation and a batch-8 warm-up of every
    model, which grow with the models, while a few hundred bytes of ONNX that never finish get `timeout_s`.
    FUSION_LOAD_TIMEOUT_S, when set, is the whole budget (s_per_gb 0)."""

    # 20 s: the synthetic and digits bundles check in ~0.5 s, so a small bundle has ~40x headroom on a busy
    # machine, and stays below FUSION_TIMEOUT_S (30 s), so that a hot-swap call gets the refusal rather
    # than a 504. 60 s per GB: the peers benchmark's image bundle (timm resnet18 + resnet50 + vit_small at
    # 224x224, 0.45 GB) checked in 10.7 s on 2 shared cores (budget 47 s), its text bundle (three BERT-mini,
    # 0.10 GB) in 1.8 s (budget 26 s); the flat 20 s had refused the image one on cores loaded by other
    # servers. A hot-swap call whose check outlasts FUSION_TIMEOUT_S answers 504; the swap still completes.
    timeout_s: float = 20.0
    max_memory_mb: int = 0
    s_per_gb: float = 60.0
    # the environment the child process starts with (service/config.py: the service's, less
    # PROMETHEUS_MULTIPROC_DIR, so that the child writes no metrics files); PYTHONPATH gains the repo root
    child_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def budget(self, path: str | Path) -> tuple[float, str]:
        """(seconds the check of the bundle at `path` may take, how that was reached, for the refusal)."""
        if not self.s_per_gb:
            return self.timeout_s, "FUSION_LOAD_TIMEOUT_S"
        gb = model_bytes(path) / 1e9
        seconds = self.timeout_s + self.s_per_gb * gb
        how = f"{self.timeout_s:g} s + {self.s_per_gb:g} s per GB of its {gb:.2f} GB of ONNX files"
        if seconds > MAX_AUTO_BUDGET_S:
            return max(self.timeout_s, MAX_AUTO_BUDGET_S), how + f", at most {MAX_AUTO_BUDGET_S:g} s"
        return seconds, how


def model_bytes(path: str | Path) -> int:
    """What checking the bundle at `path` will load: the allocated size of the ONNX files its manifest lists (each
    variant's and member's `file`). Only the parent's own bounded reads: manifest.json up to MAX_MANIFEST_BYTES
    as plain JSON, then one lstat per listed file. A path leaving the bundle, a link or anything but a regular
    file counts nothing, nor does a file the manifest does not list, nor the holes of a sparse file; 0 when the
    manifest cannot be read (the check itself then refuses the bundle)."""
    from fusion.bundle import MAX_MANIFEST_BYTES, _read_manifest

    root = Path(path)
    try:
        manifest, _ = _read_manifest(root, MAX_MANIFEST_BYTES)
        files = {e.get("file") for group in ("variants", "members") for e in (manifest.get(group) or {}).values()
                 if isinstance(e, dict)}
    except Exception:  # noqa: BLE001 - malformed or hostile: the check in the child says what is wrong
        return 0
    total = 0
    for rel in files:
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            continue
        try:
            st = os.lstat(root / rel)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode):
            total += min(st.st_size, st.st_blocks * 512)
    return total


@dataclass(frozen=True)
class Report:
    """What the child checked: the manifest the worker must find again, and what the check cost."""

    bundle_version: str
    manifest_sha256: str
    seconds: float  # wall time of the whole check, child start to exit
    peak_vm_mb: float  # the child's peak address space (what RLIMIT_AS bounds)
    peak_rss_mb: float
    cpu_s: float  # the child's CPU time (user + system), imports included


def check(path: str | Path, limits: LoadLimits | None = None) -> Report:
    """Load, warm up and probe `path` in a child process within `limits`; raise the refusal (a
    BundleError, or the FusionError the load raised) or return what was checked."""
    if limits is None:  # the service's own limits and child environment (a bare LoadLimits() has neither)
        from service import config  # here: config builds LoadLimits, so it imports this module

        limits = config.load().load_limits
    root = str(Path(__file__).resolve().parents[1])  # the directory holding `service` and `fusion`
    env = {k: v for k, v in limits.child_env if k != "PROMETHEUS_MULTIPROC_DIR"}  # no metrics files from the child
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    budget, how = limits.budget(path)
    cmd = [sys.executable, "-m", "service.preflight", "--timeout-s", repr(budget),
           "--max-memory-mb", str(limits.max_memory_mb), "--", str(Path(path).absolute())]
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as exc:
        raise UnavailableError(f"could not start the bundle check process ({sys.executable}): {exc}") from None
    try:
        out, err = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BundleError(
            f"the bundle did not load, warm up and pass its probe within {_seconds(budget)} s ({how}); refused. "
            f"A model that runs for ever (e.g. a Loop with a huge trip count) looks like this; for a bundle "
            f"that is only slow, set FUSION_LOAD_TIMEOUT_S to more seconds"
        ) from None
    seconds = time.monotonic() - t0
    result = _result(out)
    if result is not None and result.get("ok") and proc.returncode == 0:
        return Report(str(result["bundle_version"]), str(result["manifest_sha256"]), round(seconds, 3),
                      float(result["peak_vm_mb"]), float(result["peak_rss_mb"]), float(result["cpu_s"]))
    if result is not None and result.get("ok") is False:
        raise _refusal(result)
    if proc.returncode < 0:  # killed: the OOM killer (SIGKILL), its own alarm, a crash
        sig = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else str(-proc.returncode)
        raise BundleError(
            f"the bundle check process died of {sig} after {seconds:.1f} s (out of memory under "
            f"FUSION_LOAD_MAX_MEMORY_MB={limits.max_memory_mb or 'unlimited'}, or onnxruntime crashed); refused"
        )
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
    raise BundleError(f"the bundle check process failed (exit status {proc.returncode}): {tail[0]:.300}")


def _seconds(s: float) -> str:
    """47.2, 3600, 0.011: a budget as a person reads it (never 3.6e+03)."""
    return f"{s:.3g}" if s < 1 else f"{round(s, 1):g}"


def _result(stdout: bytes) -> dict | None:
    for line in reversed(stdout.decode("utf-8", "replace").splitlines()):
        if line.startswith(RESULT):
            try:
                return json.loads(line[len(RESULT):])
            except ValueError:
                return None
    return None


def _refusal(result: dict) -> Exception:
    """The child's refusal as the exception the load raised in it (so start and swap map it as before)."""
    from service.onnx_check import UnsafeModelError

    known = {c.__name__: c for c in (*vars(errors).values(), UnsafeModelError)
             if isinstance(c, type) and issubclass(c, errors.FusionError)}
    return known.get(str(result.get("kind")), BundleError)(str(result.get("error", ""))[:2000])


# ---- the child -----------------------------------------------------------------------------


def _limit_self(timeout_s: float, max_memory_mb: int) -> None:
    import resource

    signal.alarm(math.ceil(timeout_s) + ALARM_GRACE_S)  # default action: terminate, even inside onnxruntime's C++
    if max_memory_mb > 0:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = max_memory_mb << 20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")  # raising it needs no privilege
    except OSError:
        pass


def _peaks_mb() -> tuple[float, float]:
    vm = rss = 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmPeak:"):
                vm = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    return round(vm, 1), round(rss, 1)


def _check_here(bundle: str, max_memory_mb: int) -> dict:
    from dataclasses import replace

    from fusion.errors import FusionError

    try:
        from service import config, runtime

        # this child's one read of its environment; batch sizes are timed once, by the serving process
        cfg = replace(config.load().runtime, device="cpu", gpu_ids=(), batch_curve=False)
        loaded = runtime.load(bundle, cfg)
        runtime.check_probe(loaded)
    except (Exception, RecursionError, MemoryError) as exc:  # noqa: BLE001 - every failure is a refusal, reported
        text = f"{exc}" if isinstance(exc, FusionError) else f"{type(exc).__name__}: {exc}"
        marker = next((s for s in ALLOCATION_FAILURES if s in text), None)
        if isinstance(exc, MemoryError) or marker:
            limit = f"{max_memory_mb} MB" if max_memory_mb else "0, no limit: the machine refused it"
            detail = text[text.index(marker):] if marker else text  # onnxruntime's own text starts with its source path
            return {"ok": False, "kind": "BundleError",
                    "error": f"the bundle needs more memory to load than it may use (FUSION_LOAD_MAX_MEMORY_MB = "
                             f"{limit}); refused: {detail.strip():.200}"}
        if isinstance(exc, FusionError):
            return {"ok": False, "kind": type(exc).__name__, "error": text}
        return {"ok": False, "kind": "BundleError", "error": f"the bundle is malformed: {text}"[:400]}
    import resource

    vm, rss = _peaks_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"ok": True, "bundle_version": loaded.version, "manifest_sha256": loaded.bundle.manifest_sha256,
            "peak_vm_mb": vm, "peak_rss_mb": rss, "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m service.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--timeout-s", type=float, required=True)
    p.add_argument("--max-memory-mb", type=int, required=True)
    p.add_argument("bundle")
    args = p.parse_args(argv)
    _limit_self(args.timeout_s, args.max_memory_mb)
    result = _check_here(args.bundle, args.max_memory_mb)
    sys.stdout.write(RESULT + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
