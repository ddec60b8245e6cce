"""Temperature scaling of members (Guo et al. 2017): the fit against a brute-force search, the export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.ensemble.calibration import TemperatureScaled, fit_temperature, nll_at_temperature
from fusion.errors import ConfigError


def test_nll_at_temperature_by_hand():
    z = np.array([[2.0, 0.0], [0.0, 1.0]])
    y = np.array([0, 0])
    T = 2.0
    p0 = np.exp(1.0) / (np.exp(1.0) + 1.0)  # softmax([1, 0])[0]
    p1 = 1.0 / (1.0 + np.exp(0.5))  # softmax([0, 0.5])[0]
    assert nll_at_temperature(z, y, T) == pytest.approx(-(np.log(p0) + np.log(p1)) / 2, rel=1e-12)


def test_fit_temperature_matches_a_grid_search():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    z = rng.normal(size=(400, 5))
    z[np.arange(400), y] += 2.0
    z *= 3.0  # over-confident logits: the fitted T must be > 1
    t = fit_temperature(z, y)
    grid = np.exp(np.linspace(-3, 3, 6001))
    best = grid[np.argmin([nll_at_temperature(z, y, g) for g in grid])]
    assert t > 1 and t == pytest.approx(best, rel=2e-3)
    assert nll_at_temperature(z, y, t) <= nll_at_temperature(z, y, 1.0)


def test_temperature_scaled_module_divides_logits_and_keeps_argmax():
    lin = torch.nn.Linear(4, 3)
    scaled = TemperatureScaled(lin, 2.5)
    x = torch.randn(7, 4)
    assert torch.allclose(scaled(x), lin(x) / 2.5)
    assert torch.equal(scaled(x).argmax(-1), lin(x).argmax(-1))
    with pytest.raises(ConfigError):
        TemperatureScaled(lin, 0.0)


def test_calibration_needs_an_averaging_combiner(tiny_recipe, digits):
    from fusion.build import build_ensemble, ensure_zoo
    from fusion.recipe import override

    members = ensure_zoo(tiny_recipe, digits)
    r = override(tiny_recipe, "ensemble", combiner="hard_vote", calibration="temperature")
    with pytest.raises(ConfigError, match="temperature"):
        build_ensemble(r, members, digits)
    fused = build_ensemble(override(tiny_recipe, "ensemble", calibration="temperature"), members, digits)
    assert all(isinstance(m, TemperatureScaled) for m in fused.members)
    x = torch.from_numpy(digits.X_val)
    with torch.no_grad():  # per member: validation NLL after scaling ≤ before
        for m, s in zip(members, fused.members):
            z = m.model(x).double().numpy()
            assert nll_at_temperature(z, digits.y_val, float(s.temperature)) <= nll_at_temperature(z, digits.y_val, 1.0) + 1e-9
