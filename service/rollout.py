"""Progressive rollout: move traffic to a candidate variant in stages, roll it back on bad evidence.

`FUSION_ROLLOUT="distilled:1,5,25,50,100"` gives the candidate 1 % of the routed traffic, then 5 %, ...
then 100 %. One stage advances when the candidate's verdict against the ensemble (the anytime-valid
non-inferiority test in `/ab/report`, fusion/sequential.py) says `non-inferior` or `superior`, the
stage has lasted `min_stage_s` and served the candidate `min_stage_requests` requests, and the
guardrails hold (candidate error rate, candidate/ensemble p99 latency; both from the report, so with a
shared store every worker and replica judges the same fleet-wide figures). An `inferior` verdict or a
guardrail breach rolls the candidate back to 0 % and records why. An admin can pause, resume or abort.

Three parts, one concept each:
- `decide(state, observation, limits, now)`: pure; the next state (or the same object: no change).
- the state store: `rollout_get(name) -> (version, state) | None` and `rollout_cas(name, expected, state)`
  (expected 0 = create). The shared A/B store provides them on every backend (service/abstore.py: SQLite
  for the workers of a host, PostgreSQL for replicas); `MemoryRolloutState` is the fallback with the same
  semantics when there is none (FUSION_AB_STORE=memory: one process).
- `RolloutController`: what a worker runs every `period_s`: read the stored state, apply its percent to
  the router when it changed, and (when running) decide on this worker's report and compare-and-set.
  No leader: every worker may decide; a loser of the CAS re-reads and follows the winner, so all
  workers and replicas apply one decision and a stage advances once however many evaluate it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol

from fusion.errors import ConfigError, InputError, UnavailableError
from service.metrics import ROLLOUT_PERCENT

log = logging.getLogger("fusion.service")

ENSEMBLE = "ensemble"

# statuses: running advances stage by stage; paused holds the current percent; the rest are final
RUNNING, PAUSED, COMPLETED, ROLLED_BACK, ABORTED = "running", "paused", "completed", "rolled_back", "aborted"
FINAL = (COMPLETED, ROLLED_BACK, ABORTED)
ACTIONS = ("pause", "resume", "abort")

# the candidate's verdict, normalised from the report's text (fusion/sequential.py words them)
COLLECTING, NON_INFERIOR, INFERIOR, SUPERIOR = "collecting", "non-inferior", "inferior", "superior"
MAX_HISTORY = 100  # transitions kept in the state (the oldest go first; `history_dropped` counts them)


# ---- the plan: FUSION_ROLLOUT ---------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPlan:
    """The candidate and its stages (percent of the routed traffic, increasing, the last 100)."""

    candidate: str
    stages: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> "RolloutPlan | None":
        """`"distilled:1,5,25,50,100"` -> RolloutPlan("distilled", (1, 5, 25, 50, 100)); empty -> None."""
        if not text.strip():
            return None
        name, sep, rest = text.strip().partition(":")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise ConfigError(f"expected 'variant:p1,p2,...,100' (e.g. distilled:1,5,25,50,100); got {text!r:.80}")
        if name == ENSEMBLE:
            raise ConfigError(f"expected a candidate other than '{ENSEMBLE}' (the ensemble is what it replaces); got {text!r:.80}")
        try:
            stages = tuple(float(p) for p in rest.split(","))
        except ValueError:
            raise ConfigError(f"expected comma-separated percentages after '{name}:'; got {rest!r:.80}") from None
        bad = [p for p in stages if not 0.0 < p <= 100.0]
        if bad:
            raise ConfigError(f"expected stage percentages in (0, 100]; got {bad}")
        if any(b <= a for a, b in zip(stages, stages[1:])):
            raise ConfigError(f"expected strictly increasing stage percentages; got {list(stages)}")
        if stages[-1] != 100.0:
            raise ConfigError(f"expected the last stage to be 100 (the candidate takes all traffic); got {stages[-1]:g}")
        if len(stages) < 2:  # 100 % at once has no stage that collects evidence, and could never complete
            raise ConfigError(f"expected at least 2 stages, the first below 100 (e.g. {name}:1,5,25,50,100); got {list(stages)}")
        return cls(name, stages)

    @property
    def name(self) -> str:
        """The plan's name: the candidate and its stage list."""
        return f"{self.candidate}:{','.join(f'{p:g}' for p in self.stages)}"

    def key(self, bundle_version: str) -> str:
        """The state's key in the store: one rollout per plan and bundle version (a content address: a new
        candidate file is a new version), so a swap or redeploy to a new candidate starts at the first stage
        instead of inheriting the old candidate's state; redeploying the same bundle continues it."""
        return f"{self.name}@{bundle_version}"

    def check_against(self, available: set[str]) -> None:
        """ConfigError unless the bundle serves the candidate and the ensemble (engine construction, swaps)."""
        missing = sorted({self.candidate, ENSEMBLE} - available)
        if missing:
            raise ConfigError(f"FUSION_ROLLOUT: expected variants the bundle serves; {missing} are not among {sorted(available)}")


@dataclass(frozen=True)
class RolloutLimits:
    """Guardrails and the pace of a rollout (service/config.py reads them: FUSION_ROLLOUT_*)."""

    max_error_rate: float = 0.01  # candidate requests that failed / all its requests at the stage
    max_p99_ratio: float = 2.0  # candidate p99 latency / ensemble p99 latency; 0 = no latency guardrail
    min_stage_s: float = 300.0  # a stage lasts at least this long...
    min_stage_requests: int = 100  # ...and serves the candidate this many requests before it advances or a guardrail is judged
    period_s: float = 10.0  # how often each worker evaluates


# ---- the state ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutState:
    """What the store holds (as `to_dict()`): the stage, its percent, the status and every transition."""

    candidate: str
    stages: tuple[float, ...]
    stage: int = 0  # index into stages
    percent: float = 0.0  # the candidate's share of routed traffic now (0 after a rollback or abort)
    status: str = RUNNING
    since: float = 0.0  # time of the last transition (a stage's minimum time counts from it)
    reason: str = ""
    history: tuple[dict, ...] = ()
    history_dropped: int = 0

    @classmethod
    def start(cls, plan: RolloutPlan, now: float) -> "RolloutState":
        s = cls(plan.candidate, plan.stages, 0, plan.stages[0], RUNNING, now)
        return s._moved(now, stage=0, percent=plan.stages[0], status=RUNNING, reason="rollout started")

    def _moved(self, now: float, *, reason: str, **changes) -> "RolloutState":
        new = replace(self, since=now, reason=reason, **changes)
        entry = {"time": now, "stage": new.stage, "percent": new.percent, "status": new.status, "reason": reason,
                 "from_percent": self.percent if self.history else None}
        history = (*self.history, entry)
        dropped = max(0, len(history) - MAX_HISTORY)
        return replace(new, history=history[dropped:], history_dropped=self.history_dropped + dropped)

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "stages": list(self.stages), "stage": self.stage, "percent": self.percent,
                "status": self.status, "since": self.since, "reason": self.reason, "history": list(self.history),
                "history_dropped": self.history_dropped}

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutState":
        return cls(d["candidate"], tuple(float(p) for p in d["stages"]), int(d["stage"]), float(d["percent"]),
                   str(d["status"]), float(d["since"]), str(d.get("reason", "")), tuple(d.get("history", ())),
                   int(d.get("history_dropped", 0)))


@dataclass(frozen=True)
class Observation:
    """What a worker saw of the candidate at the current stage (its report, less what it had at stage entry)."""

    verdict: str = COLLECTING  # one of COLLECTING, NON_INFERIOR, INFERIOR, SUPERIOR
    stage_requests: int = 0  # candidate requests answered at this stage (the report's: every worker's with a shared store)
    stage_errors: int = 0  # candidate requests that failed at this stage (the report's `outcomes`: every worker's too)
    stage_answered: int = 0  # candidate requests answered at this stage, the error rate's other part (as stage_errors)
    p99_ratio: float | None = None  # candidate p99 / ensemble p99 (None: too few samples of either)
    detail: str = ""  # the report's verdict text, quoted in a rollback reason


def decide(state: RolloutState, obs: Observation, limits: RolloutLimits, now: float) -> RolloutState:
    """The next state of a running rollout (the same object when nothing changes). Pure.

    Order: an `inferior` verdict rolls back at once (the sequential test is valid whenever read); the
    error rate is judged once `min_stage_requests` candidate requests were seen at the stage (answered or
    failed: one early failure at 1 % is no rate; the report's `outcomes`, which with a shared store sum
    every worker's and replica's requests, so failures on one worker trip any worker's evaluator), the latency ratio whenever the report has enough samples of
    both; an advance needs a non-inferior (or superior) verdict, the stage's minimum time and
    `min_stage_requests` candidate requests answered (all workers'), and the guardrails holding. The
    last stage (100 %) completes.
    """
    if state.status != RUNNING:
        return state
    if obs.verdict == INFERIOR:
        return _rollback(state, now, f"inferior to the ensemble: {obs.detail or INFERIOR}")
    attempts = obs.stage_answered + obs.stage_errors
    if attempts >= limits.min_stage_requests and obs.stage_errors / attempts > limits.max_error_rate:
        return _rollback(state, now, f"guardrail: error rate {obs.stage_errors / attempts:.4f} ({obs.stage_errors} of {attempts} "
                                     f"requests at {state.percent:g} %) above FUSION_ROLLOUT_MAX_ERROR_RATE={limits.max_error_rate:g}")
    if limits.max_p99_ratio > 0 and obs.p99_ratio is not None and obs.p99_ratio > limits.max_p99_ratio:
        return _rollback(state, now, f"guardrail: p99 latency {obs.p99_ratio:.2f}x the ensemble's, above "
                                     f"FUSION_ROLLOUT_MAX_P99_RATIO={limits.max_p99_ratio:g}")
    if (obs.verdict not in (NON_INFERIOR, SUPERIOR) or obs.stage_requests < limits.min_stage_requests
            or now - state.since < limits.min_stage_s):
        return state  # hold: collecting evidence, or the stage is too young
    nxt = state.stage + 1
    if nxt >= len(state.stages):
        return state  # already at the last stage (a completed rollout is not running)
    percent = state.stages[nxt]
    status = COMPLETED if nxt == len(state.stages) - 1 else RUNNING
    why = f"{obs.verdict} at {state.percent:g} % after {obs.stage_requests} candidate requests; guardrails held"
    return state._moved(now, stage=nxt, percent=percent, status=status, reason=why)


def _rollback(state: RolloutState, now: float, reason: str) -> RolloutState:
    return state._moved(now, percent=0.0, status=ROLLED_BACK, reason=reason)


def act(state: RolloutState, action: str, now: float) -> RolloutState:
    """An admin action (POST /admin/rollout): pause (running -> paused, the percent held), resume
    (paused -> running; the stage's minimum time restarts), abort (any unfinished -> 0 %, final).
    InputError (400) for an unknown action or one the status does not allow, saying which."""
    if action not in ACTIONS:
        raise InputError(f"expected 'action' to be one of {list(ACTIONS)}; got {action!r:.60}")
    allowed = {"pause": (RUNNING,), "resume": (PAUSED,), "abort": (RUNNING, PAUSED)}[action]
    if state.status not in allowed:
        raise InputError(f"cannot {action} a rollout that is {state.status}; {action} needs it {' or '.join(allowed)}")
    if action == "pause":
        return state._moved(now, status=PAUSED, reason="paused by an admin")
    if action == "resume":
        return state._moved(now, status=RUNNING, reason="resumed by an admin")
    return state._moved(now, percent=0.0, status=ABORTED, reason="aborted by an admin")


# ---- reading the report ----------------------------------------------------------------------------


def normalise_verdict(text: str | None) -> str:
    """The report's verdict text -> COLLECTING / NON_INFERIOR / INFERIOR / SUPERIOR. Anything else
    (the fixed-sample test's "better/worse than", absent) is COLLECTING: never a reason to move."""
    t = (text or "").strip().lower()
    for word in (NON_INFERIOR, INFERIOR, SUPERIOR):  # "non-inferior" before "inferior"
        if t.startswith(word):
            return word
    return COLLECTING


VERDICT_KEYS = ("non_inferiority", "sequential", "vs_ensemble")  # where a variant's report entry may carry it


def verdict_text(entry: dict) -> str | None:
    """The first anytime-valid verdict found in a variant's report entry (a `verdict` under one of VERDICT_KEYS,
    or the entry's own `verdict`)."""
    for key in VERDICT_KEYS:
        sub = entry.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("verdict"), str) and normalise_verdict(sub["verdict"]) != COLLECTING:
            return sub["verdict"]
    v = entry.get("verdict")
    return v if isinstance(v, str) else None


def p99_ratio(report: dict, candidate: str, min_samples: int) -> float | None:
    variants = report.get("variants") or {}
    c, e = (variants.get(n, {}).get("latency_ms") or {} for n in (candidate, ENSEMBLE))
    if min(c.get("samples") or 0, e.get("samples") or 0) < max(1, min_samples) or not c.get("p99") or not e.get("p99"):
        return None
    return c["p99"] / e["p99"]


# ---- the state stores (fallbacks of service/abstore.py's) -------------------------------------------


class RolloutStore(Protocol):
    def rollout_get(self, name: str) -> tuple[int, dict] | None: ...

    def rollout_cas(self, name: str, expected_version: int, state: dict) -> bool: ...


class MemoryRolloutState:
    """The store's two rollout methods in one process's memory (tests; a single worker without a shared store)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[int, dict]] = {}

    def rollout_get(self, name: str) -> tuple[int, dict] | None:
        with self._lock:
            row = self._rows.get(name)
            return None if row is None else (row[0], json.loads(json.dumps(row[1])))

    def rollout_cas(self, name: str, expected_version: int, state: dict) -> bool:
        data = json.loads(json.dumps(state))  # a copy, and JSON-only as a database would hold it
        with self._lock:
            version = self._rows.get(name, (0, None))[0]
            if version != expected_version:
                return False
            self._rows[name] = (version + 1, data)
            return True


# ---- one worker's evaluator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Applied:
    """The state (its key: plan and bundle version) and store version this worker applied last, and the
    candidate's counts then (the stage's baseline): requests, answered and failed requests in the report
    (fleet-wide with a shared store)."""

    key: str = ""
    version: int = 0
    counts: tuple[int, int, int] = (0, 0, 0)


class RolloutController:
    """Follows the stored rollout state in one worker and takes part in deciding it.

    `report()` gives the `/ab/report` this worker answers (the served `bundle_version`: the state's key; variants,
    latency, verdicts, `outcomes`: answered and failed requests), `apply(percent)` sets the router's split; `clock` is
    time.time (tests pass their own). `tick()` is one evaluation; `start()` runs it every
    `limits.period_s` in a daemon thread.
    """

    def __init__(self, plan: RolloutPlan, limits: RolloutLimits, store: RolloutStore, *,
                 report: Callable[[], dict], apply: Callable[[float], None], clock: Callable[[], float] = time.time):
        self.plan, self.limits, self.store = plan, limits, store
        self._report, self._apply, self._clock = report, apply, clock
        self._applied = _Applied()
        self._lock = threading.Lock()  # one tick or admin action at a time in this worker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # the stored state of the served bundle version, created on first read
    def _read(self, key: str) -> tuple[int, RolloutState]:
        row = self.store.rollout_get(key)
        if row is None:
            self.store.rollout_cas(key, 0, RolloutState.start(self.plan, self._clock()).to_dict())
            row = self.store.rollout_get(key)  # ours, or a faster worker's
            if row is None:
                raise UnavailableError(f"rollout {key}: expected its state in the store after creating it; found none")
        return row[0], RolloutState.from_dict(row[1])

    def _key(self, report: dict) -> str | None:
        """The state's key for the served bundle version (None: no bundle served yet)."""
        version = report.get("bundle_version")
        return self.plan.key(str(version)) if version else None

    def _counts(self, report: dict | None = None) -> tuple[int, int, int]:
        """The candidate's (requests, answered, failed) in the report: with a shared store, every worker's
        and replica's (service/ab.py `outcomes`), so any evaluator sees failures wherever they happened."""
        entry = ((report or self._report()).get("variants") or {}).get(self.plan.candidate) or {}
        outcomes = entry.get("outcomes") or {}
        return int(entry.get("requests") or 0), int(outcomes.get("answered") or 0), int(outcomes.get("failed") or 0)

    def _follow(self, key: str, version: int, state: RolloutState, counts: tuple[int, int, int] | None = None) -> None:
        """Apply a stored state this worker has not applied yet; its counts become the stage baseline."""
        if (key, version) == (self._applied.key, self._applied.version):
            return
        counts = counts if counts is not None else self._counts()
        self._apply(state.percent)
        ROLLOUT_PERCENT.labels(self.plan.candidate).set(state.percent)
        if self._applied.version:
            log.info("rollout %s: %g %% (%s): %s", key, state.percent, state.status, state.reason)
        self._applied = _Applied(key, version, counts)

    def observe(self, report: dict, counts: tuple[int, int, int]) -> Observation:
        entry = (report.get("variants") or {}).get(self.plan.candidate) or {}
        text = verdict_text(entry)
        requests, answered, failed = (max(0, now - then) for now, then in zip(counts, self._applied.counts))
        return Observation(
            verdict=normalise_verdict(text), stage_requests=requests, stage_errors=failed, stage_answered=answered,
            p99_ratio=p99_ratio(report, self.plan.candidate, self.limits.min_stage_requests), detail=text or "",
        )

    def tick(self) -> RolloutState:
        """Read the stored state, follow it, and (while running) decide and compare-and-set; a lost CAS
        re-reads and follows the winner. Returns the state this worker now follows."""
        with self._lock:
            report = self._report()
            key = self._key(report)
            if key is None:  # no bundle served yet: nothing to roll out
                return replace(RolloutState.start(self.plan, self._clock()), percent=0.0, reason="no bundle served yet")
            counts = self._counts(report)
            version, state = self._read(key)
            self._follow(key, version, state, counts)
            if state.status != RUNNING:
                return state
            new = decide(state, self.observe(report, counts), self.limits, self._clock())
            if new is state:
                return state
            if self.store.rollout_cas(key, version, new.to_dict()):
                self._follow(key, version + 1, new, counts)
                return new
            version, state = self._read(key)  # another worker decided first: follow it
            self._follow(key, version, state)
            return state

    def act(self, action: str) -> RolloutState:
        """An admin action, compare-and-set against concurrent evaluators (retried on a lost race)."""
        with self._lock:
            key = self._key(self._report())
            if key is None:
                raise UnavailableError(f"rollout {self.plan.name}: no bundle is served yet; expected one before {action}")
            for _ in range(20):
                version, state = self._read(key)
                new = act(state, action, self._clock())
                if self.store.rollout_cas(key, version, new.to_dict()):
                    self._follow(key, version + 1, new)
                    return new
            raise UnavailableError(f"rollout {key}: the state kept changing under {action}; expected it to settle")

    def state(self) -> dict:
        """The stored state this worker follows (its bundle version's) as `/ab/report` shows it (without creating it)."""
        key = self._applied.key
        row = self.store.rollout_get(key) if key else None
        state = RolloutState.from_dict(row[1]).to_dict() if row else RolloutState.start(self.plan, self._clock()).to_dict()
        return {"name": key or self.plan.name, "bundle_version": key.rpartition("@")[2] if key else None, **state,
                "store_version": row[0] if row else 0, "applied_version": self._applied.version,
                **({"last_error": self.last_error} if self.last_error else {})}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fusion-rollout", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - a store outage must not end the evaluator; retried next period
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("rollout %s: evaluation failed (retried in %gs): %s", self.plan.candidate, self.limits.period_s, self.last_error)
            self._stop.wait(self.limits.period_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


def split(policy_weights: dict[str, float], candidate: str, percent: float) -> dict[str, float]:
    """The routing weights for `percent` % to the candidate: it and the ensemble share what they had
    together (all of it when neither had any), other variants keep their share."""
    others = {k: v for k, v in policy_weights.items() if k not in (candidate, ENSEMBLE)}
    pool = 1.0 - sum(others.values()) if others else 1.0
    if pool <= 0:
        raise ConfigError(f"FUSION_ROLLOUT: expected the ensemble and {candidate} to have a share of the traffic; "
                          f"other variants take all of it ({others})")
    return {**others, ENSEMBLE: pool * (100.0 - percent) / 100.0, candidate: pool * percent / 100.0}


__all__ = ["ACTIONS", "MemoryRolloutState", "Observation", "RolloutController", "RolloutLimits", "RolloutPlan",
           "RolloutState", "act", "decide", "split"]
