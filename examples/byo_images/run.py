"""Bring your own models, images: timm and torchvision members trained offline, fused, distilled, served.

    .venv/bin/python examples/byo_images/run.py            # a few minutes on 2 CPU cores
    .venv/bin/python examples/byo_images/run.py --quick    # fewer rows and epochs (the test runs this)
    .venv/bin/python examples/byo_images/run.py --int8     # also the static int8 variants (issue 18)

1. writes scikit-learn's digits upscaled to RGB as `work/data.npz`: `pixels` (N, 3, 32, 32), the 8x8 grey
   images scaled to 0..255, resized bilinearly to 32x32, rounded to integers (so a PNG holds them exactly) and
   replicated to 3 channels; plus `y`;
2. trains the recipe's three members from random init in torch on the train split (the split `fusion build`
   makes), on pixels normalised exactly as the recipe's `[[inputs]] image` table says, `(x * scale - mean) /
   std`, and saves their weights as safetensors: timm `resnet10t`, torchvision `resnet18`, timm `test_resnet`;
3. `fusion build` with `recipe.toml`: each member exported alone with the normalisation in front of its graph,
   scored in onnxruntime, weights chosen from data (`weights = "auto"`), the composed graph gated, a student
   (`[distill] source = "timm:test_resnet"`) taught by the composed graph in onnxruntime, the comparison;
4. serves the bundle as `make serve` does (`python -m service.serve service.app:FusionService`), posts a
   held-out digit as a PNG file (raw `image/png` body) to `/predict` and checks the answer against
   `ensemble.onnx` run in onnxruntime on the same pixels;
5. prints each member's, the ensemble's and the student's test accuracy, what `auto` chose, the build time and
   the /predict answer for the PNG with its true label.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_WORK = "examples/byo_images/work"  # the recipe's paths, relative to the repository root
SIZE = 32

sys.path.insert(0, str(ROOT))

from examples.serving import served  # noqa: E402  (after ROOT is on the path)


def write_data(work: Path, rows: int | None) -> Path:
    """digits as (N, 3, 32, 32) float32 RGB pixels with integer values 0..255, plus y (the first `rows` rows)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X, y = bunch.images[:rows], bunch.target[:rows]  # (N, 8, 8), values 0..16
    grey = torch.from_numpy(X * (255.0 / 16.0)).float()[:, None]  # (N, 1, 8, 8), 0..255
    up = F.interpolate(grey, size=(SIZE, SIZE), mode="bilinear", align_corners=False).round().clamp(0, 255)
    pixels = up.expand(-1, 3, -1, -1).contiguous().numpy().astype(np.float32)  # grey replicated to R, G, B
    path = work / "data.npz"
    np.savez(path, pixels=pixels, y=y.astype(np.int64))
    return path


def train_members(recipe, data, epochs: int, threads: int) -> dict[str, dict]:
    """Each member from random init, trained on the train split's normalised pixels, saved as safetensors."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from fusion.imagenorm import normalize_pixels
    from fusion.sources import resolve

    torch.set_num_threads(threads)
    spec = recipe.inputs[0].to_tensor_spec()
    X = torch.from_numpy(normalize_pixels(data.X_train["pixels"], spec))  # the recipe's own normalisation
    y = torch.from_numpy(data.y_train)
    out = {}
    for i, m in enumerate(recipe.members):
        torch.manual_seed(i)
        model = resolve(m.source, dict(m.args)).train()  # random init (timm pretrained=False, torchvision weights=None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        steps = epochs * ((len(X) + 63) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps)
        gen = torch.Generator().manual_seed(i)
        t = time.perf_counter()
        for _ in range(epochs):
            for idx in torch.randperm(len(X), generator=gen).split(64):
                xb = X[idx]
                dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))  # a small shift: the background is uniform
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        Path(m.weights).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, m.weights)
        out[m.name] = {"parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t}
        print(f"member {m.name}: {m.source}, {out[m.name]['parameters']:,} parameters, {epochs} epochs in "
              f"{out[m.name]['seconds']:.1f} s", flush=True)
    return out


def load(recipe_path: Path, work: str, quick: bool, int8: bool = False):
    from dataclasses import replace

    from fusion.recipe import parse_recipe

    text = recipe_path.read_text().replace(DEFAULT_WORK, work)
    recipe = parse_recipe(tomllib.loads(text))
    if int8:  # what `[build] quantize = "static"` in recipe.toml does
        recipe = replace(recipe, build=replace(recipe.build, quantize="static"))
    if quick:
        recipe = replace(recipe, distill=replace(recipe.distill, epochs=2, patience=0),
                         build=replace(recipe.build, compare_rounds=3))
    return recipe








def post_png(bundle: Path, pixels, work: Path) -> tuple[Path, dict, float]:
    """One held-out digit written as a PNG and posted as a raw image/png body; (file, answer, max |Δ| between the
    served probabilities and ensemble.onnx in onnxruntime on the same pixels)."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    png = work / "digit.png"
    Image.fromarray(pixels.transpose(1, 2, 0).astype(np.uint8), "RGB").save(png, format="PNG")
    sess = ort.InferenceSession(str(bundle / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"pixels": pixels[None].astype(np.float32)})[0]
    with served(bundle, work / "serve.log") as url:
        req = urllib.request.Request(url + "/predict", data=png.read_bytes(), headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
    diff = float(np.abs(np.asarray(answer["probabilities"], np.float64) - want).max())
    if diff > 1e-5:
        raise SystemExit(f"the served answer for {png} differs from ensemble.onnx in onnxruntime by {diff:.3g}; expected <= 1e-5")
    return png, answer, diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="bring your own models, images: timm and torchvision members on digits")
    ap.add_argument("--quick", action="store_true", help="600 rows, 2 epochs per member and for the student (~1-2 min)")
    ap.add_argument("--work", default=DEFAULT_WORK, help="where the data, members and bundle go")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training (default 2)")
    ap.add_argument("--no-serve", action="store_true", help="build only")
    ap.add_argument("--int8", action="store_true", help="also static int8 variants ([build] quantize = \"static\"), kept "
                    "within [build] quantize_max_loss_pp validation accuracy points")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = load(HERE / "recipe.toml", str(work), args.quick, args.int8)
    times = {}
    t0 = time.perf_counter()

    def lap(what: str) -> None:
        times[what] = time.perf_counter() - t0 - sum(times.values())

    from fusion.data import load_named

    data_path = write_data(work, 600 if args.quick else None)
    data = load_named(data_path, recipe.inputs)
    lap("data")
    trained = train_members(recipe, data, epochs=2 if args.quick else 3, threads=args.threads)
    lap("members trained")

    from fusion.build import build_bundle
    from fusion.bundle import read_bundle

    build_bundle(recipe)
    lap("fusion build")
    bundle = Path(recipe.build.out)
    m = read_bundle(bundle).manifest
    row = 0
    label = m.classes[int(data.y_test[row])] if m.classes else str(data.y_test[row])
    served = None if args.no_serve else post_png(bundle, data.X_test["pixels"][row], work)
    lap("served")

    sel, comb = m.ensemble_selection, m.variants["ensemble"].combiner
    print(f"\nbring your own models, images: {len(m.members)} members over 'pixels' (3x32x32 RGB, 0..255), digits "
          f"upscaled; {len(data.y_train)} train / {len(data.y_val)} validation / {len(data.y_test)} test rows")
    for name, e in m.members.items():
        src = next(s.source for s in recipe.members if s.name == name)
        print(f"  member {name:10s} test accuracy {e.metrics['test_accuracy']:.4f}  ({src}, "
              f"{trained[name]['parameters']:,} parameters, trained {trained[name]['seconds']:.0f} s)")
    for name in ("ensemble", "distilled"):
        if name in m.variants:
            print(f"  {name:17s} test accuracy {m.variants[name].metrics['test_accuracy']:.4f}")
    weights = comb.get("weights")
    print(f"  weights 'auto' chose: {sel['chosen']} ({comb['name']}; weights "
          f"{[round(w / sum(weights), 3) for w in weights] if weights else 'equal'}"
          f"{'; output temperature %.3f' % comb['temperature'] if comb.get('temperature') else ''}); "
          f"gate: best member {sel['gate'].get('best_member')}")
    for name in ("ensemble", "distilled"):  # --int8: kept or dropped by the accuracy gate
        check = (m.variants[name].method or {}).get("int8") if name in m.variants else None
        if check:
            kept = f"{name}_int8" in m.variants
            print(f"  {name + '_int8':17s} " + (f"test accuracy {m.variants[name + '_int8'].metrics['test_accuracy']:.4f}  "
                  if kept else "dropped  ") + f"({check['mode']} int8, {check['calibration'] or 'no calibration'}; accuracy "
                  f"loss vs {name}: validation {check['val_accuracy_loss_pp']:+.2f} pp, test "
                  f"{check['test_accuracy_loss_pp']:+.2f} pp; allowed {check['max_loss_pp']:.2f} pp)")
    d = m.variants.get("distilled")
    if d:
        print(f"  distilled student ({d.arch['arch']}, {d.n_parameters:,} parameters) taught by the composed graph in "
              f"onnxruntime: agreement with the teacher on validation {d.method['val_agreement']:.4f}")
    print(f"  fusion build: {times['fusion build']:.0f} s")
    if served:
        png, answer, diff = served
        top = max(range(len(answer["probabilities"][0])), key=lambda k: answer["probabilities"][0][k])
        print(f"  POST /predict {png.name} (Content-Type: image/png, a held-out '{label}') -> predictions "
              f"{answer['predictions']}, p = {answer['probabilities'][0][top]:.3f}; max |Δ| vs ensemble.onnx "
              f"{diff:.1e}")
    print(f"  bundle: {bundle}; " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
