"""The bundle contract: manifest round-trip, digests, refusals (tampering, traversal, bad manifests),
atomic writes, and `fusion build` / recipes through the CLI."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fusion.bundle import MANIFEST, BundleWriter, Manifest, read_bundle
from fusion.errors import ConfigError, IntegrityError, ManifestError

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- manifest

def test_manifest_round_trip(tiny_bundle):
    text = (tiny_bundle / MANIFEST).read_text()
    m = read_bundle(tiny_bundle).manifest
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert json.loads(m.to_json()) == json.loads(text)  # file -> object -> JSON is lossless
    assert Manifest.from_dict(m.to_dict()) == m


def test_manifest_records_input_spec_classes_and_scaling(tiny_bundle, digits):
    m = read_bundle(tiny_bundle).manifest
    assert m.input.shape == (-1, 64) and m.input.dtype == "float32" and m.input.n_features == 64
    assert m.input.scaling == digits.scaling.to_dict()
    assert m.classes == tuple(range(10)) and m.task == "classification"
    assert m.variants["ensemble"].kind == "ensemble"
    assert m.variants["ensemble"].combiner == {"name": "soft_vote", "weights": None}
    assert all(e.kind == "member" for e in m.members.values())


def test_every_file_digest_is_in_the_manifest(tiny_bundle):
    m = read_bundle(tiny_bundle).manifest
    listed = {e.file: e.sha256 for e in m.entries().values()}
    if m.comparison:  # the comparison report's files (md/json/png) carry their digests too
        listed |= m.comparison.get("artifacts", {})
    on_disk = tree_digests(tiny_bundle)
    on_disk.pop(MANIFEST)
    assert on_disk == listed  # every file listed, every listed file present, digests equal hashlib's
    assert {f for f in on_disk if f.endswith(".onnx")} == {e.file for e in m.entries().values()}


def test_bundle_version_is_a_content_address(bundle_copy, tiny_bundle):
    v = read_bundle(tiny_bundle).manifest.bundle_version
    assert len(v) == 12 and int(v, 16) >= 0
    # same content -> same version; a different digest -> a different version
    edit_manifest(bundle_copy, lambda d: d["members"]["mlp_0"].update(sha256="0" * 64))
    from fusion.bundle import bundle_version

    changed = Manifest.from_dict(json.loads((bundle_copy / MANIFEST).read_text()))
    assert bundle_version(read_bundle(tiny_bundle).manifest) == v
    assert bundle_version(changed) != v
    # what the bundle answers depends on more than the files: the class labels are covered too
    relabelled = replace(read_bundle(tiny_bundle).manifest, classes=tuple(reversed(read_bundle(tiny_bundle).manifest.classes)))
    assert bundle_version(relabelled) != v
    # the build-time latency report is not part of the content
    assert bundle_version(replace(read_bundle(tiny_bundle).manifest, comparison={"rows": []})) == v


# ---------------------------------------------------------------- refusals

def test_tampered_file_is_refused_naming_file_and_both_digests(bundle_copy):
    target = bundle_copy / "members" / "mlp_1.onnx"
    listed = sha256(target)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        read_bundle(bundle_copy)
    msg = str(info.value)
    assert "members/mlp_1.onnx" in msg and listed in msg and sha256(target) in msg
    assert isinstance(info.value, OSError)


def test_file_swapped_after_reading_is_refused_before_parsing(bundle_copy):
    b = read_bundle(bundle_copy)
    (bundle_copy / "ensemble.onnx").write_bytes((bundle_copy / "members" / "mlp_0.onnx").read_bytes())
    with pytest.raises(IntegrityError, match="ensemble.onnx"):
        b.read_verified("ensemble")
    assert b.read_verified("mlp_0") == (bundle_copy / "members" / "mlp_0.onnx").read_bytes()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_paths_leaving_the_bundle_are_refused(bundle_copy, tmp_path, kind):
    # the outside file is byte-identical to the member, so only the path check can refuse it
    member = bundle_copy / "members" / "mlp_0.onnx"
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(member, outside)
    if kind == "dotdot":
        edit_manifest(bundle_copy, lambda d: d["members"]["mlp_0"].update(file="../outside.onnx"))
    elif kind == "absolute":
        edit_manifest(bundle_copy, lambda d: d["members"]["mlp_0"].update(file=str(outside)))
    else:
        member.unlink()
        member.symlink_to(outside)
    with pytest.raises(ManifestError) as info:
        read_bundle(bundle_copy)
    assert "outside" in str(info.value) or "leaves" in str(info.value)


def test_symlink_inside_the_bundle_is_allowed(bundle_copy):
    member = bundle_copy / "members" / "mlp_0.onnx"
    real = bundle_copy / "members" / "mlp_0.real.onnx"
    member.rename(real)
    member.symlink_to(real.name)
    assert read_bundle(bundle_copy).manifest.members["mlp_0"].file == "members/mlp_0.onnx"


def test_missing_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_bundle(tmp_path)
    with pytest.raises(ManifestError):
        read_bundle(tmp_path / "does-not-exist")


def test_listed_file_missing_is_a_manifest_error(bundle_copy):
    (bundle_copy / "members" / "cnn_0.onnx").unlink()
    with pytest.raises(ManifestError, match="members/cnn_0.onnx"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_bad_schema_version_is_a_manifest_error(bundle_copy, version):
    edit_manifest(bundle_copy, lambda d: d.update(schema_version=version))
    with pytest.raises(ManifestError, match=r"expected manifest schema_version 1; got"):
        read_bundle(bundle_copy)


def test_missing_schema_version_is_a_manifest_error(bundle_copy):
    edit_manifest(bundle_copy, lambda d: d.pop("schema_version"))
    with pytest.raises(ManifestError, match="got None"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("text", [
    "{not json", "[]", '"a string"', "null", '{"schema_version": 1}',
    '{"schema_version": 1, "input": []}',
])
def test_malformed_manifest_is_a_manifest_error(bundle_copy, text):
    (bundle_copy / MANIFEST).write_text(text)
    with pytest.raises(ManifestError):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("edit", [
    lambda d: d["members"]["mlp_0"].update(surprise=1),   # unknown entry key
    lambda d: d.update(variants=[]),                        # wrong container type
    lambda d: d["input"].pop("shape"),                      # missing key
])
def test_malformed_manifest_fields_are_manifest_errors(bundle_copy, edit):
    edit_manifest(bundle_copy, edit)
    with pytest.raises(ManifestError, match="malformed manifest"):
        read_bundle(bundle_copy)


# ---------------------------------------------------------------- atomic writes

def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_failure_inside_writer_leaves_old_bundle_and_no_stage(bundle_copy):
    before = tree_digests(bundle_copy)
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(bundle_copy) as w:
            (w.stage / "ensemble.onnx").write_bytes(b"half a model")
            assert w.stage.is_dir()
            raise RuntimeError("boom")
    assert tree_digests(bundle_copy) == before
    assert leftovers(bundle_copy.parent, bundle_copy.name) == []
    read_bundle(bundle_copy)


def test_failure_during_commit_leaves_old_bundle_and_no_stage(bundle_copy):
    before = tree_digests(bundle_copy)
    manifest = read_bundle(bundle_copy).manifest
    with pytest.raises(OSError):
        with BundleWriter(bundle_copy) as w:
            (w.stage / "ensemble.onnx").write_bytes(b"only one of the listed files")
            w.commit(manifest)  # the member files are missing from the stage
    assert tree_digests(bundle_copy) == before
    assert leftovers(bundle_copy.parent, bundle_copy.name) == []


def test_failure_on_a_fresh_path_leaves_nothing(tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with BundleWriter(out):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_commit_replaces_the_bundle_in_one_step(bundle_copy, tiny_bundle):
    manifest = read_bundle(tiny_bundle).manifest
    (bundle_copy / "stale.txt").write_text("from the old bundle")
    with BundleWriter(bundle_copy) as w:
        shutil.copytree(tiny_bundle, w.stage, dirs_exist_ok=True)
        (w.stage / MANIFEST).unlink()
        written = w.commit(manifest)
    assert not (bundle_copy / "stale.txt").exists()
    assert leftovers(bundle_copy.parent, bundle_copy.name) == []
    assert read_bundle(bundle_copy).manifest == written
    assert written.bundle_version == manifest.bundle_version  # same files -> same content address


# ---------------------------------------------------------------- CLI and recipe

FAST_RECIPE = "[distill]\nenabled = false\n\n[build]\ncompare = false\n"  # CLI builds: just the ensemble + members


@pytest.fixture(scope="module")
def fast_recipe(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("recipe") / "fast.toml"
    path.write_text(FAST_RECIPE)
    return str(path)


def member_probabilities(bundle: Path, X: np.ndarray) -> tuple[list[str], np.ndarray]:
    m = json.loads((bundle / MANIFEST).read_text())
    names = m["variants"]["ensemble"]["members"]
    P = np.stack([
        ort.InferenceSession(str(bundle / m["members"][n]["file"]), providers=["CPUExecutionProvider"])
        .run(None, {"input": X})[0] for n in names
    ])
    return names, P


def run_graph(path: Path, X: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]


def test_cli_build_writes_the_chosen_combiner(tiny_zoo, fast_recipe, tmp_path, capsys, digits):
    from fusion.cli import main

    out = tmp_path / "hv"
    rc = main(["build", "--recipe", fast_recipe, "--zoo", str(tiny_zoo), "--combiner", "hard_vote", "--weights", "1,2,1,1", "--out", str(out)])
    assert rc == 0
    assert "written to" in capsys.readouterr().out
    m = read_bundle(out).manifest
    assert m.variants["ensemble"].combiner == {"name": "hard_vote", "weights": [1.0, 2.0, 1.0, 1.0]}
    # and the graph really is that weighted hard vote of the member graphs (numpy reference)
    X = digits.X_test
    names, P = member_probabilities(out, X)
    w = np.array([1.0, 2.0, 1.0, 1.0])
    votes = np.stack([np.bincount(P[:, n].argmax(-1), weights=w, minlength=10) for n in range(len(X))])
    np.testing.assert_allclose(run_graph(out / "ensemble.onnx", X), votes / w.sum(), atol=1e-6)


def test_cli_build_stacking_records_how_it_was_fitted(tiny_zoo, fast_recipe, tmp_path):
    from fusion.cli import main

    out = tmp_path / "st"
    assert main(["build", "--recipe", fast_recipe, "--zoo", str(tiny_zoo), "--combiner", "stacking", "--out", str(out)]) == 0
    combiner = read_bundle(out).manifest.variants["ensemble"].combiner
    assert combiner["name"] == "stacking" and combiner["fit_on"] == "validation"


def test_recipe_file_sets_the_combiner_and_flags_override_it(tiny_zoo, tmp_path):
    from fusion.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[zoo]\ndir = "{tiny_zoo}"\n\n[ensemble]\ncombiner = "geometric_mean"\nweights = [1, 1, 2, 2]\n\n'
        f'[build]\nout = "{tmp_path / "from_recipe"}"\ncompare = false\n\n[distill]\nenabled = false\n'
    )
    assert main(["build", "--recipe", str(recipe)]) == 0
    got = read_bundle(tmp_path / "from_recipe").manifest.variants["ensemble"].combiner
    assert got == {"name": "geometric_mean", "weights": [1.0, 1.0, 2.0, 2.0]}
    assert main(["build", "--recipe", str(recipe), "--combiner", "logit_mean", "--out", str(tmp_path / "o")]) == 0
    assert read_bundle(tmp_path / "o").manifest.variants["ensemble"].combiner["name"] == "logit_mean"


@pytest.mark.parametrize("weights, needle", [
    ("1,2", "expected 4 weights, one per member in this order: cnn_0, mlp_0, mlp_1, mlp_2; got 2"),
    ("1,-1,1,1", "non-negative"),
    ("0,0,0,0", "at least one positive"),
    ("1,nan,1,1", "finite"),
])
def test_cli_bad_weights_exit_2_with_one_line(tiny_zoo, fast_recipe, tmp_path, capsys, weights, needle):
    from fusion.cli import main

    out = tmp_path / "never"
    rc = main(["build", "--recipe", fast_recipe, "--zoo", str(tiny_zoo), "--combiner", "soft_vote", f"--weights={weights}", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("fusion build: error: ") and needle in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_non_numeric_weights_exit_2(tiny_zoo, tmp_path, capsys):
    from fusion.cli import main

    with pytest.raises(SystemExit) as info:
        main(["build", "--zoo", str(tiny_zoo), "--weights", "1,x,1,1", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "expected comma-separated numbers" in capsys.readouterr().err


def test_cli_subprocess_bad_weights(tiny_zoo, tmp_path):
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "fusion.cli", "build", "--zoo", str(tiny_zoo), "--combiner", "hard_vote",
         "--weights", "1,1,1", "--out", str(tmp_path / "b")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fusion build: error: expected 4 weights, one per member in this order: cnn_0, mlp_0, mlp_1, mlp_2; got 3 "
        "(1, 1, 1); or name them, e.g. cnn_0=2 (the others weigh 1)"]
    assert not (tmp_path / "b").exists()


def test_cli_unknown_combiner_exit_2(tiny_zoo, fast_recipe, tmp_path, capsys):
    from fusion.cli import main

    assert main(["build", "--recipe", fast_recipe, "--zoo", str(tiny_zoo), "--combiner", "vote", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown combiner 'vote'" in err and "soft_vote" in err


def test_cli_regression_combiner_on_classification_data_exit_2(tiny_zoo, fast_recipe, tmp_path, capsys):
    from fusion.cli import main

    assert main(["build", "--recipe", fast_recipe, "--zoo", str(tiny_zoo), "--combiner", "median", "--out", str(tmp_path / "b")]) == 2
    assert "regression" in capsys.readouterr().err


@pytest.mark.parametrize("toml, needle", [
    ('[ensemble]\ncombiner = "soft_vote"\nweigths = [1, 2]\n', "unknown keys in [ensemble]: ['weigths']"),
    ('[ensembel]\ncombiner = "soft_vote"\n', "unknown sections ['ensembel']"),
    ('[ensemble]\nweights = 3\n', "expected a list"),
    ('[build]\nout = 3\n', "expected a string"),
    ('[ensemble\n', "not valid TOML"),
])
def test_recipe_errors_are_config_errors(tmp_path, toml, needle):
    from fusion.recipe import load_recipe

    path = tmp_path / "recipe.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert needle in str(info.value)


def test_recipe_unknown_key_through_the_cli_exit_2(tmp_path, capsys):
    from fusion.cli import main

    path = tmp_path / "recipe.toml"
    path.write_text('[zoo]\ndirectory = "x"\n')
    assert main(["build", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown keys in [zoo]: ['directory']" in err


def test_missing_recipe_file_is_a_config_error(tmp_path):
    from fusion.recipe import load_recipe

    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "nope.toml")


def test_fields_added_for_byo_bundles_leave_older_bundle_versions_unchanged(tiny_bundle):
    """A manifest written before `inputs`/`files`/`input_map`/`output`/`output_name` existed hashes to the
    same bundle_version as the same manifest with those fields empty; set, they change it."""
    from fusion.bundle import TensorSpec, manifest_version

    manifest = read_bundle(tiny_bundle).manifest
    data = manifest.to_dict()
    assert not data["inputs"] and data["files"] == {}
    old = {k: v for k, v in data.items() if k not in ("inputs", "files")}
    old["members"] = {n: {k: v for k, v in e.items() if k not in ("input_map", "output", "output_name")}
                      for n, e in data["members"].items()}
    assert manifest_version(old) == manifest_version(data) == manifest.bundle_version
    with_inputs = replace(manifest, inputs=(TensorSpec("x", "float32", ("batch", 64)),))
    assert manifest_version(with_inputs.to_dict()) != manifest.bundle_version
    member = next(iter(manifest.members))
    relabelled = replace(manifest, members={**manifest.members,
                                            member: replace(manifest.members[member], output="logits")})
    assert manifest_version(relabelled.to_dict()) != manifest.bundle_version
    assert Manifest.from_dict(json.loads(with_inputs.to_json())).inputs == with_inputs.inputs
