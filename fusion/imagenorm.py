"""Image normalisation inside each member's graph (issue 15: `[[inputs]] kind = "image"`).

The service sends an image input as raw float32 pixels, 0..255 (Pillow's decoded uint8 values, resized), so
that the bundle, not the client, owns the preprocessing. The recipe's `image = {scale, mean, std}` table
says what the members expect: `(x * scale - mean) / std` per channel. `normalize_member` puts exactly that
in front of a member's ONNX graph, for every member input fed by an image input:

    pixels (raw 0..255) ─► Mul(scale) ─► Sub(mean[1,C,1,1]) ─► Div(std[1,C,1,1]) ─► the member's own graph

It runs on ONNX, after a torch member's export and on a foreign `onnx:` file alike, so every member file in
the bundle (`members/NAME.onnx`, which members mode and shadow runs serve alone) and the composed ensemble
take the same raw pixels. The three operations are the formula's own, in float32, in its order (not a
folded `x * a + b`), so the graph equals the members run on pixels normalised the documented way.

The normalisation applies to *every* member an image input feeds, ONNX files included: a file that already
normalises its input (`x / 255` inside) is fed by an image input whose table is the identity (`scale = 1`, no
mean or std: nothing is added), and a torch member beside it then normalises itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fusion.bundle import TensorSpec
from fusion.errors import MemberError

MIN_OPSET = 7  # Mul/Sub/Div broadcast numpy-style from opset 7 (earlier ones need `broadcast`/`axis` attributes)


def image_constants(spec: TensorSpec) -> tuple[np.float32, np.ndarray, np.ndarray] | None:
    """(scale, mean (1,C,1,1), std (1,C,1,1)) in float32 for an image input; None when it is the identity
    or the input is not an image."""
    if spec.kind != "image" or not spec.image:
        return None
    c = int(spec.shape[1])
    scale = np.float32(spec.image.get("scale", 1.0))
    mean = np.asarray(spec.image.get("mean") or [0.0] * c, dtype=np.float32).reshape(1, c, 1, 1)
    std = np.asarray(spec.image.get("std") or [1.0] * c, dtype=np.float32).reshape(1, c, 1, 1)
    if scale == 1 and not mean.any() and (std == 1).all():
        return None
    return scale, mean, std


def normalize_pixels(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The reference: `(x * scale - mean) / std` in float32 numpy (what the graph computes)."""
    consts = image_constants(spec)
    x = np.asarray(x, dtype=np.float32)
    if consts is None:
        return x
    scale, mean, std = consts
    return (x * scale - mean) / std


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node (and subgraph node) input named `old` reads `new` instead; a subgraph that declares its
    own `old` (shadowing) is left alone."""
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                if old not in {i.name for i in g.input} | {t.name for t in g.initializer}:
                    _rename_uses(g, old, new)
    for out in graph.output:  # an input passed straight through to an output: keep the graph valid
        if out.name == old:
            graph.node.append(helper.make_node("Identity", [new], [old + "__out"], name=f"image_norm/{old}/passthrough"))
            out.name = old + "__out"


def normalize_model(model: onnx.ModelProto, feeds: dict[str, TensorSpec], *, name: str = "model") -> onnx.ModelProto:
    """A copy of `model` whose inputs named in `feeds` ({graph input: the image TensorSpec feeding it})
    are normalised first; inputs fed by identity tables are left as they are."""
    work = {k: c for k, s in feeds.items() if (c := image_constants(s)) is not None}
    if not work:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise MemberError(f"member '{name}': normalising its image input needs opset >= {MIN_OPSET} (numpy-style "
                          f"broadcasting); got opset {opset}: re-export it at a newer opset")
    taken = {v for n in g.node for v in (*n.input, *n.output)} | {i.name for i in g.input} | {t.name for t in g.initializer}
    elems = {i.name: i.type.tensor_type.elem_type for i in g.input}
    prefix_nodes = []
    for inp, (scale, mean, std) in work.items():
        if elems.get(inp) not in (onnx.TensorProto.FLOAT, 0):
            raise MemberError(f"member '{name}': input '{inp}' is fed by an image input (float32 pixels) but expects "
                              f"{helper.tensor_dtype_to_np_dtype(elems[inp]).name}")
        new = f"{inp}__normalized"
        while new in taken:
            new += "_"
        taken.add(new)
        _rename_uses(g, inp, new)
        base = f"image_norm/{inp}"
        consts = {"scale": np.asarray(scale, dtype=np.float32), "mean": mean, "std": std}
        for key, value in consts.items():  # Constant nodes, not initializers: valid at any IR version
            prefix_nodes.append(helper.make_node("Constant", [], [f"{base}/{key}"], name=f"{base}/{key}",
                                                 value=numpy_helper.from_array(value, f"{base}/{key}")))
        prefix_nodes += [
            helper.make_node("Mul", [inp, f"{base}/scale"], [f"{base}/scaled"], name=f"{base}/mul"),
            helper.make_node("Sub", [f"{base}/scaled", f"{base}/mean"], [f"{base}/centred"], name=f"{base}/sub"),
            helper.make_node("Div", [f"{base}/centred", f"{base}/std"], [new], name=f"{base}/div"),
        ]
    nodes = prefix_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    out.doc_string = (out.doc_string + "\n" if out.doc_string else "") + \
        "fusion: image inputs normalised in the graph, (x * scale - mean) / std: " + ", ".join(sorted(work))
    return out


def normalize_member(member, inputs: Sequence[TensorSpec]):
    """The OnnxMember (fusion/compose.py) with its image-fed inputs normalised (itself when none is): the copy
    has no `path`, so the bundle stores the normalised graph as `members/NAME.onnx`."""
    from fusion.compose import as_member, resolve_input_map

    member = as_member(member)
    by_name = {s.name: s for s in inputs}
    imap = resolve_input_map(member, inputs)
    feeds = {own: by_name[src] for own, src in imap.items() if by_name[src].kind == "image"}
    model = normalize_model(member.model, feeds, name=member.name)
    return member if model is member.model else replace(member, model=model, path="")


__all__ = ["image_constants", "normalize_member", "normalize_model", "normalize_pixels"]
