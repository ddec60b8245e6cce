"""examples/byo_merge/run.py --quick runs end to end (a shared BERT base, three fine-tunes saved as Hugging Face
directories, `fusion merge --config` for TIES and task arithmetic, `fusion build` with the TIES merge as the
bundle's `merged` variant, the bundle served, the comparison printed) and its figures are recomputed here:
the task-arithmetic merge from the safetensors by hand, every accuracy in torch from the saved directories, and
the served merged variant's accuracy from the bundle's merged.onnx."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the [text] extra: pip install -e '.[text]'")
pytest.importorskip("tokenizers", reason="the [text] extra: pip install -e '.[text]'")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.server]  # ~90 s: four tiny BERTs trained, two merges, a bundle built and served
FINE_TUNES = ("ft_a", "ft_b", "ft_c")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    work = tmp_path_factory.mktemp("byo-merge-example")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "examples/byo_merge/run.py", "--quick", "--work", str(work)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def held_out(work: Path):
    data = json.loads((work / "data.json").read_text())
    return [t for t, _ in data["test"]], np.asarray([y for _, y in data["test"]])


def torch_probs(directory: Path, work: Path, texts: list[str]) -> np.ndarray:
    import torch
    import transformers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    model = transformers.BertForSequenceClassification.from_pretrained(directory, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for text in texts:  # one at a time, no padding: an independent path from the example's batched encode
            ids = torch.tensor([tok.encode(text).ids[:64]])
            out.append(torch.softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, -1)[0].numpy())
    return np.stack(out)


def printed(out: str) -> dict[str, float]:
    return {name: float(acc) for name, acc in re.findall(r"^  (\w+)\s+accuracy (\d\.\d{4})", out, re.M)}


def test_the_comparison_lists_every_model_and_a_positive_latency_ratio(example):
    _, out = example
    assert set(printed(out)) == {"base", *FINE_TUNES, "ensemble", "ties", "task_arithmetic"}, out
    ratio = float(re.search(r"latency ratio merged / ensemble: (\d+\.\d+)", out).group(1))
    assert ratio > 0, out


def test_task_arithmetic_output_is_base_plus_half_the_task_vectors(example):
    """Independent reference for the mergekit YAML: the merged tensors from the safetensors files by hand."""
    from safetensors.numpy import load_file

    work, _ = example
    base = load_file(str(work / "base" / "model.safetensors"))
    tunes = [load_file(str(work / "members" / n / "model.safetensors")) for n in FINE_TUNES]
    merged = load_file(str(work / "merged_ta" / "model.safetensors"))
    assert set(merged) == set(base)
    for key, b in base.items():
        if not np.issubdtype(b.dtype, np.floating):
            continue
        want = b + sum(0.5 * (t[key] - b) for t in tunes)
        assert np.abs(merged[key] - want).max() <= 1e-6 * max(1.0, float(np.abs(want).max())), key


def test_printed_accuracies_are_the_saved_models_in_torch(example):
    work, out = example
    texts, labels = held_out(work)
    got = printed(out)
    dirs = {"base": work / "base", **{n: work / "members" / n for n in FINE_TUNES},
            "task_arithmetic": work / "merged_ta", "ties": work / "merged_ties"}
    probs = {name: torch_probs(d, work, texts) for name, d in dirs.items()}
    for name in ("base", *FINE_TUNES, "task_arithmetic", "ties"):
        assert got[name] == pytest.approx(float((probs[name].argmax(1) == labels).mean()), abs=5e-5), name
    soft = np.mean([probs[n] for n in FINE_TUNES], axis=0)
    assert got["ensemble"] == pytest.approx(float((soft.argmax(1) == labels).mean()), abs=5e-5)


def test_the_bundles_merged_variant_is_the_cli_ties_merge_exported_and_gated(example):
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from fusion.bundle import read_bundle

    work, out = example
    m = read_bundle(work / "bundle").manifest
    assert set(m.variants) == {"ensemble", "merged"} and set(m.members) == set(FINE_TUNES)
    merged = m.variants["merged"]
    assert merged.kind == "merged" and merged.method["method"] == "ties" and merged.method["config"].endswith("ties.yml")
    assert merged.parity["max_abs_diff"] <= 1e-5 and len(merged.parity["cases"]) == 9
    texts, _ = held_out(work)
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    sess = ort.InferenceSession(str(work / "bundle" / merged.file), providers=["CPUExecutionProvider"])
    want = torch_probs(work / "merged_ties", work, texts[:8])
    for i, text in enumerate(texts[:8]):
        ids = np.asarray([tok.encode(text).ids[:64]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        got = sess.run(None, {x.name: feeds[x.name] for x in sess.get_inputs()})[0][0]
        assert np.abs(got - want[i]).max() < 1e-5, (i, got, want[i])
