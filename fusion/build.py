"""`fusion build`: zoo -> combiner -> fused ONNX graph (+ members, merged, distilled) -> verified bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fusion.bundle import SCHEMA_VERSION, BundleWriter, InputSpec, Manifest, ModelEntry
from fusion.data import Dataset, load
from fusion.ensemble import make_combiner
from fusion.errors import ConfigError
from fusion.export import OUTPUT_NAME, FusedEnsemble, Probabilities, count_parameters, export_onnx
from fusion.recipe import Recipe
from fusion.zoo import MemberSpec, ZooConfig, load_zoo, train_zoo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    name: str
    model: nn.Module
    spec: MemberSpec


def load_data(recipe: Recipe) -> Dataset:
    d = recipe.data
    if d.source == "digits":
        return load("digits")
    return load(d.source, label_column=d.label_column, task=d.task)


def ensure_zoo(recipe: Recipe, data: Dataset) -> list[Member]:
    """Load the zoo's members, training the default zoo first when the directory has none."""
    zoo_dir = Path(recipe.zoo.dir)
    if not any(zoo_dir.glob("*.safetensors")):
        log.info("no members in %s: training the default zoo", zoo_dir)
        train_zoo(data, zoo_dir, ZooConfig())
    members = [Member(spec.name, model, spec) for model, spec in load_zoo(zoo_dir)]
    if recipe.zoo.members:
        by_name = {m.name: m for m in members}
        missing = [n for n in recipe.zoo.members if n not in by_name]
        if missing:
            raise ConfigError(f"zoo members {missing} not found in {zoo_dir}; have {sorted(by_name)}")
        members = [by_name[n] for n in recipe.zoo.members]
    if not members:
        raise ConfigError(f"no members in {zoo_dir}")
    return members


@torch.no_grad()
def member_logits(members: list[Member], X: np.ndarray) -> torch.Tensor:
    """(M, n, C) member outputs on raw features X (n, F)."""
    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    return torch.stack([m.model(x) for m in members])


@torch.no_grad()
def classification_metrics(model: nn.Module, data: Dataset) -> dict:
    """Accuracy on val and test of a module that outputs probabilities (or logits)."""
    out = {}
    for split, X, y in (("val", data.X_val, data.y_val), ("test", data.X_test, data.y_test)):
        pred = model(torch.from_numpy(X)).argmax(-1).numpy()
        out[f"{split}_accuracy"] = float((pred == y).mean())
    return out


def build_ensemble(recipe: Recipe, members: list[Member], data: Dataset) -> FusedEnsemble:
    e = recipe.ensemble
    combiner = make_combiner(e.combiner, len(members), list(e.weights) or None, **e.params)
    if combiner.task != data.task:
        raise ConfigError(f"combiner '{e.combiner}' is for {combiner.task}; the data set is {data.task}")
    if combiner.learned:  # stacking: fit on the validation split, which no member trained on
        combiner.fit(member_logits(members, data.X_val), data.y_val)
    return FusedEnsemble([m.model for m in members], combiner).eval()


def build_bundle(recipe: Recipe) -> Manifest:
    """Run the whole offline pipeline and write the bundle atomically to `recipe.build.out`."""
    data = load_data(recipe)
    members = ensure_zoo(recipe, data)
    fused = build_ensemble(recipe, members, data)
    task = data.task
    steps = ["ensemble", *[m.name for m in members]]
    with BundleWriter(recipe.build.out) as writer, tqdm(total=len(steps), desc="export", unit="graph") as bar:
        parity = export_onnx(fused, writer.stage / "ensemble.onnx", data.X_test, task=task)
        bar.update()
        variants = {
            "ensemble": ModelEntry(
                file="ensemble.onnx", sha256="", kind="ensemble",
                combiner=fused.combiner.config(), members=tuple(m.name for m in members),
                metrics=classification_metrics(fused, data), n_parameters=count_parameters(fused),
                parity=parity.to_dict(),
            )
        }
        member_entries = {}
        for m in members:
            wrapped = Probabilities(m.model, task).eval()
            rel = f"members/{m.name}.onnx"
            parity = export_onnx(wrapped, writer.stage / rel, data.X_test, task=task)
            member_entries[m.name] = ModelEntry(
                file=rel, sha256="", kind="member", metrics=classification_metrics(wrapped, data),
                n_parameters=count_parameters(m.model), parity=parity.to_dict(),
                arch={"arch": m.spec.arch, "args": m.spec.args, "seed": m.spec.seed},
            )
            bar.update()
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, bundle_version="", created="", task=task,
            input=InputSpec(
                name="input", shape=(-1, data.n_features), dtype="float32",
                scaling=data.scaling.to_dict(), image_shape=data.image_shape,
            ),
            output_name=OUTPUT_NAME, classes=data.classes,
            variants=variants, members=member_entries, dataset=data.describe(),
        )
        return writer.commit(manifest)
