"""Member weights chosen from data: ensemble selection, fitted simplex weights, and `auto`.

All on member outputs over held-out rows, `logits (K members, N rows, C classes)` and labels `y (N,)`,
in numpy (float64); the result is a weight vector that the averaging combiners (soft_vote, logit_mean,
geometric_mean) export inside the fused graph like any other weights (they normalise it to sum 1).

* `greedy_selection` / `bagged_selection`: Caruana, Niculescu-Mizil, Crew & Ksikes 2004, "Ensemble
  Selection from Libraries of Models" (as auto-sklearn's `EnsembleSelection` uses it): start from an
  empty ensemble (or the `init_best` best members once each, "sorted initialization"), then
  `n_iter` times add, with replacement, the member whose addition gives the best metric of the
  combined ensemble (ties: the lowest member index). The result is an integer count per member.
  Bagged selection runs that on `n_bags` random subsets of `bag_fraction` of the members and sums
  the counts (Caruana et al.'s remedy for overfitting the selection set).
* `fit_weights`: the weights on the simplex minimising the NLL of the combined ensemble, found by
  L-BFGS over a softmax parametrisation w = softmax(θ) with the analytic gradient.
* `choose`: `auto` scores each candidate weighting (equal, select, fit, stacking) out of fold on the
  held-out rows (stratified k-fold cross-fitting: fit on k-1 folds, predict the held-out fold), picks
  the lowest out-of-fold NLL and refits the winner on every held-out row. With `n_repeats` > 1 (the build
  uses AUTO_REPEATS = 5) the cross-fitting is repeated on differently shuffled partitions and the NLL
  averaged over the repeats: repeated k-fold cross-validation, the standard remedy for the variance that
  one random partition adds to a CV estimate (Kohavi 1995, "A study of cross-validation and bootstrap for
  accuracy estimation and model selection"; Kim 2009, "Estimating classification error rate: Repeated
  cross-validation, repeated hold-out and bootstrap", CSDA 53(11)). On a validation split with a handful
  of errors one partition decides which fold each error falls in, and with it the comparison.
* Output temperature (`tempered`): each weighting may be followed by one temperature T fitted on the
  same rows as its weights, on the ensemble's OUTPUT: softmax(log p / T) (= p^(1/T) renormalised for
  the soft vote; logits / T for logit_mean and geometric_mean), found by fusion.ensemble.calibration's
  bounded search. Averaging probabilities is typically under-confident (T < 1 sharpens it); the argmax
  does not move. `auto` scores `equal`, `select`, `fit`, each also with "+temperature", out of fold (the
  weights and T refitted in every fold) and keeps the lowest NLL; the combiner exports T in the graph.
  `prior_sd` (the build: LOG_T_PRIOR_SD = 0.5) fits T as a MAP estimate under a Gaussian prior on log T
  centred on T = 1 instead of by maximum likelihood. Temperature scaling is a one-coefficient multinomial
  logistic regression on log p (slope 1/T); when the rows it is fitted on hold no error, or one, the
  data are (nearly) separated and the likelihood keeps improving as T -> 0, so the MLE runs to the search
  bound (T = 0.05) and the next misclassified row costs tens of nats. A weakly informative prior is the
  standard cure for separation (Gelman, Jakulin, Pittau & Su 2008, "A weakly informative default prior
  distribution for logistic and other regression models", Ann. Appl. Stat. 2(4)); sd 0.5 on log T keeps
  T in [0.37, 2.7] at two standard deviations, wide around the T of 0.7-0.9 typical of averaged
  probabilities, and its weight (1/N of the mean NLL's scale) vanishes as rows grow.
* `gate`: is the chosen ensemble better than its best member beyond noise? A paired bootstrap of the
  per-row NLL difference (primary) and an exact McNemar test on correctness (fusion.stats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fusion import combine as shared
from fusion.combine import AVERAGING, _softmax
from fusion.errors import ConfigError
from fusion.stats import mcnemar_exact

PROB_EPS = 1e-12  # as fusion/compare.py: probabilities clipped before the log
METRICS = ("log_loss", "accuracy")
TIE_TOL = 1e-9  # out-of-fold NLLs closer than this are equal (summation order alone moves the last digits)
MODES = ("equal", "select", "fit", "auto")  # `[ensemble] weights = "..."` (besides a list or a table)
AUTO_REPEATS = 5  # the build's repeats of the stratified k-fold cross-fitting (5 x 5-fold)
LOG_T_PRIOR_SD = 0.5  # the build's prior on the output temperature: log T ~ N(0, 0.5^2)


# ---- combining in numpy: fusion/combine.py's functions (members mode uses the same), in float64 -------


def _log_softmax(z: np.ndarray) -> np.ndarray:  # the NLL of a mean of log-probabilities, without exp/log round trips
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _check(logits: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ConfigError(f"expected member logits of shape (n_members, n_rows, n_classes); got {z.shape}")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (z.shape[1],):
            raise ConfigError(f"expected {z.shape[1]} labels, one per row; got shape {y.shape}")
    return z, y


def _check_combiner(combiner: str) -> None:
    if combiner not in AVERAGING:
        raise ConfigError(f"chosen weights apply to the combiners {list(AVERAGING)}; got '{combiner}'")


def contributions(logits: np.ndarray, combiner: str) -> np.ndarray:
    """What each combiner averages, per member: probabilities (soft_vote), logits (logit_mean) or
    log-probabilities (geometric_mean). (K, N, C)."""
    _check_combiner(combiner)
    z, _ = _check(logits)
    return shared.contributions(_softmax(z), combiner)


def _finish(mean: np.ndarray, combiner: str) -> np.ndarray:
    """The weighted mean of the contributions -> probabilities."""
    return shared.finish(mean, combiner)


def combine(logits: np.ndarray, weights: Sequence[float] | None, combiner: str = "soft_vote") -> np.ndarray:
    """Probabilities (N, C) of the weighted combiner over member logits (K, N, C); None: equal weights."""
    c = contributions(logits, combiner)
    w = np.ones(len(c)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(c),) or (w < 0).any() or not w.sum() > 0:
        raise ConfigError(f"expected {len(c)} non-negative weights with a positive sum; got {w.tolist()}")
    return _finish(np.tensordot(w / w.sum(), c, axes=1), combiner)


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean −log p[y], probabilities clipped at 1e-12 (fusion.compare.negative_log_likelihood)."""
    p = np.clip(np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y], PROB_EPS, 1.0)
    return float(-np.log(p).mean())


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(-1) == y).mean())


def loss(probs: np.ndarray, y: np.ndarray, metric: str) -> float:
    """The selection metric as a loss (lower is better): log loss, or the error rate for "accuracy"."""
    if metric == "log_loss":
        return log_loss(probs, y)
    if metric == "accuracy":
        return 1.0 - accuracy(probs, y)
    raise ConfigError(f"expected a selection metric among {list(METRICS)}; got {metric!r}")


# ---- ensemble selection (Caruana et al. 2004) -------------------------------------------------------


@dataclass(frozen=True)
class SelectionConfig:
    """Ensemble selection settings. Defaults: log loss; 50 greedy additions (auto-sklearn's
    `ensemble_size`); 20 bags of half the members (Caruana et al. 2004, section 2.3); no sorted
    initialization; seed 0 for the bags."""

    metric: str = "log_loss"
    n_iter: int = 50
    init_best: int = 0
    n_bags: int = 20
    bag_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ConfigError(f"expected a selection metric among {list(METRICS)}; got {self.metric!r}")
        if self.n_iter < 1 or self.init_best < 0 or self.n_bags < 0 or not 0 < self.bag_fraction <= 1:
            raise ConfigError(f"expected n_iter >= 1, init_best >= 0, n_bags >= 0 and 0 < bag_fraction <= 1; got {self}")

    def to_dict(self) -> dict:
        return {"method": "ensemble selection with replacement (Caruana et al. 2004)", "metric": self.metric,
                "n_iter": self.n_iter, "init_best": self.init_best, "n_bags": self.n_bags,
                "bag_fraction": self.bag_fraction, "seed": self.seed}


def greedy_selection(
    logits: np.ndarray, y: np.ndarray, *, combiner: str = "soft_vote", metric: str = "log_loss",
    n_iter: int = 50, init_best: int = 0, members: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Greedy forward selection with replacement. Returns (counts (K,), picks in order).

    members: the indices that may be picked (default all; a bag in bagged selection). init_best: the
    ensemble starts with that many of the best single members (by `metric`), each once."""
    z, y = _check(logits, y)
    c = contributions(z, combiner)
    pool = list(range(len(c))) if members is None else sorted(set(int(i) for i in members))
    if not pool:
        raise ConfigError("expected at least one member to select from; got none")
    counts = np.zeros(len(c), dtype=np.int64)
    total = np.zeros_like(c[0])
    picks: list[int] = []
    if init_best:
        single = [loss(_finish(c[k], combiner), y, metric) for k in pool]
        for j in np.argsort(single, kind="stable")[:init_best]:
            k = pool[int(j)]
            counts[k] += 1
            total += c[k]
            picks.append(k)
    for _ in range(n_iter):
        n = counts.sum() + 1
        scores = [loss(_finish((total + c[k]) / n, combiner), y, metric) for k in pool]
        k = pool[int(np.argmin(scores))]  # the first of equal scores: the lowest index
        counts[k] += 1
        total += c[k]
        picks.append(k)
    return counts, picks


def bagged_selection(logits: np.ndarray, y: np.ndarray, cfg: SelectionConfig = SelectionConfig(),
                     combiner: str = "soft_vote") -> np.ndarray:
    """Integer weights (K,): the summed counts of greedy selection over `cfg.n_bags` random bags of
    max(1, round(bag_fraction · K)) members (n_bags = 0: one selection over every member)."""
    z, y = _check(logits, y)
    kw = {"combiner": combiner, "metric": cfg.metric, "n_iter": cfg.n_iter, "init_best": cfg.init_best}
    if cfg.n_bags == 0:
        return greedy_selection(z, y, **kw)[0]
    rng = np.random.default_rng(cfg.seed)
    size = max(1, int(round(cfg.bag_fraction * len(z))))
    counts = np.zeros(len(z), dtype=np.int64)
    for _ in range(cfg.n_bags):
        bag = rng.choice(len(z), size=size, replace=False)
        counts += greedy_selection(z, y, members=bag, **kw)[0]
    return counts


# ---- fitted weights ---------------------------------------------------------------------------------


def weighted_nll(weights: np.ndarray, logits: np.ndarray, y: np.ndarray, combiner: str = "soft_vote") -> float:
    """NLL of the combiner with these weights (normalised to sum 1), without clipping."""
    c = contributions(logits, combiner)
    w = np.asarray(weights, dtype=np.float64)
    mean = np.tensordot(w / w.sum(), c, axes=1)
    rows = np.arange(len(y))
    if combiner == "soft_vote":
        return float(-np.log(np.maximum(mean[rows, y], 1e-300)).mean())
    return float(-_log_softmax(mean)[rows, y].mean())


def fit_weights(logits: np.ndarray, y: np.ndarray, combiner: str = "soft_vote", tol: float = 1e-10) -> np.ndarray:
    """Simplex weights (K,) minimising the validation NLL of `combiner`: L-BFGS-B on θ with
    w = softmax(θ), analytic gradient, started at equal weights. The NLL is convex in w for soft_vote
    (−log of a linear function) and for logit_mean/geometric_mean (log-sum-exp of a linear function),
    so the optimum on the simplex is global; the parametrisation reaches its boundary only in the limit."""
    from scipy.optimize import minimize

    z, y = _check(logits, y)
    c = contributions(z, combiner)
    rows = np.arange(len(y))
    at_y = c[:, rows, y]  # (K, N)

    def f(theta):
        w = _softmax(theta)
        mean = np.tensordot(w, c, axes=1)  # (N, C)
        if combiner == "soft_vote":
            p = np.maximum(mean[rows, y], 1e-300)
            value = -np.log(p).mean()
            g = -(at_y / p).mean(1)  # dNLL/dw_k
        else:
            q = _softmax(mean)
            value = -_log_softmax(mean)[rows, y].mean()
            g = -(at_y - np.einsum("knc,nc->kn", c, q)).mean(1)
        return value, w * (g - w @ g)  # chain rule through the softmax

    res = minimize(f, np.zeros(len(c)), jac=True, method="L-BFGS-B", options={"ftol": tol, "gtol": 1e-9, "maxiter": 1000})
    return _softmax(res.x)


# ---- output temperature -----------------------------------------------------------------------------


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the ensemble's probabilities (N, C) at output temperature T (the soft vote's
    probabilities floored at 1e-30 before the log, as fusion/ensemble/classification.py's graph)."""
    return shared.apply_temperature(np.asarray(probs, dtype=np.float64), temperature)


def fit_output_temperature(probs: np.ndarray, y: np.ndarray, prior_sd: float | None = None) -> float:
    """The T minimising the NLL of softmax(log p / T) on these rows (fusion.ensemble.calibration's search:
    bounded Brent over log T in [-3, 3]). log p differs from the combiner's pre-softmax scores by a per-row
    constant, which the softmax cancels, so the same T applies to logit_mean's mean logits.

    prior_sd: None, the maximum-likelihood T; a number s, the MAP T under log T ~ N(0, s^2): the summed NLL
    plus (log T)^2 / (2 s^2), i.e. the mean NLL plus (log T)^2 / (2 s^2 N), searched the same way."""
    from fusion.ensemble.calibration import LOG_T_BOUNDS, fit_temperature, nll_at_temperature

    logp, y = np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-30)), np.asarray(y)
    if prior_sd is None:
        return fit_temperature(logp, y)
    if not prior_sd > 0:
        raise ConfigError(f"expected a prior standard deviation of log T > 0 (or None for no prior); got {prior_sd}")
    if logp.ndim != 2 or len(logp) != len(y) or len(y) == 0:
        raise ConfigError(f"expected probabilities (N, C) and labels (N,) with N > 0; got {logp.shape} and {y.shape}")
    from scipy.optimize import minimize_scalar

    penalty = 1.0 / (2.0 * prior_sd * prior_sd * len(y))
    res = minimize_scalar(lambda s: nll_at_temperature(logp, y, float(np.exp(s))) + penalty * s * s,
                          bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


@dataclass(frozen=True)
class Tempered:
    """A weighting's fitted parameters followed by an output temperature."""

    weights: object  # the base candidate's params: weights (K,) or None (equal)
    temperature: float


def tempered(base: "Candidate", prior_sd: float | None = None) -> "Candidate":
    """`base` followed by an output temperature fitted on the rows its weights are fitted on (prior_sd:
    see `fit_output_temperature`). `choose` reuses `base`'s fit on the same rows when both are compared."""
    if base.combiner not in AVERAGING:
        raise ConfigError(f"an output temperature follows the combiners {list(AVERAGING)}; got '{base.combiner}'")
    if prior_sd is not None and not prior_sd > 0:
        raise ConfigError(f"expected a prior standard deviation of log T > 0 (or None for no prior); got {prior_sd}")

    def then(params, z, y):
        return Tempered(params, fit_output_temperature(base.predict(params, z), y, prior_sd))

    def predict(t, z):
        return apply_temperature(base.predict(t.weights, z), t.temperature)

    about = (("temperature_fit", "maximum likelihood" if prior_sd is None else
              f"MAP, log T ~ N(0, {prior_sd:g}^2) (Gelman et al. 2008: a weakly informative prior against separation)"),)
    return Candidate(f"{base.name}+temperature", base.combiner, lambda z, y: then(base.fit(z, y), z, y), predict,
                     base=base, then=then, about=about)


# ---- auto: candidates scored out of fold ------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A way to weight the members: `fit(z, y) -> params`, `predict(params, z) -> probabilities`."""

    name: str
    combiner: str
    fit: Callable[[np.ndarray, np.ndarray], object]
    predict: Callable[[object, np.ndarray], np.ndarray]
    # a candidate built on another (`tempered`): fit(z, y) == then(base.fit(z, y), z, y), so `choose` fits the
    # base once per set of rows for both; `about`: extra (key, value) items for the candidate's record
    base: "Candidate | None" = None
    then: Callable[[object, np.ndarray, np.ndarray], object] | None = None
    about: tuple[tuple[str, str], ...] = ()


def weighting(name: str, combiner: str, cfg: SelectionConfig = SelectionConfig()) -> Candidate:
    """The candidate `equal`, `select` or `fit` for an averaging combiner."""
    _check_combiner(combiner)

    def predict(w, z):
        return combine(z, w, combiner)

    if name == "equal":
        return Candidate(name, combiner, lambda z, y: None, predict)
    if name == "select":
        return Candidate(name, combiner, lambda z, y: bagged_selection(z, y, cfg, combiner), predict)
    if name == "fit":
        return Candidate(name, combiner, lambda z, y: fit_weights(z, y, combiner), predict)
    raise ConfigError(f"expected a weighting among ['equal', 'select', 'fit']; got {name!r}")


def stacking_candidate(**params) -> Candidate:
    """Stacking (fusion/ensemble/stacking.py): its logistic-regression head fitted on the given rows."""
    import torch

    from fusion.ensemble.stacking import Stacking

    def fit(z, y):
        return Stacking(len(z), **params).fit(torch.from_numpy(np.asarray(z, dtype=np.float32)), y)

    def predict(head, z):
        with torch.no_grad():
            return head(torch.from_numpy(np.asarray(z, dtype=np.float32))).double().numpy()

    return Candidate("stacking", "stacking", fit, predict)


def n_folds(y: np.ndarray, wanted: int = 5, n_classes: int = 0) -> int:
    """Stratified folds possible on these labels: at most `wanted`, at most the rarest class's count
    (counting the classes 0..n_classes-1 absent from y as 0)."""
    return int(min(wanted, np.bincount(np.asarray(y), minlength=n_classes).min() if len(y) else 0))


def _fitted(candidate: Candidate, z: np.ndarray, y: np.ndarray, memo: dict | None, key) -> object:
    """candidate.fit(z, y), remembered under `key` (the rows) in `memo`; a candidate with a `base` reuses
    the base's remembered fit on the same rows."""
    if memo is None:
        return candidate.fit(z, y)
    k = (id(candidate), key)  # the objects outlive `choose`, so their ids are stable keys
    if k not in memo:
        memo[k] = (candidate.then(_fitted(candidate.base, z, y, memo, key), z, y) if candidate.base is not None
                   else candidate.fit(z, y))
    return memo[k]


def out_of_fold(candidate: Candidate, logits: np.ndarray, y: np.ndarray, n_splits: int = 5, seed: int = 0,
                memo: dict | None = None) -> np.ndarray:
    """Cross-fitted probabilities (N, C): for each of `n_splits` stratified folds (shuffled, seeded),
    the candidate fitted on the other folds predicts this fold's rows. memo: fits shared between calls
    (see `_fitted`)."""
    from sklearn.model_selection import StratifiedKFold

    z, y = _check(logits, y)
    if n_splits < 2:
        raise ConfigError(f"expected at least 2 rows of every class for cross-fitting; got class counts {np.bincount(y).tolist()}")
    oof = np.zeros(z.shape[1:], dtype=np.float64)
    folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    for i, (fit_idx, pred_idx) in enumerate(folds):
        params = _fitted(candidate, z[:, fit_idx], y[fit_idx], memo, ("fold", n_splits, seed, i))
        oof[pred_idx] = candidate.predict(params, z[:, pred_idx])
    return oof


def repeated_out_of_fold(candidate: Candidate, logits: np.ndarray, y: np.ndarray, n_splits: int = 5,
                         n_repeats: int = 1, seed: int = 0, memo: dict | None = None) -> np.ndarray:
    """(n_repeats, N, C): `out_of_fold` on `n_repeats` partitions, repeat r shuffled with seed `seed + r`
    (so repeat 0 is the single cross-fitting of `seed`)."""
    if n_repeats < 1:
        raise ConfigError(f"expected n_repeats >= 1; got {n_repeats}")
    return np.stack([out_of_fold(candidate, logits, y, n_splits, seed + r, memo) for r in range(n_repeats)])


def figures(probs: np.ndarray, y: np.ndarray) -> dict:
    return {"nll": log_loss(probs, y), "accuracy": accuracy(probs, y)}


@dataclass(frozen=True)
class Choice:
    """The outcome of `choose`: the winner fitted on every held-out row, its out-of-fold validation
    probabilities (for the gate), and every candidate's figures (the record for the manifest)."""

    name: str
    combiner: str
    params: object  # weights (K,) / None for a weighting; Tempered(weights, T) with an output temperature; the fitted Stacking head for stacking
    val_oof_probs: np.ndarray
    record: dict


def choose(candidates: Sequence[Candidate], val_logits: np.ndarray, y_val: np.ndarray,
           test_logits: np.ndarray | None = None, y_test: np.ndarray | None = None,
           n_splits: int = 5, seed: int = 0, n_repeats: int = 1) -> Choice:
    """Score every candidate out of fold on the validation rows, pick the lowest out-of-fold NLL (ties
    within TIE_TOL: the earlier candidate), and refit each on every validation row (its test figures are recorded, never
    used to choose). With one candidate nothing is compared, but its out-of-fold figures are still recorded.

    n_repeats > 1: the k-fold cross-fitting repeated on partitions shuffled with seeds seed, seed+1, ...; a
    candidate's `val_oof` NLL and accuracy are the means over the repeats (`val_oof_repeats` lists each
    repeat's NLL), every candidate scored on the same partitions (paired). The gate gets the repeat-`seed`
    predictions (`Choice.val_oof_probs`: one prediction per row, as its McNemar test needs). One candidate:
    one repeat (nothing is compared)."""
    z, y = _check(val_logits, y_val)
    k = n_folds(y, n_splits)
    if k < 2 and len(candidates) > 1:
        raise ConfigError(f"comparing weightings needs at least 2 validation rows of every class for cross-fitting; "
                          f"got class counts {np.bincount(y).tolist()}")
    if n_repeats < 1:
        raise ConfigError(f"expected n_repeats >= 1; got {n_repeats}")
    repeats = n_repeats if len(candidates) > 1 and k >= 2 else 1
    memo: dict = {}  # each fit on each set of rows once (a tempered candidate reuses its base's)
    rows, fitted, oofs = {}, {}, {}
    for cand in candidates:
        fitted[cand.name] = params = _fitted(cand, z, y, memo, "all")
        in_sample = cand.predict(params, z)
        reps = repeated_out_of_fold(cand, z, y, k, repeats, seed, memo) if k >= 2 else in_sample[None]
        oofs[cand.name] = reps[0]
        per = [figures(p, y) for p in reps]
        w = params.weights if isinstance(params, Tempered) else params
        row = {"combiner": cand.combiner,
               "weights": None if w is None or cand.name == "stacking" else [float(v) for v in w],
               "temperature": params.temperature if isinstance(params, Tempered) else None,
               "val_oof": per[0] if repeats == 1 else {m: float(np.mean([f[m] for f in per])) for m in per[0]},
               "val_in_sample": figures(in_sample, y), **dict(cand.about)}
        if repeats > 1:
            row["val_oof_repeats"] = [f["nll"] for f in per]
        if test_logits is not None:
            row["test"] = figures(cand.predict(params, np.asarray(test_logits, dtype=np.float64)), np.asarray(y_test))
        rows[cand.name] = row
    best = next(iter(rows))
    for name in rows:  # a later (more flexible) candidate must win by more than rounding
        if rows[name]["val_oof"]["nll"] < rows[best]["val_oof"]["nll"] - TIE_TOL:
            best = name
    by = next(c for c in candidates if c.name == best)
    criterion = (f"lowest validation NLL out of fold ({k}-fold stratified cross-fitting on the validation "
                 f"split, shuffled with seed {seed}); the winner is then refitted on the whole validation split")
    if repeats > 1:
        criterion = (f"lowest validation NLL out of fold ({repeats} x {k}-fold stratified cross-fitting on the "
                     f"validation split, repeat r shuffled with seed {seed}+r, the NLL averaged over the repeats); "
                     f"the winner is then refitted on the whole validation split")
    if k < 2:
        criterion = "one candidate, its `val_oof` in-sample: fewer than 2 validation rows in some class for cross-fitting"
    record = {
        "chosen": best, "combiner": by.combiner, "criterion": criterion,
        "candidates": rows,
    }
    return Choice(best, by.combiner, fitted[best], oofs[best], record)


# ---- the gate: does the ensemble beat its best member? ----------------------------------------------


def paired_bootstrap(diff: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of paired per-row differences, resampling rows."""
    d = np.asarray(diff, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def gate(ensemble_probs: np.ndarray, member_probs: dict[str, np.ndarray], y: np.ndarray,
         n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Is the ensemble better than its best member beyond noise, on these rows?

    The best member: highest accuracy, then lowest NLL. The ensemble passes when the 95 % paired
    bootstrap interval of its per-row NLL improvement over that member lies above 0 and an exact
    McNemar test does not find it significantly less accurate (b: ensemble right, member wrong; c: the
    opposite; fails when c > b with p < alpha). `warning` is None when it passes."""
    y = np.asarray(y)
    rows = np.arange(len(y))

    def row_nll(p):
        return -np.log(np.clip(np.asarray(p, dtype=np.float64)[rows, y], PROB_EPS, 1.0))

    per = {n: (accuracy(p, y), float(row_nll(p).mean())) for n, p in member_probs.items()}
    best = min(per, key=lambda n: (-per[n][0], per[n][1]))
    ens_nll, mem_nll = row_nll(ensemble_probs), row_nll(member_probs[best])
    lo, hi = paired_bootstrap(mem_nll - ens_nll, n_boot, seed)
    ens_ok, mem_ok = np.asarray(ensemble_probs).argmax(-1) == y, np.asarray(member_probs[best]).argmax(-1) == y
    b, c = int((ens_ok & ~mem_ok).sum()), int((~ens_ok & mem_ok).sum())
    p = mcnemar_exact(b, c)
    beats = lo > 0 and not (c > b and p < alpha)
    out = {
        "best_member": best, "test": "paired bootstrap of the per-row NLL improvement (95 % percentile "
        f"interval, {n_boot} resamples, seed {seed}) and an exact McNemar test on correctness",
        "ensemble_nll": float(ens_nll.mean()), "member_nll": float(mem_nll.mean()),
        "nll_improvement_ci95": [lo, hi],
        "ensemble_accuracy": float(ens_ok.mean()), "member_accuracy": float(mem_ok.mean()),
        "mcnemar": {"b": b, "c": c, "p_value": p}, "beats_best_member": bool(beats), "warning": None,
    }
    if not beats:
        out["warning"] = (
            f"the ensemble does not beat its best member {best} on validation beyond noise (NLL {ens_nll.mean():.4f} vs "
            f"{mem_nll.mean():.4f}, 95% paired-bootstrap interval of the improvement [{lo:.4f}, {hi:.4f}]"
            f"{', which reaches 0' if lo <= 0 else ''}; "
            f"accuracy {100 * ens_ok.mean():.2f}% vs {100 * mem_ok.mean():.2f}%, McNemar {b}/{c}, p={p:.3g}); "
            f"consider serving {best} alone"
        )
    return out
