"""The two benchmark ensembles, built once as OUR bundle and described for the peers in `spec.json`.

Each ensemble is a `fusion build` recipe (no data set: equal-weight soft vote, parity-gated), so ours is
built the way a user builds it. The members' weights are written first (seeded random init, safetensors;
a Hugging Face directory for the BERTs), so that the FastAPI peer loads the very same weights into torch,
and every ONNX peer loads the bundle's `members/NAME.onnx` (the member files `fusion build` wrote: raw
pixels in for images, the normalisation inside; token ids in for text; logits out).

  image  timm resnet18 + resnet50 + vit_small_patch16_224, 3x224x224 raw RGB pixels, 10 classes
  text   three BERT-mini encoders (4 layers, hidden 256, 4 heads), sequence length 128, 10 classes, over a
         WordLevel tokenizer.json trained here (2 000 words)

`size="tiny"` (the tests): 3x32x32 images with timm test_resnet / resnet10t / test_vit, and 1-layer
hidden-32 BERTs at sequence length 16: the same code path, built in seconds.

    python -m bench.peers.ensembles --out artifacts/peers/work [--size full|tiny] [--only image|text]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
N_CLASSES = 10
SIZES = {
    "full": {"image": {"size": 224, "members": (("resnet18", "resnet18", {}), ("resnet50", "resnet50", {}),
                                                ("vit_small", "vit_small_patch16_224", {}))},
             "text": {"layers": 4, "hidden": 256, "heads": 4, "max_length": 128, "vocab": 2000}},
    "tiny": {"image": {"size": 32, "members": (("test_resnet", "test_resnet", {}), ("resnet10t", "resnet10t", {}),
                                               ("test_vit", "test_vit", {"img_size": 32}))},
             "text": {"layers": 1, "hidden": 32, "heads": 2, "max_length": 16, "vocab": 300}},
}
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "pe", "du", "zo", "fa", "gi", "ho", "bu", "xe")


def words(n: int) -> list[str]:
    """n distinct short words (2-3 syllables): the tokenizer's vocabulary, one token each."""
    out, i = [], 0
    while len(out) < n:
        k, w = i, ""
        for _ in range(2 + i % 2):
            w += SYLLABLES[k % len(SYLLABLES)]
            k //= len(SYLLABLES)
        if w not in out:
            out.append(w)
        i += 1
    return out


def sentences(vocab: list[str], n: int, length: int, seed: int) -> list[str]:
    """n strings of `length` words drawn from `vocab` (longer than max_length: every row is max_length tokens)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, length)) for _ in range(n)]


def images(n: int, size: int, seed: int) -> np.ndarray:
    """n (size, size, 3) uint8 images: smooth gradients plus noise (a PNG of realistic size, not pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = []
    for _ in range(n):
        a = rng.uniform(0, 255, (3, 3))
        base = np.stack([a[c, 0] * xx + a[c, 1] * yy + a[c, 2] * (1 - xx) * yy for c in range(3)], -1) / 1.5
        out.append(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def png_b64(img: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _toml_list(xs) -> str:
    return "[" + ", ".join(json.dumps(x) for x in xs) + "]"


def write_image(work: Path, size: str) -> dict:
    import timm
    import torch
    from safetensors.torch import save_file

    cfg = SIZES[size]["image"]
    px = cfg["size"]
    d = work / "image"
    d.mkdir(parents=True, exist_ok=True)
    members = []
    for i, (name, arch, extra) in enumerate(cfg["members"]):
        torch.manual_seed(i)
        model = timm.create_model(arch, pretrained=False, num_classes=N_CLASSES, **extra).eval()
        weights = d / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        members.append({"name": name, "source": f"timm:{arch}", "args": {"num_classes": N_CLASSES, **extra},
                        "weights": str(weights)})
    recipe = [
        "[data]", 'source = ""', f"classes = {_toml_list([f'c{i}' for i in range(N_CLASSES)])}", "",
        "[ensemble]", 'combiner = "soft_vote"', 'weights = "equal"', "",
        "[build]", f"out = {json.dumps(str(d / 'bundle'))}", "",
        "[[inputs]]", 'name = "pixels"', 'dtype = "float32"', f"shape = [\"batch\", 3, {px}, {px}]", 'kind = "image"',
        f"image = {{mode = \"RGB\", scale = {1 / 255!r}, mean = {_toml_list(MEAN)}, std = {_toml_list(STD)}}}", "",
    ]
    for m in members:
        args = ", ".join(f"{k} = {json.dumps(v)}" for k, v in m["args"].items())
        recipe += ["[[members]]", f"name = {json.dumps(m['name'])}", f"source = {json.dumps(m['source'])}",
                   f"weights = {json.dumps(m['weights'])}", f"args = {{{args}}}", ""]
    (d / "recipe.toml").write_text("\n".join(recipe))
    return {"kind": "image", "dir": str(d), "bundle": str(d / "bundle"), "input": "pixels", "px": px,
            "image": {"scale": 1 / 255, "mean": MEAN, "std": STD}, "members": members}


def write_text(work: Path, size: str) -> dict:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification

    cfg = SIZES[size]["text"]
    d = work / "text"
    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]"] + words(cfg["vocab"] - 2)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    members = []
    for i in range(3):
        torch.manual_seed(100 + i)
        bert = BertConfig(vocab_size=len(vocab), hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                          num_attention_heads=cfg["heads"], intermediate_size=4 * cfg["hidden"], num_labels=N_CLASSES,
                          max_position_embeddings=max(512, cfg["max_length"]))
        name = f"bert_{i}"
        BertForSequenceClassification(bert).eval().save_pretrained(str(d / name), safe_serialization=True)
        members.append({"name": name, "source": f"hf:{d / name}", "hf_dir": str(d / name)})
    recipe = [
        "[data]", 'source = ""', f"classes = {_toml_list([f'c{i}' for i in range(N_CLASSES)])}", "",
        "[ensemble]", 'combiner = "soft_vote"', 'weights = "equal"', "",
        "[build]", f"out = {json.dumps(str(d / 'bundle'))}", "",
        "[[inputs]]", 'name = "text"', 'kind = "text"', 'dtype = "int64"', 'shape = ["batch", "sequence"]',
        f"tokenizer = {json.dumps(str(d / 'tokenizer.json'))}", f"max_length = {cfg['max_length']}", "",
    ]
    for m in members:
        recipe += ["[[members]]", f"name = {json.dumps(m['name'])}", f"source = {json.dumps(m['source'])}", ""]
    (d / "recipe.toml").write_text("\n".join(recipe))
    return {"kind": "text", "dir": str(d), "bundle": str(d / "bundle"), "input": "text",
            "tokenizer": str(d / "tokenizer.json"), "max_length": cfg["max_length"], "vocab": vocab[2:],
            "members": members}


def build(work: Path, size: str = "full", only: str | None = None, python: str = sys.executable) -> dict:
    """Write members + recipe, run `fusion build`, and record each member's ONNX file: {kind: spec}; also
    written to WORK/KIND/spec.json. An existing spec.json of the same size is reused (delete WORK to rebuild)."""
    specs = {}
    for kind, writer in (("image", write_image), ("text", write_text)):
        if only and kind != only:
            continue
        path = work / kind / "spec.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("size") == size and (Path(old["bundle"]) / "manifest.json").is_file():
                specs[kind] = old
                continue
        spec = writer(work, size)
        subprocess.run([python, "-m", "fusion.cli", "build", "--recipe", str(Path(spec["dir"]) / "recipe.toml")],
                       cwd=ROOT, check=True)
        manifest = json.loads((Path(spec["bundle"]) / "manifest.json").read_text())
        for m in spec["members"]:
            entry = manifest["members"][m["name"]]
            m["onnx"] = str(Path(spec["bundle"]) / entry["file"])
            m["onnx_inputs"] = sorted(entry.get("input_map") or {})
        spec["size"] = size
        path.write_text(json.dumps(spec, indent=1))
        specs[kind] = spec
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "artifacts/peers/work")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--only", choices=("image", "text"))
    a = p.parse_args(argv)
    for kind, spec in build(a.out, a.size, a.only).items():
        print(f"{kind}: {spec['bundle']} ({', '.join(m['name'] for m in spec['members'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
