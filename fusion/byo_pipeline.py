"""`fusion build` for bring-your-own members over named inputs read from a data file (issue 15).

A recipe with `[[members]]`, `[[inputs]]` and `[data] source = "file.npz"` (one array per input name, plus
`y`) gets the digits pipeline on the composed graph of fusion/compose.py:

    members (onnx: files as they are, torch members exported alone, dynamo; an image input's
             `(x * scale - mean) / std` put in front of each, fusion/imagenorm.py)
      -> member scores on val/test: each member's file run in onnxruntime (ONNX-only members have no torch
         module), Log for `probabilities` members (as the composed graph does)
      -> [temperature calibration per member, fitted on validation NLL]
      -> weights chosen from data on those scores (`[ensemble] weights`, fusion/ensemble/selection.py via
         fusion.build.select_combiner: equal/select/fit/auto/stacking, then the gate against the best member)
      -> one composed graph (fusion.compose), gated against the members run separately
      -> per-variant metrics, the distilled variant (the composed graph in onnxruntime is the teacher), the
         comparison report, all staged before the bundle is committed.

Distillation needs a transfer set the augmenter understands: one float input (rows of any shape). With
several inputs, or integer inputs (token ids), the distilled variant is skipped with a logged note.
Merging needs weights of one architecture and int8 variants are built for merged/distilled only on the
flat path: both are skipped here with a note.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fusion.data import Dataset, Scaling, load_named
from fusion.errors import ConfigError
from fusion.progress import stage as timed
from fusion.recipe import Recipe

log = logging.getLogger(__name__)

SCORE_BATCH = 512  # rows per onnxruntime call when scoring members


def load_data(recipe: Recipe) -> Dataset:
    """The recipe's `[data]` file read as named inputs (fusion.data.load_named), classes named by `[data] classes`."""
    d = recipe.data
    data = load_named(d.source, recipe.inputs, task=d.task)
    if d.classes:
        if len(d.classes) != data.n_classes:
            raise ConfigError(f"[data].classes expected {data.n_classes} names, one per class in label order "
                              f"({list(data.classes)}); got {len(d.classes)}")
        data = replace(data, classes=tuple(d.classes))
    return data


def scores(prepared, X: dict, temperatures: Sequence[float] | None = None) -> np.ndarray:
    """(M, N, C) float64: what the combiner sees from each member (fusion.compose.member_scores), in batches."""
    from fusion.compose import member_scores

    n = len(next(iter(X.values())))
    parts = [member_scores(prepared, {k: v[i:i + SCORE_BATCH] for k, v in X.items()}, temperatures)
             for i in range(0, n, SCORE_BATCH)]
    return np.concatenate(parts, axis=1).astype(np.float64)


def _members(recipe: Recipe, inputs) -> list:
    from fusion.compose import OnnxMember, torch_member
    from fusion.sources import load_member, source_kind, split_source

    members = []
    for section in recipe.members:
        kw = {"input_map": dict(section.input_map), "output": section.output, "output_name": section.output_name}
        if source_kind(section.source) == "onnx":
            members.append(OnnxMember.load(section.name, split_source(section.source)[1], **kw))
        else:
            members.append(torch_member(section.name, load_member(section).module, inputs, output=section.output))
    if any(s.kind == "image" for s in inputs):  # (x * scale - mean) / std in front of every member an image feeds,
        from fusion.imagenorm import normalize_member  # as build_composed does: scored, composed and served on raw pixels

        members = [normalize_member(m, inputs) for m in members]
    return members


def choose(recipe: Recipe, names: list[str], raw_val: np.ndarray, raw_test: np.ndarray, data: Dataset):
    """(combiner, member temperatures or None, selection record or None) from member scores in numpy."""
    from fusion.build import CALIBRATABLE, _candidates, member_weights, select_combiner
    from fusion.ensemble import make_combiner
    from fusion.ensemble.calibration import fit_temperature

    e = recipe.ensemble
    weights = None if isinstance(e.weights, str) else member_weights(e.weights, names)
    combiner = make_combiner(e.combiner, len(names), weights, **e.params)
    if combiner.task != data.task:
        raise ConfigError(f"combiner '{e.combiner}' is for {combiner.task}; the data set is {data.task}")
    temps = None
    val, test = raw_val, raw_test
    if e.calibration == "temperature":
        if e.combiner not in CALIBRATABLE:
            raise ConfigError(f"calibration 'temperature' applies to the combiners {list(CALIBRATABLE)}; got '{e.combiner}'")
        temps = [float(fit_temperature(z, data.y_val)) for z in raw_val]
        t = np.asarray(temps)[:, None, None]
        val, test = raw_val / t, raw_test / t
    candidates = _candidates(recipe, weights, data) if data.task == "classification" else None
    if candidates is None:
        if combiner.learned:
            combiner.fit(torch.from_numpy(val.astype(np.float32)), torch.from_numpy(data.y_val))
        return combiner, temps, None
    combiner, record = select_combiner(recipe, candidates, names, weights, val, test, raw_val, data)
    return combiner, temps, record


def _accuracy(probs_val: np.ndarray, probs_test: np.ndarray, data: Dataset) -> dict:
    return {"val_accuracy": float((probs_val.argmax(-1) == data.y_val).mean()),
            "test_accuracy": float((probs_test.argmax(-1) == data.y_test).mean())}


def _run_file(path: Path, X: dict) -> np.ndarray:
    """A staged file over the named rows X (its inputs by name), first output, in batches."""
    from fusion.compose import session

    sess = session(path.read_bytes())
    feeds = {i.name for i in sess.get_inputs()}
    n = len(next(iter(X.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + SCORE_BATCH] for k, v in X.items() if k in feeds})[0]
                           for i in range(0, n, SCORE_BATCH)])


def flat_view(data: Dataset) -> Dataset | None:
    """The data set as distill.py's flat rows (N, F) when it has one float input; None otherwise."""
    if len(data.X_train) != 1:
        return None
    (name, X_train), = data.X_train.items()
    if not np.issubdtype(X_train.dtype, np.floating):
        return None
    flat = {s: np.ascontiguousarray(getattr(data, f"X_{s}")[name].reshape(len(getattr(data, f"y_{s}")), -1),
                                    dtype=np.float32) for s in ("train", "val", "test")}
    return replace(data, X_train=flat["train"], X_val=flat["val"], X_test=flat["test"],
                   scaling=Scaling.fit(flat["train"]))


class Reshaped(nn.Module):
    """A module over rows of the input's own shape (B, *shape), called with flat rows (B, F): distill.py's
    transfer set and augmentations work on flat rows."""

    def __init__(self, inner: nn.Module, shape: Sequence[int]):
        super().__init__()
        self.inner, self.shape = inner, [int(d) for d in shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(len(x), *self.shape))


class ImageNormalized(nn.Module):
    """A student over raw pixels (0..255): `(x * scale - mean) / std` per channel, then the student, so the
    distilled file takes what the members' graphs take (fusion/imagenorm.py) and learns on normalised pixels."""

    def __init__(self, inner: nn.Module, scale, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.inner, self.scale = inner, float(scale)
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, np.float32)), persistent=False)
        self.register_buffer("std", torch.from_numpy(np.asarray(std, np.float32)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x * self.scale - self.mean) / self.std)


def export_distilled(recipe: Recipe, stage: Path, data: Dataset, inputs) -> dict:
    """The `distilled` variant with the composed graph in onnxruntime as the teacher ({} when skipped).

    The student is `[distill] source` (a torch source, `args` as keywords) or `arch`/`hidden`/`args`; it
    takes the bundle's one input in its own shape and is exported through the parity gate."""
    from fusion.bundle import ModelEntry
    from fusion.distill import OnnxTeacher, distill, make_student, method_record, student_args
    from fusion.export import Probabilities, count_parameters, export_onnx
    from fusion.imagenorm import image_constants
    from fusion.sources import resolve
    from fusion.zoo import init_scaler

    cfg = recipe.distill
    if not cfg.enabled:
        return {}
    flat = flat_view(data) if data.task == "classification" else None
    if flat is None:
        log.warning("distilled variant skipped: distilling a bundle of named inputs needs one float input (the "
                    "transfer set is augmented rows); got %s", [f"{s.name} ({s.dtype})" for s in inputs])
        return {}
    (name, X_test), = data.X_test.items()
    shape = X_test.shape[1:]
    with timed("build: distilled variant exported (teacher: the composed graph in onnxruntime)"):
        teacher: nn.Module = OnnxTeacher((stage / "ensemble.onnx").read_bytes())
        student = resolve(cfg.source, dict(cfg.args)) if cfg.source else make_student(flat, cfg)
        if not isinstance(student, nn.Module):
            raise ConfigError(f"[distill] source expected a torch module; got {type(student).__name__}")
        scaler = getattr(student, "scaler", None)  # fusion/zoo.py's students standardise their input inside
        if cfg.source and scaler is not None and tuple(getattr(scaler, "mean", torch.empty(0)).shape) == (flat.n_features,):
            with torch.no_grad():
                init_scaler(student, flat.scaling)
        consts = image_constants(inputs[0])
        if consts is not None:  # raw pixels in, like every member's graph: the recipe's normalisation inside the student
            student = ImageNormalized(student, *consts)
        trained = student
        if len(shape) > 1:  # the student and the teacher take the input's own shape
            trained, teacher = Reshaped(student, shape), Reshaped(teacher, shape)
        trained, history = distill(teacher, flat, cfg, student=trained)
        wrapped = Probabilities(student).eval()
        parity = export_onnx(wrapped, stage / "distilled.onnx", np.ascontiguousarray(X_test, dtype=np.float32))
        probs = {s: _predict(wrapped, getattr(data, f"X_{s}")[name]) for s in ("val", "test")}
    arch = ({"arch": cfg.source, "args": dict(cfg.args), "seed": cfg.seed} if cfg.source
            else {"arch": cfg.arch, "args": student_args(flat, cfg), "seed": cfg.seed})
    return {"distilled": ModelEntry(
        file="distilled.onnx", sha256="", kind="distilled",
        method={**method_record(cfg, history), "teacher_runtime": "onnxruntime (the composed ensemble graph)"},
        metrics=_accuracy(probs["val"], probs["test"], data), n_parameters=count_parameters(student),
        parity=parity.to_dict(), arch=arch,
    )}


@torch.no_grad()
def _predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()


def build_composed_with_data(recipe: Recipe):
    """`fusion build` for [[members]] over [[inputs]] read from `[data] source` (a .npz): see the module docstring."""
    from fusion.build import add_comparison
    from fusion.compose import prepare_members, write_onnx_bundle

    if not recipe.data.source.lower().endswith(".npz"):
        raise ConfigError(f"[data].source with [[inputs]] expected a .npz file (one array per input name, plus 'y'); "
                          f"got {recipe.data.source!r}")
    data = load_data(recipe)
    inputs = [i.to_tensor_spec() for i in recipe.inputs]
    names = [m.name for m in recipe.members]
    skipped = [s for s, on in (("merged", bool(recipe.merge.method)), ("int8", recipe.build.quantize)) if on]
    if skipped:
        log.warning("a bundle of named inputs composes its members' graphs (no weights to merge, no merged/distilled "
                    "file to quantize on this path); skipped: %s", ", ".join(skipped))
    members = _members(recipe, inputs)
    with timed(f"build: {len(members)} members checked and scored in onnxruntime"):
        prepared = prepare_members(members, inputs)
        raw_val, raw_test = scores(prepared, data.X_val), scores(prepared, data.X_test)
    with timed(f"build: ensemble of {len(members)} members ({recipe.ensemble.combiner}) chosen on validation"):
        combiner, temps, selection = choose(recipe, names, raw_val, raw_test, data)

    def finish(stage: Path, manifest):
        ens = manifest.variants["ensemble"]
        probs = {s: _run_file(stage / ens.file, getattr(data, f"X_{s}")) for s in ("val", "test")}
        method = dict(ens.method or {})
        if temps is not None:
            method["fit_on"] = "validation"
        classify = data.task == "classification"  # accuracy is the figure recorded (regression: none yet)
        variants = {"ensemble": replace(ens, metrics=_accuracy(probs["val"], probs["test"], data) if classify else {},
                                        method=method)}
        members_out = {n: replace(e, metrics=_accuracy(raw_val[i], raw_test[i], data)) if classify else e
                       for i, (n, e) in enumerate(manifest.members.items())}
        if data.task == "classification":
            variants |= export_distilled(recipe, stage, data, inputs)
        manifest = replace(manifest, variants=variants, members=members_out, ensemble_selection=selection)
        if recipe.build.compare and data.task == "classification":
            with timed("build: comparison report written"):
                manifest = add_comparison(recipe, stage, manifest, data)
        return manifest

    dataset = {**data.describe(), "source": recipe.data.source}
    with timed(f"build: {len(members)} members composed into one ONNX graph (onnx.compose, parity-checked)"):
        return write_onnx_bundle(recipe.build.out, members, combiner, inputs, classes=data.classes,
                                 task=data.task, temperatures=temps, dataset=dataset, prepared=prepared,
                                 finish=finish)
