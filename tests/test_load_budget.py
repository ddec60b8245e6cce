"""The bundle check's time budget (service/preflight.py): 20 s + 60 s per GB of the ONNX files the manifest lists
by default (their allocated size), at most MAX_AUTO_BUDGET_S; the whole budget when FUSION_LOAD_TIMEOUT_S is set;
the refusal says how the budget was reached."""

from __future__ import annotations

import json
import os

import pytest

from fusion.errors import BundleError
from service import config, preflight
from service.preflight import LoadLimits, model_bytes


def _bundle(root, files: dict[str, int], listed: list[str] | None = None):
    """A directory with a manifest listing `listed` (default: every file) as variant files, and `files` written
    with real bytes (their sizes)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\1" * size)
    names = list(files) if listed is None else listed
    manifest = {"variants": {f"v{i}": {"file": rel} for i, rel in enumerate(names)}, "members": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_model_bytes_counts_the_listed_regular_files_by_their_allocated_size(tmp_path):
    b = _bundle(tmp_path / "b", {"ensemble.onnx": 300_000, "members/m.onnx": 200_000, "unlisted.bin": 5_000_000},
                listed=["ensemble.onnx", "members/m.onnx", "missing.onnx", "../outside.onnx", "/etc/passwd", "link.onnx", "sparse.onnx"])
    (tmp_path / "outside.onnx").write_bytes(b"\1" * 1_000_000)
    os.symlink(tmp_path / "outside.onnx", b / "link.onnx")  # a link: not followed, not counted
    with open(b / "sparse.onnx", "wb") as f:  # 50 GB that take no disk: what is allocated counts
        f.truncate(50_000_000_000)
    got = model_bytes(b)
    assert 500_000 <= got < 500_000 + 64 * 1024, got  # the two listed files, block-rounded; nothing else
    assert model_bytes(tmp_path / "missing") == 0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("[not json")
    assert model_bytes(tmp_path / "bad") == 0


def test_default_budget_grows_with_the_models_up_to_its_cap_and_a_setting_is_the_whole_budget(tmp_path):
    b = _bundle(tmp_path / "b", {"ensemble.onnx": 2_000_000})
    default = config.load({}).load_limits
    assert (default.timeout_s, default.s_per_gb) == (20.0, 60.0)
    seconds, how = default.budget(b)
    assert seconds == pytest.approx(20.0 + 60.0 * model_bytes(b) / 1e9) and "60 s per GB of its 0.00 GB of ONNX files" in how
    assert default.budget(tmp_path / "missing")[0] == 20.0
    steep = LoadLimits(timeout_s=20.0, s_per_gb=1e9)  # any real bundle past the cap
    assert steep.budget(b) == (preflight.MAX_AUTO_BUDGET_S, f"20 s + 1e+09 s per GB of its 0.00 GB of ONNX files, at most 240 s")
    assert preflight.MAX_AUTO_BUDGET_S < 300  # below the deployment's startup probe (5 s x 60)
    fixed = config.load({"FUSION_LOAD_TIMEOUT_S": "11"}).load_limits
    assert (fixed.timeout_s, fixed.s_per_gb) == (11.0, 0.0) and fixed.budget(b) == (11.0, "FUSION_LOAD_TIMEOUT_S")
    assert config.load({"FUSION_LOAD_TIMEOUT_S": "3600"}).load_limits.budget(b)[0] == 3600.0  # a setting passes the cap


def test_refusal_names_the_budget_and_how_it_was_reached(tiny_bundle):
    """A budget far too short for any check (python alone takes longer to start) on a real bundle: the
    refusal gives the seconds, the base, the per-GB rate and the models' size; a fixed one names the setting."""
    gb = model_bytes(tiny_bundle) / 1e9
    assert gb > 0
    auto = LoadLimits(timeout_s=0.001, s_per_gb=0.01 / gb)  # ~0.011 s in all
    with pytest.raises(BundleError) as err:
        preflight.check(tiny_bundle, auto)
    assert f"did not load, warm up and pass its probe within {preflight._seconds(auto.budget(tiny_bundle)[0])} s (" in str(err.value)
    assert f"0.001 s + {auto.s_per_gb:g} s per GB of its {gb:.2f} GB of ONNX files" in str(err.value)
    with pytest.raises(BundleError, match=r"within 0.01 s \(FUSION_LOAD_TIMEOUT_S\)"):
        preflight.check(tiny_bundle, LoadLimits(timeout_s=0.01, s_per_gb=0.0))
    assert [preflight._seconds(s) for s in (3600.0, 47.1558, 20.0, 0.0113)] == ["3600", "47.2", "20", "0.0113"]
