"""Regression combiners over member predictions z: (n_members, n_samples, n_targets) -> (n_samples, n_targets)."""

from __future__ import annotations

import torch

from fusion.ensemble.base import Combiner, register_combiner


@register_combiner("mean", "regression")
class Mean(Combiner):
    """Plain mean of member predictions (weights, if given, are ignored: use `weighted_mean`)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        return z.mean(0)


@register_combiner("weighted_mean", "regression")
class WeightedMean(Combiner):
    """Weighted mean of member predictions, `np.average(z, axis=0, weights=w)`."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        return (z * self.w).sum(0)


@register_combiner("median", "regression")
class Median(Combiner):
    """Median over members with numpy's convention: the mean of the two middle values when M is even."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        m = z.shape[0]
        s = torch.sort(z, dim=0).values  # (M, N, T); sorts over members
        return 0.5 * (s[(m - 1) // 2] + s[m // 2])
