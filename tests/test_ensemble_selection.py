"""Weights chosen from data (fusion/ensemble/selection.py): Caruana et al.'s ensemble selection against a
hand-computed sequence, fitted simplex weights against an independent optimiser, `auto` against out-of-fold
figures computed here, the gate on constructed cases, and the fused ONNX graph against numpy with the chosen
weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion.ensemble import selection as sel
from fusion.errors import ConfigError


def binary_logits(p_true: dict[str, list[float]], y: np.ndarray) -> np.ndarray:
    """(K, N, 2) logits whose softmax gives each member's probability `p_true` on the true class y."""
    out = []
    for p in p_true.values():
        p = np.asarray(p, dtype=np.float64)
        probs = np.where(y[:, None] == np.arange(2), p[:, None], 1 - p[:, None])
        out.append(np.log(probs))
    return np.stack(out)


# Three members, three rows; p(true class) per row. The soft vote's log loss of a multiset S of members is
# -mean_i log(mean_{k in S} p_k[i]). Computed by hand (rounded to 5 digits) for each step's candidates:
HAND = {"A": [0.9, 0.35, 0.7], "B": [0.5, 0.8, 0.6], "C": [0.65, 0.6, 0.45]}
HAND_Y = np.array([0, 1, 0])
HAND_STEPS = [  # (log loss after adding A, B, C to the current ensemble) -> pick
    ({"A": 0.50395, "B": 0.47571, "C": 0.58004}, "B"),  # {} + B: -(ln .5 + ln .8 + ln .6)/3
    ({"A": 0.44695, "B": 0.47571, "C": 0.51814}, "A"),  # {B} + A: p = (.7, .575, .65)
    ({"A": 0.45477, "B": 0.44810, "C": 0.48626}, "B"),  # {B, A} + B: p = (.6333, .65, .6333); B again
    ({"A": 0.44695, "B": 0.45184, "C": 0.47743}, "A"),  # {B, A, B} + A: p = (.7, .575, .65)
    ({"A": 0.45050, "B": 0.44661, "C": 0.47003}, "B"),  # {B, A, B, A} + B
]


def test_selection_with_replacement_reproduces_the_hand_computed_sequence():
    z = binary_logits(HAND, HAND_Y)
    names = list(HAND)
    # the hand figures, recomputed by a naive loop over multisets (no code under test)
    chosen: list[str] = []
    for expected, pick in HAND_STEPS:
        for n, v in expected.items():
            p = np.mean([HAND[m] for m in chosen + [n]], axis=0)
            assert -np.log(p).mean() == pytest.approx(v, abs=1e-5)
        chosen.append(pick)
    counts, picks = sel.greedy_selection(z, HAND_Y, combiner="soft_vote", metric="log_loss", n_iter=len(HAND_STEPS))
    assert [names[k] for k in picks] == [pick for _, pick in HAND_STEPS] == ["B", "A", "B", "A", "B"]
    assert counts.tolist() == [2, 3, 0]
    # sorted initialization with the 2 best single members (B 0.47571, then A 0.50395), then the greedy steps
    _, picks = sel.greedy_selection(z, HAND_Y, n_iter=1, init_best=2)
    assert [names[k] for k in picks] == ["B", "A", "B"]
    # a bag without B: A alone (0.50395 < C's 0.58004), then {A} + A (0.50395) beats {A} + C: p = (.775, .475,
    # .575), 0.51757: selection with replacement picks A again
    p_ac = np.mean([HAND["A"], HAND["C"]], axis=0)
    assert -np.log(p_ac).mean() == pytest.approx(0.51757, abs=1e-5)
    _, picks = sel.greedy_selection(z, HAND_Y, n_iter=2, members=[0, 2])
    assert [names[k] for k in picks] == ["A", "A"]


def test_selection_on_accuracy_and_bagged_counts_sum_over_bags():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    z = rng.normal(size=(5, 200, 4)) + 3 * np.eye(4)[y] * np.array([2.0, 1.0, 0.5, 0.2, 0.1])[:, None, None]
    counts, picks = sel.greedy_selection(z, y, metric="accuracy", n_iter=3)
    acc = [float((z[k].argmax(-1) == y).mean()) for k in range(5)]
    assert picks[0] == int(np.argmax(acc))  # first pick: the most accurate member (the first of equals)
    cfg = sel.SelectionConfig(n_iter=4, n_bags=6, bag_fraction=0.4, seed=3)
    bagged = sel.bagged_selection(z, y, cfg)
    assert bagged.sum() == 6 * 4 and (bagged >= 0).all()
    # the same sum computed bag by bag with the documented bag draw
    rng = np.random.default_rng(3)
    by_hand = np.zeros(5, dtype=int)
    for _ in range(6):
        bag = rng.choice(5, size=2, replace=False)
        by_hand += sel.greedy_selection(z, y, n_iter=4, members=bag)[0]
    assert bagged.tolist() == by_hand.tolist()
    with pytest.raises(ConfigError, match="expected a selection metric"):
        sel.SelectionConfig(metric="auc")


def _members(seed: int, k: int, n: int = 300, c: int = 5, strength=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    s = np.linspace(2.5, 0.5, k) if strength is None else np.asarray(strength)
    return rng.normal(size=(k, n, c)) * 1.5 + s[:, None, None] * np.eye(c)[y], y


@pytest.mark.parametrize("combiner", ["soft_vote", "logit_mean"])
def test_fitted_weights_match_a_grid_search_for_two_members(combiner):
    z, y = _members(0, 2)
    w = sel.fit_weights(z, y, combiner)
    grid = np.linspace(0, 1, 10001)
    values = [sel.weighted_nll(np.array([a, 1 - a]), z, y, combiner) for a in grid]
    best = grid[int(np.argmin(values))]
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(best, abs=2e-3)
    assert sel.weighted_nll(w, z, y, combiner) <= min(values) + 1e-9


@pytest.mark.parametrize("combiner", ["soft_vote", "logit_mean", "geometric_mean"])
def test_fitted_weights_match_slsqp_on_the_simplex(combiner):
    from scipy.optimize import minimize

    z, y = _members(1, 4, strength=[2.0, 1.8, 0.3, 1.0])
    w = sel.fit_weights(z, y, combiner)
    ref = minimize(lambda v: sel.weighted_nll(np.maximum(v, 0) + 1e-15, z, y, combiner), np.full(4, 0.25),
                   method="SLSQP", bounds=[(0, 1)] * 4, constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
                   options={"ftol": 1e-12, "maxiter": 500})
    assert ref.success, ref.message
    assert sel.weighted_nll(w, z, y, combiner) == pytest.approx(ref.fun, abs=1e-6)
    np.testing.assert_allclose(w, np.maximum(ref.x, 0) / np.maximum(ref.x, 0).sum(), atol=1e-2)


def test_choose_takes_the_lowest_out_of_fold_nll_never_the_test_figures():
    """Candidates `m0`..`m2` predict with one member each. m2 is best on validation, m0 on test: m2 is chosen."""
    y_val = np.tile(np.arange(3), 40)
    y_test = np.tile(np.arange(3), 30)
    strength_val, strength_test = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]
    z_val = np.stack([s * np.eye(3)[y_val] for s in strength_val])
    z_test = np.stack([s * np.eye(3)[y_test] for s in strength_test])
    cands = [sel.Candidate(f"m{k}", "soft_vote", lambda z, y: None, lambda p, z, k=k: sel.combine(z[[k]], None))
             for k in range(3)]
    choice = sel.choose(cands, z_val, y_val, z_test, y_test)
    rows = choice.record["candidates"]
    assert choice.name == "m2" and choice.record["chosen"] == "m2"
    assert min(rows, key=lambda n: rows[n]["test"]["nll"]) == "m0"
    for k in range(3):  # every recorded figure equals the direct computation
        assert rows[f"m{k}"]["val_oof"]["nll"] == pytest.approx(sel.log_loss(sel.combine(z_val[[k]], None), y_val))
        assert rows[f"m{k}"]["test"]["nll"] == pytest.approx(sel.log_loss(sel.combine(z_test[[k]], None), y_test))


def _oof(fit_predict, z, y, seed=0):
    """Out-of-fold predictions computed here: 5 stratified shuffled folds, seed 0 (the documented scheme)."""
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros(z.shape[1:])
    for a, b in StratifiedKFold(5, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        out[b] = fit_predict(z[:, a], y[a], z[:, b])
    return out


def test_auto_picks_fit_when_one_member_is_good_and_the_rest_noise():
    z, y = _members(2, 5, strength=[4.0, 0.0, 0.0, 0.0, 0.0])
    cands = [sel.weighting(n, "soft_vote") for n in ("equal", "select", "fit")] + [sel.stacking_candidate()]
    choice = sel.choose(cands, z, y)
    rows = choice.record["candidates"]
    fit_oof = _oof(lambda za, ya, zb: sel.combine(zb, sel.fit_weights(za, ya), "soft_vote"), z, y)
    assert rows["fit"]["val_oof"]["nll"] == pytest.approx(sel.log_loss(fit_oof, y), rel=1e-6)
    assert rows["equal"]["val_oof"]["nll"] == pytest.approx(sel.log_loss(sel.combine(z, None), y))
    assert choice.name == min(rows, key=lambda n: rows[n]["val_oof"]["nll"])
    assert choice.name in ("fit", "select") and rows[choice.name]["val_oof"]["nll"] < rows["equal"]["val_oof"]["nll"]
    # the refit on every row: the full-data fitted weights, member 0 dominant
    assert choice.params[0] == max(choice.params)


def test_auto_picks_stacking_when_a_member_confuses_classes_consistently():
    """Member 1 always names the next class: only a learned head can read it (the weightings cannot)."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 400)
    z = np.stack([rng.normal(size=(400, 4)) * 2.0 + 1.0 * np.eye(4)[y],
                  rng.normal(size=(400, 4)) * 0.3 + 5.0 * np.eye(4)[(y + 1) % 4]])
    cands = [sel.weighting(n, "soft_vote") for n in ("equal", "select", "fit")] + [sel.stacking_candidate()]
    choice = sel.choose(cands, z, y)
    assert choice.name == "stacking" and choice.combiner == "stacking"
    # stacking's validation figure is out of fold: the same head (sklearn, on softmax features) refitted per fold
    from sklearn.linear_model import LogisticRegression

    def feats(zz):
        p = sel._softmax(zz)
        return p.transpose(1, 0, 2).reshape(p.shape[1], -1)

    oof = _oof(lambda za, ya, zb: LogisticRegression(C=1.0, max_iter=1000).fit(feats(za), ya).predict_proba(feats(zb)), z, y)
    rows = choice.record["candidates"]
    assert rows["stacking"]["val_oof"]["nll"] == pytest.approx(sel.log_loss(oof, y), rel=1e-3)
    assert rows["stacking"]["val_oof"]["nll"] > rows["stacking"]["val_in_sample"]["nll"]


def test_auto_picks_equal_when_the_weightings_cannot_differ():
    """Identical members: every weighting gives the same probabilities; ties go to the earlier candidate."""
    z, y = _members(5, 1)
    z = np.repeat(z, 3, axis=0)
    choice = sel.choose([sel.weighting(n, "soft_vote") for n in ("equal", "select", "fit")], z, y)
    rows = choice.record["candidates"]
    assert rows["select"]["val_oof"]["nll"] == pytest.approx(rows["equal"]["val_oof"]["nll"], abs=1e-12)
    assert choice.name == "equal"


# ---- output temperature ------------------------------------------------------------------------------


def _under_confident(seed: int = 3, k: int = 6, n: int = 400, c: int = 5):
    """Members each accurate but with independent noise: their soft vote is much less sharp than it is right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    return rng.normal(size=(k, n, c)) * 2.0 + 3.0 * np.eye(c)[y], y


@pytest.mark.parametrize("combiner", ["soft_vote", "logit_mean", "geometric_mean"])
def test_output_temperature_matches_an_independent_minimize_scalar(combiner):
    """The fitted T against scipy's minimize_scalar over T itself (not log T), the NLL written out here."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    z, y = _under_confident()
    w = np.array([3.0, 1.0, 0.0, 2.0, 1.0, 1.0])
    p = sel.combine(z, w, combiner)
    t = sel.fit_output_temperature(p, y)

    def nll(temp):  # -mean log (p[y]^(1/T) / sum_c p_c^(1/T))
        s = np.log(p) / temp
        return float(-(s[np.arange(len(y)), y] - logsumexp(s, axis=1)).mean())

    ref = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8})
    assert t == pytest.approx(ref.x, rel=1e-3)
    if combiner == "soft_vote":
        assert t < 1.0  # the soft vote of noisy members is under-confident
    assert sel.log_loss(sel.apply_temperature(p, t), y) == pytest.approx(ref.fun, abs=1e-7)
    assert sel.log_loss(sel.apply_temperature(p, t), y) < sel.log_loss(p, y)
    np.testing.assert_array_equal(sel.apply_temperature(p, t).argmax(-1), p.argmax(-1))  # the argmax stays


def test_auto_picks_a_calibrated_candidate_when_the_vote_is_under_confident():
    z, y = _under_confident()
    base = [sel.weighting(n, "soft_vote") for n in ("equal", "select", "fit")]
    choice = sel.choose(base + [sel.tempered(c) for c in base], z, y)
    rows = choice.record["candidates"]
    assert choice.name.endswith("+temperature") and isinstance(choice.params, sel.Tempered)
    assert rows[choice.name]["temperature"] == choice.params.temperature < 1.0
    assert all(rows[b.name]["temperature"] is None for b in base)
    assert rows[choice.name]["val_oof"]["nll"] < min(rows[b.name]["val_oof"]["nll"] for b in base)
    # out of fold: the weights and T refitted on each fold's training rows, computed here
    def fp(za, ya, zb):
        t = sel.fit_output_temperature(sel.combine(za, None), ya)
        return sel.apply_temperature(sel.combine(zb, None), t)

    assert rows["equal+temperature"]["val_oof"]["nll"] == pytest.approx(sel.log_loss(_oof(fp, z, y), y), rel=1e-9)
    # the refit on every row: T fitted on the whole validation split
    assert rows["equal+temperature"]["temperature"] == pytest.approx(sel.fit_output_temperature(sel.combine(z, None), y))


@pytest.mark.parametrize("combiner", ["soft_vote", "logit_mean", "geometric_mean"])
def test_output_temperature_in_the_fused_onnx_graph_equals_numpy(combiner, tmp_path):
    import onnxruntime as ort
    import torch

    from fusion.ensemble import make_combiner
    from fusion.export import FusedEnsemble, export_onnx

    rng = np.random.default_rng(0)
    members = [torch.nn.Linear(6, 4) for _ in range(3)]
    for i, m in enumerate(members):
        torch.manual_seed(i)
        torch.nn.init.normal_(m.weight, std=2.0)
    w, t = [2.0, 1.0, 1.0], 0.4
    fused = FusedEnsemble(members, make_combiner(combiner, 3, w, temperature=t)).eval()
    assert fused.combiner.config() == {"name": combiner, "weights": w, "temperature": t}
    X = rng.normal(size=(50, 6)).astype(np.float32)
    export_onnx(fused, tmp_path / "e.onnx", X)
    got = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
    with torch.no_grad():
        z = np.stack([m(torch.from_numpy(X)).double().numpy() for m in members])
    expected = sel.apply_temperature(sel.combine(z, w, combiner), t)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, sel.combine(z, w, combiner), atol=1e-3)  # T moved the probabilities
    with pytest.raises(ConfigError, match="expected an output temperature > 0.*got 0"):
        make_combiner(combiner, 3, w, temperature=0)


def test_gate_fires_when_one_member_dominates_and_not_when_the_ensemble_clearly_wins():
    z, y = _members(6, 4, n=400, strength=[6.0, 0.3, 0.3, 0.3])
    members = {f"m{k}": sel.combine(z[[k]], None) for k in range(4)}
    g = sel.gate(sel.combine(z, None), members, y)
    assert g["best_member"] == "m0" and not g["beats_best_member"]
    assert g["warning"].startswith("the ensemble does not beat its best member m0 on validation")
    assert g["warning"].endswith("consider serving m0 alone")
    # by hand: the paired differences' mean is the difference of the mean NLLs
    assert np.mean(g["nll_improvement_ci95"]) == pytest.approx(g["member_nll"] - g["ensemble_nll"], abs=0.02)

    z, y = _members(7, 9, n=400, strength=[1.2] * 9)  # nine independent weak members: the vote is much better
    members = {f"m{k}": sel.combine(z[[k]], None) for k in range(9)}
    g = sel.gate(sel.combine(z, None), members, y)
    assert g["beats_best_member"] and g["warning"] is None and g["nll_improvement_ci95"][0] > 0
    assert g["ensemble_accuracy"] > g["member_accuracy"] and g["mcnemar"]["b"] > g["mcnemar"]["c"]


def test_paired_bootstrap_interval_against_a_direct_resampling():
    d = np.random.default_rng(8).normal(0.1, 1.0, 150)
    lo, hi = sel.paired_bootstrap(d, n_boot=500, seed=2)
    idx = np.random.default_rng(2).integers(0, 150, size=(500, 150))
    means = np.array([d[i].mean() for i in idx])
    assert (lo, hi) == (pytest.approx(np.percentile(means, 2.5)), pytest.approx(np.percentile(means, 97.5)))


# ---- through the build: recipe, fused graph, manifest --------------------------------------------


@pytest.mark.parametrize("mode", ["select", "fit"])
def test_chosen_weights_are_what_the_fused_onnx_graph_uses(mode, tiny_zoo, digits, tmp_path):
    import onnxruntime as ort
    import torch

    from fusion.build import choose_ensemble, ensure_zoo
    from fusion.export import export_onnx
    from fusion.recipe import Recipe, override

    recipe = override(override(Recipe(), "zoo", dir=str(tiny_zoo)), "ensemble", weights=mode)
    members = ensure_zoo(recipe, digits)
    fused, record = choose_ensemble(recipe, members, digits)
    w = record["candidates"][mode]["weights"]
    assert record["chosen"] == mode and record["weights"] == mode
    assert fused.combiner.config()["weights"] == w
    if mode == "select":
        assert all(float(v).is_integer() for v in w) and sum(w) == 20 * 50
    export_onnx(fused, tmp_path / "e.onnx", digits.X_test)
    X = np.ascontiguousarray(digits.X_test, dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
    with torch.no_grad():
        z = np.stack([m.model(torch.from_numpy(X)).double().numpy() for m in members])
    P = np.exp(z - z.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    expected = np.tensordot(np.asarray(w) / np.sum(w), P, axes=1)  # the weighted soft vote, by hand
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert record["candidates"][mode]["test"]["nll"] == pytest.approx(sel.log_loss(expected, digits.y_test), abs=1e-4)


def test_auto_in_the_build_records_every_candidate_and_the_gate(tiny_zoo, digits):
    from fusion.build import choose_ensemble, ensure_zoo
    from fusion.recipe import Recipe, override

    recipe = override(Recipe(), "zoo", dir=str(tiny_zoo))
    assert Recipe().ensemble.weights == "auto"
    fused, record = choose_ensemble(recipe, ensure_zoo(recipe, digits), digits)
    rows = record["candidates"]
    assert list(rows) == ["equal", "select", "fit", "equal+temperature", "select+temperature", "fit+temperature",
                          "stacking"]
    assert record["chosen"] == min(rows, key=lambda n: rows[n]["val_oof"]["nll"])
    assert fused.combiner.name == rows[record["chosen"]]["combiner"]
    assert fused.combiner.config().get("temperature") == rows[record["chosen"]]["temperature"]
    assert set(record["gate"]) >= {"best_member", "beats_best_member", "warning", "nll_improvement_ci95", "mcnemar"}
    json.dumps(record)  # plain JSON for the manifest


def test_recipe_and_cli_take_the_weight_modes(tmp_path):
    from fusion.cli import _member_weights
    from fusion.recipe import load_recipe

    path = tmp_path / "r.toml"
    for mode in ("auto", "equal", "select", "fit"):
        path.write_text(f'[ensemble]\nweights = "{mode}"\n')
        assert load_recipe(path).ensemble.weights == mode
        assert _member_weights(mode) == mode
    path.write_text('[ensemble]\nweights = "best"\n')
    with pytest.raises(ConfigError, match=r"expected one of \['auto', 'equal', 'select', 'fit'\].*got 'best'"):
        load_recipe(path)


def test_select_on_hard_vote_is_an_error_and_auto_keeps_equal_weights(tiny_zoo, digits):
    from fusion.build import choose_ensemble, ensure_zoo
    from fusion.recipe import Recipe, override

    recipe = override(Recipe(), "zoo", dir=str(tiny_zoo))
    members = ensure_zoo(recipe, digits)
    with pytest.raises(ConfigError, match="weights 'select' applies to the combiners"):
        choose_ensemble(override(recipe, "ensemble", combiner="hard_vote", weights="select"), members, digits)
    fused, record = choose_ensemble(override(recipe, "ensemble", combiner="hard_vote"), members, digits)
    assert record is None and fused.combiner.config()["weights"] is None


def test_older_manifests_without_the_field_still_read(tiny_bundle):
    from fusion.bundle import Manifest

    data = json.loads((tiny_bundle / "manifest.json").read_text())
    assert data["ensemble_selection"]["weights"] == "equal"  # the tiny bundle pins equal weights (conftest)
    data.pop("ensemble_selection")
    assert Manifest.from_dict(data).ensemble_selection is None


def test_cli_build_auto_prints_the_choice_and_the_report_lists_every_candidate(tiny_zoo, tmp_path, capsys):
    from fusion.bundle import read_bundle
    from fusion.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text("[distill]\nenabled = false\n\n[build]\ncompare_rounds = 3\n")
    out = tmp_path / "b"
    assert main(["build", "--recipe", str(recipe), "--zoo", str(tiny_zoo), "--weights", "auto", "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    m = read_bundle(out).manifest
    s = m.ensemble_selection
    assert f"weights 'auto': {s['chosen']} ({s['combiner']}); out-of-fold validation NLL: equal " in printed
    warning = s["gate"]["warning"]
    assert (f"fusion build: warning: {warning}" in err) if warning else ("warning" not in err)
    assert m.variants["ensemble"].combiner["name"] == s["combiner"]
    md = (out / "comparison.md").read_text()
    assert f"Ensemble weights `auto`: chose `{s['chosen']}`" in md
    for name, c in s["candidates"].items():
        assert f"| `{name}`{' (chosen)' if name == s['chosen'] else ''} | {c['combiner']} | {c['val_oof']['nll']:.4f} |" in md
    assert m.comparison["ensemble_selection"]["chosen"] == s["chosen"]


def test_too_few_rows_per_class_for_cross_fitting():
    """One row of class 2: one candidate is recorded in-sample (no comparison); comparing is a clear error."""
    y = np.array([0, 0, 0, 1, 1, 1, 2])
    z = np.stack([np.eye(3)[y] * 2.0, np.eye(3)[(y + 1) % 3]])
    assert sel.n_folds(y) == 1 and sel.n_folds(np.array([0, 0, 1, 1]), n_classes=3) == 0
    choice = sel.choose([sel.weighting("equal", "soft_vote")], z, y)
    assert choice.record["candidates"]["equal"]["val_oof"] == choice.record["candidates"]["equal"]["val_in_sample"]
    assert "in-sample" in choice.record["criterion"]
    with pytest.raises(ConfigError, match=r"at least 2 validation rows of every class.*got class counts \[3, 3, 1\]"):
        sel.choose([sel.weighting(n, "soft_vote") for n in ("equal", "fit")], z, y)
