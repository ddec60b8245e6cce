"""`auto`'s noise control (fusion/ensemble/selection.py): repeated stratified k-fold cross-fitting against a
direct loop over sklearn's folds, the output temperature's MAP fit (Gaussian prior on log T) against an
independent optimiser and on a separated case where the maximum-likelihood T runs to its bound, and a
tempered candidate reusing its base's fits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from sklearn.model_selection import StratifiedKFold

from fusion.ensemble import selection as sel
from fusion.errors import ConfigError


def _members(seed: int = 1, k: int = 4, n: int = 120, c: int = 3, strength=(2.0, 1.0, 0.5, 0.0)):
    """Members of different strength with independent noise: the weightings differ out of fold."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(c), n // c)
    z = np.stack([rng.normal(size=(n, c)) * 1.5 + s * np.eye(c)[y] for s in strength[:k]])
    return z, y


def _direct_oof(fit_predict, z, y, seed):
    """One stratified 5-fold cross-fitting (shuffled, `seed`), written out here."""
    out = np.zeros(z.shape[1:])
    for a, b in StratifiedKFold(5, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        out[b] = fit_predict(z[:, a], y[a], z[:, b])
    return out


def _nll(p, y):
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def test_repeated_out_of_fold_equals_a_direct_loop_over_seeds():
    z, y = _members()
    fit = sel.weighting("fit", "soft_vote")
    got = sel.repeated_out_of_fold(fit, z, y, n_splits=5, n_repeats=3, seed=7)
    assert got.shape == (3,) + z.shape[1:]
    for r in range(3):  # repeat r: the partition shuffled with seed 7 + r, the weights refitted in each fold
        ref = _direct_oof(lambda za, ya, zb: sel.combine(zb, sel.fit_weights(za, ya)), z, y, seed=7 + r)
        np.testing.assert_allclose(got[r], ref, rtol=1e-9, atol=1e-12)
    assert not np.allclose(got[0], got[1])  # different partitions, different cross-fitted predictions
    np.testing.assert_array_equal(got[0], sel.out_of_fold(fit, z, y, 5, seed=7))  # repeat 0 = the single scheme


def test_choose_averages_the_nll_over_the_repeats_and_scores_every_candidate_on_the_same_partitions():
    z, y = _members()
    cands = [sel.weighting(n, "soft_vote") for n in ("equal", "fit")]
    choice = sel.choose(cands, z, y, n_repeats=4, seed=2)
    rows = choice.record["candidates"]
    direct = {  # per repeat, computed here
        "equal": [_nll(sel.combine(z, None), y)] * 4,
        "fit": [_nll(_direct_oof(lambda za, ya, zb: sel.combine(zb, sel.fit_weights(za, ya)), z, y, seed=2 + r), y)
                for r in range(4)],
    }
    for name, per in direct.items():
        assert rows[name]["val_oof_repeats"] == pytest.approx(per, rel=1e-9)
        assert rows[name]["val_oof"]["nll"] == pytest.approx(np.mean(per), rel=1e-9)
    assert choice.name == min(direct, key=lambda n: np.mean(direct[n]))
    assert "4 x 5-fold" in choice.record["criterion"] and "averaged over the repeats" in choice.record["criterion"]
    # the gate's rows: one cross-fitted prediction per row, the repeat shuffled with `seed`
    chosen = next(c for c in cands if c.name == choice.name)
    np.testing.assert_array_equal(choice.val_oof_probs, sel.out_of_fold(chosen, z, y, 5, seed=2))
    # the accuracy is the mean over the repeats too
    def fit_predict(za, ya, zb):
        return sel.combine(zb, sel.fit_weights(za, ya))

    accs = [float((_direct_oof(fit_predict, z, y, seed=2 + r).argmax(-1) == y).mean()) for r in range(4)]
    assert rows["fit"]["val_oof"]["accuracy"] == pytest.approx(np.mean(accs))


def test_one_repeat_keeps_the_single_cross_fitting_and_one_candidate_is_not_repeated():
    z, y = _members()
    cands = [sel.weighting(n, "soft_vote") for n in ("equal", "fit")]
    single = sel.choose(cands, z, y)
    assert all("val_oof_repeats" not in r for r in single.record["candidates"].values())
    fit_oof = _direct_oof(lambda za, ya, zb: sel.combine(zb, sel.fit_weights(za, ya)), z, y, seed=0)
    assert single.record["candidates"]["fit"]["val_oof"]["nll"] == pytest.approx(_nll(fit_oof, y), rel=1e-9)
    assert "5-fold stratified cross-fitting on the validation split, shuffled with seed 0" in single.record["criterion"]
    alone = sel.choose(cands[1:], z, y, n_repeats=5)  # nothing to compare: one cross-fitting is recorded
    assert alone.record["candidates"]["fit"]["val_oof"] == single.record["candidates"]["fit"]["val_oof"]
    with pytest.raises(ConfigError, match="expected n_repeats >= 1; got 0"):
        sel.choose(cands, z, y, n_repeats=0)


# ---- the output temperature's prior -----------------------------------------------------------------


def _penalised(p, y, sd):
    """The MAP objective over T, written out here: summed NLL of p^(1/T) renormalised + (log T)^2 / (2 sd^2)."""
    def f(t):
        s = np.log(p) / t
        return float(-(s[np.arange(len(y)), y] - logsumexp(s, axis=1)).sum() + np.log(t) ** 2 / (2 * sd * sd))
    return f


@pytest.mark.parametrize("sd", [0.25, 0.5, 2.0])
def test_map_temperature_matches_an_independent_minimize_scalar(sd):
    z, y = _members(3, strength=(2.0, 2.0, 2.0, 2.0))
    p = sel.combine(z, None)
    ref = minimize_scalar(_penalised(p, y, sd), bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8})
    assert sel.fit_output_temperature(p, y, prior_sd=sd) == pytest.approx(ref.x, rel=1e-3)
    # the prior pulls T towards 1 from the maximum-likelihood T, less as it widens
    t_ml = sel.fit_output_temperature(p, y)
    t_map = sel.fit_output_temperature(p, y, prior_sd=sd)
    assert abs(np.log(t_map)) < abs(np.log(t_ml))
    assert abs(np.log(t_map) - np.log(t_ml)) < abs(np.log(sel.fit_output_temperature(p, y, prior_sd=sd / 2)) - np.log(t_ml))


def test_the_prior_keeps_t_finite_on_separated_rows_where_the_mle_runs_to_its_bound():
    """Every row right: the likelihood keeps improving as T -> 0 (separation); the MLE stops at the search
    bound, T = exp(-3), and the next misclassified row costs tens of nats. The MAP T stays moderate."""
    y = np.tile(np.arange(3), 20)
    rng = np.random.default_rng(0)
    p = np.full((60, 3), 0.2)
    p[np.arange(60), y] = 0.6 + 0.2 * rng.random(60)  # right on every row, not confident
    p /= p.sum(1, keepdims=True)
    t_ml = sel.fit_output_temperature(p, y)
    t_map = sel.fit_output_temperature(p, y, prior_sd=sel.LOG_T_PRIOR_SD)
    assert t_ml == pytest.approx(np.exp(-3.0), rel=1e-3)
    assert 0.1 < t_map < 1.0
    ref = minimize_scalar(_penalised(p, y, sel.LOG_T_PRIOR_SD), bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8})
    assert t_map == pytest.approx(ref.x, rel=1e-3)
    wrong = np.array([[0.2, 0.6, 0.2]])  # a held-out row the vote gets wrong (true class 0)
    cost = {t: -np.log(sel.apply_temperature(wrong, t)[0, 0]) for t in (t_ml, t_map)}
    assert cost[t_ml] > 20 > 5 > cost[t_map]


def test_map_temperature_refuses_a_non_positive_prior():
    z, y = _members()
    with pytest.raises(ConfigError, match=r"prior standard deviation of log T > 0.*got 0"):
        sel.fit_output_temperature(sel.combine(z, None), y, prior_sd=0)
    with pytest.raises(ConfigError, match=r"prior standard deviation of log T > 0.*got -1"):
        sel.tempered(sel.weighting("equal", "soft_vote"), prior_sd=-1)


def test_tempered_with_a_prior_out_of_fold_equals_the_direct_computation_and_reuses_the_base_fits():
    z, y = _members()
    calls = []
    base = sel.weighting("fit", "soft_vote")
    counted = sel.Candidate("fit", "soft_vote", lambda zz, yy: calls.append(len(yy)) or base.fit(zz, yy), base.predict)
    cands = [counted, sel.tempered(counted, prior_sd=0.5)]
    choice = sel.choose(cands, z, y, n_repeats=2)
    # one fit per fold per repeat and one on every row, shared by `fit` and `fit+temperature`
    assert len(calls) == 2 * 5 + 1
    row = choice.record["candidates"]["fit+temperature"]
    assert row["temperature_fit"].startswith("MAP, log T ~ N(0, 0.5^2)")

    def fp(za, ya, zb):
        w = sel.fit_weights(za, ya)
        return sel.apply_temperature(sel.combine(zb, w), sel.fit_output_temperature(sel.combine(za, w), ya, prior_sd=0.5))

    per = [_nll(_direct_oof(fp, z, y, seed=r), y) for r in range(2)]
    assert row["val_oof_repeats"] == pytest.approx(per, rel=1e-9)
    w = sel.fit_weights(z, y)
    assert row["temperature"] == pytest.approx(sel.fit_output_temperature(sel.combine(z, w), y, prior_sd=0.5))
    # no prior: the maximum-likelihood T, as before
    assert sel.choose([sel.tempered(base)], z, y).record["candidates"]["fit+temperature"]["temperature_fit"] == "maximum likelihood"


def test_the_build_uses_five_repeats_and_the_prior(tiny_zoo, digits):
    from fusion.build import choose_ensemble, ensure_zoo
    from fusion.recipe import Recipe, override

    recipe = override(Recipe(), "zoo", dir=str(tiny_zoo))
    _, record = choose_ensemble(recipe, ensure_zoo(recipe, digits), digits)
    rows = record["candidates"]
    assert f"{sel.AUTO_REPEATS} x 5-fold" in record["criterion"]
    assert all(len(r["val_oof_repeats"]) == sel.AUTO_REPEATS for r in rows.values())
    for name in ("equal", "select", "fit"):
        assert rows[f"{name}+temperature"]["temperature_fit"].startswith(f"MAP, log T ~ N(0, {sel.LOG_T_PRIOR_SD:g}^2)")
    assert record["chosen"] == min(rows, key=lambda n: rows[n]["val_oof"]["nll"])
