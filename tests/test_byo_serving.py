"""Named inputs served by a real `bentoml serve` (issue 15): images, text and several tensors over /predict and
OIP v2; /info, /docs.json and the OIP model metadata describe the real inputs; every bad input is a 400 in
the one error shape naming the input. References: the bundle's graphs run in onnxruntime in this process on
arrays prepared independently (Pillow decoding, the tokenizer, numpy).
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from tests import byo_bundles as bb
from tests.server import Server
from tests.serving_util import assert_error_shape

pytestmark = pytest.mark.server

ATOL = 1e-6


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def decoded(data: bytes) -> np.ndarray:
    """The reference decode: Pillow, RGB, bilinear to 8x8, (1, C, H, W) float32 raw values."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.size != (8, 8):
        img = img.resize((8, 8), Image.BILINEAR)
    return np.asarray(img, np.float32).transpose(2, 0, 1)[None]


def probs(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text[:400]
    return np.asarray(response.json()["probabilities"], np.float32)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo-serving")
    bb.image_bundle(root / "image")
    bb.text_bundle(root / "text")
    bb.tensor_bundle(root / "tensor")
    return root


@pytest.fixture(scope="module")
def image_server(bundles):
    env = {"FUSION_MAX_IMAGE_PIXELS": str(64 * 64), "FUSION_CASCADE": "cnn_1:0.9", "FUSION_SHADOW": "members"}
    with Server(bundles / "image", env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def text_server(bundles):
    # batching on: text requests join one call, re-padded to its longest row (service/batching.py)
    with Server(bundles / "text", env={"FUSION_MAX_TEXT_CHARS": "300", "FUSION_BATCH_MAX_ROWS": "64"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def tensor_server(bundles):
    with Server(bundles / "tensor") as srv:
        yield srv


# ---- (a) images -----------------------------------------------------------------------------------


def test_png_raw_and_base64_equal_the_graph_on_pillow_pixels(image_server, bundles):
    data = bb.png(pixels(7, 13, 21))  # another size: resized bilinearly to 8x8
    expected = bb.run_onnx(bundles / "image", "ensemble", {"pixels": decoded(data)})
    raw = probs(httpx.post(image_server.url + "/predict", content=data, headers={"Content-Type": "image/png"}))
    as_b64 = probs(httpx.post(image_server.url + "/predict", json={"inputs": {"pixels": [b64(data)]}}))
    as_list = probs(httpx.post(image_server.url + "/predict", json={"inputs": [b64(data)]}))  # one input: the value itself
    for got in (raw, as_b64, as_list):
        np.testing.assert_allclose(got, expected, atol=ATOL)
    jpeg = bb.png(pixels(8), "JPEG")
    got = probs(httpx.post(image_server.url + "/predict", content=jpeg, headers={"Content-Type": "image/jpeg", "X-Variant": "cnn_2"}))
    np.testing.assert_allclose(got, bb.run_onnx(bundles / "image", "cnn_2", {"x": decoded(jpeg)}), atol=ATOL)


def test_members_mode_and_cascade_run_on_named_feeds(image_server, bundles):
    rows = [bb.png(pixels(s)) for s in range(6)]
    X = np.concatenate([decoded(d) for d in rows])
    ens = bb.run_onnx(bundles / "image", "ensemble", {"pixels": X})
    members = httpx.post(image_server.url + "/predict", json={"inputs": [b64(d) for d in rows], "variant": "members"})
    np.testing.assert_allclose(probs(members), ens, atol=ATOL)
    cheap = bb.run_onnx(bundles / "image", "cnn_1", {"x": X})
    escalate = cheap.max(-1) < 0.9
    r = httpx.post(image_server.url + "/predict", json={"inputs": [b64(d) for d in rows], "variant": "cascade"})
    np.testing.assert_allclose(probs(r), np.where(escalate[:, None], ens, cheap), atol=ATOL)
    assert r.json()["escalated"] == escalate.tolist()


def test_bad_images_are_400_naming_the_input(image_server):
    from PIL import Image

    big = io.BytesIO()
    Image.new("RGB", (80, 80)).save(big, format="PNG")  # 6400 pixels > FUSION_MAX_IMAGE_PIXELS = 4096
    cases = [
        ({"content": big.getvalue(), "headers": {"Content-Type": "image/png"}}, "at most 4096 pixels (FUSION_MAX_IMAGE_PIXELS); got 80x80"),
        ({"json": {"inputs": {"pixels": [b64(big.getvalue())]}}}, "input 'pixels'[0]: expected an image of at most 4096 pixels"),
        ({"content": b"\x89PNG not really", "headers": {"Content-Type": "image/png"}}, "input 'pixels'[0]: expected a PNG or JPEG image"),
        ({"json": {"inputs": {"pixels": ["%%%"]}}}, "expected a base64-encoded PNG or JPEG image; got a string that is not base64"),
        ({"json": {"inputs": {"image": ["x"]}}}, "unknown input 'image'; expected the inputs {'pixels': image float32 [batch, 3, 8, 8]}"),
        ({"json": {"inputs": {"pixels": np.zeros((1, 3, 8, 7)).tolist()}}}, "input 'pixels': expected dimension 3 to be 8"),
    ]
    for kwargs, message in cases:
        r = httpx.post(image_server.url + "/predict", **kwargs)
        body = assert_error_shape(r, 400)
        assert message in body["error"], (message, body["error"])


def test_image_oip_bytes_and_the_descriptions(image_server, bundles):
    data = [bb.png(pixels(9)), bb.png(pixels(10, 16, 16))]
    r = httpx.post(image_server.url + "/v2/models/ensemble/infer",
                   json={"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [2], "data": [b64(d) for d in data]}]})
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
    expected = bb.run_onnx(bundles / "image", "ensemble", {"pixels": np.concatenate([decoded(d) for d in data])})
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), expected, atol=ATOL)
    meta = httpx.get(image_server.url + "/v2/models/fusion").json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "BYTES", "shape": [-1]}]
    info = httpx.get(image_server.url + "/info").json()
    assert [(i["name"], i["kind"], i["shape"]) for i in info["inputs"]] == [("pixels", "image", ["batch", 3, 8, 8])]
    doc = httpx.get(image_server.url + "/docs.json").json()
    body = doc["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "image/png", "image/jpeg"} <= set(body)


# ---- (b) text -------------------------------------------------------------------------------------


def test_one_string_alone_equals_it_in_a_batch_of_longer_strings(text_server, bundles):
    alone = probs(httpx.post(text_server.url + "/predict", json={"inputs": {"text": ["the cat sat on the mat"]}}))
    batch = probs(httpx.post(text_server.url + "/predict", json={"inputs": [
        "a dog ran in the park and the cat sat on the mat by the window", "the cat sat on the mat",
        "she reads a long book by the window on monday"]}))
    np.testing.assert_allclose(alone[0], batch[1], atol=ATOL, rtol=0)
    # and both equal the graph on the tokenizer's own ids (no padding)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str((bundles / "text/tokenizer.json").read_text())
    ids = np.asarray([tok.encode("the cat sat on the mat").ids], np.int64)
    ref = bb.run_onnx(bundles / "text", "ensemble", {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(alone, ref, atol=ATOL)


def test_text_over_oip_with_a_real_client(text_server, bundles):
    tritonhttp = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (dev extra)")
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{text_server.port}", connection_timeout=30, network_timeout=30)
    strings = ["birds sing in the morning", "stocks fell"]
    inp = tritonhttp.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.asarray([s.encode() for s in strings], dtype=object), binary_data=True)
    got = client.infer("fusion", [inp]).as_numpy("probabilities")
    expected = probs(httpx.post(text_server.url + "/predict", json={"inputs": strings}))
    np.testing.assert_allclose(got, expected, atol=ATOL)
    meta = client.get_model_metadata("fusion")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


def test_bad_text_is_400_naming_the_input(text_server):
    cases = [
        ({"text": ["x " * 200]}, "input 'text'[0]: expected at most 300 characters (FUSION_MAX_TEXT_CHARS); got 400"),
        ({"text": ["fine", 7]}, "input 'text'[1]: expected a string; got int"),
        ({"text": [None]}, "input 'text'[0]: expected a string; got null"),
        ({"txt": ["a"]}, "unknown input 'txt'; expected the inputs {'text': text int64 [batch, sequence]}"),
    ]
    for inputs, message in cases:
        body = assert_error_shape(httpx.post(text_server.url + "/predict", json={"inputs": inputs}), 400)
        assert message in body["error"], (message, body["error"])
    r = httpx.post(text_server.url + "/v2/models/fusion/infer",
                   json={"inputs": [{"name": "text", "datatype": "INT64", "shape": [1], "data": [3]}]})
    assert "input 'text': expected datatype BYTES (strings); got 'INT64'" in assert_error_shape(r, 400)["error"]


# ---- (c) two tensors --------------------------------------------------------------------------------


def test_two_named_tensors_over_predict_and_oip(tensor_server, bundles):
    x = np.asarray([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]], np.float32)
    ids = np.asarray([[1, 2, 3], [9, 0, 4], [5, 5, 5]], np.int64)
    expected = bb.run_onnx(bundles / "tensor", "ensemble", {"x": x, "ids": ids})
    got = probs(httpx.post(tensor_server.url + "/predict", json={"inputs": {"ids": ids.tolist(), "x": x.tolist()}}))
    np.testing.assert_allclose(got, expected, atol=ATOL)
    r = httpx.post(tensor_server.url + "/v2/models/fusion/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [3, 4], "data": x.ravel().tolist()},
        {"name": "ids", "datatype": "INT64", "shape": [3, 3], "data": ids.tolist()}]})
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(3, -1), expected, atol=ATOL)
    meta = httpx.get(tensor_server.url + "/v2/models/ensemble").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                              {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}]
    schema = httpx.get(tensor_server.url + "/docs.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(schema["application/json"]["schema"]["properties"]["inputs"]["required"]) == {"x", "ids"}


def test_wrong_names_dtypes_and_dims_are_400_listing_what_is_expected(tensor_server):
    expected = "expected the inputs {'x': tensor float32 [batch, 4], 'ids': tensor int64 [batch, 3]}"
    good_x, good_ids = [[0.0] * 4], [[1, 2, 3]]
    cases = [
        ({"x": good_x, "idz": good_ids}, f"unknown input 'idz'; {expected}"),
        ({"x": good_x}, f"missing input 'ids'; {expected}"),
        ({"x": good_x, "ids": [[1.5, 2.0, 3.0]]}, "input 'ids': expected integers (int64 [batch, 3]); got values of dtype float"),
        ({"x": [[0.0] * 3], "ids": good_ids}, "input 'x': expected dimension 1 to be 4 (float32 [batch, 4]); got 3"),
        ({"x": [0.0] * 4, "ids": good_ids}, "input 'x': expected rank 2 (float32 [batch, 4]); got rank 1"),
        ([[0.0] * 4], "expected 'inputs' to be an object with the inputs"),
    ]
    for inputs, message in cases:
        body = assert_error_shape(httpx.post(tensor_server.url + "/predict", json={"inputs": inputs}), 400)
        assert message in body["error"], (message, body["error"])
    r = httpx.post(tensor_server.url + "/v2/models/fusion/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]},
        {"name": "ids", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
    assert "input 'ids': expected datatype INT64; got 'FP32'" in assert_error_shape(r, 400)["error"]
    r = httpx.post(tensor_server.url + "/predict", content=bb.png(pixels(0)), headers={"Content-Type": "image/png"})
    assert "a raw image body needs a bundle whose one input is an image" in assert_error_shape(r, 415)["error"]


def test_ids_the_graph_refuses_and_shapes_that_overflow_are_400_not_500(tensor_server):
    """Token ids past the embedding table (onnxruntime's InvalidArgument while running) and an OIP shape whose
    element count overflows int64 are the client's input: 400 in the one error shape, never a 500."""
    for ids in ([1, 2, 99], [1, 2, -50]):
        r = httpx.post(tensor_server.url + "/predict", json={"inputs": {"x": [[0.0] * 4], "ids": [ids]}})
        error = assert_error_shape(r, 400)["error"]
        assert error.startswith("'ensemble' refused the input values") and "out of data bounds" in error, error
    r = httpx.post(tensor_server.url + "/v2/models/fusion/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 2 ** 32, 2 ** 32], "data": []},
        {"name": "ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]})
    assert "input 'x': expected a shape whose" in assert_error_shape(r, 400)["error"]
    assert httpx.get(tensor_server.url + "/readyz").status_code == 200
