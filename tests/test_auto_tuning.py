"""FUSION_INTRA_OP_THREADS=auto and FUSION_BATCH_MAX_ROWS=auto (issue 18, service/tuning.py).

A model whose batch-1 call at load costs more than tuning.COSTLY_S gets every core of its worker
(intra-op threads, not spinning), and its calls at batch 1..32 are timed: adaptive batching turns on,
at the size with the least time per row, only where a size saves tuning.GAIN of a row's time. A cheap
one (the digits-style ensembles) keeps one thread and no batching, exactly as before. Explicit integers
keep their old meaning. No timing asserts: the synthetic costly models cost ~1 GFLOP a call, one per
call (batching divides it by the rows) or one per row (batching saves nothing); the cheap ones ~2 kFLOP.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fusion.errors import ConfigError
from service import config, runtime, tuning
from service.config import EngineConfig
from service.engine import Engine
from service.routing import RoutingPolicy
from service.runtime import RuntimeConfig
from tests.reliability import bundles
from tests.server import Server

SIDE = 768  # the costly model's (SIDE x SIDE) @ (SIDE x SIDE) per row: 2 * 768^3 = 0.9 GFLOP


def costly_model(per_row: bool = False) -> bytes:
    """A valid classifier of the synthetic bundles' shape (64 features -> 10 probabilities) that also
    multiplies a (SIDE, SIDE) matrix by itself once per call (`per_row`: once for every row); the
    product's largest value, times zero, is added to the input, so the work is needed for the output and
    the probabilities are the head's."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.full((1, SIDE, SIDE), 1e-3, np.float32), "C"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    head, head_inits = bundles._probabilities_head("shifted")
    # per row: (B, 1) -> (B, 1, 1) -> B products; per call: the whole batch's sum (1, 1, 1) -> one product
    sum_node = (helper.make_node("ReduceSum", ["input", "axis1"], ["row_sum"], keepdims=1) if per_row
                else helper.make_node("ReduceSum", ["input"], ["row_sum"], keepdims=1))
    nodes = [sum_node,
             helper.make_node("Unsqueeze", ["row_sum", "axis1"], ["row_sum3"]),
             helper.make_node("Mul", ["row_sum3", "zero"], ["nothing"]),
             helper.make_node("Add", ["nothing", "C"], ["big"]),  # (B, SIDE, SIDE)
             helper.make_node("MatMul", ["big", "big"], ["product"]),
             helper.make_node("ReduceMax", ["product"], ["peak"], axes=[1, 2], keepdims=0),  # (B,)
             helper.make_node("Unsqueeze", ["peak", "axis1"], ["peak2"]),  # (B, 1)
             helper.make_node("Mul", ["peak2", "zero"], ["shift"]),
             helper.make_node("Add", ["input", "shift"], ["shifted"]), *head]
    return bundles._model(nodes, inits + head_inits)


@pytest.fixture(scope="module")
def cheap_bundle(tmp_path_factory) -> Path:
    """The digits-style bundle (4 tiny MLP members and their fused ensemble)."""
    out = tmp_path_factory.mktemp("auto-cheap") / "b"
    bundles.make_bundle(out)
    return out


@pytest.fixture(scope="module")
def costly_bundle(tmp_path_factory, cheap_bundle) -> Path:
    """The same bundle with a costly `ensemble` variant whose cost is per call (its members stay cheap)."""
    return bundles.rewrite(cheap_bundle, tmp_path_factory.mktemp("auto-costly") / "b", {"ensemble.onnx": costly_model()})


@pytest.fixture(scope="module")
def per_row_bundle(tmp_path_factory, cheap_bundle) -> Path:
    """The same bundle with a costly `ensemble` variant whose cost is per row: batching saves nothing."""
    return bundles.rewrite(cheap_bundle, tmp_path_factory.mktemp("auto-per-row") / "b",
                           {"ensemble.onnx": costly_model(per_row=True)})


# ---- the rule, by hand -------------------------------------------------------------------------


def test_decide_costly_model_gets_every_core_and_batching():
    d = tuning.decide(0.085, 2)
    assert d == tuning.Decision(2, True, "auto: batch-1 call 85 ms > 5 ms")
    assert tuning.decide(0.085, 16).threads == 16
    assert tuning.decide(0.085, 1) == tuning.Decision(1, True, "auto: batch-1 call 85 ms > 5 ms")  # one core: batching only
    assert tuning.decide(0.0051, 4) == tuning.Decision(4, True, "auto: batch-1 call 5.1 ms > 5 ms")


def test_decide_cheap_model_keeps_one_thread_no_batching():
    assert tuning.decide(0.0002, 8) == tuning.Decision(1, False, "auto: batch-1 call 0.2 ms <= 5 ms")
    assert tuning.decide(0.005, 8) == tuning.Decision(1, False, "auto: batch-1 call 5 ms <= 5 ms")  # the threshold itself: cheap
    assert tuning.decide(0.0, 0).threads == 1  # no cores reported: still one thread
    assert tuning.decide(0.02, 8, threshold_s=0.05).batching is False  # the threshold is a parameter


def test_batch_rows_take_the_least_time_per_row_when_it_saves_enough():
    # the text ensemble of issue 18 (ms per call at 1, 4, 8, 16, 32 rows): 8 rows, 26.8 vs 36.4 ms a row
    text = {1: 0.0364, 4: 0.116, 8: 0.2144, 16: 0.477, 32: 1.0880}
    rows, why = tuning.choose_batch_rows(text)
    assert rows == 8 and why == ("auto: ms per row b1 36.4, b4 29, b8 26.8, b16 29.8, b32 34; "
                                 "8 rows save 26% of a row's time (>= 20%)"), why
    # the image ensemble: 4 rows save 12.5% only -> off
    image = {1: 0.211, 4: 0.7384, 8: 1.761}
    assert tuning.choose_batch_rows(image) == (0, "auto: ms per row b1 211, b4 185, b8 220; no batch size saves 20% "
                                                  "of a row's time (off)")
    assert tuning.choose_batch_rows(image, gain=0.9)[0] == 4  # the share is a parameter
    # unbatched calls at once on 2 cores: text's 55 ms on one thread -> 27.5 ms a row, which 8 rows do not beat
    rows, why = tuning.choose_batch_rows(text, parallel_s=0.055 / 2)
    assert rows == 0 and why == ("auto: ms per row b1 36.4, b4 29, b8 26.8, b16 29.8, b32 34; unbatched calls at once "
                                 "27.5; no batch size saves 20% of a row's time (off)"), why
    # a curve that beats them by 20 % still batches; the parallel time counts only when below batch 1's
    assert tuning.choose_batch_rows({1: 0.03, 8: 0.08}, parallel_s=0.015) == (
        8, "auto: ms per row b1 30, b8 10; unbatched calls at once 15; 8 rows save 33% of a row's time (>= 20%)")
    assert tuning.choose_batch_rows(text, parallel_s=1.0)[0] == 8
    # a per-call cost: every size divides it, the largest most; a tie keeps the smaller size
    assert tuning.choose_batch_rows({1: 0.05, 2: 0.05, 4: 0.05, 32: 0.05})[0] == 32
    assert tuning.choose_batch_rows({1: 0.04, 2: 0.04, 4: 0.08})[0] == 2
    assert tuning.choose_batch_rows({1: 0.04}) == (0, "auto: ms per row b1 40; no batch size saves 20% of a row's time (off)")
    with pytest.raises(ValueError, match="expected a curve with batch 1 timed; got sizes \\[2, 4\\]"):
        tuning.choose_batch_rows({2: 0.1, 4: 0.2})


def test_probe_curve_stops_within_its_budget():
    calls = []

    class Slow:  # a model whose call costs 10 ms a row (time.sleep): the budget decides how far the curve goes
        def run(self, X):
            calls.append(len(X))
            time.sleep(0.01 * len(X))

    curve = runtime.probe_curve(Slow(), np.zeros((1, 4), np.float32), budget_s=0.5)
    # 1, 2, 4 and 8 rows cost 2 x 0.15 s; 16 rows would add 2 x 0.16 s past 0.5 s: not timed
    assert sorted(curve) == [1, 2, 4, 8] and calls == [1, 1, 2, 2, 4, 4, 8, 8], (curve, calls)
    assert all(abs(t / n - 0.01) < 0.009 for n, t in curve.items()), curve  # sleep is at least its time
    class Shapes:
        def run(self, X):
            calls.append({k: v.shape for k, v in X.items()})

    named = runtime.probe_curve(Shapes(), {"a": np.zeros((1, 3), np.int64), "b": np.ones((1, 5), np.int64)},
                                sizes=(1, 4), budget_s=10)
    assert sorted(named) == [1, 4] and calls[-1] == {"a": (4, 3), "b": (4, 5)}  # named feeds: every feed repeated


def test_batch_instances_never_oversubscribe_the_cores():
    assert tuning.batch_instances(2, threads=2, cores=2) == 1  # 2 calls x 2 threads on 2 cores: one at a time
    assert tuning.batch_instances(2, threads=1, cores=2) == 2  # today's default: 2 instances of 1 thread
    assert tuning.batch_instances(2, threads=4, cores=8) == 2
    assert tuning.batch_instances(3, threads=8, cores=8) == 1
    assert tuning.batch_instances(1, threads=1, cores=16) == 1  # never more than configured


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert tuning.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert tuning.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert tuning.cgroup_quota(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1: no limit
    assert tuning.cgroup_quota(tmp_path) is None


def test_available_cores_takes_affinity_quota_and_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(tuning, "cgroup_quota", lambda: None)
    assert tuning.available_cores() == 8
    assert tuning.available_cores(processes=3) == 2  # 8 cores shared by 3 workers: 2 each (floor)
    assert tuning.available_cores(processes=16) == 1
    monkeypatch.setattr(tuning, "cgroup_quota", lambda: 2.5)  # a container limited to 2.5 CPUs: 3 threads
    assert tuning.available_cores() == 3


# ---- the settings ------------------------------------------------------------------------------


def test_auto_is_the_default_and_explicit_values_keep_their_meaning():
    cfg = config.load({})
    assert cfg.runtime.intra_op_threads == tuning.AUTO and cfg.engine.batch_max_rows == tuning.AUTO
    for text in ("auto", "AUTO", " Auto "):
        cfg = config.load({"FUSION_INTRA_OP_THREADS": text, "FUSION_BATCH_MAX_ROWS": text})
        assert cfg.runtime.intra_op_threads == tuning.AUTO and cfg.engine.batch_max_rows == tuning.AUTO
    cfg = config.load({"FUSION_INTRA_OP_THREADS": "3", "FUSION_BATCH_MAX_ROWS": "0", "FUSION_WORKERS": "2"})
    assert (cfg.runtime.intra_op_threads, cfg.engine.batch_max_rows, cfg.runtime.processes) == (3, 0, 2)
    assert config.load({"FUSION_BATCH_MAX_ROWS": "64"}).engine.batch_max_rows == 64


@pytest.mark.parametrize("name,value", [("FUSION_INTRA_OP_THREADS", "0"), ("FUSION_INTRA_OP_THREADS", "automatic"),
                                        ("FUSION_BATCH_MAX_ROWS", "-1"), ("FUSION_BATCH_MAX_ROWS", "lots")])
def test_bad_values_are_refused_naming_auto(name, value):
    with pytest.raises(ConfigError) as err:
        config.load({name: value})
    assert name in str(err.value) and "'auto'" in str(err.value) and repr(value) in str(err.value)


# ---- in process: the load measures and decides --------------------------------------------------


def test_cheap_bundle_loads_as_before(cheap_bundle):
    loaded = runtime.load(cheap_bundle, RuntimeConfig(device="cpu"))
    for name, m in loaded.models.items():
        assert m.threads == 1 and m.session.get_session_options().intra_op_num_threads == 1, name
        assert 0 < m.probe_s <= tuning.COSTLY_S, (name, m.probe_s)
    assert loaded.models["ensemble"].auto.threads == 1 and not loaded.models["ensemble"].auto.batching
    assert loaded.models["mlp_0"].auto is None  # members: FUSION_MEMBER_THREADS, never auto


def test_costly_variant_gets_the_cores(costly_bundle, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda processes=1: 3)  # any machine: as if 3 cores
    loaded = runtime.load(costly_bundle, RuntimeConfig(device="cpu"))
    ens = loaded.models["ensemble"]
    assert ens.probe_s > tuning.COSTLY_S, f"expected the synthetic costly model above {tuning.COSTLY_S} s; got {ens.probe_s}"
    assert ens.auto.threads == ens.threads == 3 and ens.auto.batching and ens.cores == 3
    # its cost is per call: every batch size timed, and the largest has the least time per row
    assert sorted(ens.batch_curve) == list(tuning.CURVE_ROWS) and ens.batch_choice[0] == tuning.AUTO_BATCH_ROWS, ens.batch_curve
    assert loaded.models["mlp_0"].batch_curve is None  # cheap: not timed
    assert ens.session.get_session_options().intra_op_num_threads == 3
    assert loaded.models["mlp_0"].threads == 1  # its cheap members keep one thread
    X = bundles.digits_like(5)
    np.testing.assert_allclose(loaded.predict("ensemble", X), bundles.offline(costly_bundle, "ensemble", X), atol=1e-6)


def test_per_row_cost_gets_no_batching(per_row_bundle, monkeypatch):
    # one core: one thread, no calls at once; B products cost B times one, so no size saves 20 % a row
    monkeypatch.setattr(runtime, "available_cores", lambda processes=1: 1)
    loaded = runtime.load(per_row_bundle, RuntimeConfig(device="cpu"))
    ens = loaded.models["ensemble"]
    assert ens.probe_s > tuning.COSTLY_S and ens.batch_curve and ens.parallel_s is None
    assert ens.batch_choice == tuning.choose_batch_rows(ens.batch_curve)
    per_row = {n: t / n for n, t in ens.batch_curve.items()}
    assert min(per_row.values()) > 0.5 * per_row[1], per_row
    assert ens.batch_choice[0] == 0 and ens.batch_choice[1].endswith("(off)"), ens.batch_choice
    off = runtime.load(per_row_bundle, RuntimeConfig(device="cpu", batch_curve=False))
    assert off.models["ensemble"].batch_curve is None and off.models["ensemble"].batch_choice is None


def test_unbatched_calls_at_once_are_timed_on_every_core(per_row_bundle, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda processes=1: 2)
    ens = runtime.load(per_row_bundle, RuntimeConfig(device="cpu")).models["ensemble"]
    assert ens.parallel_s is not None and ens.parallel_s > 0
    assert ens.batch_choice == tuning.choose_batch_rows(ens.batch_curve, parallel_s=ens.parallel_s)
    assert "unbatched calls at once" in ens.batch_choice[1]
    calls = []

    class Count:
        def run(self, X):
            calls.append(len(X))
            time.sleep(0.02)

    # 3 calls at once, twice: each round lasts one call's sleep, so a row costs about a third of it
    assert 0.02 / 3 <= runtime.probe_parallel(Count(), np.zeros((1, 4), np.float32), 3) < 0.02
    assert calls == [1] * 6


def test_explicit_threads_are_kept(costly_bundle):
    loaded = runtime.load(costly_bundle, RuntimeConfig(device="cpu", intra_op_threads=1))
    ens = loaded.models["ensemble"]
    assert ens.auto is None and ens.threads == 1 and ens.session.get_session_options().intra_op_num_threads == 1
    assert ens.probe_s > tuning.COSTLY_S  # still measured: FUSION_BATCH_MAX_ROWS=auto decides on it


def _engine(bundle: Path, **cfg) -> Engine:
    eng = Engine(EngineConfig(bundle=str(bundle), ab_store="memory", **cfg), RoutingPolicy())
    eng.start()
    assert eng.ready, eng.error
    return eng


def _each_row_at_once(p, X, prefix: str) -> list:
    """Every row of X as its own request to the `ensemble` variant, all at once; their results in order."""
    async def together():
        return await asyncio.gather(*(p.predict(X[i:i + 1], variant="ensemble", key=None, request_id=f"{prefix}{i}")
                                      for i in range(len(X))))

    return asyncio.run(together())


def test_predictor_batches_only_costly_models_under_auto(costly_bundle, cheap_bundle, per_row_bundle, monkeypatch):
    eng = _engine(costly_bundle)
    try:
        served, p = eng.current(), eng.predictor
        assert p.batches(served.loaded.models["ensemble"]) and not p.batches(served.loaded.models["mlp_0"])
        info = p.tuning(served)
        ens = served.loaded.models["ensemble"]
        assert info["ensemble"]["batching"] is True and info["ensemble"]["batch_max_rows"] == ens.batch_choice[0]
        assert info["ensemble"]["batching_reason"] == ens.batch_choice[1] and "rows save" in ens.batch_choice[1]
        assert info["ensemble"]["batch_curve_ms"] == {str(n): round(t * 1e3, 3) for n, t in ens.batch_curve.items()}
        assert p.batcher.rows_for(ens) == ens.batch_choice[0]
        assert info["mlp_0"] == {**info["mlp_0"], "batching": False, "batch_max_rows": 0, "batch_instances": 0,
                                 "threads": 1, "threads_reason": "FUSION_MEMBER_THREADS=1"}
        X = bundles.digits_like(6, seed=3)
        results = _each_row_at_once(p, X, "r")
        np.testing.assert_allclose(np.concatenate([r.output for r in results]),
                                   bundles.offline(costly_bundle, "ensemble", X), atol=1e-6)
        assert p.batcher.requests == len(X) and p.batcher.calls < len(X)  # they shared calls
    finally:
        eng.close()
    # costly, but batching saves nothing per row (one core: no calls at once to compare with): off, with the
    # curve as the reason
    monkeypatch.setattr(runtime, "available_cores", lambda processes=1: 1)
    eng = _engine(per_row_bundle)
    try:
        served, p = eng.current(), eng.predictor
        ens = served.loaded.models["ensemble"]
        assert not p.batches(ens) and p.tuning(served)["ensemble"]["batching_reason"] == ens.batch_choice[1]
        # one core: queued all the same, one call at a time (never every request's call at once)
        assert ens.batch_choice[0] == 0 and p.queues(ens) and ens.parallel_s is None
        assert p.batcher.rows_for(ens) == 1 and p.batcher.instances_for(ens) == 1
        X = bundles.digits_like(2, seed=4)
        got = asyncio.run(p.predict(X, variant="ensemble", key=None, request_id="row"))
        np.testing.assert_allclose(got.output, bundles.offline(per_row_bundle, "ensemble", X), atol=1e-6)
    finally:
        eng.close()
    # the same on 3 cores, with batching off as chosen: requests queue, one per call, at most 3 calls at once
    monkeypatch.setattr(runtime, "available_cores", lambda processes=1: 3)
    eng = _engine(per_row_bundle)
    try:
        served, p = eng.current(), eng.predictor
        ens = served.loaded.models["ensemble"]
        ens.batch_choice = (0, "auto: (as chosen)")  # whatever the timing said on this machine: the off path
        ens.parallel_s = ens.batch_curve[1] / 3  # as if 3 calls at once were 3x one call's rate: one per core
        assert not p.batches(ens) and p.queues(ens)
        assert p.batcher.rows_for(ens) == 1 and p.batcher.instances_for(ens) == 3
        slower = type("M", (), {"batch_choice": (0, ""), "batch_curve": {1: 0.1}, "parallel_s": 0.15, "cores": 3})()
        assert p.batcher.instances_for(slower) == 1  # calls at once were 1.5x slower per row than one at a time
        slower.parallel_s = 0.12  # within 1/GAIN = 1.25x: near a tie, calls at once (measured faster when served)
        assert p.batcher.instances_for(slower) == 3
        info = p.tuning(served)["ensemble"]
        assert info["batching"] is False and info["calls_at_once"] == 3 and info["unbatched_at_once_ms_per_row"] > 0
        X = bundles.digits_like(5, seed=6)
        calls = p.batcher.calls
        results = _each_row_at_once(p, X, "q")
        np.testing.assert_allclose(np.concatenate([r.output for r in results]),
                                   bundles.offline(per_row_bundle, "ensemble", X), atol=1e-6)
        assert p.batcher.calls - calls == len(X)  # one call per request: never joined
    finally:
        eng.close()
    for rows, expect in ((0, False), (64, True)):  # explicit: every model, or none, as before
        eng = _engine(cheap_bundle, batch_max_rows=rows)
        try:
            models = eng.current().loaded.models
            assert all(eng.predictor.batches(m) is expect for m in models.values()), rows
            reason = eng.predictor.tuning(eng.current())["ensemble"]["batching_reason"]
            assert reason == f"FUSION_BATCH_MAX_ROWS={rows}" + (" (off)" if rows == 0 else ""), reason
        finally:
            eng.close()
    eng = _engine(costly_bundle, batch_max_rows=64)  # explicit rows: no curve timed, every call up to 64 rows
    try:
        ens = eng.current().loaded.models["ensemble"]
        assert ens.batch_curve is None and eng.predictor.batcher.rows_for(ens) == 64
    finally:
        eng.close()


# ---- served: GET /info shows what was chosen ------------------------------------------------------


def _serve(bundle: Path, env: dict | None = None) -> Server:
    srv = Server(bundle, env={"FUSION_LOAD_TIMEOUT_S": "300", **(env or {})})
    for name in ("FUSION_INTRA_OP_THREADS", "FUSION_BATCH_MAX_ROWS", "FUSION_WORKERS"):  # the defaults under test
        if not env or name not in env:
            srv.env.pop(name, None)
    return srv


def test_served_costly_bundle_reports_auto(costly_bundle):
    cores = tuning.available_cores()
    with _serve(costly_bundle) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        ens = c.get("/info").json()["tuning"]["ensemble"]
        assert ens["batching"] is True and ens["batch_max_rows"] == tuning.AUTO_BATCH_ROWS, ens  # a per-call cost
        assert ens["batching_reason"].startswith("auto: ms per row b1 ") and ens["batch_1_ms"] > 5, ens
        assert sorted(map(int, ens["batch_curve_ms"])) == list(tuning.CURVE_ROWS), ens
        assert ens["threads"] == cores and ens["threads_reason"].startswith("auto: batch-1 call"), (ens, cores)
        assert ens["batch_instances"] == tuning.batch_instances(2, cores, cores), ens
        if cores > 1:
            assert ens["threads"] > 1
        X = bundles.digits_like(3, seed=5)
        got = c.post("/predict", json={"inputs": X.tolist(), "variant": "ensemble"})
        assert got.status_code == 200, got.text
        np.testing.assert_allclose(got.json()["probabilities"], bundles.offline(costly_bundle, "ensemble", X), atol=1e-5)


def test_served_cheap_bundle_stays_off_with_one_thread(cheap_bundle):
    with _serve(cheap_bundle) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        tuned = c.get("/info").json()["tuning"]
        assert set(tuned) == {"ensemble", *bundles.MEMBERS}
        for name, t in tuned.items():
            assert t["threads"] == 1 and t["batching"] is False and t["batch_max_rows"] == 0, (name, t)
            assert t["batching_reason"].startswith("auto: batch-1 call") and "<= 5 ms" in t["batching_reason"], (name, t)
        assert tuned["ensemble"]["threads_reason"].startswith("auto: batch-1 call")


def test_served_explicit_values_override_auto(costly_bundle):
    with _serve(costly_bundle, {"FUSION_INTRA_OP_THREADS": "1", "FUSION_BATCH_MAX_ROWS": "0"}) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        ens = c.get("/info").json()["tuning"]["ensemble"]
        assert ens["threads"] == 1 and ens["threads_reason"] == "FUSION_INTRA_OP_THREADS=1", ens
        assert ens["batching"] is False and ens["batching_reason"] == "FUSION_BATCH_MAX_ROWS=0 (off)", ens


def test_batch_timing_respects_the_run_deadline_and_never_refuses_a_model(caplog):
    class Slow:  # 10 ms a row, with a run deadline of 0.1 s: 8 rows (an expected 0.16 s) are not tried
        name = "slow"
        deadline = runtime.run_deadline(0.1)

        def run(self, X):
            time.sleep(0.01 * len(X))

    assert sorted(runtime.probe_curve(Slow(), np.zeros((1, 4), np.float32), budget_s=10)) == [1, 2, 4]

    class Broken:  # the first timed call fails (as 32 rows past the memory would): logged, the batch-1 rule stays
        name = "broken"
        deadline = None

        def run(self, X):
            raise RuntimeError("out of memory")

    m = Broken()
    with caplog.at_level("WARNING", logger="fusion.service"):
        runtime.time_batch_sizes(m, np.zeros((1, 4), np.float32), cores=2)
    assert m.batch_curve is None and m.parallel_s is None and m.batch_choice is None and m.cores == 2
    assert "'broken': timing batch sizes failed (out of memory)" in caplog.text
