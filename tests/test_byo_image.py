"""Bring-your-own image members (issue 15): real timm and torchvision models beside a foreign ONNX file.

A mixed ensemble — one ONNX-only member (built with onnx.helper, opset 13, returning probabilities under its
own input name), a timm `resnet10t` and a torchvision `resnet18` (random init, num_classes=10, weights
round-tripped through safetensors) — over one `[[inputs]] kind = "image"` input is built by `fusion build`
from a recipe, and compared with an independent reference: the original modules in torch and the original
file in onnxruntime, each on pixels normalised in numpy, `(x * scale - mean) / std`, softmaxed and averaged.
The normalisation is inside every graph (fusion/imagenorm.py): the service sends raw 0..255 pixels, and a PNG
posted to a real `bentoml serve` gives the composed graph's answer on Pillow's decoded pixels.
"""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fusion.bundle import TensorSpec
from fusion.errors import MemberError

timm = pytest.importorskip("timm", reason="the [vision] extra: pip install -e '.[vision]'")
torchvision = pytest.importorskip("torchvision", reason="the [vision] extra: pip install -e '.[vision]'")

SIZE = 32  # small images: the graphs are the real architectures, the pixels few
MEAN, STD, SCALE = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 1 / 255
SPEC = TensorSpec(name="pixels", dtype="float32", shape=("batch", 3, SIZE, SIZE), kind="image",
                  image={"mode": "RGB", "scale": SCALE, "mean": MEAN, "std": STD})
ATOL = 1e-5


def normalised(x: np.ndarray) -> np.ndarray:
    """The reference normalisation, written out here (not fusion.imagenorm's)."""
    mean = np.asarray(MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD, np.float32).reshape(1, 3, 1, 1)
    return (np.asarray(x, np.float32) * np.float32(SCALE) - mean) / std


def raw_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, SIZE, SIZE)).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def foreign_onnx(path, seed: int = 5) -> None:
    """An ONNX-only member: Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax, opset 13, IR 7, input
    `img` with a symbolic batch, output `probs` (probabilities), as another exporter would leave it."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "b")
    fw = numpy_helper.from_array(rng.normal(0, 1.0, (6, 10)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fb")
    nodes = [helper.make_node("Conv", ["img", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fw", "fb"], ["z"]),
             helper.make_node("Softmax", ["z"], ["probs"], axis=1)]
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], [w, b, fw, fb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="handmade")
    model.ir_version = 7
    onnx.save(model, str(path))


def spread_head(head: torch.nn.Linear, std: float, seed: int) -> None:
    """Random-init heads answer almost uniformly; wider ones make the probabilities differ between rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.5)


def save_state(module: torch.nn.Module, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The three members (the reference modules kept here) and the bundle `fusion build` made of them."""
    from fusion.cli import main

    root = tmp_path_factory.mktemp("byo-image")
    foreign_onnx(root / "foreign.onnx")
    torch.manual_seed(0)
    tm = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    spread_head(tm.get_classifier(), 1.0, seed=1)
    torch.manual_seed(1)
    tv = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    spread_head(tv.fc, 0.2, seed=2)
    save_state(tm, root / "resnet10t.safetensors")
    save_state(tv, root / "resnet18.safetensors")
    out = root / "bundle"
    (root / "recipe.toml").write_text(f"""
[ensemble]
weights = "equal"
[build]
out = "{out}"

[[inputs]]
name = "pixels"
shape = ["batch", 3, {SIZE}, {SIZE}]
kind = "image"
image = {{ mode = "RGB", scale = {SCALE!r}, mean = {MEAN}, std = {STD} }}

[[members]]
name = "foreign"
source = "onnx:{root / 'foreign.onnx'}"
output = "probabilities"
input_map = {{ img = "pixels" }}

[[members]]
name = "timm_r10"
source = "timm:resnet10t"
weights = "{root / 'resnet10t.safetensors'}"
args = {{ num_classes = 10 }}

[[members]]
name = "tv_r18"
source = "torchvision:resnet18"
weights = "{root / 'resnet18.safetensors'}"
args = {{ num_classes = 10 }}
""")
    assert main(["build", "--recipe", str(root / "recipe.toml")]) == 0
    return {"root": root, "bundle": out, "timm": tm, "torchvision": tv}


def reference(mixed, x_raw: np.ndarray) -> dict[str, np.ndarray]:
    """Each member run separately on numpy-normalised pixels: (B, 10) probabilities per member, and their mean."""
    import onnxruntime as ort

    xn = normalised(x_raw)
    sess = ort.InferenceSession(str(mixed["root"] / "foreign.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        out = {"foreign": sess.run(None, {"img": xn})[0].astype(np.float64),
               "timm_r10": softmax(mixed["timm"](torch.from_numpy(xn)).numpy()),
               "tv_r18": softmax(mixed["torchvision"](torch.from_numpy(xn)).numpy())}
    out["ensemble"] = np.mean([out[k] for k in ("foreign", "timm_r10", "tv_r18")], axis=0)
    return out


def run_entry(bundle, entry: str, x_raw: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from fusion.bundle import read_bundle

    sess = ort.InferenceSession(read_bundle(bundle).read_verified(entry), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x_raw})[0]


# ---- the sources build the real architectures ---------------------------------------------------------------


def test_timm_and_torchvision_sources_load_the_real_models_from_safetensors(mixed):
    from fusion.errors import ConfigError
    from fusion.sources import resolve

    x = torch.from_numpy(normalised(raw_pixels(2, 0)))
    root = mixed["root"]
    tm = resolve("timm:resnet10t", {"num_classes": 10}, str(root / "resnet10t.safetensors"))
    tv = resolve("torchvision:resnet18", {"num_classes": 10}, str(root / "resnet18.safetensors"))
    assert type(tm).__module__.startswith("timm.") and type(tv).__module__.startswith("torchvision.")
    with torch.no_grad():
        assert not tm.training and torch.equal(tm(x), mixed["timm"](x))
        assert not tv.training and torch.equal(tv(x), mixed["torchvision"](x))
    # another architecture's checkpoint: every difference listed, nothing loaded
    with pytest.raises(ConfigError, match=r"torchvision:resnet18 weights .*expected the module's \d+ tensors; got \d+ "
                                          r"with missing keys .*unexpected keys"):
        resolve("torchvision:resnet18", {"num_classes": 10}, str(root / "resnet10t.safetensors"))


# ---- the mixed ensemble ---------------------------------------------------------------------------------------


def test_mixed_ensemble_equals_the_members_run_separately(mixed):
    manifest = json.loads((mixed["bundle"] / "manifest.json").read_text())
    assert manifest["variants"]["ensemble"]["members"] == ["foreign", "timm_r10", "tv_r18"]
    assert manifest["inputs"][0]["kind"] == "image" and manifest["inputs"][0]["image"]["mean"] == MEAN
    assert manifest["members"]["foreign"]["output"] == "probabilities"
    for batch, seed in ((1, 1), (5, 2)):
        x = raw_pixels(batch, seed)  # raw 0..255, as the service sends them
        want = reference(mixed, x)
        got = run_entry(mixed["bundle"], "ensemble", x)
        np.testing.assert_allclose(got, want["ensemble"], atol=ATOL)
        assert float(np.abs(want["timm_r10"] - want["tv_r18"]).max()) > 0.05  # the members really differ
        for name in ("foreign", "timm_r10", "tv_r18"):  # each member file normalises too (members mode serves it alone)
            member = run_entry(mixed["bundle"], name, x)
            member = member if name == "foreign" else softmax(member)
            np.testing.assert_allclose(member, want[name], atol=ATOL)


def test_the_normalisation_is_in_the_graph_not_assumed(mixed):
    """Pixels the client normalised itself are normalised again and answer differently: the graph owns it."""
    x = raw_pixels(3, 4)
    plain = reference(mixed, x)["ensemble"]
    got = run_entry(mixed["bundle"], "ensemble", x)
    wrong = run_entry(mixed["bundle"], "ensemble", normalised(x))  # pixels normalised twice
    assert float(np.abs(got - wrong).max()) > 1e-3 and np.allclose(got, plain, atol=ATOL)


@pytest.mark.server
@pytest.mark.slow
def test_a_png_posted_to_the_served_bundle_equals_the_graph_on_pillow_pixels(mixed):
    import httpx
    from PIL import Image

    from tests.server import Server

    rgb = np.random.default_rng(9).integers(0, 256, size=(45, 38, 3), dtype=np.uint8)  # resized to 32x32 by the service
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    data = buf.getvalue()
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    decoded = np.asarray(img, np.float32).transpose(2, 0, 1)[None]  # Pillow's pixels, raw 0..255
    want = run_entry(mixed["bundle"], "ensemble", decoded)
    np.testing.assert_allclose(want, reference(mixed, decoded)["ensemble"], atol=ATOL)
    with Server(mixed["bundle"]) as srv:
        r = httpx.post(srv.url + "/predict", content=data, headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text[:400]
        np.testing.assert_allclose(np.asarray(r.json()["probabilities"], np.float32), want, atol=ATOL)
        r = httpx.post(srv.url + "/predict", content=data, timeout=30,
                       headers={"Content-Type": "image/png", "X-Variant": "members"})
        assert r.status_code == 200, r.text[:400]
        np.testing.assert_allclose(np.asarray(r.json()["probabilities"], np.float32), want, atol=ATOL)


# ---- fusion/imagenorm.py on its own ---------------------------------------------------------------------------


def _foreign_model(tmp_path, opset: int = 13) -> onnx.ModelProto:
    foreign_onnx(tmp_path / "f.onnx")
    model = onnx.load(str(tmp_path / "f.onnx"))
    if opset != 13:
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", opset))
    return model


def test_normalize_model_equals_the_file_on_normalised_pixels(tmp_path):
    import onnxruntime as ort

    from fusion.imagenorm import normalize_model

    model = _foreign_model(tmp_path)
    norm = normalize_model(model, {"img": SPEC}, name="f")
    onnx.checker.check_model(norm, full_check=True)
    assert [i.name for i in norm.graph.input] == ["img"] and len(norm.graph.node) == len(model.graph.node) + 6
    x = raw_pixels(4, 3)
    run = lambda m, v: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"img": v})[0]  # noqa: E731
    np.testing.assert_allclose(run(norm, x), run(model, normalised(x)), atol=1e-6)
    identity = TensorSpec(name="pixels", dtype="float32", shape=SPEC.shape, kind="image",
                          image={"mode": "RGB", "scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3})
    assert normalize_model(model, {"img": identity}) is model  # a file that normalises itself: nothing added
    tensor = TensorSpec(name="pixels", dtype="float32", shape=SPEC.shape)
    assert normalize_model(model, {"img": tensor}) is model


def test_normalize_model_refusals(tmp_path):
    from fusion.imagenorm import normalize_model

    with pytest.raises(MemberError, match=r"member 'old': normalising its image input needs opset >= 7 .*; got opset 6"):
        normalize_model(_foreign_model(tmp_path, opset=6), {"img": SPEC}, name="old")
    model = _foreign_model(tmp_path)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    with pytest.raises(MemberError, match=r"member 'ids': input 'img' is fed by an image input \(float32 pixels\) but "
                                          r"expects int64"):
        normalize_model(model, {"img": SPEC}, name="ids")
