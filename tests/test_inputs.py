"""Named inputs (issue 15, service/inputs.py): request values -> graph feeds, for image, text and tensor inputs.

In-process: bundles from tests/byo_bundles.py, loaded with service.runtime.load (digests, warm-up, sessions);
answers compared with the graphs run directly in onnxruntime on independently prepared arrays.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from fusion.bundle import read_bundle
from fusion.errors import BundleError, InputError, IntegrityError
from service import oip, payload, runtime
from service.errors import UnsupportedMediaError
from service.inputs import Limits
from service.members import FailurePolicy, MembersEnsemble
from tests import byo_bundles as bb

LIMITS = Limits(max_rows=16, max_image_pixels=64 * 64, max_text_chars=200)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    bb.image_bundle(root / "image")
    bb.text_bundle(root / "text")
    bb.tensor_bundle(root / "tensor")
    return root


@pytest.fixture(scope="module")
def image(bundles):
    return runtime.load(bundles / "image")


@pytest.fixture(scope="module")
def text(bundles):
    return runtime.load(bundles / "text")


@pytest.fixture(scope="module")
def tensor(bundles):
    return runtime.load(bundles / "tensor")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---- tensors ----------------------------------------------------------------------------------------


def test_two_tensors_become_their_feeds_and_answer_as_the_graph(tensor, bundles):
    x = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    ids = [[1, 2, 3], [9, 0, 4]]
    feeds = tensor.inputs.parse({"x": x, "ids": ids}, LIMITS)
    assert feeds["x"].dtype == np.float32 and feeds["ids"].dtype == np.int64
    expected = bb.run_onnx(bundles / "tensor", "ensemble", {"x": np.asarray(x, np.float32), "ids": np.asarray(ids, np.int64)})
    np.testing.assert_allclose(tensor.model("ensemble")(feeds), expected, atol=1e-6)


@pytest.mark.parametrize("value, message", [
    ({"x": [[0.0] * 4], "idz": [[1, 2, 3]]}, "unknown input 'idz'; expected the inputs {'x': tensor float32 [batch, 4], 'ids'"),
    ({"x": [[0.0] * 4]}, "missing input 'ids'; expected the inputs"),
    ({"x": [[0.0] * 4], "ids": [[1.5, 2, 3]]}, "input 'ids': expected integers (int64 [batch, 3]); got values of dtype float"),
    ({"x": [[0.0] * 4], "ids": [1, 2, 3]}, "input 'ids': expected rank 2 (int64 [batch, 3]); got rank 1 [3]"),
    ({"x": [[0.0] * 5], "ids": [[1, 2, 3]]}, "input 'x': expected dimension 1 to be 4 (float32 [batch, 4]); got 5"),
    ({"x": [[0.0] * 4], "ids": [[1, 2, 3], [1, 2, 3]]}, "input 'ids': expected 1 rows, as the inputs before it; got 2"),
    ({"x": [[0.0, 1.0, True, 0.0]], "ids": [[1, 2, 3]]}, "input 'x': expected float32 numbers; got a boolean among them"),
    ({"x": [["a", 1.0, 2.0, 0.0]], "ids": [[1, 2, 3]]}, "input 'x': expected numbers (float32 [batch, 4]); got values of dtype <U"),
    ({"x": [[0.0] * 4, [0.0] * 3], "ids": [[1, 2, 3]] * 2}, "input 'x': expected float32 [batch, 4] as regularly nested lists; got ragged"),
    ({"x": [[0.0] * 4], "ids": [[1, 2, 2 ** 63]]}, "input 'ids': expected"),
    ({"x": [[0.0] * 4] * 17, "ids": [[1, 2, 3]] * 17}, "expected at most 16 rows per request (FUSION_MAX_ROWS); got 17"),
    ([[0.0] * 4], "expected 'inputs' to be an object with the inputs {'x'"),
])
def test_bad_tensors_name_the_input_and_what_was_expected(tensor, value, message):
    with pytest.raises(InputError) as err:
        tensor.inputs.parse(value, LIMITS)
    assert message in str(err.value)


def test_predict_body_with_named_inputs_and_routing_fields(tensor):
    body = json.dumps({"inputs": {"x": [[0.0] * 4], "ids": [[0, 1, 2]]}, "variant": "ensemble"}).encode()
    req = payload.parse_predict_named(body, tensor.inputs, LIMITS)
    assert req.variant == "ensemble" and set(req.X) == {"x", "ids"}
    with pytest.raises(InputError, match="unexpected fields"):
        payload.parse_predict_named(b'{"inputs": {}, "extra": 1}', tensor.inputs, LIMITS)


def test_oip_named_tensors_json_and_binary(tensor, bundles):
    x = np.asarray([[0.5, -1.0, 2.0, 0.0]], np.float32)
    ids = np.asarray([[1, 2, 3]], np.int64)
    head = {"inputs": [{"name": "ids", "datatype": "INT64", "shape": [1, 3], "parameters": {"binary_data_size": 24}},
                       {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x.ravel().tolist()}]}
    h = json.dumps(head).encode()
    req = oip.parse_named(h + ids.tobytes(), str(len(h)), tensor.inputs, LIMITS)
    np.testing.assert_array_equal(req.X["ids"], ids)
    np.testing.assert_array_equal(req.X["x"], x)
    bad = {"inputs": [{"name": "ids", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                      {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}
    with pytest.raises(InputError, match="input 'ids': expected datatype INT64; got 'FP32'"):
        oip.parse_named(json.dumps(bad).encode(), None, tensor.inputs, LIMITS)
    with pytest.raises(InputError, match="unknown input 'y'; expected the inputs x \\(FP32 \\[-1, 4\\]\\), ids \\(INT64 \\[-1, 3\\]\\)"):
        oip.parse_named(b'{"inputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [1]}]}', None, tensor.inputs, LIMITS)


def test_oip_metadata_lists_the_real_inputs(tensor, image, text):
    assert tensor.inputs.oip_metadata() == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                                            {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}]
    assert image.inputs.oip_metadata() == [{"name": "pixels", "datatype": "BYTES", "shape": [-1]}]
    assert text.inputs.oip_metadata() == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


# ---- images -----------------------------------------------------------------------------------------


def test_png_of_the_graph_size_feeds_its_exact_pixels(image, bundles):
    rows = [pixels(0), pixels(1)]
    feeds = image.inputs.parse({"pixels": [b64(bb.png(p)) for p in rows]}, LIMITS)
    expected = np.stack([p.transpose(2, 0, 1) for p in rows]).astype(np.float32)  # (B, C, H, W), raw 0..255
    np.testing.assert_array_equal(feeds["pixels"], expected)
    # a bundle with one input also takes the value itself, and uint8 pixels as nested lists
    same = image.inputs.parse(expected.astype(np.uint8).tolist(), LIMITS)
    np.testing.assert_array_equal(same["pixels"], expected)
    np.testing.assert_allclose(image.model("ensemble")(feeds), bb.run_onnx(bundles / "image", "ensemble", {"pixels": expected}),
                               atol=1e-6)


def test_other_sizes_are_resized_bilinearly_and_jpeg_is_read(image):
    from PIL import Image

    big = pixels(2, 13, 21)
    for fmt in ("PNG", "JPEG"):
        data = bb.png(big, fmt)
        ref = Image.open(io.BytesIO(data)).convert("RGB").resize((8, 8), Image.BILINEAR)
        expected = np.asarray(ref, np.float32).transpose(2, 0, 1)[None]
        np.testing.assert_array_equal(image.inputs.parse([b64(data)], LIMITS)["pixels"], expected)


def test_raw_image_body_is_one_row(image, tensor):
    data = bb.png(pixels(3))
    np.testing.assert_array_equal(image.inputs.parse_image_body(data, LIMITS)["pixels"],
                                  pixels(3).transpose(2, 0, 1)[None].astype(np.float32))
    with pytest.raises(UnsupportedMediaError, match="a raw image body needs a bundle whose one input is an image"):
        tensor.inputs.parse_image_body(data, LIMITS)


def test_bad_images_are_refused_naming_the_input(image):
    from PIL import Image

    huge = io.BytesIO()
    Image.new("RGB", (100, 50)).save(huge, format="PNG")  # 5000 pixels > 64 * 64
    cases = [
        ([b64(huge.getvalue())], "input 'pixels'[0]: expected an image of at most 4096 pixels (FUSION_MAX_IMAGE_PIXELS); got 100x50"),
        (["not base64!"], "input 'pixels'[0]: expected a base64-encoded PNG or JPEG image; got a string that is not base64"),
        ([b64(b"GIF89a" + b"\0" * 40)], "input 'pixels'[0]: expected a PNG or JPEG image; got 46 bytes that are neither"),
        ([b64(bb.png(pixels(4))[:60])], "input 'pixels'[0]: expected a PNG or JPEG image"),  # truncated
        ([b64(bb.png(pixels(4))), 7], "input 'pixels'[1]: expected a base64-encoded PNG or JPEG image (a string); got int"),
        (np.zeros((1, 3, 8, 9)).tolist(), "input 'pixels': expected dimension 3 to be 8"),
    ]
    for value, message in cases:
        with pytest.raises(InputError) as err:
            image.inputs.parse({"pixels": value}, LIMITS)
        assert message in str(err.value), (message, str(err.value))


def test_oversize_is_refused_from_the_header_before_decoding(image, monkeypatch):
    """A 20000x20000 PNG of zeros is ~1.2 MB compressed and 1.2 GB decoded: refused from its header."""
    import zlib

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = chunk(b"IHDR", (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0]))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    from PIL import ImageFile

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(InputError, match="at most 16777216 pixels .*got far more .*400000000 pixels"):
        image.inputs.parse_image_body(bomb, Limits(max_image_pixels=4096 * 4096))
    medium = bomb.replace(header, chunk(b"IHDR", (5000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])))
    with pytest.raises(InputError, match="at most 16777216 pixels .*got 5000x5000 = 25000000"):
        image.inputs.parse_image_body(medium, Limits(max_image_pixels=4096 * 4096))


def test_oip_bytes_images_binary_and_json(image):
    data = [bb.png(pixels(5)), bb.png(pixels(6))]
    blob = b"".join(len(d).to_bytes(4, "little") + d for d in data)
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [2],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    binary = oip.parse_named(head + blob, str(len(head)), image.inputs, LIMITS).X["pixels"]
    as_json = oip.parse_named(json.dumps({"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [2],
                                                      "data": [b64(d) for d in data]}]}).encode(), None, image.inputs, LIMITS).X["pixels"]
    expected = np.stack([pixels(5), pixels(6)]).transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_array_equal(binary, expected)
    np.testing.assert_array_equal(as_json, expected)
    with pytest.raises(InputError, match="element 1 declares"):
        short = blob[:-10]
        h = json.dumps({"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [2],
                                    "parameters": {"binary_data_size": len(short)}}]}).encode()
        oip.parse_named(h + short, str(len(h)), image.inputs, LIMITS)


def test_members_run_with_their_mapped_feeds_and_members_mode_equals_the_fused_graph(image):
    """cnn_1/cnn_2 name their input `x` (ModelEntry.input_map {"x": "pixels"}); members mode recombines them."""
    assert image.models["cnn_1"].binds == (("x", "pixels"),)
    feeds = image.inputs.parse([b64(bb.png(pixels(s))) for s in range(4)], LIMITS)
    members = MembersEnsemble(image, FailurePolicy(None, 5.0))
    try:
        combined, extra = members(feeds)
    finally:
        members.close()
    np.testing.assert_allclose(combined, image.model("ensemble")(feeds), atol=1e-6)
    assert extra["members_answered"] == ["cnn_1", "cnn_2"]


def test_an_input_map_to_no_bundle_input_is_refused_at_load(bundles, tmp_path):
    from dataclasses import replace

    from fusion.bundle import BundleWriter

    src = read_bundle(bundles / "image").manifest
    with BundleWriter(tmp_path / "bad") as w:
        (w.stage / "members").mkdir()
        (w.stage / "ensemble.onnx").write_bytes(bb.image_ensemble())
        for s in (1, 2):
            (w.stage / f"members/cnn_{s}.onnx").write_bytes(bb.image_member(s))
        members = {k: replace(e, input_map={"x": "image"}) for k, e in src.members.items()}
        w.commit(replace(src, members=members))
    with pytest.raises(BundleError, match="its input 'x' maps to 'image'; expected one of the bundle's inputs \\['pixels'\\]"):
        runtime.load(tmp_path / "bad")


# ---- text -------------------------------------------------------------------------------------------


def test_one_string_alone_equals_it_inside_a_batch_of_longer_strings(text):
    alone = text.inputs.parse(["the cat sat"], LIMITS)
    batch = text.inputs.parse(["the cat sat", "a dog ran in the park on monday morning", "birds sing"], LIMITS)
    assert alone["input_ids"].shape == (1, 3) and batch["input_ids"].shape == (3, 9)  # padded to the longest row
    assert alone["input_ids"].dtype == np.int64 and batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 6
    model = text.model("ensemble")
    np.testing.assert_allclose(model(alone)[0], model(batch)[0], atol=1e-6, rtol=0)


def test_tokens_match_the_tokenizer_and_truncate_at_max_length(text, bundles):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str((bundles / "text/tokenizer.json").read_text())
    feeds = text.inputs.parse({"text": ["the quiet town"]}, LIMITS)
    assert feeds["input_ids"][0].tolist() == tok.encode("the quiet town").ids
    long = " ".join(bb.SENTENCES[:4])  # 21 words, within 200 characters
    feeds = text.inputs.parse([long], LIMITS)
    assert feeds["input_ids"].shape == (1, bb.MAX_LENGTH)
    assert feeds["input_ids"][0].tolist() == tok.encode(long).ids[:bb.MAX_LENGTH]


def test_token_type_ids_are_zeros_when_the_graph_takes_them(tmp_path):
    bb.text_bundle(tmp_path / "t3", graph_inputs=("input_ids", "attention_mask", "token_type_ids"))
    loaded = runtime.load(tmp_path / "t3")  # the graph itself takes two: its session is fed those only
    feeds = loaded.inputs.parse(["a train leaves", "the cat"], LIMITS)
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds["token_type_ids"].dtype == np.int64 and not feeds["token_type_ids"].any()
    assert loaded.model("ensemble")(feeds).shape == (2, bb.N_CLASSES)


@pytest.mark.parametrize("value, message", [
    (["x" * 201], "input 'text'[0]: expected at most 200 characters (FUSION_MAX_TEXT_CHARS); got 201"),
    (["fine", 3], "input 'text'[1]: expected a string; got int"),
    ({"a": 1}, "unknown input 'a'; expected the inputs {'text': text int64 [batch, sequence]}"),
    ({"text": 5}, "input 'text': expected a list of strings (text); got int"),
    ([""], "input 'text'[0]: expected text that gives at least one token; got none"),
    ([], "input 'text': expected at least one row; got none"),
])
def test_bad_text_is_refused_naming_the_input(text, value, message):
    with pytest.raises(InputError) as err:
        text.inputs.parse(value, LIMITS)
    assert message in str(err.value)


def test_a_tokenizer_that_differs_from_its_digest_is_refused_before_parsing(bundles, tmp_path):
    import shutil

    shutil.copytree(bundles / "text", tmp_path / "t")
    path = tmp_path / "t/tokenizer.json"
    path.write_text(path.read_text().replace('"cat"', '"cow"'))
    with pytest.raises(IntegrityError, match="tokenizer.json: sha256 mismatch"):
        read_bundle(tmp_path / "t")


def test_the_digits_path_is_untouched(bundles):
    """A bundle without `inputs` loads no Inputs and its models take the flat batch as before (no binds)."""
    from tests.reliability.bundles import make_bundle

    make_bundle(bundles / "digits")
    loaded = runtime.load(bundles / "digits")
    assert loaded.inputs is None and all(m.binds is None for m in loaded.models.values())


def test_a_probe_of_strings_is_rerun_on_load_and_a_lying_one_refused(tmp_path):
    from fusion.errors import UnavailableError

    texts = ["the cat sat on the mat", "stocks fell", "a train leaves the station at nine"]
    bb.text_bundle(tmp_path / "ok", probe=texts)
    runtime.check_probe(runtime.load(tmp_path / "ok"))  # strings -> tokenized, padded as one batch, rerun
    bb.text_bundle(tmp_path / "lies", probe=texts, probe_shift=0.01)
    with pytest.raises(UnavailableError, match="does not reproduce its recorded outputs"):
        runtime.check_probe(runtime.load(tmp_path / "lies"))


def test_prose_with_many_commas_is_not_refused_as_too_many_values(text):
    """The 413 before parsing counts commas; a text input's strings hold ordinary commas, so it is skipped."""
    assert text.inputs.values_per_row() is None
    body = json.dumps({"inputs": ["the cat, the mat, " * 500] * 16}).encode()  # 16,000 commas
    req = payload.parse_predict_named(body, text.inputs, Limits(max_rows=16, max_text_chars=10_000))
    assert req.X["input_ids"].shape == (16, bb.MAX_LENGTH)


# ---- review s2: shapes that overflow, values the graph refuses, per-request decode and tokenize cost -----


@pytest.mark.parametrize("x", [
    {"name": "x", "datatype": "FP32", "shape": [1, 2 ** 32, 2 ** 32], "data": []},  # int64 product wraps to 0
    {"name": "x", "datatype": "FP32", "shape": [1, 2 ** 64 - 1], "data": [1.0]},  # wrapped to a negative count
    {"name": "x", "datatype": "FP32", "shape": [1, 0, 2 ** 40], "data": []},  # no elements, one dimension past the body
    {"name": "x", "datatype": "FP32", "shape": [1, 2 ** 32, 2 ** 32], "parameters": {"binary_data_size": 0}},
])
def test_oip_shapes_whose_element_count_overflows_are_400_naming_the_input(tensor, x):
    import math

    ids = {"name": "ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}
    head = json.dumps({"inputs": [x, ids]}).encode()
    with pytest.raises(InputError) as err:
        oip.parse_named(head, str(len(head)) if "parameters" in x else None, tensor.inputs, LIMITS)
    message = str(err.value)
    assert message.startswith("input 'x': expected") and f"got shape {x['shape']} ({math.prod(x['shape'])} elements)" in message
    assert f"{len(head)}-byte request" in message, message


@pytest.mark.parametrize("ids", [[1, 2, 99], [1, 2, -50]])
def test_ids_past_the_embedding_table_are_an_input_error_with_onnxruntimes_reason(tensor, ids):
    from service.errors import status_for

    feeds = tensor.inputs.parse({"x": [[0.0] * 4], "ids": [ids]}, LIMITS)
    with pytest.raises(InputError) as err:
        tensor.model("ensemble")(feeds)
    message = str(err.value)
    assert status_for(err.value) == 400
    assert message.startswith("'ensemble' refused the input values") and "indices element out of data bounds" in message, message
    assert "[ONNXRuntimeError]" not in message and len(message) < 400


def test_the_engine_counts_only_server_side_failures_against_a_variant(bundles):
    """A client's bad ids (400) and a cancelled request are not the variant's failure (the rollout's
    error-rate guardrail reads these counts); a server-side error still is."""
    import asyncio

    from service.engine import Engine, EngineConfig
    from service.routing import RoutingPolicy

    eng = Engine(EngineConfig(bundle=str(bundles / "tensor")), RoutingPolicy())
    eng.start()
    try:
        assert eng.ready, eng.error

        def feeds(ids):
            return {"x": np.zeros((1, 4), np.float32), "ids": np.asarray([ids], np.int64)}

        async def call(ids):
            return await eng.predict(feeds(ids), variant="ensemble", key=None, request_id="r")

        asyncio.run(call([1, 2, 3]))
        with pytest.raises(InputError, match="refused the input values"):
            asyncio.run(call([1, 2, 99]))
        assert eng.outcomes()["ensemble"] == (1, 0)

        async def cancelled():
            started = asyncio.Event()

            async def hang(*a, **k):
                started.set()
                await asyncio.sleep(3600)

            eng.predictor.predict, real = hang, eng.predictor.predict
            try:
                task = asyncio.ensure_future(call([1, 2, 3]))
                await started.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                eng.predictor.predict = real

        asyncio.run(cancelled())
        assert eng.outcomes()["ensemble"] == (1, 0)

        async def broken(*a, **k):
            raise RuntimeError("a server-side failure")

        eng.predictor.predict, real = broken, eng.predictor.predict
        try:
            with pytest.raises(RuntimeError):
                asyncio.run(call([1, 2, 3]))
        finally:
            eng.predictor.predict = real
        assert eng.outcomes()["ensemble"] == (1, 1)
    finally:
        eng.close()


def _png_of(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_images_of_one_request_share_a_pixel_budget_checked_before_any_decoding(image, monkeypatch):
    """Each image within FUSION_MAX_IMAGE_PIXELS is not enough: their sum is bounded by
    FUSION_MAX_REQUEST_PIXELS (or the rows at the graph's own size, whichever is larger), from the headers."""
    from PIL import ImageFile

    limits = Limits(max_rows=16, max_image_pixels=64 * 64, max_text_chars=200, max_request_pixels=3 * 64 * 64)
    four = [b64(_png_of(64, 64))] * 4  # each at the per-image limit; 16384 pixels in all > 12288
    real_load = ImageFile.ImageFile.load

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(InputError) as err:
        image.inputs.parse({"pixels": four}, limits)
    assert str(err.value) == ("input 'pixels': expected at most 12288 pixels in all the images of a request "
                              "(FUSION_MAX_REQUEST_PIXELS; or 4 rows at the graph's 8x8); got 16384 in 4 images")
    monkeypatch.setattr(ImageFile.ImageFile, "load", real_load)
    assert image.inputs.parse({"pixels": four[:3]}, limits)["pixels"].shape == (3, 3, 8, 8)
    # rows at the graph's own size are always within budget: they cost what the tensor they fill does
    tiny = Limits(max_rows=16, max_image_pixels=64 * 64, max_text_chars=200, max_request_pixels=1)
    got = image.inputs.parse({"pixels": [b64(bb.png(pixels(s))) for s in range(16)]}, tiny)["pixels"]
    np.testing.assert_array_equal(got[3], pixels(3).transpose(2, 0, 1).astype(np.float32))


def test_text_is_cut_to_max_length_times_64_characters_before_it_is_tokenized(text, bundles, monkeypatch):
    from tokenizers import Tokenizer

    tok, pad = text.inputs.tokenizers["text"]
    seen = []

    class Spy:
        def encode(self, s):
            seen.append(len(s))
            return tok.encode(s)

    monkeypatch.setitem(text.inputs.tokenizers, "text", (Spy(), pad))
    long = "the cat sat on the mat " * 400  # 9200 characters
    feeds = text.inputs.parse([long, "a dog"], Limits(max_rows=16, max_text_chars=10_000))
    assert seen == [bb.MAX_LENGTH * 64, 5]
    reference = Tokenizer.from_str((bundles / "text/tokenizer.json").read_text())  # no truncation: the whole string
    assert feeds["input_ids"][0].tolist() == reference.encode(long).ids[:bb.MAX_LENGTH]
