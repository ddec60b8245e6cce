"""Regenerates the merge table in the README: every merge method on the default zoos (test split).

    .venv/bin/python docs/merge_report.py   # needs `fusion zoo` and `fusion zoo --scenario shared_base` first
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

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
    zoo = Path("artifacts/zoo") / scenario
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
from fusion.align import align_to_reference, spec_for  # noqa: E402

zoo = Path("artifacts/zoo/independent")
paths = sorted(zoo.glob("mlp_*.safetensors"))
spec = read_spec(paths[0])
states = [load_file(str(p)) for p in paths]
aligned = [states[0], *align_to_reference(states[0], states[1:], spec_for(spec.arch, spec.args)).state_dicts]
for name in ("linear", "regmean"):
    kw = data_inputs(name, aligned, spec, data)
    model = finish_state(module_for(spec, merge(name, aligned, **kw)), data)
    ref = next(r for r in rows if r["zoo"] == "independent")
    rows.append({"zoo": "independent, weight-matched", "method": name, "accuracy": acc(model),
                 "soft_vote": ref["soft_vote"], "best_member": ref["best_member"]})
print("| zoo | method | merged accuracy % | soft-vote ensemble % | best member % |")
print("|---|---|--:|--:|--:|")
for r in rows:
    print(f"| {r['zoo']} | `{r['method']}` | {100 * r['accuracy']:.2f} | {100 * r['soft_vote']:.2f} | {100 * r['best_member']:.2f} |")
Path("docs/merge_table.json").write_text(json.dumps(rows, indent=2))
