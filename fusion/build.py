"""`fusion build`: zoo -> combiner -> fused ONNX graph (+ members, merged, distilled) -> verified bundle."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fusion.bundle import SCHEMA_VERSION, BundleWriter, InputSpec, Manifest, ModelEntry, sha256_file
from fusion.data import Dataset, load
from fusion.ensemble import make_combiner
from fusion.ensemble.calibration import TemperatureScaled, fit_temperature, nll_at_temperature
from fusion.errors import ConfigError
from fusion.export import OUTPUT_NAME, FusedEnsemble, Probabilities, count_parameters, export_onnx
from fusion.progress import progress, stage as timed
from fusion.recipe import Recipe
from fusion.zoo import MemberSpec, ZooConfig, load_zoo, train_zoo

log = logging.getLogger(__name__)


RESERVED_NAMES = frozenset({"ensemble", "merged", "distilled", "members", "cascade", "fusion"})


@dataclass(frozen=True)
class Member:
    name: str
    model: nn.Module
    spec: MemberSpec


def load_data(recipe: Recipe) -> Dataset:
    d = recipe.data
    data = load("digits") if d.source == "digits" else load(d.source, label_column=d.label_column, task=d.task)
    if d.classes:  # names for the class indices, in label order
        if len(d.classes) != data.n_classes:
            raise ConfigError(f"[data].classes expected {data.n_classes} names, one per class in label order "
                              f"({list(data.classes)}); got {len(d.classes)}")
        data = replace(data, classes=tuple(d.classes))
    return data


class LogitsOfProbabilities(nn.Module):
    """A member declared `output = "probabilities"` as logits, log p (softmax(log p) = p), so every combiner,
    calibration and the Probabilities export wrapper take it like the others. (B, C) -> (B, C)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.model(x).clamp_min(1e-30))


def source_members(recipe: Recipe) -> list[Member]:
    """The recipe's [[members]], resolved by fusion/sources.py (instead of the [zoo] directory)."""
    from fusion.sources import load_member, source_kind

    foreign = [m.name for m in recipe.members if source_kind(m.source) == "onnx"]
    if foreign:  # `fusion build` composes them (build_composed); steps that need torch modules cannot take them
        raise ConfigError(f"members {foreign}: onnx: members are composed by fusion/compose.py and have no torch "
                          f"module; expected torch sources here (zoo:, timm:, torchvision:, hf:, python:)")
    members = []
    for section in recipe.members:
        loaded = load_member(section)
        model = loaded.module if section.output == "logits" else LogitsOfProbabilities(loaded.module).eval()
        members.append(Member(section.name, model, MemberSpec(
            name=section.name, arch=section.source, args=dict(section.args), seed=0, scenario="byo")))
    return members


def _refuse_reserved_names(names: list[str]) -> None:
    clash = [n for n in names if n in RESERVED_NAMES or n.endswith("_int8")]
    if clash:  # a member named like a variant or a serving mode would shadow it in the service
        raise ConfigError(f"member names {clash} are reserved ({sorted(RESERVED_NAMES)}, *_int8); rename the checkpoints")


def _refuse_reserved(members: list[Member]) -> list[Member]:
    _refuse_reserved_names([m.name for m in members])
    return members


def ensure_zoo(recipe: Recipe, data: Dataset) -> list[Member]:
    """Load the zoo's members, training the default zoo first when the directory has none; with
    [[members]] in the recipe, those instead (fusion/sources.py)."""
    if recipe.members:
        return _refuse_reserved(source_members(recipe))
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
    return _refuse_reserved(members)


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


CALIBRATABLE = ("soft_vote", "logit_mean", "geometric_mean")  # combiners that average (log-)probabilities


def calibrate_members(members: list[Member], data: Dataset) -> list[TemperatureScaled]:
    """Each member followed by its temperature, fitted on validation NLL (Guo et al. 2017)."""
    logits = member_logits(members, data.X_val).double().numpy()  # (M, N_val, C)
    return [TemperatureScaled(m.model, fit_temperature(z, data.y_val)).eval() for m, z in zip(members, logits)]


def member_weights(weights: Sequence[float] | Mapping[str, float], names: Sequence[str]) -> list[float] | None:
    """The combiner's weights in member order (None: equal weights) from the recipe's `[ensemble] weights`:
    a list, one per member in `names`' order, or {name: weight} with the unnamed members at 1; "equal" is
    equal weights (the modes "select", "fit" and "auto" are chosen from data by `choose_ensemble`).

    Both errors name the members in order: a positional list is only meaningful against that order."""
    order = ", ".join(names)
    if not weights or weights == "equal":
        return None
    if isinstance(weights, str):
        raise ConfigError(f"weights '{weights}' are chosen from data at build time (fusion.build.choose_ensemble); "
                          f"expected a list, a table or 'equal' here")
    if isinstance(weights, Mapping):
        unknown = [n for n in weights if n not in names]
        if unknown:
            raise ConfigError(f"weights for unknown members {unknown}; expected names among the members: {order}")
        return [float(weights.get(n, 1.0)) for n in names]
    if len(weights) != len(names):
        raise ConfigError(f"expected {len(names)} weights, one per member in this order: {order}; got {len(weights)} "
                          f"({', '.join(f'{w:g}' if isinstance(w, (int, float)) else repr(w) for w in weights)}); "
                          f"or name them, e.g. {names[0]}=2 (the others weigh 1)")
    return list(weights)


def build_ensemble(recipe: Recipe, members: list[Member], data: Dataset) -> FusedEnsemble:
    return choose_ensemble(recipe, members, data)[0]


@torch.no_grad()
def _module_logits(models: Sequence[nn.Module], X: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    return torch.stack([m(x) for m in models]).double().numpy()


def _candidates(recipe: Recipe, weights: list[float] | None, data: Dataset):
    """The weightings `choose` compares for the recipe's `[ensemble] weights` (None: nothing to choose).

    `auto` needs 2 validation rows of every class for its cross-fitting; with fewer it keeps equal weights."""
    from fusion.ensemble import selection as sel

    e = recipe.ensemble
    mode = e.weights if isinstance(e.weights, str) else None
    averaging = e.combiner in sel.AVERAGING
    if mode in ("select", "fit") and not averaging:
        raise ConfigError(f"weights '{mode}' applies to the combiners {list(sel.AVERAGING)}; got '{e.combiner}' "
                          f"(stacking learns its own weights)")
    if e.combiner == "stacking":
        return [sel.stacking_candidate(**e.params)]
    if not averaging:  # hard_vote, regression combiners: the given (or equal) weights, nothing to compare
        return None
    if mode is None:  # a list or a table: the given weights, scored like a candidate for the gate
        w = weights

        def given(z, y):
            return w

        return [sel.Candidate("given" if w is not None else "equal", e.combiner, given,
                              lambda p, z: sel.combine(z, p, e.combiner))]
    if mode == "auto" and sel.n_folds(data.y_val, n_classes=len(data.classes)) < 2:
        log.warning("weights 'auto': fewer than 2 validation rows in some class, too few to compare weightings "
                    "out of fold; equal weights")
        mode = "equal"
    names = ("equal", "select", "fit") if mode == "auto" else (mode,)
    out = [sel.weighting(n, e.combiner) for n in names]
    if mode == "auto":  # each weighting also followed by an output temperature fitted with it (MAP, prior on log T)
        out += [sel.tempered(c, prior_sd=sel.LOG_T_PRIOR_SD) for c in out]
    if mode == "auto" and e.calibration == "none":  # stacking combines raw members only
        out.append(sel.stacking_candidate())
    return out


def choose_ensemble(recipe: Recipe, members: list[Member], data: Dataset) -> tuple[FusedEnsemble, dict | None]:
    """The fused ensemble and the record of how its weights were chosen (`Manifest.ensemble_selection`).

    `[ensemble] weights = "auto"` scores equal, select, fit (each also followed by an output temperature
    fitted with its weights) and stacking out of fold on the validation split and keeps the best (fusion/ensemble/selection.py); "select"/"fit"/"equal" use that one weighting; a list
    or a table is used as given. For classification the chosen ensemble then goes through the gate: is it
    better than its best member on validation beyond noise? The record is None for regression."""
    from fusion.ensemble import selection as sel

    e = recipe.ensemble
    names = [m.name for m in members]
    weights = None if isinstance(e.weights, str) else member_weights(e.weights, names)
    combiner = make_combiner(e.combiner, len(members), weights, **e.params)
    if combiner.task != data.task:
        raise ConfigError(f"combiner '{e.combiner}' is for {combiner.task}; the data set is {data.task}")
    models: list[nn.Module] = [m.model for m in members]
    if e.calibration == "temperature":
        if e.combiner not in CALIBRATABLE:
            raise ConfigError(
                f"calibration 'temperature' applies to the combiners {list(CALIBRATABLE)}; got '{e.combiner}'"
            )
        models = list(calibrate_members(members, data))
    candidates = _candidates(recipe, weights, data) if data.task == "classification" else None
    if candidates is None:
        if combiner.learned:
            combiner.fit(member_logits(members, data.X_val), data.y_val)
        return FusedEnsemble(models, combiner).eval(), None
    raw_val = _module_logits([m.model for m in members], data.X_val)  # each member as it is served alone
    combiner, record = select_combiner(recipe, candidates, names, weights, _module_logits(models, data.X_val),
                                       _module_logits(models, data.X_test), raw_val, data)
    return FusedEnsemble(models, combiner).eval(), record


def select_combiner(recipe: Recipe, candidates, names: Sequence[str], weights: list[float] | None,
                    val: np.ndarray, test: np.ndarray, raw_val: np.ndarray, data: Dataset):
    """Choose among `candidates` on member logits (M, N, C) in numpy (val: as the combiner sees them, after
    any member calibration; raw_val: each member as served alone, for the gate) and return the combiner
    and the record. Shared by the torch path and the composed ONNX path (fusion/byo_pipeline.py), whose
    member logits come from onnxruntime."""
    from fusion.ensemble import selection as sel

    e = recipe.ensemble
    # every candidate is fitted on the validation split, which no member trained on
    choice = sel.choose(candidates, val, data.y_val, test, data.y_test, n_repeats=sel.AUTO_REPEATS)  # 5 x 5-fold
    if choice.combiner == "stacking":
        combiner = choice.params
    else:
        tempered = isinstance(choice.params, sel.Tempered)
        params = choice.params.weights if tempered else choice.params
        w = None if params is None else [float(v) for v in params]
        extra = {"temperature": choice.params.temperature} if tempered else {}
        combiner = make_combiner(choice.combiner, len(names), w,
                                 **(e.params if choice.combiner == e.combiner else {}), **extra)
    record = {
        "weights": e.weights if isinstance(e.weights, str) else "given" if weights is not None else "equal",
        **choice.record,
        "gate": sel.gate(choice.val_oof_probs, {n: sel.combine(z[None], None) for n, z in zip(names, raw_val)}, data.y_val),
    }
    if "select" in record["candidates"]:
        record["selection"] = sel.SelectionConfig().to_dict()
    return combiner, record


def calibration_record(fused: FusedEnsemble, members: list[Member], data: Dataset) -> dict | None:
    """The manifest's record of member temperature scaling (None without it)."""
    if not all(isinstance(m, TemperatureScaled) for m in fused.members):
        return None
    logits = member_logits(members, data.X_val).double().numpy()  # (M, N_val, C), unscaled
    temps = {m.name: float(s.temperature) for m, s in zip(members, fused.members)}
    return {
        "calibration": "temperature", "paper": "https://arxiv.org/abs/1706.04599", "fit_on": "validation",
        "temperatures": temps,
        "val_nll_before": {m.name: nll_at_temperature(z, data.y_val, 1.0) for m, z in zip(members, logits)},
        "val_nll_after": {m.name: nll_at_temperature(z, data.y_val, temps[m.name]) for m, z in zip(members, logits)},
    }


# --- export steps: each stages its ONNX files and returns their manifest entries -----------------


def export_ensemble(fused: FusedEnsemble, members: list[Member], stage: Path, data: Dataset) -> ModelEntry:
    parity = export_onnx(fused, stage / "ensemble.onnx", data.X_test, task=data.task)
    return ModelEntry(
        file="ensemble.onnx", sha256="", kind="ensemble",
        combiner=fused.combiner.config(), members=tuple(m.name for m in members),
        method=calibration_record(fused, members, data),
        metrics=classification_metrics(fused, data), n_parameters=count_parameters(fused),
        parity=parity.to_dict(),
    )


def export_members(members: list[Member], stage: Path, data: Dataset) -> dict[str, ModelEntry]:
    entries = {}
    for m in progress(members, desc="export members", unit="graph", leave=False):
        wrapped = Probabilities(m.model, data.task).eval()
        rel = f"members/{m.name}.onnx"
        parity = export_onnx(wrapped, stage / rel, data.X_test, task=data.task)
        entries[m.name] = ModelEntry(
            file=rel, sha256="", kind="member", metrics=classification_metrics(wrapped, data),
            n_parameters=count_parameters(m.model), parity=parity.to_dict(),
            arch={"arch": m.spec.arch, "args": m.spec.args, "seed": m.spec.seed},
        )
    return entries


def export_distilled(recipe: Recipe, teacher: FusedEnsemble, stage: Path, data: Dataset) -> dict[str, ModelEntry]:
    """The `distilled` variant: a student trained on the ensemble's soft predictions ({} when disabled)."""
    from fusion.distill import distill, method_record, student_args

    cfg = recipe.distill
    if not cfg.enabled:
        return {}
    if data.task != "classification":
        log.warning("distillation is implemented for classification; skipped for a %s data set", data.task)
        return {}
    with timed("build: distilled variant exported"):
        student, history = distill(teacher, data, cfg)
        wrapped = Probabilities(student).eval()
        parity = export_onnx(wrapped, stage / "distilled.onnx", data.X_test)
    return {"distilled": ModelEntry(
        file="distilled.onnx", sha256="", kind="distilled", method=method_record(cfg, history),
        metrics=classification_metrics(wrapped, data), n_parameters=count_parameters(student),
        parity=parity.to_dict(), arch={"arch": cfg.arch, "args": student_args(data, cfg), "seed": cfg.seed},
    )}


def export_merged(recipe: Recipe, stage: Path, data: Dataset) -> dict[str, ModelEntry]:
    """The `merged` variant: the [merge] section's members (aligned when asked) merged into one model ({} when off)."""
    from fusion.fuse import merged_model

    cfg = recipe.merge
    if not cfg.method:
        return {}
    if recipe.members and not cfg.zoo:  # [merge] reads checkpoints from a zoo directory
        log.warning("merged variant skipped: the recipe's [[members]] are not merged (set [merge] zoo to a zoo "
                    "directory to merge its checkpoints, or method = \"\" to silence this)")
        return {}
    with timed(f"build: merged variant ({cfg.method}) exported"):
        model, record = merged_model(cfg, recipe.zoo.dir, data)
        wrapped = Probabilities(model, data.task).eval()
        parity = export_onnx(wrapped, stage / "merged.onnx", data.X_test, task=data.task)
    spec = json.loads((Path(cfg.zoo or recipe.zoo.dir) / f"{record['members'][0]}.json").read_text())
    return {"merged": ModelEntry(
        file="merged.onnx", sha256="", kind="merged", method=record,
        metrics=classification_metrics(wrapped, data), n_parameters=count_parameters(model),
        parity=parity.to_dict(), arch={"arch": spec["arch"], "args": spec["args"]},
    )}


PROBE_ROWS = 8


@torch.no_grad()
def probe_record(stage: Path, entries: dict[str, ModelEntry], data: Dataset) -> dict:
    """A few test rows and every model's output on them (from the staged ONNX files, in onnxruntime):
    the service re-runs them on load and refuses a bundle that no longer reproduces them."""
    import onnxruntime as ort

    X = np.ascontiguousarray(data.X_test[:PROBE_ROWS], dtype=np.float32)
    outputs = {}
    for name, e in entries.items():
        sess = ort.InferenceSession(str(stage / e.file), providers=["CPUExecutionProvider"])
        outputs[name] = sess.run(None, {"input": X})[0].tolist()
    return {"inputs": X.tolist(), "outputs": outputs}


QUANTIZABLE = ("merged", "distilled")


def quantize_variants(recipe: Recipe, variants: dict[str, ModelEntry], stage: Path, data: Dataset,
                      kinds: tuple[str, ...] = QUANTIZABLE) -> dict[str, ModelEntry]:
    """Add `<name>_int8` (kind "quantized") for each variant of `kinds` (merged/distilled; a composed image
    ensemble too, fusion/byo_pipeline.py) whose int8 file loses at most `quantize_max_loss_pp` validation
    accuracy points; the check is recorded on the source either way. Static (calibrated on the train split) or
    dynamic per file: fusion.quantize.choose_mode."""
    if not recipe.build.quantize or data.task != "classification":
        return variants
    import onnxruntime as ort

    from fusion.quantize import choose_mode, quantize_variant

    out = dict(variants)
    for name, e in variants.items():
        if e.kind not in kinds:
            continue
        q_name = f"{name}_int8"
        mode = choose_mode(stage / e.file, recipe.build.quantize, calibration=len(data.y_train) > 0)
        with timed(f"build: {q_name} quantized ({mode}) and checked"):
            check = quantize_variant(
                stage / e.file, stage / f"{q_name}.onnx", data, max_loss_pp=recipe.build.quantize_max_loss_pp, source=name,
                mode=mode,
            )
        out[name] = replace(e, method={**(e.method or {}), "int8": check.to_dict()})
        if check.accepted:
            how = ({"weights": "int8 per output channel", "activations": f"uint8, ranges calibrated once ({check.calibration})",
                    "format": "QDQ", "tool": f"onnxruntime.quantization.quantize_static ({ort.__version__})"}
                   if mode == "static" else
                   {"weights": "int8 per tensor", "activations": "uint8, quantized per call",
                    "tool": f"onnxruntime.quantization.quantize_dynamic ({ort.__version__})"})
            out[q_name] = ModelEntry(
                file=f"{q_name}.onnx", sha256="", kind="quantized",
                method={"name": f"{mode}_int8", "source": name, **how},
                metrics={"val_accuracy": check.val_accuracy, "test_accuracy": check.test_accuracy},
                n_parameters=e.n_parameters, parity=check.to_dict(), arch=e.arch,
            )
    return out


def add_comparison(recipe: Recipe, stage: Path, manifest: Manifest, data: Dataset) -> Manifest:
    """Run the comparison over every staged file, write comparison.{md,json,png} next to them, and
    return the manifest with the report (and the reports' sha256 under `artifacts`)."""
    from fusion.compare import CompareConfig, compare_models, write_report

    if data.task != "classification":
        log.warning("the comparison report is implemented for classification; skipped for %s", data.task)
        return manifest
    report = compare_models(stage, manifest, data, CompareConfig(rounds=recipe.build.compare_rounds))
    paths = write_report(report, stage)
    return replace(manifest, comparison={**report, "artifacts": {p.name: sha256_file(p) for p in paths.values()}})


def build_composed(recipe: Recipe) -> Manifest:
    """[[members]] with onnx: files (or with [[inputs]] and no [data]): one ensemble graph composed with
    onnx.compose (fusion/compose.py) from the files as they are and the torch members exported alone
    (dynamo, every named dimension dynamic), over the recipe's [[inputs]].

    No data set is used: the gate runs the composed graph against the members run separately on random
    inputs drawn from the spec, so weights are equal or given, and there is no merged, distilled or
    calibrated variant and no comparison (each skipped with a logged note)."""
    from fusion.byo_pipeline import compose_members
    from fusion.compose import write_onnx_bundle
    from fusion.text import check_text_parity, files_of

    if not recipe.inputs:
        raise ConfigError("[[members]] with onnx: sources expected [[inputs]] naming the bundle's inputs (the ONNX "
                          "files' inputs are matched against them); got none")
    e, names = recipe.ensemble, [m.name for m in recipe.members]
    if e.weights in ("select", "fit") or e.combiner == "stacking" or e.calibration != "none":
        raise ConfigError(f"a bundle with onnx: members (or no data set) is built without data; expected weights 'equal', a list or a "
                          f"table, an averaging or voting combiner and calibration 'none'; got weights {e.weights!r}, "
                          f"combiner {e.combiner!r}, calibration {e.calibration!r}")
    if e.weights == "auto":
        log.warning("weights 'auto' are chosen from data; this recipe has no [data] set: equal weights")
    skipped = [s for s, on in (("merged", bool(recipe.merge.method)), ("distilled", recipe.distill.enabled),
                               ("comparison", recipe.build.compare), ("int8", recipe.build.quantize)) if on]
    if skipped:
        log.warning("without a [data] set the bundle has the ensemble and its members only (these need data); "
                    "skipped: %s", ", ".join(skipped))
    weights = None if isinstance(e.weights, str) else member_weights(e.weights, names)
    combiner = make_combiner(e.combiner, len(names), weights, **e.params)
    inputs = [i.to_tensor_spec() for i in recipe.inputs]
    cm = compose_members(recipe, inputs)  # fusion/byo_pipeline.py: onnx: files as they are, torch members exported
    members, text_members, bundle_inputs, graph, text = cm.members, cm.text_members, cm.bundle_inputs, cm.graph, cm.text
    gate = None
    if text:  # the gate over every dynamic dimension (torch members against torch, onnx: files in onnxruntime)
        def gate(data: bytes) -> dict:
            return check_text_parity(data, text_members, combiner, graph, vocab=text[1], max_length=text[2],
                                     kinds=[m.output for m in recipe.members])
    with timed(f"build: {len(members)} members composed into one ONNX graph (onnx.compose, parity-checked)"):
        return write_onnx_bundle(recipe.build.out, members, combiner, graph, classes=recipe.data.classes or None,
                                 task=recipe.data.task, bundle_inputs=bundle_inputs if text else None,
                                 files=files_of(text), gate=gate)


def build_bundle(recipe: Recipe) -> Manifest:
    """Run the whole offline pipeline and write the bundle atomically to `recipe.build.out`.

    ensemble + members -> [merged] -> distilled -> int8 variants -> comparison report -> commit.
    With onnx: members, `build_composed` instead.
    """
    from fusion.sources import source_kind

    no_data = bool(recipe.inputs) and not recipe.data.source  # [[inputs]] and no [data]: nothing to fit or score on
    named_data = bool(recipe.inputs) and bool(recipe.data.source)  # [[inputs]] read from the [data] file: below
    if recipe.members and not named_data and (no_data or any(source_kind(m.source) == "onnx" for m in recipe.members)):
        return _refuse_reserved_names([m.name for m in recipe.members]) or build_composed(recipe)
    if recipe.inputs:  # named inputs read from the [data] file: the composed path with data (fusion/byo_pipeline.py)
        if not recipe.members:
            raise ConfigError("[[inputs]] expected [[members]] that take them; got no [[members]] (the [zoo] "
                              "directory's checkpoints take the data set's flat feature input)")
        from fusion.byo_pipeline import build_composed_with_data

        _refuse_reserved_names([m.name for m in recipe.members])
        return build_composed_with_data(recipe)
    data = load_data(recipe)
    members = ensure_zoo(recipe, data)
    with timed(f"build: ensemble of {len(members)} members ({recipe.ensemble.combiner}) combined"):
        fused, selection = choose_ensemble(recipe, members, data)
    with BundleWriter(recipe.build.out) as writer:
        stage = writer.stage
        with timed("build: ensemble exported (one ONNX graph, parity-checked)"):
            variants = {"ensemble": export_ensemble(fused, members, stage, data)}
        with timed(f"build: {len(members)} members exported"):
            member_entries = export_members(members, stage, data)
        # further variants go here, each as a helper that stages its files and returns its entries;
        # quantization and the comparison then cover whatever variants are present
        variants |= export_merged(recipe, stage, data)
        variants |= export_distilled(recipe, fused, stage, data)
        variants = quantize_variants(recipe, variants, stage, data)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, bundle_version="", created="", task=data.task,
            input=InputSpec(
                name="input", shape=(-1, data.n_features), dtype="float32",
                scaling=data.scaling.to_dict(), image_shape=data.image_shape,
            ),
            output_name=OUTPUT_NAME, classes=data.classes,
            variants=variants, members=member_entries, dataset=data.describe(),
            probe=probe_record(stage, {**variants, **member_entries}, data),
            ensemble_selection=selection,
        )
        if recipe.build.compare:
            with timed("build: comparison report written"):
                manifest = add_comparison(recipe, stage, manifest, data)
        return writer.commit(manifest)
