"""The default zoo's training: CNNs on the train split plus pixel-shifted copies, on one torch thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusion.errors import ConfigError
from fusion.zoo import TrainConfig, ZooConfig, one_thread, shifted_train_set, train_zoo


def _shifts(img: np.ndarray) -> list[np.ndarray]:
    """The 9 shifts of an (H, W) image by dy, dx in {-1, 0, 1}, edges replicated (numpy's own padding)."""
    p = np.pad(img, 1, mode="edge")
    h, w = img.shape
    return [p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def test_shifted_copies_are_the_train_split_moved_by_at_most_a_pixel(digits):
    X, y = shifted_train_set(digits, 2, seed=7)
    n = len(digits.X_train)
    assert X.shape == (3 * n, digits.X_train.shape[1]) and y.shape == (3 * n,)
    assert np.array_equal(X[:n], digits.X_train) and np.array_equal(y, np.tile(digits.y_train, 3))
    moved = 0
    for copy in (1, 2):
        for i in range(0, n, 7):  # every 7th row of each copy
            img = digits.X_train[i].reshape(8, 8)
            got = X[copy * n + i].reshape(8, 8)
            assert any(np.array_equal(got, s) for s in _shifts(img)), (copy, i)
            moved += not np.array_equal(got, img)
    assert moved > 0.7 * 2 * len(range(0, n, 7))  # 8 of the 9 shifts move the image
    again, _ = shifted_train_set(digits, 2, seed=7)
    other, _ = shifted_train_set(digits, 2, seed=8)
    assert np.array_equal(X, again) and not np.array_equal(X, other)  # drawn from the member's seed


def test_no_copies_or_no_images_leave_the_plain_split(digits):
    import dataclasses

    assert shifted_train_set(digits, 0, seed=0) == (None, None)
    flat = dataclasses.replace(digits, image_shape=None)
    assert shifted_train_set(flat, 1, seed=0) == (None, None)
    with pytest.raises(ConfigError, match="expected cnn_shift_copies >= 0; got -1"):
        shifted_train_set(digits, -1, seed=0)


def test_zoo_members_are_the_same_bits_on_any_thread_count(digits, tmp_path):
    """train_zoo trains on one thread whatever the caller set, and gives the caller's setting back."""
    cfg = ZooConfig(n_mlp=1, n_cnn=1, mlp_hidden=(16,), cnn_channels=(4, 8), train=TrainConfig(epochs=2))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            train_zoo(digits, tmp_path / str(threads), cfg)
            assert torch.get_num_threads() == threads
            outs.append({n: load_file(str(tmp_path / str(threads) / f"{n}.safetensors")) for n in ("mlp_0", "cnn_0")})
    finally:
        torch.set_num_threads(before)
    for name in outs[0]:
        assert all(torch.equal(outs[0][name][k], outs[1][name][k]) for k in outs[0][name]), name


def test_members_train_on_one_thread_and_bad_copy_counts_are_refused_up_front(digits, tmp_path, monkeypatch):
    import fusion.zoo as zoo

    seen = []
    real = zoo.train
    monkeypatch.setattr(zoo, "train", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    zoo.train_zoo(digits, tmp_path, ZooConfig(n_mlp=1, n_cnn=1, mlp_hidden=(8,), cnn_channels=(2, 2), train=TrainConfig(epochs=1)))
    assert seen == [1, 1]
    with pytest.raises(ConfigError, match="expected cnn_shift_copies >= 0; got -2"):
        ZooConfig(cnn_shift_copies=-2)


def test_one_thread_restores_the_setting_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_every_zoo_scenario_trains_on_one_thread_and_gives_the_setting_back(digits, tmp_path, monkeypatch):
    """shared_base, swa and snapshots train under one_thread too: each training step sees 1 thread, the caller's
    setting comes back after."""
    import fusion.trajectory as trajectory
    import fusion.zoo as zoo

    seen = []
    real_train, real_epoch = zoo.train, trajectory._epoch
    monkeypatch.setattr(zoo, "train", lambda *a, **k: seen.append(("shared_base", torch.get_num_threads())) or real_train(*a, **k))
    monkeypatch.setattr(trajectory, "_epoch", lambda *a, **k: seen.append(("trajectory", torch.get_num_threads())) or real_epoch(*a, **k))
    tiny = trajectory.TrajectoryConfig(epochs=2, n_cycles=1, cnn_channels=(2, 2), anneal_epochs=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        zoo.train_shared_base_zoo(digits, tmp_path / "sb", ZooConfig(n_mlp=1, mlp_hidden=(8,), train=TrainConfig(epochs=1)))
        trajectory.train_swa(digits, None, tiny)
        trajectory.train_snapshots(digits, None, tiny)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [s for s, _ in seen] == ["shared_base"] * 2 + ["trajectory"] * 4  # base + 1 fine-tune; 2 epochs each
    assert {t for _, t in seen} == {1}
