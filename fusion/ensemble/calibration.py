"""Temperature scaling of members before combining (Guo, Pleiss, Sun & Weinberger 2017,
"On Calibration of Modern Neural Networks", https://arxiv.org/abs/1706.04599).

One scalar T > 0 per member, fitted on held-out rows (the validation split) by minimising the NLL of
softmax(z / T); argmax is unchanged, only the confidence moves. The fitted member is the original
module followed by a division, so it exports inside the fused ensemble graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusion.errors import ConfigError

LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]


def nll_at_temperature(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean −log softmax(z / T)[y]. logits: (N, C) float; y: (N,) class indices."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))  # (N, C)
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T minimising validation NLL, searched over log T (bounded Brent, `minimize_scalar`).

    logits: (N, C) held-out member logits; y: (N,) class indices.
    """
    from scipy.optimize import minimize_scalar

    logits, y = np.asarray(logits), np.asarray(y)
    if logits.ndim != 2 or len(logits) != len(y) or len(y) == 0:
        raise ConfigError(f"expected logits (N, C) and labels (N,) with N > 0; got {logits.shape} and {y.shape}")
    res = minimize_scalar(
        lambda log_t: nll_at_temperature(logits, y, float(np.exp(log_t))),
        bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


class TemperatureScaled(nn.Module):
    """A member followed by division by its fitted temperature. x: (B, F) -> logits / T (B, C)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"expected a temperature > 0; got {temperature}")
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature
