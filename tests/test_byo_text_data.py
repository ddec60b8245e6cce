"""A text bundle with `[data] source = "x.npz"` (issue 15): the text input's rows are a numpy unicode string
array (dtype '<U…', read with allow_pickle=False), tokenized as the service tokenizes a request; the
build gets member and ensemble metrics, weights chosen from data, temperature calibration, the text gate,
the comparison and a distilled student (the composed graph in onnxruntime as the teacher, exported with
the dynamo exporter and gated at every batch and sequence length), as a float bundle does.

Data: sentences of class words ("c2w5") among shared filler words, 5 classes. Members: foreign ONNX text
models (tests/byo_bundles.text_model) whose embedding puts each class word on its class's axis, with noise.
Oracle: each test string tokenized alone by `tokenizers` (no padding), the bundle's graph run on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fusion.bundle import read_bundle
from fusion.errors import DataFormatError
from tests import byo_bundles as bb

pytest.importorskip("tokenizers")

N_ROWS = 300
FILLER = ["the", "a", "of", "and", "in", "to"]


def sentences(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(N_ROWS) % bb.N_CLASSES
    rows = []
    for c in y:  # 1..4 class words (one from another class now and then) among 1..8 fillers
        words = [f"c{c}w{rng.integers(0, 6)}" for _ in range(rng.integers(1, 5))]
        words += [f"c{rng.integers(0, bb.N_CLASSES)}w{rng.integers(0, 6)}" for _ in range(rng.integers(0, 2))]
        words += list(rng.choice(FILLER, rng.integers(1, 9)))
        rng.shuffle(words)
        rows.append(" ".join(words))
    return np.asarray(rows), y  # dtype '<U…'


def tokenizer(texts) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return tok.to_str()


def member_weights(tok_json: str, noise: float, seed: int) -> dict:
    """Class words on their class's axis (plus noise), fillers near zero; W = 3 I."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(tok_json).get_vocab()
    rng = np.random.default_rng(seed)
    E = rng.normal(0, noise, (len(vocab), bb.N_CLASSES))
    for word, i in vocab.items():
        if word.startswith("c") and "w" in word:
            E[i, int(word[1])] += 1.0
    return {"E": E, "W": 3 * np.eye(bb.N_CLASSES), "b": np.zeros(bb.N_CLASSES)}


def recipe(root: Path, vocab: int, data: str = "text.npz") -> Path:
    members = "".join(f'\n[[members]]\nname = "m{i}"\nsource = "onnx:{root / f"m{i}.onnx"}"\noutput = "probabilities"\n'
                      for i in (1, 2))
    path = root / "recipe.toml"
    path.write_text(
        f'[data]\nsource = "{root / data}"\n\n[ensemble]\ncombiner = "soft_vote"\nweights = "auto"\n'
        f'calibration = "temperature"\n\n[distill]\nsource = "python:tests.byo_bundles:bag_student"\n'
        f'args = {{vocab = {vocab}}}\nepochs = 25\nlr = 0.03\npatience = 0\nbatch_size = 32\n\n[merge]\nmethod = ""\n\n'
        f'[build]\nout = "{root / "bundle"}"\ncompare = true\ncompare_rounds = 2\n\n'
        f'[[inputs]]\nname = "text"\nkind = "text"\ndtype = "int64"\nshape = ["batch", "sequence"]\n'
        f'tokenizer = "{root / "tokenizer.json"}"\nmax_length = {bb.MAX_LENGTH}\n{members}')
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from fusion.build import build_bundle
    from fusion.recipe import load_recipe

    root = tmp_path_factory.mktemp("byo-text-data")
    texts, y = sentences()
    np.savez(root / "text.npz", text=texts, y=y)
    tok = tokenizer(texts)
    (root / "tokenizer.json").write_text(tok)
    vocab = len(json.loads(tok)["model"]["vocab"])
    for i, noise in ((1, 0.3), (2, 0.6)):
        (root / f"m{i}.onnx").write_bytes(bb.text_model(vocab, weights=member_weights(tok, noise, i), dim=bb.N_CLASSES))
    build_bundle(load_recipe(recipe(root, vocab)))
    return root


def test_metrics_weights_calibration_gate_and_comparison_come_from_the_text_data(built):
    m = read_bundle(built / "bundle").manifest
    ens = m.variants["ensemble"]
    assert m.dataset["source"].endswith("text.npz") and m.dataset["n_test"] > 0
    for e in (ens, m.members["m1"], m.members["m2"]):
        assert 0.5 < e.metrics["test_accuracy"] <= 1.0  # informative members: far above 1/5
    assert ens.method["calibration"] == "temperature" and set(ens.method["temperatures"]) == {"m1", "m2"}
    assert m.ensemble_selection is not None and m.ensemble_selection["chosen"]
    assert ens.parity["text"]["max_abs_diff"] <= 1e-5 and len(ens.parity["text"]["cases"]) == 9
    rows = {r["name"]: r for r in m.comparison["rows"]}
    assert {"ensemble", "m1", "m2"} <= set(rows)
    assert m.probe is not None and isinstance(m.probe["inputs"]["text"][0], str)
    assert {"ensemble", "distilled"} <= set(rows)


def test_a_student_is_distilled_from_the_composed_graph_and_gated_over_batch_and_sequence(built):
    d = read_bundle(built / "bundle").manifest.variants["distilled"]
    assert d.method["teacher_runtime"].startswith("onnxruntime") and d.arch["inputs"] == ["input_ids", "attention_mask"]
    assert d.parity["max_abs_diff"] <= 1e-5
    assert sorted(map(tuple, d.parity["cases"])) == sorted((b, n) for b in (1, 2, 7) for n in (1, 7, bb.MAX_LENGTH))
    assert 0.5 < d.metrics["test_accuracy"] <= 1.0 and d.method["val_agreement"] > 0.7
    # the file takes any batch and sequence length: a string alone equals it inside a batch of longer ones
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(built / "tokenizer.json"))
    sess = ort.InferenceSession(str(built / "bundle" / "distilled.onnx"), providers=["CPUExecutionProvider"])
    texts = ["c1w2 the", "c3w1 c3w4 and of the a in to c2w2 c3w0"]
    ids = [tok.encode(t).ids for t in texts]
    width = max(map(len, ids))
    batch = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, row in enumerate(ids):
        batch[i, :len(row)], mask[i, :len(row)] = row, 1
    together = sess.run(None, {"input_ids": batch, "attention_mask": mask})[0]
    alone = sess.run(None, {"input_ids": batch[:1, :len(ids[0])], "attention_mask": mask[:1, :len(ids[0])]})[0]
    np.testing.assert_allclose(together[:1], alone, atol=1e-6)


def test_the_recorded_test_accuracy_is_the_graph_on_each_string_tokenized_alone(built):
    from tokenizers import Tokenizer

    from fusion.data import load_named
    from fusion.recipe import load_recipe

    r = load_recipe(built / "recipe.toml")
    data = load_named(r.data.source, r.inputs)
    assert data.X_test["text"].dtype.kind == "U"
    tok = Tokenizer.from_file(str(built / "tokenizer.json"))
    sess = ort.InferenceSession(str(built / "bundle" / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    pred = []
    for t in data.X_test["text"]:
        ids = np.asarray([tok.encode(str(t)).ids[:bb.MAX_LENGTH]], np.int64)
        pred.append(sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].argmax(-1)[0])
    acc = float((np.asarray(pred) == data.y_test).mean())
    assert acc == pytest.approx(read_bundle(built / "bundle").manifest.variants["ensemble"].metrics["test_accuracy"])


def test_the_service_reproduces_the_probe(built):
    from service import runtime

    runtime.check_probe(runtime.load(built / "bundle"))


def test_text_arrays_that_are_not_unicode_strings_are_refused(built, tmp_path):
    from fusion.data import load_named
    from fusion.recipe import load_recipe

    specs = load_recipe(built / "recipe.toml").inputs
    texts, y = sentences()
    np.savez(tmp_path / "bytes.npz", text=texts.astype("S"), y=y)
    with pytest.raises(DataFormatError, match=r"text input 'text' expected a numpy unicode string array of shape \[300\].*got dtype \|S"):
        load_named(tmp_path / "bytes.npz", specs)
    np.savez(tmp_path / "grid.npz", text=texts.reshape(-1, 2), y=y[:150])
    with pytest.raises(DataFormatError, match=r"expected a numpy unicode string array of shape \[150\].*got dtype <U\d+ shape \[150, 2\]"):
        load_named(tmp_path / "grid.npz", specs)
    np.savez(tmp_path / "objects.npz", text=texts.astype(object), y=y)  # written as a pickle: never read
    with pytest.raises(DataFormatError, match=r"not a readable \.npz archive"):
        load_named(tmp_path / "objects.npz", specs)


def test_fusion_compare_tokenizes_the_strings_with_the_bundles_tokenizer(built):
    """`fusion compare --bundle DIR` on a text bundle: the data file's strings are read with the manifest's
    inputs and tokenized with the bundle's own tokenizer.json; the ensemble's accuracy is the recorded one."""
    from fusion.compare import CompareConfig, compare_models
    from fusion.data import load_named

    m = read_bundle(built / "bundle").manifest
    data = load_named(m.dataset["source"], m.inputs)
    report = compare_models(built / "bundle", m, data, CompareConfig(rounds=2))
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["ensemble"]["accuracy"] == pytest.approx(m.variants["ensemble"].metrics["test_accuracy"])
    assert rows["distilled"]["accuracy"] == pytest.approx(m.variants["distilled"].metrics["test_accuracy"])


def test_a_data_string_that_gives_no_token_is_refused_naming_its_row(tmp_path):
    """The service refuses a string that gives no token (400); offline it would be a row of padding alone,
    fully masked, scored as if it were data: refused with the row and the string."""
    from fusion.bundle import TensorSpec
    from fusion.text import tokenize_inputs

    (tmp_path / "tokenizer.json").write_text(bb.train_tokenizer())
    spec = TensorSpec(name="text", dtype="int64", shape=("batch", "sequence"), kind="text",
                      text={"tokenizer": "tokenizer.json", "max_length": bb.MAX_LENGTH,
                            "graph_inputs": ["input_ids", "attention_mask"]})
    ok = tokenize_inputs([spec], tmp_path, {"text": np.asarray(["the cat", "rain"])})
    assert ok["input_ids"].shape == (2, 2) and ok["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(DataFormatError, match=r"text row 1: expected a string that gives at least one token.*got ''"):
        tokenize_inputs([spec], tmp_path, {"text": np.asarray(["the cat", "", "rain"])})
