"""Combiner base class, weight checks and the registry of combiners by name."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from fusion.errors import ConfigError, UnknownNameError

COMBINERS: dict[str, type["Combiner"]] = {}


def register_combiner(name: str, task: str):
    """Register a combiner class under `name` for `task` ("classification" | "regression")."""

    def deco(cls):
        cls.name, cls.task = name, task
        COMBINERS[name] = cls
        return cls

    return deco


def check_weights(weights: Sequence[float] | None, n_members: int) -> np.ndarray:
    """Validated member weights as float64 `(n_members,)`; `None` means equal weights."""
    if n_members < 1:
        raise ConfigError(f"expected at least one member; got {n_members}")
    if weights is None:
        return np.ones(n_members)
    try:
        w = np.asarray(list(weights), dtype=np.float64)
    except (TypeError, ValueError):
        got = [w.tolist() if hasattr(w, "tolist") else w for w in weights]  # plain values, not np.str_('a') (issue 21)
        raise ConfigError(f"expected {n_members} numeric weights; got {got!r}") from None
    if w.ndim != 1 or len(w) != n_members:
        raise ConfigError(f"expected {n_members} weights (one per member); got {len(w)}")
    if not np.isfinite(w).all():
        raise ConfigError(f"expected finite weights; got {w.tolist()}")
    if (w < 0).any():
        raise ConfigError(f"expected non-negative weights; got {w.tolist()}")
    if w.sum() == 0:
        raise ConfigError(f"expected at least one positive weight; got {w.tolist()}")
    return w


class Combiner(nn.Module):
    """Base: stores member weights (normalised to sum 1) as a buffer; `fit` is a no-op unless learned.

    forward: z (n_members, n_samples, n_outputs) -> (n_samples, n_outputs)
    """

    name: str = ""
    task: str = "classification"
    learned: bool = False

    def __init__(self, n_members: int, weights: Sequence[float] | None = None):
        super().__init__()
        self.n_members = n_members
        w = check_weights(weights, n_members)  # first: its message says what was expected and got
        self.weights = None if weights is None else list(map(float, weights))
        self.register_buffer("w", torch.tensor(w / w.sum(), dtype=torch.float32).reshape(-1, 1, 1))

    def fit(self, member_outputs: torch.Tensor, y: torch.Tensor) -> "Combiner":
        return self

    def check_input(self, z: torch.Tensor) -> None:
        if z.ndim != 3 or z.shape[0] != self.n_members:
            raise ConfigError(
                f"expected member outputs of shape (n_members={self.n_members}, n_samples, n_outputs); "
                f"got {tuple(z.shape)}"
            )

    def config(self) -> dict:
        """What the manifest records about this combiner."""
        return {"name": self.name, "weights": self.weights}


def make_combiner(name: str, n_members: int, weights: Sequence[float] | None = None, **params) -> Combiner:
    try:
        cls = COMBINERS[name]
    except KeyError:
        raise UnknownNameError(f"unknown combiner '{name}'; expected one of {sorted(COMBINERS)}") from None
    return cls(n_members, weights, **params)
