"""Bring your own models, end to end: a foreign ONNX file beside two torch members, on scikit-learn's digits.

    .venv/bin/python examples/byo_onnx/run.py            # ~2-4 min on 2 CPU cores
    .venv/bin/python examples/byo_onnx/run.py --quick    # fewer epochs and latency rounds (the test runs this)

1. writes the data set as `work/digits.npz` (one array per bundle input, `pixels` (1797, 64), plus `y`);
2. trains two torch members on its train split (fusion/zoo.py's `mlp` and `cnn`) and saves them as
   safetensors (the recipe's `zoo:` sources load them);
3. runs `export_foreign.py`, a separate script that trains a CNN of its own and exports it with torch's
   legacy TorchScript exporter at opset 9, input `x`, outputs `logits` and `probs`: the foreign file;
4. `fusion build` with `recipe.toml`: the members composed into one ONNX graph, weights chosen from data
   (`weights = "auto"`), the gate against the best member, a distilled student taught by the composed graph
   in onnxruntime, the comparison report;
5. serves the bundle with `bentoml serve`, posts test rows to `/predict` (the ensemble, then
   `X-Variant: foreign` and `X-Variant: mlp`) and checks the answers against the files run in onnxruntime;
6. prints the figures (each member's, the ensemble's and the student's test accuracy, the chosen weights).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_WORK = "examples/byo_onnx/work"  # the recipe's paths, relative to the repository root

sys.path.insert(0, str(ROOT))

from examples.serving import served  # noqa: E402  (after ROOT is on the path)


def write_data(work: Path) -> Path:
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    path = work / "digits.npz"
    np.savez(path, pixels=bunch.data.astype(np.float32), y=bunch.target.astype(np.int64))
    return path


def train_torch_members(recipe, data_path: Path, epochs: int) -> None:
    """Each `zoo:` member of the recipe trained on the train split and saved to its `weights` file."""
    from safetensors.torch import save_file

    from fusion.data import Scaling, load_named
    from fusion.zoo import TrainConfig, build_model, init_scaler, train

    data = load_named(data_path, recipe.inputs)
    flat = data.__class__(**{**data.__dict__, "X_train": data.X_train["pixels"], "X_val": data.X_val["pixels"],
                             "X_test": data.X_test["pixels"]})
    for i, m in enumerate(x for x in recipe.members if x.source.startswith("zoo:")):
        model = build_model(m.source.partition(":")[2], **m.args)
        with __import__("torch").no_grad():
            init_scaler(model, Scaling.fit(flat.X_train))
        train(model, flat, TrainConfig(epochs=epochs), seed=i, desc=m.name)
        Path(m.weights).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, m.weights)


def load(recipe_path: Path, work: str, quick: bool):
    from dataclasses import replace

    from fusion.recipe import parse_recipe

    text = recipe_path.read_text().replace(DEFAULT_WORK, work)
    recipe = parse_recipe(tomllib.loads(text))
    if quick:
        recipe = replace(recipe, distill=replace(recipe.distill, epochs=8, patience=0),
                         build=replace(recipe.build, compare_rounds=3))
    return recipe








def check_served(bundle: Path, data) -> dict:
    """Post 32 test rows; the answers must equal the bundle's files run in onnxruntime (1e-5)."""
    import httpx
    import numpy as np
    import onnxruntime as ort

    rows = data.X_test["pixels"][:32]

    def run(file: str, feeds: dict, output: str | None = None) -> np.ndarray:
        sess = ort.InferenceSession(str(bundle / file), providers=["CPUExecutionProvider"])
        return sess.run([output] if output else None, feeds)[0]

    logits = run("members/mlp.onnx", {"pixels": rows}).astype(np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    want = {"ensemble": run("ensemble.onnx", {"pixels": rows}), "foreign": run("members/foreign.onnx", {"x": rows}, "probs"),
            "mlp": e / e.sum(-1, keepdims=True)}  # a logits member answers probabilities when served alone
    with served(bundle, bundle.parent / "serve.log") as url:
        out = {}
        for variant, expected in want.items():
            headers = {} if variant == "ensemble" else {"X-Variant": variant}
            r = httpx.post(url + "/predict", json={"inputs": rows.tolist()}, headers=headers, timeout=30)
            r.raise_for_status()
            got = np.asarray(r.json()["probabilities"], np.float64)
            out[variant] = {"max_abs_diff": float(np.abs(got - expected).max()),
                            "accuracy": float((got.argmax(-1) == data.y_test[:32]).mean())}
            if out[variant]["max_abs_diff"] > 1e-5:
                raise SystemExit(f"served {variant} differs from its file in onnxruntime by {out[variant]['max_abs_diff']:.3g}")
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="bring your own models: a foreign ONNX file beside torch members")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and latency rounds (~1 min)")
    ap.add_argument("--work", default=DEFAULT_WORK, help="where the data, members and bundle go")
    ap.add_argument("--no-serve", action="store_true", help="build only")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = load(HERE / "recipe.toml", str(work), args.quick)
    t0 = time.perf_counter()
    times = {}

    def lap(what: str) -> None:
        times[what] = time.perf_counter() - t0 - sum(times.values())

    data_path = write_data(work)
    train_torch_members(recipe, data_path, epochs=5 if args.quick else 40)
    foreign = next(m for m in recipe.members if m.source.startswith("onnx:")).source.partition(":")[2]
    subprocess.run([sys.executable, str(HERE / "export_foreign.py"), "--data", str(data_path), "--out", foreign,
                    "--epochs", "5" if args.quick else "30"], check=True, cwd=ROOT)
    lap("members trained")

    from fusion.build import build_bundle
    from fusion.bundle import read_bundle
    from fusion.data import load_named

    build_bundle(recipe)
    lap("fusion build")
    bundle = Path(recipe.build.out)
    m = read_bundle(bundle).manifest
    data = load_named(data_path, m.inputs)
    served = None if args.no_serve else check_served(bundle, data)
    lap("served and checked")

    sel, comb = m.ensemble_selection, m.variants["ensemble"].combiner
    print(f"\nbring your own models: {len(m.members)} members over input 'pixels', digits test split ({len(data.y_test)} rows)")
    for name, e in m.members.items():
        origin = e.arch.get("producer") or e.arch.get("arch")
        print(f"  member {name:9s} test accuracy {e.metrics['test_accuracy']:.4f}  ({origin}, IR {e.arch.get('ir_version')}, "
              f"opsets {e.arch.get('opsets')}, output {e.output})")
    for name in ("ensemble", "distilled"):
        if name in m.variants:
            print(f"  {name:16s} test accuracy {m.variants[name].metrics['test_accuracy']:.4f}")
    weights = comb.get("weights")
    print(f"  weights 'auto' chose: {sel['chosen']} ({comb['name']}; weights "
          f"{[round(w, 3) for w in weights] if weights else 'equal'}"
          f"{'; output temperature %.3f' % comb['temperature'] if comb.get('temperature') else ''}); "
          f"gate: best member {sel['gate'].get('best_member')}")
    d = m.variants.get("distilled")
    if d:
        print(f"  distilled student ({d.arch['arch']}, {d.n_parameters} parameters) taught by the composed graph in "
              f"onnxruntime: agreement with the teacher on validation {d.method['val_agreement']:.4f}")
    if served:
        print("  served (/predict, 32 test rows): " + ", ".join(
            f"{v} max |Δ| vs onnxruntime {s['max_abs_diff']:.1e}" for v, s in served.items()))
    print(f"  bundle: {bundle}; " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
