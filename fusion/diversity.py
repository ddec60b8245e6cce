"""Diversity of an ensemble's members (pure numpy; no torch): why an ensemble does or does not pay.

Classification, per pair of members (i, j), each a (K, K) matrix with its mean over the pairs i < j
(Kuncheva & Whitaker 2003, "Measures of diversity in classifier ensembles"):

* **disagreement**: the fraction of rows where the two members' predicted labels differ. (Kuncheva's
  `dis` counts rows where exactly one of the two is right; on multi-class data two members can both be
  wrong with different labels, so the label form is the one that says whether averaging can change an
  answer. Symmetric, zero diagonal.)
* **Yule's Q** on the oracle outputs (1 = right, 0 = wrong), with N11 both right, N00 both wrong, N10
  i right and j wrong, N01 the opposite: Q = (N11·N00 − N01·N10) / (N11·N00 + N01·N10), in [−1, 1];
  positive when the members tend to be right on the same rows. Undefined (NaN, and left out of the
  mean) when the denominator is 0, e.g. a member that is never wrong. Diagonal: 1.
* **error correlation**: Pearson's correlation of the two 0/1 error vectors (Kuncheva's ρ, the phi
  coefficient). NaN when a member's errors are constant (never or always wrong). Diagonal: 1.

Regression, the ambiguity decomposition (Krogh & Vedelsby 1995): with weights w on the simplex and
f̄ = Σ w_i f_i, for every row (f̄ − y)² = Σ w_i (f_i − y)² − Σ w_i (f_i − f̄)², i.e. ensemble error =
average member error − ambiguity, exactly (an identity, not an approximation), so the ensemble's
squared error is never above the weighted average of its members'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion.errors import ConfigError


def _labels(preds: np.ndarray) -> np.ndarray:
    """(K, N) labels from (K, N) labels or (K, N, C) scores (argmax)."""
    preds = np.asarray(preds)
    if preds.ndim == 3:
        return preds.argmax(-1)
    if preds.ndim != 2:
        raise ConfigError(f"expected member predictions of shape (K, N) or (K, N, C); got {preds.shape}")
    return preds


def oracle_outputs(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(K, N) bool: member k right on row n. preds: (K, N) labels or (K, N, C) scores; y: (N,)."""
    labels = _labels(preds)
    y = np.asarray(y)
    if labels.shape[1] != len(y):
        raise ConfigError(f"expected {labels.shape[1]} labels, one per row; got {len(y)}")
    return labels == y[None, :]


def _mean_offdiag(m: np.ndarray) -> float:
    """Mean over the pairs i < j, NaN entries left out (NaN when none is defined or K < 2)."""
    iu = np.triu_indices(len(m), k=1)
    vals = m[iu]
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if len(vals) else float("nan")


def disagreement_matrix(preds: np.ndarray) -> np.ndarray:
    """(K, K): fraction of rows where members i and j predict different labels. preds: (K, N) or (K, N, C)."""
    labels = _labels(preds)
    return (labels[:, None, :] != labels[None, :, :]).mean(-1)


def pair_counts(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N11, N10, N01, N00), each (K, K) counts of rows: both right, i right j wrong, i wrong j right, both wrong."""
    c = np.asarray(correct, dtype=np.int64)  # (K, N)
    w = 1 - c
    return c @ c.T, c @ w.T, w @ c.T, w @ w.T


def yule_q_matrix(correct: np.ndarray) -> np.ndarray:
    """(K, K) Yule's Q from (K, N) oracle outputs; NaN where N11·N00 + N01·N10 = 0; diagonal 1."""
    n11, n10, n01, n00 = (x.astype(np.float64) for x in pair_counts(correct))
    num, den = n11 * n00 - n01 * n10, n11 * n00 + n01 * n10
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    np.fill_diagonal(q, 1.0)
    return q


def error_correlation_matrix(correct: np.ndarray) -> np.ndarray:
    """(K, K) Pearson correlation of the 0/1 error vectors; NaN for a member whose errors are constant; diagonal 1."""
    e = 1.0 - np.asarray(correct, dtype=np.float64)  # (K, N)
    d = e - e.mean(-1, keepdims=True)
    cov = d @ d.T
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(np.outer(sd, sd) > 0, cov / np.outer(sd, sd), np.nan)
    np.fill_diagonal(r, 1.0)
    return np.clip(r, -1.0, 1.0)


@dataclass(frozen=True)
class Diversity:
    """The pairwise matrices over members `names` (in that order) and their means over the pairs i < j."""

    names: list[str]
    disagreement: np.ndarray
    yule_q: np.ndarray
    error_correlation: np.ndarray
    accuracy: np.ndarray  # (K,)

    @property
    def means(self) -> dict[str, float]:
        return {"mean_disagreement": _mean_offdiag(self.disagreement), "mean_yule_q": _mean_offdiag(self.yule_q),
                "mean_error_correlation": _mean_offdiag(self.error_correlation)}

    def to_json(self) -> dict:
        """Plain JSON (NaN as null): the means, one row per pair ("a · b") and the (K, K) matrices."""
        def num(x):
            return None if not np.isfinite(x) else float(x)

        rows = {}
        for i in range(len(self.names)):
            for j in range(i + 1, len(self.names)):
                rows[f"{self.names[i]} · {self.names[j]}"] = {
                    "disagreement": num(self.disagreement[i, j]), "yule_q": num(self.yule_q[i, j]),
                    "error_correlation": num(self.error_correlation[i, j]),
                }
        return {"n_members": len(self.names), **{k: num(v) for k, v in self.means.items()}, "rows": rows,
                "matrices": {"names": list(self.names),
                             **{k: [[num(x) for x in r] for r in getattr(self, k)]
                                for k in ("disagreement", "yule_q", "error_correlation")}}}


def diversity(probs: dict[str, np.ndarray], y: np.ndarray) -> Diversity:
    """The classification diversity of members `probs` (name -> (N, C) probabilities or scores) on labels y (N,)."""
    names = list(probs)
    if not names:
        raise ConfigError("expected at least one member's predictions; got none")
    stacked = np.stack([np.asarray(probs[n]) for n in names])  # (K, N, C)
    correct = oracle_outputs(stacked, y)
    return Diversity(names, disagreement_matrix(stacked), yule_q_matrix(correct),
                     error_correlation_matrix(correct), correct.mean(-1))


def ambiguity_decomposition(preds: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """Krogh & Vedelsby: ensemble squared error = weighted member squared error − ambiguity, each a mean over rows.

    preds: (K, N) or (K, N, D) member regression outputs; y: (N,) or (N, D); weights: (K,) non-negative,
    normalised to sum 1 (equal when None). Multi-output rows sum their squared errors over D.
    Returns {"ensemble_error", "average_member_error", "ambiguity", "member_errors": [...]}.
    """
    f = np.asarray(preds, dtype=np.float64)
    if f.ndim == 2:
        f = f[..., None]
    t = np.asarray(y, dtype=np.float64).reshape(f.shape[1], -1)  # (N, D)
    k = len(f)
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (k,) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"expected {k} non-negative weights, not all zero; got {np.asarray(weights).tolist()}")
    w = w / w.sum()
    fbar = np.tensordot(w, f, axes=1)  # (N, D)
    member = ((f - t[None]) ** 2).sum(-1).mean(-1)  # (K,)
    amb = (w[:, None] * ((f - fbar[None]) ** 2).sum(-1)).sum(0).mean()
    return {"ensemble_error": float(((fbar - t) ** 2).sum(-1).mean()), "average_member_error": float(w @ member),
            "ambiguity": float(amb), "member_errors": member.tolist()}


def plot_heatmaps(div: dict, path) -> object:
    """The three pairwise matrices of `Diversity.to_json()` as annotated heat maps side by side, saved to path (PNG).

    Each cell prints its value (2 decimals; "—" where undefined); the member names label both axes
    (x labels rotated, `fusion.plot_labels.freeze_layout` fixes the layout before saving)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusion.plot_labels import freeze_layout

    names = div["matrices"]["names"]
    k = len(names)
    panels = [("disagreement", "label disagreement %", "viridis", (0.0, None)),
              ("yule_q", "Yule's Q (oracle outputs)", "coolwarm", (-1.0, 1.0)),
              ("error_correlation", "error correlation (Pearson)", "coolwarm", (-1.0, 1.0))]
    side = max(3.2, 0.45 * k + 1.6)
    fig, axes = plt.subplots(1, 3, figsize=(3 * side, side + 0.6), layout="constrained", dpi=120)
    for ax, (key, title, cmap, (lo, hi)) in zip(axes, panels):
        m = np.array([[np.nan if v is None else v for v in r] for r in div["matrices"][key]], dtype=np.float64)
        if hi is None:
            hi = float(np.nanmax(m)) if np.isfinite(m).any() and np.nanmax(m) > 0 else 1.0
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=lo, vmax=hi)
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        pct = key == "disagreement"  # a few % on good members: shown in %, one decimal, so 0.4 % is not "0.00"
        mean = div.get("mean_" + key)
        ax.set_title(f"{title}\nmean over pairs {_fmt(None if mean is None else 100 * mean) if pct else _fmt(mean)}", fontsize=9)
        for i in range(k):
            for j in range(k):
                v = m[i, j]
                shade = im.norm(v) if np.isfinite(v) else 0.5
                color = "white" if (cmap == "viridis" and shade < 0.6) or (cmap != "viridis" and abs(shade - 0.5) > 0.3) else "black"
                ax.text(j, i, "—" if not np.isfinite(v) else f"{100 * v:.1f}" if pct else f"{v:.2f}", ha="center", va="center",
                        fontsize=7 if k <= 8 else 6, color=color)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"member diversity ({k} members)", fontsize=10)
    freeze_layout(fig)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(x) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.3f}"
