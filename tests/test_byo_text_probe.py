"""Text bundles record a probe (issue 15): fixed strings as a client sends them and the ensemble's
probabilities on them, tokenized as the service does; the service re-runs it on load and refuses a
bundle whose model file no longer reproduces it.

Members: foreign ONNX text models (tests/byo_bundles.text_model: embedding, masked mean, linear, softmax)
over input_ids/attention_mask, so nothing is exported from torch. Oracle for the recorded figures: the
members run separately in onnxruntime on ids from the `tokenizers` library, averaged in numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fusion.bundle import MANIFEST, manifest_version, sha256_file
from fusion.errors import UnavailableError
from tests import byo_bundles as bb

pytest.importorskip("tokenizers")

ATOL = 1e-5


def recipe_text(root: Path, out: str) -> str:
    members = "".join(f'\n[[members]]\nname = "m{i}"\nsource = "onnx:{root / f"m{i}.onnx"}"\noutput = "probabilities"\n'
                      for i in (1, 2))
    return (f'[ensemble]\ncombiner = "soft_vote"\nweights = "equal"\n\n[build]\nout = "{root / out}"\ncompare = false\n\n'
            f'[[inputs]]\nname = "text"\nkind = "text"\ndtype = "int64"\nshape = ["batch", "sequence"]\n'
            f'tokenizer = "{root / "tokenizer.json"}"\nmax_length = {bb.MAX_LENGTH}\n{members}')


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer

    from fusion.build import build_bundle
    from fusion.recipe import load_recipe

    root = tmp_path_factory.mktemp("byo-text-probe")
    (root / "tokenizer.json").write_text(bb.train_tokenizer())
    vocab = Tokenizer.from_file(str(root / "tokenizer.json")).get_vocab_size()
    for i in (1, 2):
        (root / f"m{i}.onnx").write_bytes(bb.text_model(vocab, seed=10 + i))
    (root / "recipe.toml").write_text(recipe_text(root, "bundle"))
    build_bundle(load_recipe(root / "recipe.toml"))
    return root


def members_on(root: Path, texts: list[str]) -> np.ndarray:
    """The members run separately on the strings tokenized one at a time (unpadded), averaged."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    rows = []
    for t in texts:
        ids = np.asarray([tok.encode(t).ids[:bb.MAX_LENGTH]], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        outs = [ort.InferenceSession(str(root / f"m{i}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0][0]
                for i in (1, 2)]
        rows.append(np.mean(outs, axis=0))
    return np.stack(rows)


def test_the_probe_holds_strings_and_the_members_probabilities_on_them(built):
    probe = json.loads((built / "bundle" / MANIFEST).read_text())["probe"]
    texts = probe["inputs"]["text"]
    assert len(texts) >= 3 and all(isinstance(t, str) for t in texts)
    assert any(len(t.split()) > bb.MAX_LENGTH for t in texts)  # one string is truncated at max_length
    np.testing.assert_allclose(np.asarray(probe["outputs"]["ensemble"]), members_on(built, texts), atol=ATOL)


def test_the_service_reruns_the_probe_and_refuses_an_altered_model_file(built, tmp_path):
    import shutil

    from service import runtime

    runtime.check_probe(runtime.load(built / "bundle"))  # reproduces on load
    altered = tmp_path / "altered"
    shutil.copytree(built / "bundle", altered)
    model = onnx.load(str(altered / "ensemble.onnx"))
    for t in model.graph.initializer:  # another member's weights: the file loads and runs, answering otherwise
        if t.name.startswith("m1/") and numpy_helper.to_array(t).dtype == np.float32 and t.dims:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.5), t.name))
    onnx.save(model, str(altered / "ensemble.onnx"))
    manifest = json.loads((altered / MANIFEST).read_text())  # digests and version made consistent: only the probe can tell
    manifest["variants"]["ensemble"]["sha256"] = sha256_file(altered / "ensemble.onnx")
    manifest["bundle_version"] = manifest_version(manifest)
    (altered / MANIFEST).write_text(json.dumps(manifest))
    loaded = runtime.load(altered)
    with pytest.raises(UnavailableError, match=r"'ensemble' does not reproduce its recorded outputs: max \|Δ\| = .* > 0.0001"):
        runtime.check_probe(loaded)
