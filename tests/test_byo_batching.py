"""Named-input requests through the adaptive batcher (issue 15): concurrent requests for one model are
coalesced into one call: tensors concatenated along the batch when their other dimensions agree, text
feeds re-padded to the longest row of the call (the graph masks the padding); a request whose other
dimensions differ waits for the next call. Every request gets the rows it would get alone (1e-5).

Models: tests/byo_bundles.py's text and two-tensor bundles in onnxruntime (service.runtime.load). Oracle:
the same model called on each request alone.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service import runtime
from service.batching import AdaptiveBatcher
from service.inputs import Limits, join_feeds
from tests import byo_bundles as bb

pytest.importorskip("tokenizers")

ATOL = 1e-5
LIMITS = Limits(max_rows=64, max_image_pixels=1 << 20, max_text_chars=1000, max_request_pixels=1 << 24)


async def together(batcher: AdaptiveBatcher, model, requests: list, pads: dict) -> list:
    return await asyncio.gather(*(batcher.run(model, X, pads=pads) for X in requests))


def test_text_requests_of_different_lengths_share_one_call_and_each_gets_its_own_answer(tmp_path):
    bb.text_bundle(tmp_path / "text")
    loaded = runtime.load(tmp_path / "text")
    model, inputs = loaded.model("ensemble"), loaded.inputs
    texts = [["the cat"], ["a dog ran in the park", "rain"], ["she reads a long book by the window stocks fell"],
             ["birds sing in the morning light a train leaves the station"]]
    requests = [inputs.parse(t, LIMITS) for t in texts]
    assert len({r["input_ids"].shape[1] for r in requests}) == 4  # four different padded widths
    batcher = AdaptiveBatcher(max_rows=64)
    outs = asyncio.run(together(batcher, model, requests, inputs.pads))
    assert batcher.calls == 1 and batcher.requests == 4
    for X, got in zip(requests, outs):
        np.testing.assert_allclose(got, model(X), atol=ATOL)


def test_tensors_join_when_their_other_dimensions_agree(tmp_path):
    bb.tensor_bundle(tmp_path / "tensor")
    loaded = runtime.load(tmp_path / "tensor")
    model = loaded.model("ensemble")
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((n, 4)).astype(np.float32), "ids": rng.integers(0, 10, (n, 3))}
                for n in (1, 3, 2)]
    batcher = AdaptiveBatcher(max_rows=64)
    outs = asyncio.run(together(batcher, model, requests, loaded.inputs.pads))
    assert batcher.calls == 1
    for X, got in zip(requests, outs):
        np.testing.assert_allclose(got, model(X), atol=ATOL)


def test_join_feeds_pads_text_and_refuses_tensors_whose_dimensions_differ():
    a = {"input_ids": np.asarray([[5, 6]]), "attention_mask": np.asarray([[1, 1]]), "x": np.zeros((1, 2), np.float32)}
    b = {"input_ids": np.asarray([[7, 8, 9], [4, 0, 0]]), "attention_mask": np.asarray([[1, 1, 1], [1, 0, 0]]),
         "x": np.ones((2, 2), np.float32)}
    joined = join_feeds([a, b], {"input_ids": 3, "attention_mask": 0})
    np.testing.assert_array_equal(joined["input_ids"], [[5, 6, 3], [7, 8, 9], [4, 0, 0]])
    np.testing.assert_array_equal(joined["attention_mask"], [[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(joined["x"], [[0, 0], [1, 1], [1, 1]])
    wide = {**b, "x": np.ones((2, 3), np.float32)}  # a dynamic dimension that differs: not joinable
    assert join_feeds([a, wide], {"input_ids": 3, "attention_mask": 0}) is None
    assert join_feeds([a, {"input_ids": a["input_ids"]}], {}) is None  # different feeds


def test_a_request_that_cannot_join_runs_in_the_next_call(tmp_path):
    """A toy model with a dynamic second dimension: rows of width 2 and 3 never share a call; answers stay right."""
    calls = []

    def model(X):
        calls.append({k: v.shape for k, v in X.items()})
        return X["x"].sum(1, keepdims=True)

    requests = [{"x": np.ones((1, 2), np.float32)}, {"x": np.ones((2, 3), np.float32)}, {"x": np.ones((1, 3), np.float32)}]
    batcher = AdaptiveBatcher(max_rows=64)
    outs = asyncio.run(together(batcher, model, requests, {}))
    assert [c["x"] for c in calls] == [(1, 2), (3, 3)]
    for X, got in zip(requests, outs):
        np.testing.assert_allclose(got, X["x"].sum(1, keepdims=True))


def test_a_request_with_values_the_model_refuses_fails_alone_and_the_others_get_their_answers(tmp_path):
    """Ids past the embedding table in one request: onnxruntime refuses the whole joined call; that request gets
    the 400 (InputError) it would get alone, the requests that shared its call get their own rows."""
    from fusion.errors import InputError

    bb.tensor_bundle(tmp_path / "tensor")
    model = runtime.load(tmp_path / "tensor").model("ensemble")
    rng = np.random.default_rng(1)
    requests = [{"x": rng.standard_normal((n, 4)).astype(np.float32), "ids": rng.integers(0, 10, (n, 3))} for n in (2, 1, 3)]
    requests[1]["ids"][0, 1] = 10 ** 6  # past the vocabulary

    async def each():
        return await asyncio.gather(*(batcher.run(model, X, pads={}) for X in requests), return_exceptions=True)

    batcher = AdaptiveBatcher(max_rows=64)
    outs = asyncio.run(each())
    assert isinstance(outs[1], InputError), outs[1]
    for i in (0, 2):
        np.testing.assert_allclose(outs[i], model(requests[i]), atol=ATOL)


def test_text_without_an_attention_mask_joins_only_requests_of_the_same_width():
    """A text input whose graph takes input_ids alone cannot mask padding: re-padding a request to another's
    width would change its answer, so such requests share a call only at the same width."""
    from tokenizers import Tokenizer

    from fusion.bundle import TensorSpec
    from service.inputs import Inputs, can_join

    tok = Tokenizer.from_str(bb.train_tokenizer())
    spec = TensorSpec(name="text", dtype="int64", shape=("batch", "sequence"), kind="text",
                      text={"tokenizer": "tokenizer.json", "max_length": bb.MAX_LENGTH, "graph_inputs": ["input_ids"]})
    inputs = Inputs((spec,), {"text": (tok, 0)})
    a, b = {"input_ids": np.asarray([[5, 6]])}, {"input_ids": np.asarray([[7, 8, 9]])}
    assert not can_join(a, b, inputs.pads)
    assert can_join(a, {"input_ids": np.asarray([[1, 2]])}, inputs.pads)
    masked = Inputs((TensorSpec(name="text", dtype="int64", shape=("batch", "sequence"), kind="text",
                                text={**spec.text, "graph_inputs": ["input_ids", "attention_mask"]}),), {"text": (tok, 3)})
    assert masked.pads == {"input_ids": 3, "attention_mask": 0}
