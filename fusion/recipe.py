"""The build recipe (TOML): frozen pydantic dataclasses with strict types; unknown keys are errors.

    [data]
    source = "digits"            # or a path to .npz (X, y) / .csv; "" (or no [data] with [[inputs]]): no data set
    label_column = "label"       # .csv only
    task = "classification"
    classes = []                 # class names; empty: the data set's (digits: 0..9), else class indices

    [zoo]
    dir = "artifacts/zoo/independent"
    members = []                 # empty: every member in dir

    [ensemble]
    combiner = "soft_vote"
    weights = "auto"             # "auto": equal, select, fit or stacking, whichever has the lowest
                                 # out-of-fold validation NLL; "equal" | "select" | "fit"; empty: equal;
                                 # a list: one per member, in member order;
                                 # a table {mlp_0 = 2, cnn_1 = 3}: by name, the rest 1
    calibration = "none"         # or "temperature": per-member temperature scaling before combining

    [distill]                    # the `distilled` variant (see DistillSection)
    enabled = true
    epochs = 60

    [build]
    out = "artifacts/bundle"
    compare = true               # comparison.md/.json/.png in the bundle and in the manifest
    quantize = false             # int8 variants of merged/distilled (and a composed image ensemble), kept within
                                 # quantize_max_loss_pp; true: static when the graph has a Conv, else dynamic; "static" | "dynamic"

    [serve]
    split = false                # true: also the split layout, a front + one bundle per member (issue 19)

    [[members]]                  # bring your own models (issue 15): with these, [zoo] is not used
    name = "resnet_a"
    source = "timm:resnet10t"    # zoo:mlp | timm:NAME | torchvision:NAME | hf:DIR | python:pkg.mod:factory | onnx:PATH
    weights = "ckpt/resnet_a.safetensors"

    [[inputs]]                   # named inputs (absent: the single flat feature input of the data set)
    name = "pixels"
    dtype = "float32"
    shape = ["batch", 3, 224, 224]
    kind = "image"

Why pydantic here (and frozen dataclasses elsewhere): the recipe is user text, checked at the edge with
strict types (no 2.5 for an integer, no "1" for a number), `Literal` choices and unknown keys refused;
the classes stay dataclasses (`dataclasses.fields`/`replace` keep working for every caller), and every
`ValidationError` becomes one `ConfigError` line naming the key, what was expected and what was got.
`recipe_schema()` is the JSON Schema of the TOML document (`fusion recipe-schema`, for editors).
"""

from __future__ import annotations

import functools
import re
import tomllib
import typing
from dataclasses import field, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BeforeValidator, ConfigDict, Discriminator, Field, Strict, StrictBool, StrictInt, StrictStr, Tag, TypeAdapter, ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass

from fusion.errors import ConfigError

_CONFIG = ConfigDict(extra="forbid")  # scalars are strict one by one (below); lists may arrive as tuples or lists

Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # an int or a finite float, never a bool or a string (an int becomes a float)
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]


def _int_in(low: int, high: int):
    """An integer in [low, high]: upper bounds far above any sane value, so a typo (epochs = 10**12) is an
    error that names the bound instead of a run that never ends or an allocation that fails."""
    return Annotated[StrictInt, Field(ge=low, le=high)]


MAX_DIM = 1 << 20  # an input dimension, a batch size, a token sequence
PositiveNumber = Annotated[Number, Field(gt=0.0)]
NonNegativeNumber = Annotated[Number, Field(ge=0.0)]
# member and input names become file names (members/<name>.onnx) and keys of requests
Name = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]

TASKS = ("classification", "regression")
CALIBRATIONS = ("none", "temperature")
QUANTIZE_MODES = ("static", "dynamic")  # fusion.quantize.MODES (kept torch-free here)
WEIGHT_MODES = ("auto", "equal", "select", "fit")  # fusion.ensemble.selection.MODES (kept torch-free here)
ALIGNMENTS = ("", "weight_matching", "activation_matching")
AUGMENTATIONS = ("noise", "shift", "mixup")
MEMBER_OUTPUTS = ("logits", "probabilities")
INPUT_KINDS = ("tensor", "image", "text")  # fusion.bundle.INPUT_KINDS
INPUT_DTYPES = ("float32", "float16", "int64", "int32", "uint8", "bool")  # fusion.bundle.INPUT_DTYPES
# OIP (KServe v2) datatype names, accepted in [[inputs]] dtype and normalised to numpy's
OIP_DTYPES = {"FP32": "float32", "FP16": "float16", "INT64": "int64", "INT32": "int32", "UINT8": "uint8", "BOOL": "bool"}
IMAGE_MODES = {"RGB": 3, "L": 1}  # Pillow mode -> channels


@dataclass(frozen=True, config=_CONFIG)
class DataSection:
    """The data set: "digits", a .npz/.csv path, or "" for none (a bring-your-own bundle with [[inputs]]
    only: the gate runs on random inputs drawn from the spec). `classes` names the classes."""

    source: StrictStr = "digits"
    label_column: StrictStr = "label"
    task: Literal[TASKS] = "classification"
    classes: tuple[StrictStr, ...] = ()


@dataclass(frozen=True, config=_CONFIG)
class ZooSection:
    dir: StrictStr = "artifacts/zoo/independent"
    members: tuple[StrictStr, ...] = ()


def _weights_kind(value: Any) -> str | None:
    """Which form `[ensemble] weights` takes: a list, a table or a mode (None: none of them)."""
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "table"
    return "mode" if isinstance(value, str) else None


Weights = Annotated[
    Union[
        Annotated[tuple[Number, ...], Tag("list")],
        Annotated[dict[str, Number], Tag("table")],
        Annotated[Literal[WEIGHT_MODES], Tag("mode")],
    ],
    Discriminator(_weights_kind, custom_error_type="weights_type",
                  custom_error_message=f"a list of numbers, a table {{name = weight}} or one of {list(WEIGHT_MODES)}"),
]


@dataclass(frozen=True, config=_CONFIG)
class EnsembleSection:
    """The fused ensemble. `calibration = "temperature"` divides each member's logits by a temperature
    fitted on the validation split (Guo et al. 2017) before combining; it is exported inside the graph.

    `weights`: empty or "equal" for equal weights; a list with one weight per member in member order ([zoo]
    members when given, else the zoo's checkpoint names sorted: cnn_0, …, mlp_0, …); or a table {name = weight}
    in which unnamed members weigh 1. `fusion.build.member_weights` resolves it against the members.
    Chosen from the validation split (fusion/ensemble/selection.py): "select" (Caruana et al.'s ensemble
    selection, integer counts), "fit" (simplex weights minimising the NLL), "auto" (the default: equal, select,
    fit and stacking scored out of fold, the lowest NLL wins)."""

    combiner: StrictStr = "soft_vote"  # a combiner registry name (checked by the registry, which imports torch)
    weights: Weights = "auto"
    params: dict[str, Any] = field(default_factory=dict)
    calibration: Literal[CALIBRATIONS] = "none"


@dataclass(frozen=True, config=_CONFIG)
class MergeSection:
    """The `merged` variant: by default the zoo's MLPs, aligned to the first by weight matching, then
    averaged (`linear`). `method = ""` turns it off.

    With `[[members]]` (issue 16): `members` names recipe members of one architecture (same class, keys and
    shapes; not onnx:), merged by `method`/`params`/`weights` onto `base` (a member's name, a .safetensors file
    or a Hugging Face directory) and exported like them (fusion/byo_pipeline.py); or `config` names a mergekit
    YAML (fusion/merge/mergekit_config.py) over Hugging Face directories, run as `fusion merge --config` runs it."""

    method: StrictStr = "linear"
    zoo: StrictStr = ""  # the zoo to merge (default: the [zoo] dir); merging needs one architecture
    arch: StrictStr = "mlp"  # with no `members`: every member of this architecture in the zoo
    members: tuple[StrictStr, ...] = ()
    base: StrictStr = ""  # a base checkpoint name in that zoo, for task-vector methods (BYO: a member, file or HF dir)
    config: StrictStr = ""  # BYO: a mergekit YAML (merge_method, base_model, models...) instead of method/members
    weights: tuple[Number, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    align: Literal[ALIGNMENTS] = "weight_matching"


@dataclass(frozen=True, config=_CONFIG)
class DistillSection:
    """A `distilled` variant: on by default (see fusion/distill.py for the loss and the transfer set).

    arch/hidden/args: the student (`hidden` for "mlp"; `args` adds constructor arguments, e.g.
    `{channels = [8, 16]}` for "cnn"). Each epoch the transfer set is the train split plus `copies`
    augmented copies of it; training stops after `patience` epochs without a better validation
    agreement with the teacher, and the best epoch's weights are kept.
    """

    enabled: StrictBool = True
    arch: StrictStr = "mlp"
    hidden: tuple[_int_in(1, 65_536), ...] = (256, 256)
    args: dict[str, Any] = field(default_factory=dict)
    # the student from a member source instead of `arch` (zoo:, timm:, torchvision:, hf:, python:; `args` as its
    # keywords); not onnx: (a student is trained). "": `arch`/`hidden`/`args` (fusion/zoo.py)
    source: StrictStr = ""
    temperature: PositiveNumber = 4.0
    alpha: Annotated[Number, Field(ge=0.0, le=1.0)] = 0.9
    epochs: _int_in(1, 100_000) = 60
    batch_size: _int_in(1, MAX_DIM) = 64
    lr: PositiveNumber = 1e-3
    weight_decay: NonNegativeNumber = 1e-4
    patience: _int_in(0, 100_000) = 15
    augment: tuple[Literal[AUGMENTATIONS], ...] = ("noise", "shift")
    copies: _int_in(0, 1_000) = 1
    noise_std: NonNegativeNumber = 0.1  # in units of each feature's train standard deviation
    max_shift: _int_in(0, 1_024) = 1  # pixels, image-shaped rows only
    mixup_alpha: PositiveNumber = 0.2  # Beta(a, a) mixing weights
    seed: _int_in(-(2**63), 2**63 - 1) = 0
    threads: _int_in(0, 1_024) = 1  # torch intra-op threads while distilling (0: torch's default); small students run fastest on 1

    @model_validator(mode="after")
    def _torch_source(self):
        if self.source:
            from fusion.sources import check_source, source_kind  # stdlib-only at import

            check_source(self.source)
            if source_kind(self.source) != "torch":
                raise ValueError(f"source expected a torch source (a student is trained); got {self.source!r}")
        return self


@dataclass(frozen=True, config=_CONFIG)
class BuildSection:
    """Output directory and the steps after export: int8 variants of merged/distilled (kept only when
    validation accuracy drops by at most `quantize_max_loss_pp` points) and the comparison report."""

    out: StrictStr = "artifacts/bundle"
    compare: StrictBool = True
    compare_rounds: _int_in(1, 100_000) = 300  # interleaved latency rounds per model and batch size
    quantize: Union[StrictBool, Literal[QUANTIZE_MODES]] = False  # fusion/quantize.py choose_mode
    quantize_max_loss_pp: Number = 0.5  # accuracy points an int8 file may lose (negative: it must gain that many)


SPLIT_URL_TEMPLATE = "http://member-{host}:3000/v2/models/{name}"  # fusion.split.DEFAULT_URL_TEMPLATE (no torch here)


@dataclass(frozen=True, config=_CONFIG)
class ServeSection:
    """How the bundle is served (issue 19). `split`: also write the split layout (`fusion build --split`): a
    front bundle whose members are remote plus one bundle per member (fusion/split.py), in `split_dir` (empty:
    `<[build].out>-split`, artifacts/bundle-split by default, where `deploy/bento.py build --split` and
    deploy/overlays/split expect it), each member at `url_template` ({name}: the member, {host}: it as a DNS
    label; FUSION_MEMBER_URL_<NAME> overrides it when serving)."""

    split: StrictBool = False
    split_dir: StrictStr = ""
    url_template: StrictStr = SPLIT_URL_TEMPLATE

    @model_validator(mode="after")
    def _url_template(self):
        import string

        try:
            fields_ = {f for _, f, _, _ in string.Formatter().parse(self.url_template) if f is not None}
        except ValueError as exc:
            raise ValueError(f"url_template expected a format string; got {self.url_template!r} ({exc})") from None
        if not self.url_template.startswith(("http://", "https://")) or not fields_ & {"name", "host"} or fields_ - {"name", "host"}:
            raise ValueError(f"url_template expected an http(s) URL with {{name}} and/or {{host}} (one URL per member) "
                             f"and no other fields; got {self.url_template!r}")
        return self


@dataclass(frozen=True, config=_CONFIG)
class MemberSection:
    """One `[[members]]` table: a model the user brings (fusion/sources.py resolves `source`).

    `weights`: a .safetensors file loaded with strict key matching ("" keeps the source's own weights:
    random for timm/torchvision/zoo/python, the directory's for hf:). `args`: keyword arguments of the
    constructor. `output`: what the module returns. `input_map`: {member input: bundle input} (empty: by
    position). `output_name`: which output when the member has several ("": the first). `fixed_batch`:
    what to do with a member whose batch dimension is fixed (the probe at batch 1, 2, 7 fails): "refuse"
    it, or run it "one_row" at a time (an ONNX Loop over the rows in the fused graph, one call per row in
    members mode; fusion/compose.py)."""

    name: Name
    source: StrictStr
    weights: StrictStr = ""
    args: dict[str, Any] = field(default_factory=dict)
    output: Literal[MEMBER_OUTPUTS] = "logits"
    input_map: dict[str, StrictStr] = field(default_factory=dict)
    output_name: StrictStr = ""
    fixed_batch: Literal["refuse", "one_row"] = "refuse"

    @model_validator(mode="after")
    def _known_source(self):
        from fusion.sources import check_source  # stdlib-only at import: the recipe stays free of torch

        check_source(self.source)
        if self.fixed_batch == "one_row" and not self.source.startswith("onnx:"):
            raise ValueError(f"fixed_batch = \"one_row\" expected an onnx: source (a file that cannot be re-exported; "
                             f"torch members are exported with a dynamic batch); got {self.source!r}")
        return self


@dataclass(frozen=True, config=_CONFIG)
class ImageSection:
    """How an image input is normalised inside the graph: `(x * scale - mean) / std` per channel on the
    decoded uint8 pixels; empty mean/std: 0 and 1 for every channel."""

    mode: Literal[tuple(IMAGE_MODES)] = "RGB"
    scale: PositiveNumber = 1.0 / 255.0
    mean: tuple[Number, ...] = ()
    std: tuple[PositiveNumber, ...] = ()


def _dtype_name(value: Any) -> Any:
    """OIP datatype names (FP32, INT64...) as numpy's (float32, int64...); anything else as it is."""
    return OIP_DTYPES.get(value, value) if isinstance(value, str) else value


DtypeName = Literal[INPUT_DTYPES + tuple(OIP_DTYPES)]
Dim = Union[_int_in(1, MAX_DIM), StrictStr]  # a fixed size, or a name for a dynamic dimension


@dataclass(frozen=True, config=_CONFIG)
class InputSection:
    """One `[[inputs]]` table: a named client-facing input (maps 1:1 onto `fusion.bundle.TensorSpec`).

    kind "tensor": a tensor of `dtype` and `shape`; "image": shape ["batch", C, H, W], float32, PNG/JPEG
    decoded by the service, normalised in the graph (`image`); "text": shape ["batch", <sequence>], int64,
    strings tokenized by the service with `tokenizer` (a tokenizer.json) and truncated at `max_length`."""

    name: Name
    shape: Annotated[tuple[Dim, ...], Field(min_length=1)]
    dtype: Annotated[Literal[INPUT_DTYPES], BeforeValidator(_dtype_name, json_schema_input_type=DtypeName)] = "float32"
    kind: Literal[INPUT_KINDS] = "tensor"
    image: Optional[ImageSection] = None
    tokenizer: StrictStr = ""
    max_length: _int_in(0, MAX_DIM) = 0

    @model_validator(mode="after")
    def _consistent(self):
        def bad(key: str, expected: str, got: Any):
            raise ValueError(f"{key} expected {expected}; got {_show(got)}")

        if self.shape[0] != "batch":
            bad("shape", 'a first dimension "batch"', list(self.shape))
        if self.kind != "image" and self.image is not None:
            bad("image", f"no image table for kind '{self.kind}'", "one")
        if self.kind != "text" and (self.tokenizer or self.max_length):
            bad("tokenizer", f"no tokenizer or max_length for kind '{self.kind}'",
                self.tokenizer or self.max_length)
        if self.kind == "image":
            c = self.shape[1] if len(self.shape) == 4 else None
            if c is None or not all(isinstance(d, int) for d in self.shape[1:]):
                bad("shape", '["batch", C, H, W] with integer C, H, W for kind "image"', list(self.shape))
            if self.dtype != "float32":
                bad("dtype", '"float32" for kind "image" (normalised in the graph)', self.dtype)
            image = self.image or ImageSection()
            if IMAGE_MODES[image.mode] != c:
                bad("image.mode", f"{c} channel(s) as shape[1] says ('RGB': 3, 'L': 1)", image.mode)
            for key in ("mean", "std"):
                if getattr(image, key) and len(getattr(image, key)) != c:
                    bad(f"image.{key}", f"{c} values, one per channel", list(getattr(image, key)))
        if self.kind == "text":
            if self.dtype != "int64" or len(self.shape) != 2 or not isinstance(self.shape[1], str):
                bad("shape", 'dtype "int64" and shape ["batch", "sequence"] for kind "text"',
                    f"{self.dtype} {list(self.shape)}")
            if not self.tokenizer:
                bad("tokenizer", 'a tokenizer.json path for kind "text"', "")
            if self.max_length < 1:
                bad("max_length", 'an integer >= 1 for kind "text"', self.max_length)
        return self

    def to_tensor_spec(self, graph_inputs: tuple[str, ...] = ("input_ids", "attention_mask")):
        """The bundle's `TensorSpec` (a text input's tokenizer is named by its file name in the bundle)."""
        from fusion.bundle import TensorSpec

        image = text = None
        if self.kind == "image":
            im, c = self.image or ImageSection(), int(self.shape[1])
            image = {"mode": im.mode, "scale": im.scale, "mean": list(im.mean or (0.0,) * c),
                     "std": list(im.std or (1.0,) * c)}
        if self.kind == "text":
            text = {"tokenizer": Path(self.tokenizer).name, "max_length": self.max_length,
                    "graph_inputs": list(graph_inputs)}
        return TensorSpec(name=self.name, dtype=self.dtype, shape=tuple(self.shape), kind=self.kind,
                          image=image, text=text)


def _duplicates(names) -> list[str]:
    seen: set[str] = set()
    return sorted({n for n in names if n in seen or seen.add(n)})


@dataclass(frozen=True, config=_CONFIG)
class Recipe:
    data: DataSection = DataSection()
    zoo: ZooSection = ZooSection()
    ensemble: EnsembleSection = EnsembleSection()
    merge: MergeSection = MergeSection()
    distill: DistillSection = DistillSection()
    build: BuildSection = BuildSection()
    serve: ServeSection = ServeSection()
    members: tuple[MemberSection, ...] = ()  # [[members]]: empty, the [zoo] dir's checkpoints
    inputs: tuple[InputSection, ...] = ()  # [[inputs]]: empty, the data set's flat feature input "input"

    @model_validator(mode="after")
    def _consistent(self):
        for table, names in (("[[members]]", [m.name for m in self.members]), ("[[inputs]]", [i.name for i in self.inputs]),
                             ("[data].classes", self.data.classes)):
            if dup := _duplicates(names):
                raise ValueError(f"{table} expected unique names; got {dup} more than once")
        known = [i.name for i in self.inputs] or ["input"]
        for m in self.members:
            unknown = sorted(set(m.input_map.values()) - set(known))
            if unknown:
                raise ValueError(f"[[members]] '{m.name}' input_map expected bundle inputs among {known}; got {unknown}")
        if not self.data.source and not self.inputs:
            raise ValueError('[data].source expected "digits" or a data file ("" only with [[inputs]]); got ""')
        return self


SECTIONS = {"data": DataSection, "zoo": ZooSection, "ensemble": EnsembleSection, "merge": MergeSection,
            "distill": DistillSection, "build": BuildSection, "serve": ServeSection, "members": MemberSection,
            "inputs": InputSection}
ARRAYS = ("members", "inputs")  # arrays of tables: [[members]], [[inputs]]
NAMED_TABLES = ("weights", "input_map", "params", "args")  # tables whose keys the user names (messages say "for KEY")

# --- ValidationError -> ConfigError ("[section].key expected ...; got ...") -----------------------------

_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "true or false",
    "list_type": "a list", "tuple_type": "a list", "dict_type": "a table", "dataclass_type": "a table",
    "dataclass_args_type": "a table", "model_type": "a table", "missing": "a value (this key is required)",
    "int_from_float": "an integer", "float_parsing": "a number", "none_required": "nothing",
    "finite_number": "a finite number",
}


def _show(value: Any) -> str:
    """A value as the user wrote it (TOML spells booleans true/false)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


_QUOTED = r"'((?:[^'\\]|\\.)*)'"  # the choices inside pydantic's "'a', 'b' or 'c'"


def _expected(err: dict) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "literal_error":
        return f"one of {re.findall(_QUOTED, ctx.get('expected', ''))}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        noun = "an integer" if isinstance(bound, int) and isinstance(got, int) else "a number"
        if noun == "an integer" and kind == "less_than_equal":
            return f"{noun} at most {bound}"
        return f"{noun} {op} {bound}"
    if kind == "too_short":
        return f"at least {ctx.get('min_length')} item(s)"
    if kind == "string_pattern_mismatch":
        return "a name of letters, digits, '_', '.' and '-' (starting with a letter or digit)"
    return err["msg"][0].lower() + err["msg"][1:]


def _class_at(cls, path: list) -> type | None:
    """The recipe dataclass reached from `cls` along `path` (keys and indices), None past a plain value."""
    for key in path:
        if isinstance(key, int):
            continue
        hint = typing.get_type_hints(cls).get(key) if is_dataclass(cls) else None
        cls = _dataclass_in(hint)
        if cls is None:
            return None
    return cls


def _dataclass_in(hint) -> type | None:
    if is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if found := _dataclass_in(arg):
            return found
    return None


def _walk(raw: Any, loc: tuple, keep_last: bool) -> list:
    """The part of pydantic's `loc` that indexes the input: union tags ('list', 'int', ...) dropped."""
    path, value = [], raw
    for i, key in enumerate(loc):
        if isinstance(value, dict) and key in value:
            path.append(key)
            value = value[key]
        elif isinstance(value, (list, tuple)) and isinstance(key, int) and key < len(value):
            path.append(key)
            value = value[key]
        elif is_dataclass(value) and isinstance(key, str) and hasattr(value, key):
            path.append(key)
            value = getattr(value, key)
        elif keep_last and i == len(loc) - 1:
            path.append(key)
    return path


def _render(path: list, prefix: str) -> tuple[str, str]:
    """("[ensemble].weights", " for mlp_0") from ["ensemble", "weights", "mlp_0"]."""
    out, suffix = prefix, ""
    for i, key in enumerate(path):
        if isinstance(key, int):
            out += f"[{key}]"
        elif not out:  # the first key of a whole recipe is a section
            out = f"[[{key}]]" if key in ARRAYS else f"[{key}]"
        elif i > 0 and path[i - 1] in NAMED_TABLES and i == len(path) - 1:
            suffix = f" for {key}"
        else:
            out += f".{key}"
    return out or "recipe", suffix


def _messages(exc: ValidationError, raw: Any, top: type, prefix: str) -> list[str]:
    unknown: dict[tuple, list[str]] = {}
    grouped: dict[tuple[str, str], tuple[list[str], Any]] = {}
    own: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            unknown.setdefault(tuple(_walk(raw, loc[:-1], False)), []).append(str(loc[-1]))
        elif err["type"] == "value_error":  # our own validators: the message names the key and says both
            where, _ = _render(_walk(raw, loc, False), prefix)
            text = str((err.get("ctx") or {}).get("error", err["msg"]))
            own.append(text if where == "recipe" else f"{where}: {text}")
        else:
            where_suffix = _render(_walk(raw, loc, err["type"] == "missing"), prefix)
            expected, _ = grouped.setdefault(where_suffix, ([], err.get("input")))
            if (text := _expected(err)) not in expected:  # a union reports one error per branch: "an integer or a string"
                expected.append(text)
    out = []
    for where, keys in unknown.items():
        cls = _class_at(top, list(where))
        valid = sorted(f.name for f in fields(cls)) if cls else []
        if not where and top is Recipe:
            out.append(f"unknown sections {sorted(keys)}; expected some of {valid}")
        else:
            out.append(f"unknown keys in {_render(list(where), prefix)[0]}: {sorted(keys)}; expected some of {valid}")
    for (where, suffix), (expected, got) in grouped.items():
        shown = "nothing" if expected == [_EXPECTED["missing"]] else _show(got)
        out.append(f"{where} expected {' or '.join(expected)}{suffix}; got {shown}")
    return out + own


def config_error(exc: ValidationError, raw: Any, top: type = None, prefix: str = "") -> ConfigError:
    """One ConfigError for a recipe ValidationError: every problem, "; "-separated, on one line."""
    return ConfigError("recipe: " + "; ".join(_messages(exc, raw, top or Recipe, prefix)))


_PREFIX = {DataSection: "[data]", ZooSection: "[zoo]", EnsembleSection: "[ensemble]", MergeSection: "[merge]",
           DistillSection: "[distill]", BuildSection: "[build]", MemberSection: "[[members]]",
           InputSection: "[[inputs]]", ImageSection: "[[inputs]].image", Recipe: ""}


def _raise_config_errors(cls):
    """Direct construction (`DistillSection(alpha=2)`, `dataclasses.replace`, `override`) raises
    ConfigError like the TOML path, not pydantic's ValidationError."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise config_error(exc, kwargs, cls, _PREFIX[cls]) from None

    cls.__init__ = __init__
    return cls


for _cls in _PREFIX:
    _raise_config_errors(_cls)

_ADAPTER = TypeAdapter(Recipe)


def parse_recipe(data: dict) -> Recipe:
    """A Recipe from a TOML document's dict. With [[inputs]] and no [data] section, no data set is used."""
    if isinstance(data, dict) and data.get("inputs") and "data" not in data:
        data = {**data, "data": {"source": ""}}
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise config_error(exc, data) from None


def recipe_schema() -> dict:
    """The JSON Schema of a recipe document (what editors validate TOML against; `fusion recipe-schema`)."""
    schema = _ADAPTER.json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "fusion-serve build recipe",
            "$comment": "generated from fusion/recipe.py (`fusion recipe-schema`); a TOML recipe read as JSON"}


def load_recipe(path: str | Path | None) -> Recipe:
    if path is None:
        return Recipe()
    path = Path(path)
    try:
        return parse_recipe(tomllib.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"recipe: {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe: {path}: not valid TOML ({exc})") from None


def override(recipe: Recipe, section: str, **values) -> Recipe:
    """A copy with the given, non-None values replaced in one section (CLI flags over the recipe)."""
    values = {k: v for k, v in values.items() if v is not None}
    return replace(recipe, **{section: replace(getattr(recipe, section), **values)}) if values else recipe
