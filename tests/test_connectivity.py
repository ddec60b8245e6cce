"""fusion.connectivity: barriers by hand, naive vs aligned interpolation on digits, BN reset, curves, diagnostics."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from fusion.align import apply_permutation, spec_for, weight_matching
from fusion.connectivity import (
    BARRIER_CONVENTION,
    barriers,
    bezier_path,
    bezier_state,
    evaluate,
    interpolation_path,
    lerp_state,
    plot_path,
    task_vector_diagnostics,
    train_bezier,
)
from fusion.errors import ConfigError
from fusion.merge import reset_bn
from fusion.zoo import TrainConfig, build_model, init_scaler, seed_everything, train

MLP = {"hidden": [64, 64]}
CNN = {"channels": [4, 8], "hidden": 16}


@pytest.fixture(scope="module")
def data(digits):
    return digits  # the session's digits split (tests/conftest.py); torch runs on one thread there too


def _trained(arch, args, seed, data, epochs):
    seed_everything(seed)
    m = build_model(arch, **args)
    init_scaler(m, data.scaling)
    return train(m, data, TrainConfig(epochs=epochs), seed, desc=f"{arch}{seed}")


@pytest.fixture(scope="module")
def pair(data):
    """Two digits MLPs trained independently (different seeds), a few epochs each."""
    return _trained("mlp", MLP, 1, data, 8), _trained("mlp", MLP, 2, data, 8)


def test_barriers_by_hand():
    # peak in the middle: both conventions agree
    r = barriers([0.0, 0.5, 1.0], [1.0, 3.0, 2.0], [0.9, 0.5, 0.8])
    assert r["barrier"] == pytest.approx(1.5) and r["barrier_entezari"] == pytest.approx(1.5)
    assert r["barrier_convention"] == BARRIER_CONVENTION == "max_minus_mean_endpoints"
    assert r["accuracy_barrier"] == pytest.approx(0.85 - 0.5)
    # monotone path: the max is an endpoint; Git Re-Basin's convention is positive, Entezari's is 0
    r = barriers([0.0, 0.5, 1.0], [1.0, 2.0, 5.0])
    assert r["barrier"] == pytest.approx(5.0 - 3.0) and r["barrier_entezari"] == pytest.approx(0.0)
    assert r["barrier_argmax"] == 1.0 and "accuracy_barrier" not in r


def test_naive_average_collapses_but_aligned_midpoint_holds(pair, data, tmp_path):
    a, b = pair
    sa, sb = a.state_dict(), b.state_dict()
    spec = spec_for("mlp", MLP)
    sb_aligned = apply_permutation(spec, weight_matching(spec, sa, sb), sb)
    naive = interpolation_path(a, sa, sb, data.X_val, data.y_val, n_points=5)
    aligned = interpolation_path(a, sa, sb_aligned, data.X_val, data.y_val, n_points=5)
    json.dumps([naive, aligned])  # JSON-serialisable as is
    assert naive["accuracy"][0] == aligned["accuracy"][0] and naive["accuracy"][-1] == aligned["accuracy"][-1]  # same function
    assert naive["barrier"] > 0.3 and aligned["barrier"] < naive["barrier"] / 3
    assert aligned["accuracy"][2] > naive["accuracy"][2]
    assert aligned["accuracy"][2] > 0.9 * min(aligned["accuracy"][0], aligned["accuracy"][-1])
    png = plot_path({"naive": naive, "aligned": aligned}, tmp_path / "path.png", title="digits MLP")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_path_endpoints_are_the_models(pair, data):
    a, b = pair
    r = interpolation_path(a, a.state_dict(), b.state_dict(), data.X_val, data.y_val, n_points=3)
    assert r["lambdas"] == [0.0, 0.5, 1.0] and r["reset_bn"] is False and r["loss_name"] == "cross_entropy"
    assert r["loss"][0] == evaluate(a, data.X_val, data.y_val)[0]
    assert (r["loss"][-1], r["accuracy"][-1]) == evaluate(b, data.X_val, data.y_val)
    mid = lerp_state(a.state_dict(), b.state_dict(), 0.5)
    for k, v in mid.items():
        torch.testing.assert_close(v, (a.state_dict()[k] + b.state_dict()[k]) / 2)
    with pytest.raises(ConfigError, match="expected n_points >= 2; got 1"):
        interpolation_path(a, a.state_dict(), b.state_dict(), data.X_val, data.y_val, n_points=1)
    with pytest.raises(ConfigError, match="expected 3 targets"):
        evaluate(a, data.X_val[:3], data.y_val[:4])


def _cnn_with_stats(seed, data):
    """An untrained CNN whose BatchNorm statistics come from a few batches (enough for this check)."""
    torch.manual_seed(seed)
    m = build_model("cnn", **CNN)
    init_scaler(m, data.scaling)
    with torch.no_grad():
        m.train()(torch.as_tensor(data.X_train[seed * 50 : seed * 50 + 50]))
    return m.eval()


def test_batchnorm_is_reset_at_every_lambda(data):
    a, b = _cnn_with_stats(5, data), _cnn_with_stats(6, data)
    X = data.X_train[:400]
    r = interpolation_path(a, a.state_dict(), b.state_dict(), data.X_val, data.y_val, n_points=3, X_bn=X)
    assert r["reset_bn"] is True
    ref = reset_bn(copy.deepcopy(a), X)  # independent: recompute A's statistics, then evaluate
    assert r["loss"][0] == pytest.approx(evaluate(ref, data.X_val, data.y_val)[0], rel=1e-6)
    no_reset = interpolation_path(a, a.state_dict(), b.state_dict(), data.X_val, data.y_val, n_points=3, reset_bn=False)
    assert no_reset["loss"][0] == evaluate(a, data.X_val, data.y_val)[0]
    assert a.bn1.running_mean.ne(ref.bn1.running_mean).any()  # the caller's model was not touched


def test_bezier_curve_endpoints_and_training(pair, data):
    a, b = pair
    sa, sb = a.state_dict(), b.state_dict()
    sc = train_bezier(a, sa, sb, data.X_train, data.y_train, epochs=2, lr=5e-3, seed=0)
    assert set(sc) == set(sa)
    for t, ref in ((0.0, sa), (1.0, sb)):
        point = bezier_state(sa, sc, sb, t)
        assert all(torch.equal(point[k], ref[k]) for k in sa)
    curve = bezier_path(a, sa, sc, sb, data.X_val, data.y_val, n_points=5)
    line = interpolation_path(a, sa, sb, data.X_val, data.y_val, n_points=5)
    json.dumps(curve)
    assert curve["path"] == "bezier" and curve["loss"][2] < line["loss"][2]
    assert curve["barrier"] < line["barrier"]
    again = train_bezier(a, sa, sb, data.X_train[:200], data.y_train[:200], epochs=1, lr=5e-3, seed=0)
    twice = train_bezier(a, sa, sb, data.X_train[:200], data.y_train[:200], epochs=1, lr=5e-3, seed=0)
    assert all(torch.equal(again[k], twice[k]) for k in sc)  # seeded


def test_task_vector_diagnostics_by_hand():
    base = {"w": torch.zeros(5)}
    t1, t2, t3 = [1.0, 2.0, 0.0, -1.0, 2.0], [1.0, -2.0, 3.0, 0.0, 3.0], [-1.0, -2.0, 0.0, 0.0, 0.0]
    r = task_vector_diagnostics([{"w": torch.tensor(t)} for t in (t1, t2, t3)], base)
    json.dumps(r)

    def cos(u, v):
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    assert r["cosine"][0][1] == pytest.approx(cos(t1, t2)) and r["cosine"][1][2] == pytest.approx(cos(t2, t3))
    assert r["mean_pairwise_cosine"] == pytest.approx((cos(t1, t2) + cos(t1, t3) + cos(t2, t3)) / 3)
    # pairs, among entries where both are non-zero: (1,2) entries 0,1,4 -> 1 conflict; (1,3) 0,1 -> 2; (2,3) 0,1 -> 1
    assert r["sign_conflict"][0][1] == pytest.approx(1 / 3)
    assert r["sign_conflict"][0][2] == pytest.approx(1.0)
    assert r["sign_conflict"][1][2] == pytest.approx(1 / 2)
    # entries with >= 2 non-zero values: 0 (+,+,-), 1 (+,-,-), 4 (+,+): two disagree
    assert r["sign_conflict_rate"] == pytest.approx(2 / 3)
    assert r["norms"][0] == pytest.approx(math.sqrt(10))
    with pytest.raises(ConfigError, match="expected at least 2 models"):
        task_vector_diagnostics([{"w": torch.ones(5)}], base)
