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


def data_inputs(method: str, models: list[dict], spec: MemberSpec, data: Dataset) -> dict:
    """What data-aware methods need besides the weights: Fisher diagonals, Gram matrices or a scorer."""
    from fusion.merge import diagonal_fisher, regmean_grams

    X = torch.from_numpy(data.X_train)
    if method == "fisher":
        return {"fishers": [diagonal_fisher(module_for(spec, sd), X) for sd in models]}
    if method == "regmean":
        return {"grams": [regmean_grams(module_for(spec, sd), X) for sd in models]}
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


def merge_checkpoints(
    method: str, paths: Sequence[str | Path], out: str | Path, *, base: str | Path | None = None,
    weights: Sequence[float] | None = None, params: dict | None = None, arch: str | None = None,
    data: Dataset | None = None,
) -> dict:
    """Merge safetensors checkpoints into `out` (+ its JSON spec with metrics when data is given).

    Streams tensor by tensor (peak memory about one model) when the method allows it and no
    BatchNorm statistics need recomputing; otherwise merges in memory.
    """
    from fusion.merge import get_merge, merge, merge_files, streamable_methods

    params = dict(params or {})
    refuse_onnx_members([(Path(p).name, p) for p in [*paths, *([base] if base else [])]], "merge")
    needs_data = get_merge(method).needs_data  # an unknown name: UnknownNameError listing the registry's names
    if len(paths) < 1:
        raise ConfigError("expected at least one --models checkpoint; got none")
    spec = read_spec(paths[0], arch)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out expected a .safetensors path; got '{out}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    if needs_data and data is None:
        raise ConfigError(f"merge method '{method}' needs data (--data digits or a file)")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module_for(spec).modules())
    if method in streamable_methods() and not needs_data and not (has_bn and data is not None):
        summary = merge_files(method, paths, out, base_path=base, weights=weights, **params)
        streamed = True
        model = module_for(spec, read_state(out)) if data is not None else None
    else:
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
    return {**summary, "streamed": streamed, "out": str(out), "metrics": metrics,
            "params": {k: v for k, v in params.items()}, "inputs": [str(p) for p in paths],
            "base": str(base) if base else None}


def align_checkpoints(
    method: str, reference: str | Path, paths: Sequence[str | Path], out_dir: str | Path, *,
    arch: str | None = None, data: Dataset | None = None, seed: int = 0,
) -> list[dict]:
    """Permute each checkpoint into the reference's basis (Git Re-Basin); writes `<out_dir>/<name>.safetensors`."""
    from fusion.align import align_to_reference, spec_for

    kind = {"weight_matching": "weight", "activation_matching": "activation"}.get(method)
    if kind is None:
        raise ConfigError(f"expected --method weight_matching or activation_matching; got '{method}'")
    refuse_onnx_members([(Path(p).name, p) for p in [reference, *paths]], "align")
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
