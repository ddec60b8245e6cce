"""What every peer app shares: the spec, request decoding, the member loop and the soft vote.

Imports only numpy, Pillow, tokenizers and onnxruntime (each peer's venv has them), never the service, so a
peer computes what a user's own server would: PNG -> RGB (C, H, W) float32 raw 0..255 pixels (the bundle's
member files normalise inside); text -> the tokenizer's ids truncated at max_length, padded to the longest
row with 0, mask, zero token types (as service/inputs.py feeds ours); each member's logits softmaxed and
averaged with equal weights (the recipe's soft vote).

The request every peer answers (ours too): `{"inputs": [ROW, ...]}` with ROW a base64 PNG string (image)
or a string (text); the answer `{"probabilities": [[...], ...]}` (KServe: `{"instances": [...]}` ->
`{"predictions": [...]}`, its V1 protocol).
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np

SPEC_ENV = "PEER_SPEC"  # the path of the ensemble's spec.json (bench/peers/ensembles.py)
THREADS_ENV = "PEER_THREADS"  # onnxruntime intra-op threads; unset: onnxruntime's default (all cores)


def load_spec(path: str | os.PathLike | None = None) -> dict:
    path = path or os.environ.get(SPEC_ENV)
    if not path:
        raise RuntimeError(f"expected {SPEC_ENV}=PATH/spec.json in the environment; got none")
    return json.loads(Path(path).read_text())


class Decoder:
    """Request rows -> the members' feeds (numpy), for one ensemble spec."""

    def __init__(self, spec: dict):
        self.kind = spec["kind"]
        if self.kind == "text":
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(spec["tokenizer"])
            self.tok.no_padding()
            self.tok.enable_truncation(int(spec["max_length"]))

    def __call__(self, rows: list) -> dict[str, np.ndarray]:
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"expected a non-empty list of rows; got {type(rows).__name__}")
        if self.kind == "image":
            from PIL import Image

            pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r))).convert("RGB"), np.float32).transpose(2, 0, 1)
                      for r in rows]
            return {"pixels": np.ascontiguousarray(np.stack(pixels))}
        enc = [self.tok.encode(r).ids for r in rows]
        width = max(len(e) for e in enc)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = e
            mask[i, :len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float32)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def session(path: str, threads: int | None = None):
    """An onnxruntime CPU session with the library's defaults (what the docs' examples open), unless
    PEER_THREADS / `threads` sets intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    threads = threads or int(os.environ.get(THREADS_ENV, "0") or 0)
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def member_probs(sess, feeds: dict[str, np.ndarray]) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    return softmax(sess.run(None, {n: feeds[n] for n in names})[0])


def split_rows(rows: list[list]) -> tuple[list, list[int]]:
    """Batched rows from several requests (each a list) as one list, and each request's row count."""
    flat = [r for rs in rows for r in rs]
    return flat, [len(rs) for rs in rows]
