"""Diversity figures (fusion/diversity.py) against naive loops, np.corrcoef and a hand-counted example,
their properties on random data, and the ambiguity decomposition identity."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.diversity import (
    ambiguity_decomposition, disagreement_matrix, diversity, error_correlation_matrix, oracle_outputs, yule_q_matrix,
)


def _random_members(seed: int, k: int = 5, n: int = 300, c: int = 4, skill: float = 0.7):
    """K members that copy the label with probability `skill`, else guess: correlated, imperfect."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    preds = np.where(rng.random((k, n)) < skill, y[None], rng.integers(0, c, (k, n)))
    return preds, y


def _naive(preds, y):
    """Explicit loops over pairs and rows: disagreement, Yule's Q and the error correlation by their definitions."""
    k, n = preds.shape
    dis, q, rho = np.zeros((k, k)), np.ones((k, k)), np.ones((k, k))
    for i in range(k):
        for j in range(k):
            n11 = n10 = n01 = n00 = 0
            differ = 0
            for t in range(n):
                a, b = preds[i, t] == y[t], preds[j, t] == y[t]
                n11 += a and b
                n10 += a and not b
                n01 += b and not a
                n00 += (not a) and (not b)
                differ += preds[i, t] != preds[j, t]
            dis[i, j] = differ / n
            if i != j:
                den = n11 * n00 + n01 * n10
                q[i, j] = (n11 * n00 - n01 * n10) / den if den else np.nan  # undefined: NaN
                # Kuncheva's ρ from the 2x2 table (the phi coefficient): an independent formula for Pearson on 0/1 vectors
                rho[i, j] = (n11 * n00 - n01 * n10) / np.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
    return dis, q, rho


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrices_equal_naive_loops_and_corrcoef(seed):
    preds, y = _random_members(seed)
    dis, q, rho = _naive(preds, y)
    correct = oracle_outputs(preds, y)
    np.testing.assert_allclose(disagreement_matrix(preds), dis, atol=1e-12)
    np.testing.assert_allclose(yule_q_matrix(correct), q, atol=1e-12)
    np.testing.assert_allclose(error_correlation_matrix(correct), rho, atol=1e-12)
    # and the correlation is numpy's Pearson on the 0/1 error vectors
    np.testing.assert_allclose(error_correlation_matrix(correct), np.corrcoef(1.0 - correct), atol=1e-12)


def test_scores_and_labels_give_the_same_figures_and_means_are_over_pairs():
    rng = np.random.default_rng(3)
    preds, y = _random_members(3, k=4, c=3)
    probs = rng.random((4, len(y), 3)) * 0.1
    probs[np.arange(4)[:, None], np.arange(len(y))[None], preds] += 1.0  # argmax = preds
    probs /= probs.sum(-1, keepdims=True)
    div = diversity({f"m{i}": probs[i] for i in range(4)}, y)
    np.testing.assert_allclose(div.disagreement, disagreement_matrix(preds), atol=0)
    dis, q, rho = _naive(preds, y)
    iu = np.triu_indices(4, k=1)
    assert div.means["mean_disagreement"] == pytest.approx(dis[iu].mean(), abs=1e-12)
    assert div.means["mean_yule_q"] == pytest.approx(q[iu].mean(), abs=1e-12)
    assert div.means["mean_error_correlation"] == pytest.approx(rho[iu].mean(), abs=1e-12)
    np.testing.assert_allclose(div.accuracy, (preds == y).mean(-1))
    js = div.to_json()
    assert js["matrices"]["names"] == ["m0", "m1", "m2", "m3"] and len(js["rows"]) == 6
    assert js["rows"]["m0 · m2"]["yule_q"] == pytest.approx(q[0, 2], abs=1e-12)


def test_hand_counted_example():
    # y = 0 everywhere; member a right on rows 0-5, b right on rows 0-3 and 6-7 (8 rows)
    y = np.zeros(8, int)
    a = np.array([0, 0, 0, 0, 0, 0, 1, 2])
    b = np.array([0, 0, 0, 0, 1, 1, 0, 0])
    preds = np.stack([a, b])
    # N11 = 4 (rows 0-3), N10 = 2 (rows 4, 5), N01 = 2 (rows 6, 7), N00 = 0
    q = yule_q_matrix(oracle_outputs(preds, y))
    assert q[0, 1] == pytest.approx((4 * 0 - 2 * 2) / (4 * 0 + 2 * 2)) == -1.0
    assert disagreement_matrix(preds)[0, 1] == pytest.approx(4 / 8)  # rows 4-7 differ


def test_properties_on_random_data():
    for seed in range(10):
        preds, y = _random_members(seed, k=6, n=120, skill=np.random.default_rng(seed).uniform(0.3, 0.9))
        correct = oracle_outputs(preds, y)
        d, q, r = disagreement_matrix(preds), yule_q_matrix(correct), error_correlation_matrix(correct)
        assert np.array_equal(d, d.T) and np.all(np.diag(d) == 0) and d.min() >= 0 and d.max() <= 1
        finite = q[np.isfinite(q)]
        assert finite.min() >= -1 and finite.max() <= 1 and np.allclose(q, q.T, equal_nan=True)
        assert np.nanmin(r) >= -1 and np.nanmax(r) <= 1 and np.allclose(r, r.T, equal_nan=True)


def test_undefined_pairs_are_nan_and_left_out_of_the_mean():
    y = np.zeros(6, int)
    preds = np.stack([np.zeros(6, int), np.array([0, 0, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1, 0])])
    div = diversity({f"m{i}": np.eye(2)[preds[i]] for i in range(3)}, y)  # m0 is never wrong
    assert np.isnan(div.yule_q[0, 1]) and np.isnan(div.error_correlation[0, 2])
    assert np.isfinite(div.yule_q[1, 2])
    assert div.means["mean_yule_q"] == pytest.approx(div.yule_q[1, 2])
    assert div.to_json()["rows"]["m0 · m1"]["yule_q"] is None  # JSON null, not NaN


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ambiguity_decomposition_is_exact(seed):
    rng = np.random.default_rng(seed)
    k, n = 5, 200
    y = rng.normal(size=n)
    f = y[None] + rng.normal(scale=rng.uniform(0.2, 2.0, (k, 1)), size=(k, n)) + rng.normal(size=(k, 1))
    w = rng.random(k)
    res = ambiguity_decomposition(f, y, w)
    wn = w / w.sum()
    fbar = sum(wn[i] * f[i] for i in range(k))  # naive loops
    ens = np.mean((fbar - y) ** 2)
    member = [np.mean((f[i] - y) ** 2) for i in range(k)]
    amb = np.mean(sum(wn[i] * (f[i] - fbar) ** 2 for i in range(k)))
    assert res["ensemble_error"] == pytest.approx(ens, rel=1e-12)
    assert res["average_member_error"] == pytest.approx(float(np.dot(wn, member)), rel=1e-12)
    assert res["ambiguity"] == pytest.approx(amb, rel=1e-12)
    assert res["ensemble_error"] == pytest.approx(res["average_member_error"] - res["ambiguity"], rel=1e-10, abs=1e-12)
    assert res["ambiguity"] >= 0 and res["ensemble_error"] <= res["average_member_error"]
    eq = ambiguity_decomposition(f, y)  # equal weights by default
    assert eq["ensemble_error"] == pytest.approx(np.mean((f.mean(0) - y) ** 2), rel=1e-12)
    # multi-output rows: squared errors summed over the outputs, the identity still exact
    f3, y3 = rng.normal(size=(3, 50, 2)), rng.normal(size=(50, 2))
    r3 = ambiguity_decomposition(f3, y3)
    assert r3["ensemble_error"] == pytest.approx(r3["average_member_error"] - r3["ambiguity"], rel=1e-10)


def test_bad_inputs_say_what_was_expected():
    from fusion.errors import ConfigError

    with pytest.raises(ConfigError, match="expected 3 non-negative weights"):
        ambiguity_decomposition(np.zeros((3, 4)), np.zeros(4), [1, -1, 1])
    with pytest.raises(ConfigError, match="expected 5 labels"):
        oracle_outputs(np.zeros((2, 5), int), np.zeros(4, int))


def test_heat_map_is_written(tmp_path):
    from fusion.diversity import plot_heatmaps

    preds, y = _random_members(0, k=4)
    div = diversity({f"member_{i}": np.eye(4)[preds[i]] for i in range(4)}, y).to_json()
    path = plot_heatmaps(div, tmp_path / "diversity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bundle_report_carries_the_members_diversity(tiny_bundle, digits):
    """The build's comparison holds the members' diversity (recomputed here from their ONNX files) and the
    HTML report shows its table and embeds the heat maps, whose digest the manifest lists."""
    import json

    import onnxruntime as ort

    from fusion.bundle import sha256_file
    from fusion.report import render_html

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    div = manifest["comparison"]["diversity"]
    names = div["matrices"]["names"]
    assert names == sorted(manifest["members"]) and div["n_members"] == len(names) >= 2
    X = digits.X_test.astype(np.float32)
    labels = []
    for n in names:
        sess = ort.InferenceSession(str(tiny_bundle / manifest["members"][n]["file"]), providers=["CPUExecutionProvider"])
        labels.append(sess.run(None, {sess.get_inputs()[0].name: X})[0].argmax(-1))
    labels = np.stack(labels)
    dis, q, _ = _naive(labels, digits.y_test)
    iu = np.triu_indices(len(names), k=1)
    np.testing.assert_allclose(np.array(div["matrices"]["disagreement"], dtype=float), dis, atol=1e-12)
    assert div["mean_disagreement"] == pytest.approx(dis[iu].mean(), abs=1e-12)
    assert div["mean_yule_q"] == pytest.approx(np.nanmean(q[iu]), abs=1e-12)
    assert manifest["comparison"]["artifacts"]["diversity.png"] == sha256_file(tiny_bundle / "diversity.png")
    page = render_html(tiny_bundle)
    assert "<h2>Member diversity</h2>" in page and 'alt="member diversity heat maps"' in page
    assert f"{names[0]} · {names[1]}" in page
    assert "Member diversity on the test split" in (tiny_bundle / "comparison.md").read_text()
