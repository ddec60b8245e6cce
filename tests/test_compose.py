"""ONNX-only members composed into the fused ensemble graph (issue 15, fusion/compose.py).

Fixtures that ship offline: the onnx wheel's `backend/test/data/light/*.onnx` (IR 3, opset 9, stand-in
weights, batch fixed at 1), onnxruntime's `datasets/logreg_iris.onnx` (sklearn, ZipMap output), and
tiny torch models exported with the TorchScript exporter at opsets 9 and 13 (IR 4 and 7) and with the
dynamo exporter at opsets 18 and 20 (IR 10). Oracle: every member file run alone in onnxruntime, turned
into probabilities and combined in numpy with the textbook formula (not the graph's Log trick).
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from fusion.bundle import TensorSpec, read_bundle
from fusion.compose import (OnnxMember, check_composed, compose, graph_inputs, prepare_members, probe_batch,
                            torch_member, write_onnx_bundle)
from fusion.ensemble import make_combiner
from fusion.errors import ConfigError, MemberError
from fusion.export import OUTPUT_NAME

ATOL = 1e-5
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
IRIS = Path(ort.__file__).parent / "datasets" / "logreg_iris.onnx"
TAB = [TensorSpec("input", "float32", ("batch", 16))]
IMG = [TensorSpec("pixels", "float32", ("batch", 3, 224, 224))]


# ---- fixtures ---------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    def __init__(self, seed: int, probs: bool = False, both: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
        self.probs, self.both = probs, both

    def forward(self, x):
        z = self.net(x) * 6.0  # spread the logits: the combiners' differences show
        if self.both:
            return z, torch.softmax(z, -1)
        return torch.softmax(z, -1) if self.probs else z


class TinyCnn(nn.Module):
    """(B, 3, 224, 224) -> (B, 1000) logits, cheap: a strided conv, a pool, a linear layer."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.fc = nn.Conv2d(3, 4, 8, stride=8), nn.Linear(4 * 4 * 4, 1000)

    def forward(self, x):
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(h.flatten(1))


def legacy(module: nn.Module, opset: int, inputs: list[str], outputs: list[str], example, tmp: Path) -> onnx.ModelProto:
    """The TorchScript exporter at an old opset (IR 4 at opset 9, IR 7 at opset 13), batch dynamic."""
    path = tmp / f"legacy-{opset}-{inputs[0]}.onnx"
    axes = {n: {0: "n"} for n in inputs + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example if isinstance(example, tuple) else (example,), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return onnx.load(str(path))


def light(name: str, free_batch: bool = False) -> onnx.ModelProto:
    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    if free_batch:  # the declared batch 1 made dynamic: what is left is the graph's own
        graph_inputs(model)[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def run_alone(member: OnnxMember, feeds: dict, output: str | None = None) -> np.ndarray:
    """A member file in its own onnxruntime session -> (B, C) probabilities."""
    sess = ort.InferenceSession(member.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    own = member.input_map or dict(zip(names, feeds))
    out = sess.run([output or member.output_name or sess.get_outputs()[0].name], {k: feeds[v] for k, v in own.items()})[0]
    out = out.reshape(len(out), -1).astype(np.float64)
    if member.output == "probabilities":
        return out
    e = np.exp(out - out.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(name: str, probs: np.ndarray, weights, temperature: float = 1.0) -> np.ndarray:
    """Textbook combiners on member probabilities (M, B, C), in float64."""
    w = np.ones(len(probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).reshape(-1, 1, 1)
    if name == "soft_vote":
        return (probs * w).sum(0)
    s = (np.log(probs) * w).sum(0) / temperature  # logit_mean / geometric_mean: log p = z - logsumexp(z)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def run_composed(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], feeds)[0]


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """Three members of mixed IR/opset: TorchScript opset 9 (IR 4) with its own input name, TorchScript
    opset 13 (IR 7) with two outputs whose second (probabilities) is chosen, dynamo opset 18 (IR 10)."""
    tmp = tmp_path_factory.mktemp("tabular")
    x = torch.randn(2, 16)
    a = OnnxMember("a", legacy(Mlp(1), 9, ["x"], ["logits"], x, tmp), input_map={"x": "input"})
    b = OnnxMember("b", legacy(Mlp(2, both=True), 13, ["feat"], ["logits", "probs"], x, tmp),
                   output="probabilities", output_name="probs")
    c = torch_member("c", Mlp(3), TAB)
    return [a, b, c]


# ---- composing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, weights, params", [
    ("soft_vote", [1.0, 2.0, 3.0], {}),
    ("logit_mean", [2.0, 1.0, 1.0], {"temperature": 1.7}),
])
def test_composed_equals_members_run_separately(tabular, name, weights, params):
    assert sorted((m.model.ir_version, m.model.opset_import[0].version) for m in tabular) == [(4, 9), (7, 13), (10, 18)]
    combiner = make_combiner(name, 3, weights, **params)
    composed = compose(tabular, combiner, TAB)
    onnx.checker.check_model(composed, full_check=True)
    assert composed.ir_version == 10 and {o.domain: o.version for o in composed.opset_import} == {"": 18}
    assert [i.name for i in composed.graph.input] == ["input"] and [o.name for o in composed.graph.output] == [OUTPUT_NAME]
    assert {n.name.split("/")[0] for n in composed.graph.node} >= {"a", "b", "c", "combiner", "fanout"}
    rng = np.random.default_rng(0)
    for batch in (1, 2, 7, 33):
        feeds = {"input": rng.standard_normal((batch, 16)).astype(np.float32)}
        probs = np.stack([run_alone(m, feeds) for m in tabular])
        want = reference(name, probs, weights, params.get("temperature", 1.0))
        got = run_composed(composed, feeds)
        assert got.shape == (batch, 5)
        np.testing.assert_allclose(got, want, atol=ATOL)
    assert probs.max() > 0.9  # the members are confident somewhere: a wrong combiner would show


def test_image_members_ir3_opset9_with_dynamo_opset20(tmp_path):
    """The onnx wheel's IR 3 SqueezeNet (initializers listed as graph inputs, output (B, 1000, 1, 1),
    probabilities) beside a TorchScript opset 13 CNN and a dynamo CNN at opset 20: everything raised to
    IR 10 / opset 20 (the combiner too), and the result equals the members run separately."""
    squeeze = OnnxMember("squeeze", light("squeezenet", free_batch=True), output="probabilities")
    assert squeeze.model.ir_version == 3 and len(squeeze.model.graph.input) > 1  # initializers as inputs
    old = OnnxMember("old", legacy(TinyCnn(4), 13, ["img"], ["z"], torch.randn(2, 3, 224, 224), tmp_path))
    new = torch_member("new", TinyCnn(5), IMG, opset=20)
    members = [squeeze, old, new]
    combiner = make_combiner("soft_vote", 3, [1.0, 1.0, 2.0])
    prepared = prepare_members(members, IMG)
    composed = compose(members, combiner, IMG, prepared=prepared)
    onnx.checker.check_model(composed, full_check=True)
    assert composed.ir_version == 10 and {o.domain: o.version for o in composed.opset_import} == {"": 20}
    assert [i.name for i in composed.graph.input] == ["pixels"]
    feeds = {"pixels": np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)}
    probs = np.stack([run_alone(m, feeds) for m in members])
    np.testing.assert_allclose(run_composed(composed, feeds), reference("soft_vote", probs, [1, 1, 2]), atol=ATOL)
    report = check_composed(composed, prepared, combiner, IMG)  # the gate write_onnx_bundle runs
    assert report["max_abs_diff"] <= ATOL and report["batch_sizes"] == [1, 2, 7]


def test_probe_batch_reports_shapes_of_a_dynamic_member(tabular):
    shapes = probe_batch(tabular[0].model, {"x": TAB[0]}, name="a")
    assert shapes == {1: (1, 5), 2: (2, 5), 7: (7, 5)}


def test_fixed_batch_members_are_refused():
    # declared batch 1 (onnxruntime refuses other sizes)
    with pytest.raises(MemberError, match=r"member 'alex'.*batch 2, 7 failed: batch 2: .*Got: 2 Expected: 1"):
        prepare_members([OnnxMember("alex", light("bvlc_alexnet"))], IMG)
    # the declared batch freed: the legacy graph's Reshape still hard-codes batch 1
    with pytest.raises(MemberError, match=r"member 'alex'.*batch 2, 7 failed.*Reshape node .*requested shape:\{1,9216\}"):
        prepare_members([OnnxMember("alex", light("bvlc_alexnet", free_batch=True))], IMG)


def test_probe_sees_rows_mixed_across_the_batch():
    """A graph whose output follows the batch size but mixes rows (a Reshape over the whole batch)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [4, -1])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["t"]), helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0])]
    model = helper.make_model(helper.make_graph(nodes, "mix", [x], [y], [shape]), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(MemberError, match=r"member 'mix'.*batch 7 failed: batch 7: row 0 differs from row 0 run alone by .* \(rows mixed across the batch\)"):
        probe_batch(model, {"x": TensorSpec("x", "float32", ("batch", 4))}, name="mix")


def test_zipmap_and_non_float_outputs_are_refused():
    iris = onnx.load(str(IRIS))
    spec = [TensorSpec("float_input", "float32", ("batch", 2))]
    with pytest.raises(MemberError, match=r"member 'iris': output 'probabilities' is a ZipMap .*'zipmap': False"):
        prepare_members([OnnxMember("iris", iris, output="probabilities", output_name="probabilities")], spec)
    with pytest.raises(MemberError, match=r"output 'label' is int64; expected float scores.*\['label', 'probabilities'\]"):
        prepare_members([OnnxMember("iris", iris)], spec)
    with pytest.raises(MemberError, match=r"output_name 'nope' is not an output of the file; its outputs are \['label', 'probabilities'\]"):
        prepare_members([OnnxMember("iris", iris, output_name="nope")], spec)


def test_mismatched_input_names_are_refused_with_the_valid_names(tabular):
    a = tabular[0]
    with pytest.raises(MemberError, match=r"member 'a': input_map names member input\(s\) \['pixels'\].*its inputs are \['x'\]"):
        prepare_members([OnnxMember("a", a.model, input_map={"pixels": "input"})], TAB)
    with pytest.raises(MemberError, match=r"names bundle input\(s\) \['features'\] that do not exist; the bundle's inputs are \['input'\]"):
        prepare_members([OnnxMember("a", a.model, input_map={"x": "features"})], TAB)
    two = TAB + [TensorSpec("mask", "int64", ("batch", 16))]
    with pytest.raises(MemberError, match=r"expected as many inputs as the bundle to map by position \(2: \['input', 'mask'\]\); got 1: \['x'\]"):
        prepare_members([OnnxMember("a", a.model)], two)
    with pytest.raises(MemberError, match=r"input 'x' expects float32; bundle input 'mask' is int64"):
        prepare_members([OnnxMember("a", a.model, input_map={"x": "mask"})], two)
    wide = [TensorSpec("input", "float32", ("batch", 3, 16))]
    with pytest.raises(MemberError, match=r"input 'x' expects shape \['n', 16\]; bundle input 'input' has shape \['batch', 3, 16\]"):
        prepare_members([a], wide)


def _ml_model(version: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    node = helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L1")
    model = helper.make_model(helper.make_graph([node], "ml", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", version)])
    model.ir_version = 7
    return model


def test_operator_domains():
    spec = [TensorSpec("x", "float32", ("batch", 2))]
    custom = _ml_model(1)
    custom.graph.node[0].domain = "evil.ops"
    custom.opset_import.append(helper.make_opsetid("evil.ops", 1))
    with pytest.raises(MemberError, match=r"member 'c': uses operator domain 'evil.ops', which onnxruntime does not implement"):
        prepare_members([OnnxMember("c", custom, output="probabilities")], spec)
    with pytest.raises(MemberError, match=r"members 'm1' and 'm2' import operator domain 'ai.onnx.ml' at versions 1 and 3"):
        prepare_members([OnnxMember("m1", _ml_model(1)), OnnxMember("m2", _ml_model(3))], spec)
    # one ai.onnx.ml version shared: kept as it is, beside a default-domain member raised to its opset
    members = [OnnxMember("m1", _ml_model(1), output="probabilities"), OnnxMember("m2", _ml_model(1), output="probabilities")]
    composed = compose(members, make_combiner("soft_vote", 2), spec)
    assert {o.domain: o.version for o in composed.opset_import} == {"": 18, "ai.onnx.ml": 1}
    x = np.abs(np.random.default_rng(2).standard_normal((4, 2))).astype(np.float32) + 0.1
    np.testing.assert_allclose(run_composed(composed, {"x": x}), x / x.sum(-1, keepdims=True), atol=ATOL)


def test_member_names_kinds_and_class_counts():
    model = _ml_model(1)
    spec = [TensorSpec("x", "float32", ("batch", 2))]
    with pytest.raises(MemberError, match=r"member name 'a/b': expected a unique name"):
        prepare_members([OnnxMember("a/b", model)], spec)
    with pytest.raises(MemberError, match=r"member name 'a': expected a unique name .*got the members \['a', 'a'\]"):
        prepare_members([OnnxMember("a", model), OnnxMember("a", model)], spec)
    with pytest.raises(MemberError, match=r"output expected one of \['logits', 'probabilities'\]; got 'probs'"):
        prepare_members([OnnxMember("a", model, output="probs")], spec)
    with pytest.raises(ConfigError, match="expected a combiner over 1 members; got one over 2"):
        compose([OnnxMember("a", model)], make_combiner("soft_vote", 2), spec)
    with pytest.raises(ConfigError, match=r"expected 1 member temperatures > 0 \(one per member\); got \[0.0\]"):
        compose([OnnxMember("a", model)], make_combiner("soft_vote", 1), spec, temperatures=[0.0])


def test_merging_and_alignment_refuse_onnx_members(tmp_path):
    from fusion.fuse import align_checkpoints, merge_checkpoints, refuse_onnx_members

    path = tmp_path / "foreign.onnx"
    onnx.save(_ml_model(1), str(path))
    with pytest.raises(ConfigError, match=r"merge: expected members with weights .*got ONNX-only member\(s\) \['foreign.onnx'\]"):
        merge_checkpoints("linear", [path, path], tmp_path / "out.safetensors", arch="mlp")
    with pytest.raises(ConfigError, match=r"align: expected members with weights .*ONNX-only member\(s\) \['foreign.onnx'\]"):
        align_checkpoints("weight_matching", path, [path], tmp_path / "aligned", arch="mlp")
    with pytest.raises(ConfigError, match=r"\[merge\]: expected members with weights .*\['resnet_onnx'\]"):
        refuse_onnx_members([("mlp_0", "zoo:mlp"), ("resnet_onnx", "onnx:models/r.onnx")], "[merge]")
    refuse_onnx_members([("mlp_0", "zoo:mlp"), ("vit", "timm:vit_tiny")], "[merge]")  # torch members pass


# ---- the bundle, served -------------------------------------------------------------------------------------------


def test_bundle_served_fused_and_members_mode_agree(tabular, tmp_path):
    """write_onnx_bundle: the composed graph, the original member files, a manifest with input_map / output /
    output_name; a real `bentoml serve` answers /predict (fused) and members mode with the same numbers."""
    from tests.server import Server

    a, b, _ = tabular
    src = tmp_path / "b.onnx"
    onnx.save(b.model, str(src))
    b_file = OnnxMember.load("b", src, output="probabilities", output_name="probs")
    combiner = make_combiner("soft_vote", 2, [1.0, 3.0])
    manifest = write_onnx_bundle(tmp_path / "bundle", [a, b_file], combiner, TAB, classes=list("vwxyz"))
    bundle = read_bundle(tmp_path / "bundle", check_version=True)
    assert bundle.manifest.inputs == tuple(TAB) and manifest.variants["ensemble"].members == ("a", "b")
    ma, mb = bundle.manifest.members["a"], bundle.manifest.members["b"]
    assert (ma.input_map, ma.output, ma.output_name) == ({"x": "input"}, "logits", "logits")
    assert (mb.input_map, mb.output, mb.output_name) == ({"feat": "input"}, "probabilities", "probs")
    assert (tmp_path / "bundle" / mb.file).read_bytes() == src.read_bytes()  # the original file, as it was
    assert manifest.variants["ensemble"].parity["max_abs_diff"] <= ATOL

    X = np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32)
    fused_offline = ort.InferenceSession(str(tmp_path / "bundle" / "ensemble.onnx"),
                                         providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], {"input": X})[0]
    probs = np.stack([run_alone(a, {"input": X}), run_alone(b_file, {"input": X})])
    np.testing.assert_allclose(fused_offline, reference("soft_vote", probs, [1, 3]), atol=ATOL)
    with Server(tmp_path / "bundle", env={"FUSION_FAILURE_POLICY": "strict"}) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            fused = c.post("/predict", json={"inputs": X.tolist()})
            assert fused.status_code == 200, fused.text
            assert fused.json()["variant"] == "ensemble"
            np.testing.assert_allclose(fused.json()["probabilities"], fused_offline, atol=ATOL)
            members = c.post("/predict", json={"inputs": X.tolist()}, headers={"X-Variant": "members"})
            assert members.status_code == 200, members.text
            assert members.json()["variant"] == "members" and members.json()["members_answered"] == ["a", "b"]
            np.testing.assert_allclose(members.json()["probabilities"], fused_offline, atol=ATOL)


def test_members_mode_softmaxes_logit_members_and_flattens():
    """service/members.py on ModelEntry.output: a logits member is softmaxed before combining, a
    (B, C, 1, 1) probability member is flattened; the oracle is the textbook soft vote."""
    from types import SimpleNamespace

    from service.members import FailurePolicy, MembersEnsemble

    z = np.array([[4.0, 1.0, -2.0], [0.0, 3.0, 1.0]], dtype=np.float32)  # logits, not probabilities
    p = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=np.float32).reshape(2, 3, 1, 1)
    records = {"lg": SimpleNamespace(output="logits", output_name=""), "pr": SimpleNamespace(output="probabilities", output_name="")}
    entry = SimpleNamespace(members=("lg", "pr"), combiner={"name": "soft_vote", "weights": [1.0, 3.0]})
    manifest = SimpleNamespace(variants={"ensemble": entry}, members=records, task="classification")
    models = {"lg": lambda X: z[: len(X)], "pr": lambda X: p[: len(X)]}
    ens = MembersEnsemble(SimpleNamespace(manifest=manifest, model=models.__getitem__), FailurePolicy.parse("strict", 1000))
    try:
        out, _ = ens(np.zeros((2, 4), dtype=np.float32))
    finally:
        ens.close()
    e = np.exp(z - z.max(-1, keepdims=True))
    want = 0.25 * e / e.sum(-1, keepdims=True) + 0.75 * p.reshape(2, 3)
    np.testing.assert_allclose(out, want, atol=1e-6)


class TwoInputs(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fa, self.fb = nn.Linear(8, 4), nn.Linear(3, 4)

    def forward(self, a, b):  # (B, 8), (B, 3) -> (B, 4) logits
        return 4.0 * (self.fa(a) * torch.tanh(self.fb(b)))


def test_named_inputs_fan_out_by_input_map_and_load_in_the_service(tmp_path):
    """Two bundle inputs; one member takes them under its own names in the other order (input_map), the
    other by position; the bundle loads in the service's runtime (named feeds, ModelEntry.input_map) and
    its members mode equals the composed graph."""
    from service import runtime
    from service.members import FailurePolicy, MembersEnsemble

    specs = [TensorSpec("dense", "float32", ("batch", 8)), TensorSpec("extra", "float32", ("batch", 3))]

    class Swapped(nn.Module):  # takes (extra, dense)
        def __init__(self):
            super().__init__()
            self.inner = TwoInputs(7)

        def forward(self, e, d):
            return self.inner(d, e)

    swapped = legacy(Swapped(), 11, ["e", "d"], ["z"], (torch.randn(2, 3), torch.randn(2, 8)), tmp_path)
    members = [OnnxMember("swapped", swapped, input_map={"e": "extra", "d": "dense"}),
               torch_member("plain", TwoInputs(8), specs)]
    combiner = make_combiner("geometric_mean", 2, [1.0, 2.0])
    temps = [0.5, 2.0]  # per-member temperature scaling: softmax(z / T) before combining
    manifest = write_onnx_bundle(tmp_path / "bundle", members, combiner, specs, temperatures=temps)
    assert manifest.variants["ensemble"].method["temperatures"] == {"swapped": 0.5, "plain": 2.0}
    assert manifest.members["swapped"].input_map == {"e": "extra", "d": "dense"}
    assert manifest.members["plain"].input_map == {"dense": "dense", "extra": "extra"}
    rng = np.random.default_rng(4)
    feeds = {"dense": rng.standard_normal((5, 8)).astype(np.float32), "extra": rng.standard_normal((5, 3)).astype(np.float32)}
    probs = np.stack([run_alone(m, feeds) for m in members]) ** (1 / np.array(temps).reshape(-1, 1, 1))
    probs /= probs.sum(-1, keepdims=True)  # softmax(log p / T)
    fused = ort.InferenceSession(str(tmp_path / "bundle" / "ensemble.onnx"),
                                 providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feeds)[0]
    np.testing.assert_allclose(fused, reference("geometric_mean", probs, [1, 2]), atol=ATOL)
    loaded = runtime.load(tmp_path / "bundle")
    runtime.check_probe(loaded)  # the manifest's probe rows, re-run as the service does on load
    np.testing.assert_allclose(loaded.model("ensemble")(feeds), fused, atol=ATOL)
    ens = MembersEnsemble(loaded, FailurePolicy.parse("strict", 5000))
    try:
        np.testing.assert_allclose(ens(feeds)[0], fused, atol=ATOL)
    finally:
        ens.close()


def test_members_as_tuples_and_paths(tmp_path):
    path = tmp_path / "ml.onnx"
    onnx.save(_ml_model(1), str(path))
    spec = [TensorSpec("x", "float32", ("batch", 2))]
    prepared = prepare_members([("p", str(path), None, "probabilities"), ("q", _ml_model(1), {"x": "x"}, "probabilities", "y")], spec)
    assert [(p.member.name, p.member.path, p.input_map, p.output_name) for p in prepared] == [
        ("p", str(path), {"x": "x"}, "y"), ("q", "", {"x": "x"}, "y")]
    with pytest.raises(MemberError, match=r"member 'r': expected an ONNX file at .*nope.onnx; got no such file"):
        prepare_members([("r", tmp_path / "nope.onnx")], spec)
    with pytest.raises(ConfigError, match=r"expected an OnnxMember or \(name, ModelProto or path, .*got tuple of 1 items"):
        prepare_members([("r",)], spec)


def test_kept_domains_are_ones_the_service_loads():
    from fusion.compose import DEFAULT_DOMAINS, KEPT_DOMAINS
    from service.onnx_check import BUILTIN_DOMAINS

    assert set(KEPT_DOMAINS) | set(DEFAULT_DOMAINS) == set(BUILTIN_DOMAINS)
