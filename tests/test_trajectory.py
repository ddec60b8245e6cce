"""The `swa` and `snapshots` zoo scenarios (fusion/trajectory.py): SWA against torch's AveragedModel run
independently on the recorded trajectory (and a plain mean of the checkpoints), the snapshot schedule
against Huang et al.'s formula, members saved like any zoo member."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fusion.trajectory import TRAJECTORY_FILE, TrajectoryConfig, bn_batches, compare_trajectories, train_snapshots, train_swa

CFG = TrajectoryConfig(epochs=6, n_cycles=3, cnn_channels=(4, 8), swa_start=0.5, anneal_epochs=1, seed=3)


@pytest.fixture(scope="module")
def swa_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "swa"
    specs, info = train_swa(digits, out, CFG, record=True)
    return out, specs, info


@pytest.fixture(scope="module")
def snapshot_run(digits, swa_run):
    out = swa_run[0].parent / "snapshots"
    specs, info = train_snapshots(digits, out, CFG, record=True)
    return out, specs, info


def _close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert set(a) == set(b), f"expected the same keys; got {sorted(set(a) ^ set(b))} on one side only"
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{k}: expected {a[k].dtype}; got {b[k].dtype}"
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def test_swa_member_equals_averaged_model_on_the_same_trajectory(swa_run, digits):
    from torch.optim.swa_utils import AveragedModel, update_bn

    from fusion.zoo import build_model, load_member

    out, specs, info = swa_run
    swa, spec = load_member(out / "swa.safetensors")
    assert spec.scenario == "swa" and spec.arch == "cnn" and info["batch_norm_updated"] is True
    ckpts = info["checkpoints"]
    start = info["swa_start_epoch"]
    assert info["averaged_epochs"] == list(range(start, CFG.epochs)) and info["n_averaged"] == len(ckpts) == CFG.epochs - start

    def model_at(state):
        m = build_model(spec.arch, **spec.args)
        m.load_state_dict(state)
        return m

    ref = AveragedModel(model_at(ckpts[0]))  # built independently of the run, from the recorded checkpoints
    for state in ckpts:
        ref.update_parameters(model_at(state))
    update_bn(bn_batches(digits, CFG.batch_size), ref)
    _close(swa.state_dict(), ref.module.state_dict())

    # and, without torch's helper: every parameter is the plain mean of the checkpoints
    params = {n for n, _ in swa.named_parameters()}
    for name in params:
        mean = np.mean([s[name].double().numpy() for s in ckpts], axis=0)
        np.testing.assert_allclose(swa.state_dict()[name].double().numpy(), mean, atol=1e-6, err_msg=name)
    # update_bn recomputed the BatchNorm statistics: not the SGD iterate's running statistics
    sgd, _ = load_member(out / "sgd_final.safetensors")
    assert not torch.allclose(swa.bn1.running_mean, sgd.bn1.running_mean)
    assert int(swa.bn1.num_batches_tracked) == len(bn_batches(digits, CFG.batch_size))


def test_swa_schedule_constant_then_annealed_to_swa_lr(swa_run):
    _, _, info = swa_run
    spe, start, lrs = info["steps_per_epoch"], info["swa_start_epoch"], info["lrs"]
    assert len(lrs) == spe * CFG.epochs
    assert all(lr == pytest.approx(CFG.lr) for lr in lrs[: spe * (start + 1)])  # SWALR steps after each averaged epoch
    assert all(lr == pytest.approx(CFG.swa_lr) for lr in lrs[-spe:])  # anneal_epochs=1: constant swa_lr after


def test_snapshots_are_saved_at_the_cycle_minima(snapshot_run):
    out, specs, info = snapshot_run
    k, T, lrs = CFG.n_cycles, info["cycle_steps"], info["lrs"]
    assert [s.name for s in specs] == [f"snapshot_{i}" for i in range(k)]
    assert T == info["steps_per_epoch"] * CFG.epochs // k and len(lrs) == k * T
    # Huang et al. 2017, eq. (2) with a floor: α(t) = lr_min + (α0 − lr_min)/2 · (cos(π · mod(t, T) / T) + 1)
    huang = [CFG.lr_min + (CFG.lr - CFG.lr_min) / 2 * (math.cos(math.pi * (t % T) / T) + 1) for t in range(k * T)]
    np.testing.assert_allclose(lrs, huang, rtol=1e-9, atol=1e-12)
    assert info["save_steps"] == [(c + 1) * T - 1 for c in range(k)]
    for c, step in enumerate(info["save_steps"]):
        cycle = lrs[c * T : (c + 1) * T]
        assert lrs[step] == min(cycle) < CFG.lr * 0.01  # saved at the cycle's lowest rate
        if step + 1 < len(lrs):
            assert lrs[step + 1] == pytest.approx(CFG.lr)  # then the restart
    assert json.loads((out / TRAJECTORY_FILE).read_text())["save_steps"] == info["save_steps"]


def test_snapshot_members_differ_and_load_like_zoo_members(snapshot_run):
    from fusion.zoo import load_zoo

    out, specs, info = snapshot_run
    zoo = load_zoo(out)
    assert [s.name for _, s in zoo] == [s.name for s in specs] and {s.scenario for _, s in zoo} == {"snapshots"}
    states = [m.state_dict() for m, _ in zoo]
    for (m, s) in zoo:  # the files hold the models the run produced
        _close(m.state_dict(), info["models"][s.name].state_dict(), atol=0)
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            diff = max(float((states[i][n] - states[j][n]).abs().max()) for n in states[i] if states[i][n].is_floating_point())
            assert diff > 1e-3, f"snapshots {i} and {j} should differ; max abs difference {diff}"


def test_swa_against_the_snapshot_ensemble_at_equal_cost(swa_run, snapshot_run, digits, tmp_path):
    from dataclasses import replace

    from fusion.errors import ConfigError

    res = compare_trajectories(swa_run[0], snapshot_run[0], digits)
    assert res["epochs"] == CFG.epochs
    rows = res["rows"]
    assert set(rows) == {"swa", "sgd_final", "snapshot_0", "snapshot_1", "snapshot_2", "snapshot_ensemble"}
    assert rows["snapshot_ensemble"]["models"] == CFG.n_cycles and rows["swa"]["models"] == 1
    assert 0 <= res["snapshot_diversity"]["mean_disagreement"] <= 1
    # the ensemble row is the soft vote of the snapshot files, recomputed here
    from fusion.zoo import load_member

    p = np.mean([torch.softmax(load_member(snapshot_run[0] / f"snapshot_{i}.safetensors")[0](torch.as_tensor(digits.X_test)), -1)
                 .detach().double().numpy() for i in range(CFG.n_cycles)], axis=0)
    assert rows["snapshot_ensemble"]["accuracy"] == pytest.approx(float((p.argmax(-1) == digits.y_test).mean()))
    # unequal budgets are refused
    train_snapshots(digits, tmp_path / "snapshots", replace(CFG, epochs=3))
    with pytest.raises(ConfigError, match="equal training budgets"):
        compare_trajectories(swa_run[0], tmp_path / "snapshots", digits)


def test_config_errors_say_what_was_expected(digits):
    from dataclasses import replace

    from fusion.errors import ConfigError

    with pytest.raises(ConfigError, match=r"epochs \(7\) to split into n_cycles \(3\)"):
        train_snapshots(digits, None, replace(CFG, epochs=7))


def test_cli_zoo_scenarios_print_the_equal_cost_comparison(tmp_path, capsys):
    from fusion.cli import main

    args = ["zoo", "--out", str(tmp_path), "--epochs", "2", "--n-cycles", "2"]
    assert main([*args, "--scenario", "swa"]) == 0
    assert main([*args, "--scenario", "snapshots"]) == 0
    out = capsys.readouterr().out
    assert "snapshot_1" in out and "SWA vs snapshot ensemble, 2 SGD epochs each (cnn)" in out
    assert "snapshot_ensemble" in out.split("SWA vs snapshot ensemble")[1]
    assert {p.name for p in (tmp_path / "swa").iterdir()} == {
        "swa.safetensors", "swa.json", "sgd_final.safetensors", "sgd_final.json", TRAJECTORY_FILE}
