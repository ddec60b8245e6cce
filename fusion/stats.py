"""Statistics shared by both halves: the service's live A/B report (service/ab.py) and the
offline comparison report (fusion/compare.py) call these same functions, so they cannot drift.

Torch-free and scipy-free on purpose (pure Python and numpy): the bento ships neither, and
`python -c "import fusion.stats"` must not pull them in (tests/test_shared_stats.py checks it).
tests/test_stats.py checks every function here against scipy.
"""

from __future__ import annotations

import contextlib
import math
from decimal import Decimal, localcontext

import numpy as np

Z95 = 1.959963984540054  # Φ⁻¹(0.975)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927; 95 % for the default z).

    At n = 0 it is (0, 1): with no trials every proportion is consistent with the data, and the
    service's A/B report and the offline comparison report answer the same. k outside 0..n or
    n < 0 is a caller's bug and raises ValueError.
    """
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"expected 0 <= k <= n with n >= 0; got k = {k}, n = {n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---- the exact McNemar test, in O(1) at any count ---------------------------------------------------
#
# p = min(1, 2 P(X <= k)), X ~ Binomial(n, 1/2), n = b + c, k = min(b, c). The sum over 0..k this replaces
# took 0.72 s at 10^6 pairs, per variant, under the stats lock (issue 13, finding 8). No scipy here: the
# bento does not ship it (bentofile.yaml). The pieces:
# * P(X = k) in Loader's saddle-point form ("Fast and accurate computation of binomial probabilities",
#   2000: stirlerr and bd0), good to a few ulps; lgamma(n + 1) - lgamma(k + 1) - ... errs by ~1e-8 in
#   log p at n = 10^7 (lgamma's own rounding), more than the 1e-9 promised.
# * the tail P(X <= k) = I_{1/2}(n - k, k + 1) = P(X = k)/2 · CF, the continued fraction of the
#   regularized incomplete beta function (Numerical Recipes §6.4, modified Lentz): at most ~350 terms
#   wherever it is used, whatever n (measured); above 10^9 pairs in 34-digit decimals (see _log_beta_cf);
# * within one √n of the centre of a large table, where that fraction needs O(√n) terms, 1 - p is the
#   central mass P(k < X < n - k), by Euler–Maclaurin over its terms: a 20-point Gauss–Legendre integral
#   of the near-Gaussian pmf and two end corrections.
# Checked against scipy.stats.binomtest to 10^7 pairs, binom.cdf to 10^9, 50-digit arithmetic to 10^15
# (tests/test_stats.py): within 1e-11 relative wherever p > 1e-300.

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_STIRLING = (1 / 12, 1 / 360, 1 / 1260, 1 / 1680, 1 / 1188)  # Stirling series coefficients
_CENTRAL_MIN_N = 10_000  # below it the continued fraction needs ≤ ~100 terms even at the centre
_CF_MAX_TERMS = 5_000  # a safety bound: ≤ ~350 terms in doubles, ≤ ~1,200 in decimals (measured)
_WIDE_N = 10**9  # above, the continued fraction runs in decimals (in doubles its error grows as √n)


def _gauss_legendre(m: int) -> tuple[list[float], list[float]]:
    x, w = np.polynomial.legendre.leggauss(m)
    return ((x + 1) / 2).tolist(), (w / 2).tolist()  # nodes and weights on [0, 1]


_GL_X, _GL_W = _gauss_legendre(20)


def _stirlerr(x: float) -> float:
    """log Γ(x + 1) - log(√(2πx) (x/e)^x), the error of Stirling's formula, for real x > 0."""
    if x <= 15:  # small: lgamma's absolute error is a few ulps of a small number
        return math.lgamma(x + 1) - (x + 0.5) * math.log(x) + x - _HALF_LOG_2PI
    s0, s1, s2, s3, s4 = _STIRLING
    xx = x * x
    return (s0 - (s1 - (s2 - (s3 - s4 / xx) / xx) / xx) / xx) / x  # next term < 1e-16 at x > 15


def _bd0(x: float, m: float, d: float) -> float:
    """x log(x/m) + m - x, the deviance term, given d = x - m exactly: no cancellation near x = m."""
    if abs(d) >= 0.1 * (x + m):
        return x * math.log(x / m) + m - x
    v = d / (x + m)  # |v| < 0.1: the series in v² converges by 2 digits a term
    s, term, v2 = d * v, 2 * x * v, v * v
    for j in range(1, 40):
        term *= v2
        s_next = s + term / (2 * j + 1)
        if s_next == s:
            break
        s = s_next
    return s


def _log_pmf_half(d: float, n: int) -> float:
    """log P(X = n/2 + d), X ~ Binomial(n, 1/2), continued to real |d| < n/2. By the deviation d from the
    centre, so that no digits go in forming it (n/2 + d - n/2 loses log10(n) of them)."""
    m = n / 2
    x, y = m + d, m - d
    return (_stirlerr(float(n)) - _stirlerr(x) - _stirlerr(y) - _bd0(x, m, d) - _bd0(y, m, -d)
            - _HALF_LOG_2PI - 0.5 * (math.log(x) + math.log(y) - math.log(n)))


def _log_beta_cf(a: int, b: int) -> float:
    """log of the continued fraction of I_{1/2}(a, b) · a B(a, b) 2^(a+b), by the modified Lentz method;
    it converges for 1/2 < (a + 1)/(a + b + 2). Near that bound its odd terms are -1 + O(1/√n), so in
    doubles 1 + aa·d loses about log10(√n) digits (2.9e-10 relative at n = 10^12, measured): tables over
    _WIDE_N pairs run in 34-digit decimals (0.1-5 ms; no worker counts that many)."""
    wide = a + b > _WIDE_N
    num = Decimal if wide else float
    with localcontext(prec=34) if wide else contextlib.nullcontext():
        one, x, tiny = num(1), num(1) / 2, num("1e-300")
        tol = num("1e-28") if wide else 3e-16
        a, b = num(a), num(b)
        c, d = one, one - (a + b) * x / (a + 1)
        d = one / (d if abs(d) > tiny else tiny)
        h = d
        for m in range(1, _CF_MAX_TERMS + 1):
            m2 = 2 * m
            for aa in (m * (b - m) * x / ((a - 1 + m2) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1 + m2))):
                d = one + aa * d
                d = one / (d if abs(d) > tiny else tiny)
                c = one + aa / c
                c = c if abs(c) > tiny else tiny
                h *= d * c
            if abs(d * c - one) < tol:
                break
        return float(h.ln()) if wide else math.log(h)


def _central_mass(n: int, k: int) -> float:
    """P(k < X < n - k), X ~ Binomial(n, 1/2), for n ≥ 10^4 and n - 2k < √n, by Euler–Maclaurin.

    The terms are g(t) = P(X = n/2 + t) at t = -T, -T + 1, ..., T (T = n/2 - k - 1); g is even, so their sum
    is 2∫_0^T g + g(T) + g'(T)/6 - g'''(T)/360 + O(g/σ^5), σ = √n/2 ≥ 50. g' = g h1, g''' = g (h1³ + 3 h1 h2
    + h3), with h1, h2, h3 the digamma differences d^i/dt^i log g from log g = c - lgamma(x + 1) - lgamma(n - x + 1).
    The integral runs over T < σ of a near-Gaussian of width σ: the Gauss–Legendre rule gets it to rounding.
    """
    t_end = (n - 2 * k - 2) / 2
    g_end = math.exp(_log_pmf_half(t_end, n))
    xa, ya = float(n - k), float(k + 2)  # the digamma arguments at t = T: x + 1 and n - x + 1
    h1 = math.log1p((ya - xa) / xa) - 0.5 / ya + 0.5 / xa - 1 / (12 * ya * ya) + 1 / (12 * xa * xa)  # ψ(ya) - ψ(xa)
    h2 = -(1 / xa + 0.5 / xa**2 + 1 / (6 * xa**3)) - (1 / ya + 0.5 / ya**2 + 1 / (6 * ya**3))  # -ψ'(xa) - ψ'(ya)
    h3 = (1 / xa**2 + 1 / xa**3) - (1 / ya**2 + 1 / ya**3)  # ψ''(ya) - ψ''(xa)
    d1, d3 = g_end * h1, g_end * (h1**3 + 3 * h1 * h2 + h3)
    integral = t_end * sum(w * math.exp(_log_pmf_half(t_end * u, n)) for u, w in zip(_GL_X, _GL_W))
    return 2 * integral + g_end + d1 / 6 - d3 / 360


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b vs c discordant pairs at p = 1/2, in O(1)."""
    n, k = int(b) + int(c), min(int(b), int(c))
    if n - 2 * k <= 1:  # b = c or b = c ± 1, n = 0 included: the two tails meet
        return 1.0
    if k == 0:
        return math.ldexp(1.0, 1 - n)  # 2 · 2^-n, exactly (0.0 once it underflows)
    if n >= _CENTRAL_MIN_N and (n - 2 * k) ** 2 < n:  # within one √n of the centre: p > 0.3
        return min(1.0, max(0.0, 1.0 - _central_mass(n, k)))
    # 2 P(X ≤ k) = 2 I_{1/2}(n - k, k + 1) = P(X = k) · CF
    return min(1.0, math.exp(_log_pmf_half((2 * k - n) / 2, n) + _log_beta_cf(n - k, k + 1)))


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided pooled z-test p-value for k1/n1 vs k2/n2 (unpaired traffic split)."""
    if n1 == 0 or n2 == 0:
        return 1.0
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))
