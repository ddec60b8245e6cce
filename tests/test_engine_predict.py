"""`Engine.predict` is the one prediction entry point (issue 14, item 1): members mode, cascade,
adaptive batching and shadow runs all go through it, in process, on a small synthetic bundle, each
compared with onnxruntime run offline on the bundle's files (tests/reliability/bundles.py). And
service/app.py only parses and formats: it knows nothing of sessions, batchers or inline budgets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.config import EngineConfig
from service.engine import Engine
from service.routing import Cascade, RoutingPolicy
from tests.reliability import bundles

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine-predict") / "b"
    bundles.make_bundle(out, seed=3)
    return out


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return bundles.digits_like(12, seed=5)


def engine(bundle: Path, policy: RoutingPolicy | None = None, **cfg) -> Engine:
    eng = Engine(EngineConfig(bundle=str(bundle), **cfg), policy or RoutingPolicy())
    eng.start()
    assert eng.ready, eng.error
    return eng


def predict(eng: Engine, X: np.ndarray, variant: str | None, rid: str = "r"):
    return asyncio.run(eng.predict(X, variant=variant, key=None, request_id=rid))


def test_members_mode_through_predict_is_the_soft_vote_of_every_member(bundle, X):
    eng = engine(bundle)
    try:
        res = predict(eng, X, "members")
        assert (res.variant, res.version) == ("members", eng.current().version)
        np.testing.assert_allclose(res.output, bundles.offline_members(bundle, list(bundles.MEMBERS), X), atol=ATOL)
        assert isinstance(res.extra["feedback_id"], str) and res.extra["feedback_id"]
        # a single variant (inline or in a thread: the scheduler's choice) gives the offline answer too
        one = predict(eng, X[:1], "mlp_2", "r1")
        np.testing.assert_allclose(one.output, bundles.offline(bundle, "mlp_2", X[:1]), atol=ATOL)
    finally:
        eng.close()


def test_cascade_through_predict_escalates_exactly_the_unsure_rows(bundle, X):
    cheap = bundles.offline(bundle, "mlp_0", X)
    threshold = float(np.median(cheap.max(-1)))  # about half the rows escalate
    unsure = cheap.max(-1) < threshold
    assert 0 < unsure.sum() < len(X), "the threshold should split the rows"
    eng = engine(bundle, RoutingPolicy(weights={"ensemble": 1.0}, cascade=Cascade("mlp_0", threshold, "ensemble")))
    try:
        res = predict(eng, X, "cascade")
        expected = np.where(unsure[:, None], bundles.offline(bundle, "ensemble", X), cheap)
        np.testing.assert_allclose(res.output, expected, atol=ATOL)
        assert res.extra["escalated"] == unsure.tolist()
        assert eng.stats.cascade == {"answered": int((~unsure).sum()), "escalated": int(unsure.sum())}
    finally:
        eng.close()


def test_batching_on_coalesces_concurrent_predicts_and_splits_the_answers_back(bundle, X):
    eng = engine(bundle, batch_max_rows=64, batch_instances=1)
    batcher = eng.predictor.batcher
    assert batcher is not None and batcher.max_rows == 64 and batcher.instances == 1
    parts = [X[i : i + 3] for i in range(0, len(X), 3)]  # 4 requests of 3 rows

    async def together():
        return await asyncio.gather(*(eng.predict(p, variant="ensemble", key=None, request_id=f"b{i}")
                                      for i, p in enumerate(parts)))

    try:
        results = asyncio.run(together())
        for p, res in zip(parts, results):
            np.testing.assert_allclose(res.output, bundles.offline(bundle, "ensemble", p), atol=ATOL)
        assert batcher.requests == len(parts)
        assert batcher.calls < len(parts), f"expected the {len(parts)} concurrent requests coalesced; got {batcher.calls} calls"
        # members mode is not one session: it never goes through the batcher
        res = predict(eng, X, "members", "bm")
        np.testing.assert_allclose(res.output, bundles.offline_members(bundle, list(bundles.MEMBERS), X), atol=ATOL)
        assert batcher.requests == len(parts)
    finally:
        eng.close()


def test_batching_off_builds_no_batcher(bundle):
    eng = engine(bundle, batch_max_rows=0)
    try:
        assert eng.predictor.batcher is None
    finally:
        eng.close()
    eng = engine(bundle)  # the default, FUSION_BATCH_MAX_ROWS=auto: this bundle's cheap models are not batched
    try:
        assert not any(eng.predictor.batches(m) for m in eng.current().loaded.models.values())
    finally:
        eng.close()


def test_shadow_runs_start_from_predict_and_compare_with_the_primary(bundle, X):
    eng = engine(bundle, RoutingPolicy(weights={"ensemble": 1.0}, shadow=("mlp_1",)))
    res = predict(eng, X, None)
    assert res.variant == "ensemble"
    eng.close()  # waits for the queued shadow run
    agree = int((bundles.offline(bundle, "mlp_1", X).argmax(-1) == bundles.offline(bundle, "ensemble", X).argmax(-1)).sum())
    s = eng.stats.variants["mlp_1"]
    assert (s.compared, s.agree) == (len(X), agree)
    assert sum(eng.stats.shadow_failures.values()) == 0, eng.stats.shadow_failures


def test_app_knows_nothing_of_sessions_batchers_or_inline_budgets():
    source = (ROOT / "service" / "app.py").read_text()
    found = [word for word in ("inline_ok", "batcher", "INLINE_BUDGET", "loaded.models", "engine.run", "engine.finish")
             if word in source]
    assert not found, f"expected service/app.py to only parse, call engine.predict and format; it mentions {found}"


# ---- the routing policy is read once per request (review of issue 14) ---------------------------------


def test_policy_change_between_resolve_and_run_does_not_fail_the_request(tmp_path):
    """POST /admin/routing landing after a request chose `cascade` but before the cascade ran used to
    answer 404 ('no cascade is configured'): the request now runs under the policy it read."""
    import asyncio

    from service.config import EngineConfig
    from service.engine import Engine
    from service.routing import Cascade, RoutingPolicy
    from tests.reliability import bundles

    bundles.make_bundle(tmp_path / "b", seed=3)
    X = bundles.digits_like(4, seed=5)
    eng = Engine(EngineConfig(bundle=str(tmp_path / "b")),
                 RoutingPolicy(weights={"cascade": 1.0}, cascade=Cascade("mlp_0", 0.5, "ensemble")))
    eng.start()
    try:
        assert eng.ready, eng.error
        resolve = eng.router.resolve

        def resolve_then_change(*a, **k):
            name = resolve(*a, **k)
            eng.set_policy({"weights": {"ensemble": 1}, "cascade": None})
            return name

        eng.router.resolve = resolve_then_change
        result = asyncio.run(eng.predict(X, variant=None, key=None, request_id="r1"))
        assert result.variant == "cascade" and "escalated" in result.extra
        eng.router.resolve = resolve
        assert asyncio.run(eng.predict(X, variant=None, key=None, request_id="r2")).variant == "ensemble"
    finally:
        eng.close()


def test_request_on_an_older_version_falls_back_when_the_new_policy_names_a_newer_variant(tmp_path):
    """A request holding v1 while v2 is swapped in and the policy routes everyone to a v2-only member:
    it answers from v1's ensemble instead of 404 (an explicit X-Variant is still checked strictly)."""
    import asyncio

    from fusion.errors import UnknownNameError
    from service.config import EngineConfig
    from service.engine import Engine
    from service.routing import RoutingPolicy
    from tests.reliability import bundles

    bundles.make_bundle(tmp_path / "v1", seed=3, members=("mlp_0", "mlp_1"))
    bundles.make_bundle(tmp_path / "v2", seed=4)
    X = bundles.digits_like(2, seed=5)
    eng = Engine(EngineConfig(bundle=str(tmp_path / "v1")), RoutingPolicy())
    eng.start()
    try:
        assert eng.ready, eng.error
        old = eng.current()
        eng.swap(str(tmp_path / "v2"))
        new_only = sorted(eng.current().names() - old.names())
        assert new_only, "v2 should have a variant v1 lacks"
        eng.set_policy({"weights": {new_only[0]: 1}})
        assert asyncio.run(eng.predict(X, variant=None, key=None, request_id="a", served=old)).variant == "ensemble"
        assert asyncio.run(eng.predict(X, variant=None, key=None, request_id="b")).variant == new_only[0]
        with pytest.raises(UnknownNameError):
            asyncio.run(eng.predict(X, variant=new_only[0], key=None, request_id="c", served=old))
    finally:
        eng.close()
