"""examples/recipe.toml, the recipe the README points at: complete (every field of fusion/recipe.py's
dataclasses, each commented), true (every value is the default) and buildable (`fusion build --recipe`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

from tests.conftest import TINY_DISTILL

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "recipe.toml"


def test_example_recipe_has_every_field():
    from fusion.recipe import ARRAYS, SECTIONS

    data = tomllib.loads(EXAMPLE.read_text())
    expected = {name: [f.name for f in fields(cls)] for name, cls in SECTIONS.items() if name not in ARRAYS}
    assert sorted(data) == sorted(expected)
    for section, keys in expected.items():
        assert set(data[section]) == set(keys), (
            f"[{section}]: expected every field {keys}; missing {sorted(set(keys) - set(data[section]))}")


def commented_arrays() -> str:
    """The example's commented-out [[members]] / [[inputs]] block, uncommented."""
    text = EXAMPLE.read_text()
    block = text[text.index("# [[members]]"):]
    return "\n".join(line[2:] if line.startswith("# ") else "" for line in block.splitlines()) + "\n"


def test_example_recipe_documents_every_member_and_input_field():
    """The arrays of tables have no default entry, so the example shows one of each, commented out: every
    field of fusion/recipe.py's MemberSection / InputSection, and the block is a valid recipe."""
    from fusion.recipe import ARRAYS, SECTIONS, parse_recipe

    block = tomllib.loads(commented_arrays())
    assert sorted(block) == sorted(ARRAYS)
    for name in ARRAYS:
        keys = [f.name for f in fields(SECTIONS[name])]
        assert len(block[name]) == 1 and set(block[name][0]) == set(keys), (name, keys, block[name])
    recipe = parse_recipe(block)
    assert recipe.members[0].source == "timm:resnet10t" and recipe.inputs[0].kind == "image"
    assert recipe.data.source == ""  # [[inputs]] and no [data]: no data set


def test_example_recipe_comments_every_key():
    for line in EXAMPLE.read_text().splitlines():
        if re.match(r"\w+ = ", line):
            assert "#" in line, f"expected a comment saying what this key does: {line}"


def test_example_recipe_values_are_the_defaults():
    from fusion.recipe import Recipe, load_recipe

    assert load_recipe(EXAMPLE) == Recipe()


def tiny_copy(text: str, values: dict[str, dict[str, object]]) -> str:
    """The example with some `key = value` lines of some sections replaced (TOML literals via JSON)."""
    lines, section = text.splitlines(), None
    done = set()
    for i, line in enumerate(lines):
        if m := re.match(r"\[(\w+)\]", line):
            section = m.group(1)
        elif (m := re.match(r"(\w+) = ", line)) and m.group(1) in values.get(section, {}):
            lines[i] = f"{m.group(1)} = {json.dumps(values[section][m.group(1)])}"
            done.add((section, m.group(1)))
    assert done == {(s, k) for s, kv in values.items() for k in kv}
    return "\n".join(lines) + "\n"


def test_fusion_build_from_the_example_recipe(tiny_zoo, tiny_recipe, tiny_bundle, tmp_path):
    """`fusion build --recipe` on the example (pointed at the tiny zoo, with the tiny student) in its own
    process writes the same bundle version as the session's tiny bundle, built in this process from the
    dataclass defaults with the same overrides: the example is the defaults, and the build is reproducible
    on one machine."""
    out = tmp_path / "bundle"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tiny_copy(EXAMPLE.read_text(), {
        "zoo": {"dir": str(tiny_zoo)},
        "ensemble": {"weights": tiny_recipe.ensemble.weights},  # the tiny bundle's equal weights (conftest)
        "distill": {"hidden": list(TINY_DISTILL["hidden"]), "epochs": TINY_DISTILL["epochs"]},
        "build": {"out": str(out), "compare_rounds": tiny_recipe.build.compare_rounds},
    }))
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "-m", "fusion.cli", "build", "--recipe", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads((out / "manifest.json").read_text())
    reference = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(built["variants"]) == set(reference["variants"]) >= {"ensemble", "merged", "distilled"}
    assert built["bundle_version"] == reference["bundle_version"]
    assert f"bundle {built['bundle_version']} written to {out}" in proc.stdout
    # the output went to a pipe: no progress bars, one line per stage
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr[:2000]
    stages = [line for line in proc.stderr.splitlines() if line.startswith("build: ")]
    assert [re.sub(r" in \d+\.\d s$", "", line) for line in stages] == [
        "build: ensemble of 4 members (soft_vote) combined", "build: ensemble exported (one ONNX graph, parity-checked)",
        "build: 4 members exported", "build: merged variant (linear) exported", "build: distilled variant exported",
        "build: comparison report written"], proc.stderr
    assert len(proc.stderr.splitlines()) <= 2 * len(stages), proc.stderr
