"""Live A/B statistics per variant: traffic, latency, agreement with the ensemble, accuracy from
feedback, and significance tests; mirrored as Prometheus metrics labelled by variant.

In-process figures (`/ab/report`) cover the worker that computes them, since it started, over every
bundle version it served (the report's `covers` says which); the Prometheus counters are aggregated
across workers and replicas by the scraper (see deploy/README.md for the queries).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import math
import os
import threading
import time
from array import array
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from fusion.stats import mcnemar_exact, two_proportion_test, wilson_interval  # noqa: F401 (re-exported)
from service.metrics import Bounded

ENSEMBLE = "ensemble"
MIN_LABELS = 30  # below this, no verdict

REQUESTS = Counter("fusion_requests", "Prediction requests answered, by variant", ["variant"])
ROWS = Counter("fusion_rows", "Rows predicted, by variant", ["variant"])
ERRORS = Counter("fusion_errors", "Requests answered with an error, by HTTP status", ["status"])
LATENCY = Histogram(
    "fusion_request_latency_seconds", "Model latency per request, by variant", ["variant"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SHADOW_LATENCY = Histogram(
    "fusion_shadow_latency_seconds", "Model latency of shadow runs, by variant", ["variant"],
    buckets=LATENCY._upper_bounds[:-1],
)
AGREEMENT = Counter("fusion_agreement", "Rows compared with the ensemble (shadow pairs), by variant", ["variant", "agree"])
FEEDBACK = Counter("fusion_feedback", "Labelled rows, by variant and correctness", ["variant", "correct"])
CASCADE_ROWS = Counter("fusion_cascade_rows", "Cascade rows by outcome", ["outcome"])
SHADOW_FAILURES = Counter("fusion_shadow_failures", "Shadow runs that failed or were dropped", ["variant", "reason"])
DEGRADED = Counter("fusion_degraded", "Members-mode answers from a quorum (some members failed)", ["member"])
BUNDLE = Gauge("fusion_bundle_info", "The bundle version being served (value 1)", ["version"], multiprocess_mode="liveall")
# Label values (issue 13, finding 2): variant and member names are the served bundle's (a request's
# variant is checked against it before any metric is touched), status is the code we answer with,
# reason is "queue_full" or an exception class name, the rest are literals; none is a client's string.
# Bounded() holds each label to MAX_LABEL_VALUES values per process anyway ("other" beyond). BUNDLE is
# left unbounded: one version per hot swap (admin only), and "other" would hide which one is served.
REQUESTS, ROWS, ERRORS, LATENCY, SHADOW_LATENCY, AGREEMENT, FEEDBACK, SHADOW_FAILURES, DEGRADED = (
    Bounded(m) for m in (REQUESTS, ROWS, ERRORS, LATENCY, SHADOW_LATENCY, AGREEMENT, FEEDBACK, SHADOW_FAILURES, DEGRADED))


# wilson_interval, mcnemar_exact and two_proportion_test live in fusion/stats.py, shared with the offline
# comparison report (issue 14): imported, not re-implemented, so the two halves cannot drift.


def verdict(acc_v: float, acc_e: float, p: float | None, n: int, alpha: float = 0.05) -> str:
    if p is None or n < MIN_LABELS:
        return f"collecting: {n} labelled rows (a verdict needs {MIN_LABELS})"
    if p >= alpha:
        return f"no significant difference from the ensemble (p = {p:.3g})"
    return f"{'better' if acc_v > acc_e else 'worse'} than the ensemble (p = {p:.3g})"


# ---- labels ---------------------------------------------------------------------------------------------

_JSON_KINDS = {bool: "a boolean", int: "an integer", float: "a number with a fraction", str: "a string"}


def _describe(value) -> str:
    """A value as the client wrote it, with its JSON type: `true (a boolean)`, `"1" (a string)`."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({_JSON_KINDS.get(type(value), 'a ' + type(value).__name__)})"


def check_labels(labels: list, classes: tuple, task: str) -> None:
    """Raise ValueError unless every label is one of the bundle's classes with that class's JSON type
    (classification), or a finite number (regression).

    Python's `true == 1` and `1.0 == 1` let `y in classes` take a boolean or a float as class 1 (issue 13,
    finding 9); "1" is not the class 1 either. Strict types keep feedback to what the model predicts.
    """
    if task != "classification":
        for i, y in enumerate(labels):
            if type(y) not in (int, float) or not math.isfinite(y):
                raise ValueError(f"expected finite numbers as labels (the bundle is a regression model); "
                                 f"got {_describe(y)} at row {i}")
        return
    allowed = {(type(c), c) for c in classes}
    bad = []
    for i, y in enumerate(labels):
        try:
            ok = (type(y), y) in allowed
        except TypeError:  # unhashable (a list or an object): never a class
            ok = False
        if not ok:
            bad.append(i)
    if not bad:
        return
    i, y = bad[0], labels[bad[0]]
    alike = next((c for c in classes if str(c) == str(y) or (type(y) in (bool, int, float) and c == y)), None)
    why = (f", but the class {json.dumps(alike)} is {_JSON_KINDS.get(type(alike), type(alike).__name__)}"
           if alike is not None else ", which is not one of them")
    more = f" ({len(bad)} of the {len(labels)} labels are not classes)" if len(bad) > 1 else ""
    raise ValueError(f"expected labels among the classes {list(classes)}, each of its class's JSON type; "
                     f"got {_describe(y)} at row {i}{why}{more}")


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
class Record:
    """What a request predicted, kept until feedback arrives (bounded, evicted fairly between clients)."""

    variant: str
    predictions: list  # (n_rows,) class labels
    client: str = ""  # who sent the request (address, token): eviction is fair between clients
    alias: str | None = None  # the client's own X-Request-ID, if it sent one
    version: str | None = None  # the bundle version that answered
    others: dict = field(default_factory=dict)  # shadow variant -> predictions


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


class Stats:
    """Thread-safe per-variant figures for `/ab/report`, and the records awaiting feedback.

    A record is keyed by a server-generated id (`feedback_id`), never by a client's string: a client's
    X-Request-ID is only an alias that the same client may use while it names one pending record, so a
    reused or guessed id cannot overwrite, wipe or redirect anyone's record (issue 13, finding 9). The
    store is bounded by records and by rows; when full, the oldest record of the client holding the most
    goes (each record weighs its rows, at least max_rows / max_records), so a flood evicts its sender's
    own records: a client holding less than its fair share (the cap over the clients holding records) is
    never evicted by another.
    """

    def __init__(self, max_records: int = 100_000, max_rows: int = 200_000):
        self._lock = threading.Lock()
        self._children: dict[str, tuple] = {}  # variant -> (requests, rows, latency) Prometheus children
        self.variants: dict[str, VariantStats] = defaultdict(VariantStats)
        self.records: dict[str, Record] = {}  # feedback_id -> what it predicted
        self.max_records, self.max_rows = max_records, max_rows
        self.stored_rows = 0
        self.reused_ids = 0  # requests whose X-Request-ID a pending record of the same client already had
        self._unit = max(1, -(-max_rows // max_records))  # the least weight of a record, in rows
        self._by_client: dict[str, OrderedDict[str, None]] = {}  # client -> its keys, oldest first
        self._weight: dict[str, int] = {}  # client -> the weight of its records
        self._heap: list[tuple[int, int, str]] = []  # (-weight, seq, client); stale entries skipped lazily
        self._seq = itertools.count()
        self._aliases: dict[tuple[str, str], dict[str, None]] = {}  # (client, its X-Request-ID) -> keys
        # paired outcomes vs the ensemble on labelled rows: variant -> [both, only_v, only_e, neither]
        self.paired: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.cascade = {"answered": 0, "escalated": 0}
        self.shadow_failures: dict[str, int] = defaultdict(int)
        self.versions: OrderedDict[str, dict] = OrderedDict()  # bundle version -> what was counted on it
        self.versions_dropped = 0
        self.started = time.time()

    @staticmethod
    def new_key() -> str:
        """A fresh record id: 32 random hex digits (128 bits, as uuid4().hex): unguessable."""
        return os.urandom(16).hex()

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
        with self._lock:
            s = self.variants[variant]
            s.requests += 1
            s.rows += rows
            s.latencies.append(seconds)
            if version is not None:
                self._count_version(version, requests=1, rows=rows)
            while key is None or key in self.records:
                key = self.new_key()
            n = len(predictions)
            if n > self.max_rows:  # larger than the whole store: answered, never kept
                return key
            self.records[key] = Record(variant, predictions, client, alias, version)
            self.stored_rows += n
            self._by_client.setdefault(client, OrderedDict())[key] = None
            self._reweigh(client, max(n, self._unit))
            if alias is not None:
                same = self._aliases.setdefault((client, alias), {})
                self.reused_ids += bool(same)
                same[key] = None
            while len(self.records) > self.max_records or self.stored_rows > self.max_rows:
                self._drop(self._oldest_of_heaviest())
            return key

    def _reweigh(self, client: str, delta: int) -> None:
        """Change a client's weight. The heap holds, for every client, an entry at least its weight: an
        increase pushes one, a decrease leaves the old (now too high) entry to be corrected when it
        reaches the top."""
        weight = self._weight.get(client, 0) + delta
        if weight <= 0:
            self._weight.pop(client, None)
            return
        self._weight[client] = weight
        if delta > 0:
            heapq.heappush(self._heap, (-weight, next(self._seq), client))
            if len(self._heap) > 2 * len(self._weight) + 64:  # compact: stale entries would grow without bound
                self._heap = [(-w, next(self._seq), c) for c, w in self._weight.items()]
                heapq.heapify(self._heap)

    def _oldest_of_heaviest(self) -> str:
        """The oldest key of the client whose records weigh the most (O(log clients) amortised)."""
        while True:
            neg_weight, _, client = self._heap[0]
            weight = self._weight.get(client, 0)
            if weight == -neg_weight:  # the top entry is exact: no client weighs more
                return next(iter(self._by_client[client]))
            heapq.heappop(self._heap)  # too high (or the client is gone): correct it
            if weight:
                heapq.heappush(self._heap, (-weight, next(self._seq), client))

    def _drop(self, key: str) -> Record:
        rec = self.records.pop(key)
        n = len(rec.predictions)
        self.stored_rows -= n
        keys = self._by_client[rec.client]
        del keys[key]
        if not keys:
            del self._by_client[rec.client]
        self._reweigh(rec.client, -max(n, self._unit))
        if rec.alias is not None:
            same = self._aliases[(rec.client, rec.alias)]
            del same[key]
            if not same:
                del self._aliases[(rec.client, rec.alias)]
        return rec

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

    def observe_shadow(self, request_id: str, primary: str, shadow: str, primary_pred: list, shadow_pred: list, seconds: float) -> None:
        """A shadow run finished: record its latency and, against the ensemble, the agreement.
        `request_id`: the record's key (the feedback id)."""
        SHADOW_LATENCY.labels(shadow).observe(seconds)
        pair = (shadow, primary_pred, shadow_pred) if primary == ENSEMBLE else (primary, shadow_pred, primary_pred) if shadow == ENSEMBLE else None
        with self._lock:
            self.variants[shadow].shadow_latencies.append(seconds)
            rec = self.records.get(request_id)
            if rec is not None:
                rec.others[shadow] = shadow_pred
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
        with self._lock:
            self.shadow_failures[f"{variant}:{reason}"] += 1

    def observe_cascade(self, answered: int, escalated: int) -> None:
        CASCADE_ROWS.labels("answered").inc(answered)
        CASCADE_ROWS.labels("escalated").inc(escalated)
        with self._lock:
            self.cascade["answered"] += answered
            self.cascade["escalated"] += escalated

    def _find(self, request_id: str, client: str, alias: bool) -> str:
        if request_id in self.records:
            return request_id
        keys = self._aliases.get((client, request_id)) if alias else None
        if not keys:
            raise KeyError(request_id)
        if len(keys) > 1:
            raise ValueError(f"request_id '{request_id}' was the X-Request-ID of {len(keys)} pending requests from this "
                             "client; expected the 'feedback_id' of the /predict response to label (each has its own)")
        return next(iter(keys))

    def feedback(self, request_id: str, labels: list, *, client: str = "", alias: bool = True) -> dict:
        """Score a served request against its true labels; returns what was scored.

        request_id: the record's feedback id or, with `alias`, the X-Request-ID that `client` sent with it.
        Raises KeyError if unknown (or already labelled, or evicted), ValueError if ambiguous or of the wrong
        length (the record stays).
        """
        with self._lock:
            key = self._find(request_id, client, alias)
            rec = self.records[key]
            if len(labels) != len(rec.predictions):
                raise ValueError(f"expected {len(rec.predictions)} labels for request {request_id}; got {len(labels)}")
            self._drop(key)
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
        (microseconds); percentiles and tests run outside it, so no /predict or /feedback waits on them."""
        with self._lock:
            variants = {name: (copy.copy(s), s.latencies.values(), s.shadow_latencies.values())
                        for name, s in sorted(self.variants.items())}
            paired = {name: list(t) for name, t in self.paired.items()}
            cascade, shadow_failures = dict(self.cascade), dict(self.shadow_failures)
            versions = {v: dict(d) for v, d in self.versions.items()}
            pending = {"records": len(self.records), "rows": self.stored_rows, "clients": len(self._by_client),
                       "reused_client_ids": self.reused_ids}
            dropped = self.versions_dropped
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
            }
            if name != ENSEMBLE and ens is not None:
                entry["vs_ensemble"] = _test(paired.get(name, [0, 0, 0, 0]), s, ens)
            out[name] = entry
        total = cascade["answered"] + cascade["escalated"]
        for d in versions.values():
            d["first_request"], d["last_request"] = _iso(d["first_request"]), _iso(d["last_request"])
        return {
            "variants": out,
            "cascade": {**cascade, "escalation_rate": cascade["escalated"] / total if total else None},
            "shadow_failures": shadow_failures,
            "uptime_s": time.time() - self.started,
            "covers": {
                "scope": ("this worker process only (worker_pid), since it started (since): every figure above "
                          "counts the requests and labels of every bundle version listed in bundle_versions, "
                          "hot swaps included; across workers and replicas, use the Prometheus counters"),
                "worker_pid": os.getpid(),
                "since": _iso(self.started),
                "bundle_versions": versions,
                **({"earlier_versions_not_listed": dropped} if dropped else {}),
                "pending_feedback": pending,
            },
        }


def _test(paired: list[int], s: VariantStats, ens: VariantStats) -> dict:
    """The variant against the ensemble: McNemar on paired labelled rows, else a two-proportion z-test."""
    both, only_v, only_e, neither = paired
    n_paired = both + only_v + only_e + neither
    if n_paired:
        p = mcnemar_exact(only_v, only_e)
        acc_v, acc_e = (both + only_v) / n_paired, (both + only_e) / n_paired
        return {"test": "mcnemar_exact", "paired_rows": n_paired, "discordant": [only_v, only_e],
                "accuracy": acc_v, "ensemble_accuracy": acc_e, "p_value": p,
                "verdict": verdict(acc_v, acc_e, p, n_paired)}
    if s.labelled and ens.labelled:
        p = two_proportion_test(s.correct, s.labelled, ens.correct, ens.labelled)
        acc_v, acc_e = s.correct / s.labelled, ens.correct / ens.labelled
        n = min(s.labelled, ens.labelled)
        return {"test": "two_proportion_z", "rows": [s.labelled, ens.labelled], "accuracy": acc_v,
                "ensemble_accuracy": acc_e, "p_value": p, "verdict": verdict(acc_v, acc_e, p, n)}
    return {"test": None, "verdict": verdict(0, 0, None, 0)}
