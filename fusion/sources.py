"""Where a member comes from: a `MemberSource` registry resolving the recipe's `source` strings (issue 15).

    zoo:mlp | zoo:cnn              fusion/zoo.py's architectures, `args` as constructor arguments
    timm:NAME                      timm.create_model(NAME, pretrained=False, **args)          [vision] extra
    torchvision:NAME               torchvision.models.get_model(NAME, weights=None, **args)   [vision] extra
    hf:DIR                         a local Hugging Face directory (config.json + model.safetensors, or
                                   sharded with model.safetensors.index.json): AutoModelFor{Sequence,Image}-
                                   Classification from the config's `architectures`        [text] extra
    python:package.module:factory  a callable returning an nn.Module, `args` as keywords (imported from
                                   sys.path, then the current directory)
    onnx:PATH                      an ONNX file, returned as an onnx.ModelProto: it cannot be re-exported and
                                   is composed into the fused graph (fusion/compose.py)

Nothing is ever downloaded (no hub ids, `pretrained=False`, `weights=None`, `local_files_only`), no
remote code runs (`trust_remote_code=False`), and nothing is unpickled: weights are safetensors, loaded
with strict key matching; `convert_weights` (`fusion convert-weights IN.pt OUT.safetensors`) turns a
torch checkpoint into safetensors with `torch.load(weights_only=True)`, which refuses arbitrary objects.

This module imports only the standard library at import time (fusion/recipe.py checks source prefixes
with it and stays torch-free); torch and the optional libraries load when a member is resolved.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fusion.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from fusion.recipe import MemberSection

# the offline install's extras (pyproject.toml) and what each brings
EXTRAS = {"vision": "timm, torchvision, pillow", "text": "transformers, tokenizers", "build": "torch, onnx, safetensors"}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar")
# torchvision's PyPI wheels link against the CUDA build of torch; the pair pyproject.toml pins ([build], [vision])
TORCHVISION_PAIR = "torch==2.14.1 torchvision==0.29.1"


@dataclass(frozen=True)
class MemberSource:
    """One source kind: `load(ref, args)` returns an nn.Module ("torch") or an onnx.ModelProto ("onnx")."""

    prefix: str
    load: Callable[[str, dict], Any]
    kind: str  # "torch" | "onnx"
    extra: str  # the pip extra of fusion-serve it needs beyond [build] ("": none)
    doc: str


SOURCES: dict[str, MemberSource] = {}


def register_source(prefix: str, *, kind: str = "torch", extra: str = "", doc: str = ""):
    """Register a source kind under `prefix` (`source = "prefix:ref"` in a recipe's [[members]])."""

    def deco(fn):
        SOURCES[prefix] = MemberSource(prefix, fn, kind, extra, doc or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def split_source(source: str) -> tuple[str, str]:
    """("timm", "resnet10t") from "timm:resnet10t"; an unknown prefix lists the valid ones."""
    prefix, sep, ref = source.partition(":")
    valid = [f"{p}:" for p in SOURCES]
    if not sep or prefix not in SOURCES:
        raise UnknownNameError(f"source expected a prefix among {valid} (e.g. 'timm:resnet10t'); got {source!r}")
    if not ref:
        raise ConfigError(f"source expected something after '{prefix}:' ({SOURCES[prefix].doc}); got {source!r}")
    return prefix, ref


def check_source(source: str) -> None:
    """Refuse a source string whose prefix is unknown (the recipe calls this; nothing is loaded)."""
    split_source(source)


def source_kind(source: str) -> str:
    """"torch" or "onnx": what resolving `source` gives."""
    return SOURCES[split_source(source)[0]].kind


def missing_extra(module: str, extra: str, why: str) -> ConfigError:
    return ConfigError(f"{why} needs the Python package '{module}', which is not installed: install the "
                       f"[{extra}] extra ({EXTRAS[extra]}): pip install 'fusion-serve[{extra}]' "
                       f"(in a checkout: .venv/bin/pip install -e '.[{extra}]')")


def _refuse_args(args: dict, keys: tuple[str, ...], why: str) -> None:
    bad = sorted(k for k in args if k in keys)
    if bad:
        raise ConfigError(f"args expected none of {list(keys)} ({why}); got {bad}")


# --- loaded members ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedMember:
    """A resolved `[[members]]` table: `module` (torch sources) or `onnx` (onnx: sources), plus its fields."""

    name: str
    source: str
    module: Any = None  # torch.nn.Module, eval mode, weights loaded
    onnx: Any = None  # onnx.ModelProto
    args: dict = field(default_factory=dict)
    weights: str = ""
    output: str = "logits"
    input_map: dict = field(default_factory=dict)
    output_name: str = ""

    @property
    def kind(self) -> str:
        return "onnx" if self.onnx is not None else "torch"


def resolve(source: str, args: dict | None = None, weights: str = "") -> Any:
    """The Python API of a member's `source`/`args`/`weights`: an nn.Module in eval mode (weights loaded
    from safetensors, strictly) or an onnx.ModelProto."""
    prefix, ref = split_source(source)
    src = SOURCES[prefix]
    obj = src.load(ref, dict(args or {}))
    if src.kind == "onnx":
        if weights:
            raise ConfigError(f"{source}: an ONNX file carries its own weights; expected weights = \"\"; got {weights!r}")
        return obj
    if weights:  # hf: into the transformers model itself, whose keys the file has (not the logits wrapper's)
        load_weights(obj.model if prefix == "hf" else obj, weights, what=source)
    return obj.eval()


def load_member(member: "MemberSection") -> LoadedMember:
    """Resolve one recipe `[[members]]` table."""
    try:
        obj = resolve(member.source, member.args, member.weights)
    except ConfigError as exc:
        raise type(exc)(f"member '{member.name}': {exc}") from exc.__cause__
    kind = SOURCES[split_source(member.source)[0]].kind
    return LoadedMember(
        name=member.name, source=member.source, module=obj if kind == "torch" else None,
        onnx=obj if kind == "onnx" else None, args=dict(member.args), weights=member.weights, output=member.output,
        input_map=dict(member.input_map), output_name=member.output_name,
    )


# --- weights: safetensors only -----------------------------------------------------------------------


def _convert_hint(path: Path) -> str:
    return f"convert it once with `fusion convert-weights {path} {path.with_suffix('.safetensors')}`"


def check_weights_path(path: str | Path) -> Path:
    """A .safetensors file that exists; a pickle (.pt, .bin...) is refused with the command that converts it."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ConfigError(f"weights expected a .safetensors file; got {str(path)!r}, a torch pickle, which is never "
                          f"loaded here (unpickling runs arbitrary code): {_convert_hint(path)}")
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"weights expected a .safetensors file; got {str(path)!r}")
    if not path.is_file():
        raise ConfigError(f"weights {str(path)!r}: no such file{_looked_in(path)}")
    return path


def _looked_in(path: Path) -> str:
    """For a relative path that is not there: where it was looked for (recipes' paths are the working directory's)."""
    return "" if path.is_absolute() else f" (looked for {path.absolute()}: relative paths are taken from the working directory)"


def _few(keys: list[str], n: int = 8) -> str:
    return f"{keys[:n]}" + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def tied_groups(state: dict) -> list[list[str]]:
    """The names in a module's state dict that are one tensor (tied weights), as groups of two or more, in order."""
    views: dict[tuple, list[str]] = {}
    for k, v in state.items():
        if v.numel():
            views.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride())), []).append(k)
    return [names for names in views.values() if len(names) > 1]


def complete_tied(expected: dict, got: dict) -> dict:
    """`got` plus every entry of `expected` (a module's state dict) that is one tensor with an entry `got` has.

    Tied weights (an output head that is the embedding matrix, any parameter a module uses twice) are one tensor
    under two names; safetensors' `save_model` and transformers' `save_pretrained` write it once, under one of
    them, so a strict key match would call the other missing. Entries that are not tied are left as they are."""
    out = dict(got)
    for names in tied_groups(expected):
        present = [k for k in names if k in got]
        for k in names if present else ():
            out.setdefault(k, got[present[0]])
    return out


def check_state_dict(expected: dict, got: dict, what: str) -> None:
    """Strict key (and shape) matching of a state dict against a module's; the message lists the differences."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    if missing or unexpected or shapes:
        parts = ([f"missing keys {_few(missing)}"] if missing else []) + \
                ([f"unexpected keys {_few(unexpected)}"] if unexpected else []) + \
                ([f"shape mismatches {_few([f'{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}' for k in shapes], 4)}"]
                 if shapes else [])
        raise ConfigError(f"{what}: expected the module's {len(expected)} tensors; got {len(got)} with " + "; ".join(parts))


def load_weights(module: "nn.Module", path: str | Path, what: str = "weights") -> "nn.Module":
    """Load a safetensors file into `module` with strict key and shape matching."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_weights_path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"weights {str(path)!r}: not a readable safetensors file ({exc})") from None
    expected = module.state_dict()
    state = complete_tied(expected, state)
    check_state_dict(expected, state, f"{what} weights {str(path)!r}")
    module.load_state_dict(state, strict=True)
    return module


def _tensors_of(obj: Any, src: Path) -> dict:
    """The state dict inside a loaded checkpoint: the dict itself, or its "state_dict" / "model" entry."""
    import torch

    def is_state_dict(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if is_state_dict(obj.get(key)):
                return obj[key]
    what = (f"a dict with keys {_few(sorted(map(str, obj)))}" if isinstance(obj, dict) else type(obj).__name__)
    raise ConfigError(f"{src}: expected a state dict (names -> tensors), or one under 'state_dict' or 'model'; got {what}")


def convert_weights(src: str | Path, dst: str | Path) -> dict:
    """`fusion convert-weights IN.pt OUT.safetensors`: a torch checkpoint's tensors as safetensors.

    Read with `torch.load(weights_only=True)`, which rebuilds only tensors and plain containers and refuses
    any other object (no arbitrary unpickling). Shared storage (tied weights) is cloned per name, which
    safetensors needs. Written atomically. Returns {"tensors": n, "bytes": size}."""
    import pickle

    import torch
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise ConfigError(f"expected an output path ending in .safetensors; got {str(dst)!r}")
    if not src.is_file():
        raise ConfigError(f"{str(src)!r}: no such file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{src} holds objects other than tensors and plain containers, which are "
                          f"never unpickled (torch.load(weights_only=True): {first}); save model.state_dict() "
                          f"from the code that made it instead") from None
    except Exception as exc:  # noqa: BLE001 - on bytes that are not a checkpoint torch.load raises anything (KeyError...)
        raise ConfigError(f"{src}: expected a torch checkpoint (torch.save); could not read it: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in _tensors_of(obj, src).items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "converted_from": src.name})
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"tensors": len(state), "bytes": dst.stat().st_size}


# --- the sources -------------------------------------------------------------------------------------


@register_source("zoo")
def _zoo(ref: str, args: dict) -> "nn.Module":
    """fusion/zoo.py's architectures (mlp, cnn), `args` as constructor arguments."""
    from fusion.zoo import build_model

    try:
        return build_model(ref, **args)
    except TypeError as exc:
        raise ConfigError(f"zoo:{ref}: args expected its constructor's arguments; got {sorted(args)} ({exc})") from None


def _import_vision(lib: str):
    """timm or torchvision, or a ConfigError saying what is missing or why it does not load."""
    try:
        return importlib.import_module(lib)
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name or lib, "vision", f"source '{lib}:'") from None
    except (RuntimeError, ImportError, OSError) as exc:  # "operator torchvision::nms does not exist", undefined symbols
        import torch

        raise ConfigError(
            f"source '{lib}:': {lib} is installed but does not import with this torch ({torch.__version__}): "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}. torchvision's PyPI "
            f"wheels are built against the CUDA build of torch (they need libtorch_cuda.so) and do not load with the "
            f"CPU-only torch wheel; install a matching pair, e.g. pip install '{TORCHVISION_PAIR.split()[0]}' "
            f"'{TORCHVISION_PAIR.split()[1]}' timm, the pair fusion-serve[build,vision] pins (the CUDA build of torch; its "
            f"models run on the CPU too), "
            f"or the torchvision of the PyTorch CPU index that matches torch {torch.__version__}") from None


@register_source("timm", extra="vision")
def _timm(ref: str, args: dict) -> "nn.Module":
    """timm.create_model(NAME, pretrained=False, **args); weights from `weights`, never downloaded."""
    _refuse_args(args, ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"),
                 "weights come from `weights = FILE.safetensors`; nothing is downloaded or unpickled")
    timm = _import_vision("timm")
    # create_model reads `hf-hub:ORG/NAME` (a download from huggingface.co, even with pretrained=False) and
    # `local-dir:PATH` (any config.json) as config sources: only a plain name from list_models() is built.
    names = timm.list_models()
    if ":" in ref or "/" in ref or ref not in names:
        close = difflib.get_close_matches(ref.rsplit(":", 1)[-1].rsplit("/", 1)[-1].split(".", 1)[0], names, n=5)
        raise ConfigError(f"timm:{ref}: expected a model name from timm.list_models(); got {ref!r} ({len(names)} "
                          f"names; no hub, local-dir or path references{f'; close matches: {close}' if close else ''})")
    try:
        return timm.create_model(ref, pretrained=False, **args)
    except TypeError as exc:
        raise ConfigError(f"timm:{ref}: args expected the model's keyword arguments; got {sorted(args)} ({exc})") from None


@register_source("torchvision", extra="vision")
def _torchvision(ref: str, args: dict) -> "nn.Module":
    """torchvision.models.get_model(NAME, weights=None, **args); weights from `weights`, never downloaded."""
    _refuse_args(args, ("weights", "weights_backbone", "progress"),
                 "weights come from `weights = FILE.safetensors`; nothing is downloaded")
    tv = _import_vision("torchvision")
    names = list(tv.models.list_models())
    if ref not in names:
        raise ConfigError(f"torchvision:{ref}: expected a name from torchvision.models.list_models() "
                          f"({len(names)} names, e.g. {names[:6]}); got {ref!r}")
    try:
        return tv.models.get_model(ref, weights=None, **args)
    except TypeError as exc:
        raise ConfigError(f"torchvision:{ref}: args expected the model's keyword arguments; got {sorted(args)} ({exc})") from None


# --- hf:DIR ------------------------------------------------------------------------------------------

HF_HEADS = {  # the head an architecture name ends with -> transformers' Auto class and the graph's inputs
    "ForSequenceClassification": ("AutoModelForSequenceClassification", ("input_ids", "attention_mask", "token_type_ids")),
    "ForImageClassification": ("AutoModelForImageClassification", ("pixel_values",)),
}
HF_REFUSED_ARGS = ("trust_remote_code", "local_files_only", "use_safetensors", "revision", "token", "cache_dir",
                   "force_download", "proxies", "subfolder")


def _hf_wrapper(model, input_names: tuple[str, ...]):
    """The HF model as a module returning its logits tensor, taking exactly the inputs its forward knows."""
    from torch import nn

    accepted = inspect.signature(model.forward).parameters
    names = tuple(n for n in input_names if n in accepted)

    class HFLogits(nn.Module):
        """forward(*inputs) -> logits (batch, num_labels); `input_names` orders the inputs."""

        def __init__(self, inner):
            super().__init__()
            self.model = inner
            self.input_names = names

        def forward(self, *inputs):
            return self.model(**dict(zip(self.input_names, inputs)), return_dict=True).logits

    return HFLogits(model)


@register_source("hf", extra="text")
def _hf(ref: str, args: dict) -> "nn.Module":
    """A local Hugging Face directory: config.json + model.safetensors (or sharded, with its index)."""
    directory = Path(ref)
    if not directory.is_dir():
        hub_like = not directory.exists() and not ref.startswith((".", "/", "~")) and ref.count("/") <= 1
        raise ConfigError(
            f"hf:{ref}: expected an existing local directory (config.json + model.safetensors); got "
            + (f"{ref!r}, which looks like a Hugging Face Hub id: hub ids are not fetched (no downloads at build "
               f"time); download it yourself (e.g. `hf download {ref} --local-dir DIR`) and use hf:DIR"
               if hub_like else f"{ref!r}, which is not a directory"))
    _refuse_args(args, HF_REFUSED_ARGS, "the directory is read as it is: local files, safetensors, no remote code")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"hf:{ref}: expected config.json in the directory; got {sorted(p.name for p in directory.iterdir())}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"hf:{ref}: config.json is not valid JSON ({exc})") from None
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if not single.is_file() and not index.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (f"; it has {pickles}, torch pickles that are never loaded here: {_convert_hint(directory / pickles[0])} "
                f"and name it model.safetensors" if pickles else "")
        raise ConfigError(f"hf:{ref}: expected model.safetensors or model.safetensors.index.json (sharded) in the "
                          f"directory{hint}")
    archs = config.get("architectures") or []
    heads = [(a, suffix) for a in archs for suffix in HF_HEADS if a.endswith(suffix)]
    if not heads:
        raise ConfigError(f"hf:{ref}: config.json's architectures expected a classifier ending in one of "
                          f"{list(HF_HEADS)}; got {archs}")
    auto_name, input_names = HF_HEADS[heads[0][1]]
    try:
        transformers = importlib.import_module("transformers")
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name or "transformers", "text", "source 'hf:'") from None
    auto = getattr(transformers, auto_name)
    transformers.utils.logging.disable_progress_bar()  # `fusion build` prints one line per stage, no bars
    try:
        model, info = auto.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False, use_safetensors=True,
            output_loading_info=True, **args,
        )
    except (OSError, ValueError, KeyError) as exc:  # unknown model_type, unreadable shards, a config it refuses
        raise ConfigError(f"hf:{ref}: transformers could not load the directory ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = [f"{k}: expected {tuple(b)}, got {tuple(a)}" for k, a, b in info.get("mismatched_keys") or []]
    if missing or unexpected or mismatched:
        parts = ([f"missing keys {_few(missing)} (left randomly initialised)"] if missing else []) + \
                ([f"unexpected keys {_few(unexpected)}"] if unexpected else []) + \
                ([f"shape mismatches {_few(mismatched, 4)}"] if mismatched else [])
        raise ConfigError(f"hf:{ref}: the safetensors do not match {archs[0]}: " + "; ".join(parts))
    return _hf_wrapper(model.float().eval(), input_names)  # float32 whatever the saved dtype: the gate compares in it


# --- python: and onnx: -------------------------------------------------------------------------------


@register_source("python")
def _python(ref: str, args: dict) -> "nn.Module":
    """A factory `package.module:callable` returning an nn.Module, `args` as keywords."""
    from torch import nn

    module_name, sep, attr = ref.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"python:{ref}: expected python:package.module:factory; got {'python:' + ref!r}")
    if os.getcwd() not in sys.path:  # the console script's sys.path lacks the directory it runs in
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"python:{ref}: could not import {module_name!r} ({exc})") from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"python:{ref}: expected {module_name} to define {attr!r}; it does not")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"python:{ref}: expected a callable; got {type(factory).__name__}")
    try:
        obj = factory(**args)
    except TypeError as exc:
        raise ConfigError(f"python:{ref}: args expected the factory's keyword arguments; got {sorted(args)} ({exc})") from None
    if not isinstance(obj, nn.Module):
        raise ConfigError(f"python:{ref}: expected the factory to return a torch.nn.Module; got {type(obj).__name__}")
    return obj


@register_source("onnx", kind="onnx")
def _onnx(ref: str, args: dict):
    """An ONNX file from any exporter, as an onnx.ModelProto (composed into the fused graph, never re-exported)."""
    import onnx

    if args:
        raise ConfigError(f"onnx:{ref}: an ONNX file takes no constructor arguments; expected args = {{}}; got {sorted(args)}")
    path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"onnx:{ref}: no such file{_looked_in(path)}")
    try:
        return onnx.load(str(path))  # external data, if any, from the file's directory
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: not an ONNX file
        raise ConfigError(f"onnx:{ref}: expected an ONNX model file; could not parse it ({type(exc).__name__}: {exc})") from None
