"""`members` mode: one session per member, combined in numpy, with a failure policy and a deadline.

Pure tests drive MembersEnsemble with stub members (faults wrapped around them by
tests/hooks/member_faults.py); server tests run a real `bentoml serve` with FUSION_FAULT making a
member raise or hang (the test-only hook tests/server.py loads into the server's processes). Oracles: the member ONNX files run offline in
onnxruntime and soft-voted in numpy (tests/serving_util.Oracle).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from fusion.errors import ConfigError, UnavailableError
from service.errors import DeadlineError
from service.members import FailurePolicy, MembersEnsemble
from tests.hooks.member_faults import Fault, parse, with_faults
from tests.server import Server
from tests.serving_util import Oracle, assert_error_shape, rows_json

ATOL = 1e-5
DEADLINE_MS = 400
HANG_S = 1.2
MARGIN_S = 0.6  # loopback, JSON and a loaded 2-core machine

# ---- pure: MembersEnsemble with stub members -------------------------------------------------------------


def stub_loaded(outputs: dict[str, np.ndarray], combiner: dict | None = None):
    """A stand-in for runtime.LoadedBundle: the ensemble entry and a callable per member."""
    entry = SimpleNamespace(members=tuple(outputs), combiner=combiner or {"name": "soft_vote", "weights": None})
    manifest = SimpleNamespace(variants={"ensemble": entry})
    models = {name: (lambda X, out=out: np.repeat(out[None], len(X), 0)) for name, out in outputs.items()}
    return SimpleNamespace(manifest=manifest, model=lambda name: models[name])


OUTS = {"a": np.array([0.7, 0.2, 0.1]), "b": np.array([0.1, 0.8, 0.1]), "c": np.array([0.2, 0.2, 0.6])}
X2 = np.zeros((2, 4), dtype=np.float32)


def test_all_members_answer():
    ens = MembersEnsemble(stub_loaded(OUTS), FailurePolicy.parse("strict", 1000))
    out, extra = ens(X2)
    np.testing.assert_allclose(out, np.repeat(np.mean(list(OUTS.values()), 0)[None], 2, 0), atol=1e-7)
    assert extra == {"degraded": False, "members_answered": ["a", "b", "c"]}
    ens.close()


def test_quorum_renormalises_the_weights_of_the_members_that_answered():
    combiner = {"name": "soft_vote", "weights": [1.0, 2.0, 3.0]}
    ens = MembersEnsemble(with_faults(stub_loaded(OUTS, combiner), "b=raise"), FailurePolicy.parse("quorum:2", 1000))
    out, extra = ens(X2)
    np.testing.assert_allclose(out[0], (1 * OUTS["a"] + 3 * OUTS["c"]) / 4, atol=1e-7)
    assert extra["degraded"] is True and extra["members_answered"] == ["a", "c"]
    assert "injected fault" in extra["members_failed"]["b"]
    ens.close()


def test_quorum_not_met_and_strict_failures():
    ens = MembersEnsemble(with_faults(stub_loaded(OUTS), "a=raise,c=raise"), FailurePolicy.parse("quorum:2", 1000))
    with pytest.raises(UnavailableError, match="only 1 of 3 members answered; quorum needs 2"):
        ens(X2)
    strict = MembersEnsemble(with_faults(stub_loaded(OUTS), "c=raise"), FailurePolicy.parse("strict", 1000))
    with pytest.raises(UnavailableError, match="member 'c' failed") as err:
        strict(X2)
    assert not isinstance(err.value, DeadlineError)
    # a stacked ensemble needs every member, whatever the policy
    stacking = {"name": "stacking", "coef": np.eye(3).tolist(), "intercept": [0, 0, 0]}
    q = MembersEnsemble(with_faults(stub_loaded(OUTS, stacking), "a=raise"), FailurePolicy.parse("quorum:1", 1000))
    with pytest.raises(UnavailableError, match="member 'a' failed"):
        q(X2)
    for e in (ens, strict, q):
        e.close()


def test_deadline_is_a_504_kind_of_failure_and_is_kept():
    ens = MembersEnsemble(with_faults(stub_loaded(OUTS), "b=hang:0.5"), FailurePolicy.parse("strict", 100))
    t0 = time.perf_counter()
    with pytest.raises(DeadlineError, match="member 'b' failed: no answer within the 100 ms deadline"):
        ens(X2)
    assert time.perf_counter() - t0 < 0.4
    quorum = MembersEnsemble(with_faults(stub_loaded(OUTS), "b=hang:0.5"), FailurePolicy.parse("quorum:2", 100))
    out, extra = quorum(X2)
    assert extra["members_answered"] == ["a", "c"] and "deadline" in extra["members_failed"]["b"]
    np.testing.assert_allclose(out[0], (OUTS["a"] + OUTS["c"]) / 2, atol=1e-7)
    ens.close()
    quorum.close()


def test_hung_members_saturate_into_a_503_not_a_queue():
    ens = MembersEnsemble(with_faults(stub_loaded(OUTS), "a=hang:0.6,b=hang:0.6,c=hang:0.6"), FailurePolicy.parse("quorum:1", 50))
    with pytest.raises(UnavailableError, match="only 0 of 3"):
        ens(X2)  # 3 hung member runs in flight, pool bound 6
    with pytest.raises(UnavailableError, match="only 0 of 3"):
        ens(X2)  # 6 in flight
    with pytest.raises(UnavailableError, match="saturated"):
        ens(X2)
    ens.close()


@pytest.mark.parametrize("text, match", [("quorum", "quorum:k"), ("quorum:0", "quorum:k"), ("quorum:x", "quorum:k"),
                                         ("majority", "quorum:k")])
def test_failure_policy_parse_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        FailurePolicy.parse(text, 1000)


def test_policy_and_fault_parsing():
    assert FailurePolicy.parse("", 250) == FailurePolicy(None, 0.25)
    assert FailurePolicy.parse("quorum:3", 1000) == FailurePolicy(3, 1.0)
    with pytest.raises(ConfigError, match="positive"):
        FailurePolicy.parse("strict", 0)
    assert parse("mlp_1=raise, cnn_0=hang:2.5") == {"mlp_1": Fault("raise"), "cnn_0": Fault("hang", 2.5)}
    with pytest.raises(ConfigError, match="FUSION_FAULT"):
        parse("mlp_1=explode")
    with pytest.raises(ConfigError, match="needs at least 4"):
        MembersEnsemble(stub_loaded(OUTS), FailurePolicy.parse("quorum:4", 1000))


HOOK_PROBE = """
import sys
sys.path.insert(0, {root!r})
from service.members import FailurePolicy, MembersEnsemble
from tests.test_members_mode import OUTS, X2, stub_loaded
ens = MembersEnsemble(stub_loaded(OUTS), FailurePolicy.parse("quorum:2", 1000))
print(ens(X2)[1]["members_failed"]["b"])
"""


def test_the_server_hook_injects_faults_only_where_asked():
    """tests/server.py's hook (tests/hooks/sitecustomize.py): with FUSION_FAULT and the hooks directory on
    PYTHONPATH, a fresh interpreter's MembersEnsemble runs its members through the faults; production
    code (service/members.py) has no fault of its own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.hooks import member_faults
    from tests.server import Server

    root = str(Path(__file__).resolve().parents[1])
    env = {"PATH": os.environ.get("PATH", ""), "FUSION_FAULT": "b=raise", "PYTHONPATH": member_faults.HOOKS_DIR}
    out = subprocess.run([sys.executable, "-c", HOOK_PROBE.format(root=root)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "RuntimeError: injected fault in member 'b'", out.stderr[-2000:]
    assert "fault" not in Path(root, "service", "members.py").read_text().lower()
    assert member_faults.HOOKS_DIR in Server(None, env={"FUSION_FAULT": "b=raise"}).env["PYTHONPATH"]
    assert member_faults.HOOKS_DIR not in Server(None, env={"FUSION_FAULT": ""}).env.get("PYTHONPATH", "")


# ---- through a real server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(tiny_bundle):
    return Oracle(tiny_bundle)


@pytest.fixture(scope="module")
def X(digits):
    return np.ascontiguousarray(digits.X_test[:200], dtype=np.float32)


def start(bundle, **env) -> tuple[Server, httpx.Client]:
    srv = Server(bundle, env={k: str(v) for k, v in env.items()}).start()
    return srv, httpx.Client(base_url=srv.url, timeout=30)


def predict_members(c: httpx.Client, X: np.ndarray):
    return c.post("/predict", json={"inputs": rows_json(X)}, headers={"X-Variant": "members"})


@pytest.mark.server
class TestHealthy:
    @pytest.fixture(scope="class")
    def c(self, tiny_bundle):
        srv, c = start(tiny_bundle, FUSION_FAILURE_POLICY="strict")
        yield c
        c.close()
        srv.stop()

    def test_members_mode_equals_the_fused_ensemble(self, c, oracle, X):
        for s in range(0, len(X), 50):
            r = predict_members(c, X[s:s + 50])
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["variant"] == "members" == r.headers["x-variant"]
            assert body["degraded"] is False and body["members_answered"] == oracle.members
            fused = c.post("/predict", json={"inputs": rows_json(X[s:s + 50])}, headers={"X-Variant": "ensemble"}).json()
            np.testing.assert_allclose(body["probabilities"], fused["probabilities"], atol=ATOL)
            np.testing.assert_allclose(body["probabilities"], oracle.soft_vote(oracle.members, X[s:s + 50]), atol=ATOL)
            np.testing.assert_allclose(body["probabilities"], oracle("ensemble", X[s:s + 50]), atol=ATOL)
            assert body["predictions"] == fused["predictions"]

    def test_members_is_an_oip_model_too(self, c, oracle, X):
        req = {"inputs": [{"name": "input", "shape": [10, X.shape[1]], "datatype": "FP32", "data": X[:10].ravel().tolist()}]}
        r = c.post("/v2/models/members/infer", json=req)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (10, -1)), oracle("ensemble", X[:10]), atol=ATOL)
        assert r.json()["parameters"]["degraded"] is False


@pytest.mark.server
class TestStrictRaise:
    @pytest.fixture(scope="class")
    def c(self, tiny_bundle):
        srv, c = start(tiny_bundle, FUSION_FAILURE_POLICY="strict", FUSION_FAULT="mlp_1=raise")
        yield c
        c.close()
        srv.stop()

    def test_strict_503_names_the_member(self, c, X, oracle):
        r = predict_members(c, X[:5])
        body = assert_error_shape(r, 503)
        assert "mlp_1" in body["error"] and "strict" in body["error"]
        assert r.headers.get("retry-after")
        r = c.post("/v2/models/members/infer", json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                                 "data": X[0].tolist()}]})
        assert "mlp_1" in assert_error_shape(r, 503)["error"]
        # the fused ensemble and the member as a variant of its own are unaffected
        r = c.post("/predict", json={"inputs": rows_json(X[:5])}, headers={"X-Variant": "mlp_1"})
        np.testing.assert_allclose(r.json()["probabilities"], oracle("mlp_1", X[:5]), atol=ATOL)
        r = c.post("/predict", json={"inputs": rows_json(X[:5])})
        assert r.json()["variant"] == "ensemble"


@pytest.mark.server
class TestQuorumRaise:
    @pytest.fixture(scope="class")
    def c(self, tiny_bundle):
        srv, c = start(tiny_bundle, FUSION_FAILURE_POLICY="quorum:3", FUSION_FAULT="mlp_1=raise")
        yield c
        c.close()
        srv.stop()

    def test_quorum_answers_degraded_from_the_healthy_members(self, c, X, oracle):
        healthy = [m for m in oracle.members if m != "mlp_1"]
        for s in range(0, len(X), 50):
            r = predict_members(c, X[s:s + 50])
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["degraded"] is True
            assert body["members_answered"] == healthy
            assert set(body["members_failed"]) == {"mlp_1"} and "injected fault" in body["members_failed"]["mlp_1"]
            want = oracle.soft_vote(healthy, X[s:s + 50])
            np.testing.assert_allclose(body["probabilities"], want, atol=ATOL)
            assert body["predictions"] == oracle.labels(want)
        # the degraded answer differs from the full ensemble somewhere (the check above is not vacuous)
        assert np.abs(oracle.soft_vote(healthy, X) - oracle("ensemble", X)).max() > 1e-3


@pytest.mark.server
class TestStrictHang:
    @pytest.fixture(scope="class")
    def c(self, tiny_bundle):
        srv, c = start(tiny_bundle, FUSION_FAILURE_POLICY="strict", FUSION_FAULT=f"cnn_0=hang:{HANG_S}",
                       FUSION_MEMBER_DEADLINE_MS=DEADLINE_MS)
        yield c
        c.close()
        srv.stop()

    def test_strict_hang_is_504_within_the_deadline(self, c, X):
        t0 = time.perf_counter()
        r = predict_members(c, X[:3])
        elapsed = time.perf_counter() - t0
        body = assert_error_shape(r, 504)
        assert "cnn_0" in body["error"] and "deadline" in body["error"]
        assert DEADLINE_MS / 1e3 * 0.9 <= elapsed < DEADLINE_MS / 1e3 + MARGIN_S

    def test_a_hanging_member_does_not_stall_other_requests(self, c, X):
        """While a members request waits for its hung member, other requests are still served."""
        time.sleep(HANG_S)  # let earlier hung runs finish
        done = {}

        def slow():
            predict_members(c, X[:1])
            done["members"] = time.perf_counter()

        t = threading.Thread(target=slow)
        t0 = time.perf_counter()
        t.start()
        time.sleep(0.1)
        with httpx.Client(base_url=str(c.base_url), timeout=30) as other:
            r = other.post("/predict", json={"inputs": rows_json(X[:1])}, headers={"X-Variant": "ensemble"})
        done["ensemble"] = time.perf_counter()
        t.join(10)
        assert r.status_code == 200
        # blocked, the ensemble request would be answered only after the members one (seen before the fix)
        assert done["ensemble"] < done["members"], {k: v - t0 for k, v in done.items()}


@pytest.mark.server
class TestQuorumHang:
    @pytest.fixture(scope="class")
    def c(self, tiny_bundle):
        srv, c = start(tiny_bundle, FUSION_FAILURE_POLICY="quorum:3", FUSION_FAULT=f"cnn_0=hang:{HANG_S}",
                       FUSION_MEMBER_DEADLINE_MS=DEADLINE_MS)
        yield c
        c.close()
        srv.stop()

    def test_quorum_hang_is_a_degraded_answer_within_the_deadline(self, c, X, oracle):
        healthy = [m for m in oracle.members if m != "cnn_0"]
        for k in range(2):
            t0 = time.perf_counter()
            r = predict_members(c, X[k * 20:(k + 1) * 20])
            elapsed = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["degraded"] is True and body["members_answered"] == healthy
            assert "deadline" in body["members_failed"]["cnn_0"]
            np.testing.assert_allclose(body["probabilities"], oracle.soft_vote(healthy, X[k * 20:(k + 1) * 20]), atol=ATOL)
            assert DEADLINE_MS / 1e3 * 0.9 <= elapsed < DEADLINE_MS / 1e3 + MARGIN_S


def test_a_member_that_refuses_the_input_values_fails_the_request_as_the_inputs_fault():
    """A member's InputError (runtime.Model: onnxruntime refused the values, e.g. ids past its embedding table)
    is the client's input: when the request cannot be answered it is that 400, not a 503 member failure."""
    from fusion.errors import InputError

    loaded = stub_loaded(OUTS)
    real = loaded.model

    def refuses(X):
        raise InputError("'b' refused the input values; onnxruntime: indices element out of data bounds")

    loaded.model = lambda name: refuses if name == "b" else real(name)
    for policy in ("strict", "quorum:3"):
        ens = MembersEnsemble(loaded, FailurePolicy.parse(policy, 1000))
        with pytest.raises(InputError, match="'b' refused the input values") as err:
            ens(X2)
        assert not isinstance(err.value, UnavailableError)
        ens.close()
    ens = MembersEnsemble(loaded, FailurePolicy.parse("quorum:2", 1000))  # the quorum answers without it, as for any failure
    out, extra = ens(X2)
    assert extra["members_answered"] == ["a", "c"] and "refused the input values" in extra["members_failed"]["b"]
    ens.close()
