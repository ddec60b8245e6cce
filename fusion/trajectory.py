"""Members from one training trajectory: stochastic weight averaging and snapshot ensembles.

Two zoo scenarios (`fusion zoo --scenario swa | snapshots`) that spend the same training budget
(`epochs` of SGD with momentum on the same seeded init and the same seeded batch order) two ways:

* **swa** (Izmailov et al. 2018, https://arxiv.org/abs/1803.05407): SGD at a constant learning rate for
  the first `swa_start` fraction of the epochs, then `torch.optim.swa_utils.SWALR` anneals (cosine, over
  `anneal_epochs`) to the constant `swa_lr`, and after every epoch of that phase the weights join an
  equal running average (`torch.optim.swa_utils.AveragedModel`). The average's BatchNorm statistics
  are then recomputed on the train split (`torch.optim.swa_utils.update_bn`: the running statistics the
  SGD iterates kept belong to no averaged weights). The default architecture on image-shaped data is the
  CNN, which has BatchNorm; the MLP (other data) has none, and update_bn is then a no-op. Members:
  `swa` (the average) and `sgd_final` (the last SGD iterate, for comparison).
* **snapshots** (Huang et al. 2017, "Snapshot ensembles", https://arxiv.org/abs/1704.00109): a cyclic
  cosine learning rate with warm restarts, α(t) = lr_min + (lr − lr_min)/2 · (1 + cos(π · (t mod T) / T)),
  t the iteration and T the iterations of one cycle (`CosineAnnealingWarmRestarts`, stepped per
  iteration); at the end of each of the `n_cycles` cycles, where the rate is at its cycle minimum, the
  model is saved as member `snapshot_{i}`.

Both write members like every zoo member (`<name>.safetensors` + `<name>.json`, scenario `swa` /
`snapshots`), so ensembles, merges and bundles take them, plus `trajectory.json` (the schedule: the
learning rate of every iteration, the epochs averaged or the save points), which is no member.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusion.data import Dataset
from fusion.errors import ConfigError
from fusion.progress import progress
from fusion.zoo import (MemberSpec, ZooConfig, build_model, evaluate, init_scaler, member_args, one_thread, save_member,
                        seed_everything)

TRAJECTORY_FILE = "trajectory.json"
SEED_OFFSET = 700  # both scenarios start from the same init and batch order: seed * 1000 + 700


@dataclass(frozen=True)
class TrajectoryConfig:
    """One SGD budget of `epochs`, spent on SWA or on `n_cycles` snapshot cycles (equal training cost)."""

    arch: str | None = None  # None: "cnn" (BatchNorm) on image-shaped data, else "mlp"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05  # SGD rate: SWA's first phase, the peak of each snapshot cycle
    momentum: float = 0.9
    weight_decay: float = 5e-4
    swa_start: float = 0.5  # fraction of the epochs before averaging starts
    swa_lr: float = 0.01
    anneal_epochs: int = 2
    n_cycles: int = 5
    lr_min: float = 0.0  # the snapshot cycles' floor
    seed: int = 0
    mlp_hidden: tuple[int, ...] = (256, 256)
    cnn_channels: tuple[int, int] = (16, 32)
    extra: dict = field(default_factory=dict)  # free-form notes copied into trajectory.json

    def resolved_arch(self, data: Dataset) -> str:
        return self.arch or ("cnn" if data.image_shape is not None else "mlp")


def _start(data: Dataset, cfg: TrajectoryConfig) -> tuple[nn.Module, str, dict, int, torch.Generator]:
    arch = cfg.resolved_arch(data)
    args = member_args(arch, data, ZooConfig(mlp_hidden=cfg.mlp_hidden, cnn_channels=cfg.cnn_channels))
    seed = cfg.seed * 1000 + SEED_OFFSET
    gen = seed_everything(seed)
    model = build_model(arch, **args)
    init_scaler(model, data.scaling)
    return model, arch, args, seed, gen


def _sgd(model: nn.Module, cfg: TrajectoryConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _epoch(model, opt, X, y, gen, batch_size, loss_fn, after_step=None) -> list[float]:
    """One seeded pass over (X, y); returns the learning rate each step used."""
    lrs = []
    perm = torch.randperm(len(X), generator=gen)
    model.train()
    with torch.enable_grad():
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            out = model(X[idx])
            target = y[idx] if isinstance(loss_fn, nn.CrossEntropyLoss) else y[idx].reshape(out.shape)
            loss = loss_fn(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            if after_step is not None:
                after_step()
    return lrs


def bn_batches(data: Dataset, batch_size: int) -> list[torch.Tensor]:
    """The train split in fixed order, `batch_size` rows a batch: what update_bn recomputes BatchNorm statistics on."""
    X = torch.as_tensor(data.X_train)
    return [X[i : i + batch_size] for i in range(0, len(X), batch_size)]


def _tensors(data: Dataset):
    X = torch.as_tensor(data.X_train)
    y = torch.as_tensor(data.y_train)
    loss_fn = nn.CrossEntropyLoss() if data.task == "classification" else nn.MSELoss()
    return X, y, loss_fn


def _check(cfg: TrajectoryConfig) -> None:
    if cfg.epochs < 2:
        raise ConfigError(f"expected at least 2 epochs for a trajectory; got {cfg.epochs}")
    if cfg.n_cycles < 1 or cfg.epochs % cfg.n_cycles:
        raise ConfigError(f"expected the epochs ({cfg.epochs}) to split into n_cycles ({cfg.n_cycles}) equal cycles")
    if not 0.0 <= cfg.swa_start < 1.0:
        raise ConfigError(f"expected swa_start in [0, 1); got {cfg.swa_start}")


def swa_start_epoch(cfg: TrajectoryConfig) -> int:
    """The first epoch (0-based) whose end weights join the average: at least one epoch of plain SGD, at least one averaged."""
    return min(max(1, int(round(cfg.swa_start * cfg.epochs))), cfg.epochs - 1)


@one_thread()
def train_swa(data: Dataset, out_dir: str | Path | None, cfg: TrajectoryConfig = TrajectoryConfig(), *,
              record: bool = False) -> tuple[list[MemberSpec], dict]:
    """The `swa` scenario: members `swa` and `sgd_final` in out_dir (nothing written when out_dir is None).

    Returns (specs, info); info holds the schedule (`lrs`: every step's learning rate, `averaged_epochs`)
    and, with record=True, `checkpoints`: the state dict of the SGD model each time it joined the average
    and `models`: {"swa": the averaged module, "sgd_final": the last iterate}.
    """
    from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

    _check(cfg)
    model, arch, args, seed, gen = _start(data, cfg)
    X, y, loss_fn = _tensors(data)
    opt = _sgd(model, cfg)
    swa_model = AveragedModel(model)  # equal running average of the parameters (buffers: see update_bn below)
    swa_sched = SWALR(opt, swa_lr=cfg.swa_lr, anneal_epochs=cfg.anneal_epochs, anneal_strategy="cos")
    start = swa_start_epoch(cfg)
    lrs, averaged, checkpoints = [], [], []
    for epoch in progress(range(cfg.epochs), desc="swa", unit="epoch", leave=False):
        lrs += _epoch(model, opt, X, y, gen, cfg.batch_size, loss_fn)
        if epoch >= start:
            swa_model.update_parameters(model)
            averaged.append(epoch)
            if record:
                checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            swa_sched.step()
    update_bn(bn_batches(data, cfg.batch_size), swa_model)  # BatchNorm statistics of the averaged weights
    swa = swa_model.module.eval()
    model.eval()
    specs = [
        MemberSpec(name="swa", arch=arch, args=args, seed=seed, metrics=evaluate(swa, data), scenario="swa"),
        MemberSpec(name="sgd_final", arch=arch, args=args, seed=seed, metrics=evaluate(model, data), scenario="swa"),
    ]
    info = {"scenario": "swa", "arch": arch, "config": _cfg_json(cfg), "epochs": cfg.epochs, "swa_start_epoch": start,
            "averaged_epochs": averaged, "n_averaged": int(swa_model.n_averaged), "batch_norm_updated": _has_bn(swa),
            "steps_per_epoch": math.ceil(len(X) / cfg.batch_size), "lrs": lrs}
    _write(out_dir, [(swa, specs[0]), (model, specs[1])], info)
    if record:
        info = {**info, "checkpoints": checkpoints, "models": {"swa": swa, "sgd_final": model}}
    return specs, info


def cosine_restart_lr(t: int, cycle_steps: int, lr: float, lr_min: float) -> float:
    """Huang et al.'s schedule at iteration t (0-based): lr_min + (lr − lr_min)/2 · (1 + cos(π · (t mod T) / T))."""
    return lr_min + (lr - lr_min) / 2 * (1 + math.cos(math.pi * (t % cycle_steps) / cycle_steps))


@one_thread()
def train_snapshots(data: Dataset, out_dir: str | Path | None, cfg: TrajectoryConfig = TrajectoryConfig(), *,
                    record: bool = False) -> tuple[list[MemberSpec], dict]:
    """The `snapshots` scenario: members `snapshot_0` … `snapshot_{n_cycles-1}`, one at the end of each cycle.

    Returns (specs, info); info holds `lrs` (every step's learning rate), `cycle_steps` (T) and
    `save_steps` (the 0-based step after which each snapshot was taken); with record=True, `models`.
    """
    _check(cfg)
    model, arch, args, seed, gen = _start(data, cfg)
    X, y, loss_fn = _tensors(data)
    opt = _sgd(model, cfg)
    steps_per_epoch = math.ceil(len(X) / cfg.batch_size)
    epochs_per_cycle = cfg.epochs // cfg.n_cycles
    cycle_steps = steps_per_epoch * epochs_per_cycle
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cycle_steps, eta_min=cfg.lr_min)
    lrs, save_steps, members = [], [], []
    for c in progress(range(cfg.n_cycles), desc="snapshots", unit="cycle", leave=False):
        for _ in range(epochs_per_cycle):
            lrs += _epoch(model, opt, X, y, gen, cfg.batch_size, loss_fn, after_step=sched.step)
        save_steps.append(len(lrs) - 1)
        snap = copy.deepcopy(model).eval()
        spec = MemberSpec(name=f"snapshot_{c}", arch=arch, args=args, seed=seed, metrics=evaluate(snap, data),
                          scenario="snapshots")
        members.append((snap, spec))
    info = {"scenario": "snapshots", "arch": arch, "config": _cfg_json(cfg), "epochs": cfg.epochs,
            "n_cycles": cfg.n_cycles, "epochs_per_cycle": epochs_per_cycle, "steps_per_epoch": steps_per_epoch,
            "cycle_steps": cycle_steps, "save_steps": save_steps, "lrs": lrs}
    _write(out_dir, members, info)
    if record:
        info = {**info, "models": {s.name: m for m, s in members}}
    return [s for _, s in members], info


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _cfg_json(cfg: TrajectoryConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def _write(out_dir, members, info: dict) -> None:
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for model, spec in members:
        save_member(model, spec, out_dir)
    (out_dir / TRAJECTORY_FILE).write_text(json.dumps(info, indent=2))


# --- SWA (one model) against the snapshot ensemble (K models) at equal training cost ---------------


@torch.no_grad()
def _probs(model: nn.Module, X: np.ndarray) -> np.ndarray:
    return torch.softmax(model.eval()(torch.as_tensor(X)), -1).double().numpy()


def compare_trajectories(swa_dir: str | Path, snapshots_dir: str | Path, data: Dataset, split: str = "test") -> dict:
    """Accuracy and NLL on `split` of `swa`, `sgd_final`, each snapshot and the snapshot ensemble (equal-weight
    soft vote), read from the two scenario directories; refuses budgets that differ."""
    from fusion.compare import negative_log_likelihood
    from fusion.zoo import load_member

    infos = [json.loads((Path(d) / TRAJECTORY_FILE).read_text()) for d in (swa_dir, snapshots_dir)]
    if infos[0]["epochs"] != infos[1]["epochs"]:
        raise ConfigError(f"expected equal training budgets; got {infos[0]['epochs']} SWA epochs and "
                          f"{infos[1]['epochs']} snapshot epochs")
    X, y = (data.X_test, data.y_test) if split == "test" else (data.X_val, data.y_val)
    probs = {}
    for d in (swa_dir, snapshots_dir):
        for p in sorted(Path(d).glob("*.safetensors")):
            model, spec = load_member(p)
            probs[spec.name] = _probs(model, X)
    snaps = sorted(n for n in probs if n.startswith("snapshot_"))
    probs["snapshot_ensemble"] = np.mean([probs[n] for n in snaps], axis=0)
    rows = {n: {"models": len(snaps) if n == "snapshot_ensemble" else 1,
                "accuracy": float((p.argmax(-1) == y).mean()), "nll": negative_log_likelihood(p, y)}
            for n, p in probs.items()}
    from fusion.diversity import diversity

    div = diversity({n: probs[n] for n in snaps}, y).means if len(snaps) >= 2 else {}
    return {"split": split, "epochs": infos[0]["epochs"], "arch": infos[0]["arch"], "rows": rows,
            "snapshot_diversity": div}


def trajectory_table(result: dict) -> str:
    lines = [f"SWA vs snapshot ensemble, {result['epochs']} SGD epochs each ({result['arch']}), {result['split']} split:",
             f"{'model':18s} {'models':>6s} {'accuracy %':>10s} {'NLL':>8s}"]
    for n, r in result["rows"].items():
        lines.append(f"{n:18s} {r['models']:6d} {100 * r['accuracy']:10.2f} {r['nll']:8.4f}")
    div = result.get("snapshot_diversity") or {}
    if div:
        lines.append("snapshot diversity: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in div.items()))
    return "\n".join(lines)
