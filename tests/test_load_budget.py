"""The bundle check's time budget (service/preflight.py): 20 s + 60 s per GB of the bundle's files by default,
the whole budget when FUSION_LOAD_TIMEOUT_S is set; the refusal says how the budget was reached."""

from __future__ import annotations

import os

import pytest

from fusion.errors import BundleError
from service import config, preflight
from service.preflight import LoadLimits, bundle_bytes


def _sparse(path, size: int) -> None:
    """A file of `size` bytes that takes no disk (truncate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def test_bundle_bytes_counts_regular_files_below_the_directory_not_links(tmp_path):
    _sparse(tmp_path / "b" / "manifest.json", 1_000)
    _sparse(tmp_path / "b" / "members" / "m.onnx", 300_000_000)
    _sparse(tmp_path / "outside.bin", 5_000_000_000)
    os.symlink(tmp_path / "outside.bin", tmp_path / "b" / "members" / "link.onnx")  # not followed, not counted
    os.symlink(tmp_path, tmp_path / "b" / "loop")  # a directory link: not walked
    assert bundle_bytes(tmp_path / "b") == 300_001_000
    assert bundle_bytes(tmp_path / "missing") == 0


def test_default_budget_grows_with_the_bundle_and_a_setting_is_the_whole_budget(tmp_path):
    _sparse(tmp_path / "b" / "members" / "m.onnx", 450_000_000)
    default = config.load({}).load_limits
    assert (default.timeout_s, default.s_per_gb) == (20.0, 60.0)
    assert default.budget_s(tmp_path / "b") == pytest.approx(20.0 + 60.0 * 0.45)
    assert default.budget_s(tmp_path / "missing") == 20.0
    _sparse(tmp_path / "huge" / "m.onnx", 50_000_000_000)  # 50 GB: capped at ten minutes
    assert default.budget_s(tmp_path / "huge") == preflight.MAX_AUTO_BUDGET_S == 600.0
    fixed = config.load({"FUSION_LOAD_TIMEOUT_S": "11"}).load_limits
    assert (fixed.timeout_s, fixed.s_per_gb) == (11.0, 0.0)
    assert fixed.budget_s(tmp_path / "huge") == fixed.budget_s(tmp_path / "b") == 11.0
    above = config.load({"FUSION_LOAD_TIMEOUT_S": "3600"}).load_limits  # a setting may exceed the automatic cap
    assert above.budget_s(tmp_path / "huge") == 3600.0


def test_refusal_names_the_budget_and_how_it_was_reached(tiny_bundle):
    """A budget far too short for any check (python alone takes longer to start) on a real bundle: the
    refusal gives the seconds, the base, the per-GB rate and the bundle's size; a fixed one names the setting."""
    size_gb = bundle_bytes(tiny_bundle) / 1e9
    auto = LoadLimits(timeout_s=0.001, s_per_gb=0.01 / max(size_gb, 1e-9))  # ~0.011 s in all
    with pytest.raises(BundleError) as err:
        preflight.check(tiny_bundle, auto)
    text = str(err.value)
    assert "did not load, warm up and pass its probe within" in text
    assert f"0.001 s + {auto.s_per_gb:g} s per GB of its {size_gb:.2f} GB" in text and "FUSION_LOAD_TIMEOUT_S" in text
    with pytest.raises(BundleError, match=r"within 0\.01 s \(FUSION_LOAD_TIMEOUT_S\)"):
        preflight.check(tiny_bundle, LoadLimits(timeout_s=0.01, s_per_gb=0.0))
