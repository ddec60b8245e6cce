"""Regenerates the merge table in the README: every merge method on the default zoos (test split).

    .venv/bin/python docs/merge_report.py   # needs `fusion zoo` and `fusion zoo --scenario shared_base` first

It writes the measured rows to docs/merge_table.json and rewrites the README's table between the
`<!-- merge-table -->` markers from them with `markdown_table`, the one renderer: tests/test_readme.py
checks that the README's table is `markdown_table(docs/merge_table.json)`, so the two cannot drift.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE_JSON = ROOT / "docs" / "merge_table.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- merge-table: docs/merge_report.py writes this table -->", "<!-- /merge-table -->"
HEADER = "| zoo | method | merged accuracy % | soft-vote ensemble % | best member % |\n|---|---|--:|--:|--:|\n"


def markdown_table(rows: list[dict]) -> str:
    """The README's merge table (header row included) from docs/merge_table.json's rows."""
    return HEADER + "".join(
        f"| {r['zoo']} | `{r['method']}` | {100 * r['accuracy']:.2f} | {100 * r['soft_vote']:.2f} | "
        f"{100 * r['best_member']:.2f} |\n" for r in rows)


def readme_block(text: str) -> str:
    """What the README holds between the markers (its merge table)."""
    m = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, flags=re.S)
    if m is None:
        raise ValueError(f"expected the README's merge table between '{BEGIN}' and '{END}'; found no such markers")
    return m.group(1)


def update_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text()
    old = readme_block(text)
    readme.write_text(text.replace(f"{BEGIN}\n{old}{END}", f"{BEGIN}\n{table}{END}", 1))


def measure() -> list[dict]:
    """Every method on the shared-base and independent zoos, and on the independent MLPs after weight matching."""
    import torch
    from safetensors.torch import load_file

    from fusion.align import align_to_reference, spec_for
    from fusion.data import load_digits
    from fusion.ensemble import make_combiner
    from fusion.fuse import data_inputs, finish_state, module_for, read_spec
    from fusion.merge import merge

    torch.set_grad_enabled(False)
    data = load_digits()
    X = torch.from_numpy(data.X_test)

    def acc(model) -> float:
        return float((model(X).argmax(-1).numpy() == data.y_test).mean())

    rows = []
    for scenario, glob, base_name in (("shared_base", "ft_*.safetensors", "base"), ("independent", "mlp_*.safetensors", None)):
        zoo = ROOT / "artifacts/zoo" / scenario
        paths = sorted(zoo.glob(glob))
        spec = read_spec(paths[0])
        states = [load_file(str(p)) for p in paths]
        base = load_file(str(zoo / f"{base_name}.safetensors")) if base_name else None
        soft = make_combiner("soft_vote", len(states))(torch.stack([module_for(spec, s)(X) for s in states]))
        ens = float((soft.argmax(-1).numpy() == data.y_test).mean())
        best_member = max(acc(module_for(spec, s)) for s in states)
        methods = [("linear", {}), ("greedy_soup", {}), ("model_stock", {"base": True}), ("task_arithmetic", {"base": True, "scaling": 0.3}),
                   ("ties", {"base": True, "density": 0.2, "scaling": 1.0}), ("dare_ties", {"base": True, "density": 0.5, "seed": 0}),
                   ("dare_linear", {"base": True, "density": 0.5, "seed": 0}), ("breadcrumbs", {"base": True}),
                   ("fisher", {}), ("regmean", {})]
        for name, kw in methods:
            kw = dict(kw)
            if kw.pop("base", False):
                if base is None:
                    continue
                kw["base"] = base
            kw |= data_inputs(name, states, spec, data)
            model = finish_state(module_for(spec, merge(name, states, **kw)), data)
            rows.append({"zoo": scenario, "method": name, "accuracy": acc(model), "soft_vote": ens, "best_member": best_member})
    # independent members after Git Re-Basin weight matching to the first one
    zoo = ROOT / "artifacts/zoo/independent"
    paths = sorted(zoo.glob("mlp_*.safetensors"))
    spec = read_spec(paths[0])
    states = [load_file(str(p)) for p in paths]
    aligned = [states[0], *align_to_reference(states[0], states[1:], spec_for(spec.arch, spec.args)).state_dicts]
    ref = next(r for r in rows if r["zoo"] == "independent")
    for name in ("linear", "regmean"):
        kw = data_inputs(name, aligned, spec, data)
        model = finish_state(module_for(spec, merge(name, aligned, **kw)), data)
        rows.append({"zoo": "independent, weight-matched", "method": name, "accuracy": acc(model),
                     "soft_vote": ref["soft_vote"], "best_member": ref["best_member"]})
    return rows


def main() -> None:
    rows = measure()
    TABLE_JSON.write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    update_readme(table)
    print(table, end="")


if __name__ == "__main__":
    main()
