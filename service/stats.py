"""Live A/B statistics per variant: traffic, latency, agreement with the ensemble, accuracy from
feedback, and significance tests; mirrored as Prometheus metrics labelled by variant.

In-process figures (`/ab/report`) cover the worker that computes them; the Prometheus counters are
aggregated across workers and replicas by the scraper (see deploy/README.md for the queries).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

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


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b vs c discordant pairs at p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    log_half_n = -n * math.log(2)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n) for i in range(k + 1))
    return min(1.0, 2 * tail)


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided pooled z-test p-value for k1/n1 vs k2/n2 (unpaired traffic split)."""
    if n1 == 0 or n2 == 0:
        return 1.0
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


def verdict(acc_v: float, acc_e: float, p: float | None, n: int, alpha: float = 0.05) -> str:
    if p is None or n < MIN_LABELS:
        return f"collecting: {n} labelled rows (a verdict needs {MIN_LABELS})"
    if p >= alpha:
        return f"no significant difference from the ensemble (p = {p:.3g})"
    return f"{'better' if acc_v > acc_e else 'worse'} than the ensemble (p = {p:.3g})"


@dataclass
class Record:
    """What a request predicted, kept until feedback arrives (bounded LRU)."""

    variant: str
    predictions: list  # (n_rows,) class labels
    others: dict = field(default_factory=dict)  # shadow variant -> predictions


@dataclass
class VariantStats:
    requests: int = 0
    rows: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=20_000))  # seconds, answered requests
    shadow_latencies: deque = field(default_factory=lambda: deque(maxlen=20_000))  # seconds, shadow runs
    agree: int = 0
    compared: int = 0
    correct: int = 0
    labelled: int = 0


class Stats:
    """Thread-safe per-variant figures for `/ab/report`."""

    def __init__(self, max_records: int = 100_000, max_rows: int = 200_000):
        self._lock = threading.Lock()
        self._children: dict[str, tuple] = {}  # variant -> (requests, rows, latency) Prometheus children
        self.variants: dict[str, VariantStats] = defaultdict(VariantStats)
        # awaiting feedback, oldest first; bounded by requests and by rows (a 1024-row request holds
        # 1024 labels per variant), so memory stays bounded whatever the batch sizes
        self.records: OrderedDict[str, Record] = OrderedDict()
        self.max_records, self.max_rows = max_records, max_rows
        self.stored_rows = 0
        self.reused_ids = 0
        # paired outcomes vs the ensemble on labelled rows: variant -> [both, only_v, only_e, neither]
        self.paired: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.cascade = {"answered": 0, "escalated": 0}
        self.shadow_failures: dict[str, int] = defaultdict(int)
        self.started = time.time()

    def _metrics(self, variant: str) -> tuple:
        """The variant's Prometheus children, looked up once (labels() takes a lock and builds a key)."""
        children = self._children.get(variant)
        if children is None:
            children = self._children[variant] = (REQUESTS.labels(variant), ROWS.labels(variant), LATENCY.labels(variant))
        return children

    def observe(self, variant: str, rows: int, seconds: float, request_id: str, predictions: list) -> None:
        requests, rows_counter, latency = self._metrics(variant)
        requests.inc()
        rows_counter.inc(rows)
        latency.observe(seconds)
        with self._lock:
            s = self.variants[variant]
            s.requests += 1
            s.rows += rows
            s.latencies.append(seconds)
            old = self.records.pop(request_id, None)
            if old is not None:  # a client reused an X-Request-ID: score neither answer against a label
                self.stored_rows -= len(old.predictions)
                self.reused_ids += 1
                return
            self.records[request_id] = Record(variant, predictions)
            self.stored_rows += len(predictions)
            while len(self.records) > self.max_records or self.stored_rows > self.max_rows:
                _, dropped = self.records.popitem(last=False)
                self.stored_rows -= len(dropped.predictions)

    def observe_shadow(self, request_id: str, primary: str, shadow: str, primary_pred: list, shadow_pred: list, seconds: float) -> None:
        """A shadow run finished: record its latency and, against the ensemble, the agreement."""
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

    def feedback(self, request_id: str, labels: list) -> dict:
        """Score a served request against its true labels. Returns what was scored; raises KeyError if unknown."""
        with self._lock:
            rec = self.records.pop(request_id)  # KeyError: unknown or already labelled
            if len(labels) != len(rec.predictions):
                self.records[request_id] = rec
                raise ValueError(f"expected {len(rec.predictions)} labels for request {request_id}; got {len(labels)}")
            self.stored_rows -= len(rec.predictions)
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
        with self._lock:
            out: dict = {}
            ens = self.variants.get(ENSEMBLE)
            for name, s in sorted(self.variants.items()):
                lat = np.asarray(s.latencies) * 1e3
                pct = np.percentile(lat, [50, 95, 99]).tolist() if len(lat) else [None] * 3
                sh = np.asarray(s.shadow_latencies) * 1e3
                sh_pct = np.percentile(sh, [50, 99]).tolist() if len(sh) else [None] * 2
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
                    entry["vs_ensemble"] = self._test(name, s, ens)
                out[name] = entry
            total = self.cascade["answered"] + self.cascade["escalated"]
            return {
                "variants": out,
                "cascade": {**self.cascade, "escalation_rate": self.cascade["escalated"] / total if total else None},
                "shadow_failures": dict(self.shadow_failures),
                "uptime_s": time.time() - self.started,
            }

    def _test(self, name: str, s: VariantStats, ens: VariantStats) -> dict:
        both, only_v, only_e, neither = self.paired.get(name, [0, 0, 0, 0])
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
