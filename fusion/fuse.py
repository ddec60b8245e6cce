"""File-level fusion operations behind `fusion merge`, `fusion align`, `fusion barrier` and the bundle's
`merged` variant: safetensors in, safetensors (and JSON, PNG) out; the algorithms live in merge/,
align/ and connectivity.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fusion.data import Dataset
from fusion.errors import ConfigError
from fusion.zoo import MemberSpec, build_model, evaluate, save_member

def refuse_onnx_members(members: Sequence, what: str) -> None:
    """Raise ConfigError when any member is ONNX-only: merging and alignment need its weights as
    tensors of a known architecture, and a composed ONNX file (fusion/compose.py) has neither.

    members: names with sources (`("name", "onnx:PATH")` pairs, objects with `.name`/`.source`), or
    checkpoint paths (a `.onnx` path is ONNX). The recipe's [merge] and align steps call this first."""
    found = []
    for m in members:
        name, source = (m if isinstance(m, (tuple, list)) else
                        (getattr(m, "name", m), getattr(m, "source", m)))
        if (str(source).startswith("onnx:") or str(source).lower().endswith(".onnx")) and str(name) not in found:
            found.append(str(name))
    if found:
        raise ConfigError(
            f"{what}: expected members with weights (safetensors of a torch architecture); got ONNX-only member(s) "
            f"{found}: an ONNX file has no weights to merge or align (it is composed into the ensemble graph "
            "instead); leave it out of this step, or use the distilled variant to get one model"
        )


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    refuse_onnx_members([(path.name, path)], "merge/align")
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        return load_file(str(path))  # safetensors only: never unpickles
    except Exception as exc:  # noqa: BLE001 - the library's own error types vary by version
        raise ConfigError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def read_spec(path: str | Path, arch: str | None = None) -> MemberSpec:
    """The JSON spec next to a checkpoint; without one, `arch` with its default arguments."""
    spec_path = Path(path).with_suffix(".json")
    if spec_path.is_file():
        spec = MemberSpec.from_json(spec_path.read_text())
        if arch and spec.arch != arch:
            raise ConfigError(f"{path}: --arch {arch} given, but its spec says '{spec.arch}'")
        return spec
    if not arch:
        raise ConfigError(f"{path}: no {spec_path.name} next to it; pass --arch")
    return MemberSpec(name=Path(path).stem, arch=arch, args={}, seed=-1)


def module_for(spec: MemberSpec, state: dict | None = None) -> nn.Module:
    model = build_model(spec.arch, **spec.args)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def parse_params(items: Sequence[str] | None) -> dict:
    """`["density=0.2", "scope=global", "seed=3"]` -> {"density": 0.2, "scope": "global", "seed": 3}."""
    params = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param expected key=value; got '{item}'")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw  # a bare word: a string option such as scope=global
    return params


def _member_module(template: nn.Module, state: dict) -> tuple[nn.Module, str]:
    """A copy of `template` holding `state`, and the key prefix its state dict adds to `state`'s keys
    ("model." for fusion.sources' Hugging Face wrapper loaded with the transformers model's own keys)."""
    import copy

    from fusion.sources import check_state_dict, complete_tied

    model = copy.deepcopy(template)
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "input_names"):
        inner_state = inner.state_dict()
        full = complete_tied(inner_state, state)
        if set(full) == set(inner_state):
            inner.load_state_dict(full)
            return model.eval(), "model."
    expected = model.state_dict()
    state = complete_tied(expected, state)
    check_state_dict(expected, state, "merge member")
    model.load_state_dict(state)
    return model.eval(), ""


def _under_saved_names(stats: dict, saved: dict, module_state: dict, prefix: str) -> dict:
    """Statistics keyed as the member's file keys them. A tied weight's statistic comes under one of its names
    (its first owner's, as `named_parameters` gives it); the file may keep it under another name
    (save_pretrained keeps one) or under all of them (`fusion convert-weights` clones shared storage per
    name): every name the file keeps gets it, so no copy of the tensor is merged without it."""
    from fusion.sources import tied_groups

    out = dict(stats)
    for names in tied_groups(module_state):
        names = [n[len(prefix):] for n in names if n.startswith(prefix)]
        found = [n for n in names if n in stats]
        if len(found) > 1:
            raise ConfigError(f"tied weights {names}: expected one statistic for the one tensor; got one under each of {found}")
        if found:
            value = out.pop(found[0])
            out.update({n: value for n in names if n in saved} or {found[0]: value})
    return out


def data_inputs(method: str, models: list[dict], spec: MemberSpec | nn.Module, data: Dataset) -> dict:
    """What data-aware methods need besides the weights: Fisher diagonals, Gram matrices or a scorer.

    spec: a zoo MemberSpec, or any module of the members' architecture (a resolved member source:
    timm, torchvision, Hugging Face, python:), whose copy takes each member's weights. Fisher and
    RegMean hook every layer of it and run on the train split (`data.X_train`: features, or named
    inputs such as input_ids/attention_mask).
    """
    from fusion.merge import diagonal_fisher, regmean_grams

    X = data.X_train if data.named else torch.from_numpy(data.X_train)
    if method in ("fisher", "regmean"):
        estimate = diagonal_fisher if method == "fisher" else regmean_grams
        out = []
        for sd in models:
            model, prefix = _member_module(spec, sd) if isinstance(spec, nn.Module) else (module_for(spec, sd), "")
            stats = {k[len(prefix):]: v for k, v in estimate(model, X).items() if k.startswith(prefix)}
            out.append(_under_saved_names(stats, sd, model.state_dict(), prefix))
        return {"fishers" if method == "fisher" else "grams": out}
    if method == "greedy_soup":
        def score(sd):  # held-out accuracy on the validation split
            return evaluate(finish_state(module_for(spec, sd), data), data)["val_accuracy"]

        return {"score": score}
    return {}


def finish_state(model: nn.Module, data: Dataset) -> nn.Module:
    """Recompute BatchNorm statistics on the train split after a merge (merged running stats are wrong)."""
    from fusion.merge import has_batchnorm, reset_bn

    if has_batchnorm(model):
        reset_bn(model, torch.from_numpy(data.X_train))
    return model.eval()


def has_spec(path: str | Path) -> bool:
    """A zoo checkpoint: a file with its `<name>.json` MemberSpec next to it (architecture and metrics)."""
    path = Path(path)
    return path.is_file() and path.with_suffix(".json").is_file()


def merge_checkpoints(
    method: str, paths: Sequence[str | Path], out: str | Path, *, base: str | Path | None = None,
    weights: Sequence[float] | None = None, params: dict | None = None, arch: str | None = None,
    data: Dataset | None = None, dtype: str | None = None, max_shard_size: int | str | None = None,
) -> dict:
    """Merge checkpoints into `out`.

    With a model source (a `<name>.json` spec next to the first checkpoint, or `arch`): safetensors
    in, `out` .safetensors + its JSON spec with metrics when data is given; streams tensor by tensor
    when the method allows it and no BatchNorm statistics need recomputing, else merges in memory.

    Without one (any safetensors files of identical keys and shapes, or Hugging Face directories):
    architecture-free, weight-only methods streamed by `merge_files`; `out` is one file when it ends
    in .safetensors, else a directory of shards (at most `max_shard_size`, default 5GB) + index +
    the base's (else the first model's) config and tokenizer files. No metrics, no BatchNorm
    recomputation: nothing knows how to run the model. `dtype`: float32 / bfloat16 / float16 output.
    """
    from fusion.merge import get_merge, merge, merge_files, streamable_methods

    params = dict(params or {})
    refuse_onnx_members([(Path(p).name, p) for p in [*paths, *([base] if base else [])]], "merge")
    needs_data = get_merge(method).needs_data  # an unknown name: UnknownNameError listing the registry's names
    if len(paths) < 1:
        raise ConfigError("expected at least one --models checkpoint; got none")
    out = Path(out)
    inputs = [*paths, *([base] if base else [])]
    if any(Path(p).is_dir() for p in inputs) or (not arch and not has_spec(paths[0])):
        if arch:
            raise ConfigError(f"--arch {arch}: expected .safetensors checkpoints for a zoo architecture; got a directory among {[str(p) for p in inputs]}")
        if needs_data or method not in streamable_methods():
            raise ConfigError(
                f"merge method '{method}' needs a model to run on data; expected a {Path(paths[0]).with_suffix('.json').name} "
                f"spec next to {paths[0]} or --arch; got neither (weight-only methods need none: {streamable_methods()})"
            )
        summary = merge_files(method, paths, out, base_path=base, weights=weights, out_dtype=dtype,
                              max_shard_bytes=max_shard_size, **params)
        return {**summary, "streamed": True, "arch_free": True, "out": str(out), "metrics": {},
                "params": dict(params), "inputs": [str(p) for p in paths], "base": str(base) if base else None}
    spec = read_spec(paths[0], arch)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out expected a .safetensors path; got '{out}'")
    if max_shard_size is not None:
        raise ConfigError(f"--max-shard-size applies to a directory output; got --out '{out}' for a zoo checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    if needs_data and data is None:
        raise ConfigError(f"merge method '{method}' needs data (--data digits or a file)")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module_for(spec).modules())
    if method in streamable_methods() and not needs_data and not (has_bn and data is not None):
        summary = merge_files(method, paths, out, base_path=base, weights=weights, out_dtype=dtype, **params)
        streamed = True
        model = module_for(spec, read_state(out)) if data is not None else None
    else:
        if dtype is not None:
            raise ConfigError(f"--dtype applies to streamed merges; got '{method}' merged in memory (data-aware, or BatchNorm to recompute)")
        states = [read_state(p) for p in paths]
        base_sd = read_state(base) if base is not None else None
        extra = data_inputs(method, states, spec, data) if needs_data else {}
        merged = merge(method, states, base=base_sd, weights=weights, **params, **extra)
        model = module_for(spec, merged)
        if data is not None:
            finish_state(model, data)
        streamed, summary = False, {"method": method, "entries": len(merged)}
    metrics = evaluate(model, data) if (model is not None and data is not None) else {}
    out_spec = replace(spec, name=out.stem, metrics=metrics, scenario="merged", parent=None)
    if streamed:  # merge_files wrote the weights; add the spec next to them
        out.with_suffix(".json").write_text(out_spec.to_json())
    else:
        save_member(model, out_spec, out.parent)
    return {**summary, "streamed": streamed, "arch_free": False, "out": str(out), "metrics": metrics,
            "params": {k: v for k, v in params.items()}, "inputs": [str(p) for p in paths],
            "base": str(base) if base else None}


def align_checkpoints(
    method: str, reference: str | Path, paths: Sequence[str | Path], out_dir: str | Path, *,
    arch: str | None = None, data: Dataset | None = None, seed: int = 0,
    source: str | None = None, source_args: dict | None = None, input_shape: Sequence[int] | None = None,
) -> list[dict]:
    """Permute each checkpoint into the reference's basis (Git Re-Basin); writes `<out_dir>/<name>.safetensors`.

    Zoo checkpoints (a `<name>.json` spec next to them, or `arch`) use the hand-written permutation
    spec of fusion/align/spec.py. Any other architecture names its member `source` (`timm:resnet10t`,
    `torchvision:resnet18`, `python:pkg.mod:factory`, with `source_args`, as in a recipe's [[members]]):
    its spec is derived from a torch.fx trace (fusion/align/fx_spec.py); transformers are refused.
    """
    from fusion.align import align_to_reference, spec_for

    kind = {"weight_matching": "weight", "activation_matching": "activation"}.get(method)
    if kind is None:
        raise ConfigError(f"expected --method weight_matching or activation_matching; got '{method}'")
    refuse_onnx_members([(Path(p).name, p) for p in [reference, *paths]], "align")
    check_align_outputs(paths, out_dir)
    if source is not None:
        if arch:
            raise ConfigError(f"expected either --arch (a zoo architecture) or --source; got both ({arch!r}, {source!r})")
        return _align_source(kind, reference, paths, out_dir, source, dict(source_args or {}), data, seed, input_shape)
    if arch is None and not Path(reference).with_suffix(".json").is_file():
        raise ConfigError(f"{reference}: no {Path(reference).with_suffix('.json').name} next to it; pass --arch (a zoo "
                          "architecture) or --source (e.g. timm:resnet10t, torchvision:resnet18, python:pkg.mod:factory) "
                          "so that the permutation spec can be derived from the model")
    ref_spec = read_spec(reference, arch)
    ref = read_state(reference)
    others = [read_state(p) for p in paths]
    perm_spec = spec_for(ref_spec.arch, ref_spec.args)
    X = torch.from_numpy(data.X_train) if data is not None else None
    res = align_to_reference(ref, others, perm_spec, method=kind, model=module_for(ref_spec), X=X, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = []
    for p, sd in zip(paths, res.state_dicts):
        spec = replace(read_spec(p, arch), name=Path(p).stem)
        model = module_for(spec, sd)
        if data is not None:
            spec = replace(spec, metrics=evaluate(model, data))
        save_member(model, spec, out_dir)
        report.append({"model": str(p), "out": str(out_dir / f"{spec.name}.safetensors"), "metrics": spec.metrics})
    return report


def check_align_outputs(paths: Sequence[str | Path], out_dir: str | Path) -> None:
    """Each aligned member is written to `<out_dir>/<stem>.safetensors`: refuse two members of one stem (the second
    would overwrite the first) and an out_dir that holds a member (it would be overwritten in place)."""
    stems: dict[str, Path] = {}
    for p in map(Path, paths):
        if p.stem in stems:
            raise ConfigError(f"align: expected members with distinct file names; got '{p.stem}' twice ({stems[p.stem]}, {p})")
        stems[p.stem] = p
        if (Path(out_dir) / f"{p.stem}.safetensors").resolve() == p.resolve():
            raise ConfigError(f"align: expected an out_dir that holds none of the members; got {out_dir}, where the "
                              f"aligned {p.name} would overwrite {p}")


def _example_input(module: nn.Module, source: str, input_shape: Sequence[int] | None) -> torch.Tensor:
    """One input batch for tracing shapes: `input_shape` (without batch), else timm's pretrained_cfg input_size."""
    shape = input_shape or (getattr(module, "pretrained_cfg", None) or {}).get("input_size")
    if not shape:
        raise ConfigError(f"{source}: expected --input-shape (e.g. 3,64,64, without the batch) to trace the model; "
                          "got none and the model declares no input size")
    shape = [int(d) for d in shape]
    first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if input_shape is None and first is not None and len(shape) == 3:  # timm keeps input_size (3, …) under in_chans=1
        shape[0] = first.in_channels
    return torch.zeros(1, *shape)


def _align_source(kind: str, reference, paths, out_dir, source: str, args: dict, data: Dataset | None, seed: int,
                  input_shape) -> list[dict]:
    """`align_checkpoints` for a member source: fx-derived spec, checkpoints checked against the module's keys."""
    from safetensors.torch import save_file

    from fusion.align import align_to_reference
    from fusion.align.fx_spec import refuse_transformers, spec_for_module
    from fusion.sources import check_state_dict, resolve, source_kind

    if source_kind(source) != "torch":
        refuse_onnx_members([(source, source)], "align")
    module = resolve(source, args).eval()
    refuse_transformers(module)
    ref = read_state(reference)
    others = [read_state(p) for p in paths]
    expected = module.state_dict()
    for p, sd in zip([reference, *paths], [ref, *others]):
        check_state_dict(expected, sd, f"{p} (for {source})")
    X = None
    if kind == "activation":
        if data is None:
            raise ConfigError("activation_matching expected --data (inputs the model takes); got none")
        X = data.X_train if data.named else data.X_train.reshape(len(data.X_train), *(input_shape or data.X_train.shape[1:]))
        example = X
    else:
        example = _example_input(module, source, input_shape)
    from fusion.merge.estimates import model_inputs

    example = tuple(t[:1] for t in model_inputs(module, example))
    perm_spec = spec_for_module(module, example)
    res = align_to_reference(ref, others, perm_spec, method=kind, model=module, X=X, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = []
    for p, sd in zip(paths, res.state_dicts):
        out = out_dir / f"{Path(p).stem}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
        report.append({"model": str(p), "out": str(out), "metrics": {}, "source": source,
                       "permutations": len(perm_spec.perms)})
    return report


def barrier_report(
    path_a: str | Path, path_b: str | Path, data: Dataset, *, arch: str | None = None, align: bool = False,
    n_points: int = 11, json_out: str | Path | None = None, plot_out: str | Path | None = None,
) -> dict:
    """Loss/accuracy along the straight path A -> B on the test split, before and (with align) after
    weight matching B to A; barrier = max_λ L(λ) − ½(L_A + L_B) (`max_minus_mean_endpoints`)."""
    from fusion.align import spec_for, weight_matching, apply_permutation
    from fusion.connectivity import interpolation_path, plot_path

    spec = read_spec(path_a, arch)
    sd_a, sd_b = read_state(path_a), read_state(path_b)
    model = module_for(spec)
    X, y = torch.from_numpy(data.X_test), torch.from_numpy(data.y_test)
    kw = dict(n_points=n_points, X_bn=torch.from_numpy(data.X_train))
    paths = {"naive": interpolation_path(model, sd_a, sd_b, X, y, **kw)}
    if align:
        perm_spec = spec_for(spec.arch, spec.args)
        sd_b_aligned = apply_permutation(perm_spec, weight_matching(perm_spec, sd_a, sd_b), sd_b)
        paths["weight_matching"] = interpolation_path(model, sd_a, sd_b_aligned, X, y, **kw)
    report = {"a": str(path_a), "b": str(path_b), "arch": spec.arch, "split": "test",
              "barrier_convention": "max_minus_mean_endpoints", "paths": paths}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    if plot_out:
        plot_path(paths, plot_out, title=f"{Path(path_a).stem} -> {Path(path_b).stem} (test split)")
    return report


# ---- the bundle's `merged` variant -------------------------------------------------------------


def merged_model(merge_cfg, zoo_dir: str | Path, data: Dataset) -> tuple[nn.Module, dict]:
    """Build the `merged` variant from the recipe's [merge] section: load members (+ base), align them
    to the first member when asked, merge, recompute BN statistics. Returns the model and its record."""
    from fusion.align import align_to_reference, spec_for
    from fusion.merge import get_merge, merge

    zoo = Path(merge_cfg.zoo or zoo_dir)
    if merge_cfg.members:
        paths = [zoo / f"{n}.safetensors" for n in merge_cfg.members]
    else:  # every member of the chosen architecture (never the base)
        paths = [p for p in sorted(zoo.glob("*.safetensors")) if p.stem != merge_cfg.base
                 and read_spec(p).scenario != "base" and (not merge_cfg.arch or read_spec(p).arch == merge_cfg.arch)]
    if not paths:
        raise ConfigError(f"[merge]: no {merge_cfg.arch or ''} checkpoints found in {zoo}")
    specs = [read_spec(p) for p in paths]
    archs = {(s.arch, json.dumps(s.args, sort_keys=True)) for s in specs}
    if len(archs) != 1:
        raise ConfigError(
            f"[merge]: weight merging needs one architecture; {zoo} mixes {sorted(a for a, _ in archs)} "
            "(set [merge].members, or use the distilled variant for heterogeneous members)"
        )
    spec = specs[0]
    states = [read_state(p) for p in paths]
    base = read_state(zoo / f"{merge_cfg.base}.safetensors") if merge_cfg.base else None
    alignment = None
    if merge_cfg.align:
        kind = {"weight_matching": "weight", "activation_matching": "activation"}.get(merge_cfg.align)
        if kind is None:
            raise ConfigError(f"[merge].align expected weight_matching or activation_matching; got '{merge_cfg.align}'")
        res = align_to_reference(states[0], states[1:], spec_for(spec.arch, spec.args), method=kind,
                                 model=module_for(spec), X=torch.from_numpy(data.X_train))
        states = [states[0], *res.state_dicts]
        alignment = {"method": merge_cfg.align, "reference": paths[0].stem}
    params = dict(merge_cfg.params)
    extra = data_inputs(merge_cfg.method, states, spec, data) if get_merge(merge_cfg.method).needs_data else {}
    merged = merge(merge_cfg.method, states, base=base, weights=list(merge_cfg.weights) or None, **params, **extra)
    model = finish_state(module_for(spec, merged), data)
    record = {"name": merge_cfg.method, "params": params, "members": [p.stem for p in paths],
              "base": merge_cfg.base or None, "weights": list(merge_cfg.weights) or None, "alignment": alignment}
    return model, record
