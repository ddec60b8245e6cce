"""The bundle's combiner in numpy, for `members` mode (one session per member, combined here).

Member ONNX files output probabilities p = softmax(z); every combiner below is written on p and
equals its torch counterpart in fusion/ensemble (log p differs from z by a per-row constant, which
softmax cancels).
"""

from __future__ import annotations

import numpy as np

from fusion.errors import ConfigError

EPS = 1e-12


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def calibrate(probs: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Temperature scaling on probabilities: softmax(log p_m / T_m) per member. probs (M, B, C), temperatures (M,)."""
    return _softmax(np.log(np.maximum(probs, EPS)) / temperatures.reshape(-1, 1, 1))


def combine(config: dict, probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """probs: (M, B, C) member probabilities -> (B, C); weights: (M,) over the members present."""
    name = config["name"]
    m = probs.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).reshape(-1, 1, 1)
    if name == "soft_vote":
        return (probs * w).sum(0)
    if name == "hard_vote":
        c = probs.shape[-1]
        return (np.eye(c)[probs.argmax(-1)] * w).sum(0)  # one-hot votes (M, B, C), ties -> lowest index later
    if name in ("logit_mean", "geometric_mean"):
        return _softmax((np.log(np.maximum(probs, EPS)) * w).sum(0))
    if name == "stacking":
        coef, intercept = np.asarray(config["coef"]), np.asarray(config["intercept"])
        feats = probs.transpose(1, 0, 2)  # (B, M, C)
        feats = (feats[..., 1:] if probs.shape[-1] == 2 else feats).reshape(probs.shape[1], -1)
        scores = feats @ coef.T + intercept
        if scores.shape[-1] == 1:
            scores = np.concatenate([np.zeros_like(scores), scores], -1)
        return _softmax(scores)
    if name == "mean":
        return probs.mean(0)
    if name == "weighted_mean":
        return (probs * w).sum(0)
    if name == "median":
        return np.median(probs, axis=0)
    raise ConfigError(f"members mode cannot combine with '{name}'")


def member_weights(config: dict, n_members: int) -> np.ndarray:
    w = config.get("weights")
    return np.ones(n_members) if w is None else np.asarray(w, dtype=np.float64)
