"""A corpus of ONNX files for the differential test of service/onnx_check.py.

Three sources, each file as (name, bytes):

* `shipped()`: every `.onnx` the installed `onnx` wheel ships under onnx/backend/test/data/ (the
  `light_*` model-zoo networks, plus the `simple`, `real`, `pytorch-converted` and
  `pytorch-operator` test models);
* `written()`: what this test suite writes: the reliability bundles' members and fused ensemble
  (tests/reliability/bundles.py), its hostile files (external data, a custom-op domain), and
  `fusion.export`'s own output (zoo MLP and CNN, a fused soft-vote ensemble, the int8 file of
  `fusion.quantize`) when torch is installed;
* `constructs()`: small models built here for the constructs the reader walks and the others do
  not contain: If/Loop subgraphs nested three deep, a local function (attribute defaults, a
  subgraph and a tensor in its body), sparse initializers and sparse attributes, `training_info`,
  `ai.onnx.ml` and `com.microsoft` nodes, and a function call carrying an attribute of every type.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from tests.reliability import bundles

F, C = bundles.N_FEATURES, bundles.N_CLASSES


def shipped() -> list[tuple[str, bytes]]:
    import onnx

    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    return [(str(p.relative_to(data)), p.read_bytes()) for p in sorted(data.rglob("*.onnx"))]


def written() -> list[tuple[str, bytes]]:
    out = [(f"bundles/member_{i}", bundles.member_model(0, i)) for i in range(len(bundles.MEMBERS))]
    out.append(("bundles/ensemble", bundles.ensemble_model(0, tuple(range(len(bundles.MEMBERS))))))
    for location in ("../../outside.bin", "/etc/hostname", "weights.bin"):
        out.append((f"bundles/external_data[{location}]", bundles.external_data_model(location)[0]))
    out.append(("bundles/custom_op", bundles.custom_op_model()))
    return out + exported()


def exported() -> list[tuple[str, bytes]]:
    """fusion.export's files (untrained seeded zoo members: the exporter, not the weights, is the point)."""
    try:
        import torch
    except ImportError:
        return []
    from fusion.ensemble import make_combiner
    from fusion.export import FusedEnsemble, Probabilities, export_onnx
    from fusion.quantize import quantize_file
    from fusion.zoo import build_model

    torch.manual_seed(0)
    X = bundles.digits_like(16)
    models = {"mlp": Probabilities(build_model("mlp", hidden=[32, 32])), "cnn": Probabilities(build_model("cnn"))}
    models["fused_soft_vote"] = FusedEnsemble([build_model("mlp", hidden=[16]), build_model("cnn")],
                                              make_combiner("soft_vote", 2))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, path, X)
            out.append((f"fusion.export/{name}", path.read_bytes()))
        quantize_file(Path(tmp) / "mlp.onnx", Path(tmp) / "mlp_int8.onnx")
        out.append(("fusion.quantize/mlp_int8", (Path(tmp) / "mlp_int8.onnx").read_bytes()))
    return out


# ---- constructs ------------------------------------------------------------------------------


def _io():
    from onnx import TensorProto, helper

    return ([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", F])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", C])])


def _head(x: str, rng) -> tuple[list, list]:
    """x (batch, F) -> Gemm -> Softmax -> probabilities."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(rng.standard_normal((F, C)).astype(np.float32), "head_W"),
             numpy_helper.from_array(np.zeros(C, np.float32), "head_b")]
    nodes = [helper.make_node("Gemm", [x, "head_W", "head_b"], ["head_logits"]),
             helper.make_node("Softmax", ["head_logits"], ["probabilities"], axis=-1)]
    return nodes, inits


def _model(nodes, inits, *, opsets=(("", bundles.OPSET),), functions=(), full_check=True, **graph_kw) -> bytes:
    from onnx import checker, helper

    inputs, outputs = _io()
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits, **graph_kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              functions=list(functions), ir_version=8)
    model.metadata_props.add(key="built_by", value="tests/reliability/onnx_corpus.py")
    checker.check_model(model, full_check=full_check)
    return model.SerializeToString()


def control_flow_model() -> bytes:
    """If (then: Loop whose body holds another If) else Identity: subgraphs three levels deep."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    vi = helper.make_tensor_value_info
    inner_if = helper.make_node(
        "If", ["cond_in"], ["acc_next"],
        then_branch=helper.make_graph([helper.make_node("Identity", ["acc_in"], ["t3"])], "then3", [],
                                      [vi("t3", TensorProto.FLOAT, None)]),
        else_branch=helper.make_graph([helper.make_node("Neg", ["acc_in"], ["e3"])], "else3", [],
                                      [vi("e3", TensorProto.FLOAT, None)]),
    )
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), inner_if,
         helper.make_node("Mul", ["acc_next", "half"], ["acc_out"])],
        "loop_body",
        [vi("iter", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("acc_in", TensorProto.FLOAT, None)],
        [vi("cond_out", TensorProto.BOOL, []), vi("acc_out", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    then_branch = helper.make_graph(
        [helper.make_node("Loop", ["trips", "true", "input"], ["looped"], body=body)], "then1", [],
        [vi("looped", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(3, np.int64), "trips"),
                     numpy_helper.from_array(np.array(True), "true")],
    )
    else_branch = helper.make_graph([helper.make_node("Identity", ["input"], ["same"])], "else1", [],
                                    [vi("same", TensorProto.FLOAT, None)])
    head, head_inits = _head("branch", rng)
    nodes = [helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["branch"], then_branch=then_branch, else_branch=else_branch),
             *head]
    return _model(nodes, [numpy_helper.from_array(np.array(0.0, np.float32), "zero"), *head_inits])


def function_model() -> bytes:
    """A local function (domain local.fusion) with attribute defaults (a float and a tensor), a
    Constant tensor attribute and an If subgraph in its body, called from the main graph."""
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    vi = helper.make_tensor_value_info
    cond = helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True), "flag_value"))
    branch = helper.make_node(
        "If", ["flag"], ["picked"],
        then_branch=helper.make_graph([helper.make_node("Relu", ["X"], ["r"])], "fn_then", [],
                                      [vi("r", TensorProto.FLOAT, None)]),
        else_branch=helper.make_graph([helper.make_node("Identity", ["X"], ["i"])], "fn_else", [],
                                      [vi("i", TensorProto.FLOAT, None)]),
    )
    alpha = helper.make_node("Constant", [], ["alpha_c"])
    alpha.attribute.append(helper.make_attribute_ref("value_float", AttributeProto.FLOAT, ref_attr_name="alpha"))
    bias = helper.make_node("Constant", [], ["bias_c"])
    bias.attribute.append(helper.make_attribute_ref("value", AttributeProto.TENSOR, ref_attr_name="bias"))
    fn = helper.make_function(
        "local.fusion", "ScaledRelu", ["X"], ["Y"],
        [cond, branch, alpha, bias, helper.make_node("Mul", ["picked", "alpha_c"], ["scaled"]),
         helper.make_node("Add", ["scaled", "bias_c"], ["Y"])],
        [helper.make_opsetid("", bundles.OPSET)],
        attribute_protos=[helper.make_attribute("alpha", 0.5),
                          helper.make_attribute("bias", numpy_helper.from_array(np.zeros(F, np.float32), "bias_default"))],
    )
    head, head_inits = _head("scaled_input", rng)
    nodes = [helper.make_node("ScaledRelu", ["input"], ["scaled_input"], domain="local.fusion", alpha=2.0), *head]
    return _model(nodes, head_inits, opsets=(("", bundles.OPSET), ("local.fusion", 1)), functions=[fn])


def sparse_model() -> bytes:
    """A sparse initializer and a Constant node with a sparse_value attribute."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(3)
    idx = np.array([[0, 1], [5, 3], [63, 9]], np.int64)
    vals = rng.standard_normal(len(idx)).astype(np.float32)
    sparse_w = helper.make_sparse_tensor(numpy_helper.from_array(vals, "sparse_W"),
                                         numpy_helper.from_array(idx, "sparse_W_idx"), [F, C])
    sparse_b = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0], np.float32), "bias_vals"),
                                         numpy_helper.from_array(np.array([4], np.int64), "bias_idx"), [C])
    nodes = [helper.make_node("Constant", [], ["bias"], sparse_value=sparse_b),
             helper.make_node("MatMul", ["input", "sparse_W"], ["logits0"]),
             helper.make_node("Add", ["logits0", "bias"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]
    # onnx's shape inference types a sparse initializer as a sparse tensor (MatMul refuses it);
    # onnxruntime densifies it at load: checked without full_check
    return _model(nodes, [], sparse_initializer=[sparse_w], full_check=False)


def training_model() -> bytes:
    """A member model with training_info: an algorithm graph (with its own initializer) that updates
    a weight, and an initialization graph that resets it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(bundles.member_model(0, 0))
    vi = helper.make_tensor_value_info
    decay = numpy_helper.from_array(np.array(0.99, np.float32), "decay")
    algorithm = helper.make_graph([helper.make_node("Mul", ["W2", "decay"], ["W2_next"])], "algorithm", [],
                                  [vi("W2_next", TensorProto.FLOAT, None)], initializer=[decay])
    zeros = numpy_helper.from_array(np.zeros((bundles.HIDDEN, C), np.float32), "zeros")
    initialization = helper.make_graph([helper.make_node("Constant", [], ["W2_init"], value=zeros)], "initialization", [],
                                       [vi("W2_init", TensorProto.FLOAT, [bundles.HIDDEN, C])])
    model.training_info.append(
        helper.make_training_info(algorithm, [("W2", "W2_next")], initialization, [("W2", "W2_init")]))
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def ml_and_contrib_model() -> bytes:
    """Nodes from ai.onnx.ml (Normalizer) and com.microsoft (Gelu), onnxruntime's other built-in domains."""
    from onnx import helper

    head, head_inits = _head("gelu", np.random.default_rng(4))
    nodes = [helper.make_node("Normalizer", ["input"], ["normed"], domain="ai.onnx.ml", norm="L2"),
             helper.make_node("Gelu", ["normed"], ["gelu"], domain="com.microsoft"), *head]
    return _model(nodes, head_inits, opsets=(("", bundles.OPSET), ("ai.onnx.ml", 3), ("com.microsoft", 1)))


def every_attribute_model() -> bytes:
    """A local-function call carrying one attribute of every AttributeProto type (the function's body
    ignores them): tensors, graphs, sparse tensors and type protos in attribute position."""
    from onnx import TensorProto, helper, numpy_helper

    vi = helper.make_tensor_value_info
    t = numpy_helper.from_array(np.arange(4, dtype=np.float32), "attr_t")
    sp = helper.make_sparse_tensor(numpy_helper.from_array(np.array([2.0], np.float32), "sv"),
                                   numpy_helper.from_array(np.array([1], np.int64), "si"), [4])
    g = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "attr_g", [vi("a", TensorProto.FLOAT, [1])],
                          [vi("b", TensorProto.FLOAT, [1])])
    tp = helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])
    attrs = {"f": 1.5, "i": 3, "s": "text", "t": t, "g": g, "sparse": sp, "tp": tp, "floats": [1.0, 2.0],
             "ints": [1, 2], "strings": ["a", "b"], "tensors": [t, t], "graphs": [g, g], "sparses": [sp], "tps": [tp, tp]}
    fn = helper.make_function("local.attrs", "Carry", ["X"], ["Y"], [helper.make_node("Identity", ["X"], ["Y"])],
                              [helper.make_opsetid("", bundles.OPSET)], attributes=list(attrs))
    call = helper.make_node("Carry", ["input"], ["carried"], domain="local.attrs")
    call.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    head, head_inits = _head("carried", np.random.default_rng(5))
    return _model([call, *head], head_inits, opsets=(("", bundles.OPSET), ("local.attrs", 1)), functions=[fn])


def constructs() -> list[tuple[str, bytes]]:
    return [(f"constructs/{f.__name__.removesuffix('_model')}", f()) for f in
            (control_flow_model, function_model, sparse_model, training_model, ml_and_contrib_model, every_attribute_model)]


def corpus() -> list[tuple[str, bytes]]:
    return written() + constructs() + shipped()
