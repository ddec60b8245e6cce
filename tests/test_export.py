"""ONNX export: the bundle's graphs run in onnxruntime agree with torch; the parity gate refuses disagreement."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fusion.ensemble import make_combiner
from fusion.errors import ExportError
from fusion.export import FusedEnsemble, Probabilities, export_onnx
from fusion.zoo import load_zoo

ATOL = 1e-5


@pytest.fixture(scope="module")
def manifest(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def torch_models(tiny_zoo, manifest) -> dict[str, nn.Module]:
    """Reference torch modules rebuilt from the zoo: every member (probabilities) and the fused ensemble."""
    zoo = {spec.name: model for model, spec in load_zoo(tiny_zoo)}
    ens = manifest["variants"]["ensemble"]
    members = [zoo[n] for n in ens["members"]]
    combiner = make_combiner(ens["combiner"]["name"], len(members), ens["combiner"]["weights"])
    models = {"ensemble": FusedEnsemble(members, combiner).eval()}
    models.update({n: Probabilities(zoo[n]).eval() for n in manifest["members"]})
    return models


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def entries(manifest: dict) -> dict[str, dict]:
    """Every ONNX file of the bundle (ensemble, members and whatever other variants it holds)."""
    return {**manifest["variants"], **manifest["members"]}


def fused_and_members(manifest: dict) -> dict[str, dict]:
    """The graphs this issue's exporter writes: the fused ensemble and each member."""
    return {"ensemble": manifest["variants"]["ensemble"], **manifest["members"]}


def test_bundle_holds_the_ensemble_and_every_member(manifest, tiny_zoo):
    assert set(manifest["members"]) == {p.stem for p in tiny_zoo.glob("*.safetensors")}
    assert manifest["variants"]["ensemble"]["members"] == sorted(manifest["members"])


@pytest.mark.parametrize("batch", [1, 64])
def test_onnx_parity_with_torch(tiny_bundle, manifest, torch_models, digits, batch):
    X = digits.X_test  # raw pixels 0..16: scaling happens inside every graph
    for name, entry in fused_and_members(manifest).items():
        sess = session(tiny_bundle / entry["file"])
        got = np.concatenate([
            sess.run(None, {manifest["input"]["name"]: X[i:i + batch]})[0] for i in range(0, len(X), batch)
        ])
        with torch.no_grad():
            expected = torch_models[name](torch.from_numpy(X)).numpy()
        assert got.shape == (len(X), len(manifest["classes"])), name
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=name)
        np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1), err_msg=name)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5, err_msg=name)


def test_ensemble_is_the_soft_vote_of_the_member_graphs(tiny_bundle, manifest, digits):
    # independent of torch: the fused graph equals numpy's mean over the member graphs' probabilities
    X = digits.X_test
    members = manifest["variants"]["ensemble"]["members"]
    P = np.stack([session(tiny_bundle / manifest["members"][n]["file"]).run(None, {"input": X})[0] for n in members])
    fused = session(tiny_bundle / "ensemble.onnx").run(None, {"input": X})[0]
    np.testing.assert_allclose(fused, P.mean(0), atol=ATOL)
    assert (fused.argmax(-1) == digits.y_test).mean() >= 0.8


def test_onnx_checker_and_dynamic_batch_axis(tiny_bundle, manifest, digits):
    for name, entry in entries(manifest).items():
        model = onnx.load(str(tiny_bundle / entry["file"]))
        onnx.checker.check_model(model, full_check=True)
        (inp,), (out,) = model.graph.input, model.graph.output
        assert inp.name == manifest["input"]["name"] and out.name == manifest["output_name"]
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        in_dims, out_dims = inp.type.tensor_type.shape.dim, out.type.tensor_type.shape.dim
        assert in_dims[0].dim_param and not in_dims[0].HasField("dim_value"), name  # symbolic batch
        assert out_dims[0].dim_param, name
        assert in_dims[1].dim_value == 64
        sess = session(tiny_bundle / entry["file"])
        for b in (1, 3, 64, 200):
            assert sess.run(None, {"input": digits.X_test[:b]})[0].shape == (b, 10)


def test_manifest_records_the_gate_report(manifest, digits):
    for name, entry in fused_and_members(manifest).items():
        parity = entry["parity"]
        assert parity["rows"] == len(digits.X_test)
        assert parity["max_abs_diff"] <= parity["atol"] == ATOL
        assert parity["argmax_agreement"] == 1.0


# ---------------------------------------------------------------- the gate itself

class DataBranch(nn.Module):
    """A Python `if` on the data: tracing freezes the branch taken on the export rows.

    Rows whose pixel total exceeds `threshold` get the flipped class order in torch; the exported
    graph always gives the branch the trace took, so onnxruntime disagrees with torch.
    """

    def __init__(self, inner: nn.Module, threshold: float):
        super().__init__()
        self.inner, self.threshold = inner, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.inner(x), -1)
        if float(x.sum()) > self.threshold:
            return p.flip(-1)
        return p


@pytest.fixture(scope="module")
def one_member(tiny_zoo) -> nn.Module:
    return load_zoo(tiny_zoo)[0][0]


def test_gate_refuses_a_data_dependent_branch_and_writes_nothing(one_member, digits, tmp_path):
    X = digits.X_test[:100]
    model = DataBranch(one_member, threshold=float(X[:2].sum()) + 1.0)  # the export batch is X[:2]
    path = tmp_path / "out" / "branchy.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(model, path, X)
    msg = str(info.value)
    assert "branchy.onnx" in msg and "disagrees" in msg and "max |Δ|" in msg
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temp file left behind


def test_gate_refuses_any_difference_when_tolerance_is_negative(one_member, digits, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"allowed -1"):
        export_onnx(Probabilities(one_member), path, digits.X_test[:64], atol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_gate_refuses_an_unexportable_model(digits, tmp_path):
    class Unexportable(nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x[:, :4].reshape(-1, 2, 2))[0].real  # no ONNX op for eig

    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="bad.onnx"):
        export_onnx(Unexportable(), path, digits.X_test[:8])
    assert list(tmp_path.iterdir()) == []


def test_gate_passes_and_writes_a_good_model(one_member, digits, tmp_path):
    path = tmp_path / "good.onnx"
    report = export_onnx(Probabilities(one_member), path, digits.X_test, batch_sizes=(1, 64))
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["good.onnx"]
    assert report.rows == len(digits.X_test) and report.batch_sizes == (1, 64)
    assert 0 <= report.max_abs_diff <= ATOL and report.argmax_agreement == 1.0
    # the report is honest: recompute the worst difference ourselves
    with torch.no_grad():
        expected = Probabilities(one_member)(torch.from_numpy(digits.X_test)).numpy()
    got = session(path).run(None, {"input": digits.X_test})[0]
    assert np.abs(got - expected).max() <= report.max_abs_diff + 1e-9
