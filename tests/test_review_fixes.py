"""Regression tests for defects found in review: each states the scenario that used to go wrong."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fusion.errors import ConfigError, InputError


def test_members_mode_calibration_equals_softmax_of_scaled_logits():
    """Members mode applies the ensemble's temperatures on probabilities as the fused graph does on logits."""
    from service.combine import _softmax, calibrate

    rng = np.random.default_rng(0)
    z = rng.normal(scale=3, size=(3, 5, 4))  # (M, B, C) logits
    T = np.array([3.0, 0.5, 1.2])
    np.testing.assert_allclose(calibrate(_softmax(z), T), _softmax(z / T.reshape(-1, 1, 1)), atol=1e-9)


def test_a_reused_request_id_is_never_scored_against_the_wrong_answer():
    """A client's X-Request-ID is only an alias of a server-keyed record (issue 13, finding 9: reuse used
    to wipe both records): reused, it names no record, and each stays labelled by its own feedback id."""
    from service.ab import Stats

    st = Stats()
    first = st.observe("ensemble", 1, 0.001, None, [3], client="c", alias="same-id")
    second = st.observe("merged", 1, 0.001, None, [5], client="c", alias="same-id")  # the id reused
    with pytest.raises(ValueError, match="feedback_id"):
        st.feedback("same-id", [3], client="c")
    assert st.reused_ids == 1 and st.stored_rows == 2
    assert st.feedback(first, [3])["variants"] == ["ensemble"] and st.feedback(second, [3])["variants"] == ["merged"]
    assert st.report()["variants"]["ensemble"]["accuracy"] == 1.0 and st.report()["variants"]["merged"]["accuracy"] == 0.0


def test_the_feedback_store_is_bounded_by_rows():
    from service.ab import Stats

    st = Stats(max_records=1000, max_rows=100)
    for i in range(10):
        st.observe("ensemble", 30, 0.001, f"r{i}", [0] * 30)
    assert st.stored_rows <= 100 and len(st.records) == 3  # the oldest were evicted
    assert st.feedback("r9", [0] * 30)["rows"] == 30
    with pytest.raises(KeyError):
        st.feedback("r0", [0] * 30)


def test_overflowing_routing_weights_are_refused():
    from service.routing import RoutingPolicy

    with pytest.raises(ConfigError, match="positive total"):
        RoutingPolicy(weights={"ensemble": 1e308, "merged": 1e308})


@pytest.mark.parametrize("host, allowed", [("127.0.0.1", True), ("::1", True), ("10.1.2.3", False), (None, False)])
def test_admin_without_a_token_answers_loopback_only(host, allowed):
    from service.auth import Tokens
    from service.errors import AuthError

    tokens = Tokens(inference="", admin="")
    if allowed:
        tokens.check(None, "admin", host)
    else:
        with pytest.raises(AuthError) as e:
            tokens.check(None, "admin", host)
        assert e.value.status == 403


def test_oip_label_output_is_the_class_labels():
    from service import oip

    req = oip.InferRequest(None, np.zeros((2, 3), np.float32), {}, False, {})
    probs = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    body, _ = oip.response("m", "v", req, probs, [7, 3], {})
    import orjson

    outs = {o["name"]: o for o in orjson.loads(body)["outputs"]}
    assert outs["label"]["datatype"] == "INT64" and outs["label"]["data"] == [7, 3]
    body, _ = oip.response("m", "v", req, probs, ["cat", "dog"], {})
    outs = {o["name"]: o for o in orjson.loads(body)["outputs"]}
    assert outs["label"]["datatype"] == "BYTES" and outs["label"]["data"] == ["cat", "dog"]
    binary = oip.InferRequest(None, np.zeros((2, 3), np.float32), {"label": True}, False, {})
    with pytest.raises(InputError):
        oip.response("m", "v", binary, probs, ["cat", "dog"], {})
    assert [o["name"] for o in oip.metadata("m", "v", 3, ())["outputs"]] == ["probabilities"]  # regression


def test_requests_that_cannot_be_concatenated_are_answered_apart_instead_of_hanging():
    # once such a pair failed the joined call (a ValueError to both, not a hang); since named inputs go through
    # the batcher, requests join only when their other dimensions agree (service.inputs.can_join), so each is
    # answered by a call of its own
    from service.batching import AdaptiveBatcher

    batcher = AdaptiveBatcher(max_rows=64)
    inputs = [np.full((1, w), w, np.float32) for w in (4, 5)]  # one model, two widths

    async def main():
        def model(X):
            return X * 2

        calls = [batcher.run(model, X) for X in inputs]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=5)

    res = asyncio.run(main())
    assert [r.tolist() for r in res] == [(X * 2).tolist() for X in inputs]
    assert batcher.calls == 2 and batcher.requests == 2


def test_no_server_path_in_the_not_ready_error(tmp_path):
    from service.config import EngineConfig
    from service.engine import Engine
    from service.routing import RoutingPolicy

    secret = tmp_path / "srv" / "secret-place" / "bundle"
    for form in (f"{secret}/", str(secret), f"{tmp_path}//srv/secret-place/bundle"):
        engine = Engine(EngineConfig(bundle=form), RoutingPolicy())
        engine.start()
        assert not engine.ready and "secret-place" not in engine.error, engine.error


def test_reserved_member_names_are_refused(tiny_zoo, tmp_path):
    import shutil

    from fusion.build import ensure_zoo, load_data
    from fusion.recipe import Recipe, override

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    import json

    spec = json.loads((zoo / "mlp_0.json").read_text())
    (zoo / "merged.json").write_text(json.dumps({**spec, "name": "merged"}))
    (zoo / "mlp_0.safetensors").rename(zoo / "merged.safetensors")
    (zoo / "mlp_0.json").unlink()
    recipe = override(Recipe(), "zoo", dir=str(zoo))
    with pytest.raises(ConfigError, match="reserved"):
        ensure_zoo(recipe, load_data(recipe))
