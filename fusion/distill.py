"""Knowledge distillation of an ensemble into one student (Hinton, Vinyals & Dean 2015,
"Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531).

    loss = α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, y)      KL with reduction="batchmean"

The T² keeps the soft term's gradients on the scale of the hard term's when T changes (the paper, §2).

Teacher contract: a module from raw features (B, F) to **probabilities** (B, C) (`FusedEnsemble`, a
member wrapped in `Probabilities`, or an ONNX file through `OnnxTeacher`). Its logits are taken as
z_t = log(max(p, eps)), so softmax(z_t / T) ∝ p^(1/T): the teacher's own distribution softened at
temperature T (for any logit vector z, softmax(log softmax(z) / T) = softmax(z / T)). A `hard_vote`
teacher gives vote fractions with exact zeros: they are clamped to eps = 1e-6 (logit ≈ −13.8), so the
student learns the vote shares, which are not calibrated probabilities.

Transfer set: each epoch, the train split plus `copies` augmented copies of it (pixel shifts for
image-shaped rows, mixup, Gaussian noise, in that order), every row labelled by the teacher on the
fly. Early stopping: the student's argmax agreement with the teacher on the validation split; the
best epoch's weights are kept (ties go to the lower validation KL).
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.data import Dataset
from fusion.errors import ConfigError
from fusion.progress import progress as progress_bar
from fusion.recipe import DistillSection
from fusion.zoo import build_model, init_scaler, seed_everything

log = logging.getLogger(__name__)

TEACHER_EPS = 1e-6
PAPER = "https://arxiv.org/abs/1503.02531"


def teacher_logits(probs: torch.Tensor, eps: float = TEACHER_EPS) -> torch.Tensor:
    """Teacher probabilities (B, C) -> logits log(max(p, eps)) (B, C)."""
    return torch.log(probs.clamp_min(eps))


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
    temperature: float, alpha: float,
) -> torch.Tensor:
    """Hinton's loss α·T²·KL(p_t^T ‖ p_s^T) + (1 − α)·CE(z_s, y), both batch means.

    student_logits, teacher_logits: (B, C); target: (B,) class indices or (B, C) class
    probabilities (mixup). Returns a scalar.
    """
    T = float(temperature)
    log_ps = F.log_softmax(student_logits / T, -1)  # (B, C)
    log_pt = F.log_softmax(teacher_logits / T, -1)  # (B, C)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits, target)
    return alpha * T * T * kl + (1.0 - alpha) * ce


# --- augmentation: pure functions on raw features (B, F) -------------------------------------------


def add_noise(x: torch.Tensor, scale: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """x + σ·scale·ε, ε ~ N(0, 1). scale: (F,) per-feature train std (0 for constant features)."""
    return x + sigma * scale * torch.randn(x.shape, generator=gen)


def shift_images(x: torch.Tensor, image_shape: tuple[int, int, int], max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by its own (dy, dx) ∈ [−s, s]², edges replicated. x: (B, C*H*W) -> same."""
    if max_shift == 0:
        return x
    c, h, w = image_shape
    b, s = len(x), max_shift
    padded = F.pad(x.reshape(b, c, h, w), (s, s, s, s), mode="replicate")  # (B, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * s + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=gen)
    rows = (torch.arange(h) + dy[:, None])[:, None, :, None]  # (B, 1, H, 1)
    cols = (torch.arange(w) + dx[:, None])[:, None, None, :]  # (B, 1, 1, W)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return out.reshape(b, -1)  # (B, C*H*W)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhang et al. 2018 (https://arxiv.org/abs/1710.09412): λ·(x_i, y_i) + (1 − λ)·(x_j, y_j),
    λ ~ Beta(a, a) per row, j a random permutation. x: (B, F); y: (B, C) class probabilities."""
    # torch's Beta sampler takes no generator: draw λ from a numpy generator seeded from `gen`
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=(len(x), 1))).to(x.dtype)  # (B, 1)
    j = torch.randperm(len(x), generator=gen)
    return lam * x + (1 - lam) * x[j], lam * y + (1 - lam) * y[j]


@dataclass(frozen=True)
class Augmenter:
    """One augmented copy of a batch: shift (images) -> mixup -> noise, clamped to the train range."""

    kinds: tuple[str, ...]
    image_shape: tuple[int, int, int] | None
    feature_std: torch.Tensor  # (F,)
    lo: torch.Tensor  # (F,) train minimum
    hi: torch.Tensor  # (F,) train maximum
    noise_std: float
    max_shift: int
    mixup_alpha: float

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, F) raw features; y: (B, C) class probabilities."""
        if "shift" in self.kinds and self.image_shape is not None:
            x = shift_images(x, self.image_shape, self.max_shift, gen)
        if "mixup" in self.kinds:
            x, y = mixup(x, y, self.mixup_alpha, gen)
        if "noise" in self.kinds:
            x = add_noise(x, self.feature_std, self.noise_std, gen)
        return torch.maximum(torch.minimum(x, self.hi), self.lo), y


def make_augmenter(data: Dataset, cfg: DistillSection) -> Augmenter:
    X = torch.from_numpy(data.X_train)
    if "shift" in cfg.augment and data.image_shape is None:
        log.info("distill: rows of '%s' are not images; the 'shift' augmentation is skipped", data.name)
    return Augmenter(
        kinds=tuple(cfg.augment), image_shape=tuple(data.image_shape) if data.image_shape else None,
        feature_std=X.std(0, unbiased=False), lo=X.min(0).values, hi=X.max(0).values,
        noise_std=cfg.noise_std, max_shift=cfg.max_shift, mixup_alpha=cfg.mixup_alpha,
    )


# --- the student ---------------------------------------------------------------------------------


def student_args(data: Dataset, cfg: DistillSection) -> dict:
    """Constructor arguments of the student: raw width in, one logit per class out, + cfg.args."""
    args: dict = {"in_features": data.n_features, "n_outputs": data.n_classes}
    if cfg.arch == "mlp":
        args["hidden"] = list(cfg.hidden)
    elif data.image_shape is not None and cfg.arch == "cnn":
        args["image_shape"] = list(data.image_shape)
    return {**args, **cfg.args}


def make_student(data: Dataset, cfg: DistillSection) -> nn.Module:
    """A freshly initialised student (seeded) whose feature scaler holds the train split's scaling."""
    seed_everything(cfg.seed)
    try:
        model = build_model(cfg.arch, **student_args(data, cfg))
    except TypeError as exc:
        raise ConfigError(f"distill: student '{cfg.arch}' does not take these arguments: {exc}") from None
    if hasattr(model, "scaler"):
        with torch.no_grad():
            init_scaler(model, data.scaling)
    return model


# --- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillHistory:
    """Per-epoch training loss, validation agreement and KL(teacher ‖ student) at T = 1; the kept epoch."""

    train_loss: tuple[float, ...]
    val_agreement: tuple[float, ...]
    val_kl: tuple[float, ...]
    best_epoch: int  # 1-based
    epochs_run: int
    teacher_val_accuracy: float
    student_val_accuracy: float

    @property
    def best_val_agreement(self) -> float:
        return self.val_agreement[self.best_epoch - 1]

    def to_dict(self) -> dict:
        return {**asdict(self), "best_val_agreement": self.best_val_agreement}


@torch.no_grad()
def _predict(model: nn.Module, X: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([model(X[i : i + batch]) for i in range(0, len(X), batch)])


@contextmanager
def torch_threads(n: int):
    """Run with n torch intra-op threads (0: leave torch's setting), restoring the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def distill(
    teacher: nn.Module, data: Dataset, cfg: DistillSection = DistillSection(), *,
    student: nn.Module | None = None, progress: bool = True,
) -> tuple[nn.Module, DistillHistory]:
    """Train a student on the teacher's soft predictions over the (augmented) train split.

    teacher: raw features (B, F) -> probabilities (B, C), used in eval mode without gradients.
    student: raw features -> logits; by default `make_student(data, cfg)`.
    Returns the student (eval mode, the best epoch's weights) and its history. Seeded by cfg.seed;
    runs on cfg.threads torch threads (small models on a shared CPU are ~10x faster on one).
    """
    if data.task != "classification":
        raise ConfigError(f"distillation needs a classification data set; '{data.name}' is {data.task}")
    with torch_threads(cfg.threads):
        return _distill(teacher, data, cfg, student, progress)


def _distill(
    teacher: nn.Module, data: Dataset, cfg: DistillSection, student: nn.Module | None, progress: bool,
) -> tuple[nn.Module, DistillHistory]:
    teacher = teacher.eval()
    student = make_student(data, cfg) if student is None else student
    gen = seed_everything(cfg.seed)
    augmenter = make_augmenter(data, cfg)
    n_classes = data.n_classes
    X = torch.from_numpy(data.X_train)  # (N, F)
    Y = F.one_hot(torch.from_numpy(data.y_train), n_classes).float()  # (N, C)
    X_val = torch.from_numpy(data.X_val)
    with torch.no_grad():
        t_val = _predict(teacher, X_val)  # (N_val, C) probabilities
    t_val_pred = t_val.argmax(-1)
    copies = cfg.copies if cfg.augment else 0
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    losses, agreements, kls = [], [], []
    best = (-1.0, float("inf"))  # (agreement, −KL) ordering: higher agreement, then lower KL
    best_state, best_epoch, since_best = copy.deepcopy(student.state_dict()), 0, 0
    bar = progress_bar(range(1, cfg.epochs + 1), desc="distill", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        student.train()
        total, seen = 0.0, 0
        for idx in torch.randperm(len(X), generator=gen).split(cfg.batch_size):
            xs, ys = [X[idx]], [Y[idx]]
            for _ in range(copies):
                xa, ya = augmenter(X[idx], Y[idx], gen)
                xs.append(xa)
                ys.append(ya)
            xb, yb = torch.cat(xs), torch.cat(ys)  # (B·(1+copies), F), (B·(1+copies), C)
            with torch.no_grad():
                zt = teacher_logits(teacher(xb))
            loss = kd_loss(student(xb), zt, yb, temperature=cfg.temperature, alpha=cfg.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
            seen += len(xb)
        sched.step()
        student.eval()
        with torch.no_grad():
            zs = _predict(student, X_val)
            agree = float((zs.argmax(-1) == t_val_pred).double().mean())
            kl = float(F.kl_div(F.log_softmax(zs, -1), teacher_logits(t_val), reduction="batchmean", log_target=True))
        losses.append(total / seen)
        agreements.append(agree)
        kls.append(kl)
        if (agree, -kl) > (best[0], -best[1]):
            best, best_epoch, since_best = (agree, kl), epoch, 0
            best_state = copy.deepcopy(student.state_dict())
        else:
            since_best += 1
        bar.set_postfix(loss=f"{losses[-1]:.4f}", agree=f"{agree:.4f}", best=best_epoch)
        if cfg.patience and since_best >= cfg.patience:
            log.info("distill: no better validation agreement for %d epochs; stopping at epoch %d", cfg.patience, epoch)
            break
    bar.close()
    student.load_state_dict(best_state)
    student.eval()
    with torch.no_grad():
        s_val_pred = _predict(student, X_val).argmax(-1).numpy()
    history = DistillHistory(
        train_loss=tuple(losses), val_agreement=tuple(agreements), val_kl=tuple(kls),
        best_epoch=best_epoch, epochs_run=len(losses),
        teacher_val_accuracy=float((t_val_pred.numpy() == data.y_val).mean()),
        student_val_accuracy=float((s_val_pred == data.y_val).mean()),
    )
    return student, history


def method_record(cfg: DistillSection, history: DistillHistory, teacher: str = "ensemble") -> dict:
    """What the manifest records about how a distilled variant was made."""
    return {
        "name": "knowledge_distillation", "paper": PAPER, "teacher": teacher,
        "temperature": cfg.temperature, "alpha": cfg.alpha, "epochs": cfg.epochs,
        "epochs_run": history.epochs_run, "best_epoch": history.best_epoch,
        "augment": list(cfg.augment), "copies": cfg.copies, "seed": cfg.seed,
        "val_agreement": history.best_val_agreement,
    }


# --- teachers from files and saving students -----------------------------------------------------


class OnnxTeacher(nn.Module):
    """An ONNX file (raw features -> probabilities) as a teacher: runs onnxruntime, no gradients.

    x: (B, F) -> (B, C). The bytes are those the caller verified (e.g. `Bundle.read_verified`).
    """

    def __init__(self, onnx_bytes: bytes, threads: int = 1):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_np = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: x_np})[0])


def teacher_from_bundle(bundle_dir: str | Path, variant: str = "ensemble") -> OnnxTeacher:
    """A bundle's variant (verified against its digest) as a teacher."""
    from fusion.bundle import read_bundle

    bundle = read_bundle(bundle_dir)
    return OnnxTeacher(bundle.read_verified(variant))


def save_student(
    student: nn.Module, data: Dataset, cfg: DistillSection, history: DistillHistory,
    out_dir: str | Path, *, name: str = "distilled", teacher: str = "ensemble", onnx: bool = False,
) -> dict[str, Path]:
    """Write `<name>.safetensors` + `<name>.json` (a zoo member spec, loadable by `load_member`),
    `<name>.history.json` and, with onnx=True, `<name>.onnx` through the parity gate."""
    from fusion.export import Probabilities, export_onnx
    from fusion.zoo import MemberSpec, evaluate, save_member

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = MemberSpec(
        name=name, arch=cfg.arch, args=student_args(data, cfg), seed=cfg.seed,
        metrics=evaluate(student, data), scenario="distilled", parent=teacher,
    )
    paths = {"safetensors": save_member(student, spec, out_dir), "spec": out_dir / f"{name}.json"}
    paths["history"] = out_dir / f"{name}.history.json"
    paths["history"].write_text(json.dumps({"method": method_record(cfg, history, teacher), **history.to_dict()}, indent=2))
    if onnx:
        paths["onnx"] = out_dir / f"{name}.onnx"
        export_onnx(Probabilities(student).eval(), paths["onnx"], data.X_test)
    return paths


# --- named inputs (issue 15): text, several tensors ----------------------------------------------


class NamedStudent(nn.Module):
    """A student over a bundle's graph feeds: forward(*feeds), in `input_names` order -> probabilities (the
    softmax of the student's logits), as a distilled variant is served."""

    def __init__(self, student: nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.student, self.input_names = student, tuple(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.student(*inputs), -1)


def _batch(X: dict, idx: np.ndarray, names: tuple[str, ...], trim: tuple[str, ...]) -> list[torch.Tensor]:
    """Rows `idx` of each feed in `names` order; the `trim` feeds (text, (B, S)) cut after the longest row's
    last token (the attention mask's), since the split is padded to its longest row."""
    rows = {n: X[n][idx] for n in names}
    if trim and "attention_mask" in X:
        width = max(1, int(X["attention_mask"][idx].sum(1).max()))
        rows = {n: (v[:, :width] if n in trim else v) for n, v in rows.items()}
    return [torch.from_numpy(np.ascontiguousarray(rows[n])) for n in names]


def distill_named(student: nn.Module, names: tuple[str, ...], X_train: dict, teacher_train: np.ndarray, y_train: np.ndarray,
                  X_val: dict, teacher_val: np.ndarray, y_val: np.ndarray, cfg: DistillSection, *,
                  trim: tuple[str, ...] = (), progress: bool = True) -> tuple[nn.Module, DistillHistory]:
    """Hinton's loss over named feeds: `student(*feeds)` (B, C) logits against the teacher's probabilities on
    the same rows (the composed graph run once over the splits in onnxruntime by the caller), no augmentation
    (the augmentations are for float rows); early stopping on validation agreement as `distill`."""
    if teacher_train.shape[0] != len(y_train) or teacher_val.shape[0] != len(y_val):
        raise ConfigError(f"expected teacher probabilities for every row ({len(y_train)} train, {len(y_val)} val); "
                          f"got {teacher_train.shape[0]} and {teacher_val.shape[0]}")
    with torch_threads(cfg.threads):
        gen = seed_everything(cfg.seed)
        n_classes = teacher_train.shape[1]
        zt_train = teacher_logits(torch.from_numpy(np.asarray(teacher_train, np.float32)))
        zt_val = teacher_logits(torch.from_numpy(np.asarray(teacher_val, np.float32)))
        Y = F.one_hot(torch.from_numpy(np.asarray(y_train, np.int64)), n_classes).float()
        t_val_pred = zt_val.argmax(-1)
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)

        @torch.no_grad()
        def predict(X: dict, n: int) -> torch.Tensor:
            student.eval()
            return torch.cat([student(*_batch(X, np.arange(i, min(i + 256, n)), names, trim)) for i in range(0, n, 256)])

        losses, agreements, kls = [], [], []
        best, best_state, best_epoch, since_best = (-1.0, float("inf")), copy.deepcopy(student.state_dict()), 0, 0
        bar = progress_bar(range(1, cfg.epochs + 1), desc="distill", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            student.train()
            total, seen = 0.0, 0
            for idx in torch.randperm(len(y_train), generator=gen).split(cfg.batch_size):
                loss = kd_loss(student(*_batch(X_train, idx.numpy(), names, trim)), zt_train[idx], Y[idx],
                               temperature=cfg.temperature, alpha=cfg.alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
            sched.step()
            zs = predict(X_val, len(y_val))
            agree = float((zs.argmax(-1) == t_val_pred).double().mean())
            kl = float(F.kl_div(F.log_softmax(zs, -1), zt_val.log_softmax(-1), reduction="batchmean", log_target=True))
            losses.append(total / seen)
            agreements.append(agree)
            kls.append(kl)
            if (agree, -kl) > (best[0], -best[1]):
                best, best_epoch, since_best, best_state = (agree, kl), epoch, 0, copy.deepcopy(student.state_dict())
            else:
                since_best += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}", agree=f"{agree:.4f}", best=best_epoch)
            if cfg.patience and since_best >= cfg.patience:
                break
        bar.close()
        student.load_state_dict(best_state)
        s_val_pred = predict(X_val, len(y_val)).argmax(-1).numpy()
    history = DistillHistory(
        train_loss=tuple(losses), val_agreement=tuple(agreements), val_kl=tuple(kls), best_epoch=best_epoch,
        epochs_run=len(losses), teacher_val_accuracy=float((t_val_pred.numpy() == y_val).mean()),
        student_val_accuracy=float((s_val_pred == y_val).mean()))
    return student.eval(), history
