"""Reference architectures by name (a registry) and seeded training of a model zoo on a data set.

Every architecture takes **raw** features `(batch, n_features)` and returns logits
`(batch, n_outputs)`; the feature standardisation is a buffer-only first layer, so exported graphs
take raw features too. Members are saved as safetensors (torch state_dict keys) plus a JSON spec.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from fusion.data import Dataset, Scaling
from fusion.errors import ConfigError, UnknownNameError
from fusion.progress import progress

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_arch(name: str):
    """Register an architecture constructor under `name` (timm-style registry)."""

    def deco(fn):
        ARCHITECTURES[name] = fn
        return fn

    return deco


def build_model(arch: str, **args) -> nn.Module:
    try:
        ctor = ARCHITECTURES[arch]
    except KeyError:
        raise UnknownNameError(
            f"unknown architecture '{arch}'; expected one of {sorted(ARCHITECTURES)}"
        ) from None
    return ctor(**args)


class Standardize(nn.Module):
    """`(x - mean) / std` with buffers, so the graph takes raw features. x: (B, F) -> (B, F)."""

    def __init__(self, n_features: int, mean=None, std=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(n_features) if std is None else torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """Standardize -> [Linear -> ReLU] * len(hidden) -> Linear. Keys: `scaler.*`, `layers.{i}.*`."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (256, 256), n_outputs: int = 10):
        super().__init__()
        self.scaler = Standardize(in_features)
        dims = [in_features, *hidden, n_outputs]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, n_outputs)
        h = self.scaler(x)
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))
        return self.layers[-1](h)


class CNN(nn.Module):
    """Standardize -> reshape to (C, H, W) -> [Conv3x3 -> BN -> ReLU] x2 -> MaxPool2 -> Linear -> ReLU -> Linear."""

    def __init__(
        self, in_features: int = 64, image_shape: tuple[int, int, int] = (1, 8, 8),
        channels: tuple[int, int] = (16, 32), hidden: int = 64, n_outputs: int = 10,
    ):
        super().__init__()
        c, h, w = image_shape
        if c * h * w != in_features:
            raise ConfigError(f"image_shape {tuple(image_shape)} holds {c*h*w} values; expected {in_features}")
        self.image_shape = tuple(image_shape)
        self.scaler = Standardize(in_features)
        self.conv1 = nn.Conv2d(c, channels[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels[1])
        self.fc1 = nn.Linear(channels[1] * (h // 2) * (w // 2), hidden)
        self.fc2 = nn.Linear(hidden, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, n_outputs)
        h = self.scaler(x).reshape(-1, *self.image_shape)  # (B, C, H, W)
        h = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = torch.flatten(torch.max_pool2d(h, 2), 1)  # (B, C2 * H/2 * W/2)
        return self.fc2(torch.relu(self.fc1(h)))


@register_arch("mlp")
def mlp(in_features: int = 64, hidden=(256, 256), n_outputs: int = 10) -> nn.Module:
    return MLP(in_features, tuple(hidden), n_outputs)


@register_arch("cnn")
def cnn(in_features: int = 64, image_shape=(1, 8, 8), channels=(16, 32), hidden: int = 64, n_outputs: int = 10) -> nn.Module:
    return CNN(in_features, tuple(image_shape), tuple(channels), hidden, n_outputs)


@dataclass(frozen=True)
class MemberSpec:
    """What is needed to rebuild a member: architecture, its arguments, the seed, its metrics."""

    name: str
    arch: str
    args: dict
    seed: int
    metrics: dict = field(default_factory=dict)
    scenario: str = "independent"
    parent: str | None = None  # the base a fine-tuned member started from

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MemberSpec":
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"member spec has unknown keys {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def init_scaler(model: nn.Module, scaling: Scaling) -> None:
    model.scaler.mean.copy_(torch.tensor(scaling.mean))
    model.scaler.std.copy_(torch.tensor(scaling.std))


def train(
    model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int, *,
    X: np.ndarray | None = None, y: np.ndarray | None = None, desc: str = "train",
) -> nn.Module:
    """Adam on cross-entropy (classification) or MSE (regression), seeded shuffles. Returns the model in eval mode."""
    gen = seed_everything(seed)
    X_t = torch.as_tensor(data.X_train if X is None else X)
    y_t = torch.as_tensor(data.y_train if y is None else y)
    loss_fn = nn.CrossEntropyLoss() if data.task == "classification" else nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    with torch.enable_grad():
        for _ in progress(range(cfg.epochs), desc=desc, unit="epoch", leave=False):
            perm = torch.randperm(len(X_t), generator=gen)
            for i in range(0, len(X_t), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                out = model(X_t[idx])
                target = y_t[idx] if data.task == "classification" else y_t[idx].reshape(out.shape)
                loss = loss_fn(out, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    pred = model.eval()(torch.as_tensor(X)).argmax(-1).numpy()
    return float((pred == y).mean())


def evaluate(model: nn.Module, data: Dataset) -> dict:
    return {
        "val_accuracy": accuracy(model, data.X_val, data.y_val),
        "test_accuracy": accuracy(model, data.X_test, data.y_test),
    }


@dataclass(frozen=True)
class ZooConfig:
    """The default zoo: 5 MLPs and 3 small CNNs from different seeds (the `independent` scenario).

    cnn_shift_copies: each CNN trains on the train split plus this many copies of it, every image shifted
    by up to one pixel each way (edges replicated; fusion.distill.shift_images), drawn once per member from
    its own seed: translation is the invariance a convolution is built for, and each member sees different
    copies, which makes the members differ where the ensemble can use it (on the default zoo's validation
    split: the chosen ensemble's out-of-fold NLL 0.0317 with plain CNNs, 0.0168 with one copy, 0.0230 with
    three; only with one copy does the gate find the ensemble better than its best member beyond noise)."""

    n_mlp: int = 5
    n_cnn: int = 3
    mlp_hidden: tuple[int, ...] = (256, 256)
    cnn_channels: tuple[int, int] = (16, 32)
    seed: int = 0
    train: TrainConfig = TrainConfig()
    cnn_shift_copies: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.cnn_shift_copies, int) or self.cnn_shift_copies < 0:
            raise ConfigError(f"expected cnn_shift_copies >= 0; got {self.cnn_shift_copies!r}")


def member_args(arch: str, data: Dataset, cfg: ZooConfig) -> dict:
    base = {"in_features": data.n_features, "n_outputs": max(data.n_classes, 1)}
    if arch == "mlp":
        return {**base, "hidden": list(cfg.mlp_hidden)}
    if data.image_shape is None:
        raise ConfigError(f"architecture 'cnn' needs image-shaped rows; data set '{data.name}' has none")
    return {**base, "image_shape": list(data.image_shape), "channels": list(cfg.cnn_channels)}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block (restored after, also on an error); a decorator too. Every
    zoo scenario trains under it, so its members are the same bits on any core count (with 2 threads the CNNs'
    convolutions accumulate in another order and the members differ)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def train_zoo(data: Dataset, out_dir: str | Path, cfg: ZooConfig = ZooConfig()) -> list[MemberSpec]:
    """Train the default members and save each as `<name>.safetensors` + `<name>.json` in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = [("mlp", i) for i in range(cfg.n_mlp)]
    if data.image_shape is not None:
        plan += [("cnn", i) for i in range(cfg.n_cnn)]
    return [_train_member(data, cfg, arch, i, out_dir) for arch, i in progress(plan, desc="zoo", unit="member")]


def _train_member(data: Dataset, cfg: ZooConfig, arch: str, i: int, out_dir: Path) -> MemberSpec:
    """Member `{arch}_{i}`: seeded, trained (CNNs on the shifted copies too), saved; its spec."""
    seed = cfg.seed * 1000 + (0 if arch == "mlp" else 100) + i
    args = member_args(arch, data, cfg)
    seed_everything(seed)
    model = build_model(arch, **args)
    init_scaler(model, data.scaling)
    X, y = shifted_train_set(data, cfg.cnn_shift_copies, seed) if arch == "cnn" else (None, None)
    train(model, data, cfg.train, seed, X=X, y=y, desc=f"{arch}_{i}")
    spec = MemberSpec(name=f"{arch}_{i}", arch=arch, args=args, seed=seed, metrics=evaluate(model, data))
    save_member(model, spec, out_dir)
    return spec


SHIFT_SEED_OFFSET = 12345  # the shifted copies' generator: the member's seed + this, apart from its shuffles'


def shifted_train_set(data: Dataset, copies: int, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The train split followed by `copies` copies of it, each image shifted by up to one pixel each way
    (X: (N·(1+copies), F), y: (N·(1+copies),)); (None, None), the plain split, for 0 copies or non-image rows."""
    if copies < 0:
        raise ConfigError(f"expected cnn_shift_copies >= 0; got {copies}")
    if copies == 0 or data.image_shape is None:
        return None, None
    from fusion.distill import shift_images

    gen = torch.Generator().manual_seed(seed + SHIFT_SEED_OFFSET)
    X = torch.as_tensor(data.X_train)
    xs = [X] + [shift_images(X, data.image_shape, 1, gen) for _ in range(copies)]
    return torch.cat(xs).numpy(), np.tile(np.asarray(data.y_train), copies + 1)


def save_member(model: nn.Module, spec: MemberSpec, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    path = out_dir / f"{spec.name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"arch": spec.arch})
    (out_dir / f"{spec.name}.json").write_text(spec.to_json())
    return path


def load_member(path: str | Path) -> tuple[nn.Module, MemberSpec]:
    """Load `<name>.safetensors` with its `<name>.json` spec next to it."""
    from safetensors.torch import load_file

    path = Path(path)
    spec = MemberSpec.from_json(path.with_suffix(".json").read_text())
    model = build_model(spec.arch, **spec.args)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), spec


def load_zoo(zoo_dir: str | Path) -> list[tuple[nn.Module, MemberSpec]]:
    zoo_dir = Path(zoo_dir)
    paths = sorted(zoo_dir.glob("*.safetensors"))
    members = [load_member(p) for p in paths]
    return [m for m in members if m[1].scenario != "base"]


@one_thread()
def train_shared_base_zoo(data: Dataset, out_dir: str | Path, cfg: ZooConfig = ZooConfig()) -> list[MemberSpec]:
    """The `shared_base` scenario: one MLP base, then `n_mlp` members fine-tuned from it.

    The base trains on the whole train split; each member fine-tunes from the base for a quarter
    of the epochs on its own seeded 70 % subset of the train split with its own seed, so task
    vectors `θ_i − θ_base` exist and are small. The base is saved as `base.safetensors` (scenario "base").
    """
    import copy
    from dataclasses import replace

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = member_args("mlp", data, cfg)
    seed_everything(cfg.seed)
    base = build_model("mlp", **args)
    init_scaler(base, data.scaling)
    train(base, data, cfg.train, cfg.seed, desc="base")
    base_spec = MemberSpec(name="base", arch="mlp", args=args, seed=cfg.seed, metrics=evaluate(base, data), scenario="base")
    save_member(base, base_spec, out_dir)
    specs = []
    ft = replace(cfg.train, epochs=max(1, cfg.train.epochs // 4), lr=cfg.train.lr / 2)
    for i in progress(range(cfg.n_mlp), desc="fine-tune", unit="member"):
        seed = cfg.seed * 1000 + 500 + i
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(data.X_train), size=int(0.7 * len(data.X_train)), replace=False)
        model = copy.deepcopy(base)
        train(model, data, ft, seed, X=data.X_train[idx], y=data.y_train[idx], desc=f"ft_{i}")
        spec = MemberSpec(
            name=f"ft_{i}", arch="mlp", args=args, seed=seed, metrics=evaluate(model, data),
            scenario="shared_base", parent="base",
        )
        save_member(model, spec, out_dir)
        specs.append(spec)
    return specs
