"""fusion/sources.py: every member source kind resolves (timm / torchvision: the real libraries, tiny random
models; stand-in modules only for the import failures), weights are safetensors only with strict keys, and
`fusion convert-weights` turns a torch checkpoint into safetensors without unpickling objects. The last
test builds a bundle from [[members]] (two python: members and a zoo:mlp) that the service loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fusion.errors import ConfigError, UnknownNameError
from fusion.sources import SOURCES, convert_weights, load_member, resolve

# --- factories for python: sources (this module is importable as tests.test_sources) ----------------------


def linear_member(in_features: int = 64, n_classes: int = 10, seed: int = 0) -> nn.Module:
    """A flat-feature classifier returning logits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, n_classes))


def softmax_member(in_features: int = 64, n_classes: int = 10, seed: int = 0) -> nn.Module:
    """A flat-feature classifier returning probabilities (declared `output = "probabilities"`)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, n_classes), nn.Softmax(dim=-1))


def not_a_module(**kwargs):
    return {"weights": [1, 2, 3]}


NOT_CALLABLE = 3


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


# --- the registry ---------------------------------------------------------------------------------------


def test_the_registry_has_every_source_kind():
    assert list(SOURCES) == ["zoo", "timm", "torchvision", "hf", "python", "onnx"]
    assert {p: s.kind for p, s in SOURCES.items()}["onnx"] == "onnx"
    assert {SOURCES[p].extra for p in ("timm", "torchvision")} == {"vision"} and SOURCES["hf"].extra == "text"


@pytest.mark.parametrize("source", ["tmm:resnet10t", "resnet10t", "s3://bucket/model"])
def test_an_unknown_prefix_lists_the_valid_ones(source):
    with pytest.raises(UnknownNameError) as info:
        resolve(source)
    assert "expected a prefix among ['zoo:', 'timm:', 'torchvision:', 'hf:', 'python:', 'onnx:']" in str(info.value)
    assert repr(source) in str(info.value)


def test_a_prefix_without_a_name_is_refused():
    with pytest.raises(ConfigError, match=r"expected something after 'timm:'"):
        resolve("timm:")


# --- zoo: and python: ----------------------------------------------------------------------------------


def test_zoo_source_builds_the_architecture_and_loads_safetensors_strictly(tmp_path):
    from fusion.zoo import build_model

    args = {"in_features": 64, "hidden": [16], "n_outputs": 10}
    torch.manual_seed(3)
    ref = build_model("mlp", **args).eval()
    save_file(_state(ref), str(tmp_path / "m.safetensors"))
    got = resolve("zoo:mlp", args, str(tmp_path / "m.safetensors"))
    x = torch.randn(5, 64)
    assert not got.training and torch.equal(got(x), ref(x))
    with pytest.raises(UnknownNameError, match=r"unknown architecture 'resnet'; expected one of \['cnn', 'mlp'\]"):
        resolve("zoo:resnet")
    with pytest.raises(ConfigError, match=r"zoo:mlp: args expected its constructor's arguments; got \['depth'\]"):
        resolve("zoo:mlp", {"depth": 3})


def test_python_source_calls_the_factory_with_args():
    m = resolve("python:tests.test_sources:linear_member", {"seed": 5, "n_classes": 3})
    ref = linear_member(seed=5, n_classes=3)
    x = torch.randn(4, 64)
    assert torch.equal(m(x), ref(x)) and m(x).shape == (4, 3)


@pytest.mark.parametrize("source, args, needle", [
    ("python:tests.test_sources:not_a_module", {}, "expected the factory to return a torch.nn.Module; got dict"),
    ("python:tests.test_sources:NOT_CALLABLE", {}, "expected a callable; got int"),
    ("python:tests.test_sources:missing", {}, "expected tests.test_sources to define 'missing'"),
    ("python:tests.no_such_module:f", {}, "could not import 'tests.no_such_module'"),
    ("python:linear_member", {}, "expected python:package.module:factory"),
    ("python:tests.test_sources:linear_member", {"width": 3}, "args expected the factory's keyword arguments; got ['width']"),
])
def test_python_source_refusals(source, args, needle):
    with pytest.raises(ConfigError) as info:
        resolve(source, args)
    assert needle in str(info.value), str(info.value)


# --- weights: safetensors only, strict keys, convert-weights ------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl", ".ckpt"])
def test_pickled_weights_are_refused_with_the_convert_command(tmp_path, suffix):
    path = tmp_path / f"member{suffix}"
    torch.save(_state(linear_member()), path)
    with pytest.raises(ConfigError) as info:
        resolve("python:tests.test_sources:linear_member", {}, str(path))
    text = str(info.value)
    assert "expected a .safetensors file" in text and "torch pickle" in text
    assert f"fusion convert-weights {path} {path.with_suffix('.safetensors')}" in text


def test_weights_with_other_keys_or_shapes_list_every_difference(tmp_path):
    state = _state(linear_member())
    state["extra.bias"] = torch.zeros(3)
    del state["2.weight"]
    state["0.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError) as info:
        resolve("python:tests.test_sources:linear_member", {}, str(tmp_path / "w.safetensors"))
    text = str(info.value)
    assert "expected the module's 4 tensors; got 4" in text
    assert "missing keys ['2.weight']" in text and "unexpected keys ['extra.bias']" in text
    assert "0.bias: expected (16,), got (7,)" in text
    with pytest.raises(ConfigError, match="no such file"):
        resolve("python:tests.test_sources:linear_member", {}, str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError) as info:  # a relative path: where it was looked for
        resolve("python:tests.test_sources:linear_member", {}, "ckpt/nope.safetensors")
    assert f"no such file (looked for {Path.cwd() / 'ckpt' / 'nope.safetensors'}: relative paths are taken from the working directory)" \
        in str(info.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        resolve("python:tests.test_sources:linear_member", {}, str(tmp_path / "junk.safetensors"))


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s, "epoch": 3}, lambda s: {"model": s}])
def test_convert_weights_round_trip_equals_torch_load(tmp_path, wrap):
    from fusion.cli import main

    model = linear_member(seed=7)
    model[0].weight.data = model[0].weight.data.t().contiguous().t()  # a non-contiguous tensor
    src, dst = tmp_path / "ckpt.pt", tmp_path / "out" / "ckpt.safetensors"
    torch.save(wrap(model.state_dict()), src)
    assert main(["convert-weights", str(src), str(dst)]) == 0
    reference = torch.load(src, weights_only=True)
    reference = reference.get("state_dict", reference.get("model", reference))
    got = load_file(str(dst))
    assert set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in got)
    # and the converted file loads as a member's weights
    loaded = resolve("python:tests.test_sources:linear_member", {}, str(dst))
    x = torch.randn(3, 64)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)  # equal weights; BLAS may round per memory layout


def test_convert_weights_keeps_tied_tensors(tmp_path):
    lin = nn.Linear(4, 4)
    state = {"a.weight": lin.weight.data, "b.weight": lin.weight.data}  # one storage, two names
    torch.save(state, tmp_path / "tied.pt")
    convert_weights(tmp_path / "tied.pt", tmp_path / "tied.safetensors")
    got = load_file(str(tmp_path / "tied.safetensors"))
    assert torch.equal(got["a.weight"], lin.weight.data) and torch.equal(got["b.weight"], lin.weight.data)


class _Touch:
    """A pickled object whose unpickling would create a file: proof that it is never unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_convert_weights_never_unpickles_objects(tmp_path, capsys):
    from fusion.cli import main

    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "hook": _Touch(marker)}, tmp_path / "evil.pt")
    assert main(["convert-weights", str(tmp_path / "evil.pt"), str(tmp_path / "evil.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "holds objects other than tensors and plain containers" in err and "weights_only=True" in err
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


@pytest.mark.parametrize("content, needle", [
    ({"epoch": 3, "lr": 0.1}, "expected a state dict (names -> tensors), or one under 'state_dict' or 'model'; got a dict"),
    ([torch.zeros(2)], "got list"),
])
def test_convert_weights_wants_a_state_dict(tmp_path, content, needle):
    torch.save(content, tmp_path / "c.pt")
    with pytest.raises(ConfigError) as info:
        convert_weights(tmp_path / "c.pt", tmp_path / "c.safetensors")
    assert needle in str(info.value)
    with pytest.raises(ConfigError, match=r"expected an output path ending in .safetensors; got '.*c.pt2'"):
        convert_weights(tmp_path / "c.pt", tmp_path / "c.pt2")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ConfigError, match="expected a torch checkpoint"):
        convert_weights(tmp_path / "text.pt", tmp_path / "t.safetensors")


# --- timm: and torchvision: (the real libraries, the [vision] extra; stand-ins only for import failures) -------


class _Spy(list):
    """Records each call's arguments and calls the real factory."""

    def __init__(self, real):
        super().__init__()
        self.real = real

    def __call__(self, name, **kwargs):
        self.append((name, kwargs))
        return self.real(name, **kwargs)


def test_timm_source_creates_the_model_without_pretrained_weights(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm", reason="the [vision] extra")
    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    save_file(_state(ref), str(tmp_path / "r.safetensors"))
    spy = _Spy(timm.create_model)
    monkeypatch.setattr(timm, "create_model", spy)
    m = resolve("timm:resnet10t", {"num_classes": 10, "in_chans": 3}, str(tmp_path / "r.safetensors"))
    assert spy == [("resnet10t", {"pretrained": False, "num_classes": 10, "in_chans": 3})]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not m.training and torch.equal(m(x), ref(x)) and m(x).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"timm:nope: expected a model name from timm.list_models\(\); got 'nope'"):
        resolve("timm:nope")
    for key in ("pretrained", "checkpoint_path"):
        with pytest.raises(ConfigError, match=rf"args expected none of .*; got \['{key}'\]"):
            resolve("timm:resnet10t", {key: True})
    with pytest.raises(ConfigError, match=r"timm:resnet10t: args expected the model's keyword arguments; got \['no_such_arg'\]"):
        resolve("timm:resnet10t", {"no_such_arg": 1})


def test_torchvision_source_gets_the_model_with_weights_none(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision", reason="the [vision] extra")
    torch.manual_seed(1)
    ref = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    save_file(_state(ref), str(tmp_path / "r18.safetensors"))
    spy = _Spy(torchvision.models.get_model)
    monkeypatch.setattr(torchvision.models, "get_model", spy)
    m = resolve("torchvision:resnet18", {"num_classes": 10}, str(tmp_path / "r18.safetensors"))
    assert spy == [("resnet18", {"weights": None, "num_classes": 10})] and type(m) is type(ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not m.training and torch.equal(m(x), ref(x))
    n = len(torchvision.models.list_models())
    with pytest.raises(ConfigError, match=rf"expected a name from torchvision.models.list_models\(\) \({n} names, "
                                          r"e.g. \[.*\]\); got 'resnet1000'"):
        resolve("torchvision:resnet1000")
    with pytest.raises(ConfigError, match=r"got \['weights'\]"):
        resolve("torchvision:resnet18", {"weights": "IMAGENET1K_V1"})
    # a checkpoint of another width: the shape mismatch named, nothing loaded
    with pytest.raises(ConfigError, match=r"shape mismatches \['fc.bias: expected \(3,\), got \(10,\)'"):
        resolve("torchvision:resnet18", {"num_classes": 3}, str(tmp_path / "r18.safetensors"))


@pytest.mark.parametrize("lib, source", [("timm", "timm:resnet10t"), ("torchvision", "torchvision:resnet18")])
def test_a_missing_vision_library_names_the_extra(monkeypatch, lib, source):
    monkeypatch.setitem(sys.modules, lib, None)  # import of it fails as if not installed
    with pytest.raises(ConfigError) as info:
        resolve(source)
    text = str(info.value)
    assert f"needs the Python package '{lib}', which is not installed" in text
    assert "pip install 'fusion-serve[vision]'" in text


def test_torchvision_that_does_not_load_with_this_torch_says_why_and_what_works(monkeypatch, tmp_path):
    """What torchvision's PyPI wheel does with the CPU torch wheel ("operator torchvision::nms does not exist"),
    reproduced by a stand-in package that fails the same way on import."""
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    with pytest.raises(ConfigError) as info:
        resolve("torchvision:resnet18")
    text = str(info.value)
    assert "torchvision is installed but does not import with this torch" in text
    assert "operator torchvision::nms does not exist" in text and "CUDA build of torch" in text
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text


# --- hf:DIR (a tiny random BERT and ViT saved with save_pretrained) -----------------------------------------

transformers = pytest.importorskip("transformers")  # the [text] extra, installed by `make install-dev`


def _tiny_bert(num_labels: int = 3):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    model = _tiny_bert()
    single, sharded = tmp_path_factory.mktemp("bert"), tmp_path_factory.mktemp("bert_sharded")
    model.save_pretrained(single, safe_serialization=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    return model, single, sharded


def test_hf_directory_single_and_sharded_give_the_saved_model(bert_dirs):
    model, single, sharded = bert_dirs
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        for directory in (single, sharded):
            m = resolve(f"hf:{directory}")
            assert m.input_names == ("input_ids", "attention_mask", "token_type_ids") and not m.training
            assert torch.allclose(m(ids, mask, torch.zeros_like(ids)), expected, atol=1e-6)


def test_hf_weights_file_loads_into_the_transformers_model(bert_dirs, tmp_path):
    """`weights` on an hf: member (a fine-tune saved as a plain state dict) replaces the directory's tensors."""
    _, single, _ = bert_dirs
    torch.manual_seed(9)
    tuned = transformers.BertForSequenceClassification(_tiny_bert().config).eval()
    save_file(_state(tuned), str(tmp_path / "tuned.safetensors"))
    m = resolve(f"hf:{single}", {}, str(tmp_path / "tuned.safetensors"))
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(m(ids, torch.ones_like(ids)), tuned(input_ids=ids).logits, atol=1e-6)


def test_hf_image_classifier_directory(tmp_path):
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=37, num_labels=4)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    m = resolve(f"hf:{tmp_path}")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert m.input_names == ("pixel_values",) and torch.allclose(m(x), model(pixel_values=x).logits, atol=1e-6)


def test_hub_ids_are_never_fetched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no directory of that name here
    for hub_id in ("bert-base-uncased", "google/vit-base-patch16-224"):
        with pytest.raises(ConfigError) as info:
            resolve(f"hf:{hub_id}")
        text = str(info.value)
        assert "expected an existing local directory" in text and "hub ids are not fetched" in text and hub_id in text
    with pytest.raises(ConfigError, match="which is not a directory"):
        resolve(f"hf:{tmp_path / 'nope'}")


def test_hf_refusals(bert_dirs, tmp_path):
    model, single, _ = bert_dirs
    with pytest.raises(ConfigError, match=r"args expected none of .*; got \['trust_remote_code'\]"):
        resolve(f"hf:{single}", {"trust_remote_code": True})
    # only a pickle: refused, pointing at convert-weights
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((single / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError) as info:
        resolve(f"hf:{pickled}")
    assert "expected model.safetensors or model.safetensors.index.json" in str(info.value)
    assert f"fusion convert-weights {pickled / 'pytorch_model.bin'}" in str(info.value)
    # a checkpoint missing a tensor: refused, not left randomly initialised
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((single / "config.json").read_text())
    state = load_file(str(single / "model.safetensors"))
    del state["classifier.weight"]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"do not match BertForSequenceClassification: missing keys \['classifier.weight'\]"):
        resolve(f"hf:{partial}")
    # an architecture without a classification head
    (partial / "config.json").write_text(json.dumps({**json.loads((single / "config.json").read_text()),
                                                     "architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match=r"expected a classifier ending in one of .*; got \['BertModel'\]"):
        resolve(f"hf:{partial}")


def test_a_missing_text_library_names_the_extra(bert_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"needs the Python package 'transformers'.*pip install 'fusion-serve\[text\]'"):
        resolve(f"hf:{bert_dirs[1]}")


# --- onnx: ---------------------------------------------------------------------------------------------


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_onnx_source_returns_the_model_proto(tmp_path):
    import onnx

    _tiny_onnx(tmp_path / "m.onnx")
    proto = resolve(f"onnx:{tmp_path / 'm.onnx'}")
    assert isinstance(proto, onnx.ModelProto) and proto == onnx.load(str(tmp_path / "m.onnx"))
    with pytest.raises(ConfigError, match="carries its own weights"):
        resolve(f"onnx:{tmp_path / 'm.onnx'}", {}, "w.safetensors")
    with pytest.raises(ConfigError, match="takes no constructor arguments"):
        resolve(f"onnx:{tmp_path / 'm.onnx'}", {"num_classes": 3})
    with pytest.raises(ConfigError, match="no such file"):
        resolve(f"onnx:{tmp_path / 'nope.onnx'}")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xfe not protobuf")
    with pytest.raises(ConfigError, match="expected an ONNX model file"):
        resolve(f"onnx:{tmp_path / 'junk.onnx'}")


def test_load_member_carries_the_recipe_fields_and_names_the_member(tmp_path):
    from fusion.recipe import parse_recipe

    _tiny_onnx(tmp_path / "m.onnx")
    recipe = parse_recipe({"members": [
        {"name": "lin", "source": "python:tests.test_sources:linear_member", "args": {"seed": 1}},
        {"name": "foreign", "source": f"onnx:{tmp_path / 'm.onnx'}", "output": "probabilities", "output_name": "y",
         "input_map": {"x": "input"}},
        {"name": "bad", "source": "python:tests.test_sources:not_a_module"},
    ]})
    lin, foreign = load_member(recipe.members[0]), load_member(recipe.members[1])
    assert lin.kind == "torch" and isinstance(lin.module, nn.Module) and lin.args == {"seed": 1}
    assert foreign.kind == "onnx" and foreign.module is None and foreign.output == "probabilities"
    assert foreign.input_map == {"x": "input"} and foreign.output_name == "y"
    with pytest.raises(ConfigError, match=r"^member 'bad': python:tests.test_sources:not_a_module: expected"):
        load_member(recipe.members[2])


# --- fusion build with [[members]] --------------------------------------------------------------------------


def test_build_from_members_serves_an_ensemble_equal_to_torch(tmp_path, digits):
    """Two python: members (one declared to return probabilities) and a zoo:mlp with safetensors weights:
    `fusion build --recipe` writes a bundle whose ensemble graph (onnxruntime) equals the members' soft vote
    computed in torch, and the service's runtime loads it (digests, probe re-run) and serves every member."""
    import onnxruntime as ort

    from fusion.cli import main
    from fusion.zoo import build_model, init_scaler
    from service.runtime import RuntimeConfig, load

    zoo_args = {"in_features": 64, "hidden": [16], "n_outputs": 10}
    torch.manual_seed(11)
    mlp = build_model("mlp", **zoo_args).eval()
    init_scaler(mlp, digits.scaling)
    save_file(_state(mlp), str(tmp_path / "mlp_z.safetensors"))
    out = tmp_path / "bundle"
    (tmp_path / "recipe.toml").write_text(f"""
[ensemble]
weights = "equal"
[distill]
hidden = [16]
epochs = 2
[build]
out = "{out}"
compare = false

[[members]]
name = "lin_a"
source = "python:tests.test_sources:linear_member"
args = {{ seed = 1 }}

[[members]]
name = "soft_b"
source = "python:tests.test_sources:softmax_member"
args = {{ seed = 2 }}
output = "probabilities"

[[members]]
name = "mlp_z"
source = "zoo:mlp"
weights = "{tmp_path / 'mlp_z.safetensors'}"
args = {{ in_features = 64, hidden = [16], n_outputs = 10 }}
""")
    assert main(["build", "--recipe", str(tmp_path / "recipe.toml")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["variants"]["ensemble"]["members"] == ["lin_a", "soft_b", "mlp_z"]
    assert set(manifest["variants"]) == {"ensemble", "distilled"}  # [[members]] are not merged (a logged note)
    assert manifest["members"]["soft_b"]["arch"]["arch"] == "python:tests.test_sources:softmax_member"

    X = np.ascontiguousarray(digits.X_test, dtype=np.float32)
    x = torch.from_numpy(X)
    with torch.no_grad():  # the reference: each member's probabilities, averaged
        probs = {"lin_a": torch.softmax(linear_member(seed=1)(x), -1), "soft_b": softmax_member(seed=2)(x),
                 "mlp_z": torch.softmax(mlp(x), -1)}
    expected = torch.stack(list(probs.values())).mean(0).numpy()
    sess = ort.InferenceSession(str(out / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": X})[0], expected, atol=1e-5)

    served = load(out, RuntimeConfig(device="cpu"))
    np.testing.assert_allclose(served.predict("ensemble", X), expected, atol=1e-5)
    for name, p in probs.items():
        np.testing.assert_allclose(served.predict(name, X), p.numpy(), atol=1e-5)


def test_build_composes_onnx_members_with_torch_members(tmp_path):
    """An onnx: member beside a python: member over one [[inputs]] tensor: `fusion build` composes one graph
    (fusion/compose.py) that equals the two run separately (onnxruntime / torch) and the service serves it."""
    import onnxruntime as ort

    from fusion.build import ensure_zoo
    from fusion.cli import main
    from fusion.recipe import load_recipe
    from service.runtime import RuntimeConfig, load

    _tiny_onnx(tmp_path / "m.onnx")
    out = tmp_path / "bundle"
    (tmp_path / "recipe.toml").write_text(f"""
[ensemble]
weights = "equal"
[build]
out = "{out}"

[[inputs]]
name = "x"
shape = ["batch", 4]

[[members]]
name = "foreign"
source = "onnx:{tmp_path / 'm.onnx'}"

[[members]]
name = "lin"
source = "python:tests.test_sources:linear_member"
args = {{ in_features = 4, n_classes = 3, seed = 4 }}
""")
    assert main(["build", "--recipe", str(tmp_path / "recipe.toml")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["variants"]["ensemble"]["members"] == ["foreign", "lin"] and manifest["inputs"][0]["name"] == "x"
    X = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    onnx_logits = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    with torch.no_grad():
        torch_logits = linear_member(in_features=4, n_classes=3, seed=4)(torch.from_numpy(X))
    expected = (torch.softmax(torch.from_numpy(onnx_logits), -1) + torch.softmax(torch_logits, -1)).numpy() / 2
    served = load(out, RuntimeConfig(device="cpu"))
    np.testing.assert_allclose(served.predict("ensemble", {"x": X}), expected, atol=1e-5)
    # the steps that need torch modules say why they cannot take an onnx: member
    with pytest.raises(ConfigError, match=r"onnx: members are composed by fusion/compose.py and have no torch module"):
        ensure_zoo(load_recipe(tmp_path / "recipe.toml"), None)


def test_torch_members_with_inputs_and_no_data_are_composed(tmp_path):
    """[[inputs]] and no [data]: no data set; the torch members are exported alone and composed, and the
    gate compares the graph with them on random inputs drawn from the spec."""
    from fusion.build import build_bundle
    from fusion.recipe import parse_recipe

    recipe = parse_recipe({
        "inputs": [{"name": "feats", "shape": ["batch", 6]}], "build": {"out": str(tmp_path / "b")},
        "members": [{"name": f"lin_{i}", "source": "python:tests.test_sources:linear_member",
                     "args": {"in_features": 6, "n_classes": 4, "seed": i}} for i in (1, 2)],
    })
    assert recipe.data.source == ""
    manifest = build_bundle(recipe)
    assert set(manifest.variants) == {"ensemble"} and set(manifest.members) == {"lin_1", "lin_2"}
    assert manifest.variants["ensemble"].parity is not None
    import onnxruntime as ort

    X = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(linear_member(6, 4, seed=i)(torch.from_numpy(X)), -1) for i in (1, 2)]).mean(0)
    got = ort.InferenceSession(str(tmp_path / "b" / "ensemble.onnx"), providers=["CPUExecutionProvider"]).run(None, {"feats": X})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_onnx_members_need_inputs_and_no_data_driven_weights(tmp_path):
    from fusion.build import build_bundle
    from fusion.recipe import parse_recipe

    _tiny_onnx(tmp_path / "m.onnx")
    member = {"name": "foreign", "source": f"onnx:{tmp_path / 'm.onnx'}"}
    with pytest.raises(ConfigError, match=r"expected \[\[inputs\]\] naming the bundle's inputs"):
        build_bundle(parse_recipe({"members": [member]}))
    inputs = [{"name": "x", "shape": ["batch", 4]}]
    with pytest.raises(ConfigError, match=r"built without data; expected weights 'equal'.*got weights 'select'"):
        build_bundle(parse_recipe({"members": [member], "inputs": inputs, "ensemble": {"weights": "select"}}))
    torch_only = {"name": "lin", "source": "python:tests.test_sources:linear_member"}
    with pytest.raises(ConfigError, match=r"\[data\].source with \[\[inputs\]\] expected a .npz file .*got 'digits'"):
        build_bundle(parse_recipe({"members": [torch_only], "inputs": inputs, "data": {"source": "digits"}}))


def test_reserved_member_names_are_refused(tmp_path):
    from fusion.build import ensure_zoo
    from fusion.recipe import parse_recipe

    recipe = parse_recipe({"members": [{"name": "ensemble", "source": "python:tests.test_sources:linear_member"}]})
    with pytest.raises(ConfigError, match=r"member names \['ensemble'\] are reserved"):
        ensure_zoo(recipe, None)
