"""An `onnx:` member whose weights sit in external data beside it (torch.onnx.export's default writes FILE.onnx +
FILE.onnx.data): `fusion build` reads them in and the bundle gets one self-contained file; a location that
leaves the file's directory is refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from fusion.compose import OnnxMember
from fusion.errors import MemberError
from tests.byo_bundles import IMAGE_SHAPE, image_member


def _run(model_or_bytes, X) -> np.ndarray:
    data = model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X})[0]


def _external(tmp_path, name="m") -> tuple:
    raw = image_member(1)
    model = onnx.load_from_string(raw)
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.onnx.data", size_threshold=0)
    assert (tmp_path / f"{name}.onnx.data").stat().st_size > 0
    return raw, path


def test_external_data_is_read_in_and_the_member_is_self_contained(tmp_path):
    raw, path = _external(tmp_path)
    member = OnnxMember.load("m", path)
    assert member.path == ""  # serialised from the model, not copied: the copy would lack its data file
    assert not any(t.data_location == TensorProto.EXTERNAL for t in member.model.graph.initializer)
    X = np.random.default_rng(0).uniform(0, 255, size=(4, *IMAGE_SHAPE)).astype(np.float32)
    np.testing.assert_array_equal(_run(member.model, X), _run(raw, X))


def test_an_external_location_outside_the_directory_is_refused(tmp_path):
    _, path = _external(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    (tmp_path.parent / "outside.data").write_bytes((tmp_path / "m.onnx.data").read_bytes())
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    onnx.save_model(model, str(tmp_path / "evil.onnx"))
    with pytest.raises(MemberError, match=r"keeps tensor '.*' in external data at '../outside.data'; expected a file beside it"):
        OnnxMember.load("evil", tmp_path / "evil.onnx")
    (tmp_path / "m.onnx.data").write_bytes(b"short")  # a data file cut short: said so
    with pytest.raises(MemberError, match="its external data could not be read"):
        OnnxMember.load("m", path)


def test_torch_onnx_export_default_file_builds(tmp_path):
    """What a user gets from `torch.onnx.export(model, args, path)` with torch's defaults loads as a member."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()
    x = torch.randn(2, 1, 8, 8)
    path = tmp_path / "user.onnx"
    torch.onnx.export(net, (x,), str(path), dynamic_shapes=({0: torch.export.Dim("batch")},))
    member = OnnxMember.load("user", path)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in member.model.graph.initializer)
    X = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(_run(member.model, X), want, atol=1e-5)
