"""The bundle's combiners in numpy: one torch-free module for both halves (like fusion/stats.py).

The service's `members` mode (one session per member, combined here: service/members.py) and the
offline weight selection (fusion/ensemble/selection.py, which averages `contributions` and applies
`finish` in float64) both combine with these functions, so the arithmetic exists once outside the graph.

Member ONNX files output probabilities p = softmax(z); every combiner below is written on p and
equals its torch counterpart in fusion/ensemble (log p differs from z by a per-row constant, which
softmax cancels). The fused graph is what production serves, so where rounding decides a tie the
arithmetic here copies the graph's: float32 sums in member order, hard-vote weights unnormalised
(tests/test_combiner_contract.py checks every registered combiner against torch and onnxruntime).

Known limit: members hand over float32 probabilities, not logits. A logit gap beyond ~87 underflows
a probability below float32's normal range (0 beyond ~103), so logit_mean and geometric_mean can then
differ from the graph; below that they agree to ~1e-6.
"""

from __future__ import annotations

import numpy as np

from fusion.errors import ConfigError

TINY = 1e-30  # as fusion/ensemble/classification.py: soft vote's floor before the log of an output temperature
NAMES = ("soft_vote", "hard_vote", "logit_mean", "geometric_mean", "stacking", "mean", "weighted_mean", "median")


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def _log(p: np.ndarray) -> np.ndarray:
    """log p with only an exact 0 floored (at the dtype's smallest positive number). A floor of 1e-12 turned
    every logit gap over 27.6 into 27.6 and moved logit_mean/geometric_mean answers by up to 0.4."""
    p = np.asarray(p)
    p = p if p.dtype in (np.float32, np.float64) else p.astype(np.float64)
    return np.log(np.maximum(p, np.finfo(p.dtype).smallest_subnormal), dtype=np.float64)


AVERAGING = ("soft_vote", "logit_mean", "geometric_mean")  # weighted means of a per-member contribution


def contributions(probs: np.ndarray, name: str) -> np.ndarray:
    """What an averaging combiner averages, per member: the probabilities (soft_vote) or their logs
    (logit_mean, geometric_mean: log p differs from the logits by a per-row constant, which the final
    softmax cancels). probs (M, B, C) -> (M, B, C)."""
    return probs if name == "soft_vote" else _log(probs)


def finish(mean: np.ndarray, name: str, temperature: float = 1.0) -> np.ndarray:
    """The weighted mean of the contributions (B, C) -> probabilities, at the output temperature."""
    if name == "soft_vote":
        return mean if temperature == 1.0 else apply_temperature(mean, temperature)
    return _softmax(mean / temperature)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) with p floored at TINY, as the graph's soft vote with an output temperature."""
    if temperature == 1.0:
        return probs
    return _softmax(np.log(np.maximum(probs, TINY), dtype=np.float64) / temperature)


def calibrate(probs: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Temperature scaling on probabilities: softmax(log p_m / T_m) per member. probs (M, B, C), temperatures (M,)."""
    return _softmax(_log(probs) / temperatures.reshape(-1, 1, 1))


def combine(config: dict, probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """probs: (M, B, C) member probabilities -> (B, C); weights: (M,) over the members present."""
    name = config["name"]
    m = probs.shape[0]
    raw = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    w = (raw / raw.sum()).reshape(-1, 1, 1)
    w32 = w.astype(np.float32)  # the graph's buffer: normalised in float64, stored as float32
    p32 = probs.astype(np.float32, copy=False)
    t = float(config.get("temperature", 1.0))  # the ensemble's output temperature (soft_vote, logit_mean, geometric_mean)
    if name in ("soft_vote", "weighted_mean"):
        return finish((p32 * w32).sum(0, dtype=np.float32), "soft_vote", t)  # float32 sums in member order, as the graph
    if name == "hard_vote":
        # as HardVote: unnormalised float32 weights summed in member order, then divided, so that a
        # tie in the graph (1 + 2 vs 3, or 0.1 + 0.2 vs 0.3 in float32) is a tie here; lowest index wins
        c = probs.shape[-1]
        wr = raw.astype(np.float32).reshape(-1, 1, 1)
        votes = np.eye(c, dtype=np.float32)[probs.argmax(-1)]  # one-hot votes (M, B, C)
        return (votes * wr).sum(0, dtype=np.float32) / wr.sum(dtype=np.float32)
    if name in ("logit_mean", "geometric_mean"):
        return finish((contributions(probs, name) * w).sum(0), name, t)
    if name == "stacking":
        check_config(config, m)
        coef, intercept = np.asarray(config["coef"]), np.asarray(config["intercept"])
        feats = probs.transpose(1, 0, 2)  # (B, M, C)
        feats = (feats[..., 1:] if probs.shape[-1] == 2 else feats).reshape(probs.shape[1], -1)
        scores = feats @ coef.T + intercept
        if scores.shape[-1] == 1:
            scores = np.concatenate([np.zeros_like(scores), scores], -1)
        return _softmax(scores)
    if name == "mean":
        return p32.mean(0, dtype=np.float32)
    if name == "median":
        s = np.sort(p32, axis=0)
        return np.float32(0.5) * (s[(m - 1) // 2] + s[m // 2])
    raise ConfigError(f"members mode cannot combine with '{name}'; it supports {list(NAMES)}")


def check_config(config: dict, n_members: int) -> None:
    """Raise ConfigError unless members mode can combine with `config` (checked when the bundle loads)."""
    name = config.get("name")
    if name not in NAMES:
        raise ConfigError(f"members mode cannot combine with '{name}'; it supports {list(NAMES)}")
    if name == "stacking" and ("coef" not in config or "intercept" not in config):
        raise ConfigError("members mode needs the fitted stacking head (combiner 'coef' and 'intercept' in the "
                          "manifest); this bundle records none: rebuild it, or serve the fused 'ensemble' variant")
    w = config.get("weights")
    if w is not None and len(w) != n_members:
        raise ConfigError(f"combiner weights: expected {n_members} (one per member); got {len(w)}")


def member_weights(config: dict, n_members: int) -> np.ndarray:
    w = config.get("weights")
    return np.ones(n_members) if w is None else np.asarray(w, dtype=np.float64)
