"""Progressive rollout (service/rollout.py, issue 20 part 3): the plan, the pure decision function
exhaustively against a truth table written here, admin actions, the state stores' compare-and-set,
evaluators racing (one advance however many decide), a worker following the stored stage, the engine
and /admin/rollout in process, and an end-to-end run over two `bentoml serve` processes sharing a
state file: a good candidate goes 1 % -> 100 %, a bad one back to 0 %.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from fusion.errors import ConfigError, InputError
from service import config
from service.rollout import (ABORTED, ACTIONS, COLLECTING, COMPLETED, INFERIOR, NON_INFERIOR, PAUSED, ROLLED_BACK, RUNNING,
                             SUPERIOR, MemoryRolloutState, Observation, RolloutController, RolloutLimits, RolloutPlan,
                             RolloutState, act, decide, normalise_verdict, split, verdict_text)

PLAN = RolloutPlan("distilled", (1.0, 5.0, 25.0, 50.0, 100.0))
LIMITS = RolloutLimits(max_error_rate=0.05, max_p99_ratio=2.0, min_stage_s=60.0, min_stage_requests=100, period_s=1.0)
T0 = 1_000_000.0


# ---- the plan and its settings -------------------------------------------------------------------


def test_plan_parses_and_names_its_state():
    plan = RolloutPlan.parse(" distilled : 1, 5,25,50,100 ")
    assert plan == PLAN and plan.name == "distilled:1,5,25,50,100"
    assert RolloutPlan.parse("") is None and RolloutPlan.parse("  ") is None
    assert RolloutPlan.parse("merged:0.5,100").stages == (0.5, 100.0)


@pytest.mark.parametrize("text, expected", [
    ("distilled", "expected 'variant:p1,p2,...,100'"),
    (":1,100", "expected 'variant:p1,p2,...,100'"),
    ("distilled:", "expected 'variant:p1,p2,...,100'"),
    ("distilled:1,x,100", "expected comma-separated percentages"),
    ("distilled:5,1,100", "expected strictly increasing stage percentages; got [5.0, 1.0, 100.0]"),
    ("distilled:5,5,100", "strictly increasing"),
    ("distilled:1,50", "expected the last stage to be 100"),
    ("distilled:0,100", "expected stage percentages in (0, 100]; got [0.0]"),
    ("distilled:1,150", "expected stage percentages in (0, 100]; got [150.0]"),
    ("distilled:-1,100", "in (0, 100]"),
    ("ensemble:1,100", "expected a candidate other than 'ensemble'"),
    # 100 at once: no stage collects evidence, and a one-stage plan never completes (review s2)
    ("distilled:100", "expected at least 2 stages, the first below 100 (e.g. distilled:1,5,25,50,100); got [100.0]"),
])
def test_bad_plans_are_refused_naming_the_variable(text, expected):
    with pytest.raises(ConfigError, match="^FUSION_ROLLOUT: ") as e:
        config.load({"FUSION_ROLLOUT": text})
    assert expected in str(e.value)


def test_rollout_settings_reach_the_config():
    cfg = config.load({"FUSION_ROLLOUT": "distilled:10,100", "FUSION_ROLLOUT_MAX_ERROR_RATE": "0.2",
                       "FUSION_ROLLOUT_MAX_P99_RATIO": "0", "FUSION_ROLLOUT_MIN_STAGE_S": "1.5",
                       "FUSION_ROLLOUT_MIN_STAGE_REQUESTS": "7", "FUSION_ROLLOUT_PERIOD_S": "0.25"}).rollout
    assert cfg.plan == RolloutPlan("distilled", (10.0, 100.0))
    assert cfg.limits == RolloutLimits(0.2, 0.0, 1.5, 7, 0.25)
    assert config.load({}).rollout.plan is None and config.load({}).rollout.limits == RolloutLimits()


@pytest.mark.parametrize("name, value, expected", [
    ("FUSION_ROLLOUT_MAX_ERROR_RATE", "1.5", "a fraction in [0, 1]"),
    ("FUSION_ROLLOUT_MAX_ERROR_RATE", "-0.1", "a fraction in [0, 1]"),
    ("FUSION_ROLLOUT_MAX_P99_RATIO", "x", "a non-negative ratio"),
    ("FUSION_ROLLOUT_MIN_STAGE_REQUESTS", "0", "a positive integer"),
    ("FUSION_ROLLOUT_PERIOD_S", "0", "a positive number of seconds"),
])
def test_bad_limits_are_refused_naming_the_variable(name, value, expected):
    with pytest.raises(ConfigError, match="^" + re.escape(f"{name}: expected {expected}")):
        config.load({name: value})


def test_unknown_candidate_is_refused_against_the_bundle():
    with pytest.raises(ConfigError, match=r"FUSION_ROLLOUT: .*\['distilled'\] are not among \['ensemble', 'mlp_0'\]"):
        PLAN.check_against({"ensemble", "mlp_0"})
    PLAN.check_against({"ensemble", "distilled", "mlp_0"})


# ---- the decision function ------------------------------------------------------------------------


def running(stage: int = 0, since: float = T0) -> RolloutState:
    s = RolloutState.start(PLAN, since)
    for i in range(stage):
        s = s._moved(since, stage=i + 1, percent=PLAN.stages[i + 1], status=RUNNING, reason="test")
    return s


def expected_outcome(verdict, requests, answered, errors, ratio, age, limits=LIMITS) -> str:
    """The rules as the issue states them, written independently of decide(): 'rollback', 'advance' or 'hold'.
    requests: the candidate's at the stage in the (shared) report; answered/errors: this worker's own."""
    if verdict == INFERIOR:
        return "rollback"
    n = answered + errors
    if n >= limits.min_stage_requests and errors / n > limits.max_error_rate:
        return "rollback"
    if limits.max_p99_ratio and ratio is not None and ratio > limits.max_p99_ratio:
        return "rollback"
    if verdict in (NON_INFERIOR, SUPERIOR) and requests >= limits.min_stage_requests and age >= limits.min_stage_s:
        return "advance"
    return "hold"


CASES = list(itertools.product(
    (COLLECTING, NON_INFERIOR, INFERIOR, SUPERIOR),  # verdict
    (0, 99, 100, 500),  # candidate requests at the stage (report)
    (0, 95, 96, 500),  # answered here
    (0, 4, 5, 30),  # failed here
    (None, 0.5, 2.0, 2.01, 10.0),  # p99 ratio
    (0.0, 59.9, 60.0, 3600.0),  # stage age (s)
    range(len(PLAN.stages) - 1),  # stage (not the last: that one is completed, never running)
))


def test_decide_matches_the_rules_on_every_combination():
    counts = {"advance": 0, "hold": 0, "rollback": 0}
    for verdict, requests, answered, errors, ratio, age, stage in CASES:
        state = running(stage)
        obs = Observation(verdict, stage_requests=requests, stage_answered=answered, stage_errors=errors, p99_ratio=ratio,
                          detail=f"{verdict} (test)")
        new = decide(state, obs, LIMITS, T0 + age)
        want = expected_outcome(verdict, requests, answered, errors, ratio, age)
        counts[want] += 1
        case = (verdict, requests, answered, errors, ratio, age, stage)
        if want == "hold":
            assert new is state, case
            continue
        assert new.history[:-1] == state.history and new.history[-1]["time"] == T0 + age, case
        assert new.since == T0 + age and new.history[-1]["reason"] == new.reason != "", case
        assert new.history[-1]["from_percent"] == state.percent, case
        if want == "rollback":
            assert (new.status, new.percent, new.stage) == (ROLLED_BACK, 0.0, stage), case
        else:
            last = stage + 1 == len(PLAN.stages) - 1
            assert (new.stage, new.percent) == (stage + 1, PLAN.stages[stage + 1]), case
            assert new.status == (COMPLETED if last else RUNNING), case
    assert all(counts.values()), counts  # the table reaches every outcome


def test_rollback_reasons_say_why():
    s = running(2)
    r = decide(s, Observation(INFERIOR, detail="inferior (keep the ensemble): upper bound -2.1 pp"), LIMITS, T0 + 1)
    assert r.reason == "inferior to the ensemble: inferior (keep the ensemble): upper bound -2.1 pp"
    r = decide(s, Observation(NON_INFERIOR, stage_requests=200, stage_answered=190, stage_errors=10, p99_ratio=1.0), LIMITS, T0 + 1)
    assert r.status == RUNNING and r.stage == 2  # 10/200 = 0.05 is not above 0.05 (the stage is 1 s old: no advance)
    r = decide(s, Observation(NON_INFERIOR, stage_requests=400, stage_answered=180, stage_errors=20, p99_ratio=1.0), LIMITS, T0 + 1)
    assert r.reason == ("guardrail: error rate 0.1000 (20 of 200 requests at 25 %) above FUSION_ROLLOUT_MAX_ERROR_RATE=0.05")
    r = decide(s, Observation(COLLECTING, p99_ratio=3.5), LIMITS, T0 + 1)
    assert r.status == ROLLED_BACK and r.reason == "guardrail: p99 latency 3.50x the ensemble's, above FUSION_ROLLOUT_MAX_P99_RATIO=2"
    off = RolloutLimits(max_p99_ratio=0.0, min_stage_s=0, min_stage_requests=1)
    obs = Observation(NON_INFERIOR, stage_requests=200, stage_answered=200, p99_ratio=50.0)
    assert decide(s, obs, off, T0 + 1).stage == 3  # 0: no latency guardrail


def test_a_good_candidate_walks_every_stage_to_completed():
    s, t = RolloutState.start(PLAN, T0), T0
    assert (s.stage, s.percent, s.status, len(s.history)) == (0, 1.0, RUNNING, 1)
    seen = [s.percent]
    while s.status == RUNNING:
        t += LIMITS.min_stage_s
        s = decide(s, Observation(NON_INFERIOR, stage_requests=LIMITS.min_stage_requests, p99_ratio=1.0), LIMITS, t)
        seen.append(s.percent)
    assert seen == list(PLAN.stages) and s.status == COMPLETED
    assert [h["percent"] for h in s.history] == list(PLAN.stages)
    assert decide(s, Observation(INFERIOR), LIMITS, t + 1) is s  # finished: nothing moves it


@pytest.mark.parametrize("status", [PAUSED, COMPLETED, ROLLED_BACK, ABORTED])
def test_only_a_running_rollout_is_decided(status):
    s = running(1)._moved(T0, status=status, reason="test")
    for obs in (Observation(INFERIOR), Observation(NON_INFERIOR, stage_requests=10_000, p99_ratio=1.0),
                Observation(COLLECTING, stage_answered=1000, stage_errors=1000, p99_ratio=99.0)):
        assert decide(s, obs, LIMITS, T0 + 10_000) is s


def test_history_is_bounded_and_counts_what_it_dropped():
    s = running(0)
    for i in range(150):
        s = s._moved(T0 + i, status=PAUSED if i % 2 == 0 else RUNNING, reason=f"t{i}")
    assert len(s.history) == 100 and s.history_dropped == 51 and s.history[-1]["reason"] == "t149"
    assert RolloutState.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# ---- admin actions ------------------------------------------------------------------------------------


def test_pause_resume_abort():
    s = running(2)
    p = act(s, "pause", T0 + 5)
    assert (p.status, p.percent, p.reason) == (PAUSED, 25.0, "paused by an admin")
    r = act(p, "resume", T0 + 9)
    assert (r.status, r.percent, r.since) == (RUNNING, 25.0, T0 + 9)  # the stage's minimum time restarts
    a = act(p, "abort", T0 + 10)
    assert (a.status, a.percent, a.stage) == (ABORTED, 0.0, 2)
    assert [h["status"] for h in a.history[-2:]] == [PAUSED, ABORTED]


@pytest.mark.parametrize("status, action, needs", [
    (RUNNING, "resume", "paused"), (PAUSED, "pause", "running"), (COMPLETED, "pause", "running"),
    (COMPLETED, "abort", "running or paused"), (ROLLED_BACK, "resume", "paused"), (ABORTED, "abort", "running or paused"),
])
def test_actions_the_status_does_not_allow_are_refused(status, action, needs):
    s = running(1)._moved(T0, status=status, reason="test")
    with pytest.raises(InputError, match=f"^cannot {action} a rollout that is {status}; {action} needs it {needs}$"):
        act(s, action, T0)


def test_an_unknown_action_lists_the_valid_ones():
    with pytest.raises(InputError, match=r"expected 'action' to be one of \['pause', 'resume', 'abort'\]; got 'restart'"):
        act(running(), "restart", T0)
    assert ACTIONS == ("pause", "resume", "abort")


# ---- verdicts from the report ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("non-inferior (can replace)", NON_INFERIOR), ("inferior (keep the ensemble)", INFERIOR), ("superior", SUPERIOR),
    ("collecting: 12 labelled rows", COLLECTING), (None, COLLECTING), ("", COLLECTING),
    # the fixed-sample test's words are no evidence of (non-)inferiority: never a reason to move
    ("worse than the ensemble (p = 0.01)", COLLECTING), ("no significant difference from the ensemble (p = 0.4)", COLLECTING),
])
def test_verdicts_are_normalised(text, expected):
    assert normalise_verdict(text) == expected


def test_the_sequential_verdict_is_preferred_to_the_fixed_sample_one():
    entry = {"vs_ensemble": {"verdict": "worse than the ensemble (p = 0.01)"},
             "non_inferiority": {"verdict": "non-inferior (can replace)"}}
    assert verdict_text(entry) == "non-inferior (can replace)"
    assert normalise_verdict(verdict_text({"vs_ensemble": {"verdict": "better than the ensemble"}})) == COLLECTING


def test_split_keeps_other_variants_share():
    assert split({"ensemble": 1.0}, "distilled", 5) == {"ensemble": 0.95, "distilled": 0.05}
    w = split({"ensemble": 0.6, "merged": 0.4}, "distilled", 25)
    assert w == pytest.approx({"merged": 0.4, "ensemble": 0.45, "distilled": 0.15})
    assert split(w, "distilled", 0) == pytest.approx({"merged": 0.4, "ensemble": 0.6, "distilled": 0.0})
    with pytest.raises(ConfigError, match="other variants take all of it"):
        split({"merged": 1.0}, "distilled", 5)


# ---- the state stores: compare-and-set ---------------------------------------------------------------------


def ab_store(path: Path):
    """The shared A/B store on SQLite (service/abstore.py): the rollout state's home in the server."""
    from service.abstore import ABStore, StoreConfig

    return ABStore(StoreConfig(url=f"sqlite:///{path}", state_dir=str(path.parent)))


@pytest.fixture(params=["memory", "abstore-sqlite"])
def store(request, tmp_path):
    """Our fallback and the shared store: the same compare-and-set semantics."""
    if request.param == "memory":
        yield MemoryRolloutState()
        return
    s = ab_store(tmp_path / "ab.db")
    yield s
    s.close()


def test_store_compare_and_set(store):
    assert store.rollout_get("r") is None
    assert store.rollout_cas("r", 1, {"a": 1}) is False  # nothing to update
    assert store.rollout_cas("r", 0, {"a": 1}) is True
    assert store.rollout_cas("r", 0, {"a": 2}) is False  # created already
    assert store.rollout_get("r") == (1, {"a": 1})
    assert store.rollout_cas("r", 2, {"a": 3}) is False and store.rollout_cas("r", 1, {"a": 3}) is True
    assert store.rollout_get("r") == (2, {"a": 3}) and store.rollout_get("other") is None


def test_store_cas_has_one_winner_among_threads(store):
    store.rollout_cas("r", 0, {"n": 0})
    barrier, wins = threading.Barrier(8), []

    def attempt(i):
        barrier.wait()
        wins.append(store.rollout_cas("r", 1, {"n": i}))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True] and store.rollout_get("r")[0] == 2


def test_the_shared_store_state_is_one_for_two_handles(tmp_path):
    a, b = ab_store(tmp_path / "s.db"), ab_store(tmp_path / "s.db")  # as two processes open it
    try:
        assert a.rollout_cas("r", 0, {"x": 1}) and b.rollout_get("r") == (1, {"x": 1})
        assert not a.rollout_cas("r", 0, {"x": 2}) and b.rollout_cas("r", 1, {"x": 3}) and a.rollout_get("r") == (2, {"x": 3})
    finally:
        a.close()
        b.close()


# ---- controllers: following the stored state, racing to decide ---------------------------------------------


class FakeWorker:
    """One worker's view: a report whose candidate entry we set (`requests`, and its `outcomes`: answered and
    failed requests, every worker's with a shared store), and the splits it applied."""

    def __init__(self, verdict="non-inferior (can replace)", requests=0, p99=(1.0, 1.0), barrier=None, version="v1"):
        self.verdict, self.requests, self.p99, self.version = verdict, requests, p99, version
        self.answered = self.failed = 0
        self.applied: list[float] = []
        self.barrier = barrier

    def report(self) -> dict:
        if self.barrier is not None:  # once: every worker has read the same stored version before any decides
            barrier, self.barrier = self.barrier, None
            barrier.wait(timeout=10)
        lat = lambda p: {"p50": p, "p95": p, "p99": p, "samples": 10_000}  # noqa: E731
        return {"bundle_version": self.version,
                "variants": {"ensemble": {"requests": 10_000, "latency_ms": lat(self.p99[1])},
                             "distilled": {"requests": self.requests, "latency_ms": lat(self.p99[0]),
                                           "outcomes": {"answered": self.answered, "failed": self.failed},
                                           "non_inferiority": {"verdict": self.verdict}}}}

    def controller(self, store, clock, limits=LIMITS) -> RolloutController:
        return RolloutController(PLAN, limits, store, report=self.report,
                                 apply=self.applied.append, clock=clock)


def test_a_worker_follows_the_stored_state_and_counts_from_the_stage_entry():
    store, now = MemoryRolloutState(), [T0]
    w = FakeWorker(requests=500)  # traffic before this stage does not count towards it
    c = w.controller(store, lambda: now[0])
    s = c.tick()
    assert (s.stage, s.percent, w.applied) == (0, 1.0, [1.0]) and store.rollout_get(PLAN.key("v1"))[0] == 1
    now[0] += 3600
    assert c.tick().stage == 0  # 0 candidate requests at this stage: hold
    w.requests += 99
    assert c.tick().stage == 0
    w.requests += 1
    s = c.tick()
    assert (s.stage, s.percent, w.applied) == (1, 5.0, [1.0, 5.0])
    assert c.state()["history"][-1]["reason"] == "non-inferior at 1 % after 100 candidate requests; guardrails held"
    w.failed, w.answered = 50, 49  # at the new stage: 50 of 99 failed: too few to judge yet
    assert c.tick().status == RUNNING
    w.answered += 1
    s = c.tick()
    assert (s.status, s.percent, w.applied[-1]) == (ROLLED_BACK, 0.0, 0.0) and "error rate 0.5000" in s.reason


def test_a_new_bundle_version_starts_a_new_rollout(store):
    """A hot swap or redeploy with a new candidate and the same FUSION_ROLLOUT starts at the first stage;
    it does not inherit the old candidate's completed state (review s2). The old version's row stays."""
    now = [T0]
    w = FakeWorker(requests=0)
    c = w.controller(store, lambda: now[0])
    for _ in PLAN.stages[1:]:
        c.tick()
        now[0] += 3600
        w.requests += 100
    assert c.tick().status == COMPLETED and w.applied == [1.0, 5.0, 25.0, 50.0, 100.0]
    w.version = "v2"
    s = c.tick()
    assert (s.status, s.stage, s.percent, w.applied[-1]) == (RUNNING, 0, 1.0, 1.0)
    assert c.state()["name"] == PLAN.key("v2") and c.state()["bundle_version"] == "v2"
    assert store.rollout_get(PLAN.key("v1"))[1]["status"] == COMPLETED and store.rollout_get(PLAN.key("v2"))[0] == 1
    assert c.tick().stage == 0  # the new stage's counts start at the swap: the old version's requests do not advance it
    w.version = None  # no bundle served yet: nothing is created or applied
    assert c.tick().percent == 0.0 and w.applied[-1] == 1.0 and store.rollout_get(PLAN.key("None")) is None


def test_two_evaluators_racing_advance_exactly_once(store):
    now = [T0]
    barrier = threading.Barrier(2)
    workers = [FakeWorker(requests=0, barrier=None) for _ in range(2)]
    ctrls = [w.controller(store, lambda: now[0]) for w in workers]
    for c in ctrls:
        c.tick()  # both follow stage 0 (1 %) with a baseline of 0 requests
    for w in workers:
        w.requests, w.barrier = 1000, barrier
    now[0] += 3600
    results = [None, None]

    def run(i):
        results[i] = ctrls[i].tick()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    version, stored = store.rollout_get(PLAN.key("v1"))
    assert version == 2 and stored["stage"] == 1 and len(stored["history"]) == 2  # created, advanced once
    assert [r.stage for r in results] == [1, 1] and [w.applied for w in workers] == [[1.0, 5.0], [1.0, 5.0]]
    assert [c.tick().stage for c in ctrls] == [1, 1]  # the new stage's clock and counts start now: no second advance


def test_admin_actions_through_the_controller(store):
    now = [T0]
    w = FakeWorker(requests=0)
    c = w.controller(store, lambda: now[0])
    assert c.act("pause").status == PAUSED
    w.requests, now[0] = 10_000, T0 + 10_000
    assert c.tick().status == PAUSED and w.applied == [1.0]  # paused: no advance, percent held
    assert c.act("resume").status == RUNNING
    assert c.tick().stage == 0  # resumed: the stage's time restarts
    now[0] += 3600
    w.requests += 100
    assert c.tick().stage == 1
    a = c.act("abort")
    assert (a.status, a.percent, w.applied[-1]) == (ABORTED, 0.0, 0.0)
    with pytest.raises(InputError, match="cannot resume a rollout that is aborted"):
        c.act("resume")
    other = FakeWorker().controller(store, lambda: now[0])  # another worker: follows the stored decision
    assert other.tick().status == ABORTED and other.state()["percent"] == 0.0


# ---- the engine: failures counted against the candidate, the split applied, /ab/report ----------------------


def non_finite_model() -> bytes:
    """A member's graph whose probabilities are divided by (max feature - 7): finite on the zeros of the
    warm-up, non-finite on a row whose largest feature is 7, which the service refuses (the request fails)."""
    from onnx import helper, numpy_helper

    from tests.reliability import bundles

    nodes, inits = bundles._member_nodes("", bundles._weights(0, 0), "p")
    inits.append(numpy_helper.from_array(np.array([7.0], np.float32), "seven"))
    nodes += [helper.make_node("ReduceMax", ["input"], ["mx"], axes=[1], keepdims=1),
              helper.make_node("Sub", ["mx", "seven"], ["d"]),
              helper.make_node("Div", ["p", "d"], ["probabilities"])]
    return bundles._model(nodes, inits)


def test_the_engine_rolls_a_failing_candidate_back_on_the_error_guardrail(tmp_path):
    import asyncio

    from service.engine import Engine
    from tests.reliability import bundles

    bundle = candidate_bundle(tmp_path / "nan", non_finite_model())
    cfg = config.load({"FUSION_BUNDLE": str(bundle), "FUSION_ROLLOUT": "distilled:50,100", "FUSION_AB_STORE": "memory",
                       "FUSION_ROLLOUT_MIN_STAGE_REQUESTS": "10", "FUSION_ROLLOUT_MIN_STAGE_S": "0",
                       "FUSION_ROLLOUT_PERIOD_S": "3600", "FUSION_DEVICE": "cpu"})
    eng = Engine(cfg.engine, cfg.routing, runtime=cfg.runtime, load_limits=cfg.load_limits, rollout=cfg.rollout)
    try:
        eng.start()  # its evaluator's first tick creates the state and applies 50 %
        assert eng.ready, eng.error
        assert eng.rollout.tick().percent == 50.0 and eng.policy.weights == {"distilled": 0.5, "ensemble": 0.5}
        X = np.full((2, bundles.N_FEATURES), 7.0, np.float32)  # the candidate's answer to it is non-finite
        answered = failed = 0
        for i in range(40):
            try:
                r = asyncio.run(eng.predict(X, variant=None, key=f"user-{i}", request_id=f"r{i}"))
                assert r.variant == "ensemble"
                answered += 1
            except InputError as exc:
                assert "'distilled' gave non-finite outputs" in str(exc)
                failed += 1
        assert failed >= 10 and answered + failed == 40  # keys split about evenly (sha256 of the key)
        assert eng.outcomes()["distilled"] == (0, failed) and eng.outcomes()["ensemble"] == (answered, 0)
        state = eng.rollout.tick()
        assert (state.status, state.percent) == (ROLLED_BACK, 0.0)
        assert state.reason.startswith(f"guardrail: error rate 1.0000 ({failed} of {failed} requests at 50 %)"), state.reason
        assert eng.policy.weights == {"distilled": 0.0, "ensemble": 1.0}
        assert {asyncio.run(eng.predict(X, variant=None, key=f"user-{i}", request_id=f"s{i}")).variant for i in range(20)} == {"ensemble"}
        report = eng.report()["rollout"]
        assert (report["status"], report["percent"], [h["percent"] for h in report["history"]]) == ("rolled_back", 0.0, [50.0, 0.0])
    finally:
        eng.close()


def test_failures_on_one_engine_trip_the_guardrail_of_another_sharing_the_store(tmp_path):
    """Two engines (two workers) on one SQLite A/B store: every failed request is on engine A, yet
    engine B's evaluator rolls the candidate back (the error rate is the store's, fleet-wide), and A
    follows. Each engine's report shows the same `outcomes`."""
    import asyncio

    from service.engine import Engine
    from tests.reliability import bundles

    bundle = candidate_bundle(tmp_path / "nan", non_finite_model())
    cfg = config.load({"FUSION_BUNDLE": str(bundle), "FUSION_ROLLOUT": "distilled:50,100",
                       "FUSION_AB_STORE": f"sqlite:///{tmp_path}/ab.db", "FUSION_STATE_DIR": str(tmp_path / "state"),
                       "FUSION_ROLLOUT_MIN_STAGE_REQUESTS": "10", "FUSION_ROLLOUT_MIN_STAGE_S": "0",
                       "FUSION_ROLLOUT_PERIOD_S": "3600", "FUSION_DEVICE": "cpu"})
    a, b = (Engine(cfg.engine, cfg.routing, runtime=cfg.runtime, load_limits=cfg.load_limits, rollout=cfg.rollout)
            for _ in range(2))
    try:
        for eng in (a, b):
            eng.start()
            assert eng.ready, eng.error
            assert eng.rollout.tick().percent == 50.0
        X = np.full((2, bundles.N_FEATURES), 7.0, np.float32)  # the candidate's answer to it is non-finite
        failed = 0
        for i in range(40):
            try:
                asyncio.run(a.predict(X, variant=None, key=f"user-{i}", request_id=f"r{i}"))
            except InputError:
                failed += 1
        assert failed >= 10
        assert b.outcomes().get("distilled", (0, 0)) == (0, 0)  # B served none of them itself
        a.ab_store.flush()  # A's batched writes reach the store (its writer does so within FLUSH_S anyway)
        seen = [eng.report(rollout=False)["variants"]["distilled"]["outcomes"] for eng in (a, b)]
        assert seen[0] == seen[1] and (seen[1]["answered"], seen[1]["failed"]) == (0, failed), seen
        assert seen[1]["error_rate"] == 1.0 and list(seen[1]["by_version"]) == [a.current().version]
        state = b.rollout.tick()
        assert (state.status, state.percent) == (ROLLED_BACK, 0.0), state
        assert state.reason.startswith(f"guardrail: error rate 1.0000 ({failed} of {failed} requests at 50 %)"), state.reason
        assert a.rollout.tick().status == ROLLED_BACK and a.policy.weights == {"distilled": 0.0, "ensemble": 1.0}
    finally:
        a.close()
        b.close()


def test_an_engine_without_a_rollout_reports_none_and_refuses_actions(tmp_path):
    from service.engine import Engine
    from tests.reliability import bundles

    bundles.make_bundle(tmp_path / "b")
    cfg = config.load({"FUSION_BUNDLE": str(tmp_path / "b"), "FUSION_AB_STORE": "memory"})
    eng = Engine(cfg.engine, cfg.routing, rollout=cfg.rollout)
    try:
        assert eng.rollout is None and eng.report()["rollout"] is None
        with pytest.raises(KeyError, match="no rollout is configured; set FUSION_ROLLOUT"):
            eng.rollout_action("pause")
    finally:
        eng.close()


def test_a_bundle_without_the_candidate_is_not_served(tmp_path):
    from service.engine import Engine
    from tests.reliability import bundles

    bundles.make_bundle(tmp_path / "b")
    cfg = config.load({"FUSION_BUNDLE": str(tmp_path / "b"), "FUSION_AB_STORE": "memory", "FUSION_ROLLOUT": "distilled:5,100"})
    eng = Engine(cfg.engine, cfg.routing, runtime=cfg.runtime, load_limits=cfg.load_limits, rollout=cfg.rollout)
    try:
        eng.start()
        assert not eng.ready and "FUSION_ROLLOUT: expected variants the bundle serves; ['distilled'] are not among" in eng.error
    finally:
        eng.close()


# ---- end to end: two `bentoml serve` processes sharing one store ---------------------------------------------

ADMIN_TOKEN = "adm-rollout-test-token"
ROWS_PER_REQUEST = 40


def candidate_bundle(out: Path, model: bytes) -> Path:
    """A synthetic bundle (tests/reliability/bundles.py) plus a `distilled` variant whose ONNX file is `model`."""
    from fusion.bundle import sha256_file
    from tests.reliability import bundles

    bundles.make_bundle(out.with_name(out.name + "-base"), seed=0)
    bundles.rewrite(out.with_name(out.name + "-base"), out, extra={"distilled.onnx": model})

    def add(data):
        data["variants"]["distilled"] = {**data["variants"]["ensemble"], "file": "distilled.onnx", "kind": "distilled",
                                         "sha256": sha256_file(out / "distilled.onnx"), "combiner": None, "members": []}

    return bundles.edit_manifest(out, add)


def rollout_env(store: Path, stages: str) -> dict:
    from tests.reliability.harness import env_threads

    return {**env_threads(), "FUSION_ROLLOUT": f"distilled:{stages}", "FUSION_AB_STORE": f"sqlite:///{store}",
            "FUSION_ROLLOUT_PERIOD_S": "0.2", "FUSION_ROLLOUT_MIN_STAGE_S": "0", "FUSION_ROLLOUT_MIN_STAGE_REQUESTS": "2",
            "FUSION_ROLLOUT_MAX_P99_RATIO": "0",  # latency on a shared 2-core test machine is no signal
            "FUSION_SHADOW": "ensemble,distilled", "FUSION_ADMIN_TOKEN": ADMIN_TOKEN, "FUSION_ACCESS_LOG": "0"}


class Traffic:
    """Labelled traffic over both servers: each round predicts a batch on every server, then labels it with
    the ensemble's offline answer (so the ensemble is always right and a copy of it is too)."""

    def __init__(self, servers, bundle: Path):
        import httpx

        from tests.reliability import bundles

        self.clients = [httpx.Client(base_url=s.url, timeout=30) for s in servers]
        self.X = bundles.digits_like(ROWS_PER_REQUEST * 8, seed=3)
        self.y = bundles.offline(bundle, "ensemble", self.X).argmax(-1).tolist()
        self.variants: list[str] = []
        self.i = 0

    def round(self, requests: int = 8) -> None:
        import time

        sent = []
        for k in range(requests):
            c = self.clients[k % len(self.clients)]
            lo = (self.i % 8) * ROWS_PER_REQUEST
            self.i += 1
            r = c.post("/predict", json={"inputs": self.X[lo:lo + ROWS_PER_REQUEST].tolist()})
            assert r.status_code == 200, r.text
            sent.append((c, r.json()["feedback_id"], self.y[lo:lo + ROWS_PER_REQUEST]))
            self.variants.append(r.json()["variant"])
        time.sleep(0.2)  # the shadow runs attach their answers first: labelled rows are then paired
        for c, fid, labels in sent:
            r = c.post("/feedback", json={"feedback_id": fid, "labels": labels})
            assert r.status_code == 200, r.text

    def states(self) -> list[dict]:
        out = []
        for c in self.clients:
            r = c.get("/admin/rollout", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out

    def until(self, done, deadline_s: float = 120.0) -> list[dict]:
        import time

        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            states = self.states()
            if all(done(s) for s in states):
                return states
            self.round()
        raise AssertionError(f"rollout did not reach the expected state within {deadline_s}s: {self.states()}")

    def close(self):
        for c in self.clients:
            c.close()


def admin(client, method: str, path: str, **kw):
    return client.request(method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kw)


@pytest.mark.server
def test_a_good_candidate_is_rolled_out_to_100_percent_across_two_processes(tmp_path):
    from tests.reliability import bundles
    from tests.server import Server

    good = candidate_bundle(tmp_path / "good", bundles.ensemble_model(0, (0, 1, 2, 3)))  # the ensemble's own graph
    env = rollout_env(tmp_path / "ab.db", "1,10,50,100")
    with Server(good, env=env) as a, Server(good, env=env) as b:
        t = Traffic([a, b], good)
        try:
            first = t.states()
            assert [(s["stage"], s["percent"], s["status"]) for s in first] == [(0, 1.0, "running")] * 2, first
            c = t.clients[0]
            # the admin endpoint: admin token, one of the valid actions, else 4xx in the one error shape
            r = c.post("/admin/rollout", json={"action": "pause"})
            assert r.status_code == 401 and set(r.json()) == {"error", "request_id"}
            r = admin(c, "POST", "/admin/rollout", json={"action": "restart"})
            assert r.status_code == 400 and "expected 'action' to be one of ['pause', 'resume', 'abort']; got 'restart'" in r.json()["error"]
            r = admin(c, "POST", "/admin/rollout", json={"action": "resume"})
            assert r.status_code == 400 and "cannot resume a rollout that is running" in r.json()["error"]
            r = admin(c, "POST", "/admin/rollout", json={"action": "pause", "stage": 3})
            assert r.status_code == 400 and "unexpected fields ['stage']; expected only 'action'" in r.json()["error"]
            r = admin(c, "POST", "/admin/rollout", json={"action": "pause"})
            assert r.status_code == 200 and r.json()["status"] == "paused"
            for _ in range(3):
                t.round()
            states = t.states()  # the other process follows the pause; no stage moved while paused
            assert [(s["status"], s["stage"]) for s in states] == [("paused", 0)] * 2, states
            r = admin(t.clients[1], "POST", "/admin/rollout", json={"action": "resume"})  # from the other process
            assert r.status_code == 200 and r.json()["status"] == "running"

            states = t.until(lambda s: s["status"] == "completed")
            for s in states:
                assert s["percent"] == 100.0 and [h["percent"] for h in s["history"]] == [1.0, 1.0, 1.0, 10.0, 50.0, 100.0]
                assert [h["status"] for h in s["history"]] == ["running", "paused", "running", "running", "running", "completed"]
                assert all(h["reason"].startswith(("non-inferior", "superior")) for h in s["history"][3:]), s["history"]
            assert states[0]["history"] == states[1]["history"]  # one decision, followed by both
            import time

            time.sleep(0.5)  # both evaluators have followed the last stage (period 0.2 s)
            for c in t.clients:
                assert admin(c, "GET", "/admin/routing").json()["weights"] == {"distilled": 1.0, "ensemble": 0.0}
                report = c.get("/ab/report").json()
                assert report["rollout"]["status"] == "completed" and report["rollout"]["percent"] == 100.0
                metrics = c.get("/metrics").text
                assert 'fusion_rollout_percent{variant="distilled"} 100.0' in metrics, [
                    ln for ln in metrics.splitlines() if "rollout" in ln]
            t.variants.clear()
            t.round(16)
            assert set(t.variants) == {"distilled"}  # 100 %: the candidate answers everything
        finally:
            t.close()


@pytest.mark.server
def test_a_bad_candidate_is_rolled_back_to_0_percent_across_two_processes(tmp_path):
    from tests.reliability import bundles
    from tests.server import Server

    bad = candidate_bundle(tmp_path / "bad", bundles.member_model(7, 0))  # another model's answers: mostly wrong
    env = rollout_env(tmp_path / "ab.db", "50,100")
    with Server(bad, env=env) as a, Server(bad, env=env) as b:
        t = Traffic([a, b], bad)
        try:
            states = t.until(lambda s: s["status"] != "running")
            for s in states:
                assert (s["status"], s["percent"]) == ("rolled_back", 0.0), s
                assert s["reason"].startswith("inferior to the ensemble: inferior (keep the ensemble)"), s["reason"]
                assert [h["percent"] for h in s["history"]] == [50.0, 0.0]
            import time

            time.sleep(0.5)
            for c in t.clients:
                assert admin(c, "GET", "/admin/routing").json()["weights"] == {"distilled": 0.0, "ensemble": 1.0}
                assert 'fusion_rollout_percent{variant="distilled"} 0.0' in c.get("/metrics").text
            t.variants.clear()
            t.round(16)
            assert set(t.variants) == {"ensemble"}  # rolled back: the ensemble answers everything
            r = admin(t.clients[0], "POST", "/admin/rollout", json={"action": "abort"})
            assert r.status_code == 400 and "cannot abort a rollout that is rolled_back" in r.json()["error"]
        finally:
            t.close()


@pytest.mark.server
def test_the_dashboard_shows_the_stage_and_its_history(tmp_path):
    from tests.reliability import bundles
    from tests.server import Server
    from tests.test_ui import CHROMIUM, CHROMIUM_ARGS, CUT_TEXT_JS, WIDE, _browser_missing

    if (missing := _browser_missing()) is not None:
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    bundle = candidate_bundle(tmp_path / "b", bundles.ensemble_model(0, (0, 1, 2, 3)))
    env = {**rollout_env(tmp_path / "ab.db", "5,50,100"), "FUSION_AB_STORE": "memory"}
    with Server(bundle, env=env) as srv:
        import httpx

        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert admin(c, "POST", "/admin/rollout", json={"action": "pause"}).status_code == 200
            assert admin(c, "POST", "/admin/rollout", json={"action": "abort"}).json()["status"] == "aborted"
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                       headless=True, args=CHROMIUM_ARGS, viewport=WIDE)
            try:
                page = ctx.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(srv.url + "/ui")
                expect(page.locator("#rollout-stage")).to_have_text("distilled 0 % · aborted", timeout=15_000)
                expect(page.locator("#rollout-detail")).to_have_text("stage 1 of 3: 5 % → 50 % → 100 %")
                items = page.locator("#rollout-history li").all_text_contents()
                assert [i.split(" ", 1)[1] for i in items] == [
                    "0 % aborted: aborted by an admin", "5 % paused: paused by an admin", "5 % running: rollout started"], items
                assert page.evaluate(CUT_TEXT_JS) == [] and errors == []
            finally:
                ctx.close()
