"""Anytime-valid non-inferiority (fusion/sequential.py, issue 20 part 2) and its wiring into /ab/report.

Independent references: the wealth of the paired CS recomputed as an explicit running product over a
shuffled stream of rows (it is a function of the counts only); the beta-binomial mixture against scipy's
betaln; the fixed-sample Wilson and normal intervals (a confidence sequence holds at every n at once, so at
any one n it is at least as wide, and at large n within a log factor of the normal width); coverage and the
error rate of "can replace" by simulation, monitored after every row (bench/ab_simulation.py, the figures
of docs/AB.md).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.special import betaln
from scipy.stats import norm

from bench import ab_simulation as sim
from fusion import sequential as sq
from fusion.errors import ConfigError
from fusion.sequential import (COLLECTING, INFERIOR, NON_INFERIOR, REPLACE, SUPERIOR, NonInferiority, decide,
                               decide_agreement, decide_paired, decide_unpaired, paired_cs, paired_rejects,
                               proportion_cs, proportion_rejects, two_proportion_cs)
from fusion.stats import mcnemar_exact, wilson_interval

ALPHA = 0.05

# ---- the statistics against independent references -------------------------------------------------------


def _explicit_log_wealth(xs: list[float], m: float, upper: bool) -> float:
    """The mixture's wealth by its definition: for each bet, Π(1 + λ(x_i - m)) over the rows in order."""
    total = 0.0
    for f in sq.BET_FRACTIONS:
        lam = -f / (1 - m) if upper else f / m
        w = 1.0
        for x in xs:
            w *= 1 + lam * (x - m)
        total += w
    return math.log(total / len(sq.BET_FRACTIONS))


@pytest.mark.parametrize("n, b, c, m", [(40, 3, 9, 0.45), (40, 3, 9, 0.6), (200, 0, 0, 0.49), (25, 10, 1, 0.5),
                                        (60, 2, 2, 0.3)])
def test_paired_wealth_is_the_running_product_whatever_the_order(n, b, c, m):
    rng = random.Random(n * 1000 + b)
    xs = [1.0] * b + [0.0] * c + [0.5] * (n - b - c)
    for _ in range(3):
        rng.shuffle(xs)
        for upper in (False, True):
            ref = _explicit_log_wealth(xs, m, upper)
            assert sq._paired_log_wealth(n, b, c, m, upper) == pytest.approx(ref, rel=1e-9, abs=1e-9)
            # the vectorised path (the simulation's) is the same function
            assert float(sq._paired_log_wealth(np.array([n]), np.array([b]), np.array([c]), m, upper)[0]) == pytest.approx(ref, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("k, n, p", [(0, 10, 0.3), (7, 10, 0.2), (900, 1000, 0.95), (50, 50, 0.9), (3, 400, 0.5)])
def test_beta_binomial_mixture_against_scipy(k, n, p):
    ref = betaln(k + 1, n - k + 1) - (k * math.log(p) + (n - k) * math.log1p(-p))
    assert float(sq._proportion_log_mixture(k, n, p)) == pytest.approx(ref, rel=1e-10)
    assert float(sq._proportion_log_mixture(np.array([k]), np.array([n]), p)[0]) == pytest.approx(ref, rel=1e-10)


def test_cs_bounds_sit_where_the_wealth_reaches_the_threshold():
    """The bounds are the CS's edges: just inside, the wealth is below the threshold; just outside, above."""
    for n, b, c in [(500, 20, 35), (3000, 40, 40), (80, 0, 6)]:
        lo, hi = paired_cs(n, b, c, ALPHA)
        for edge, upper, outward in ((lo, False, -1), (hi, True, 1)):
            assert bool(paired_rejects(n, b, c, edge + outward * 1e-6, ALPHA, upper)), (n, b, c, edge)
            assert not bool(paired_rejects(n, b, c, edge - outward * 1e-6, ALPHA, upper)), (n, b, c, edge)
    for k, n in [(90, 100), (0, 30), (30, 30), (4, 1000)]:
        lo, hi = proportion_cs(k, n, ALPHA)
        for p in (lo + 1e-6, hi - 1e-6, k / n):
            if 0 < p < 1:
                assert float(sq._proportion_log_mixture(k, n, p)) < math.log(1 / ALPHA), (k, n, p)
        for p, upper in ((lo - 1e-6, False), (hi + 1e-6, True)):
            if 0 < p < 1:
                assert bool(proportion_rejects(k, n, p, ALPHA, upper)), (k, n, p)


def test_a_confidence_sequence_is_wider_than_the_fixed_sample_interval_at_any_one_n():
    rng = np.random.default_rng(5)
    for _ in range(60):
        n = int(rng.integers(20, 20_000))
        k = int(rng.integers(0, n + 1))
        lo, hi = proportion_cs(k, n, ALPHA)
        wl, wh = wilson_interval(k, n, norm.ppf(1 - ALPHA / 2))
        assert lo <= wl + 1e-12 and hi >= wh - 1e-12, (k, n, (lo, hi), (wl, wh))
    for _ in range(60):
        n = int(rng.integers(100, 50_000))
        disc = int(rng.integers(10, max(11, n // 4)))
        b = int(rng.integers(0, disc + 1))
        c = disc - b
        mean, sd = (b - c) / n, math.sqrt(((b + c) / n - ((b - c) / n) ** 2) / n)
        lo, hi = paired_cs(n, b, c, ALPHA)
        z = norm.ppf(1 - ALPHA / 2)
        assert lo <= mean - z * sd and hi >= mean + z * sd, (n, b, c, (lo, hi), mean, sd)


@pytest.mark.parametrize("discordance", [0.02, 0.10, 0.30])
def test_at_large_n_the_width_is_within_a_log_factor_of_the_normal_interval(discordance):
    """Half-width / (z σ/√n) at n = 10^4 .. 10^7: above 1 (it must be: it holds at every n at once), below 3,
    and growing no faster than √(log n) (the law of the iterated logarithm allows √(log log n))."""
    z = norm.ppf(1 - ALPHA / 2)
    ratios = []
    for n in (10**4, 10**5, 10**6, 10**7):
        b = c = round(n * discordance / 2)
        lo, hi = paired_cs(n, b, c, ALPHA)
        assert lo == pytest.approx(-hi, rel=1e-6)  # symmetric counts, symmetric sequence
        ratios.append(hi / (z * math.sqrt(discordance / n)))
    assert all(1 < r < 3 for r in ratios), ratios
    assert ratios[-1] / ratios[0] < math.sqrt(math.log(10**7) / math.log(10**4)), ratios


def test_widths_shrink_and_estimates_lie_inside():
    for disc in (0.02, 0.1):
        widths = []
        for n in (100, 1000, 10_000, 100_000):
            b, c = round(n * disc * 0.4), round(n * disc * 0.6)
            lo, hi = paired_cs(n, b, c)
            assert lo <= (b - c) / n <= hi
            widths.append(hi - lo)
        assert widths == sorted(widths, reverse=True), widths
    assert paired_cs(0, 0, 0) == (-1.0, 1.0) and proportion_cs(0, 0) == (0.0, 1.0)
    lo, hi = two_proportion_cs(900, 1000, 940, 1000)
    assert lo < -0.04 < hi and hi - lo == pytest.approx(sum(h - l for l, h in (proportion_cs(900, 1000, ALPHA / 2),
                                                                          proportion_cs(940, 1000, ALPHA / 2))))


def test_proportion_cs_covers_at_every_look():
    """1,000 streams of 3,000 Bernoulli(0.9) rows, the CS checked after every row: the fraction that ever
    excluded 0.9 is at most α (plus Monte-Carlo error)."""
    rng = np.random.default_rng(7)
    n = np.arange(1, 3001)
    k = np.cumsum(rng.random((1000, 3000)) < 0.9, axis=1)
    missed = (proportion_rejects(k, n, 0.9, ALPHA, False) | proportion_rejects(k, n, 0.9, ALPHA, True)).any(axis=1)
    assert missed.mean() <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / 1000), missed.mean()


# ---- the decisions --------------------------------------------------------------------------------------------


def test_decisions_follow_the_bounds():
    rule = NonInferiority()
    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(300):
        n = int(rng.integers(0, 30_000))
        disc = int(rng.integers(0, n // 5 + 1))
        b = int(rng.binomial(disc, rng.uniform(0.2, 0.8)))
        d = decide_paired(n, b, disc - b, rule)
        seen.add(d.decision)
        assert d.analysis == "paired" and d.n == n and d.threshold == -0.01 and d.ci_low <= d.ci_high
        want = (INFERIOR if d.ci_high < -0.01 else SUPERIOR if d.ci_low > 0 else NON_INFERIOR if d.ci_low > -0.01
                else COLLECTING)
        assert d.decision == want, d
    assert seen == {COLLECTING, NON_INFERIOR, INFERIOR, SUPERIOR}


def test_verdicts_on_clear_cases():
    rule = NonInferiority(margin_pp=1.0)
    assert decide_paired(20_000, 200, 200, rule).decision == NON_INFERIOR  # equal, 2 % discordant
    assert decide_paired(20_000, 200, 800, rule).decision == INFERIOR  # 3 pp worse
    assert decide_paired(20_000, 800, 200, rule).decision == SUPERIOR  # 3 pp better
    assert decide_paired(200, 2, 2, rule).decision == COLLECTING  # too few rows for a 1 pp margin
    assert decide_unpaired(9_500, 10_000, 9_500, 10_000, NonInferiority(margin_pp=2.0)).decision == NON_INFERIOR
    assert decide_unpaired(8_500, 10_000, 9_500, 10_000, rule).decision == INFERIOR
    assert decide_agreement(9_960, 10_000, rule).decision == NON_INFERIOR  # needs >= 98 %
    assert decide_agreement(9_000, 10_000, rule).decision == INFERIOR
    assert decide_agreement(98, 100, rule).decision == COLLECTING


def test_decide_uses_one_analysis_in_a_fixed_order():
    rule = NonInferiority()
    both = decide(rule, paired=(20_000, 200, 200), unpaired=(1, 10, 9, 10), agreement=(10, 100))
    assert both.analysis == "paired" and both.decision == NON_INFERIOR
    assert decide(rule, paired=(0, 0, 0), unpaired=(95, 100, 95, 100)).analysis == "unpaired"
    assert decide(rule, paired=(0, 0, 0), unpaired=(0, 0, 95, 100), agreement=(99_900, 100_000)).analysis == "agreement"
    none = decide(rule)
    assert (none.decision, none.analysis, none.n) == (COLLECTING, None, 0)
    assert set(sq.DECISIONS) == {"collecting", "non-inferior (can replace)", "inferior (keep the ensemble)", "superior"}
    assert set(REPLACE) == {NON_INFERIOR, SUPERIOR}  # what a rollout may advance on


def test_the_margin_and_alpha_change_the_decision():
    counts = (6_000, 120, 160)  # -0.67 pp
    assert decide_paired(*counts, NonInferiority(margin_pp=3.0)).decision == NON_INFERIOR
    assert decide_paired(*counts, NonInferiority(margin_pp=0.5)).decision == COLLECTING
    wide, narrow = decide_paired(*counts, NonInferiority(alpha=0.01)), decide_paired(*counts, NonInferiority(alpha=0.2))
    assert wide.ci_low < narrow.ci_low and wide.ci_high > narrow.ci_high


@pytest.mark.parametrize("kwargs, what", [({"margin_pp": 0}, "margin_pp"), ({"margin_pp": 100}, "margin_pp"),
                                          ({"agreement_margin": 1.0}, "agreement_margin"), ({"alpha": 0}, "alpha"),
                                          ({"alpha": 1.5}, "alpha")])
def test_bad_settings_are_refused(kwargs, what):
    with pytest.raises(ValueError, match=f"{what}: expected .*; got"):
        NonInferiority(**kwargs)


@pytest.mark.parametrize("args", [(-1, 0, 0), (10, 6, 5), (10, 1.5, 0), (10, True, 0)])
def test_bad_counts_are_refused(args):
    with pytest.raises(ValueError, match="expected"):
        paired_cs(*args)


# ---- THE SIMULATION (issue 20): the error rate however often the verdict is read --------------------------------


def test_wrong_can_replace_at_the_margin_boundary_stays_below_alpha():
    """2,000 experiments with the variant exactly δ = 1 pp worse (10 % discordant rows), the verdict read
    after every labelled row up to 5,000: "can replace" ever said in at most α of them (plus Monte-Carlo
    error). The guarantee is α/2 for this side of the two-sided sequence."""
    res = sim.wrong_replace_rate(n_exp=2000, rows=5000, discordance=0.10, margin_pp=1.0, alpha=ALPHA, seed=20)
    assert res["experiments"] == 2000 and res["rows"] == 5000
    assert res["rate"] <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / 2000), res


def test_without_labels_wrong_can_replace_stays_below_alpha():
    res = sim.agreement_wrong_replace_rate(n_exp=1000, rows=5000, agreement_margin=0.02, alpha=ALPHA, seed=21)
    assert res["rate"] <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / 1000), res


def test_the_old_fixed_sample_verdict_inflates_under_monitoring():
    """What this replaced: McNemar read after every row from 30 labels on, two EQUAL models: far above 5 %."""
    res = sim.old_verdict_rate(n_exp=400, rows=5000, discordance=0.10, seed=22)
    assert res["mcnemar_ever_significant"] > 3 * ALPHA and res["two_proportion_ever_significant"] > 3 * ALPHA, res


def test_the_simulations_mcnemar_table_is_fusion_stats():
    table = sim.mcnemar_table(300)
    for n in (0, 1, 2, 7, 30, 101, 300):
        for k in range(0, n // 2 + 1):
            assert table[n, k] == pytest.approx(mcnemar_exact(k, n - k), rel=1e-9, abs=1e-300), (n, k)


def test_an_equal_variant_reaches_can_replace_and_a_bad_one_never_does():
    res = sim.rows_to_replace(n_exp=100, max_rows=12_000, discordance=0.02, seed=23)
    assert res["reached"] >= 0.9 and 500 < res["median"] < 6_000, res
    rng = np.random.default_rng(3)  # 3 pp worse: "can replace" never, "keep the ensemble" soon
    n = np.arange(1, 5001)
    b, c = sim.paired_counts(rng, 200, 5000, 0.035, 0.065)
    assert not paired_rejects(n, b, c, -0.01, ALPHA, upper=False).any()
    assert paired_rejects(n, b, c, -0.01, ALPHA, upper=True).any(axis=1).mean() > 0.9  # "inferior" by row 5,000


# ---- the service: /ab/report's fields, the settings -----------------------------------------------------------


def _labelled_shadow_stats(rule: NonInferiority | None = None):
    from service.ab import Stats

    s = Stats()
    if rule is not None:
        s.rule = rule
    truth = [i % 10 for i in range(400)]
    ens, var = list(truth), list(truth)
    for i in range(0, 12):
        var[i] = (truth[i] + 1) % 10  # 12 only the ensemble right
    for i in range(12, 16):
        ens[i] = (truth[i] + 1) % 10  # 4 only the variant right
    s.observe("ensemble", 400, 0.001, "q", ens)
    s.observe_shadow("q", "ensemble", "merged", ens, var, 0.001)
    s.feedback("q", truth)
    return s


def test_report_carries_the_anytime_valid_decision():
    test = _labelled_shadow_stats().report()["variants"]["merged"]["vs_ensemble"]
    ref = decide_paired(400, 4, 12, NonInferiority())
    assert test["analysis"] == "paired" and test["decision"] == ref.decision == COLLECTING
    assert (test["ci_low"], test["ci_high"], test["margin_pp"], test["n"]) == (ref.ci_low, ref.ci_high, 1.0, 400)
    assert test["verdict"].startswith(ref.decision)
    # the fixed-sample figures stay, for reference
    assert test["discordant"] == [4, 12] and test["paired_rows"] == 400
    assert test["p_value"] == pytest.approx(mcnemar_exact(4, 12))
    wide = _labelled_shadow_stats(NonInferiority(margin_pp=30.0)).report()["variants"]["merged"]["vs_ensemble"]
    assert wide["decision"] == NON_INFERIOR and wide["margin_pp"] == 30.0 and wide["verdict"].startswith(NON_INFERIOR)


def test_report_without_labels_decides_on_agreement():
    from service.ab import Stats

    s = Stats()
    s.rule = NonInferiority(agreement_margin=0.05)
    ens = [i % 10 for i in range(2000)]
    var = [e if i % 100 else (e + 1) % 10 for i, e in enumerate(ens)]  # 99 % agreement
    s.observe("ensemble", 2000, 0.001, "a", ens)
    s.observe_shadow("a", "ensemble", "distilled", ens, var, 0.001)
    test = s.report()["variants"]["distilled"]["vs_ensemble"]
    ref = decide_agreement(1980, 2000, s.rule)
    assert test["analysis"] == "agreement" and test["decision"] == ref.decision == NON_INFERIOR
    assert test["ci_low"] == ref.ci_low and test["threshold"] == pytest.approx(0.95)
    assert test["verdict"].startswith(NON_INFERIOR) and test["test"] is None


def test_settings_are_read_and_checked_by_config():
    from service import config

    cfg = config.load({"FUSION_AB_MARGIN_PP": "2.5", "FUSION_AB_AGREEMENT_MARGIN": "0.01", "FUSION_AB_ALPHA": "0.1"})
    assert cfg.engine.ab_test == NonInferiority(2.5, 0.01, 0.1)
    assert config.load({}).engine.ab_test == NonInferiority()
    for name, bad in (("FUSION_AB_MARGIN_PP", "0"), ("FUSION_AB_MARGIN_PP", "x"), ("FUSION_AB_AGREEMENT_MARGIN", "1"),
                      ("FUSION_AB_ALPHA", "0"), ("FUSION_AB_ALPHA", "0.7")):
        with pytest.raises(ConfigError, match=f"{name}: expected .*; got"):
            config.load({name: bad})



def test_the_module_needs_neither_torch_nor_scipy():
    """The service's base install has numpy only (bentofile.yaml): importing the verdict pulls in nothing else."""
    import subprocess
    import sys

    code = "import sys, fusion.sequential; bad = {'torch', 'scipy'} & set(sys.modules); assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
