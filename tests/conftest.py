"""Shared fixtures: the real digits data, a tiny seeded zoo and a bundle built from it (once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def pytest_configure(config):
    # tests check correctness, not speed: one torch thread trains the tiny zoo faster than two on
    # shared cores (and leaves the other core to the servers the tests start)
    import torch

    torch.set_num_threads(1)

TINY_ZOO = dict(n_mlp=3, n_cnn=1, mlp_hidden=(32,), cnn_channels=(4, 8), seed=0)
TINY_EPOCHS = 8
TINY_DISTILL = dict(hidden=(32,), epochs=3)


@pytest.fixture(scope="session")
def digits():
    from fusion.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, digits) -> Path:
    """3 small MLPs and 1 small CNN trained for a few epochs on digits (seeded)."""
    from fusion.zoo import TrainConfig, ZooConfig, train_zoo

    out = tmp_path_factory.mktemp("zoo") / "independent"
    train_zoo(digits, out, ZooConfig(**TINY_ZOO, train=TrainConfig(epochs=TINY_EPOCHS)))
    return out


@pytest.fixture(scope="session")
def tiny_recipe(tiny_zoo, tmp_path_factory):
    """The default recipe pointed at the tiny zoo, writing to a temp bundle directory."""
    from fusion.recipe import Recipe, override

    r = override(Recipe(), "zoo", dir=str(tiny_zoo))
    # equal weights (not the default "auto"): the serving tests' oracle is the plain soft vote of the members;
    # the chosen weightings are tested in tests/test_ensemble_selection.py
    r = override(r, "ensemble", weights="equal")
    r = override(r, "distill", **TINY_DISTILL)  # the default-on `distilled` variant, kept small
    return override(r, "build", out=str(tmp_path_factory.mktemp("bundle") / "bundle"), compare_rounds=20)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_recipe) -> Path:
    """A bundle (ensemble with soft voting + every member) built from the tiny zoo."""
    from fusion.build import build_bundle

    build_bundle(tiny_recipe)
    return Path(tiny_recipe.build.out)
