"""Bring your own models, text: train three small transformer classifiers offline, fuse and serve them.

    .venv/bin/python examples/byo_text/run.py            # a few minutes on a 2-core CPU
    .venv/bin/python examples/byo_text/run.py --tiny     # the same steps on a tiny configuration (< 1 min)

1. a text task generated offline: the first paragraph of the docstrings of installed packages (numpy, scipy,
   scikit-learn, torch, onnx), read from their source files with `ast` (nothing imported, nothing downloaded),
   labelled by package; a fixed held-out test split;
2. a WordPiece `tokenizer.json` trained on the training split with `tokenizers`;
3. three classifiers (two `BertConfig`s and one `DistilBertConfig` of one or two layers), trained 4 epochs each,
   saved with `save_pretrained(safe_serialization=True)` as local Hugging Face directories;
4. the held-out docstrings written to `data.npz` (a numpy unicode string array `text` and `y`) and a random-init
   one-layer BERT saved as the distillation student; `fusion build --recipe examples/byo_text/recipe.toml`
   (hf: members over one [[inputs]] kind "text": dynamo export, every dynamic dimension gated against torch,
   one composed ONNX graph; with [data]: every model's accuracy on the build's test split of the held-out
   docstrings, the comparison report, and the student distilled from the composed graph in onnxruntime);
5. `FUSION_BUNDLE=... python -m service.serve service.app:FusionService` (what `make serve` runs), the
   held-out strings posted to /predict, and the figures printed: every member's and the ensemble's accuracy
   (torch and served), the time each step took, one /predict answer.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATE = HERE / "recipe.toml"
DEFAULT_WORK = "examples/byo_text/work"  # the paths recipe.toml names, relative to the repository root
PACKAGES = {"numpy": "numpy", "scipy": "scipy", "sklearn": "sklearn", "torch": "torch", "onnx": "onnx"}
EXAMPLES = ["Return the indices of the maximum values along an axis of the array.",
            "Fit the estimator to the training data and return the fitted estimator."]


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- 1. the data: docstrings labelled by package -------------------------------------------------------


def first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n", 1)[0]
    return " ".join(para.split())


def docstrings(package: str, limit_files: int) -> list[str]:
    """First paragraphs of the module/class/function docstrings in a package's source (ast, not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise SystemExit(f"expected the package {package!r} installed (it is a dependency of the [build] extra); got none")
    files = sorted(p for p in Path(spec.origin).parent.rglob("*.py") if not {"tests", "testing", "_vendor"} & set(p.parts))
    random.Random(package).shuffle(files)
    out = []
    for path in files[:limit_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    text = first_paragraph(doc)
                    if 25 <= len(text) <= 400 and not text.startswith((">>>", "..")):
                        out.append(text)
    return out


def make_task(classes: list[str], per_class: int, limit_files: int, seed: int = 0):
    """(train, test): lists of (text, label), balanced, a text seen in two packages dropped, 80/20 split."""
    found = {c: docstrings(PACKAGES[c], limit_files) for c in classes}
    owners: dict[str, set] = {}
    for c, texts in found.items():
        for t in texts:
            owners.setdefault(t, set()).add(c)
    rng = random.Random(seed)
    train, test = [], []
    for label, c in enumerate(classes):
        texts = sorted({t for t in found[c] if len(owners[t]) == 1})
        rng.shuffle(texts)
        texts = texts[:per_class]
        cut = int(0.8 * len(texts))
        train += [(t, label) for t in texts[:cut]]
        test += [(t, label) for t in texts[cut:]]
    rng.shuffle(train)
    return train, test


# ---- 2. the tokenizer, 3. the members --------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"], show_progress=False))
    tok.save(str(path))
    return tok


def member_configs(vocab: int, n_classes: int, max_length: int, tiny: bool) -> dict:
    import transformers

    h = 32 if tiny else 64
    common = dict(vocab_size=vocab, max_position_embeddings=max_length, num_labels=n_classes)
    return {
        "bert_a": transformers.BertConfig(hidden_size=h, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=2 * h, **common),
        "bert_b": transformers.BertConfig(hidden_size=h + 32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=2 * h, hidden_dropout_prob=0.2, **common),
        "distil_c": transformers.DistilBertConfig(dim=h, n_layers=2, n_heads=4, hidden_dim=2 * h, **common),
    }


def encode(tok, texts: list[str], max_length: int):
    """input_ids and attention_mask as the service makes them: truncated, padded with 0 to the longest row."""
    import torch

    rows = [tok.encode(t).ids[:max_length] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def predict_proba(model, tok, texts: list[str], max_length: int, batch: int = 128):
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            ids, mask = encode(tok, texts[i:i + batch], max_length)
            out.append(torch.softmax(model(input_ids=ids, attention_mask=mask).logits, -1))
    return torch.cat(out).numpy()


def student_config(vocab: int, n_classes: int, max_length: int):
    """The distillation student: one BERT layer, narrower than the members (a random init; the build trains it)."""
    import transformers

    return transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=max_length, num_labels=n_classes)


def train_classifier(model, tok, rows, max_length: int, *, epochs: int, lr: float, seed: int, seconds: float):
    """AdamW over `rows` ((text, label)) in shuffled batches of 32 for at most `epochs` and `seconds`; returns
    (model in eval mode, steps). Seed torch before building the model: this seeds only the shuffle."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng, start, steps = random.Random(seed), time.perf_counter(), 0
    model.train()
    for _ in range(epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order), 32):
            batch = [rows[j] for j in order[i:i + 32]]
            ids, mask = encode(tok, [t for t, _ in batch], max_length)
            loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([y for _, y in batch])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - start > seconds:
                return model.eval(), steps
    return model.eval(), steps


def train_member(name: str, config, tok, train, max_length: int, seconds: float, epochs: int, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = (transformers.DistilBertForSequenceClassification if config.model_type == "distilbert"
           else transformers.BertForSequenceClassification)
    model, start = cls(config), time.perf_counter()
    model, steps = train_classifier(model, tok, train, max_length, epochs=epochs, lr=2e-3, seed=seed, seconds=seconds)
    return model, steps, time.perf_counter() - start


# ---- 4. build, 5. serve ------------------------------------------------------------------------------------


def write_recipe(work: Path) -> Path:
    """recipe.toml with its `examples/byo_text/work` paths pointing at `work` (the file itself when it is the default)."""
    text = TEMPLATE.read_text()
    if work.resolve() == (ROOT / DEFAULT_WORK).resolve():
        return TEMPLATE
    path = work / "recipe.toml"
    path.write_text(text.replace(DEFAULT_WORK, str(work.resolve())))
    return path


def classes_of(recipe: Path) -> list[str]:
    import tomllib

    return list(tomllib.loads(recipe.read_text())["data"]["classes"])




def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())






def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny configuration (the test's): small data, seconds of training")
    ap.add_argument("--work", default=str(ROOT / DEFAULT_WORK), help="where the data, members and bundle go")
    ap.add_argument("--seconds", type=float, default=None, help="a cap on each member's training time (default 150 s; it stops sooner after its epochs, the figures in the README)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per member (default 4; --tiny: 1)")
    args = ap.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    sys.path.insert(0, str(ROOT))
    from examples.serving import served
    import numpy as np
    import torch

    import transformers

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    transformers.utils.logging.disable_progress_bar()  # one line per step, no bars
    work = Path(args.work).resolve()
    (work / "members").mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(work)
    classes = classes_of(recipe)
    import tomllib

    max_length = int(tomllib.loads(recipe.read_text())["inputs"][0]["max_length"])
    per_class, limit_files, vocab_size, epochs = (60, 100, 400, 1) if args.tiny else (1500, 2000, 2000, 4)
    epochs = args.epochs if args.epochs is not None else epochs
    seconds = args.seconds if args.seconds is not None else (1.5 if args.tiny else 150.0)
    t_all = time.perf_counter()

    t = time.perf_counter()
    train, test = make_task(classes, per_class, limit_files)
    (work / "data.json").write_text(json.dumps({"classes": classes, "train": train, "test": test}))
    counts = [sum(1 for _, y in train + test if y == k) for k in range(len(classes))]
    log(f"data: {len(train)} training / {len(test)} held-out docstrings of {', '.join(classes)} "
        f"({min(counts)}-{max(counts)} per package), {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    tok = train_tokenizer([x for x, _ in train], vocab_size, work / "tokenizer.json")
    log(f"tokenizer: WordPiece, {tok.get_vocab_size()} tokens, {time.perf_counter() - t:.1f} s")

    texts, labels = [x for x, _ in test], np.asarray([y for _, y in test])
    probs = {}
    for seed, (name, config) in enumerate(member_configs(tok.get_vocab_size(), len(classes), max_length, args.tiny).items()):
        model, steps, took = train_member(name, config, tok, train, max_length, seconds, epochs, seed)
        model.save_pretrained(work / "members" / name, safe_serialization=True)
        probs[name] = predict_proba(model, tok, texts, max_length)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"member {name}: {config.model_type}, {n_params:,} parameters, {steps} steps in {took:.1f} s, "
            f"held-out accuracy {(probs[name].argmax(1) == labels).mean():.3f}")
    soft = np.mean(list(probs.values()), axis=0)
    log(f"ensemble accuracy (soft vote in torch): {(soft.argmax(1) == labels).mean():.3f}")

    # [data]: the held-out docstrings (the members never saw them), one string per row; the student, untrained
    np.savez(work / "data.npz", text=np.asarray(texts, dtype=str), y=labels)
    torch.manual_seed(len(probs))
    transformers.BertForSequenceClassification(student_config(tok.get_vocab_size(), len(classes), max_length)).save_pretrained(
        work / "student", safe_serialization=True)

    t = time.perf_counter()
    fusion = Path(sys.executable).with_name("fusion")
    cmd = [str(fusion)] if fusion.exists() else [sys.executable, "-m", "fusion.cli"]
    build = subprocess.run([*cmd, "build", "--recipe", str(recipe)], cwd=ROOT, capture_output=True, text=True)
    if build.returncode != 0:
        raise SystemExit(f"fusion build failed ({build.returncode}):\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    gate = manifest["variants"]["ensemble"]["parity"]["text"]
    log(f"fusion build: {time.perf_counter() - t:.1f} s; gate over batch x sequence "
        f"{sorted({b for b, _ in gate['cases']})} x {sorted({s for _, s in gate['cases']})}: max |Δ| vs torch "
        f"{gate['max_abs_diff']:.1e}")
    ds, variants = manifest["dataset"], manifest["variants"]
    accs = ", ".join(f"{n} {e['metrics']['test_accuracy']:.3f}" for n, e in {**variants, **manifest["members"]}.items()
                     if "test_accuracy" in e.get("metrics", {}))
    log(f"build on data.npz ({ds['n_train']} train / {ds['n_val']} val / {ds['n_test']} test of the held-out strings): "
        f"test accuracy {accs}")
    if "distilled" in variants:
        d = variants["distilled"]
        log(f"distilled: {d['n_parameters']:,}-parameter BERT student, {d['method']['epochs_run']} epochs on the composed "
            f"graph's probabilities (onnxruntime), validation agreement {d['method']['val_agreement']:.3f}, gate over "
            f"{len(d['parity']['cases'])} batch x sequence cases: max |Δ| vs torch {d['parity']['max_abs_diff']:.1e}")

    t = time.perf_counter()
    with served(work / "bundle", work / "serve.log") as base:
        log(f"served: FUSION_BUNDLE={work / 'bundle'} {Path(sys.executable).name} -m service.serve "
            f"service.app:FusionService --port {base.rsplit(':', 1)[1]}, ready in {time.perf_counter() - t:.1f} s")
        url = base + "/predict"
        t = time.perf_counter()
        served = np.concatenate([np.asarray(post(url, {"inputs": texts[i:i + 64]})["probabilities"])
                                 for i in range(0, len(texts), 64)])
        log(f"/predict on the {len(texts)} held-out strings: accuracy {(served.argmax(1) == labels).mean():.3f}, "
            f"max |served - torch soft vote| {np.abs(served - soft).max():.1e}, {time.perf_counter() - t:.1f} s")
        if "distilled" in manifest["variants"]:
            student = np.concatenate([np.asarray(post(url, {"inputs": texts[i:i + 64], "variant": "distilled"})["probabilities"])
                                      for i in range(0, len(texts), 64)])
            log(f"/predict variant distilled on the {len(texts)} held-out strings: accuracy "
                f"{(student.argmax(1) == labels).mean():.3f}, agreement with the ensemble "
                f"{(student.argmax(1) == served.argmax(1)).mean():.3f}")
        answer = post(url, {"inputs": EXAMPLES})
        log(f"POST /predict {json.dumps({'inputs': EXAMPLES})}")
        shown = {k: answer[k] for k in answer if k != "probabilities"}
        shown["probabilities"] = [[round(p, 3) for p in row] for row in answer["probabilities"]]
        log(f"  -> {json.dumps(shown)}")
    log(f"total: {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
