"""Synthetic bring-your-own-models bundles with named inputs (issue 15), built with onnx.helper (no torch).

- `image_bundle`: one image input `pixels` (3x8x8, RGB); each graph normalises inside, `(x * scale - mean) / std`
  per channel, then global average pool and the flattened pixels -> MatMul -> Softmax. Two members (their
  file input is `x`, mapped to `pixels` by ModelEntry.input_map) and the fused `ensemble` (their mean).
- `text_bundle`: one text input `text`, a WordLevel tokenizer.json trained here with `tokenizers`; the graph
  takes input_ids/attention_mask: Gather embedding, attention-masked mean, MatMul, Softmax.
- `tensor_bundle`: two tensor inputs, `x` float32 [batch, 4] and `ids` int64 [batch, 3]: Gather + mean of the
  ids' embeddings added to x, MatMul, Softmax.
Manifests are written by fusion.bundle.BundleWriter, so every digest (tokenizer.json's too) is real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion.bundle import SCHEMA_VERSION, BundleWriter, InputSpec, Manifest, ModelEntry, TensorSpec

OPSET = 17
N_CLASSES = 5
IMAGE_SHAPE = (3, 8, 8)
IMAGE = {"mode": "RGB", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "rain falls on the quiet town",
    "the market opens at nine", "birds sing in the morning light", "a train leaves the station",
    "she reads a long book by the window", "stocks fell sharply on monday",
]
MAX_LENGTH = 12


def _model(nodes, inits, inputs, name="probabilities"):
    from onnx import TensorProto, checker, helper

    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", N_CLASSES])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _manifest(inputs, variants, members, files=()) -> Manifest:
    first = inputs[0]
    return Manifest(
        schema_version=SCHEMA_VERSION, bundle_version="", created="", task="classification",
        input=InputSpec(name=first.name, shape=(-1, 1), dtype=first.dtype, scaling={"kind": "none"}),
        output_name="probabilities", classes=tuple(range(N_CLASSES)), variants=variants, members=members,
        dataset={"name": "synthetic-byo", "task": "classification"}, inputs=tuple(inputs),
        files={f: "" for f in files},
    )


# ---- image ------------------------------------------------------------------------------------------


def _image_nodes(prefix: str, seed: int, x: str, out: str):
    from onnx import helper, numpy_helper

    c, h, w = IMAGE_SHAPE
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((c + c * h * w, N_CLASSES)) * 0.3).astype(np.float32)
    b = (0.1 * rng.standard_normal(N_CLASSES)).astype(np.float32)
    consts = {"scale": np.float32(IMAGE["scale"]), "mean": np.asarray(IMAGE["mean"], np.float32).reshape(1, c, 1, 1),
              "std": np.asarray(IMAGE["std"], np.float32).reshape(1, c, 1, 1), "W": W, "b": b}
    inits = [numpy_helper.from_array(np.asarray(v), f"{prefix}{k}") for k, v in consts.items()]
    p = prefix
    nodes = [
        helper.make_node("Mul", [x, f"{p}scale"], [f"{p}xs"]),
        helper.make_node("Sub", [f"{p}xs", f"{p}mean"], [f"{p}xc"]),
        helper.make_node("Div", [f"{p}xc", f"{p}std"], [f"{p}xn"]),  # (B, C, H, W) normalised inside the graph
        helper.make_node("ReduceMean", [f"{p}xn"], [f"{p}gap"], axes=[2, 3], keepdims=0),  # (B, C)
        helper.make_node("Flatten", [f"{p}xn"], [f"{p}flat"], axis=1),  # (B, C*H*W)
        helper.make_node("Concat", [f"{p}gap", f"{p}flat"], [f"{p}feat"], axis=1),
        helper.make_node("MatMul", [f"{p}feat", f"{p}W"], [f"{p}z"]),
        helper.make_node("Add", [f"{p}z", f"{p}b"], [f"{p}logits"]),
        helper.make_node("Softmax", [f"{p}logits"], [out], axis=-1),
    ]
    return nodes, inits


def image_member(seed: int, input_name: str = "x") -> bytes:
    from onnx import TensorProto, helper

    nodes, inits = _image_nodes("", seed, input_name, "probabilities")
    return _model(nodes, inits, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])])


def image_ensemble(seeds=(1, 2)) -> bytes:
    from onnx import TensorProto, helper

    nodes, inits, outs = [], [], []
    for s in seeds:
        n, i = _image_nodes(f"m{s}_", s, "pixels", f"m{s}_p")
        nodes, inits, outs = nodes + n, inits + i, outs + [f"m{s}_p"]
    nodes.append(helper.make_node("Mean", outs, ["probabilities"]))
    return _model(nodes, inits, [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])])


def image_bundle(out: str | Path) -> Manifest:
    spec = TensorSpec(name="pixels", dtype="float32", shape=("batch", *IMAGE_SHAPE), kind="image", image=IMAGE)
    with BundleWriter(out) as w:
        (w.stage / "members").mkdir()
        (w.stage / "ensemble.onnx").write_bytes(image_ensemble())
        members = {}
        for s in (1, 2):
            (w.stage / f"members/cnn_{s}.onnx").write_bytes(image_member(s))
            members[f"cnn_{s}"] = ModelEntry(file=f"members/cnn_{s}.onnx", sha256="", kind="member", input_map={"x": "pixels"})
        variants = {"ensemble": ModelEntry(file="ensemble.onnx", sha256="", kind="ensemble",
                                           combiner={"name": "soft_vote", "weights": None}, members=tuple(members))}
        return w.commit(_manifest([spec], variants, members))


# ---- text ---------------------------------------------------------------------------------------------


def train_tokenizer() -> str:
    """A WordLevel tokenizer.json (whitespace words, [PAD]=0, [UNK]=1) trained on SENTENCES."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return tok.to_str()


def text_model(vocab: int, seed: int = 3, dim: int = 6, weights: dict | None = None) -> bytes:
    """`weights`: {"E": (vocab, dim), "W": (dim, C), "b": (C,)} to use instead of random ones."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    consts = {"E": rng.standard_normal((vocab, dim)).astype(np.float32),
              "W": rng.standard_normal((dim, N_CLASSES)).astype(np.float32),
              "b": (0.1 * rng.standard_normal(N_CLASSES)).astype(np.float32),
              "ax1": np.asarray([1], np.int64), "axlast": np.asarray([-1], np.int64)}
    consts |= {k: np.asarray(v, np.float32) for k, v in (weights or {}).items()}
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"], axis=0),  # (B, S, D)
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),  # (B, S)
        helper.make_node("Unsqueeze", ["maskf", "axlast"], ["mask3"]),  # (B, S, 1)
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "ax1"], ["summed"], keepdims=0),  # (B, D)
        helper.make_node("ReduceSum", ["maskf", "ax1"], ["count"], keepdims=1),  # (B, 1)
        helper.make_node("Div", ["summed", "count"], ["mean"]),
        helper.make_node("MatMul", ["mean", "W"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")]
    return _model(nodes, inits, inputs)


def text_bundle(out: str | Path, graph_inputs=("input_ids", "attention_mask"), probe: list[str] | None = None,
                probe_shift: float = 0.0) -> Manifest:
    """`probe`: strings recorded as the manifest's probe (as a client sends them), with the graph's outputs on
    them computed here (the tokenizer's ids, one string at a time), moved by `probe_shift` (a lying probe)."""
    from tokenizers import Tokenizer

    tokenizer = train_tokenizer()
    tok = Tokenizer.from_str(tokenizer)
    vocab = tok.get_vocab_size()
    spec = TensorSpec(name="text", dtype="int64", shape=("batch", "sequence"), kind="text",
                      text={"tokenizer": "tokenizer.json", "max_length": MAX_LENGTH, "graph_inputs": list(graph_inputs)})
    with BundleWriter(out) as w:
        (w.stage / "tokenizer.json").write_text(tokenizer)
        (w.stage / "ensemble.onnx").write_bytes(text_model(vocab))
        variants = {"ensemble": ModelEntry(file="ensemble.onnx", sha256="", kind="ensemble",
                                           combiner={"name": "soft_vote", "weights": None})}
        manifest = _manifest([spec], variants, {}, files=("tokenizer.json",))
        if probe:
            import onnxruntime as ort

            sess = ort.InferenceSession(text_model(vocab), providers=["CPUExecutionProvider"])
            outs = []
            for t in probe:
                ids = np.asarray([tok.encode(t).ids[:MAX_LENGTH]], np.int64)
                outs.append(sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0] + probe_shift)
            from dataclasses import replace

            manifest = replace(manifest, probe={"inputs": {"text": list(probe)}, "outputs": {"ensemble": np.stack(outs).tolist()}})
        return w.commit(manifest)


# ---- two tensors --------------------------------------------------------------------------------------


def tensor_model(seed: int = 4) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    consts = {"E": rng.standard_normal((10, 4)).astype(np.float32), "W": rng.standard_normal((4, N_CLASSES)).astype(np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0),  # (B, 3, 4)
        helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),  # (B, 4)
        helper.make_node("Add", ["pooled", "x"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])]
    return _model(nodes, inits, inputs)


def tensor_bundle(out: str | Path) -> Manifest:
    specs = [TensorSpec(name="x", dtype="float32", shape=("batch", 4)),
             TensorSpec(name="ids", dtype="int64", shape=("batch", 3))]
    with BundleWriter(out) as w:
        (w.stage / "ensemble.onnx").write_bytes(tensor_model())
        variants = {"ensemble": ModelEntry(file="ensemble.onnx", sha256="", kind="ensemble",
                                           combiner={"name": "soft_vote", "weights": None})}
        return w.commit(_manifest(specs, variants, {}))


# ---- references ---------------------------------------------------------------------------------------


def run_onnx(bundle: str | Path, entry: str, feeds: dict) -> np.ndarray:
    """An entry's graph in onnxruntime, in this process (the offline reference)."""
    import onnxruntime as ort

    from fusion.bundle import read_bundle

    b = read_bundle(bundle)
    sess = ort.InferenceSession(b.read_verified(entry), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def png(pixels_hwc: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 (H, W, 3) -> encoded image bytes (Pillow)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels_hwc.astype(np.uint8), "RGB").save(buf, format=fmt)
    return buf.getvalue()


def bag_student(vocab: int, n_classes: int = N_CLASSES, dim: int = 16, seed: int = 0):
    """A small text student for `[distill] source = "python:tests.byo_bundles:bag_student"`: embedding, mean over
    the attention mask, linear; forward(input_ids, attention_mask) -> logits (its `input_names`)."""
    import torch
    from torch import nn

    class Bag(nn.Module):
        input_names = ("input_ids", "attention_mask")

        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.emb, self.out = nn.Embedding(vocab, dim), nn.Linear(dim, n_classes)

        def forward(self, input_ids, attention_mask):
            m = attention_mask.unsqueeze(-1).float()  # (B, S, 1)
            return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0))

    return Bag()


def two_input_student(dim: int = 8, seed: int = 0):
    """A student over the tensor bundle's two inputs, forward(x (B, 4) float, ids (B, 3) int64) -> logits:
    the ids' mean embedding beside x, then an MLP (no `input_names`: it takes the graph inputs in order)."""
    import torch
    from torch import nn

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.emb = nn.Embedding(10, dim)
            self.mlp = nn.Sequential(nn.Linear(4 + dim, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))

        def forward(self, x, ids):
            return self.mlp(torch.cat([x, self.emb(ids).mean(1)], -1))

    return TwoInputs()
