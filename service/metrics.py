"""Bounded Prometheus labels: no request can create a metric series.

Every series costs memory in each worker, bytes in every `/metrics` scrape and, in BentoML's
multiprocess mode, room in the mmap'd files under `PROMETHEUS_MULTIPROC_DIR`, which only grow (on
the 512Mi emptyDir in deploy/ the pod was evicted). So every label value must come from a set the
server fixes, never from the client:

* BentoML 1.4.40 labels its HTTP metrics (`request_total`, `request_duration_seconds`,
  `request_in_progress`) with the **raw request path**: 1,000 distinct unknown paths made 20,000
  series and a 4.3 MB `/metrics` (docs/RELIABILITY.md, issue 13 finding 2).
  `patch_bentoml_metrics()` makes them label a request by the **template** of the route that serves
  it (`/v2/models/{name}/infer`), and every path no route serves by one value, `UNKNOWN`.
* Our own metrics (defined at the end of this module, and in service/batching.py) take their label values from the bundle
  (variant, member and model names, checked against it before any metric is touched), from the code
  (HTTP status codes we answer with, exception class names) or from literals. `Bounded` enforces it
  anyway: a label that meets more than `max_values` distinct values in one process records the rest
  as `OTHER`, so a future bug that lets a client string through cannot explode the series either.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Callable, Iterable, Sequence

from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import compile_path

log = logging.getLogger("fusion.service")

UNKNOWN = "/{unknown}"  # the endpoint label of every path that no route serves
OTHER = "other"  # a label value past its bound
MAX_LABEL_VALUES = 256  # distinct values per label and process; bundles name far fewer variants and members


class EndpointLabels:
    """Path -> endpoint label: the route's template (`/v2/models/{name}/infer`), a static-file
    prefix's template (`/static_content/{path}`), or `UNKNOWN`. A bounded set: one value per route."""

    def __init__(self, templates: Iterable[str], prefixes: Sequence[str] = ()):
        templates = list(dict.fromkeys(templates))
        self.exact = frozenset(t for t in templates if "{" not in t)
        self.patterns: list[tuple[re.Pattern, str]] = [(compile_path(t)[0], t) for t in templates if "{" in t]
        self.prefixes = tuple(p if p.endswith("/") else p + "/" for p in prefixes)

    def __call__(self, path: str) -> str:
        if path in self.exact:
            return path
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return prefix + "{path}"
        for regex, template in self.patterns:
            if regex.match(path):
                return template
        return UNKNOWN

    def values(self) -> frozenset[str]:
        """Every label this mapping can return."""
        return self.exact | {t for _, t in self.patterns} | {p + "{path}" for p in self.prefixes} | {UNKNOWN}


# ---- BentoML's HTTP metrics ----------------------------------------------------------------------

_RAW_PATH = "fusion.raw_path"  # scope key: the real path while BentoML's metrics middleware reads the label
_label: Callable[[str], str] = lambda path: UNKNOWN  # noqa: E731 - replaced by patch_bentoml_metrics()


class _RestorePath:
    """Put the real path back into the scope, right inside BentoML's metrics middleware."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        raw = scope.pop(_RAW_PATH, None)
        if raw is not None:
            scope["path"] = raw
        await self.app(scope, receive, send)


def patch_bentoml_metrics(label: Callable[[str], str]) -> None:
    """Make BentoML's HTTP metrics label requests with `label(path)` instead of the raw path.

    bentoml 1.4.40 (`bentoml/_internal/server/http/instruments.py`): `HTTPTrafficMetricsMiddleware`
    and `RunnerTrafficMetricsMiddleware` (the one a new-style `@bentoml.service` uses) read
    `endpoint = scope["path"]` once, on entry, and then call the app inside. The patched `__call__`
    sets `scope["path"]` to the label for that read, and a shim placed as the middleware's inner app
    restores the real path before anything else sees it (and again on the way out). Their code is not
    copied, so every other behaviour stays BentoML's. Idempotent: a second call only replaces `label`.
    tests/reliability/test_metrics_cardinality.py fails if a later BentoML reads the path elsewhere.
    """
    from bentoml._internal.server.http import instruments

    global _label
    _label = label
    for cls in (instruments.HTTPTrafficMetricsMiddleware, instruments.RunnerTrafficMetricsMiddleware):
        if getattr(cls, "_fusion_patched", False):
            continue
        original = cls.__call__

        async def __call__(self, scope, receive, send, _original=original) -> None:
            if scope["type"] not in ("http", "websocket"):
                return await _original(self, scope, receive, send)
            raw = scope["path"]
            endpoint = _label(raw)
            if endpoint == raw:
                return await _original(self, scope, receive, send)
            if not isinstance(self.app, _RestorePath):  # once per middleware instance (no await since the check)
                self.app = _RestorePath(self.app)
            scope["path"], scope[_RAW_PATH] = endpoint, raw
            try:
                await _original(self, scope, receive, send)
            finally:
                scope["path"] = raw
                scope.pop(_RAW_PATH, None)

        cls.__call__ = __call__
        cls._fusion_patched = True


# ---- our own metrics --------------------------------------------------------------------------------


class Bounded:
    """A labelled Prometheus metric (Counter, Gauge, Histogram) whose every label takes at most
    `max_values` distinct values in this process; later new values are recorded as `OTHER` (and
    logged once per label). `labels(...)` as prometheus_client's; anything else is the metric's."""

    def __init__(self, metric, max_values: int = MAX_LABEL_VALUES):
        self._metric = metric
        self._names: tuple[str, ...] = tuple(metric._labelnames)
        self._max = max_values
        self._seen: list[set[str]] = [set() for _ in self._names]
        self._lock = threading.Lock()

    def labels(self, *values, **by_name):
        if by_name:
            values = tuple(by_name[n] for n in self._names)
        if len(values) != len(self._names):
            raise ValueError(f"expected {len(self._names)} label values {self._names}; got {len(values)}")
        out = []
        for i, value in enumerate(values):
            value, seen = str(value), self._seen[i]
            if value not in seen:
                with self._lock:
                    if value in seen:  # another thread added it meanwhile
                        pass
                    elif len(seen) < self._max:
                        seen.add(value)
                    else:
                        if OTHER not in seen:
                            seen.add(OTHER)
                            log.warning("metric %s: label '%s' met more than %d distinct values; recording the rest as '%s'",
                                        self._metric._name, self._names[i], self._max, OTHER)
                        value = OTHER
            out.append(value)
        return self._metric.labels(*out)

    def __getattr__(self, name):
        return getattr(self._metric, name)


# ---- the service-wide metrics -----------------------------------------------------------------------
# Counted by service/ab.py (per-variant traffic, latency, agreement, feedback, cascade, shadow runs),
# service/members.py (DEGRADED), service/app.py and service/traffic.py (ERRORS) and the bundle holder
# (BUNDLE). Their names and labels are an interface: deploy/monitoring/grafana-dashboard.json and the
# PromQL in deploy/README.md read them (tests/test_deploy.py checks both against this registry).

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
# the candidate's share of routed traffic under FUSION_ROLLOUT (service/rollout.py); every worker sets the
# stored stage's percent when it follows it: the most recent write is the decision (one series per variant)
ROLLOUT_PERCENT = Gauge("fusion_rollout_percent", "Progressive rollout: the candidate's percent of routed traffic",
                        ["variant"], multiprocess_mode="livemostrecent")
# The anytime-valid verdict of each variant against the ensemble (service/ab.py, fusion/sequential.py), set
# whenever a worker computes /ab/report (the dashboard's polls, each rollout evaluation): the confidence
# sequence's bounds, the estimate and the threshold the lower bound must exceed (bound: low | high |
# estimate | threshold; fractions: the accuracy difference, or the agreement rate without labels), and
# the decision as a number (DECISION_VALUES). With a shared store every worker computes the same figures.
AB_BOUND = Gauge("fusion_ab_bound", "A/B confidence sequence against the ensemble: current bound, estimate or threshold",
                 ["variant", "bound"], multiprocess_mode="livemostrecent")
AB_DECISION = Gauge("fusion_ab_decision", "A/B verdict against the ensemble: -1 inferior, 0 collecting, 1 non-inferior, 2 superior",
                    ["variant"], multiprocess_mode="livemostrecent")
DECISION_VALUES = {"inferior": -1, "collecting": 0, "non-inferior": 1, "superior": 2}  # the decision's first word
# The shared A/B store (service/abstore.py, issue 20): what reached it late (spooled while it was
# unreachable, replayed) and what never will (lost, by reason: queue_full, spool_full, spool_unreadable).
AB_STORE_LOST = Counter("fusion_ab_store_lost", "A/B observations that never reached the store, by reason", ["reason"])
AB_STORE_SPOOLED = Counter("fusion_ab_store_spooled", "A/B observations spooled to local disk while the store was unreachable")
AB_STORE_REPLAYED = Counter("fusion_ab_store_replayed", "Spooled A/B observations written to the store once it answered")
AB_STORE_WRITE_ERRORS = Counter("fusion_ab_store_write_errors", "Batched writes to the A/B store that failed (then spooled)")
AB_STORE_WRITER_ERRORS = Counter("fusion_ab_store_writer_errors", "Unexpected errors in the A/B store's writer thread "
                                  "(e.g. a malformed operation): logged, the batch skipped, the writer goes on")
# Remote members (service/remote.py, issue 19), by member name (the bundle's): latency of successful calls,
# failed calls by reason (connection | deadline | status | answer | mismatch | breaker_open), and the circuit
# breaker's state (0 closed, 1 half-open, 2 open)
REMOTE_LATENCY = Histogram("fusion_remote_latency_seconds", "Remote member call latency (successful calls), by member",
                           ["member"], buckets=LATENCY._upper_bounds[:-1])
REMOTE_ERRORS = Counter("fusion_remote_errors", "Failed remote member calls, by member and reason", ["member", "reason"])
REMOTE_BREAKER = Gauge("fusion_remote_breaker_state", "Remote member circuit breaker: 0 closed, 1 half-open, 2 open",
                       ["member"], multiprocess_mode="livemostrecent")
REMOTE_LATENCY, REMOTE_ERRORS, REMOTE_BREAKER = (Bounded(m) for m in (REMOTE_LATENCY, REMOTE_ERRORS, REMOTE_BREAKER))
# Label values (issue 13, finding 2): variant and member names are the served bundle's (a request's
# variant is checked against it before any metric is touched), status is the code we answer with,
# reason is "queue_full" or an exception class name, the rest are literals; none is a client's string.
# Bounded() holds each label to MAX_LABEL_VALUES values per process anyway ("other" beyond). BUNDLE is
# left unbounded: one version per hot swap (admin only), and "other" would hide which one is served.
REQUESTS, ROWS, ERRORS, LATENCY, SHADOW_LATENCY, AGREEMENT, FEEDBACK, SHADOW_FAILURES, DEGRADED = (
    Bounded(m) for m in (REQUESTS, ROWS, ERRORS, LATENCY, SHADOW_LATENCY, AGREEMENT, FEEDBACK, SHADOW_FAILURES, DEGRADED))
AB_STORE_LOST = Bounded(AB_STORE_LOST)  # reason: four literals
AB_BOUND, AB_DECISION = Bounded(AB_BOUND), Bounded(AB_DECISION)  # variant: the bundle's; bound: four literals
