"""Intra-op threads and adaptive batching chosen from a model's measured cost (issue 18).

The tiny default ensembles cost ~0.1-0.2 ms a call, below the HTTP floor (~1 ms): for them one
intra-op thread and no batching are best (a second thread costs more in wake-ups than it saves,
and the cores are better left to the HTTP layer and to other requests). Real image and text
ensembles cost tens to hundreds of ms a call: there one request alone should use every core, and
concurrent requests should share calls (adaptive batching). FUSION_INTRA_OP_THREADS=auto and
FUSION_BATCH_MAX_ROWS=auto (the defaults) tell them apart at load: `runtime.load` times one batch-1
call of each variant on one thread (text inputs at their full `max_length`) and `decide` turns that
cost and the cores into the settings. An explicit integer keeps its meaning (service/config.py).

Whether batching pays is measured too, not assumed: for a costly model `runtime.load` times one call at
batch 1, 2, 4, ... 32 rows (within CURVE_BUDGET_S) on its final session, and one batch-1 call per core
run at once (what no batching costs when requests arrive together); `choose_batch_rows` turns those into
the batch size with the least time per row, or no batching when no size saves GAIN of a row's time.
Measured on issue 18's ensembles (2 cores): three BERT-minis at 128 tokens cost 36.4 ms a row at batch 1
on 2 threads, 26.8 at 8 rows and 34.0 at 32, and two unbatched calls at once ~27 ms a row: served at 32
clients, batching 8 rows answered 27.7 requests/s and no batching 33.3. resnet18 + resnet50 + ViT-S at
224x224: 170-200 ms at batch 1, 150-165 at 8-16 rows, while unbatched requests served at once cost 250
ms a row. A fixed 32 rows served both worse at 32 clients than no batching (docs/BENCHMARKS.md); models
whose row costs little beside reading the weights (the 64-4096-4096-10 MLPs: 4.4x at 32 clients) batch.

The rules are pure functions of (cost, cores) and of the curve, so that tests check them by hand
(tests/test_auto_tuning.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

AUTO = -1  # FUSION_INTRA_OP_THREADS / FUSION_BATCH_MAX_ROWS = "auto" (RuntimeConfig, EngineConfig)
COSTLY_S = 5e-3  # a batch-1 call above this is "costly": well above the HTTP floor (~1 ms), below real models
AUTO_BATCH_ROWS = 32  # rows per batched call under auto at most: the largest size the curve measures
CURVE_ROWS = (1, 2, 4, 8, 16, 32)  # batch sizes timed at load for a costly model (at most AUTO_BATCH_ROWS)
CURVE_BUDGET_S = 3.0  # a larger size is timed only while the calls so far and its expected cost fit in this
GAIN = 0.8  # batching pays when some batch size costs at most this share of batch 1's time per row


@dataclass(frozen=True)
class Decision:
    """What auto chose for one model, and why (GET /info shows it)."""

    threads: int
    batching: bool
    reason: str


def decide(cost_s: float, cores: int, threshold_s: float = COSTLY_S) -> Decision:
    """The auto settings of a model whose batch-1 call took `cost_s` on one thread, with `cores` cores for
    this worker: a costly model gets every core and adaptive batching; a cheap one one thread, no batching."""
    cores = max(1, int(cores))
    ms, limit = cost_s * 1e3, threshold_s * 1e3
    if cost_s > threshold_s:
        return Decision(cores, True, f"auto: batch-1 call {ms:.3g} ms > {limit:g} ms")
    return Decision(1, False, f"auto: batch-1 call {ms:.3g} ms <= {limit:g} ms")


def choose_batch_rows(curve: dict[int, float], gain: float = GAIN, parallel_s: float | None = None) -> tuple[int, str]:
    """The rows per batched call for a model whose call on `rows` rows took `curve[rows]` seconds
    (`curve[1]` needed): the size with the least time per row (the smaller on a tie) when it costs at most
    `gain` x the time per row without batching, else 0 (no batching); and why, in words, for GET /info.

    Without batching, concurrent requests run as concurrent batch-1 calls, and those share the cores: the
    time per row is then the less of `curve[1]` (one call on every core) and `parallel_s`, the time per row
    of one batch-1 call per core run at once (runtime.probe_parallel), when given. On the text ensemble of
    issue 18 that was ~27 ms a row, against 26.8 at 8 rows: batching them served 0.83x the requests/s of
    no batching at 32 clients. On its image ensemble two calls at once contend for the caches (served
    unbatched: 250 ms a row, against 150-165 at 8-16 rows in one call)."""
    if 1 not in curve:
        raise ValueError(f"expected a curve with batch 1 timed; got sizes {sorted(curve)}")
    per_row = {n: t / n for n, t in sorted(curve.items())}
    base = per_row[1] if parallel_s is None else min(per_row[1], parallel_s)
    best = min(per_row, key=lambda n: (per_row[n], n))
    shown = ", ".join(f"b{n} {per_row[n] * 1e3:.3g}" for n in per_row)
    if parallel_s is not None:
        shown += f"; unbatched calls at once {parallel_s * 1e3:.3g}"
    if best > 1 and per_row[best] <= gain * base:
        saved = 1.0 - per_row[best] / base
        return best, f"auto: ms per row {shown}; {best} rows save {saved:.0%} of a row's time (>= {1 - gain:.0%})"
    return 0, f"auto: ms per row {shown}; no batch size saves {1 - gain:.0%} of a row's time (off)"


def batch_instances(configured: int, threads: int, cores: int) -> int:
    """Calls of one model the batcher runs at once when its threads were chosen by auto: no more than the
    cores hold (`cores // threads`), so that instances x threads never oversubscribe them; at least 1.

    The trade, measured on issue 18's ensembles (2 cores, load average 6-10, two batch-8 calls): one
    2-thread call at a time took 1.14x (image) and 1.36x (text) the time of two 1-thread calls at once;
    two 2-thread calls at once (4 threads on 2 cores) 1.32x and 1.03x. One request alone, the common case
    at low load, gets every core (0.64-1.14x, 0.41-1.04x the batch-1 time of one thread: the gain needs
    an idle core, which this shared machine did not always have)."""
    return max(1, min(configured, cores // max(1, threads)))


def available_cores(processes: int = 1) -> int:
    """The cores this process may use, shared among `processes` worker processes (FUSION_WORKERS): the CPU
    affinity mask, capped by a cgroup CPU quota (a container's CPU limit), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores // max(1, processes))


def cgroup_quota(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The CPU limit of this process's cgroup in cores (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`); None when there is none or it cannot be read."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def report(model, *, member: bool, batch_rows: int, instances: int, batched: bool, queued: bool = False) -> dict:
    """A model's effective thread and batching settings and why, for GET /info. `model`: a runtime.Model;
    `batch_rows`: FUSION_BATCH_MAX_ROWS as configured (AUTO, 0 or N); `instances`: the batcher's calls of
    it at once; `batched`: whether its requests are batched; `queued`: unbatched, but queued so that at most
    `instances` calls run at once (auto chose no batching for a timed model)."""
    auto = getattr(model, "auto", None)
    ms = getattr(model, "probe_s", 0.0) * 1e3
    if auto is not None:
        threads_reason = auto.reason
    else:
        threads_reason = f"{'FUSION_MEMBER_THREADS' if member else 'FUSION_INTRA_OP_THREADS'}={model.threads}"
    choice = getattr(model, "batch_choice", None)  # (rows, why) from the curve timed at load, for a costly model
    rows = batch_rows
    if batch_rows == AUTO and choice is not None:
        rows, batching_reason = choice
    elif batch_rows == AUTO:
        rows, limit = AUTO_BATCH_ROWS, COSTLY_S * 1e3
        batching_reason = f"auto: batch-1 call {ms:.3g} ms {'>' if batched else '<='} {limit:g} ms"
    else:
        batching_reason = f"FUSION_BATCH_MAX_ROWS={batch_rows}" + (" (off)" if batch_rows == 0 else "")
    curve = getattr(model, "batch_curve", None)
    return {"threads": model.threads, "threads_reason": threads_reason, "batch_1_ms": round(ms, 3),
            "batching": batched, "batch_max_rows": rows if batched else 0,
            "batch_instances": instances if batched else 0, "batching_reason": batching_reason,
            # seconds per call at each batch size timed at load (costly models under auto), else absent
            **({"batch_curve_ms": {str(n): round(t * 1e3, 3) for n, t in curve.items()}} if curve else {}),
            # seconds per row of one batch-1 call per core run at once (what no batching costs), when timed
            **({"unbatched_at_once_ms_per_row": round(model.parallel_s * 1e3, 3)}
               if getattr(model, "parallel_s", None) else {}),
            **({"calls_at_once": instances} if queued else {})}
