"""Classification combiners over member logits z: (n_members, n_samples, n_classes) -> probabilities."""

from __future__ import annotations

import numbers

import torch

from fusion.ensemble.base import Combiner, check_weights, register_combiner
from fusion.errors import ConfigError

TINY = 1e-30  # soft vote's probabilities are floored here before the log of an output temperature


@register_combiner("hard_vote", "classification")
class HardVote(Combiner):
    """Weighted majority of member argmaxes; returns vote fractions (not calibrated probabilities).

    Ties go to the lowest class index under argmax, exactly as scikit-learn's
    `VotingClassifier(voting="hard")` (`np.argmax(np.bincount(..., weights=w))`).
    """

    def __init__(self, n_members: int, weights=None):
        super().__init__(n_members, weights)
        # unnormalised weights (M, 1, 1): sums of integer or binary-fraction weights are exact, so a
        # tie stays a tie (pre-normalised weights like w/4.5 round and break ties arbitrarily)
        raw = torch.tensor(check_weights(weights, n_members), dtype=torch.float32).reshape(-1, 1, 1)
        self.register_buffer("w_raw", raw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        # one-hot of each member's argmax: (M, N, C)
        votes = torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
        return (votes * self.w_raw).sum(0) / self.w_raw.sum()  # (N, C), rows sum to 1


class Averaging(Combiner):
    """An averaging combiner with an optional output temperature T (Guo et al. 2017 applied to the
    ensemble's output, fitted on validation by fusion.ensemble.selection): the combined probabilities
    p become softmax(log p / T) = p^(1/T) renormalised. Averaging probabilities is typically
    under-confident, so one scalar fitted after the weights recovers the NLL without moving the argmax.
    T = 1 (the default) leaves the graph exactly as without it."""

    def __init__(self, n_members: int, weights=None, temperature: float = 1.0):
        super().__init__(n_members, weights)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < float("inf"):
            raise ConfigError(f"expected an output temperature > 0 (finite); got {temperature!r}")
        self.temperature = float(temperature)

    def config(self) -> dict:
        out = super().config()
        if self.temperature != 1.0:
            out["temperature"] = self.temperature
        return out


@register_combiner("soft_vote", "classification")
class SoftVote(Averaging):
    """Weighted mean of member probabilities (`VotingClassifier(voting="soft")`)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        p = (torch.softmax(z, -1) * self.w).sum(0)  # (N, C)
        if self.temperature == 1.0:
            return p
        return torch.softmax(torch.log(p.clamp_min(TINY)) / self.temperature, -1)


@register_combiner("logit_mean", "classification")
class LogitMean(Averaging):
    """softmax of the weighted mean of logits (FusionBench's "simple ensemble" of raw outputs)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        s = (z * self.w).sum(0)
        return torch.softmax(s if self.temperature == 1.0 else s / self.temperature, -1)


@register_combiner("geometric_mean", "classification")
class GeometricMean(Averaging):
    """Normalised weighted geometric mean of probabilities = softmax(weighted mean of log-probabilities)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        s = (torch.log_softmax(z, -1) * self.w).sum(0)
        return torch.softmax(s if self.temperature == 1.0 else s / self.temperature, -1)
