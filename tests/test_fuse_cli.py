"""`fusion merge`, `fusion align`, `fusion barrier` and the bundle's `merged` variant, end to end on the
tiny digits zoo, checked against the library's in-memory results and naive formulas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from fusion.cli import main


def mlps(zoo: Path) -> list[Path]:
    return sorted(zoo.glob("mlp_*.safetensors"))


def test_merge_cli_streams_and_equals_in_memory_merge(tiny_zoo, tmp_path):
    from fusion.merge import merge

    out = tmp_path / "avg.safetensors"
    assert main(["merge", "--method", "linear", "--models", *map(str, mlps(tiny_zoo)), "--weights", "1,2,1", "--out", str(out)]) == 0
    got = load_file(str(out))
    expected = merge("linear", [load_file(str(p)) for p in mlps(tiny_zoo)], weights=[1, 2, 1])
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    # the naive formula, independently: Σ w θ / Σ w
    states = [load_file(str(p)) for p in mlps(tiny_zoo)]
    naive = (states[0]["layers.0.weight"] + 2 * states[1]["layers.0.weight"] + states[2]["layers.0.weight"]) / 4
    torch.testing.assert_close(got["layers.0.weight"], naive, rtol=1e-6, atol=1e-7)
    spec = json.loads(out.with_suffix(".json").read_text())
    assert spec["arch"] == "mlp" and 0 <= spec["metrics"]["test_accuracy"] <= 1


def test_merge_cli_errors_are_one_line(tiny_zoo, tmp_path, capsys):
    code = main(["merge", "--method", "ties", "--models", *map(str, mlps(tiny_zoo)), "--out", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "base" in err
    code = main(["merge", "--method", "nope", "--models", str(mlps(tiny_zoo)[0]), "--out", str(tmp_path / "n.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "linear" in err and "ties" in err  # lists the valid names


def test_align_cli_preserves_function_and_rescues_the_average(tiny_zoo, tmp_path, digits):
    from fusion.fuse import module_for, read_spec

    ref, *others = mlps(tiny_zoo)
    out_dir = tmp_path / "aligned"
    assert main(["align", "--method", "weight_matching", "--reference", str(ref), "--models", *map(str, others), "--out-dir", str(out_dir)]) == 0
    X = torch.from_numpy(digits.X_test)
    for p in others:
        spec = read_spec(p)
        before = module_for(spec, load_file(str(p)))(X)
        after = module_for(spec, load_file(str(out_dir / p.name)))(X)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # a permutation changes nothing
    naive, aligned = tmp_path / "naive.safetensors", tmp_path / "aligned.safetensors"
    main(["merge", "--method", "linear", "--models", *map(str, mlps(tiny_zoo)), "--out", str(naive)])
    main(["merge", "--method", "linear", "--models", str(ref), *[str(out_dir / p.name) for p in others], "--out", str(aligned)])
    acc = {p: json.loads(p.with_suffix(".json").read_text())["metrics"]["test_accuracy"] for p in (naive, aligned)}
    assert acc[aligned] > acc[naive]


def test_barrier_cli_json_and_plot(tiny_zoo, tmp_path):
    a, b = mlps(tiny_zoo)[:2]
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["barrier", str(a), str(b), "--align", "--points", "5", "--json", str(js), "--plot", str(png)]) == 0
    rep = json.loads(js.read_text())
    assert rep["barrier_convention"] == "max_minus_mean_endpoints"
    naive, matched = rep["paths"]["naive"], rep["paths"]["weight_matching"]
    for p in (naive, matched):
        # barrier = max over λ of L(λ) − ½(L_A + L_B), recomputed from the reported losses
        assert p["barrier"] == pytest.approx(max(p["loss"]) - 0.5 * (p["loss"][0] + p["loss"][-1]), abs=1e-9)
    assert matched["loss"][0] == pytest.approx(naive["loss"][0], abs=1e-6)  # same endpoint A
    assert matched["barrier"] <= naive["barrier"] + 1e-6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bundle_merged_variant_is_the_aligned_average(tiny_bundle, tiny_zoo, digits):
    """merged.onnx equals the plain average of the MLPs after weight matching to the first one."""
    from fusion.align import apply_permutation, spec_for, weight_matching
    from fusion.bundle import read_bundle
    from fusion.fuse import module_for, read_spec

    b = read_bundle(tiny_bundle)
    entry = b.manifest.variants["merged"]
    assert entry.kind == "merged" and entry.method["name"] == "linear"
    assert entry.method["alignment"]["method"] == "weight_matching"
    paths = [tiny_zoo / f"{n}.safetensors" for n in entry.method["members"]]
    assert [p.stem for p in paths] == [p.stem for p in mlps(tiny_zoo)]
    spec = read_spec(paths[0])
    perm_spec = spec_for(spec.arch, spec.args)
    ref = load_file(str(paths[0]))
    states = [ref] + [apply_permutation(perm_spec, weight_matching(perm_spec, ref, load_file(str(p))), load_file(str(p))) for p in paths[1:]]
    avg = {k: sum(s[k] for s in states) / len(states) for k in ref}
    with torch.no_grad():
        expected = torch.softmax(module_for(spec, avg)(torch.from_numpy(digits.X_test)), -1).numpy()
    sess = ort.InferenceSession(b.read_verified("merged"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": digits.X_test})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert entry.metrics["test_accuracy"] == pytest.approx(float((got.argmax(-1) == digits.y_test).mean()))


def test_bundle_probe_reproduces_in_onnxruntime(tiny_bundle):
    from fusion.bundle import read_bundle

    b = read_bundle(tiny_bundle)
    probe = b.manifest.probe
    X = np.asarray(probe["inputs"], dtype=np.float32)
    assert set(probe["outputs"]) == set(b.manifest.entries())
    for name, expected in probe["outputs"].items():
        sess = ort.InferenceSession(b.read_verified(name), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"input": X})[0], np.asarray(expected), atol=1e-6)


@pytest.mark.slow
@torch.no_grad()  # zoo training enables grad for itself
def test_shared_base_merge_lands_near_the_ensemble(tmp_path, digits):
    """Members fine-tuned from one base average well (task vectors exist); independent ones collapse."""
    from fusion.ensemble import make_combiner
    from fusion.fuse import module_for, read_spec
    from fusion.merge import merge
    from fusion.zoo import TrainConfig, ZooConfig, train_shared_base_zoo

    zoo = tmp_path / "shared"
    train_shared_base_zoo(digits, zoo, ZooConfig(n_mlp=3, mlp_hidden=(64,), train=TrainConfig(epochs=12)))
    paths = sorted(zoo.glob("ft_*.safetensors"))
    spec = read_spec(paths[0])
    states = [load_file(str(p)) for p in paths]
    base = load_file(str(zoo / "base.safetensors"))
    X = torch.from_numpy(digits.X_test)
    logits = torch.stack([module_for(spec, s)(X) for s in states])
    soft = make_combiner("soft_vote", len(states))(logits).argmax(-1).numpy()
    ens_acc = float((soft == digits.y_test).mean())
    for method, kw in (("linear", {}), ("task_arithmetic", {"base": base, "scaling": 1.0 / len(states)})):
        merged = merge(method, states, **kw)
        acc = float((module_for(spec, merged)(X).argmax(-1).numpy() == digits.y_test).mean())
        assert acc >= ens_acc - 0.02, (method, acc, ens_acc)
