"""mergekit YAML configs: parse one into a merge plan and run it with our kernels (`fusion merge --config`).

    plan = load_config("merge.yml")          # pydantic + yaml.safe_load; refusals name the key
    run_plan(plan, "out_dir")                # HF directory: base config.json, tokenizer files, shards + index

The schema is mergekit's `MergeConfiguration` (mergekit/config.py): `merge_method`, `base_model`,
`models[].model` / `models[].parameters`, top-level `parameters`, `dtype`, `out_dtype`,
`tokenizer_source`, and `slices` when every slice is the whole stack of layers (anything else is
refused: layer stacking is not a merge of weights). Parameters resolve per tensor exactly as
mergekit's `parameter_resolver`: the model's own settings, then the slice's, then the top level;
a setting is a scalar, a gradient list `[a, b, c]` interpolated piecewise-linearly over the layer
index t = i / (n_layers − 1) (t = 0 for tensors outside the layer stack: embeddings, final norm,
heads), or a list of `{filter, value}` dicts whose first `filter` that is a substring of the
tensor name wins (`filter: "*"` or none matches every tensor).

mergekit's conventions differ from our registry's defaults in places; each has an option in
`fusion.merge.kernels` and the plan always selects mergekit's:
- linear: `normalize` (default true) divides by Σw; false gives Σ w_i θ_i (`linear_kernel(normalize=)`).
- task arithmetic family: `weight` is required per model, `density` defaults to 1, `lambda` scales,
  `normalize` divides the merged delta by Σw (by Σ w·mask under TIES' sign consensus), `rescale`
  matches the L1 norm of the kept entries (not DARE's 1/density: `rescale_l1`). TIES elects signs on
  weighted deltas with a zero vote counted as +1, as ours.
- slerp: `base_model` is the t = 0 end; a zero-norm endpoint takes norm 1 (mergekit) instead of our
  lerp fallback (`slerp_kernel(zero_norm="unit")`). The angle is computed in float64 (mergekit: float32).
- model_stock: cosines clamped to [−1, 1] per pair and not to [0, 1] on average; t = 0 where the
  denominator 1 + (N−1)·cos vanishes; norm products floored at 1e-6 (`model_stock_ratio(convention="mergekit")`).
- DARE with density < 1 draws its mask from our generator seeded per (seed, tensor, model) (`MergePlan.seed`,
  default 0), mergekit from torch's global RNG: same distribution, not the same draw.
- bf16 / fp16 inputs are merged in float32 and cast back (mergekit computes in the input dtype), so
  half-precision results can differ from mergekit's by the rounding of the input dtype.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from torch import Tensor

from fusion.errors import ConfigError

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalParameter(_Strict):
    """`{value: ..., filter: "mlp"}`: the value applies to tensors whose name contains `filter`."""

    value: ScalarOrGradient
    filter: Optional[StrictStr] = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]


class InputModel(_Strict):
    model: StrictStr
    parameters: Optional[dict[str, ParameterSetting]] = None


class InputSlice(_Strict):
    model: StrictStr
    layer_range: tuple[StrictInt, StrictInt]
    parameters: Optional[dict[str, ParameterSetting]] = None


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: Optional[StrictStr] = None
    residual_weight: Optional[float] = None
    parameters: Optional[dict[str, ParameterSetting]] = None


class MergekitConfig(_Strict):
    """mergekit's `MergeConfiguration`, with every key we cannot honour refused (extra keys forbidden:
    mergekit ignores unknown keys, which hides typos such as `weigth`)."""

    merge_method: StrictStr
    base_model: Optional[StrictStr] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, Any]] = None
    parameters: Optional[dict[str, ParameterSetting]] = None
    dtype: Optional[StrictStr] = None
    out_dtype: Optional[StrictStr] = None
    tokenizer_source: Optional[StrictStr] = None
    tokenizer: Optional[Any] = None
    chat_template: Optional[StrictStr] = None


# ---------------------------------------------------------------------------------------------
# method specs: mergekit's parameter names, scopes and defaults (merge_methods/*.py)

REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    kind: type  # float or bool
    scope: Literal["shared", "input", "non_base"]
    default: Any = REQUIRED


@dataclass(frozen=True)
class MethodSpec:
    """What one mergekit method takes. family: "linear", "gta", "slerp" or "model_stock"."""

    family: str
    params: Mapping[str, ParamSpec]
    base: Literal["required", "none"] = "required"
    sparsification: Optional[str] = None  # magnitude | random | magnitude_outliers
    consensus: bool = False
    min_models: int = 1  # non-base inputs
    max_models: Optional[int] = None


def _gta(sparsification: Optional[str], consensus: bool, normalize: bool, rescale: bool) -> MethodSpec:
    params = {
        "int8_mask": ParamSpec(bool, "shared", False),  # the dtype of mergekit's sign mask: no effect on values
        "normalize": ParamSpec(bool, "shared", normalize),
        "rescale": ParamSpec(bool, "shared", rescale),
        "lambda": ParamSpec(float, "shared", 1.0),
        "weight": ParamSpec(float, "non_base"),
        "density": ParamSpec(float, "non_base", 1.0),
    }
    if sparsification == "magnitude_outliers":
        params["gamma"] = ParamSpec(float, "non_base", 0.01)
    return MethodSpec("gta", params, sparsification=sparsification, consensus=consensus)


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", {"weight": ParamSpec(float, "input"), "normalize": ParamSpec(bool, "shared", True)}, base="none"),
    "task_arithmetic": _gta(None, False, normalize=False, rescale=False),
    "ties": _gta("magnitude", True, normalize=True, rescale=False),
    "dare_ties": _gta("random", True, normalize=False, rescale=True),
    "dare_linear": _gta("random", False, normalize=False, rescale=True),
    "breadcrumbs": _gta("magnitude_outliers", False, normalize=False, rescale=False),
    "breadcrumbs_ties": _gta("magnitude_outliers", True, normalize=False, rescale=False),
    "slerp": MethodSpec("slerp", {"t": ParamSpec(float, "shared")}, min_models=1, max_models=1),
    "model_stock": MethodSpec("model_stock", {"filter_wise": ParamSpec(bool, "shared", False)}, min_models=2),
}
UNSUPPORTED_METHODS = ("della", "della_linear", "sce", "nuslerp", "multislerp", "karcher", "passthrough",
                       "nearswap", "arcee_fusion", "ram", "ramplus_tl")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _dtype(name: Optional[str], key: str) -> Optional[torch.dtype]:
    if name is None:
        return None
    plain = name[len("torch."):] if name.startswith("torch.") else name
    if plain not in DTYPES:
        raise ConfigError(f"mergekit config key '{key}': expected one of {sorted(DTYPES)}; got '{name}'")
    return DTYPES[plain]


# ---------------------------------------------------------------------------------------------
# settings: filters and gradients (mergekit/config.py `evaluate_setting`)


def _validate(kind: type, value: Any, where: str) -> Any:
    """mergekit validates with pydantic's lax float/bool adapters: numeric strings ("1e-3") are numbers."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
        if not math.isfinite(out):
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise ConfigError(f"mergekit config {where}: expected a {'boolean' if kind is bool else 'finite number'}; got {value!r}") from None


def evaluate_setting(tensor_name: str, setting: Any, t: float, kind: type, where: str) -> Any:
    """The value of one setting for one tensor at layer position t ∈ [0, 1], or None when no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validate(kind, setting, where)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_validate(kind, e, where) for e in setting]
        if kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return _validate(kind, (1 - frac) * values[i0] + frac * values[i1], where)
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(tensor_name, cond.value, t, kind, where)
    return None


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class MergeInput:
    path: Path
    parameters: Mapping[str, Any]  # raw settings from the config's model / slice source


@dataclass(frozen=True)
class TensorParams:
    """Resolved parameters of one tensor: shared ones and one dict per non-base input (in plan order)."""

    shared: Mapping[str, Any]
    per_model: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class MergePlan:
    """A parsed config: the method, its inputs and how to resolve each tensor's parameters."""

    method: str
    spec: MethodSpec
    models: tuple[MergeInput, ...]  # non-base inputs (linear: every input)
    base: Optional[Path]
    slice_parameters: Mapping[str, Any]
    parameters: Mapping[str, Any]
    dtype: Optional[torch.dtype]
    out_dtype: Optional[torch.dtype]
    tokenizer_donor: Optional[Path]
    config_dir: Path
    layer_range: Optional[tuple[int, int]] = None  # from `slices`: must be [0, n_layers] of the checkpoints
    seed: int = 0
    source: str = field(default="", repr=False)

    def params_for(self, tensor_name: str, t: float) -> TensorParams:
        """mergekit's `resolve_parameters` for one tensor at layer position t (0 outside the layer stack)."""
        shared = {}
        for name, p in self.spec.params.items():
            if p.scope == "shared":
                shared[name] = self._resolve(name, p, [self.slice_parameters, self.parameters], tensor_name, t, "")
        per_model = []
        for i, m in enumerate(self.models):
            d = {}
            for name, p in self.spec.params.items():
                if p.scope != "shared":
                    d[name] = self._resolve(name, p, [m.parameters, self.slice_parameters, self.parameters], tensor_name, t,
                                            f" for model '{m.path}'")
            per_model.append(d)
        return TensorParams(shared, tuple(per_model))

    def _resolve(self, name: str, p: ParamSpec, scopes, tensor_name: str, t: float, who: str) -> Any:
        for scope in scopes:
            if scope and name in scope:
                value = evaluate_setting(tensor_name, scope[name], t, p.kind, f"parameter '{name}'{who} on '{tensor_name}'")
                if value is not None:
                    return value
        if p.default is REQUIRED:
            raise ConfigError(f"mergekit config: merge_method '{self.method}' expected parameter '{name}'{who} "
                              f"(models[].parameters or parameters); got none for tensor '{tensor_name}'")
        return p.default


def _check_keys(params: Optional[Mapping[str, Any]], spec: MethodSpec, method: str, where: str, allow_shared: bool) -> dict:
    params = dict(params or {})
    allowed = {n for n, p in spec.params.items() if allow_shared or p.scope != "shared"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"mergekit config {where}: merge_method '{method}' expected parameters from {sorted(allowed)}; "
                          f"got unsupported {unknown}")
    return params


def _model_path(ref: str, where: str, config_dir: Path) -> Path:
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(f"mergekit config {where}: expected a local model directory; got '{ref}' (LoRA 'model+adapter' "
                          f"references are not supported)")
    path = Path(ref)
    if not path.is_absolute() and not path.exists() and (config_dir / path).exists():
        path = config_dir / path  # mergekit resolves against the working directory; also accept the config's
    if not path.is_dir():
        raise ConfigError(f"mergekit config {where}: expected a local Hugging Face model directory; got '{ref}' "
                          f"(not a directory; hub ids are not downloaded)")
    return path


VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _check_same_vocabulary(dirs: Sequence[Path]) -> None:
    """`tokenizer_source` makes mergekit remap every embedding row onto the donor's vocabulary; that is the identity
    only when every model has the donor's vocabulary files, which is all we accept."""
    ref = dirs[0]
    for d in dirs[1:]:
        for name in VOCAB_FILES:
            a, b = ref / name, d / name
            if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
                raise ConfigError(f"mergekit config key 'tokenizer_source': expected every model to share the vocabulary of {ref} "
                                  f"(embedding permutation is not supported); got a different '{name}' in {d}")


def parse_config(data: Any, *, config_dir: str | Path = ".", seed: int = 0, source: str = "") -> MergePlan:
    """A mergekit config (the dict `yaml.safe_load` gives) as a `MergePlan`; ConfigError names any key we refuse."""
    config_dir = Path(config_dir)
    if not isinstance(data, Mapping):
        raise ConfigError(f"mergekit config: expected a mapping at the top level; got {type(data).__name__}")
    try:
        cfg = MergekitConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"mergekit config key '{loc}': {first['msg']} (got {first.get('input')!r:.80})") from None
    method = cfg.merge_method
    if method not in METHODS:
        why = "not implemented in fusion" if method in UNSUPPORTED_METHODS else "unknown"
        raise ConfigError(f"mergekit config key 'merge_method': expected one of {sorted(METHODS)}; got '{method}' ({why})")
    spec = METHODS[method]
    for key in ("modules", "tokenizer", "chat_template"):
        if getattr(cfg, key) is not None:
            raise ConfigError(f"mergekit config key '{key}' is not supported by fusion merge --config; remove it")
    if cfg.tokenizer_source == "union":
        raise ConfigError("mergekit config key 'tokenizer_source': 'union' builds a new vocabulary and is not supported; "
                          "expected 'base', a model of the merge, or nothing")
    if (cfg.models is None) == (cfg.slices is None):
        raise ConfigError("mergekit config: expected exactly one of 'models' or 'slices'; got "
                          f"{'both' if cfg.models is not None else 'neither'}")
    slice_params: dict = {}
    base_ref = cfg.base_model
    if cfg.slices is not None:
        if len(cfg.slices) != 1:
            raise ConfigError(f"mergekit config key 'slices': expected one output slice covering every layer; got {len(cfg.slices)} "
                              f"(layer stacking is not supported)")
        out_slice = cfg.slices[0]
        if out_slice.residual_weight is not None:
            raise ConfigError("mergekit config key 'slices[0].residual_weight' is not supported")
        ranges = {tuple(s.layer_range) for s in out_slice.sources}
        if len(ranges) != 1 or next(iter(ranges))[0] != 0:
            raise ConfigError(f"mergekit config key 'slices[0].sources[].layer_range': expected the same [0, n_layers] for "
                              f"every source; got {sorted(ranges)}")
        entries = [(s.model, s.parameters, f"slices[0].sources[{i}]") for i, s in enumerate(out_slice.sources)]
        layer_range = next(iter(ranges))
        slice_params = _check_keys(out_slice.parameters, spec, method, "key 'slices[0].parameters'", True)
        base_ref = out_slice.base_model or base_ref
    else:
        entries = [(m.model, m.parameters, f"models[{i}]") for i, m in enumerate(cfg.models)]
        layer_range = None
    top = _check_keys(cfg.parameters, spec, method, "key 'parameters'", True)

    base = _model_path(base_ref, "key 'base_model'", config_dir) if base_ref is not None else None
    inputs: list[MergeInput] = []
    for ref, params, where in entries:
        if base_ref is not None and ref == base_ref and spec.family != "linear":
            _check_keys(params, spec, method, f"key '{where}.parameters'", False)  # mergekit ignores them on the base
            continue
        inputs.append(MergeInput(_model_path(ref, f"key '{where}.model'", config_dir),
                                 _check_keys(params, spec, method, f"key '{where}.parameters'", False)))
    if spec.family == "linear" and base is not None and not any(ref == base_ref for ref, _, _ in entries):
        inputs.append(MergeInput(base, {}))  # mergekit adds the base as one more weighted input
    if spec.base == "required" and base is None:
        raise ConfigError(f"mergekit config key 'base_model': merge_method '{method}' expected a base model; got none")
    if spec.family == "linear":
        base = None
    if len(inputs) < spec.min_models or (spec.max_models is not None and len(inputs) > spec.max_models):
        want = f"exactly {spec.min_models}" if spec.max_models == spec.min_models else f"at least {spec.min_models}"
        raise ConfigError(f"mergekit config key 'models': merge_method '{method}' expected {want} models besides the base; "
                          f"got {len(inputs)}")
    donor_ref = cfg.tokenizer_source
    if donor_ref in (None, "base"):
        donor = base if base is not None else inputs[0].path
    else:
        donor = _model_path(donor_ref, "key 'tokenizer_source'", config_dir)
    if donor_ref is not None:  # mergekit would permute the embeddings onto the donor's vocabulary: only a no-op is accepted
        _check_same_vocabulary([donor, *([base] if base is not None else []), *(m.path for m in inputs)])
    return MergePlan(method, spec, tuple(inputs), base, slice_params, top, _dtype(cfg.dtype, "dtype"),
                     _dtype(cfg.out_dtype, "out_dtype"), donor, config_dir, layer_range, seed, source)


def load_config(path: str | Path, *, seed: int = 0) -> MergePlan:
    """Read a mergekit YAML file with `yaml.safe_load` and parse it (`parse_config`)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: expected a readable mergekit YAML file; got '{path}' ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: expected valid YAML; got {str(exc).splitlines()[0]}") from None
    return parse_config(data, config_dir=path.parent, seed=seed, source=text)


# ---------------------------------------------------------------------------------------------
# execution: tensor by tensor over the checkpoints (fusion.merge.checkpoints), mergekit's arithmetic on our kernels

LAYER_INDEX = re.compile(r"\.(\d+)\.")  # mergekit's RE_LAYER_INDEX (architecture/auto.py)


def layer_positions(keys: Sequence[str], n_layers: Optional[int]) -> dict[str, float]:
    """Tensor name -> t ∈ [0, 1] for gradients: i / (n_layers − 1) for a tensor of layer i (the first `.<int>.` in
    its name), 1 with a single layer, 0 outside the layer stack (embeddings, final norm, heads), as mergekit's planner."""
    found = {k: int(m.group(1)) for k in keys if (m := LAYER_INDEX.search(k))}
    n = n_layers if n_layers is not None else (max(found.values()) + 1 if found else 0)
    out = {}
    for k in keys:
        if k in found:
            out[k] = found[k] / (n - 1) if n > 1 else 1.0
        else:
            out[k] = 0.0
    return out


def _n_layers(model_dir: Path) -> Optional[int]:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def _sparsify(plan: MergePlan, key: str, index: int, delta: Tensor, p: Mapping[str, Any], rescale: bool) -> Tensor:
    """mergekit's `sparsify` of one task vector with the model's density (and gamma); rescale: L1 norm matching."""
    from fusion.merge import kernels as K
    from fusion.merge.generalized import tensor_generator

    density = p["density"]
    how = plan.spec.sparsification
    if how is None or density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    if how == "magnitude":
        mask = K.topk_mask(delta, density)
    elif how == "magnitude_outliers":
        mask = K.breadcrumbs_mask(delta, density, p["gamma"])
    else:  # random: our seeded generator, mergekit's torch.bernoulli on the global RNG (same law, not the same draw)
        mask = torch.rand(delta.shape, generator=tensor_generator(plan.seed, key, index), dtype=torch.float32) < density
    kept = torch.where(mask, delta, torch.zeros((), dtype=delta.dtype))
    return K.rescale_l1(delta, kept) if rescale else kept


def merge_tensor(plan: MergePlan, key: str, xs: Sequence[Tensor], base: Optional[Tensor], params: TensorParams) -> Tensor:
    """One floating entry merged as mergekit would; xs: the K non-base inputs (all of one shape), base or None -> S
    in the compute dtype (float32 for half inputs) or the inputs' dtype."""
    from fusion.merge import kernels as K

    spec, shared = plan.spec, params.shared
    if spec.family == "linear":
        weights = [p["weight"] for p in params.per_model]
        if shared["normalize"] and math.fsum(weights) == 0:
            raise ConfigError(f"mergekit config: linear with normalize on '{key}' expected weights with a non-zero sum; got {weights}")
        cd = K.compute_dtype(xs[0].dtype)
        return K.linear_kernel([x.to(cd) for x in xs], weights, normalize=shared["normalize"])
    if spec.family == "slerp":
        return K.slerp_kernel(base, xs[0], shared["t"], zero_norm="unit")
    if spec.family == "model_stock":
        if shared["filter_wise"]:
            raise ConfigError(f"mergekit config: model_stock parameter 'filter_wise: true' is not supported (tensor '{key}'); "
                              f"expected false (one ratio per tensor)")
        return K.model_stock_kernel(xs, base, convention="mergekit")
    # generalized task arithmetic (mergekit merge_methods/generalized_task_arithmetic.py)
    deltas = [_sparsify(plan, key, i, d, p, shared["rescale"]) for i, (d, p) in enumerate(zip(K.task_vectors(xs, base), params.per_model))]
    weights = [p["weight"] for p in params.per_model]
    weighted = [d * w for d, w in zip(deltas, weights)]
    if spec.consensus:  # TIES: majority sign of Σ w δ (a zero sum votes +), keep the weighted deltas that agree
        majority = torch.where(sum(weighted) >= 0, 1.0, -1.0).to(weighted[0].dtype)
        masks = [torch.sign(wd) == majority for wd in weighted]
        mixed = sum(torch.where(m, wd, 0.0) for wd, m in zip(weighted, masks))
        divisor = sum(m.to(wd.dtype) * w for wd, m, w in zip(weighted, masks, weights))
        divisor = torch.where(divisor == 0, torch.ones((), dtype=divisor.dtype), divisor)
    else:
        mixed = sum(weighted)
        total = math.fsum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if shared["normalize"]:
        mixed = mixed / divisor
    if shared["lambda"] != 1:
        mixed = mixed * shared["lambda"]
    return base.to(mixed.dtype) + mixed


def run_plan(plan: MergePlan, out: str | Path, *, max_shard_bytes: Any = None) -> dict[str, Any]:
    """Merge the plan's checkpoints tensor by tensor into the Hugging Face directory `out` (config.json from the
    base, or the first model without one; tokenizer files from `tokenizer_source`; shards of at most
    `max_shard_bytes` with an index; the config as mergekit_config.yml). Returns a JSON-serialisable summary."""
    from fusion.merge import checkpoints as C

    inputs = [C.open_checkpoint(m.path) for m in plan.models]
    base = C.open_checkpoint(plan.base) if plan.base is not None else None
    everything = ([base] if base is not None else []) + inputs
    C.check_same_layout(everything)
    ref = everything[0]
    layout = ref.layout
    keys = ref.keys()
    n_layers = _n_layers(ref.path)
    if plan.layer_range is not None:
        have = n_layers if n_layers is not None else len({m.group(1) for k in keys if (m := LAYER_INDEX.search(k))})
        if tuple(plan.layer_range) != (0, have):
            raise ConfigError(f"mergekit config key 'slices[0].sources[].layer_range': expected [0, {have}] (every layer of "
                              f"{ref.path}); got {list(plan.layer_range)} (partial slices are not supported)")
    ts = layer_positions(keys, n_layers)

    def out_dtype(dtype: torch.dtype) -> torch.dtype:
        if not dtype.is_floating_point:
            return dtype
        return plan.out_dtype or plan.dtype or dtype

    entries = [(k, layout[k][0], out_dtype(layout[k][1])) for k in keys]
    out = Path(out)
    shard = C.DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    extra: dict[str, Path | str] = {}  # written inside the output before its atomic rename
    if plan.tokenizer_donor is not None and plan.tokenizer_donor.resolve() != ref.path.resolve():
        extra.update({name: plan.tokenizer_donor / name for name in C.TOKENIZER_FILES if (plan.tokenizer_donor / name).is_file()})
    if plan.source:
        extra["mergekit_config.yml"] = plan.source
    with C.CheckpointWriter(out, entries, as_dir=True, max_shard_bytes=shard, companions_from=ref.path,
                            extra_files=extra) as writer:
        for key, _, dtype in entries:
            if not layout[key][1].is_floating_point:  # integer buffers: copied from the first input
                writer.write(key, inputs[0].get(key))
                continue
            cast = (lambda x: x.to(plan.dtype)) if plan.dtype is not None else (lambda x: x)
            xs = [cast(c.get(key)) for c in inputs]
            b = cast(base.get(key)) if base is not None else None
            merged = merge_tensor(plan, key, xs, b, plan.params_for(key, ts[key]))
            writer.write(key, merged.to(dtype).contiguous())
            del xs, b, merged
        files = [p.name for p in writer.files]
    return {"method": plan.method, "n_models": len(inputs), "base": str(plan.base) if plan.base else None,
            "entries": len(keys), "files": files, "out": str(out)}
