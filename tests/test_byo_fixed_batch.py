"""Members whose batch dimension is fixed (issue 15): refused by default; with `fixed_batch = "one_row"`
run one row at a time, in the fused graph (an ONNX Loop over the rows around the member's own nodes) and
in members mode (the service's runtime calls the member's session once per row).

The fixed member is what an old exporter leaves: input declared (1, F), and a Reshape that hard-codes
batch 1. Oracle: each member file run alone in onnxruntime (the fixed one row by row), softmaxed and
averaged in numpy (soft vote, equal weights).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fusion.bundle import TensorSpec, manifest_version, read_bundle
from fusion.compose import OnnxMember, prepare_members
from fusion.errors import ConfigError, MemberError
from fusion.recipe import load_recipe

F, C = 6, 3
ATOL = 1e-5


def member(seed: int, *, fixed: bool, input_name: str = "x") -> onnx.ModelProto:
    """x @ W + b; fixed: input (1, F) and a Reshape to the constant shape (1, C) (batch 1 hard-coded)."""
    rng = np.random.default_rng(seed)
    W, b = rng.normal(0, 1, (F, C)).astype(np.float32), rng.normal(0, 1, C).astype(np.float32)
    batch = 1 if fixed else "N"
    nodes = [helper.make_node("MatMul", [input_name, "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"])]
    inits = [helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.ravel()), helper.make_tensor("b", TensorProto.FLOAT, [C], b)]
    if fixed:
        nodes.append(helper.make_node("Reshape", ["z", "shape"], ["logits"]))
        inits.append(helper.make_tensor("shape", TensorProto.INT64, [2], [1, C]))
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["logits"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, F])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="legacy")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def alone(path: Path, X: np.ndarray, one_row: bool) -> np.ndarray:
    """A member file in its own session -> (B, C) probabilities; a fixed one row by row."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    z = (np.concatenate([sess.run(None, {name: X[i:i + 1]})[0] for i in range(len(X))]) if one_row
         else sess.run(None, {name: X})[0]).astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def data(seed: int = 0, n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    means = rng.normal(0, 1.5, (C, F))
    return (means[y] + rng.normal(0, 1.0, (n, F))).astype(np.float32), y


def recipe(root: Path, out: str, fixed_batch: str | None, *, with_data: bool) -> Path:
    option = f'fixed_batch = "{fixed_batch}"' if fixed_batch else ""
    data_section = (f'[data]\nsource = "{root / "data.npz"}"\n\n[distill]\nenabled = false\n\n[merge]\nmethod = ""\n'
                    if with_data else "")
    text = textwrap.dedent(f"""
        [ensemble]
        combiner = "soft_vote"
        weights = "equal"

        [build]
        out = "{root / out}"
        compare = false

        [[inputs]]
        name = "feats"
        dtype = "float32"
        shape = ["batch", {F}]

        [[members]]
        name = "old"
        source = "onnx:{root / 'fixed.onnx'}"
        {option}

        [[members]]
        name = "new"
        source = "onnx:{root / 'dynamic.onnx'}"
    """) + data_section
    path = root / f"{out}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byo-fixed")
    onnx.save(member(1, fixed=True), root / "fixed.onnx")
    onnx.save(member(2, fixed=False, input_name="features"), root / "dynamic.onnx")
    X, y = data()
    np.savez(root / "data.npz", feats=X, y=y)
    return root


def reference(root: Path, X: np.ndarray) -> np.ndarray:
    return (alone(root / "fixed.onnx", X, True) + alone(root / "dynamic.onnx", X, False)) / 2


def fused(bundle: Path, X: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(bundle / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"feats": X})[0]


def test_without_the_option_a_fixed_batch_member_is_refused_naming_it(root):
    from fusion.build import build_bundle

    with pytest.raises(MemberError, match=r"member 'old'.*batch 2, 7 failed.*fixed_batch = \"one_row\""):
        build_bundle(load_recipe(recipe(root, "refused", None, with_data=False)))
    assert not (root / "refused").exists()


def test_the_option_is_a_strict_choice_in_the_recipe_and_its_schema(root):
    with pytest.raises(ConfigError, match=r"fixed_batch.*'refuse'.*'one_row'.*got 'rows'"):
        load_recipe(recipe(root, "bad", "rows", with_data=False))
    from fusion.recipe import recipe_schema

    props = json.dumps(recipe_schema())
    assert '"one_row"' in props and '"refuse"' in props


def test_one_row_needs_a_member_that_runs_at_batch_one():
    """A member fixed at batch 2 cannot be run one row at a time: refused, saying what it got."""
    model = member(3, fixed=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(MemberError, match=r"member 'two'.*fixed_batch = \"one_row\" expected .*batch 1.*got"):
        prepare_members([OnnxMember("two", model, fixed_batch="one_row")], [TensorSpec("x", "float32", ("batch", F))])


def test_one_row_builds_without_data_and_the_fused_graph_equals_the_members(root):
    from fusion.build import build_bundle

    build_bundle(load_recipe(recipe(root, "nodata", "one_row", with_data=False)))
    b = read_bundle(root / "nodata")
    assert b.manifest.members["old"].fixed_batch == "one_row" and b.manifest.members["new"].fixed_batch == ""
    assert b.manifest.variants["ensemble"].parity["max_abs_diff"] <= ATOL
    X = data(5, 9)[0]
    for rows in (1, 2, 9):
        np.testing.assert_allclose(fused(root / "nodata", X[:rows]), reference(root, X[:rows]), atol=ATOL)


def test_the_option_counts_in_the_bundle_version_only_when_set(root):
    raw = json.loads((root / "nodata" / "manifest.json").read_text())
    assert raw["members"]["new"]["fixed_batch"] == ""
    same = json.loads(json.dumps(raw))
    del same["members"]["new"]["fixed_batch"]  # a manifest written before the field existed
    assert manifest_version(same) == raw["bundle_version"]
    other = json.loads(json.dumps(raw))
    other["members"]["old"]["fixed_batch"] = "refuse"
    assert manifest_version(other) != raw["bundle_version"]


@pytest.mark.server
def test_one_row_with_data_serves_fused_and_members_mode_equal_to_the_members(root):
    from fusion.build import build_bundle
    from tests.server import Server

    build_bundle(load_recipe(recipe(root, "withdata", "one_row", with_data=True)))
    m = read_bundle(root / "withdata").manifest
    assert m.members["old"].fixed_batch == "one_row" and 0.0 < m.members["old"].metrics["test_accuracy"] <= 1.0
    X = data(7, 5)[0]
    want = reference(root, X)
    with Server(root / "withdata", env={"FUSION_BATCH_MAX_ROWS": "0"}) as srv:
        for variant in ("ensemble", "members"):
            r = httpx.post(srv.url + "/predict", json={"inputs": X.tolist(), "variant": variant})
            assert r.status_code == 200, r.text[:400]
            np.testing.assert_allclose(np.asarray(r.json()["probabilities"]), want, atol=ATOL)
        r = httpx.post(srv.url + "/predict", json={"inputs": X.tolist(), "variant": "old"})  # the member alone, row by row
        assert r.status_code == 200, r.text[:400]
        np.testing.assert_allclose(np.asarray(r.json()["probabilities"]), alone(root / "fixed.onnx", X, True), atol=ATOL)


def test_a_one_row_members_rows_share_one_run_deadline():
    """FUSION_RUN_TIMEOUT_S bounds a call, not each of its rows: a one_row member whose rows each stay within
    the limit but together run past it is stopped (DeadlineError), as the same work in one run would be.
    A stand-in session sleeps 0.08 s per row; 12 rows against a 0.2 s limit (slower machines only stop it sooner)."""
    import time

    from service.errors import DeadlineError
    from service.runtime import Model, RunDeadline

    class Slow:
        calls = 0

        def run(self, outputs, feeds, options=None):
            Slow.calls += 1
            time.sleep(0.08)
            return [np.zeros((len(feeds["x"]), C), np.float32)]

    model = Model(name="fixed", session=Slow(), input_name="x", device="cpu", deadline=RunDeadline(0.2), one_row=True)
    assert model.run(np.zeros((1, F), np.float32)).shape == (1, C)
    with pytest.raises(DeadlineError, match=r"'fixed' ran past 0.2 s"):
        model.run(np.zeros((12, F), np.float32))
    assert Slow.calls < 1 + 12  # stopped before its last rows
