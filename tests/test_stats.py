"""Live statistics, pure (no server): intervals and tests against scipy, feedback -> accuracy,
shadow agreement, paired tables, the report, and the Prometheus counters behind /metrics."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY
from scipy.stats import binom, binomtest, chi2_contingency, norm

from fusion.sequential import COLLECTING, DECISIONS, NonInferiority, decide, decide_paired, decide_unpaired
from service.ab import Stats, mcnemar_exact, two_proportion_test, verdict, wilson_interval

# ---- intervals and tests vs scipy -------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 10), (10, 10), (7, 10), (45, 50), (1, 1000), (512, 1000),
                                  (999, 1000), (33, 37)])
def test_wilson_interval_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-9)
    assert hi == pytest.approx(ref.high, abs=1e-9)
    assert 0.0 <= lo <= k / n + 1e-12 and k / n - 1e-12 <= hi <= 1.0  # k = n gives 1 - 1 ulp


def test_wilson_interval_without_data_is_uninformative():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (1, 0), (3, 3), (0, 5), (2, 9), (9, 2), (10, 25), (40, 60),
                                  (100, 130), (1, 200)])
def test_mcnemar_exact_matches_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)  # symmetric in the discordant counts


def _mcnemar_cases(n_max: int, count: int, seed: int) -> list[tuple[int, int]]:
    """(b, c) pairs over every regime of the test: small tables exhaustively, then random tables with
    n log-uniform up to n_max and the imbalance at a random z = (n - 2k)/√n in [0, 40] (the centre, where
    a continued fraction needs O(√n) terms, the tails, and p-values down to underflow), plus the edges."""
    rng = np.random.default_rng(seed)
    cases = [(b, n - b) for n in range(0, 41) for b in range(n + 1)]
    for _ in range(count):
        n = int(10 ** rng.uniform(1, math.log10(n_max)))
        z = rng.choice([rng.uniform(0, 1), rng.uniform(1, 4), rng.uniform(4, 40)])
        k = max(0, (n - int(z * math.sqrt(n))) // 2)
        cases.append((k, n - k) if rng.random() < 0.5 else (n - k, k))
    for n in (n_max - 1, n_max):  # the largest tables: balanced, one apart, two apart, slight and huge imbalance
        h = n // 2
        cases += [(h, h), (h, n - h), (h - 1, n - h + 1), (h - int(math.sqrt(n)), n - h + int(math.sqrt(n))),
                  (0, n), (1, n - 1), (12345, n - 12345), (n // 3, n - n // 3)]
    return cases


def _p_reference_binomtest(b: int, c: int) -> float:
    return 1.0 if b + c == 0 else binomtest(b, b + c, 0.5, alternative="two-sided").pvalue


def test_mcnemar_exact_matches_binomtest_over_counts_up_to_1e7():
    """scipy's binomtest is the reference up to 10^7 (beyond, its relative tolerance of 1e-7 on the pmf
    starts to merge lattice points near the centre). Agreement to 1e-9 relative; below 1e-300, where
    both underflow towards subnormals, to 1e-300 absolute."""
    bad = []
    for b, c in _mcnemar_cases(10**7, 400, seed=13):
        got, ref = mcnemar_exact(b, c), _p_reference_binomtest(b, c)
        if got != pytest.approx(ref, rel=1e-9, abs=1e-300) or got != mcnemar_exact(c, b) or not 0.0 <= got <= 1.0:
            bad.append((b, c, got, ref))
    assert not bad, f"{len(bad)} tables differ from scipy.stats.binomtest; first: {bad[:5]}"


def test_mcnemar_exact_matches_the_binomial_cdf_up_to_1e9():
    """Larger tables, against 2·P(X ≤ min(b, c)) from scipy's binom.cdf (Boost's incomplete beta), the same
    p-value where binomtest's tolerance no longer applies. Beyond 10^9 Boost's own error grows past
    1e-10 (6.6e-10 at 2.4·10^11 against 50-digit arithmetic): the next test takes over there."""
    bad = []
    for b, c in _mcnemar_cases(10**9, 300, seed=21):
        n, k = b + c, min(b, c)
        ref = 1.0 if n - 2 * k <= 1 else min(1.0, 2 * binom.cdf(k, n, 0.5))
        got = mcnemar_exact(b, c)
        if got != pytest.approx(ref, rel=1e-9, abs=1e-300):
            bad.append((b, c, got, ref))
    assert not bad, f"{len(bad)} tables differ from 2·binom.cdf; first: {bad[:5]}"


def _p_reference_50_digits(k: int, n: int) -> float:
    """2·P(X ≤ k), X ~ Binomial(n, 1/2), in 50-digit arithmetic: within one √n of the centre (p > 0.3),
    1 - Σ P(k < X < n - k) term by term (n - 2k - 1 ≤ 20,000 terms), else the pmf (loggamma) times the
    incomplete beta's continued fraction (fast away from the centre)."""
    mp = pytest.importorskip("mpmath")
    with mp.workdps(50):
        log_pmf = lambda i: mp.loggamma(n + 1) - mp.loggamma(i + 1) - mp.loggamma(n - i + 1) - n * mp.log(2)
        if (n - 2 * k) ** 2 < n:
            assert n - 2 * k - 1 <= 20_000, f"the reference sums at most 20,000 central terms; k={k}, n={n}"
            term, total = mp.exp(log_pmf(k + 1)), mp.mpf(0)
            for i in range(k + 1, n - k):  # P(X = i + 1) = P(X = i)·(n - i)/(i + 1)
                total += term
                term *= mp.mpf(n - i) / (i + 1)
            return float(1 - total)
        a, b, x = mp.mpf(n - k), mp.mpf(k + 1), mp.mpf(1) / 2
        c, d = mp.mpf(1), 1 / (1 - (a + b) * x / (a + 1))
        h = d
        for m in range(1, 20_000):
            for aa in (m * (b - m) * x / ((a - 1 + 2 * m) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1 + 2 * m))):
                d = 1 / (1 + aa * d)
                c = 1 + aa / c
                h *= d * c
            if abs(d * c - 1) < mp.mpf(10) ** -40:
                return float(mp.exp(log_pmf(k)) * h)
        raise AssertionError(f"the 50-digit continued fraction did not converge for k={k}, n={n}")


@pytest.mark.parametrize("n", [10**9 + 1, 10**9 + 2, 10**10 + 7, 2 * 10**11 + 1, 10**12, 10**15])
def test_mcnemar_exact_up_to_1e15_against_50_digit_arithmetic(n):
    """Tables no worker will count, in every regime: at the centre (where the service sums by Euler–
    Maclaurin, the reference term by term), one σ off it (where the service's continued fraction runs in
    decimals above 10^9 pairs: in doubles it erred by 2.9e-10 at 10^12), and in the tails to 1e-300."""
    s = math.sqrt(n)
    for d in (2, 3, 10, 1001, 20_000, int(s) + 1, int(1.5 * s), int(3 * s), int(10 * s), int(37 * s)):
        k = (n - d) // 2
        ref, got = _p_reference_50_digits(k, n), mcnemar_exact(k, n - k)
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-300), (k, n, got, ref)


def test_mcnemar_exact_costs_the_same_at_any_count():
    """Issue 13, finding 8: the p-value was a Python sum over the discordant count (0.72 s at 10^6 pairs,
    under the stats lock, on every /ab/report). Now O(1): the slowest tables (balanced, or one σ off
    the centre) at 10^6 and 10^7 pairs each take well under the bound (measured ~0.1-0.3 ms)."""
    worst = 0.0
    for n in (10**6, 10**7):
        h, s = n // 2, int(math.sqrt(n))
        for b, c in [(h - 1, n - h + 1), (h - s // 4, n - h + s // 4), (h - s // 2, n - h + s // 2), (h - 3 * s, n - h + 3 * s)]:
            t0 = time.perf_counter()
            mcnemar_exact(b, c)
            worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05, f"expected each p-value in well under 50 ms at 10^6-10^7 pairs; the slowest took {worst * 1e3:.1f} ms"


@pytest.mark.parametrize("k1, n1, k2, n2", [(45, 50, 40, 50), (90, 100, 70, 100), (5, 10, 5, 10), (300, 400, 310, 400),
                                            (1, 30, 12, 35), (200, 1000, 260, 1100)])
def test_two_proportion_test_matches_hand_formula_and_chi_square(k1, n1, k2, n2):
    p = (k1 + k2) / (n1 + n2)
    z = (k1 / n1 - k2 / n2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    hand = 2 * norm.sf(abs(z))
    # the pooled z-test is the uncorrected chi-square test of the 2x2 table
    chi = chi2_contingency([[k1, n1 - k1], [k2, n2 - k2]], correction=False).pvalue
    got = two_proportion_test(k1, n1, k2, n2)
    assert got == pytest.approx(hand, rel=1e-9)
    assert got == pytest.approx(chi, rel=1e-6)


def test_two_proportion_degenerate_cases():
    assert two_proportion_test(0, 0, 5, 10) == 1.0
    assert two_proportion_test(10, 10, 20, 20) == 1.0  # both perfect: no variance, no evidence
    assert two_proportion_test(0, 10, 0, 20) == 1.0


def test_verdict_wording():
    """The text starts with the anytime-valid decision (the dashboard and the rollout read it), then the
    bounds it rests on (fusion/sequential.py; tests/test_sequential.py tests the statistics)."""
    rule = NonInferiority()
    assert verdict(decide(rule)).startswith(f"{COLLECTING}: no labelled rows")
    for counts in [(20_000, 200, 200), (20_000, 200, 800), (20_000, 800, 200), (200, 2, 2)]:
        d = decide_paired(*counts, rule)
        text = verdict(d)
        assert text.startswith(d.decision + ":") and "margin 1 pp" in text and f"{d.ci_low * 100:+.2f}" in text, text
    assert {decide_paired(*c, rule).decision for c in [(20_000, 200, 200), (20_000, 200, 800), (20_000, 800, 200),
                                                       (200, 2, 2)]} == set(DECISIONS)
    text = verdict(decide(rule, agreement=(9_960, 10_000)))
    assert text.startswith("non-inferior (can replace): agreement with the ensemble 99.60%") and "needs > 98.00%" in text


# ---- Stats: feedback, agreement, paired tables ---------------------------------------------------------


def test_feedback_gives_accuracy_and_wilson_interval():
    s = Stats()
    preds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    truth = [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]  # 8 of 10 right
    s.observe("mlp_0", 10, 0.001, "r1", preds)
    s.observe("mlp_0", 1, 0.002, "r2", [3])
    assert s.feedback("r1", truth) == {"variants": ["mlp_0"], "rows": 10}
    assert s.feedback("r2", [4]) == {"variants": ["mlp_0"], "rows": 1}
    entry = s.report()["variants"]["mlp_0"]
    assert entry["requests"] == 2 and entry["rows"] == 11
    assert entry["labelled_rows"] == 11
    assert entry["accuracy"] == pytest.approx(8 / 11)
    ref = binomtest(8, 11).proportion_ci(method="wilson")
    assert entry["accuracy_ci95"] == pytest.approx([ref.low, ref.high])


def test_feedback_errors_keep_or_drop_the_record():
    s = Stats()
    s.observe("ensemble", 2, 0.001, "r1", [1, 2])
    with pytest.raises(KeyError):
        s.feedback("nope", [1])
    with pytest.raises(ValueError, match="expected 2 labels"):
        s.feedback("r1", [1])
    s.feedback("r1", [1, 2])  # the record survived the wrong-length attempt
    with pytest.raises(KeyError):
        s.feedback("r1", [1, 2])  # labelled once only
    assert s.report()["variants"]["ensemble"]["accuracy"] == 1.0


def test_records_are_bounded_lru():
    s = Stats(max_records=3)
    for i in range(5):
        s.observe("ensemble", 1, 0.001, f"r{i}", [0])
    with pytest.raises(KeyError):
        s.feedback("r0", [0])
    with pytest.raises(KeyError):
        s.feedback("r1", [0])
    s.feedback("r4", [0])
    assert len(s.records) == 2


def test_shadow_agreement_either_direction():
    s = Stats()
    # primary ensemble, shadow mlp_1: 3 of 4 agree
    s.observe("ensemble", 4, 0.001, "a", [1, 2, 3, 4])
    s.observe_shadow("a", "ensemble", "mlp_1", [1, 2, 3, 4], [1, 2, 3, 0], 0.002)
    # primary mlp_1, shadow ensemble: 1 of 2 agree
    s.observe("mlp_1", 2, 0.001, "b", [5, 6])
    s.observe_shadow("b", "mlp_1", "ensemble", [5, 6], [5, 7], 0.002)
    # a shadow between two non-ensemble variants adds no agreement figure
    s.observe("mlp_0", 1, 0.001, "c", [1])
    s.observe_shadow("c", "mlp_0", "mlp_1", [1], [2], 0.002)
    rep = s.report()["variants"]
    assert rep["mlp_1"]["compared_rows"] == 6
    assert rep["mlp_1"]["agreement_with_ensemble"] == pytest.approx(4 / 6)
    assert rep["mlp_0"]["compared_rows"] == 0 and rep["mlp_0"]["agreement_with_ensemble"] is None
    assert rep["ensemble"]["agreement_with_ensemble"] == 1.0


def test_paired_table_and_mcnemar_on_a_hand_made_example():
    """Ensemble primary with an mlp_1 shadow on 40 labelled rows; the 2x2 table is counted by hand."""
    s = Stats()
    truth = [i % 10 for i in range(40)]
    ens = list(truth)
    shadow = list(truth)
    for i in range(0, 12):  # 12 rows only the ensemble gets right
        shadow[i] = (truth[i] + 1) % 10
    for i in range(12, 14):  # 2 rows only the shadow gets right
        ens[i] = (truth[i] + 1) % 10
    for i in range(14, 17):  # 3 rows both get wrong (differently)
        ens[i] = (truth[i] + 1) % 10
        shadow[i] = (truth[i] + 2) % 10
    # split into two requests to check the table accumulates
    s.observe("ensemble", 25, 0.001, "q1", ens[:25])
    s.observe_shadow("q1", "ensemble", "mlp_1", ens[:25], shadow[:25], 0.001)
    s.observe("ensemble", 15, 0.001, "q2", ens[25:])
    s.observe_shadow("q2", "ensemble", "mlp_1", ens[25:], shadow[25:], 0.001)
    assert s.feedback("q1", truth[:25]) == {"variants": ["ensemble", "mlp_1"], "rows": 25}
    s.feedback("q2", truth[25:])

    only_v = sum(sv == y != e for sv, e, y in zip(shadow, ens, truth))
    only_e = sum(e == y != sv for sv, e, y in zip(shadow, ens, truth))
    assert (only_v, only_e) == (2, 12)  # the construction, recounted
    test = s.report()["variants"]["mlp_1"]["vs_ensemble"]
    assert test["test"] == "mcnemar_exact"
    assert test["paired_rows"] == 40
    assert test["discordant"] == [only_v, only_e]
    assert test["accuracy"] == pytest.approx(sum(a == y for a, y in zip(shadow, truth)) / 40)
    assert test["ensemble_accuracy"] == pytest.approx(sum(a == y for a, y in zip(ens, truth)) / 40)
    assert test["p_value"] == pytest.approx(binomtest(2, 14, 0.5).pvalue)
    # McNemar's p ~ 0.013 < 0.05 holds for one look; the anytime-valid verdict on 40 rows cannot yet tell
    # the difference (-25 pp) from the 1 pp margin: collecting
    ref = decide_paired(40, 2, 12, NonInferiority())
    assert test["analysis"] == "paired" and test["decision"] == ref.decision == COLLECTING
    assert (test["ci_low"], test["ci_high"]) == (ref.ci_low, ref.ci_high) and test["verdict"].startswith(COLLECTING)
    # both variants' accuracy came from the same feedback
    rep = s.report()["variants"]
    assert rep["mlp_1"]["labelled_rows"] == rep["ensemble"]["labelled_rows"] == 40


def test_two_proportion_test_used_when_traffic_is_split_without_shadow():
    s = Stats()
    for i in range(40):
        s.observe("ensemble", 1, 0.001, f"e{i}", [1])
        s.feedback(f"e{i}", [1 if i < 36 else 0])  # 36 / 40
        s.observe("merged", 1, 0.001, f"m{i}", [1])
        s.feedback(f"m{i}", [1 if i < 30 else 0])  # 30 / 40
    test = s.report()["variants"]["merged"]["vs_ensemble"]
    assert test["test"] == "two_proportion_z"
    assert test["rows"] == [40, 40]
    assert test["p_value"] == pytest.approx(chi2_contingency([[30, 10], [36, 4]], correction=False).pvalue, rel=1e-6)
    assert test["accuracy"] == 0.75 and test["ensemble_accuracy"] == 0.9
    ref = decide_unpaired(30, 40, 36, 40, NonInferiority())
    assert test["analysis"] == "unpaired" and test["decision"] == ref.decision and test["ci_low"] == ref.ci_low


def test_no_test_without_labels():
    s = Stats()
    s.observe("ensemble", 1, 0.001, "a", [1])
    s.observe("merged", 1, 0.001, "b", [1])
    test = s.report()["variants"]["merged"]["vs_ensemble"]
    assert test["test"] is None and test["verdict"].startswith("collecting") and test["analysis"] is None


def test_latency_percentiles_and_cascade_rate():
    s = Stats()
    lat = [0.001 * (i + 1) for i in range(101)]  # 1 .. 101 ms
    for i, t in enumerate(lat):
        s.observe("ensemble", 1, t, f"r{i}", [0])
    s.observe_cascade(7, 3)
    s.observe_cascade(5, 5)
    rep = s.report()
    ms = rep["variants"]["ensemble"]["latency_ms"]
    assert ms["samples"] == 101
    assert ms["p50"] == pytest.approx(statistics.median(x * 1e3 for x in lat))
    q = statistics.quantiles([x * 1e3 for x in lat], n=100, method="inclusive")
    assert ms["p95"] == pytest.approx(q[94]) and ms["p99"] == pytest.approx(q[98])
    assert rep["cascade"] == {"answered": 12, "escalated": 8, "escalation_rate": pytest.approx(8 / 20)}


def test_shadow_failures_counted():
    s = Stats()
    s.shadow_failed("members", "UnavailableError")
    s.shadow_failed("members", "UnavailableError")
    s.shadow_failed("merged", "queue_full")
    assert s.report()["shadow_failures"] == {"members:UnavailableError": 2, "merged:queue_full": 1}


def _sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_prometheus_counters_follow_the_figures():
    """The counters /metrics exposes, by variant (a unique name keeps this independent of other tests)."""
    v = "unit_test_variant_x"
    samples = {
        "requests": ("fusion_requests_total", {"variant": v}),
        "rows": ("fusion_rows_total", {"variant": v}),
        "agree": ("fusion_agreement_total", {"variant": v, "agree": "true"}),
        "disagree": ("fusion_agreement_total", {"variant": v, "agree": "false"}),
        "correct": ("fusion_feedback_total", {"variant": v, "correct": "true"}),
        "wrong": ("fusion_feedback_total", {"variant": v, "correct": "false"}),
    }
    before = {k: _sample(n, **lab) for k, (n, lab) in samples.items()}
    s = Stats()
    s.observe("ensemble", 3, 0.001, "p", [1, 2, 3])
    s.observe_shadow("p", "ensemble", v, [1, 2, 3], [1, 2, 0], 0.001)
    s.observe(v, 2, 0.001, "q", [4, 5])
    s.feedback("q", [4, 4])
    delta = {k: _sample(n, **lab) - before[k] for k, (n, lab) in samples.items()}
    assert delta == {"requests": 1, "rows": 2, "agree": 2, "disagree": 1, "correct": 1, "wrong": 1}
