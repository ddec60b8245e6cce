"""Issue 13, finding 6, the variant the load-time check cannot see: a graph whose work depends on the
input's values passes every check on zeros and probe rows, then hangs a worker on one crafted request.
Every onnxruntime run has a deadline (FUSION_RUN_TIMEOUT_S, service/runtime.py RunDeadline)."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from tests.reliability.bundles import N_FEATURES, input_loop_model


def model(limit_s: float):
    from service.runtime import Model, RunDeadline

    sess = ort.InferenceSession(input_loop_model(), providers=["CPUExecutionProvider"])
    return Model("looper", sess, sess.get_inputs()[0].name, "cpu", deadline=RunDeadline(limit_s))


def test_a_run_past_its_deadline_is_stopped_and_answers_504():
    from service.errors import DeadlineError, status_for

    m = model(limit_s=0.5)
    ok = m(np.full((2, N_FEATURES), 16.0, np.float32))  # digits-like values: 16 iterations
    assert ok.shape == (2, 10) and np.isfinite(ok).all()
    crafted = np.zeros((1, N_FEATURES), np.float32)
    crafted[0, 0] = 1e18  # 10^18 iterations: centuries
    t0 = time.monotonic()
    with pytest.raises(DeadlineError, match="FUSION_RUN_TIMEOUT_S") as err:
        m(crafted)
    elapsed = time.monotonic() - t0
    print(f"[reliability] run-deadline: stopped after {elapsed:.2f} s (limit 0.5 s)")
    assert 0.4 <= elapsed < 5.0, elapsed  # the watchdog polls every limit/4; generous for a loaded machine
    assert status_for(err.value) == 504
    again = m(np.zeros((1, N_FEATURES), np.float32))  # the session is still usable afterwards
    assert np.isfinite(again).all()


def test_concurrent_runs_each_keep_their_own_deadline():
    """A stopped run does not stop the others running beside it on the same session."""
    m = model(limit_s=0.6)
    crafted = np.zeros((1, N_FEATURES), np.float32)
    crafted[0, 0] = 1e18
    errors: list[BaseException] = []

    def hang():
        try:
            m(crafted)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=hang)
    t.start()
    fine = [m(np.full((4, N_FEATURES), 3.0, np.float32)) for _ in range(20)]  # while the crafted run hangs
    t.join(timeout=10)
    assert not t.is_alive()
    assert len(errors) == 1 and type(errors[0]).__name__ == "DeadlineError"
    assert all(f.shape == (4, 10) for f in fine)


def test_the_limit_comes_from_the_settings():
    from service import config

    assert config.load({}).runtime.run_timeout_s == 30.0
    assert config.load({"FUSION_TIMEOUT_S": "12"}).runtime.run_timeout_s == 12.0  # follows the request timeout by default
    assert config.load({"FUSION_TIMEOUT_S": "12", "FUSION_RUN_TIMEOUT_S": "3"}).runtime.run_timeout_s == 3.0
