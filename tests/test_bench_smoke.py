"""bench/bench_fused.py in --smoke mode: it runs, and what it times is right (the loop over member
sessions + numpy combine computes the fused graph's probabilities). Speed is not asserted here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import bench_fused
from fusion.bundle import read_bundle

FAST_RECIPE = "[distill]\nenabled = false\n\n[build]\ncompare = false\n"


def test_smoke_run_reports_matching_outputs(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_fused.main(["--bundle", str(tiny_bundle), "--smoke", "--json", str(out), "--threads", "1", "--batches", "1,32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fused/loop" in printed and "goal fused ÷ loop" in printed
    report = json.loads(out.read_text())
    assert report["correctness"]["max_abs_diff"] <= 1e-5
    assert report["correctness"]["argmax_agreement"] == 1.0
    assert [(r["threads"], r["batch"]) for r in report["rows"]] == [(1, 1), (1, 32)]
    for r in report["rows"]:
        assert set(r["latency"]) == {"fused", "loop", *[f"member:{n}" for n in report["single_members"]]}


def test_missing_bundle_tells_the_user_what_to_run(tmp_path, capsys):
    assert bench_fused.main(["--bundle", str(tmp_path / "none"), "--smoke"]) == 2
    assert "make bundle" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bundles(tiny_bundle, tiny_zoo, tmp_path_factory):
    """The tiny bundle (soft_vote) plus the same zoo built with other combiners through the CLI."""
    from fusion.cli import main

    root = tmp_path_factory.mktemp("bench-bundles")
    recipe = root / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    out = {"soft_vote": tiny_bundle}
    for name, weights in (("hard_vote", "1,2,1,1"), ("geometric_mean", "1,1,2,1"), ("stacking", None)):
        args = ["build", "--recipe", str(recipe), "--zoo", str(tiny_zoo), "--combiner", name, "--out", str(root / name)]
        assert main(args + (["--weights", weights] if weights else [])) == 0
        out[name] = root / name
    return out


@pytest.mark.parametrize("combiner", ["soft_vote", "hard_vote", "geometric_mean", "stacking"])
def test_loop_combined_equals_fused(bundles, combiner, digits):
    bundle = read_bundle(bundles[combiner])
    assert bundle.manifest.variants["ensemble"].combiner["name"] == combiner
    X = np.ascontiguousarray(digits.X_test)
    fused, loop = bench_fused.outputs(bundle, X)
    np.testing.assert_allclose(loop, fused, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(loop.argmax(-1), fused.argmax(-1))
    s = bench_fused.open_sessions(bundle, 1)
    for b in (1, 64):  # the batch sizes the bench times
        for i in range(0, 4 * b, b):
            np.testing.assert_allclose(s.run_loop(X[i:i + b]), s.run_fused(X[i:i + b]), atol=1e-5, rtol=0)
    # and the soft vote really is the mean over the member graphs (numpy, no bench code)
    if combiner == "soft_vote":
        P = np.stack([s.run_member(n, X) for n in s.members])
        np.testing.assert_allclose(s.run_fused(X), P.mean(0), atol=1e-5)
