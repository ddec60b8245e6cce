"""Text bundles through the recipe (issue 15): `[[inputs]] kind = "text"` + `hf:` members, built by
`fusion build` (dynamo export, every dynamic dimension gated against torch), served by a real `bentoml serve`.

Members: a tiny random BERT (takes token_type_ids) and a tiny random DistilBERT (does not), saved with
save_pretrained(safe_serialization=True); a WordPiece tokenizer.json trained here with `tokenizers`."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")  # the [text] extra
tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

from fusion.errors import ConfigError  # noqa: E402
from tests.server import Server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 16
N_CLASSES = 3
SENTENCES = ["the cat sat on the mat", "stocks fell sharply in early trading", "birds sing in the morning",
             "a quick brown fox jumps over the lazy dog", "rain is expected later this week",
             "the market rallied after the report", "children played in the park all afternoon"]


def train_tokenizer(path: Path) -> int:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(SENTENCES * 3, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]"]))
    tok.save(str(path))
    return tok.get_vocab_size()


def save_members(root: Path, vocab: int, positions: int = 64) -> dict[str, Path]:
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=positions, num_labels=N_CLASSES)).eval()
    distil = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=positions,
        num_labels=N_CLASSES)).eval()
    dirs = {"bert": root / "bert", "distil": root / "distil"}
    bert.save_pretrained(dirs["bert"], safe_serialization=True)
    distil.save_pretrained(dirs["distil"], safe_serialization=True)
    return dirs


def recipe_text(tokenizer: Path, dirs: dict[str, Path], out: Path, max_length: int = MAX_LENGTH) -> str:
    members = "".join(f'\n[[members]]\nname = "{n}"\nsource = "hf:{d}"\n' for n, d in dirs.items())
    return (f'[build]\nout = "{out}"\n\n[[inputs]]\nname = "text"\nkind = "text"\ndtype = "int64"\n'
            f'shape = ["batch", "sequence"]\ntokenizer = "{tokenizer}"\nmax_length = {max_length}\n{members}')


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from fusion.build import build_bundle
    from fusion.recipe import load_recipe

    root = tmp_path_factory.mktemp("byo_text")
    vocab = train_tokenizer(root / "tokenizer.json")
    dirs = save_members(root, vocab)
    (root / "recipe.toml").write_text(recipe_text(root / "tokenizer.json", dirs, root / "bundle"))
    manifest = build_bundle(load_recipe(root / "recipe.toml"))
    return root, dirs, manifest


@pytest.mark.slow
def test_text_bundle_manifest_carries_the_tokenizer_and_the_gate_over_every_dimension(built):
    root, _, manifest = built
    digest = hashlib.sha256((root / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest.files == {"tokenizer.json": digest}
    assert (root / "bundle" / "tokenizer.json").read_bytes() == (root / "tokenizer.json").read_bytes()
    (spec,) = manifest.inputs
    assert (spec.name, spec.kind, spec.dtype) == ("text", "text", "int64")
    assert spec.text == {"tokenizer": "tokenizer.json", "max_length": MAX_LENGTH,
                         "graph_inputs": ["input_ids", "attention_mask", "token_type_ids"]}
    assert manifest.members["bert"].input_map == {n: n for n in ("input_ids", "attention_mask", "token_type_ids")}
    assert manifest.members["distil"].input_map == {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    gate = manifest.variants["ensemble"].parity["text"]
    assert sorted(map(tuple, gate["cases"])) == sorted((b, s) for b in (1, 2, 7) for s in (1, 7, MAX_LENGTH))
    assert gate["max_abs_diff"] <= 1e-5 and gate["members_max_abs_diff"] <= 1e-5 and gate["argmax_agreement"] == 1.0
    import onnx

    opset = {o.domain: o.version for o in onnx.load(str(root / "bundle" / "members" / "bert.onnx")).opset_import}[""]
    assert opset >= 18


def _torch_soft_vote(dirs: dict[str, Path], tokenizer: Path, texts: list[str]) -> np.ndarray:
    """The members in torch on the token ids of each string alone (tokenized here, truncated at max_length)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    rows = []
    for t in texts:
        ids = torch.tensor([tok.encode(t).ids[:MAX_LENGTH]])
        with torch.no_grad():
            p = [torch.softmax(transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()(
                input_ids=ids, attention_mask=torch.ones_like(ids)).logits, -1) for d in dirs.values()]
        rows.append(torch.stack(p).mean(0)[0].numpy())
    return np.stack(rows)


@pytest.mark.slow
@pytest.mark.server
def test_one_string_alone_equals_it_inside_a_batch_of_longer_strings_served(built):
    root, dirs, _ = built
    short = "the cat sat"
    longer = ["stocks fell sharply in early trading and the market rallied after the report came out",
              "children played in the park all afternoon while birds sing in the morning rain"]
    with Server(root / "bundle") as srv:
        alone = httpx.post(srv.url + "/predict", json={"inputs": [short]}, timeout=30)
        batch = httpx.post(srv.url + "/predict", json={"inputs": {"text": [longer[0], short, longer[1]]}}, timeout=30)
    assert alone.status_code == 200 and batch.status_code == 200, (alone.text[:300], batch.text[:300])
    p_alone = np.asarray(alone.json()["probabilities"], np.float64)
    p_batch = np.asarray(batch.json()["probabilities"], np.float64)
    assert p_alone.shape == (1, N_CLASSES) and p_batch.shape == (3, N_CLASSES)
    np.testing.assert_allclose(p_batch[1], p_alone[0], atol=1e-5)
    expected = _torch_soft_vote(dirs, root / "tokenizer.json", [longer[0], short, longer[1]])
    np.testing.assert_allclose(p_batch, expected, atol=1e-5)


@pytest.mark.slow
def test_a_foreign_onnx_text_member_beside_an_hf_member(tmp_path):
    """An `onnx:` file taking input_ids/attention_mask by name (probabilities, built with onnx.helper) beside a
    BERT: composed over the text input, gated over batch x sequence, equal to the two run separately."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from fusion.build import build_bundle
    from fusion.recipe import load_recipe
    from tests.byo_bundles import N_CLASSES as FOREIGN_CLASSES
    from tests.byo_bundles import text_model

    vocab = train_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "foreign.onnx").write_bytes(text_model(vocab))
    torch.manual_seed(1)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, num_labels=FOREIGN_CLASSES)).eval()
    bert.save_pretrained(tmp_path / "bert", safe_serialization=True)
    text = recipe_text(tmp_path / "tokenizer.json", {"bert": tmp_path / "bert"}, tmp_path / "bundle")
    text += f'\n[[members]]\nname = "foreign"\nsource = "onnx:{tmp_path / "foreign.onnx"}"\noutput = "probabilities"\n'
    (tmp_path / "recipe.toml").write_text(text)
    manifest = build_bundle(load_recipe(tmp_path / "recipe.toml"))
    assert manifest.inputs[0].text["graph_inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.members["foreign"].input_map == {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    gate = manifest.variants["ensemble"].parity["text"]
    assert len(gate["cases"]) == 9 and gate["max_abs_diff"] <= 1e-5
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = torch.tensor([tok.encode("the cat sat on the mat").ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        p_bert = torch.softmax(bert(input_ids=ids, attention_mask=mask).logits, -1).numpy()
    p_foreign = ort.InferenceSession(str(tmp_path / "foreign.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    got = ort.InferenceSession(str(tmp_path / "bundle" / "ensemble.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())})[0]
    np.testing.assert_allclose(got, (p_bert + p_foreign) / 2, atol=1e-5)


def test_max_length_past_the_members_positions_is_refused(tmp_path):
    from fusion.build import build_bundle
    from fusion.recipe import load_recipe

    vocab = train_tokenizer(tmp_path / "tokenizer.json")
    dirs = save_members(tmp_path, vocab, positions=8)
    (tmp_path / "recipe.toml").write_text(recipe_text(tmp_path / "tokenizer.json", dirs, tmp_path / "bundle"))
    with pytest.raises(ConfigError, match=r"member 'bert': expected max_position_embeddings >= the text input's "
                                          r"max_length 16; got 8"):
        build_bundle(load_recipe(tmp_path / "recipe.toml"))
    assert not (tmp_path / "bundle").exists()


@pytest.mark.slow
@pytest.mark.server
def test_example_runs_end_to_end_tiny(tmp_path):
    """examples/byo_text/run.py --tiny: the same script a user runs, on a tiny configuration (~1 min: three
    dynamo exports dominate), printing the figures the README shows."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples/byo_text/run.py"), "--tiny", "--work", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for line in ("member bert_a: bert", "member distil_c: distilbert", "ensemble accuracy (soft vote in torch):",
                 "gate over batch x sequence [1, 2, 7] x [1, 7, 64]", "/predict on the", '"predictions": ['):
        assert line in out, (line, out[-2000:])
    served = float(re.search(r"max \|served - torch soft vote\| ([0-9.e+-]+)", out)[1])
    assert served <= 1e-5, out[-2000:]
    assert (tmp_path / "bundle" / "manifest.json").is_file() and (tmp_path / "bundle" / "tokenizer.json").is_file()
