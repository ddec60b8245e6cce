"""The `merged` variant of a bring-your-own bundle (issue 16, part 6): `[merge] members` names [[members]] of one
architecture; the build merges their weights, exports the merge with the members' exporter, gates it against
torch and scores it. Members of different architectures, or an onnx: member, give a note and no merged variant.

The members are `python:` linear classifiers over one tensor input, their weights written here as safetensors
(the nearest-mean rule, perturbed), so the merged model has an independent reference: the numpy average of the
weight matrices (linear) or base + sum of task vectors (task_arithmetic), softmaxed.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fusion.bundle import read_bundle
from fusion.recipe import load_recipe

N_FEATURES, N_CLASSES, N_ROWS = 6, 3, 300
FACTORY = "python:tests.test_byo_merged_variant:linear_classifier"


def linear_classifier(hidden: int = 0):
    """x (B, 6) -> logits (B, 3): one Linear (hidden = 0) or Linear-ReLU-Linear (another architecture)."""
    from torch import nn

    if hidden:
        return nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, N_CLASSES))
    return nn.Sequential(nn.Linear(N_FEATURES, N_CLASSES))


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.0, (N_CLASSES, N_FEATURES))
    y = np.arange(N_ROWS) % N_CLASSES
    X = (means[y] + rng.normal(0, 1.0, (N_ROWS, N_FEATURES))).astype(np.float32)
    return X, y, means


def write_weights(path: Path, W: np.ndarray, b: np.ndarray) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"0.weight": torch.from_numpy(np.ascontiguousarray(W, np.float32)),
               "0.bias": torch.from_numpy(np.ascontiguousarray(b, np.float32))}, str(path))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("byo-merged")
    X, y, means = make_data()
    np.savez(root / "data.npz", feats=X, y=y)
    rng = np.random.default_rng(7)
    base = {"W": means.astype(np.float32), "b": (-0.5 * (means ** 2).sum(1)).astype(np.float32)}
    write_weights(root / "base.safetensors", base["W"], base["b"])
    weights = {}
    for i, name in enumerate(("a", "b", "c")):
        W = base["W"] + rng.normal(0, 0.6, base["W"].shape).astype(np.float32)
        bias = base["b"] + rng.normal(0, 0.3, base["b"].shape).astype(np.float32)
        write_weights(root / f"{name}.safetensors", W, bias)
        weights[name] = (W, bias)
    return {"root": root, "weights": weights, "base": base, "X": X}


def recipe(root: Path, out: str, merge: str, extra_members: str = "") -> Path:
    text = textwrap.dedent(f"""
        [data]
        source = "{root / 'data.npz'}"
        classes = ["red", "green", "blue"]

        [ensemble]
        weights = "equal"

        [distill]
        enabled = false

        [merge]
        {merge}

        [build]
        out = "{root / out}"
        compare = false

        [[inputs]]
        name = "feats"
        dtype = "float32"
        shape = ["batch", {N_FEATURES}]
    """)
    for name in ("a", "b", "c"):
        text += textwrap.dedent(f"""
            [[members]]
            name = "{name}"
            source = "{FACTORY}"
            weights = "{root / (name + '.safetensors')}"
        """)
    path = root / f"{out}.toml"
    path.write_text(text + textwrap.dedent(extra_members))
    return path


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def run(path: Path, X: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X})[0]


def build(path: Path) -> Path:
    from fusion.build import build_bundle

    r = load_recipe(path)
    build_bundle(r)
    return Path(r.build.out)


def test_linear_merge_of_members_is_the_mean_of_their_weights_exported_and_gated(workdir):
    root, X = workdir["root"], workdir["X"]
    out = build(recipe(root, "linear", 'method = "linear"\nmembers = ["a", "b", "c"]'))
    m = read_bundle(out).manifest
    assert set(m.variants) == {"ensemble", "merged"}
    entry = m.variants["merged"]
    assert entry.kind == "merged" and entry.method["method"] == "linear" and entry.method["members"] == ["a", "b", "c"]
    W = np.mean([w for w, _ in workdir["weights"].values()], axis=0)
    b = np.mean([bb for _, bb in workdir["weights"].values()], axis=0)
    want = softmax(X @ W.T + b)
    got = run(out / entry.file, X)
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
    # the gate ran at batch 1/2/7 against torch; the merge is scored on the build's test split like the members
    assert [c[0] for c in entry.parity["cases"]] == [1, 2, 7] and entry.parity["max_abs_diff"] <= 1e-5
    assert 0.0 <= entry.metrics["test_accuracy"] <= 1.0 and entry.n_parameters == N_FEATURES * N_CLASSES + N_CLASSES


def test_task_arithmetic_onto_a_base_file_adds_the_scaled_task_vectors(workdir):
    root, X, base = workdir["root"], workdir["X"], workdir["base"]
    merge = (f'method = "task_arithmetic"\nmembers = ["a", "b"]\nbase = "{root / "base.safetensors"}"\n'
             f'weights = [0.5, 0.25]')
    out = build(recipe(root, "ta", merge))
    entry = read_bundle(out).manifest.variants["merged"]
    (Wa, ba), (Wb, bb) = workdir["weights"]["a"], workdir["weights"]["b"]
    W = base["W"] + 0.5 * (Wa - base["W"]) + 0.25 * (Wb - base["W"])
    b = base["b"] + 0.5 * (ba - base["b"]) + 0.25 * (bb - base["b"])
    got = run(out / entry.file, X)
    assert np.abs(got - softmax(X @ W.T + b)).max() < 1e-5


def test_members_of_different_architectures_give_a_note_and_no_merged_variant(workdir, caplog):
    root = workdir["root"]
    wide = f"""
        [[members]]
        name = "wide"
        source = "{FACTORY}"
        args = {{hidden = 4}}
    """
    with caplog.at_level(logging.WARNING):
        out = build(recipe(root, "mixed", 'method = "linear"\nmembers = ["a", "wide"]', wide))
    assert "merged" not in read_bundle(out).manifest.variants
    notes = [r.getMessage() for r in caplog.records if "merged variant skipped" in r.getMessage()]
    assert notes and "one architecture" in notes[0] and "'wide'" in notes[0], notes


def test_an_onnx_member_gives_a_note_and_no_merged_variant(workdir, caplog):
    import torch

    root = workdir["root"]
    module = linear_classifier().eval()
    torch.onnx.export(module, (torch.zeros(2, N_FEATURES),), str(root / "d.onnx"), input_names=["feats"],
                      output_names=["logits"], dynamic_axes={"feats": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    extra = f"""
        [[members]]
        name = "d"
        source = "onnx:{root / 'd.onnx'}"
    """
    with caplog.at_level(logging.WARNING):
        out = build(recipe(root, "with-onnx", 'method = "linear"\nmembers = ["a", "d"]', extra))
    assert "merged" not in read_bundle(out).manifest.variants
    notes = [r.getMessage() for r in caplog.records if "merged variant skipped" in r.getMessage()]
    assert notes and "onnx:" in notes[0] and "'d'" in notes[0], notes


def test_an_unknown_member_name_is_a_config_error(workdir):
    from fusion.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[merge\]\.members expected names of \[\[members\]\].*got \['nope'\]"):
        build(recipe(workdir["root"], "unknown", 'method = "linear"\nmembers = ["a", "nope"]'))


def test_hf_text_members_merged_onto_a_base_directory_equal_the_hand_merge_in_torch(tmp_path):
    """Text: two tiny BERT fine-tunes (hf: directories) merged by task arithmetic onto their base directory; the
    merged file (dynamo export, gated over batch x sequence) equals base + sum of weighted task vectors in torch."""
    pytest.importorskip("transformers")
    import torch
    import transformers

    from tests.test_byo_text_data import sentences, tokenizer

    texts, y = sentences()
    np.savez(tmp_path / "text.npz", text=texts, y=y)
    tok = tokenizer(texts)
    (tmp_path / "tokenizer.json").write_text(tok)
    config = transformers.BertConfig(vocab_size=len(json.loads(tok)["model"]["vocab"]), hidden_size=8,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=16, num_labels=5)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    tunes = {}
    for i, name in enumerate(("t1", "t2")):
        model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(i)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        tunes[name] = model
    members = "".join(f'\n[[members]]\nname = "{n}"\nsource = "hf:{tmp_path / n}"\n' for n in tunes)
    (tmp_path / "r.toml").write_text(
        f'[data]\nsource = "{tmp_path / "text.npz"}"\n\n[ensemble]\nweights = "equal"\n\n[distill]\nenabled = false\n\n'
        f'[merge]\nmethod = "task_arithmetic"\nmembers = ["t1", "t2"]\nbase = "{tmp_path / "base"}"\nweights = [0.7, 0.4]\n\n'
        f'[build]\nout = "{tmp_path / "bundle"}"\ncompare = false\n\n[[inputs]]\nname = "text"\nkind = "text"\n'
        f'dtype = "int64"\nshape = ["batch", "sequence"]\ntokenizer = "{tmp_path / "tokenizer.json"}"\nmax_length = 12\n'
        + members)
    out = build(tmp_path / "r.toml")
    entry = read_bundle(out).manifest.variants["merged"]
    assert entry.method["method"] == "task_arithmetic" and entry.arch["arch"] == "BertForSequenceClassification"
    assert {c[1] for c in entry.parity["cases"]} == {1, 7, 12} and entry.parity["max_abs_diff"] <= 1e-5
    # the reference: base + 0.7 (t1 - base) + 0.4 (t2 - base), in torch
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    sd_b, sd_1, sd_2 = base.state_dict(), tunes["t1"].state_dict(), tunes["t2"].state_dict()
    ref.load_state_dict({k: (v + 0.7 * (sd_1[k] - v) + 0.4 * (sd_2[k] - v)) if v.is_floating_point() else v
                         for k, v in sd_b.items()})
    rng = np.random.default_rng(3)
    ids = rng.integers(2, config.vocab_size, (4, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    sess = ort.InferenceSession(str(out / entry.file), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    with torch.no_grad():
        want = torch.softmax(ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits, -1).numpy()
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
