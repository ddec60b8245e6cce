"""Bring-your-own members over named inputs with a `[data]` file (issue 15): `fusion build` chooses the
weights from data, calibrates, stacks, distils with the composed graph as the teacher, scores every variant
and writes the comparison; a member declared `output = "logits"` answers probabilities when served alone.

The members are small linear classifiers written with onnx.helper (as a foreign exporter would leave them:
their own input names, old opsets, two outputs of which one is chosen), so nothing here trains a member.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fusion.bundle import read_bundle
from fusion.data import load_named, split, split_named
from fusion.errors import DataFormatError
from fusion.recipe import load_recipe
from tests.server import Server

N_FEATURES, N_CLASSES, N_ROWS = 6, 3, 360


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows around one mean per class; returns (X (N, F) float32, y (N,), means (C, F))."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.0, (N_CLASSES, N_FEATURES))
    y = np.arange(N_ROWS) % N_CLASSES
    X = (means[y] + rng.normal(0, 1.1, (N_ROWS, N_FEATURES))).astype(np.float32)
    return X, y, means


def linear_member(means: np.ndarray, noise: float, seed: int, *, input_name: str, opset: int, ir: int,
                  probabilities: bool = False) -> onnx.ModelProto:
    """x -> x @ W + b (the nearest-mean rule, W perturbed by `noise`): output 'logits'; with
    probabilities=True two outputs, 'logits' then 'probs' (Softmax)."""
    rng = np.random.default_rng(seed)
    W = (means.T + rng.normal(0, noise, means.T.shape)).astype(np.float32)
    b = (-0.5 * (means ** 2).sum(1)).astype(np.float32)
    nodes = [helper.make_node("MatMul", [input_name, "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])]
    if probabilities:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", N_CLASSES]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", N_FEATURES])],
                              outputs, [helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.ravel()),
                                        helper.make_tensor("b", TensorProto.FLOAT, b.shape, b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="handwritten")
    model.ir_version = ir
    onnx.checker.check_model(model)
    return model


def run(model_or_path, feeds: dict, output: str | None = None) -> np.ndarray:
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run([output] if output else None, feeds)[0]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byo-data")
    X, y, means = make_data()
    np.savez(root / "data.npz", feats=X, y=y)
    onnx.save(linear_member(means, 0.3, 1, input_name="x", opset=9, ir=4), root / "a.onnx")
    onnx.save(linear_member(means, 0.9, 2, input_name="features", opset=13, ir=7), root / "b.onnx")
    onnx.save(linear_member(means, 1.5, 3, input_name="x", opset=13, ir=7, probabilities=True), root / "c.onnx")
    return root


def recipe(root: Path, out: str, *, ensemble: str, distill: str = "enabled = false", compare: bool = False) -> Path:
    text = textwrap.dedent(f"""
        [data]
        source = "{root / 'data.npz'}"
        classes = ["red", "green", "blue"]

        [ensemble]
        {ensemble}

        [distill]
        {distill}

        [merge]
        method = ""

        [build]
        out = "{root / out}"
        compare = {str(compare).lower()}
        compare_rounds = 2

        [[inputs]]
        name = "feats"
        dtype = "float32"
        shape = ["batch", {N_FEATURES}]

        [[members]]
        name = "a"
        source = "onnx:{root / 'a.onnx'}"
        input_map = {{x = "feats"}}

        [[members]]
        name = "b"
        source = "onnx:{root / 'b.onnx'}"

        [[members]]
        name = "c"
        source = "onnx:{root / 'c.onnx'}"
        output = "probabilities"
        output_name = "probs"
    """)
    path = root / f"{out}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def auto_bundle(workdir) -> Path:
    from fusion.build import build_bundle

    r = load_recipe(recipe(workdir, "auto", ensemble='combiner = "soft_vote"\nweights = "auto"',
                          distill='epochs = 40\nlr = 0.01\npatience = 0\nsource = "zoo:mlp"\nargs = {in_features = 6, hidden = [16], n_outputs = 3}',
                          compare=True))
    build_bundle(r)
    return workdir / "auto"


def test_split_named_gives_the_rows_of_the_flat_split():
    X, y, _ = make_data()
    flat = split(X, y, name="flat")
    named = split_named({"feats": X, "twice": 2 * X}, y, name="named")
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(named, f"X_{s}")["feats"], getattr(flat, f"X_{s}"))
        np.testing.assert_array_equal(getattr(named, f"X_{s}")["twice"], 2 * getattr(flat, f"X_{s}"))
        np.testing.assert_array_equal(getattr(named, f"y_{s}"), getattr(flat, f"y_{s}"))
    assert named.named and not flat.named and named.classes == flat.classes


def test_load_named_refuses_arrays_that_do_not_fit_the_inputs(tmp_path):
    from fusion.bundle import TensorSpec

    X, y, _ = make_data()
    specs = [TensorSpec("feats", "float32", ("batch", N_FEATURES)), TensorSpec("ids", "int64", ("batch", "seq"))]
    ids = np.ones((N_ROWS, 4), np.int64)
    cases = [
        ({"feats": X, "y": y}, "missing ['ids']"),
        ({"feats": X[:, :5], "ids": ids, "y": y}, f"input 'feats' expected shape [{N_ROWS}, {N_FEATURES}]"),
        ({"feats": X, "ids": ids + 0.5, "y": y}, "input 'ids' expected int64 values; got float64 values that change"),
        ({"feats": X[:-1], "ids": ids, "y": y}, f"input 'feats' expected shape [{N_ROWS}, {N_FEATURES}]"),
    ]
    for i, (arrays, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.npz"
        np.savez(path, **arrays)
        with pytest.raises(DataFormatError) as info:
            load_named(path, specs)
        assert message in str(info.value), (message, str(info.value))
    np.savez(tmp_path / "good.npz", feats=X, ids=ids.astype(np.float32), y=y)  # integral floats cast losslessly
    data = load_named(tmp_path / "good.npz", specs)
    assert data.X_train["ids"].dtype == np.int64 and len(data.y_train) + len(data.y_val) + len(data.y_test) == N_ROWS


def test_build_with_named_data_chooses_weights_scores_distils_and_compares(auto_bundle, workdir):
    bundle = read_bundle(auto_bundle)
    m = bundle.manifest
    data = load_named(workdir / "data.npz", m.inputs)
    assert m.classes == ("red", "green", "blue") and m.dataset["n_test"] == len(data.y_test)
    # the weights were chosen from data: every candidate of `auto`, and the gate against the best member
    sel = m.ensemble_selection
    assert sel["weights"] == "auto" and sel["chosen"] in sel["candidates"] and "best_member" in sel["gate"]
    assert {"equal", "select", "fit"} <= set(sel["candidates"])
    # metrics: independently recomputed from the files in onnxruntime
    feeds = {"x": data.X_test["feats"]}
    member_pred = {"a": run(bundle.path / "members/a.onnx", feeds).argmax(-1),
                   "b": run(bundle.path / "members/b.onnx", {"features": data.X_test["feats"]}).argmax(-1),
                   "c": run(bundle.path / "members/c.onnx", feeds, "probs").argmax(-1)}
    for name, pred in member_pred.items():
        assert m.members[name].metrics["test_accuracy"] == pytest.approx(float((pred == data.y_test).mean()))
    ens = run(bundle.path / "ensemble.onnx", {"feats": data.X_test["feats"]})
    assert m.variants["ensemble"].metrics["test_accuracy"] == pytest.approx(float((ens.argmax(-1) == data.y_test).mean()))
    # the distilled student learnt from the composed graph in onnxruntime
    d = m.variants["distilled"]
    assert d.method["teacher_runtime"].startswith("onnxruntime") and d.arch["arch"] == "zoo:mlp"
    stud = run(bundle.path / "distilled.onnx", {"input": data.X_test["feats"]})
    assert d.metrics["test_accuracy"] == pytest.approx(float((stud.argmax(-1) == data.y_test).mean()))
    assert d.metrics["test_accuracy"] > 0.6  # well above chance (1/3): the teacher is at ~0.89
    # the comparison ran on the bundle: one row per file, accuracies as recomputed above
    rows = {r["name"]: r for r in m.comparison["rows"]}
    assert set(rows) == {"ensemble", "distilled", "a", "b", "c"}
    assert rows["a"]["accuracy"] == pytest.approx(m.members["a"].metrics["test_accuracy"])
    assert rows["ensemble"]["accuracy"] == pytest.approx(m.variants["ensemble"].metrics["test_accuracy"])
    # a logits member's comparison probabilities are probabilities (softmaxed), so its NLL is finite and small
    assert 0 < rows["a"]["nll"] < 2.0


def test_fusion_compare_cli_reads_the_named_data_file(auto_bundle, capsys):
    from fusion.cli import main

    assert main(["compare", "--bundle", str(auto_bundle), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    m = read_bundle(auto_bundle).manifest
    for name, e in {**m.variants, **m.members}.items():  # the data file was found from the manifest's dataset.source
        row = next(line for line in out.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| {100 * e.metrics['test_accuracy']:.2f} (" in row, (name, row)


@pytest.mark.parametrize("ensemble, check", [
    ('combiner = "soft_vote"\nweights = "fit"\ncalibration = "temperature"', "temperature"),
    ('combiner = "stacking"', "stacking"),
])
def test_calibration_and_stacking_on_member_scores_from_onnxruntime(workdir, ensemble, check):
    from fusion.build import build_bundle
    from fusion.ensemble import make_combiner

    name = f"bundle_{check}"
    build_bundle(load_recipe(recipe(workdir, name, ensemble=ensemble)))
    bundle = read_bundle(workdir / name)
    ens = bundle.manifest.variants["ensemble"]
    assert ens.parity["max_abs_diff"] <= 1e-5 and ens.metrics["val_accuracy"] > 1 / N_CLASSES
    if check == "temperature":
        temps = ens.method["temperatures"]
        assert set(temps) == {"a", "b", "c"} and all(t > 0 for t in temps.values())
        # independent reference: each member's scores / T, combined by the recorded combiner in torch
        import torch

        X = load_named(workdir / "data.npz", bundle.manifest.inputs).X_val["feats"]
        z = [run(workdir / "a.onnx", {"x": X}), run(workdir / "b.onnx", {"features": X}),
             np.log(np.maximum(run(workdir / "c.onnx", {"x": X}, "probs"), np.finfo(np.float32).smallest_subnormal))]
        z = np.stack([zi / temps[n] for zi, n in zip(z, "abc")]).astype(np.float32)
        cfg = ens.combiner
        comb = make_combiner(cfg["name"], 3, cfg.get("weights"), **({"temperature": cfg["temperature"]} if cfg.get("temperature") else {}))
        want = comb(torch.from_numpy(z)).numpy()
        np.testing.assert_allclose(run(bundle.path / "ensemble.onnx", {"feats": X}), want, atol=1e-5)
    else:
        assert ens.combiner["name"] == "stacking"


def test_a_logits_member_served_alone_answers_probabilities(auto_bundle, workdir):
    data = load_named(workdir / "data.npz", read_bundle(auto_bundle).manifest.inputs)
    rows = data.X_test["feats"][:5]
    logits = run(workdir / "a.onnx", {"x": rows})
    assert not np.allclose(logits.sum(-1), 1.0, atol=1e-3)  # the file itself answers logits
    with Server(auto_bundle) as srv:
        for variant, want in (("a", softmax(logits.astype(np.float64))),
                              ("c", run(workdir / "c.onnx", {"x": rows}, "probs")),
                              ("distilled", run(auto_bundle / "distilled.onnx", {"input": rows}))):
            r = httpx.post(srv.url + "/predict", json={"inputs": rows.tolist()}, headers={"X-Variant": variant})
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["probabilities"], np.float64)
            np.testing.assert_allclose(got, want, atol=1e-5)
        r = httpx.post(srv.url + "/predict", json={"inputs": rows.tolist()}, headers={"X-Variant": "members"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["probabilities"]),
                                   run(auto_bundle / "ensemble.onnx", {"feats": rows}), atol=1e-5)


def test_torch_only_members_over_a_named_input_with_data(workdir):
    """python: members (no ONNX file) take the same path: exported alone, scored in onnxruntime, and the
    served graph equals the torch modules themselves combined in torch (an independent reference)."""
    import torch

    from fusion.build import build_bundle
    from fusion.ensemble import make_combiner
    from tests.test_sources import linear_member

    text = recipe(workdir, "torch_only", ensemble='combiner = "hard_vote"').read_text()
    members = "".join(f'''
        [[members]]
        name = "lin{s}"
        source = "python:tests.test_sources:linear_member"
        args = {{in_features = {N_FEATURES}, n_classes = {N_CLASSES}, seed = {s}}}
        ''' for s in (1, 2, 3))
    text = text[:text.index("[[members]]")] + textwrap.dedent(members)
    path = workdir / "torch_only.toml"
    path.write_text(text)
    build_bundle(load_recipe(path))
    m = read_bundle(workdir / "torch_only").manifest
    assert m.ensemble_selection is None and m.variants["ensemble"].combiner["name"] == "hard_vote"
    X = load_named(workdir / "data.npz", m.inputs).X_test["feats"]
    with torch.no_grad():
        z = torch.stack([linear_member(N_FEATURES, N_CLASSES, s)(torch.from_numpy(X)) for s in (1, 2, 3)])
        want = make_combiner("hard_vote", 3)(z).numpy()
    got = run(workdir / "torch_only" / "ensemble.onnx", {"feats": X})
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert set(m.members) == {"lin1", "lin2", "lin3"} and all("test_accuracy" in e.metrics for e in m.members.values())
