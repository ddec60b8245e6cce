"""Merging real checkpoints: three fine-tunes of one small BERT classifier, merged from a mergekit YAML, served
beside their ensemble, offline.

    .venv/bin/python examples/byo_merge/run.py            # a few minutes on a 2-core CPU
    .venv/bin/python examples/byo_merge/run.py --quick    # the same steps on a tiny configuration (the test's)

1. the text task of examples/byo_text (docstrings of installed packages labelled by package, read with `ast`) and
   its WordPiece tokenizer, from that example's code;
2. one shared base: a `BertConfig` classifier of two layers trained briefly on the whole training split, saved
   with `save_pretrained`; three copies of it fine-tuned on disjoint thirds of the training split (different
   seeds), saved as Hugging Face directories `members/ft_a`, `ft_b`, `ft_c`;
3. `fusion merge --config ties.yml` and `fusion merge --config task_arithmetic.yml` (mergekit's schema, model
   paths relative to the YAML) -> `merged_ties/`, `merged_ta/`, each scored in torch on the held-out strings;
4. `fusion build --recipe examples/byo_merge/recipe.toml`: the fine-tunes as hf: members (one composed ONNX graph,
   gated) and the `merged` variant from `[merge] config = ties.yml`, exported and gated the same way;
5. the bundle served (examples/serving.py), the held-out strings posted to /predict (the ensemble) and with
   `"variant": "merged"`, and the comparison printed: accuracy of the base, each member, the ensemble and each
   merge, and the latency of the merged model over the ensemble's, interleaved requests, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATE = HERE / "recipe.toml"
DEFAULT_WORK = "examples/byo_merge/work"  # the paths recipe.toml names, relative to the repository root
CONFIGS = {"ties": "ties.yml", "task_arithmetic": "task_arithmetic.yml"}  # method -> mergekit YAML beside run.py
OUT_DIRS = {"ties": "merged_ties", "task_arithmetic": "merged_ta"}
FINE_TUNES = ("ft_a", "ft_b", "ft_c")
LATENCY_BATCH = 8  # strings per timed request


def log(msg: str) -> None:
    print(msg, flush=True)


def base_config(vocab: int, n_classes: int, max_length: int, quick: bool):
    import transformers

    h = 32 if quick else 64
    return transformers.BertConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=2 * h, max_position_embeddings=max_length, num_labels=n_classes)


def train(model, tok, rows, max_length: int, epochs: int, lr: float, seed: int, seconds: float):
    """AdamW over `rows` ((text, label)), batches of 32, at most `seconds`; returns (model in eval mode, steps)."""
    import torch

    from examples.byo_text.run import train_classifier

    torch.manual_seed(seed)
    return train_classifier(model, tok, rows, max_length, epochs=epochs, lr=lr, seed=seed, seconds=seconds)


def write_recipe(work: Path) -> Path:
    """recipe.toml with its `examples/byo_merge/work` paths pointing at `work` (the file itself when it is the default)."""
    if work.resolve() == (ROOT / DEFAULT_WORK).resolve():
        return TEMPLATE
    path = work / "recipe.toml"
    path.write_text(TEMPLATE.read_text().replace(DEFAULT_WORK, str(work.resolve())))
    return path


def fusion_cmd() -> list[str]:
    fusion = Path(sys.executable).with_name("fusion")
    return [str(fusion)] if fusion.exists() else [sys.executable, "-m", "fusion.cli"]


def run_cli(*args: str) -> str:
    proc = subprocess.run([*fusion_cmd(), *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fusion {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def accuracy(probs, labels) -> float:
    return float((probs.argmax(1) == labels).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny configuration (the test's): small data, seconds of training")
    ap.add_argument("--work", default=str(ROOT / DEFAULT_WORK), help="where the data, models and bundle go")
    args = ap.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    sys.path.insert(0, str(ROOT))
    import tomllib

    import numpy as np
    import torch
    import transformers

    from examples.byo_text.run import make_task, post, predict_proba, train_tokenizer
    from examples.serving import served

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    transformers.utils.logging.disable_progress_bar()
    work = Path(args.work).resolve()
    (work / "members").mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(work)
    spec = tomllib.loads(recipe.read_text())
    classes, max_length = list(spec["data"]["classes"]), int(spec["inputs"][0]["max_length"])
    per_class, limit_files, vocab_size = (60, 100, 400) if args.quick else (600, 400, 2000)
    base_epochs, ft_epochs, seconds = (2, 2, 20.0) if args.quick else (2, 3, 150.0)
    t_all = time.perf_counter()

    t = time.perf_counter()
    train_rows, test = make_task(classes, per_class, limit_files)
    (work / "data.json").write_text(json.dumps({"classes": classes, "train": train_rows, "test": test}))
    tok = train_tokenizer([x for x, _ in train_rows], vocab_size, work / "tokenizer.json")
    texts, labels = [x for x, _ in test], np.asarray([y for _, y in test])
    log(f"data: {len(train_rows)} training / {len(test)} held-out docstrings of {', '.join(classes)}, WordPiece "
        f"tokenizer of {tok.get_vocab_size()} tokens, {time.perf_counter() - t:.1f} s")

    # 2. the shared base, then three fine-tunes of it on disjoint thirds of the training split
    torch.manual_seed(0)
    config = base_config(tok.get_vocab_size(), len(classes), max_length, args.quick)
    base, steps = train(transformers.BertForSequenceClassification(config), tok, train_rows, max_length,
                        base_epochs, 2e-3, 0, seconds)
    base.save_pretrained(work / "base", safe_serialization=True)
    probs = {"base": predict_proba(base, tok, texts, max_length)}
    n_params = sum(p.numel() for p in base.parameters())
    log(f"base: BertConfig 2 layers, hidden {config.hidden_size}, {n_params:,} parameters, {steps} steps on all "
        f"{len(train_rows)} training strings, held-out accuracy {accuracy(probs['base'], labels):.3f}")
    for i, name in enumerate(FINE_TUNES):
        model = transformers.BertForSequenceClassification.from_pretrained(work / "base", local_files_only=True)
        shard = train_rows[i::len(FINE_TUNES)]
        model, steps = train(model, tok, shard, max_length, ft_epochs, 1e-3, 1 + i, seconds)
        model.save_pretrained(work / "members" / name, safe_serialization=True)
        probs[name] = predict_proba(model, tok, texts, max_length)
        log(f"fine-tune {name}: {steps} steps on {len(shard)} strings (a third), held-out accuracy "
            f"{accuracy(probs[name], labels):.3f}")
    ensemble = np.mean([probs[n] for n in FINE_TUNES], axis=0)
    log(f"ensemble (soft vote in torch): held-out accuracy {accuracy(ensemble, labels):.3f}")

    # 3. the merges, from mergekit YAMLs (model paths relative to the YAML, which sits beside base/ and members/)
    for method, file in CONFIGS.items():
        shutil.copyfile(HERE / file, work / file)
        t = time.perf_counter()
        said = run_cli("merge", "--config", str(work / file), "--out", str(work / OUT_DIRS[method])).strip()
        merged = transformers.BertForSequenceClassification.from_pretrained(work / OUT_DIRS[method], local_files_only=True)
        probs[method] = predict_proba(merged, tok, texts, max_length)
        log(f"fusion merge --config {file}: {said.splitlines()[-1]} in {time.perf_counter() - t:.1f} s; held-out "
            f"accuracy {accuracy(probs[method], labels):.3f}")

    # 4. the bundle: the fine-tunes composed into one graph, and the TIES merge as its `merged` variant
    np.savez(work / "data.npz", text=np.asarray(texts, dtype=str), y=labels)
    t = time.perf_counter()
    run_cli("build", "--recipe", str(recipe))
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    merged_entry = manifest["variants"]["merged"]
    gate = merged_entry["parity"]
    log(f"fusion build: {time.perf_counter() - t:.0f} s; merged variant '{merged_entry['method']['method']}' from "
        f"{Path(merged_entry['method']['config']).name}, gate over {len(gate['cases'])} batch x sequence cases: "
        f"max |Δ| vs torch {gate['max_abs_diff']:.1e}")

    # 5. served: the ensemble and the merged model, the same strings
    with served(work / "bundle", work / "serve.log") as url_base:
        url = url_base + "/predict"

        def ask(rows: list[str], variant: str | None) -> np.ndarray:
            body = {"inputs": rows, **({"variant": variant} if variant else {})}
            return np.asarray(post(url, body)["probabilities"])

        served_probs = {v: np.concatenate([ask(texts[i:i + 64], None if v == "ensemble" else v)
                                           for i in range(0, len(texts), 64)]) for v in ("ensemble", "merged")}
        rounds, times = (10 if args.quick else 40), {"ensemble": [], "merged": []}
        for r in range(rounds):  # interleaved, the same strings for both, after one warm-up round
            rows = [texts[(r * LATENCY_BATCH + j) % len(texts)] for j in range(LATENCY_BATCH)]
            for variant in ("ensemble", "merged"):
                start = time.perf_counter()
                ask(rows, None if variant == "ensemble" else variant)
                if r:
                    times[variant].append(time.perf_counter() - start)
    medians = {v: statistics.median(ts) * 1000 for v, ts in times.items()}
    served_acc = {v: accuracy(p, labels) for v, p in served_probs.items()}
    log(f"served: max |ensemble - torch soft vote| {np.abs(served_probs['ensemble'] - ensemble).max():.1e}, "
        f"max |merged - torch TIES merge| {np.abs(served_probs['merged'] - probs['ties']).max():.1e}")
    log(f"comparison on the {len(texts)} held-out strings (accuracy; latency: median of {rounds - 1} interleaved "
        f"/predict calls of {LATENCY_BATCH} strings):")
    for name in ("base", *FINE_TUNES):
        log(f"  {name:<16} accuracy {accuracy(probs[name], labels):.4f}")
    log(f"  {'ensemble':<16} accuracy {served_acc['ensemble']:.4f} (served), latency {medians['ensemble']:.1f} ms")
    log(f"  {'ties':<16} accuracy {served_acc['merged']:.4f} (served, the bundle's merged variant), latency "
        f"{medians['merged']:.1f} ms")
    log(f"  {'task_arithmetic':<16} accuracy {accuracy(probs['task_arithmetic'], labels):.4f} (torch)")
    log(f"latency ratio merged / ensemble: {medians['merged'] / medians['ensemble']:.2f}")
    log(f"total: {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
