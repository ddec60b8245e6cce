"""The recipe switch for the split layout (issue 19): `[serve] split = true` makes `fusion build --recipe` write
the front and one bundle per member, as `fusion build --split` does, in `[serve] split_dir` (empty: OUT-split)
with the members at `[serve] url_template`. Oracle: `fusion split` (fusion.split.split_bundle) of the same
bundle, whose bundles are content-addressed, so equal content means equal versions."""

from __future__ import annotations

import json
from pathlib import Path

from fusion.bundle import read_bundle
from fusion.recipe import Recipe
from fusion.split import DEFAULT_URL_TEMPLATE, member_host, split_bundle

NAMES = ["mlp_0", "mlp_1", "mlp_2"]
TEMPLATE = "http://{host}.members.example:3000/v2/models/{name}"


def test_recipe_switch_writes_the_split_layout(tiny_zoo, tmp_path, capsys):
    from fusion.cli import main

    out = tmp_path / "bundle"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[zoo]
dir = {json.dumps(str(tiny_zoo))}
members = {json.dumps(NAMES)}

[ensemble]
weights = "equal"

[merge]
method = ""

[distill]
enabled = false

[build]
out = {json.dumps(str(out))}
compare = false

[serve]
split = true
url_template = "{TEMPLATE}"
""")
    assert main(["build", "--recipe", str(recipe)]) == 0
    printed = capsys.readouterr().out
    split = Path(f"{out}-split")  # split_dir = "": next to the bundle
    assert f"split layout written to {split}" in printed, printed
    layout = json.loads((split / "split.json").read_text())
    assert sorted(layout["members"]) == NAMES
    front = read_bundle(split / "front", check_version=True).manifest
    assert front.bundle_version == layout["front_version"]
    assert {n: e.remote for n, e in front.members.items()} == {
        n: TEMPLATE.format(host=member_host(n), name=n) for n in NAMES}
    for name in NAMES:
        member = read_bundle(split / "members" / member_host(name), check_version=True).manifest
        assert list(member.members) == [name] and member.bundle_version == layout["members"][name]["bundle_version"]
    # the same layout as `fusion split` of the bundle the build wrote
    reference = split_bundle(out, tmp_path / "reference", TEMPLATE)
    assert reference == layout


def test_recipe_defaults_match_the_split_defaults():
    serve = Recipe().serve
    assert serve.split is False and serve.split_dir == "" and serve.url_template == DEFAULT_URL_TEMPLATE
