"""The `fusion` CLI and `fusion.fuse` read method names and data needs from the registries (issue 14):
a method registered in one place appears everywhere, and no hand-written list can drift from it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.cli import main
from fusion.ensemble import COMBINERS
from fusion.errors import ConfigError
from fusion.fuse import merge_checkpoints
from fusion.merge import MERGE_METHODS, data_methods, make_method, names

ROOT = Path(__file__).resolve().parents[1]


def _help_names(argv: list[str], option: str, capsys) -> list[str]:
    """The names the help of `option` lists (`a | b | c`, however argparse wraps it)."""
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    found = re.search(re.escape(option) + r" [A-Z_]+ ((?:[a-z_0-9]+ \| )+[a-z_0-9]+)", text)
    assert found, f"expected '{option} NAME a | b | …' in the help; got {text!r}"
    return found.group(1).split(" | ")


def test_merge_cli_offers_exactly_the_registry_names(capsys):
    assert _help_names(["merge"], "--method", capsys) == names() == list(MERGE_METHODS)


def test_build_cli_offers_exactly_the_registered_combiners(capsys):
    assert _help_names(["build"], "--combiner", capsys) == list(COMBINERS)


def test_unknown_merge_method_is_one_line_listing_the_registry(tmp_path, capsys):
    code = main(["merge", "--method", "nope", "--models", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert all(n in err for n in MERGE_METHODS), err


def test_building_the_parser_imports_no_torch():
    """The registries import torch; the CLI reads them only when help is printed or a command runs."""
    code = "import sys, fusion.cli; fusion.cli.parser(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"expected no torch module imported by parser(); got {out.strip()}"


def test_data_methods_are_the_ones_that_cannot_run_on_weights_alone():
    """`needs_data` is declared by each method; check it against what construction demands."""
    assert data_methods(), "expected at least one data-aware method"
    for name in MERGE_METHODS:
        if name in data_methods():
            with pytest.raises(ConfigError):
                make_method(name)  # its data input (scorer, Fishers, Grams) is required
        else:
            make_method(name)  # defaults suffice


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_fuse_asks_for_data_exactly_for_the_registry_data_methods(method, tmp_path):
    ckpt = tmp_path / "m.safetensors"  # never read: the data check comes first
    if method in data_methods():
        with pytest.raises(ConfigError, match="needs data"):
            merge_checkpoints(method, [ckpt], tmp_path / "o.safetensors", arch="mlp", data=None)
    else:  # passes the data check and fails later (no base, no checkpoint) for another reason
        with pytest.raises(ConfigError) as err:
            merge_checkpoints(method, [ckpt], tmp_path / "o.safetensors", arch="mlp", data=None)
        assert "needs data" not in str(err.value)
