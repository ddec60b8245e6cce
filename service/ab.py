"""Live A/B statistics per variant: traffic, latency, agreement with the ensemble, accuracy from
feedback, and significance tests; mirrored as the Prometheus metrics of service/metrics.py, labelled by
variant. The records awaiting labels are service/feedback.py's store; the tests are fusion/stats.py's.

With a shared store (service/abstore.py, issue 20: FUSION_AB_STORE, SQLite by default in the server),
observations and labels go to it and `/ab/report` is computed from it: the same figures whichever worker
or replica answers, across restarts and hot swaps. Without one (`Stats()`, in-process tests,
FUSION_AB_STORE=memory) the figures cover the worker that computes them, since it started, over every
bundle version it served (the report's `covers` says which); the Prometheus counters are aggregated
across workers and replicas by the scraper (see deploy/README.md for the queries).
"""

from __future__ import annotations

import copy
import os
import threading
import time
from array import array
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

# wilson_interval, mcnemar_exact and two_proportion_test live in fusion/stats.py, shared with the offline
# comparison report (issue 14): imported, not re-implemented, so the two halves cannot drift.
from fusion.stats import mcnemar_exact, two_proportion_test, wilson_interval
# the verdict: anytime-valid non-inferiority (issue 20), valid however often the report is read
from fusion.sequential import Decision, NonInferiority, decide
from service.abstore import ABStore, due_point
from service.feedback import FeedbackStore, Record
from service.metrics import (AB_BOUND, AB_DECISION, AGREEMENT, CASCADE_ROWS, DECISION_VALUES, FEEDBACK, LATENCY, REQUESTS,
                             ROWS, SHADOW_FAILURES, SHADOW_LATENCY)

ENSEMBLE = "ensemble"


def verdict(d: Decision) -> str:
    """The verdict's text: the decision word first (`collecting`, `non-inferior (can replace)`, `inferior (keep
    the ensemble)`, `superior`: the dashboard and service/rollout.py read it), then what it rests on: the
    estimate and the confidence sequence's bounds (fusion/sequential.py; they hold at every look at once)."""
    level = f"{1 - d.alpha:.0%}"
    if d.analysis is None:
        return f"{d.decision}: no labelled rows and no rows compared with the ensemble yet"
    if d.analysis == "agreement":
        est = "—" if d.estimate is None else f"{d.estimate:.2%}"
        return (f"{d.decision}: agreement with the ensemble {est}, {level} confidence sequence "
                f"[{d.ci_low:.2%}, {d.ci_high:.2%}], needs > {d.threshold:.2%} ({d.n:,} rows, no labels)")
    est = "—" if d.estimate is None else f"{d.estimate * 100:+.2f} pp"
    return (f"{d.decision}: accuracy vs the ensemble {est}, {level} confidence sequence "
            f"[{d.ci_low * 100:+.2f}, {d.ci_high * 100:+.2f}] pp, margin {d.margin_pp:g} pp ({d.analysis}, {d.n:,} rows)")


# ---- the live figures -----------------------------------------------------------------------------------


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Window:
    """The last `size` float values, a ring over an array of C doubles: appending costs what a deque's
    does, and a report copies it in one memcpy under the stats lock (microseconds), where a deque of
    Python floats had to be iterated under it (it raises if appended to meanwhile)."""

    __slots__ = ("_buf", "_size", "_i")

    def __init__(self, size: int = 20_000):
        self._buf = array("d")
        self._size, self._i = size, 0

    def append(self, value: float) -> None:
        if len(self._buf) < self._size:
            self._buf.append(value)
        else:
            self._buf[self._i] = value
            self._i = (self._i + 1) % self._size

    def __len__(self) -> int:
        return len(self._buf)

    def values(self) -> array:
        """A copy of the values held, in no particular order (percentiles need none)."""
        return self._buf[:]


@dataclass
class VariantStats:
    requests: int = 0
    rows: int = 0
    latencies: Window = field(default_factory=Window)  # seconds, answered requests
    shadow_latencies: Window = field(default_factory=Window)  # seconds, shadow runs
    agree: int = 0
    compared: int = 0
    correct: int = 0
    labelled: int = 0


MAX_VERSIONS = 16  # bundle versions listed in the report's `covers` (one per hot swap; the oldest go first)
# The confidence sequence over time (`vs_ensemble.history`: the dashboard's chart): a point (time, rows,
# estimate, bounds, decision) per variant when a report is computed (a dashboard poll, a rollout
# evaluation) and its decision or analysis changed, or its rows grew by HISTORY_STEP (1 %, at least one
# row) since the newest point; the newest HISTORY_MAX kept (500 points at 1 % span a 145x range of rows).
# Driven by the data, not by the clock, so reads with no new labels never change the report: it stays the
# same whichever worker answers and however often it is read.
HISTORY_STEP = 0.01
HISTORY_MAX = 500


class Stats:
    """Thread-safe per-variant figures for `/ab/report`, scored from the records of a FeedbackStore.

    Two locks, never nested: the store's (records awaiting labels) and this object's (the figures), so
    the store can be replaced by a shared one (issue 20) without touching the statistics.
    """

    # the verdict's rule (margin, agreement margin, alpha): FUSION_AB_* via config.load() -> EngineConfig.ab_test,
    # set on the instance by the Engine; a class default so that every Stats() has one
    rule: NonInferiority = NonInferiority()
    history_step: float = HISTORY_STEP
    history_max: int = HISTORY_MAX

    def __init__(self, max_records: int = 100_000, max_rows: int = 200_000, store: ABStore | None = None):
        """store: the shared, durable A/B store (service/abstore.py); None keeps everything in this process.
        With one, the records awaiting labels and every figure of the report live in it (the bounded,
        fair in-memory FeedbackStore is then unused: the store is bounded by its retention instead)."""
        self.shared = store
        self._lock = threading.Lock()
        self._children: dict[str, tuple] = {}  # variant -> (requests, rows, latency) Prometheus children
        self.variants: dict[str, VariantStats] = defaultdict(VariantStats)
        self.store = FeedbackStore(max_records, max_rows)
        # paired outcomes vs the ensemble on labelled rows: variant -> [both, only_v, only_e, neither]
        self.paired: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.cascade = {"answered": 0, "escalated": 0}
        self.shadow_failures: dict[str, int] = defaultdict(int)
        self.versions: OrderedDict[str, dict] = OrderedDict()  # bundle version -> what was counted on it
        self.versions_dropped = 0
        self.started = time.time()
        # requests whose variant was chosen, answered or failed: variant -> bundle version -> [answered, failed]
        self.outcomes: dict[str, dict[str, list[int]]] = defaultdict(dict)
        self.history: dict[str, list[dict]] = {}  # variant -> confidence sequence points (HISTORY_STEP)

    # The store's figures, read here by the callers and by the invariant tests
    # (tests/reliability/test_ab_integrity.py, tests/test_stats.py).
    new_key = staticmethod(FeedbackStore.new_key)
    records = property(lambda self: self.store.records)
    stored_rows = property(lambda self: self.store.stored_rows)
    reused_ids = property(lambda self: self.store.reused_ids)
    max_records = property(lambda self: self.store.max_records)
    max_rows = property(lambda self: self.store.max_rows)

    def _metrics(self, variant: str) -> tuple:
        """The variant's Prometheus children, looked up once (labels() takes a lock and builds a key)."""
        children = self._children.get(variant)
        if children is None:
            children = self._children[variant] = (REQUESTS.labels(variant), ROWS.labels(variant), LATENCY.labels(variant))
        return children

    def observe(self, variant: str, rows: int, seconds: float, key: str | None, predictions: list, *,
                client: str = "", alias: str | None = None, version: str | None = None) -> str:
        """Count an answered request and keep its predictions for feedback; returns the record's id.

        key: the server's id for the record (None: a fresh one); one already taken gets a fresh one, so no
        record is ever replaced. client: who sent it, for fair eviction. alias: the client's own
        X-Request-ID. version: the bundle version that answered (the report's `covers`).
        """
        requests, rows_counter, latency = self._metrics(variant)
        requests.inc()
        rows_counter.inc(rows)
        latency.observe(seconds)
        if self.shared is not None:  # queued: written by the store's thread, off the request path
            key = key or self.new_key()
            self.shared.observe(key, variant=variant, version=version, client=client, alias=alias, latency=seconds,
                                predictions=predictions)
            return key
        with self._lock:
            s = self.variants[variant]
            s.requests += 1
            s.rows += rows
            s.latencies.append(seconds)
            if version is not None:
                self._count_version(version, requests=1, rows=rows)
        return self.store.put(key, Record(variant, predictions, client, alias, version))

    def observe_outcome(self, variant: str, failed: bool, version: str | None = None) -> None:
        """A request whose variant was chosen (service/engine.py), answered or failed: the report's
        `outcomes`, which the rollout's error-rate guardrail reads (with a shared store: every worker's
        and replica's, written off the request path by the store's batched writer)."""
        if self.shared is not None:
            self.shared.outcome(variant=variant, version=version, failed=failed)
            return
        with self._lock:
            self.outcomes[variant].setdefault(version or "", [0, 0])[1 if failed else 0] += 1

    def _count_version(self, version: str, *, requests: int = 0, rows: int = 0, labelled: int = 0) -> None:
        v = self.versions.get(version)
        now = time.time()
        if v is None:
            if not requests:
                return  # labels for a version no longer listed
            v = self.versions[version] = {"requests": 0, "rows": 0, "labelled_rows": 0, "first_request": now, "last_request": now}
            if len(self.versions) > MAX_VERSIONS:
                self.versions.popitem(last=False)
                self.versions_dropped += 1
        v["requests"] += requests
        v["rows"] += rows
        v["labelled_rows"] += labelled
        if requests:
            v["last_request"] = now

    def observe_shadow(self, request_id: str, primary: str, shadow: str, primary_pred: list, shadow_pred: list, seconds: float,
                       version: str | None = None) -> None:
        """A shadow run finished: record its latency and, against the ensemble, the agreement.
        `request_id`: the record's key (the feedback id); `version`: the bundle version it ran on."""
        SHADOW_LATENCY.labels(shadow).observe(seconds)
        pair = (shadow, primary_pred, shadow_pred) if primary == ENSEMBLE else (primary, shadow_pred, primary_pred) if shadow == ENSEMBLE else None
        if self.shared is not None:
            agree = sum(int(a == b) for a, b in zip(pair[1], pair[2])) if pair else 0
            self.shared.observe_shadow(request_id, variant=shadow, version=version, latency=seconds, predictions=shadow_pred,
                                       pair_variant=pair[0] if pair else None, agree=agree, compared=len(pair[1]) if pair else 0)
            if pair is not None:
                AGREEMENT.labels(pair[0], "true").inc(agree)
                AGREEMENT.labels(pair[0], "false").inc(len(pair[1]) - agree)
            return
        self.store.attach(request_id, shadow, shadow_pred)
        with self._lock:
            self.variants[shadow].shadow_latencies.append(seconds)
            if pair is None:
                return
            variant, ens, other = pair
            agree = sum(int(a == b) for a, b in zip(ens, other))
            s = self.variants[variant]
            s.agree += agree
            s.compared += len(ens)
        AGREEMENT.labels(variant, "true").inc(agree)
        AGREEMENT.labels(variant, "false").inc(len(ens) - agree)

    def shadow_failed(self, variant: str, reason: str) -> None:
        SHADOW_FAILURES.labels(variant, reason).inc()
        if self.shared is not None:
            self.shared.event("shadow_failure", f"{variant}:{reason}", 1)
            return
        with self._lock:
            self.shadow_failures[f"{variant}:{reason}"] += 1

    def observe_cascade(self, answered: int, escalated: int) -> None:
        CASCADE_ROWS.labels("answered").inc(answered)
        CASCADE_ROWS.labels("escalated").inc(escalated)
        if self.shared is not None:
            self.shared.event("cascade", "answered", answered)
            self.shared.event("cascade", "escalated", escalated)
            return
        with self._lock:
            self.cascade["answered"] += answered
            self.cascade["escalated"] += escalated

    def feedback(self, request_id: str, labels: list, *, client: str = "", alias: bool = True) -> dict:
        """Score a served request against its true labels; returns what was scored.

        request_id: the record's feedback id or, with `alias`, the X-Request-ID that `client` sent with it.
        Raises KeyError if unknown (or already labelled, or evicted), ValueError if ambiguous or of the wrong
        length (the record stays); with a shared store, UnavailableError when it cannot be reached.
        """
        if self.shared is not None:  # found, checked, labelled and scored in one transaction of the store
            done = self.shared.label(request_id, labels, client=client, alias=alias)
            for variant, correct in done["correct"].items():
                FEEDBACK.labels(variant, "true").inc(correct)
                FEEDBACK.labels(variant, "false").inc(len(labels) - correct)
            return {"variants": done["variants"], "rows": done["rows"]}
        rec = self.store.pop(request_id, client=client, alias=alias, rows=len(labels))
        with self._lock:
            if rec.version is not None:
                self._count_version(rec.version, labelled=len(labels))
            scored = {rec.variant: rec.predictions, **rec.others}
            for variant, preds in scored.items():
                s = self.variants[variant]
                correct = sum(int(p == y) for p, y in zip(preds, labels))
                s.correct += correct
                s.labelled += len(labels)
                FEEDBACK.labels(variant, "true").inc(correct)
                FEEDBACK.labels(variant, "false").inc(len(labels) - correct)
            ens = scored.get(ENSEMBLE)
            if ens is not None:
                for variant, preds in scored.items():
                    if variant == ENSEMBLE:
                        continue
                    t = self.paired[variant]
                    for p, e, y in zip(preds, ens, labels):
                        t[(p != y) * 2 + (e != y)] += 1  # 0 both right, 1 only v right, 2 only e right, 3 neither
        return {"variants": sorted(scored), "rows": len(labels)}

    def report(self) -> dict:
        """The figures of `/ab/report`. The lock is held only to copy counters and the latency windows
        (microseconds); percentiles and tests run outside it, so no /predict or /feedback waits on them.
        With a shared store, the same figures summed over the store (`_shared_figures`)."""
        if self.shared is not None:
            (variants, paired, cascade, shadow_failures, versions, dropped, pending, since, outcomes,
             history) = self._shared_figures()
        else:
            with self._lock:
                variants = {name: (copy.copy(s), s.latencies.values(), s.shadow_latencies.values())
                            for name, s in sorted(self.variants.items())}
                paired = {name: list(t) for name, t in self.paired.items()}
                cascade, shadow_failures = dict(self.cascade), dict(self.shadow_failures)
                versions = {v: dict(d) for v, d in self.versions.items()}
                dropped = self.versions_dropped
                outcomes = {name: {v: list(c) for v, c in by.items()} for name, by in self.outcomes.items()}
                history = {name: list(points) for name, points in self.history.items()}
                for name in outcomes.keys() - variants.keys():  # failed requests only: still a variant of the report
                    variants[name] = (VariantStats(), array("d"), array("d"))
                variants = dict(sorted(variants.items()))
            pending, since = self.store.summary(), self.started
        out: dict = {}
        ens = variants.get(ENSEMBLE, (None,))[0]
        for name, (s, lat, sh) in variants.items():
            pct = np.percentile(np.frombuffer(lat) * 1e3, [50, 95, 99]).tolist() if lat else [None] * 3
            sh_pct = np.percentile(np.frombuffer(sh) * 1e3, [50, 99]).tolist() if sh else [None] * 2
            acc = s.correct / s.labelled if s.labelled else None
            entry = {
                "requests": s.requests, "rows": s.rows,
                "latency_ms": {"p50": pct[0], "p95": pct[1], "p99": pct[2], "samples": len(lat)},
                "shadow_latency_ms": {"p50": sh_pct[0], "p99": sh_pct[1], "samples": len(sh)},
                "agreement_with_ensemble": (s.agree / s.compared if s.compared else None) if name != ENSEMBLE else 1.0,
                "compared_rows": s.compared if name != ENSEMBLE else None,
                "accuracy": acc, "accuracy_ci95": list(wilson_interval(s.correct, s.labelled)) if s.labelled else None,
                "labelled_rows": s.labelled,
                "outcomes": _outcomes(outcomes.get(name, {})),
            }
            if name != ENSEMBLE and ens is not None:
                entry["vs_ensemble"] = _test(paired.get(name, [0, 0, 0, 0]), s, ens, self.rule)
            out[name] = entry
        history = self._history(out, history)
        for name, entry in out.items():
            if "vs_ensemble" in entry:
                entry["vs_ensemble"]["history"] = history.get(name, [])
                _set_gauges(name, entry["vs_ensemble"])
        total = cascade["answered"] + cascade["escalated"]
        for d in versions.values():
            d["first_request"], d["last_request"] = _iso(d["first_request"]), _iso(d["last_request"])
        scope = ("this worker process only (worker_pid), since it started (since): every figure above "
                 "counts the requests and labels of every bundle version listed in bundle_versions, "
                 "hot swaps included; across workers and replicas, use the Prometheus counters")
        if self.shared is not None:
            scope = ("every worker and replica writing to the shared A/B store (store), since the store was created "
                     "(since) and within its retention: every figure above counts the requests and labels of every "
                     "bundle version listed in bundle_versions, across restarts and hot swaps; worker_pid is the "
                     "worker that answered")
        return {
            "variants": out,
            "cascade": {**cascade, "escalation_rate": cascade["escalated"] / total if total else None},
            "shadow_failures": shadow_failures,
            "uptime_s": time.time() - self.started,
            "covers": {
                "scope": scope,
                "worker_pid": os.getpid(),
                "since": _iso(since),
                "bundle_versions": versions,
                **({"earlier_versions_not_listed": dropped} if dropped else {}),
                "pending_feedback": pending,
                **({"store": self.shared.describe()} if self.shared is not None else {}),
            },
        }

    def _shared_figures(self) -> tuple:
        """The report's inputs from the shared store, in the in-memory shapes (VariantStats per variant,
        the paired tables), so the formatting and the tests (`_test`, `verdict`) are the same code. This
        worker's queued observations are written first: a report read right after a request counts it."""
        self.shared.flush(timeout=2.0)
        f = self.shared.figures()
        variants = {}
        for name, d in f["variants"].items():
            s = VariantStats(requests=d["requests"], rows=d["rows"], agree=d["agree"], compared=d["compared"],
                             correct=d["correct"], labelled=d["labelled"])
            variants[name] = (s, array("d", d["latencies"]), array("d", d["shadow_latencies"]))
        return (variants, f["paired"], f["cascade"], f["shadow_failures"], f["versions"], f["versions_dropped"],
                f["pending"], f["since"], f["outcomes"], f["history"])

    def _history(self, out: dict, history: dict[str, list]) -> dict[str, list]:
        """Each variant's confidence sequence over time: `history` (what is stored), with this report's point
        added where `due_point` says so; in the shared store (one series for every worker: it decides again
        under its write lock), else in this process."""
        now, due = time.time(), {}
        for name, entry in out.items():
            t = entry.get("vs_ensemble")
            if t is None or t["analysis"] is None:
                continue
            point = {"t": now, "analysis": t["analysis"], "n": t["n"], "estimate": t["estimate"], "ci_low": t["ci_low"],
                     "ci_high": t["ci_high"], "decision": t["decision"]}
            if due_point((history.get(name) or [None])[-1], point, self.history_step):
                due[name] = point
        if not due:
            return history
        if self.shared is not None:
            return self.shared.record_history(due, self.history_step, self.history_max)
        with self._lock:
            for name, point in due.items():
                points = self.history.setdefault(name, [])
                if due_point(points[-1] if points else None, point, self.history_step):
                    points.append(point)
                    del points[:-self.history_max]
            return {name: list(points) for name, points in self.history.items()}

    def close(self) -> None:
        """Write what the shared store still has queued and stop its writer (service shutdown, tests)."""
        if self.shared is not None:
            self.shared.close()


def _outcomes(by_version: dict[str, list[int]]) -> dict:
    """A variant's requests once chosen, answered and failed, in all and per bundle version (the rollout's
    error-rate guardrail: service/rollout.py)."""
    answered, failed = (sum(c[i] for c in by_version.values()) for i in (0, 1))
    return {"answered": answered, "failed": failed,
            "error_rate": failed / (answered + failed) if answered + failed else None,
            "by_version": {v: {"answered": c[0], "failed": c[1]} for v, c in sorted(by_version.items())}}


def _set_gauges(variant: str, t: dict) -> None:
    """fusion_ab_bound / fusion_ab_decision: the verdict the report computed (service/metrics.py)."""
    for bound, key in (("low", "ci_low"), ("high", "ci_high"), ("estimate", "estimate"), ("threshold", "threshold")):
        if t.get(key) is not None:
            AB_BOUND.labels(variant, bound).set(t[key])
    AB_DECISION.labels(variant).set(DECISION_VALUES.get(str(t["decision"]).split(" ")[0], 0))


def _test(paired: list[int], s: VariantStats, ens: VariantStats, rule: NonInferiority = NonInferiority()) -> dict:
    """The variant against the ensemble, from counts only (so a shared store can supply them).

    The verdict (`decision`, `verdict`) is anytime-valid non-inferiority (fusion/sequential.py `decide`): on
    paired labelled rows (both answered: a shadow) if any, else on each side's labelled rows (a traffic
    split), else, without labels, on the agreement with the ensemble; `ci_low`/`ci_high` are the confidence
    sequence's current bounds (the accuracy difference, or the agreement rate), `margin_pp` and `alpha` the
    rule. The fixed-sample test of the same rows (`test`, `p_value`: exact McNemar or a two-proportion
    z-test) is kept for reference only: it is valid for one look at a sample size fixed in advance, and the
    report is read continuously (docs/AB.md).
    """
    both, only_v, only_e, neither = (int(v) for v in paired)  # a database's SUM may come back as Decimal
    n_paired = both + only_v + only_e + neither
    d = decide(rule, paired=(n_paired, only_v, only_e),
               unpaired=(int(s.correct), int(s.labelled), int(ens.correct), int(ens.labelled)),
               agreement=(int(s.agree), int(s.compared)))
    anytime = {**d.as_dict(), "verdict": verdict(d)}
    if d.analysis == "paired":
        acc_v, acc_e = (both + only_v) / n_paired, (both + only_e) / n_paired
        return {"test": "mcnemar_exact", "paired_rows": n_paired, "discordant": [only_v, only_e],
                "accuracy": acc_v, "ensemble_accuracy": acc_e, "p_value": mcnemar_exact(only_v, only_e), **anytime}
    if d.analysis == "unpaired":
        return {"test": "two_proportion_z", "rows": [s.labelled, ens.labelled], "accuracy": s.correct / s.labelled,
                "ensemble_accuracy": ens.correct / ens.labelled,
                "p_value": two_proportion_test(s.correct, s.labelled, ens.correct, ens.labelled), **anytime}
    return {"test": None, **({"compared_rows": s.compared} if d.analysis == "agreement" else {}), **anytime}
