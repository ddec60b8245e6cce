"""Ensemble weights by member name (`--weights mlp_0=2,cnn_0=3`, `[ensemble] weights = {mlp_0 = 2}`), and the
positional form's member order named wherever a user meets it (the error, `--help`, the manifest)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fusion.errors import ConfigError

FAST_RECIPE = "[distill]\nenabled = false\n\n[merge]\nmethod = \"\"\n\n[build]\ncompare = false\n"


def zoo_names(zoo) -> list[str]:
    """The member order of a zoo directory, independently of the code under test: checkpoint names, sorted."""
    return sorted(p.stem for p in zoo.glob("*.safetensors"))


def fused_and_members(tiny_zoo, digits, weights):
    from fusion.build import build_ensemble, ensure_zoo
    from fusion.recipe import Recipe, override

    recipe = override(override(Recipe(), "zoo", dir=str(tiny_zoo)), "ensemble", weights=weights)
    members = ensure_zoo(recipe, digits)
    fused = build_ensemble(recipe, members, digits)
    x = torch.from_numpy(digits.X_test)
    with torch.no_grad():
        own = {m.name: torch.softmax(m.model(x), -1).numpy() for m in members}  # each member's own probabilities
        return fused(x).numpy(), own


def test_weights_by_name_equal_positional_weights_in_member_order(tiny_zoo, digits):
    names = zoo_names(tiny_zoo)
    assert names == ["cnn_0", "mlp_0", "mlp_1", "mlp_2"]
    by_name, own = fused_and_members(tiny_zoo, digits, {"mlp_0": 2.0, "cnn_0": 3.0})
    positional, _ = fused_and_members(tiny_zoo, digits, (3.0, 2.0, 1.0, 1.0))
    np.testing.assert_array_equal(by_name, positional)
    # a naive weighted soft vote of the members' own outputs: named members as given, the rest 1
    w = {"mlp_0": 2.0, "cnn_0": 3.0, "mlp_1": 1.0, "mlp_2": 1.0}
    naive = sum(w[n] * own[n] for n in names) / sum(w.values())
    np.testing.assert_allclose(by_name, naive, atol=1e-6)
    equal, _ = fused_and_members(tiny_zoo, digits, ())
    assert not np.allclose(by_name, equal, atol=1e-4)  # the weights did something


def test_unknown_member_name_lists_the_valid_ones(tiny_zoo, digits):
    with pytest.raises(ConfigError) as info:
        fused_and_members(tiny_zoo, digits, {"mlp_9": 2.0})
    msg = str(info.value)
    assert "mlp_9" in msg and "cnn_0, mlp_0, mlp_1, mlp_2" in msg


def test_wrong_count_names_the_member_order(tiny_zoo, digits):
    with pytest.raises(ConfigError) as info:
        fused_and_members(tiny_zoo, digits, (1.0, 2.0))
    assert "expected 4 weights, one per member in this order: cnn_0, mlp_0, mlp_1, mlp_2; got 2" in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("1,1,2", [1.0, 1.0, 2.0]),
    ("mlp_0=2,cnn_1=3", {"mlp_0": 2.0, "cnn_1": 3.0}),
    (" mlp_0 = 2 , cnn_1=0.5 ", {"mlp_0": 2.0, "cnn_1": 0.5}),
])
def test_cli_weights_parse(text, expected):
    from fusion.cli import _member_weights

    assert _member_weights(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("1,mlp_0=2", "not a mix"),
    ("mlp_0=2,mlp_0=3", "mlp_0 twice"),
    ("mlp_0=x", "expected comma-separated numbers"),
    ("=2", "expected comma-separated numbers"),
])
def test_cli_weights_parse_errors(text, needle):
    import argparse

    from fusion.cli import _member_weights

    with pytest.raises(argparse.ArgumentTypeError) as info:
        _member_weights(text)
    assert needle in str(info.value) and text in str(info.value)


def test_cli_build_with_named_weights(tiny_zoo, tmp_path, capsys, digits):
    """End to end: the bundle's ensemble graph is the weighted vote, and the manifest pairs each weight with
    its member (the ensemble's `members` list is the order of `combiner.weights`)."""
    import onnxruntime as ort

    from fusion.cli import main

    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    out = tmp_path / "b"
    assert main(["build", "--recipe", str(recipe), "--zoo", str(tiny_zoo), "--weights", "mlp_2=4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weights by member: cnn_0=1, mlp_0=1, mlp_1=1, mlp_2=4" in printed
    m = json.loads((out / "manifest.json").read_text())
    ens = m["variants"]["ensemble"]
    assert ens["members"] == zoo_names(tiny_zoo) and ens["combiner"]["weights"] == [1.0, 1.0, 1.0, 4.0]
    X = digits.X_test
    run = lambda f: ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]  # noqa: E731
    naive = sum(w * run(m["members"][n]["file"]) for n, w in zip(ens["members"], [1, 1, 1, 4])) / 7
    np.testing.assert_allclose(run("ensemble.onnx"), naive, atol=1e-5)


def test_cli_wrong_count_exits_2_naming_the_order(tiny_zoo, tmp_path, capsys):
    from fusion.cli import main

    assert main(["build", "--zoo", str(tiny_zoo), "--weights", "1,1,1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "expected 4 weights, one per member in this order: cnn_0, mlp_0, mlp_1, mlp_2; got 3" in err


def test_help_names_the_member_order(capsys):
    from fusion.cli import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mlp_0=2,cnn_1=3" in text and "sorted" in text and "cnn_0, cnn_1, cnn_2, mlp_0" in text


def test_recipe_takes_weights_as_a_table(tmp_path):
    from fusion.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text("[ensemble]\nweights = { mlp_0 = 2, cnn_1 = 3.5 }\n")
    assert load_recipe(path).ensemble.weights == {"mlp_0": 2.0, "cnn_1": 3.5}
    path.write_text("[ensemble]\nweights = [1, 2]\n")
    assert load_recipe(path).ensemble.weights == (1, 2)
    for bad, needle in (('{ mlp_0 = "x" }', "expected a number for mlp_0"), ("3", "expected a list"),
                        ("{ mlp_0 = true }", "expected a number for mlp_0")):
        path.write_text(f"[ensemble]\nweights = {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_recipe(path)
        assert needle in str(info.value), str(info.value)
