"""Issue 21, item 8: error messages print plain values ("nan", "0.5", "[1.0, 2.0]"), never numpy or
torch reprs ("np.float64(nan)", "np.float32(2.0)", "array([...])", "tensor(...)")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.errors import ConfigError

REPRS = ("np.", "array(", "tensor(", "dtype")


def message(call) -> str:
    with pytest.raises(ConfigError) as exc:
        call()
    msg = str(exc.value)
    assert not any(r in msg for r in REPRS), msg
    return msg


@pytest.mark.parametrize("value, shown", [
    (np.float64("nan"), "got nan"), (np.float32(2.0), "got 2.0"), (torch.tensor(-1.0), "got -1.0"), (np.int64(7), "got 7"),
])
def test_merge_parameter_checks_print_plain_values(value, shown):
    from fusion.merge.registry import finite_check, range_check

    assert shown in message(lambda: range_check("ties", "density", value, 0.0, 1.0, lo_open=True))
    if not np.isfinite(float(value)):
        assert shown in message(lambda: finite_check("ties", "lambda", value))


def test_merge_literal_and_weight_checks_print_plain_values():
    from fusion.merge.registry import check_weights, literal_check

    assert "got 'x'" in message(lambda: literal_check("ties", "method", np.str_("x"), ("sum", "mean")))
    assert "got ['a', 'b']" in message(lambda: check_weights(np.array(["a", "b"]), 2))


def test_member_weight_check_prints_plain_values():
    from fusion.ensemble.base import check_weights

    assert "got ['a', 1.0]" in message(lambda: check_weights([np.str_("a"), np.float64(1.0)], 2))


def test_greedy_soup_score_prints_plain_values():
    from fusion.merge.methods import _score

    msg = message(lambda: _score(lambda state: np.array([0.5, 0.25]), {}, "the first model"))
    assert "got [0.5, 0.25]" in msg, msg
