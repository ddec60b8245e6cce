"""Classification combiners over member logits z: (n_members, n_samples, n_classes) -> probabilities."""

from __future__ import annotations

import torch

from fusion.ensemble.base import Combiner, check_weights, register_combiner


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


@register_combiner("soft_vote", "classification")
class SoftVote(Combiner):
    """Weighted mean of member probabilities (`VotingClassifier(voting="soft")`)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        return (torch.softmax(z, -1) * self.w).sum(0)  # (N, C)


@register_combiner("logit_mean", "classification")
class LogitMean(Combiner):
    """softmax of the weighted mean of logits (FusionBench's "simple ensemble" of raw outputs)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        return torch.softmax((z * self.w).sum(0), -1)


@register_combiner("geometric_mean", "classification")
class GeometricMean(Combiner):
    """Normalised weighted geometric mean of probabilities = softmax(weighted mean of log-probabilities)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        return torch.softmax((torch.log_softmax(z, -1) * self.w).sum(0), -1)
