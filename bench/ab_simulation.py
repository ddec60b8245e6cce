"""The A/B verdict under continuous monitoring, simulated (issue 20; the figures of docs/AB.md § Statistics).

Every experiment is a stream of labelled rows, the verdict read after every row, as the dashboard does:
* `wrong_replace_rate`: paired rows generated at the margin's boundary (the variant exactly δ worse than
  the ensemble): how often does fusion/sequential.py's verdict *ever* say "can replace" (non-inferior or
  superior)? Anytime-valid: at most α/2 (the lower side of a two-sided 1 - α confidence sequence).
* `agreement_wrong_replace_rate`: the same without labels, agreement exactly 1 - the agreement margin.
* `old_verdict_rate`: the fixed-sample verdict this replaced (exact McNemar on paired rows, a pooled
  two-proportion z-test on a traffic split), read after every row from 30 labels on, between two EQUAL
  models: how often it ever said "significant" (its 5 % holds for one look only).
* `rows_to_replace`: how many labelled rows a truly equal variant needs before "can replace", at a
  discordance (rows where exactly one of the two is right) of 2 % and 10 %.

Vectorised over experiments with numpy cumulative sums, through the same functions the service calls
(`paired_rejects`, `proportion_rejects`); seeded, so every figure is reproducible:

    .venv/bin/python -m bench.ab_simulation [--experiments 2000] [--rows 5000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from statistics import NormalDist

import numpy as np

from fusion.sequential import paired_rejects, proportion_rejects

ALPHA = 0.05
MARGIN_PP = 1.0
MIN_LABELS_OLD = 30  # the old verdict's minimum (service/ab.py before issue 20)


def paired_counts(rng: np.random.Generator, n_exp: int, rows: int, p_b: float, p_c: float) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative discordant counts after each row, shape (n_exp, rows): b (only the variant right, with
    probability p_b per row) and c (only the ensemble right, p_c)."""
    u = rng.random((n_exp, rows), dtype=np.float32)
    b = np.cumsum(u < p_b, axis=1, dtype=np.int32)
    c = np.cumsum((u >= p_b) & (u < p_b + p_c), axis=1, dtype=np.int32)
    return b, c


def _chunks(n_exp: int, size: int):
    for start in range(0, n_exp, size):
        yield min(size, n_exp - start)


def wrong_replace_rate(n_exp: int = 2000, rows: int = 5000, discordance: float = 0.10, margin_pp: float = MARGIN_PP,
                       alpha: float = ALPHA, seed: int = 20, chunk: int = 100) -> dict:
    """Paired rows at the boundary: P(only variant right) - P(only ensemble right) = -δ exactly, with
    `discordance` = their sum. Returns the fraction of experiments in which the verdict ever said "can
    replace" (the lower bound of the CS above -δ) at any of the `rows` looks, and its Monte-Carlo error."""
    d = margin_pp / 100
    p_b, p_c = (discordance - d) / 2, (discordance + d) / 2
    if p_b < 0:
        raise ValueError(f"expected a discordance >= the margin ({d}); got {discordance}")
    rng = np.random.default_rng(seed)
    n = np.arange(1, rows + 1)
    wrong = 0
    for size in _chunks(n_exp, chunk):
        b, c = paired_counts(rng, size, rows, p_b, p_c)
        wrong += int(paired_rejects(n, b, c, -d, alpha, upper=False).any(axis=1).sum())
    rate = wrong / n_exp
    return {"experiments": n_exp, "rows": rows, "discordance": discordance, "margin_pp": margin_pp, "alpha": alpha,
            "wrong_replace": wrong, "rate": rate, "mc_se": math.sqrt(max(rate * (1 - rate), 1 / n_exp) / n_exp)}


def agreement_wrong_replace_rate(n_exp: int = 2000, rows: int = 5000, agreement_margin: float = 0.02,
                                 alpha: float = ALPHA, seed: int = 21, chunk: int = 200) -> dict:
    """Rows without labels, agreeing with the ensemble with probability exactly 1 - agreement_margin: the
    fraction of experiments whose agreement verdict ever said "can replace"."""
    t = 1 - agreement_margin
    rng = np.random.default_rng(seed)
    n = np.arange(1, rows + 1)
    wrong = 0
    for size in _chunks(n_exp, chunk):
        agree = np.cumsum(rng.random((size, rows), dtype=np.float32) < t, axis=1, dtype=np.int32)
        wrong += int(proportion_rejects(agree, n, t, alpha, upper=False).any(axis=1).sum())
    rate = wrong / n_exp
    return {"experiments": n_exp, "rows": rows, "agreement_margin": agreement_margin, "alpha": alpha,
            "wrong_replace": wrong, "rate": rate, "mc_se": math.sqrt(max(rate * (1 - rate), 1 / n_exp) / n_exp)}


def mcnemar_table(n_max: int) -> np.ndarray:
    """T[n, k] = min(1, 2 P(X <= k)), X ~ Binomial(n, 1/2), for 0 <= k <= n <= n_max: the exact McNemar
    p-value of a table with n discordant pairs, k = min(b, c) (fusion.stats.mcnemar_exact's, as a table so
    that 10^7 looks cost one lookup each; tests/test_sequential.py compares the two)."""
    lf = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n_max + 1, dtype=np.float64)))])
    nn, kk = np.meshgrid(np.arange(n_max + 1), np.arange(n_max + 1), indexing="ij")
    valid = kk <= nn
    logpmf = np.where(valid, lf[nn] - lf[kk] - lf[np.where(valid, nn - kk, 0)] - nn * math.log(2), -np.inf)
    logcdf = np.logaddexp.accumulate(logpmf, axis=1)
    return np.minimum(1.0, 2 * np.exp(logcdf))


def old_verdict_rate(n_exp: int = 2000, rows: int = 5000, discordance: float = 0.10, accuracy: float = 0.9,
                     alpha: float = ALPHA, seed: int = 22, chunk: int = 200) -> dict:
    """Two EQUAL models, the old fixed-sample verdict read after every labelled row from 30 on: the
    fraction of experiments in which it ever said "better"/"worse" (p < α). Paired rows (shadow):
    exact McNemar, each discordant kind with probability discordance/2. Unpaired rows (traffic split,
    each row to either side with probability 1/2, both right with probability `accuracy`): the pooled
    two-proportion z-test on the smaller side's count >= 30, as `verdict()` did."""
    rng = np.random.default_rng(seed)
    first = MIN_LABELS_OLD - 1  # the look after row 30
    z_crit = NormalDist().inv_cdf(1 - alpha / 2)
    ever_mc = ever_z = 0
    table = None
    for size in _chunks(n_exp, chunk):
        b, c = paired_counts(rng, size, rows, discordance / 2, discordance / 2)
        n_disc = b + c
        top = int(n_disc.max())
        if table is None or top >= len(table):
            table = mcnemar_table(max(top, 16))
        p = table[n_disc, np.minimum(b, c)]
        ever_mc += int((p[:, first:] < alpha).any(axis=1).sum())
        # unpaired: which side each row went to, and whether it was right
        side = rng.random((size, rows), dtype=np.float32) < 0.5
        right = rng.random((size, rows), dtype=np.float32) < accuracy
        n_v = np.cumsum(side, axis=1, dtype=np.int32)
        n_e = np.arange(1, rows + 1) - n_v
        k_v = np.cumsum(side & right, axis=1, dtype=np.int32)
        k_e = np.cumsum(~side & right, axis=1, dtype=np.int32)
        with np.errstate(divide="ignore", invalid="ignore"):
            pool = (k_v + k_e) / (n_v + n_e)
            se = np.sqrt(pool * (1 - pool) * (1 / n_v + 1 / n_e))
            z = (k_v / n_v - k_e / n_e) / se
            significant = (se > 0) & (np.abs(np.nan_to_num(z)) > z_crit)  # p = erfc(|z|/√2) < α
        ever_z += int((significant & (np.minimum(n_v, n_e) >= MIN_LABELS_OLD)).any(axis=1).sum())
    return {"experiments": n_exp, "rows": rows, "discordance": discordance, "accuracy": accuracy, "alpha": alpha,
            "mcnemar_ever_significant": ever_mc / n_exp, "two_proportion_ever_significant": ever_z / n_exp}


def rows_to_replace(n_exp: int = 500, max_rows: int = 40_000, discordance: float = 0.02, margin_pp: float = MARGIN_PP,
                    alpha: float = ALPHA, seed: int = 23, chunk: int = 50) -> dict:
    """A truly equal variant (each discordant kind with probability discordance/2): the labelled rows
    until the verdict first says "can replace" (median, 90th percentile), and the fraction that got there
    within `max_rows` (the percentiles count the others as max_rows: then they are lower bounds)."""
    d = margin_pp / 100
    rng = np.random.default_rng(seed)
    n = np.arange(1, max_rows + 1)
    first = []
    for size in _chunks(n_exp, chunk):
        b, c = paired_counts(rng, size, max_rows, discordance / 2, discordance / 2)
        ok = paired_rejects(n, b, c, -d, alpha, upper=False)
        first.append(np.where(ok.any(axis=1), ok.argmax(axis=1) + 1, max_rows))
        del b, c, ok
    t = np.concatenate(first)
    return {"experiments": n_exp, "max_rows": max_rows, "discordance": discordance, "margin_pp": margin_pp,
            "alpha": alpha, "reached": float((t < max_rows).mean()), "median": float(np.median(t)),
            "p90": float(np.percentile(t, 90))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiments", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--json", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    out, t0 = {}, time.perf_counter()
    for disc in (0.02, 0.10):
        out[f"new_wrong_replace_disc{disc}"] = wrong_replace_rate(args.experiments, args.rows, disc)
    out["new_agreement_wrong_replace"] = agreement_wrong_replace_rate(args.experiments, args.rows)
    for disc in (0.02, 0.10):
        out[f"old_verdict_disc{disc}"] = old_verdict_rate(args.experiments, args.rows, disc)
    out["rows_to_replace_disc0.02"] = rows_to_replace(500, 20_000, 0.02)
    out["rows_to_replace_disc0.1"] = rows_to_replace(500, 60_000, 0.10)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
