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

Text inputs: the `.npz` holds one numpy unicode string per row (dtype '<U…'); every split is tokenized as the
service tokenizes a request (`graph_view`, fusion.text.encode) and the members are scored, the weights chosen
and the student trained on those feeds; the composed graph passes the text gate (every batch and sequence
length) and the bundle records a probe of fixed strings (fusion.text.text_probe).

Distillation: with one float input, distill.py's augmented flat rows (`export_distilled`); with text or
several inputs, `[distill] source` is trained on the composed graph's probabilities over the train split's
feeds (`export_distilled_named`, no augmentation), exported with the dynamo exporter and gated at batch
1/2/7 (and sequence 1/7/max_length). int8 variants are built for merged/distilled only on the flat path: skipped
here with a note.

Merged variant (issue 16): `[merge] members` names [[members]] of one architecture (same class, keys and shapes;
not onnx:, whose weights are no state dict), merged by `method`/`params`/`weights` onto `base` (a member, a
.safetensors file or an HF directory); or `[merge] config` names a mergekit YAML over HF directories. The merged
module is exported as the members are (fusion.compose.torch_member) and gated against torch like the distilled
student; members of different architectures give a note and no merged variant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class ComposedMembers:
    """A recipe's [[members]] ready for fusion.compose, and the inputs they make."""

    members: list  # OnnxMembers (torch members exported alone), an image input's normalisation in front
    text_members: list  # (name, torch module or None for onnx:, OnnxMember): the text gate's members
    bundle_inputs: list  # the manifest's TensorSpecs (a text input with its graph_inputs)
    graph: list  # the composed graph's TensorSpecs (a text input replaced by its int64 feeds)
    text: tuple | None  # (tokenizer.json path, vocabulary size, max_length) of the text input, or None


def compose_members(recipe: Recipe, inputs) -> ComposedMembers:
    """Every `[[members]]` table as an OnnxMember over the bundle's graph inputs: onnx: files as they are
    (`fixed_batch` kept), torch members exported alone (dynamo); with a text input each member takes the text
    feeds its forward (or its file) names (fusion/text.py); image inputs normalised in front of every member."""
    from fusion.compose import OnnxMember, torch_member
    from fusion.sources import load_member, source_kind, split_source
    from fusion.text import check_member, graph_specs, member_inputs, onnx_inputs, tokenizer_file

    text = tokenizer_file(recipe.inputs)  # a text input: its graph feeds are input_ids, attention_mask[, token_type_ids]
    loaded = {s.name: load_member(s).module for s in recipe.members if source_kind(s.source) != "onnx"}
    taken = [member_inputs(loaded[s.name]) if s.name in loaded else onnx_inputs(s.name, split_source(s.source)[1])
             for s in recipe.members] if text else []
    bundle_inputs, graph = graph_specs(inputs, taken)
    members, text_members = [], []
    for section in recipe.members:
        kw = {"input_map": dict(section.input_map), "output": section.output, "output_name": section.output_name}
        if source_kind(section.source) == "onnx":
            kw["fixed_batch"] = section.fixed_batch  # "one_row": run one row at a time (fusion/compose.py)
            if text and not kw["input_map"]:  # a foreign text model takes the text feeds by their names
                kw["input_map"] = {n: n for n in onnx_inputs(section.name, split_source(section.source)[1])}
            members.append(OnnxMember.load(section.name, split_source(section.source)[1], **kw))
            if text:
                text_members.append((section.name, None, members[-1]))
            continue
        module = loaded[section.name]
        if text:  # the member takes the text feeds its forward accepts, by name (hf: without token_type_ids too)
            check_member(section.name, module, text[1], text[2])
            own = member_inputs(module)
            specs = [next(g for g in graph if g.name == n) for n in own]
            om = torch_member(section.name, module, specs, output=section.output)
            om = replace(om, input_map=dict(section.input_map) or {n: n for n in own})
            text_members.append((section.name, module, om))
        else:
            om = torch_member(section.name, module, inputs, output=section.output)
        members.append(om)
    if any(s.kind == "image" for s in graph):  # (x * scale - mean) / std in front of every member an image feeds,
        from fusion.imagenorm import normalize_member  # so they are scored, composed and served on raw pixels

        members = [normalize_member(m, graph) for m in members]
    return ComposedMembers(members, text_members, list(bundle_inputs), list(graph), text)


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


class FlatRows(nn.Module):
    """A flat-row student (fusion/zoo.py's mlp and cnn) over rows of any shape (B, *shape): the distilled file
    takes the bundle's input in its own shape."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.flatten(1))  # not reshape(len(x), -1): an exported graph would fix the batch


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
        if len(shape) > 1:  # distill.py works on flat rows; the teacher takes the input's own shape
            teacher = Reshaped(teacher, shape)
        if cfg.source:  # a torch source over the input's own shape, on normalised pixels for an image
            student = resolve(cfg.source, dict(cfg.args))
            if not isinstance(student, nn.Module):
                raise ConfigError(f"[distill] source expected a torch module; got {type(student).__name__}")
            scaler = getattr(student, "scaler", None)  # fusion/zoo.py's students standardise their input inside
            if scaler is not None and tuple(getattr(scaler, "mean", torch.empty(0)).shape) == (flat.n_features,):
                with torch.no_grad():
                    init_scaler(student, flat.scaling)
            consts = image_constants(inputs[0])
            if consts is not None:  # raw pixels in, like every member's graph: the recipe's normalisation inside the student
                student = ImageNormalized(student, *consts)
            trained = Reshaped(student, shape) if len(shape) > 1 else student
        else:  # fusion/zoo.py's mlp or cnn: flat rows, standardised by its own scaler (fitted on the raw train split)
            image_shape = tuple(int(d) for d in shape) if len(shape) == 3 else flat.image_shape
            student = trained = FlatRows(make_student(replace(flat, image_shape=image_shape), cfg))
        trained, history = distill(teacher, flat, cfg, student=trained)
        wrapped = Probabilities(student).eval()
        parity = export_onnx(wrapped, stage / "distilled.onnx", np.ascontiguousarray(X_test, dtype=np.float32))
        probs = {s: _predict(wrapped, getattr(data, f"X_{s}")[name]) for s in ("val", "test")}
    arch = ({"arch": cfg.source, "args": dict(cfg.args), "seed": cfg.seed} if cfg.source
            else {"arch": cfg.arch, "args": student_args(replace(flat, image_shape=image_shape), cfg), "seed": cfg.seed})
    return {"distilled": ModelEntry(
        file="distilled.onnx", sha256="", kind="distilled",
        method={**method_record(cfg, history), "teacher_runtime": "onnxruntime (the composed ensemble graph)"},
        metrics=_accuracy(probs["val"], probs["test"], data), n_parameters=count_parameters(student),
        parity=parity.to_dict(), arch=arch,
    )}


def student_inputs(student: nn.Module, graph) -> tuple[str, ...]:
    """The graph feeds a named-input student takes, in its forward's order: its `input_names` (the hf: wrapper's;
    a python: factory's module may set one), else every graph input in the bundle's order."""
    names = tuple(getattr(student, "input_names", ()) or ()) or tuple(s.name for s in graph)
    unknown = [n for n in names if n not in {s.name for s in graph}]
    if unknown:
        raise ConfigError(f"[distill] source: the student takes {list(names)}; expected some of the graph's inputs "
                          f"{[s.name for s in graph]}; got {unknown} that are not")
    return names


def gate_student(model, module: nn.Module, specs, text: tuple | None, atol: float = 1e-5, seed: int = 5,
                 what: str = "the distilled student") -> dict:
    """The distilled file against its torch module at batch 1/2/7 and, with a text input, sequence lengths 1/7/
    max_length (token ids below the vocabulary, padded rows); other named dimensions at their probe size."""
    from fusion.compose import random_feeds, session
    from fusion.text import BATCHES, GRAPH_INPUTS, sequence_lengths, token_feeds

    sess, rng = session(model), np.random.default_rng(seed)
    tokens = [s.name for s in specs if text and s.name in GRAPH_INPUTS]
    others = {s.name: s for s in specs if s.name not in tokens}
    worst, cases = 0.0, []
    for length in (sequence_lengths(text[2]) if tokens else (None,)):
        for b in BATCHES:
            feeds = {**(token_feeds(tokens, b, length, text[1], rng) if tokens else {}), **random_feeds(others, b, rng)}
            got = sess.run(None, {s.name: feeds[s.name] for s in specs})[0]
            with torch.no_grad():
                want = module(*(torch.from_numpy(feeds[s.name]) for s in specs)).numpy()
            worst = max(worst, float(np.abs(got - want).max()))
            cases.append([b, length] if tokens else [b])
    if not worst <= atol:
        from fusion.errors import ExportError

        raise ExportError(f"{what}'s ONNX export differs from torch by {worst:.3g} (allowed {atol:g}) "
                          f"over batch{' x sequence' if tokens else ''} {cases}: an export that fixed a dimension")
    return {"cases": cases, "max_abs_diff": worst, "atol": atol, "exporter": "torch.onnx.export(dynamo=True)",
            "reference": "the student in torch on the same feeds"}


def export_distilled_named(recipe: Recipe, stage: Path, data: Dataset, feeds: Dataset, cm: "ComposedMembers") -> dict:
    """The `distilled` variant of a bundle of text or several named inputs: the student (`[distill] source`)
    trained on the composed graph's probabilities (onnxruntime) over the train split's graph feeds
    (fusion.distill.distill_named), exported with the dynamo exporter over the feeds it takes (every named
    dimension dynamic) and gated at every batch and sequence length ({} with a logged note when skipped)."""
    from fusion.bundle import ModelEntry
    from fusion.compose import torch_member
    from fusion.distill import NamedStudent, distill_named, method_record
    from fusion.export import count_parameters
    from fusion.sources import resolve
    from fusion.text import GRAPH_INPUTS

    cfg = recipe.distill
    if not cfg.source:
        log.warning("distilled variant skipped: a bundle of text or several named inputs distils into a student "
                    "given by [distill] source (a torch source whose forward takes the graph's inputs %s); got none",
                    [s.name for s in cm.graph])
        return {}
    if any(s.kind == "image" for s in cm.graph):
        log.warning("distilled variant skipped: distilling several inputs with an image among them is not supported "
                    "(one image input is: the flat path); got %s", [f"{s.name} ({s.kind})" for s in cm.graph])
        return {}
    with timed("build: distilled variant exported (teacher: the composed graph in onnxruntime)"):
        student = resolve(cfg.source, dict(cfg.args))
        if not isinstance(student, nn.Module):
            raise ConfigError(f"[distill] source expected a torch module; got {type(student).__name__}")
        names = student_inputs(student, cm.graph)
        teacher = {s: _run_file(stage / "ensemble.onnx", getattr(feeds, f"X_{s}")) for s in ("train", "val")}
        trim = tuple(n for n in names if cm.text and n in GRAPH_INPUTS)
        trained, history = distill_named(student, names, feeds.X_train, teacher["train"], data.y_train, feeds.X_val,
                                         teacher["val"], data.y_val, cfg, trim=trim)
        wrapped = NamedStudent(trained, names).eval()
        specs = [next(g for g in cm.graph if g.name == n) for n in names]
        om = torch_member("distilled", wrapped, specs, output="probabilities")
        parity = gate_student(om.model, wrapped, specs, cm.text)
        (stage / "distilled.onnx").write_bytes(om.model.SerializeToString())
        probs = {s: _run_file(stage / "distilled.onnx", getattr(feeds, f"X_{s}")) for s in ("val", "test")}
    return {"distilled": ModelEntry(
        file="distilled.onnx", sha256="", kind="distilled",
        method={**method_record(cfg, history), "teacher_runtime": "onnxruntime (the composed ensemble graph)",
                "augment": [], "copies": 0, "transfer_set": "the train split's rows as they are (named inputs)"},
        metrics=_accuracy(probs["val"], probs["test"], data), n_parameters=count_parameters(trained),
        parity=parity, arch={"arch": cfg.source, "args": dict(cfg.args), "seed": cfg.seed, "inputs": list(names)},
    )}


def merge_requested(recipe: Recipe) -> bool:
    """Whether `[merge]` names BYO members (or a mergekit config) to merge: the default `method = "linear"`
    with no `members` merges nothing on this path."""
    return bool(recipe.merge.method or recipe.merge.config) and bool(recipe.merge.members or recipe.merge.config)


def _layout(module: nn.Module) -> dict:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}


def _class_name(module: nn.Module) -> str:
    """The architecture's class: the transformers model inside an hf: wrapper, else the module's."""
    return type(getattr(module, "model", module)).__name__


def architecture_difference(named: Sequence[tuple[str, nn.Module]]) -> str:
    """"" when every module has the first's class and state-dict layout (keys, shapes, dtypes), else what differs."""
    (ref_name, ref), ref_layout = named[0], _layout(named[0][1])
    for name, module in named[1:]:
        if _class_name(module) != _class_name(ref):
            return f"'{ref_name}' is {_class_name(ref)}, '{name}' is {_class_name(module)}"
        layout = _layout(module)
        if layout != ref_layout:
            missing, extra = sorted(set(ref_layout) - set(layout)), sorted(set(layout) - set(ref_layout))
            shapes = [f"{k}: {ref_layout[k][0]} vs {layout[k][0]}" for k in ref_layout
                      if k in layout and layout[k] != ref_layout[k]]
            return (f"'{name}' differs from '{ref_name}': {len(missing)} missing {missing[:3]}, {len(extra)} extra "
                    f"{extra[:3]}, {len(shapes)} other shapes/dtypes {shapes[:3]}")
    return ""


def _base_module(recipe: Recipe, template: nn.Module, first_source: str) -> nn.Module | None:
    """`[merge] base`: a [[members]] name, a Hugging Face directory (hf: members) or a .safetensors file loaded
    into a copy of the first member (strict keys); None when empty."""
    import copy

    from fusion.sources import load_member, load_weights, resolve, split_source

    base = recipe.merge.base
    if not base:
        return None
    by_name = {m.name: m for m in recipe.members}
    if base in by_name:
        return load_member(by_name[base]).module
    path = Path(base)
    if path.is_dir():
        if split_source(first_source)[0] != "hf":
            raise ConfigError(f"[merge].base expected a member name or a .safetensors file for {first_source!r} members "
                              f"(a directory is read as a Hugging Face model); got the directory {base!r}")
        return resolve(f"hf:{base}")
    if not path.is_file():
        raise ConfigError(f"[merge].base expected a [[members]] name {sorted(by_name)}, a .safetensors file or a Hugging "
                          f"Face directory; got {base!r}, which is none of them")
    module = copy.deepcopy(template)
    load_weights(getattr(module, "model", module) if split_source(first_source)[0] == "hf" else module, path,
                 what="[merge].base")
    return module.eval()


def merged_members(recipe: Recipe) -> tuple[nn.Module, dict] | None:
    """The merged torch module of `[merge]` and its method record, or None (a logged note) when the named
    members cannot be merged: an onnx: member (no weights to merge), different architectures, a data-aware method."""
    import copy
    import tempfile

    from fusion.merge import data_methods, merge
    from fusion.sources import load_member, resolve, source_kind

    cfg = recipe.merge
    if cfg.config:  # a mergekit YAML over HF directories, merged as `fusion merge --config` merges it
        from fusion.merge.mergekit_config import load_config, run_plan

        plan = load_config(cfg.config)
        with tempfile.TemporaryDirectory(prefix="fusion-merged-") as tmp:
            summary = run_plan(plan, tmp)
            module = resolve(f"hf:{tmp}")
        return module, {"method": plan.method, "config": cfg.config, "source": "mergekit YAML",
                        "models": [str(m.path) for m in plan.models], "base": summary["base"],
                        "parameters": {k: v for k, v in dict(plan.parameters).items()}}
    by_name = {m.name: m for m in recipe.members}
    unknown = [n for n in cfg.members if n not in by_name]
    if unknown:
        raise ConfigError(f"[merge].members expected names of [[members]] {sorted(by_name)}; got {unknown}")
    sections = [by_name[n] for n in cfg.members]
    onnx_ = [s.name for s in sections if source_kind(s.source) == "onnx"]
    if onnx_:
        log.warning("merged variant skipped: [merge] members %s are onnx: files (their weights are not a torch state "
                    "dict to merge); merge members of one torch architecture", onnx_)
        return None
    if cfg.method in data_methods():
        log.warning("merged variant skipped: [merge] method '%s' needs activation statistics, which this build does not "
                    "collect over named inputs; use a weight-only method (linear, ties, task_arithmetic...)", cfg.method)
        return None
    modules = [(s.name, load_member(s).module) for s in sections]
    base = _base_module(recipe, modules[0][1], sections[0].source)
    differ = architecture_difference(modules + ([("[merge].base", base)] if base is not None else []))
    if differ:
        log.warning("merged variant skipped: [merge] members expected one architecture (same class, keys and shapes); "
                    "%s", differ)
        return None
    if len({(tuple(sorted(s.input_map.items())), s.output) for s in sections}) > 1:
        log.warning("merged variant skipped: [merge] members expected the same input_map and output; got %s",
                    {s.name: (dict(s.input_map), s.output) for s in sections})
        return None
    merged = merge(cfg.method, [m.state_dict() for _, m in modules], base=None if base is None else base.state_dict(),
                   weights=cfg.weights or None, **dict(cfg.params))
    module = copy.deepcopy(modules[0][1])
    module.load_state_dict(merged)
    return module.eval(), {"method": cfg.method, "members": list(cfg.members), "base": cfg.base or None,
                           "weights": list(cfg.weights) or None, "params": dict(cfg.params)}


class _MergedProbabilities(nn.Module):
    """A merged member as served: forward(*feeds) in its inputs' order -> softmax of its logits (identity for
    regression, or when the members already answer probabilities)."""

    def __init__(self, inner: nn.Module, softmax: bool):
        super().__init__()
        self.inner, self.softmax = inner, softmax

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.inner(*inputs)
        return torch.softmax(out, -1) if self.softmax else out


def export_merged_members(recipe: Recipe, stage: Path, data: Dataset, feeds: Dataset, cm: "ComposedMembers") -> dict:
    """The `merged` variant of a BYO bundle ({} with a logged note when skipped): the `[merge]` members' weights
    merged (fusion.merge, or a mergekit YAML), exported with the members' exporter (fusion.compose.torch_member,
    dynamo, every named dimension dynamic), gated against the merged module in torch at batch 1/2/7 (and sequence
    1/7/max_length for text), scored on the build's splits."""
    from fusion.bundle import ModelEntry
    from fusion.compose import torch_member
    from fusion.export import count_parameters
    from fusion.text import member_inputs

    if any(s.kind == "image" for s in cm.graph):
        log.warning("merged variant skipped: merging members over an image input (normalised in front of each member's "
                    "graph) is not supported yet; got %s", [f"{s.name} ({s.kind})" for s in cm.graph])
        return {}
    cfg = recipe.merge
    with timed(f"build: merged variant ({'mergekit config ' + cfg.config if cfg.config else cfg.method}) exported"):
        made = merged_members(recipe)
        if made is None:
            return {}
        module, record = made
        first = next((m for m in recipe.members if m.name in cfg.members), recipe.members[0])
        if cm.text:
            names = member_inputs(module)
        elif first.input_map:
            names = tuple(first.input_map.values())
        else:
            names = tuple(s.name for s in cm.graph)
        specs = [next(g for g in cm.graph if g.name == n) for n in names]
        wrapped = _MergedProbabilities(module, data.task == "classification" and first.output == "logits").eval()
        om = torch_member("merged", wrapped, specs, output="probabilities")
        parity = gate_student(om.model, wrapped, specs, cm.text, what="the merged variant")
        parity["reference"] = "the merged module in torch on the same feeds"
        (stage / "merged.onnx").write_bytes(om.model.SerializeToString())
        probs = {s: _run_file(stage / "merged.onnx", getattr(feeds, f"X_{s}")) for s in ("val", "test")}
    metrics = _accuracy(probs["val"], probs["test"], data) if data.task == "classification" else {}
    return {"merged": ModelEntry(
        file="merged.onnx", sha256="", kind="merged", method=record, metrics=metrics,
        n_parameters=count_parameters(module), parity=parity,
        arch={"arch": _class_name(module), "source": first.source if not cfg.config else "mergekit YAML",
              "inputs": list(names)},
    )}


@torch.no_grad()
def _predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()


def graph_view(data: Dataset, cm: ComposedMembers) -> Dataset:
    """The data set as the composed graph's feeds: a text input's strings tokenized as the service tokenizes a
    request (fusion.text.encode; each split padded to its longest row, which the graph masks); others as they are."""
    if cm.text is None:
        return data
    from fusion.text import encode, service_tokenizer

    spec = next(s for s in cm.bundle_inputs if s.kind == "text")
    tok, pad = service_tokenizer(cm.text[0], cm.text[2])

    def feeds(X: dict) -> dict:
        rest = {k: v for k, v in X.items() if k != spec.name}
        return {**encode(tok, pad, X[spec.name].tolist(), spec.text["graph_inputs"]), **rest}

    return replace(data, X_train=feeds(data.X_train), X_val=feeds(data.X_val), X_test=feeds(data.X_test))


def build_composed_with_data(recipe: Recipe):
    """`fusion build` for [[members]] over [[inputs]] read from `[data] source` (a .npz): see the module docstring."""
    from fusion.build import add_comparison
    from fusion.compose import prepare_members, write_onnx_bundle
    from fusion.text import check_text_parity, files_of

    if not recipe.data.source.lower().endswith(".npz"):
        raise ConfigError(f"[data].source with [[inputs]] expected a .npz file (one array per input name, plus 'y'); "
                          f"got {recipe.data.source!r}")
    data = load_data(recipe)
    inputs = [i.to_tensor_spec() for i in recipe.inputs]
    names = [m.name for m in recipe.members]
    skipped = [s for s, on in (("merged", bool(recipe.merge.method) and not merge_requested(recipe)),
                               ("int8", bool(recipe.build.quantize) and any(i.kind == "text" for i in recipe.inputs))) if on]
    if skipped:
        log.warning("a bundle of named inputs composes its members' graphs (merged: only the members [merge] members "
                    "names, or a [merge] config; int8: not for text inputs on this path); skipped: %s",
                    ", ".join(skipped))
    cm = compose_members(recipe, inputs)
    members, graph = cm.members, cm.graph
    feeds = graph_view(data, cm)  # the graph's feeds (text tokenized); `data` keeps what a client sends
    with timed(f"build: {len(members)} members checked and scored in onnxruntime"):
        prepared = prepare_members(members, graph)
        raw_val, raw_test = scores(prepared, feeds.X_val), scores(prepared, feeds.X_test)
    with timed(f"build: ensemble of {len(members)} members ({recipe.ensemble.combiner}) chosen on validation"):
        combiner, temps, selection = choose(recipe, names, raw_val, raw_test, data)
    gate = None
    if cm.text:  # every dynamic dimension: batch 1/2/7 x sequence 1/7/max_length (fusion/text.py)
        def gate(composed: bytes) -> dict:
            return check_text_parity(composed, cm.text_members, combiner, graph, vocab=cm.text[1], max_length=cm.text[2],
                                     kinds=[m.output for m in recipe.members], temperatures=temps)

    def finish(stage: Path, manifest):
        ens = manifest.variants["ensemble"]
        probs = {s: _run_file(stage / ens.file, getattr(feeds, f"X_{s}")) for s in ("val", "test")}
        method = dict(ens.method or {})
        if temps is not None:
            method["fit_on"] = "validation"
        classify = data.task == "classification"  # accuracy is the figure recorded (regression: none yet)
        variants = {"ensemble": replace(ens, metrics=_accuracy(probs["val"], probs["test"], data) if classify else {},
                                        method=method)}
        members_out = {n: replace(e, metrics=_accuracy(raw_val[i], raw_test[i], data)) if classify else e
                       for i, (n, e) in enumerate(manifest.members.items())}
        if merge_requested(recipe):  # [merge] members (one architecture) or a mergekit config: the merged variant
            variants |= export_merged_members(recipe, stage, data, feeds, cm)
        if data.task == "classification" and recipe.distill.enabled:
            flat = flat_view(data) is not None  # one float input: the augmented flat path; else the named one
            variants |= (export_distilled(recipe, stage, data, inputs) if flat
                         else export_distilled_named(recipe, stage, data, feeds, cm))
        if recipe.build.quantize and not cm.text:  # issue 18: the composed graph too (static int8 when it has convs)
            from fusion.build import QUANTIZABLE, quantize_variants

            variants = quantize_variants(recipe, variants, stage, feeds, kinds=("ensemble", *QUANTIZABLE))
        manifest = replace(manifest, variants=variants, members=members_out, ensemble_selection=selection)
        if recipe.build.compare and data.task == "classification":
            with timed("build: comparison report written"):  # text: fusion/compare.py tokenizes with the staged tokenizer
                manifest = add_comparison(recipe, stage, manifest, data)
        return manifest

    dataset = {**data.describe(), "source": recipe.data.source}
    with timed(f"build: {len(members)} members composed into one ONNX graph (onnx.compose, parity-checked)"):
        return write_onnx_bundle(recipe.build.out, members, combiner, graph, classes=data.classes,
                                 task=data.task, temperatures=temps, dataset=dataset, prepared=prepared,
                                 finish=finish, bundle_inputs=cm.bundle_inputs if cm.text else None,
                                 files=files_of(cm.text), gate=gate)
