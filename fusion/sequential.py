"""Anytime-valid non-inferiority for the live A/B comparison (issue 20): can a variant replace the ensemble?

A fixed-sample test (McNemar, a two-proportion z-test) promises its 5 % only when it is read once, at a
sample size fixed in advance. The dashboard reads the report every 2 s: under continuous monitoring the
chance that it ever says "significant" between two equal models grows without bound (measured in
docs/AB.md). And "no significant difference" is not evidence of equivalence. This module answers instead
with **confidence sequences** (CS): intervals [L_t, U_t] that hold *simultaneously at every sample size*,

    P(for every t: L_t <= Δ <= U_t) >= 1 - α,

so a verdict read after every row, stopped whenever one likes, is still wrong with probability at most α.
Each CS is built from a nonnegative (super)martingale under the null and Ville's inequality
(P(sup_t M_t >= 1/α) <= α): Ramdas, Grünwald, Vovk and Shafer, "Game-theoretic statistics and safe
anytime-valid inference", Statistical Science 2023.

Every function here takes COUNTS (sufficient statistics), never the sequence of rows: the service's store
(service/abstore.py, service/ab.py) supplies them, and reading the verdict any number of times is the same
as reading it once at each sample size, which is what the guarantee covers.

The decision, for a margin δ = FUSION_AB_MARGIN_PP / 100 on Δ = accuracy(variant) - accuracy(ensemble):
* `inferior (keep the ensemble)` once U_t < -δ;
* `superior` once L_t > 0;
* `non-inferior (can replace)` once L_t > -δ;
* `collecting` otherwise.
Without labels, the same on the agreement rate A with the ensemble against 1 - FUSION_AB_AGREEMENT_MARGIN
(no `superior` there). The chance that any of these verdicts is ever wrong is at most α.

Torch-free and scipy-free (numpy only: the service's base install); the functions broadcast over numpy
arrays of counts, so bench/ab_simulation.py runs 10^7 looks through the very code the service runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

COLLECTING = "collecting"
NON_INFERIOR = "non-inferior (can replace)"
INFERIOR = "inferior (keep the ensemble)"
SUPERIOR = "superior"
DECISIONS = (COLLECTING, NON_INFERIOR, INFERIOR, SUPERIOR)
REPLACE = (NON_INFERIOR, SUPERIOR)  # the verdicts that say the variant may take the ensemble's place

# The bets of the paired CS: fractions f of the largest bet that keeps the wealth positive, log-spaced.
# The best constant bet against a gap g between the true mean and the tested one is about g/σ² (Kelly);
# for the paired differences it is f ≈ margin/discordance: 0.5 at 1 pp and 2 % discordant rows, 0.02
# at 1 pp and 50 %, 0.002 at 0.1 pp and 50 %. 28 bets from 1e-4 to 0.95 (a ratio of 1.4 between
# neighbours: each loses < 6 % of the best one's growth) cover margins from 0.1 to 50 pp at any
# discordance; the average over them costs log 28 ≈ 3.3 nats of evidence against the best single bet,
# paid once, not per row. A constant bet f cannot resolve gaps below about f·σ²: the smallest one sets a
# floor of ~1e-4 (in accuracy) under the width, far below any margin worth testing.
BET_FRACTIONS = np.geomspace(1e-4, 0.95, 28)
_BISECT_STEPS = 50  # bounds to 2^-50 of the unit interval (1e-15; the ends 0 and 1 are never evaluated)


@dataclass(frozen=True)
class NonInferiority:
    """The decision rule's settings (service/config.py reads them from the environment).

    margin_pp: δ in percentage points of accuracy (FUSION_AB_MARGIN_PP, default 1.0): a variant at most δ
    worse than the ensemble may replace it. agreement_margin: without labels, the variant must agree with the
    ensemble on at least 1 - this fraction of rows (FUSION_AB_AGREEMENT_MARGIN, default 0.02). alpha: the
    chance, over the whole experiment however often it is read, of any wrong verdict (FUSION_AB_ALPHA, 0.05).
    """

    margin_pp: float = 1.0
    agreement_margin: float = 0.02
    alpha: float = 0.05

    def __post_init__(self):
        if not (isinstance(self.margin_pp, (int, float)) and 0 < self.margin_pp < 100):
            raise ValueError(f"margin_pp: expected a number of percentage points in (0, 100); got {self.margin_pp!r}")
        if not (isinstance(self.agreement_margin, (int, float)) and 0 < self.agreement_margin < 1):
            raise ValueError(f"agreement_margin: expected a fraction in (0, 1); got {self.agreement_margin!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha <= 0.5):
            raise ValueError(f"alpha: expected a probability in (0, 0.5]; got {self.alpha!r}")

    @property
    def margin(self) -> float:
        return self.margin_pp / 100


@dataclass(frozen=True)
class Decision:
    """One variant's verdict against the ensemble and what it rests on.

    analysis: "paired" (labelled rows both answered), "unpaired" (labelled rows of each, from a traffic
    split), "agreement" (no labels: rows both answered) or None (nothing to compare yet). estimate, ci_low,
    ci_high: the point estimate and the (1 - α) confidence sequence's current bounds: of the accuracy
    difference (a fraction, variant - ensemble) or, for "agreement", of the agreement rate. threshold: what
    the lower bound must exceed to say "can replace" (-margin, or 1 - agreement margin). n: the rows used.
    """

    decision: str
    analysis: str | None
    n: int
    estimate: float | None
    ci_low: float
    ci_high: float
    threshold: float
    margin_pp: float
    alpha: float

    def as_dict(self) -> dict:
        return asdict(self)


# ---- (a) paired differences: a mixture of betting martingales on three values -----------------------------


def _paired_log_wealth(n, b, c, m, upper: bool):
    """log of the average wealth over BET_FRACTIONS of betting that the mean of X = (1 + D)/2 is above m
    (upper=False: evidence against means <= m, for the lower bound) or below m (upper=True). D = +1 on a
    row only the variant got right (b of them), -1 on one only the ensemble got right (c), 0 otherwise.
    A constant bet λ gives the wealth Π(1 + λ(X_i - m)) = Π over the three values, a function of the
    counts. Broadcasts over numpy arrays; m in (0, 1)."""
    if all(np.ndim(v) == 0 for v in (n, b, c, m)):  # one look (the service): vectorised over the bets instead
        f, m, z = BET_FRACTIONS, float(m), float(n - b - c)
        if upper:
            logs = b * np.log1p(-f) + z * np.log1p(-f * (0.5 - m) / (1 - m)) + c * np.log1p(f * m / (1 - m))
        else:
            logs = b * np.log1p(f * (1 - m) / m) + z * np.log1p(f * (0.5 - m) / m) + c * np.log1p(-f)
        top = logs.max()
        return float(top + math.log(np.exp(logs - top).mean()))
    n, b, c, m = (np.asarray(v, dtype=np.float64) for v in (n, b, c, m))
    z = n - b - c
    acc = np.full(np.broadcast(n, b, c, m).shape, -np.inf)
    for f in BET_FRACTIONS:
        if upper:  # λ = -f/(1 - m): the factor 1 - f(x - m)/(1 - m) at x = 1, 1/2, 0
            g1, gh, g0 = np.log1p(-f), np.log1p(-f * (0.5 - m) / (1 - m)), np.log1p(f * m / (1 - m))
        else:  # λ = f/m: the factor 1 + f(x - m)/m
            g1, gh, g0 = np.log1p(f * (1 - m) / m), np.log1p(f * (0.5 - m) / m), np.log1p(-f)
        acc = np.logaddexp(acc, b * g1 + z * gh + c * g0)
    return acc - math.log(len(BET_FRACTIONS))


def paired_rejects(n, b, c, delta, alpha: float, upper: bool):
    """True where the paired CS excludes the accuracy difference `delta` from below (upper=False: the lower
    bound is above delta) or from above (upper=True: the upper bound is below delta). Each side spends α/2,
    so the two-sided CS has coverage 1 - α. Broadcasts; what `decide_paired` and the simulation both use."""
    m = (1 + np.asarray(delta, dtype=np.float64)) / 2
    return _paired_log_wealth(n, b, c, m, upper) >= math.log(2 / alpha)


def paired_cs(n: int, b: int, c: int, alpha: float = 0.05) -> tuple[float, float]:
    """(1 - α) confidence sequence for Δ = P(only the variant right) - P(only the ensemble right) = acc_v -
    acc_e, from n paired labelled rows with b, c discordant. Betting confidence sequence for a bounded mean
    (Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting", JRSS B 2023): on
    X = (1 + D)/2 in [0, 1], the wealth of each constant bet is a nonnegative martingale under mean m, and so
    is their average (the paper's "diversified Kelly" mixture of constant bets, here over BET_FRACTIONS); by Ville's
    inequality the true mean's wealth reaches 2/α at some n with probability <= α/2 on each side, so the set
    of m whose current wealth is below 2/α on both sides holds it at every n simultaneously with probability
    >= 1 - α. The wealth depends on (n, b, c) only: reading it after every row or once is the same (it is not
    intersected over time, which would need the path, so one look's interval may be a hair wider than the
    last). At large n the width shrinks about as √(log n / n), within a small factor of the fixed-sample normal
    interval's 2·z·σ/√n (tests/test_sequential.py), down to the floor that BET_FRACTIONS sets (~1e-4)."""
    _check_counts(("n", n), ("b", b), ("c", c))
    if b + c > n:
        raise ValueError(f"expected b + c <= n; got b = {b}, c = {c}, n = {n}")
    thr = math.log(2 / alpha)

    def bound(upper: bool) -> float:
        # the lower bound: the largest m that the upward bets reject (their wealth falls as m rises);
        # the upper bound: the smallest m that the downward bets reject (their wealth rises with m)
        lo, hi = 0.0, 1.0
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            rejected = float(_paired_log_wealth(n, b, c, mid, upper)) >= thr
            lo, hi = (lo, mid) if rejected == upper else (mid, hi)
        return 2 * (lo if not upper else hi) - 1

    return (bound(False), bound(True))


# ---- (b, c) proportions: the beta-binomial conjugate mixture -----------------------------------------------

_LOG_FACT = np.zeros(1)


def _log_factorial(x):
    """log x! for integer counts: math.lgamma for a scalar, a cached table for arrays (the simulation)."""
    global _LOG_FACT
    if np.ndim(x) == 0:
        return math.lgamma(float(x) + 1)
    x = np.asarray(x, dtype=np.int64)
    top = int(x.max(initial=0))
    if top >= len(_LOG_FACT):
        _LOG_FACT = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, 2 * top + 2, dtype=np.float64)))])
    return _LOG_FACT[x]


def _proportion_log_mixture(k, n, p):
    """log of ∫ Π q^x_i (1-q)^(1-x_i) dq / Π p^x_i (1-p)^(1-x_i): the uniform (Beta(1, 1)) mixture of the
    likelihood ratios of k successes in n trials against the proportion p. Broadcasts."""
    k, n, p = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64), np.asarray(p, dtype=np.float64)
    ki, ni = np.asarray(k).astype(np.int64), np.asarray(n).astype(np.int64)
    log_beta = _log_factorial(ki) + _log_factorial(ni - ki) - _log_factorial(ni + 1)  # log B(k+1, n-k+1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lk = np.where(k > 0, k * np.log(p), 0.0) + np.where(n - k > 0, (n - k) * np.log1p(-p), 0.0)
    return log_beta - lk


def proportion_rejects(k, n, p, alpha: float, upper: bool):
    """True where the (1 - α) CS of `proportion_cs` excludes p from below (upper=False: the lower bound is
    above p) or from above (upper=True: the upper bound is below p), by one evaluation of the mixture at p
    (the set is the interval around k/n where the mixture stays below 1/α). Broadcasts."""
    k, n = np.asarray(k), np.asarray(n)
    side = (k > p * n) if not upper else (k < p * n)
    return side & (_proportion_log_mixture(k, n, p) >= math.log(1 / alpha))


def proportion_cs(k, n, alpha: float = 0.05):
    """(1 - α) confidence sequence for a proportion after k successes in n Bernoulli trials: the beta-binomial
    conjugate mixture (Robbins, "Statistical methods related to the law of the iterated logarithm", Ann. Math.
    Stat. 1970; Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence
    sequences", Ann. Stat. 2021: conjugate-mixture boundaries, here the beta-binomial one). The
    uniform mixture of likelihood ratios against p is a nonnegative martingale under p; by Ville's inequality
    {p : mixture < 1/α} holds the true p at every n simultaneously with probability >= 1 - α. Its log is
    convex in p with its minimum (<= 0) at k/n, so the set is an interval around k/n, found by bisection.
    Broadcasts over numpy arrays of counts (returns arrays then); at n = 0 it is (0, 1)."""
    scalar = np.ndim(k) == 0 and np.ndim(n) == 0
    if scalar:
        _check_counts(("k", k), ("n", n))
        if k > n:
            raise ValueError(f"expected k <= n; got k = {k}, n = {n}")
    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    thr = math.log(1 / alpha)
    phat = np.where(n > 0, k / np.maximum(n, 1), 0.5)

    def bound(lo, hi, outside_at_lo: bool):
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            out = _proportion_log_mixture(k, n, mid) >= thr
            if outside_at_lo:
                lo, hi = np.where(out, mid, lo), np.where(out, hi, mid)
            else:
                lo, hi = np.where(out, lo, mid), np.where(out, mid, hi)
        return lo if outside_at_lo else hi

    low = np.where(k > 0, bound(np.zeros(k.shape), phat, True), 0.0)
    high = np.where(k < n, bound(phat, np.ones(k.shape), False), 1.0)
    if scalar:
        return (float(low), float(high))
    return low, high


def two_proportion_cs(k_v, n_v, k_e, n_e, alpha: float = 0.05):
    """(1 - α) confidence sequence for p_v - p_e from two independent streams (a traffic split): each
    proportion's beta-binomial CS at level α/2 (`proportion_cs`), combined by the union bound: with
    probability >= 1 - α both hold at every sample size, and then p_v - p_e lies in [L_v - U_e, U_v - L_e].
    Conservative (the widths add instead of adding in quadrature) but a function of the four counts only,
    whatever the interleaving of the two streams. Broadcasts."""
    lv, hv = proportion_cs(k_v, n_v, alpha / 2)
    le, he = proportion_cs(k_e, n_e, alpha / 2)
    return lv - he, hv - le


# ---- the decisions ---------------------------------------------------------------------------------------


def decide_paired(n: int, b: int, c: int, rule: NonInferiority = NonInferiority()) -> Decision:
    """The verdict from paired labelled rows (`paired_cs`; a wrong verdict, ever, with probability <= α).
    The decision is taken by the rejection tests at -δ and 0 directly, so it is exact, not subject to the
    bisection's rounding of the bounds."""
    lo, hi = paired_cs(n, b, c, rule.alpha)
    d = rule.margin
    if paired_rejects(n, b, c, -d, rule.alpha, upper=True):
        decision = INFERIOR
    elif paired_rejects(n, b, c, 0.0, rule.alpha, upper=False):
        decision = SUPERIOR
    elif paired_rejects(n, b, c, -d, rule.alpha, upper=False):
        decision = NON_INFERIOR
    else:
        decision = COLLECTING
    return Decision(decision, "paired", int(n), (b - c) / n if n else None, lo, hi, -d, rule.margin_pp, rule.alpha)


def _by_bounds(lo: float, hi: float, threshold: float, superior_at: float | None) -> str:
    if hi < threshold:
        return INFERIOR
    if superior_at is not None and lo > superior_at:
        return SUPERIOR
    return NON_INFERIOR if lo > threshold else COLLECTING


def decide_unpaired(k_v: int, n_v: int, k_e: int, n_e: int, rule: NonInferiority = NonInferiority()) -> Decision:
    """The verdict from unpaired labelled rows: k_v of n_v variant rows right, k_e of n_e ensemble rows
    (`two_proportion_cs`; a wrong verdict, ever, with probability <= α). n: the smaller of the two counts."""
    lo, hi = (float(v) for v in two_proportion_cs(k_v, n_v, k_e, n_e, rule.alpha))
    est = k_v / n_v - k_e / n_e if n_v and n_e else None
    return Decision(_by_bounds(lo, hi, -rule.margin, 0.0), "unpaired", int(min(n_v, n_e)), est, lo, hi,
                    -rule.margin, rule.margin_pp, rule.alpha)


def decide_agreement(agree: int, compared: int, rule: NonInferiority = NonInferiority()) -> Decision:
    """Without labels: the variant agrees with the ensemble on `agree` of `compared` rows; `proportion_cs` on
    the agreement rate A against 1 - agreement_margin: `non-inferior (can replace)` once L_t > 1 - margin,
    `inferior (keep the ensemble)` once U_t < 1 - margin (never `superior`: agreement measures closeness to
    the ensemble, not being better). A wrong verdict, ever, with probability <= α."""
    lo, hi = proportion_cs(agree, compared, rule.alpha)
    t = 1 - rule.agreement_margin
    if proportion_rejects(agree, compared, t, rule.alpha, upper=True):
        decision = INFERIOR
    elif proportion_rejects(agree, compared, t, rule.alpha, upper=False):
        decision = NON_INFERIOR
    else:
        decision = COLLECTING
    return Decision(decision, "agreement", int(compared), agree / compared if compared else None,
                    lo, hi, t, rule.margin_pp, rule.alpha)


def decide(rule: NonInferiority = NonInferiority(), *, paired: tuple[int, int, int] | None = None,
           unpaired: tuple[int, int, int, int] | None = None, agreement: tuple[int, int] | None = None) -> Decision:
    """One variant's verdict from whatever counts exist, by a fixed order that does not look at the outcome
    (choosing whichever analysis "wins" would spend α more than once): paired labelled rows (n, b, c) if any,
    else unpaired labelled rows (k_v, n_v, k_e, n_e) if both sides have some, else agreement (agree,
    compared) if any rows were compared, else `collecting` with no analysis."""
    if paired is not None and paired[0] > 0:
        return decide_paired(*paired, rule)
    if unpaired is not None and unpaired[1] > 0 and unpaired[3] > 0:
        return decide_unpaired(*unpaired, rule)
    if agreement is not None and agreement[1] > 0:
        return decide_agreement(*agreement, rule)
    return Decision(COLLECTING, None, 0, None, -1.0, 1.0, -rule.margin, rule.margin_pp, rule.alpha)


def _check_counts(*pairs) -> None:
    for name, v in pairs:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}: expected a non-negative integer count; got {v!r}")
