"""Text inputs of composed bundles (issue 15): a recipe's `[[inputs]] kind = "text"` and `hf:` members.

The service keeps the tokenizer (service/inputs.py reads the bundle's tokenizer.json with `tokenizers`) and
feeds the graph int64 ("batch", "sequence") tensors named `input_ids`, `attention_mask` and, for members
that take them, `token_type_ids` (zeros). So a text input is one client-facing `TensorSpec` in the manifest
(kind "text", `text.graph_inputs` the union of what the members take) and two or three graph inputs of the
composed ensemble, each member fed the ones its forward accepts by name.

The members are exported with the dynamo exporter and every named dimension dynamic
(fusion.compose.torch_member): the TorchScript exporter bakes the sequence length into attention reshapes
(NOTES-byo.md). `check_text_parity` is the gate for that: at batch 1, 2, 7 and sequence lengths 1, 7 and
`max_length`, on token ids below the tokenizer's vocabulary with padded rows (masks with zeros), every torch
member's ONNX file against its torch module, and the composed graph against the members combined in torch
(an `onnx:` text model, fed by its own input names, run alone in onnxruntime), to `ATOL`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fusion.bundle import TensorSpec
from fusion.errors import ConfigError, DataFormatError, ExportError

GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # service/inputs.py TEXT_GRAPH_INPUTS
BATCHES = (1, 2, 7)
ATOL = 1e-5


def sequence_lengths(max_length: int) -> tuple[int, ...]:
    """The gate's sequence lengths: 1, 7 and max_length (the ones that exist, each once)."""
    return tuple(sorted({n for n in (1, 7, int(max_length)) if 1 <= n <= max_length}))


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` of a recipe's tokenizer.json, with a clear error for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"[[inputs]] tokenizer: expected a tokenizer.json file at {path}; got no such file")
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:
        raise ConfigError("a text input needs the `tokenizers` library: pip install 'fusion-serve[text]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exception on a bad file
        raise ConfigError(f"[[inputs]] tokenizer: {path} is not a tokenizer.json the `tokenizers` library loads: "
                          f"{str(exc):.200}") from None


def member_inputs(module) -> tuple[str, ...]:
    """The text graph inputs a torch member takes, in its forward's order (the hf: wrapper's `input_names`)."""
    names = tuple(getattr(module, "input_names", ()) or ())
    if not names or "input_ids" not in names or not set(names) <= set(GRAPH_INPUTS):
        raise ConfigError(f"a member over a text input expected a module whose input_names are some of "
                          f"{list(GRAPH_INPUTS)} with input_ids (an hf: sequence classifier); got {list(names)}")
    return names


def onnx_inputs(name: str, path: str | Path) -> tuple[str, ...]:
    """The text graph inputs an `onnx:` member's file takes (its inputs named input_ids, attention_mask...)."""
    from fusion.compose import OnnxMember, graph_inputs

    model = OnnxMember.load(name, path).model  # a missing or unreadable file: MemberError naming the member
    return tuple(i.name for i in graph_inputs(model) if i.name in GRAPH_INPUTS)


def graph_specs(inputs: Sequence[TensorSpec], taken: Sequence[Sequence[str]]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(the manifest's inputs with each text spec's `graph_inputs` set to what the members take (`taken`: each
    member's text graph inputs), the composed graph's inputs: each text spec replaced by its int64
    ("batch", "sequence") feeds)."""
    texts = [s for s in inputs if s.kind == "text"]
    if len(texts) > 1:
        raise ConfigError(f"expected at most one [[inputs]] of kind 'text' (their graph inputs share the names "
                          f"{list(GRAPH_INPUTS)}); got {[s.name for s in texts]}")
    if not texts:
        return list(inputs), list(inputs)
    names = [n for n in GRAPH_INPUTS if any(n in own for own in taken)]
    if "input_ids" not in names:
        raise ConfigError(f"a text input expected members that take input_ids (hf: sequence classifiers, or ONNX "
                          f"files with inputs named {list(GRAPH_INPUTS)}); got members taking {[list(t) for t in taken]}")
    clash = [s.name for s in inputs if s.kind != "text" and s.name in GRAPH_INPUTS]
    if clash:
        raise ConfigError(f"[[inputs]] {clash}: expected names other than {list(GRAPH_INPUTS)} beside a text input "
                          f"(the text input feeds the graph under those names); got them")
    seq = texts[0].shape[1]
    bundle, graph = [], []
    for s in inputs:
        if s.kind == "text":
            bundle.append(TensorSpec(name=s.name, dtype="int64", shape=s.shape, kind="text",
                                     text={**(s.text or {}), "graph_inputs": names}))
            graph += [TensorSpec(name=n, dtype="int64", shape=("batch", seq)) for n in names]
        else:
            bundle.append(s)
            graph.append(s)
    return bundle, graph


def check_member(name: str, module, vocab: int, max_length: int) -> None:
    """A member's embedding must have a row for every id the tokenizer gives, and a position for max_length."""
    config = getattr(getattr(module, "model", None), "config", None)
    rows = getattr(config, "vocab_size", None)
    if rows is not None and rows < vocab:
        raise ConfigError(f"member '{name}': expected a vocabulary of at least the tokenizer's {vocab} ids; "
                          f"got vocab_size {rows} in its config.json")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and positions < max_length:
        raise ConfigError(f"member '{name}': expected max_position_embeddings >= the text input's max_length "
                          f"{max_length}; got {positions} in its config.json")


def token_feeds(names: Sequence[str], batch: int, length: int, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Token ids below `vocab`; every other row padded (mask zeros after a random length >= 1); zero token types."""
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for r in range(1, batch, 2):
        mask[r, int(rng.integers(1, length + 1)):] = 0
    made = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: made[n] for n in names}


def check_text_parity(composed: bytes, members: Sequence[tuple[str, object, object]], combiner, graph: Sequence[TensorSpec],
                      *, vocab: int, max_length: int, kinds: Sequence[str], atol: float = ATOL, seed: int = 3,
                      temperatures: Sequence[float] | None = None) -> dict:
    """The gate over every dynamic dimension: at batch 1/2/7 x sequence 1/7/max_length, each member's ONNX
    file (members: (name, torch module or None, OnnxMember)) equals its torch module, and the composed graph
    equals the members combined by `combiner` in torch (probabilities members through log, as the composed
    head, divided by the member's temperature when calibrated): each torch member run in torch, an `onnx:`
    member (module None) run alone in onnxruntime."""
    import torch

    from fusion.compose import SMALLEST, run_member, session
    from fusion.export import OUTPUT_NAME

    rng = np.random.default_rng(seed)
    other = {s.name: s for s in graph if s.name not in GRAPH_INPUTS}
    names = [s.name for s in graph if s.name in GRAPH_INPUTS]
    sessions = [(n, module, om, session(om.model)) for n, module, om in members]
    fused = session(composed)
    worst_member, worst, agree, cases = 0.0, 0.0, 1.0, []
    for length in sequence_lengths(max_length):
        for b in BATCHES:
            feeds = token_feeds(names, b, length, vocab, rng)
            if other:
                from fusion.compose import random_feeds

                feeds |= random_feeds(other, b, rng)
            scores = []
            for (name, module, om, sess), kind in zip(sessions, kinds):
                imap = om.input_map or {i.name: i.name for i in sess.get_inputs()}
                try:
                    got = run_member(sess, [om.output_name] if om.output_name else None, {k: feeds[v] for k, v in imap.items()},
                                     om.fixed_batch == "one_row")[0]
                    if module is not None:
                        with torch.no_grad():
                            want = module(*(torch.from_numpy(feeds[n]) for n in member_inputs(module))).float().numpy()
                except Exception as exc:  # noqa: BLE001 - a length past max_position_embeddings, a bad id
                    raise ExportError(f"member '{name}': the text gate failed at batch {b}, sequence {length}: "
                                      f"{type(exc).__name__}: {str(exc)[:240]}") from None
                if module is None:
                    want = np.asarray(got, np.float32)
                else:
                    d = float(np.abs(got - want).max())
                    if not d <= atol:
                        raise ExportError(f"member '{name}': its ONNX export differs from torch by {d:.3g} at batch {b}, "
                                          f"sequence {length} (allowed {atol:g}): an export that fixed a dimension")
                    worst_member = max(worst_member, d)
                z = want.reshape(b, -1)
                z = np.log(np.maximum(z, SMALLEST)) if kind == "probabilities" else z
                scores.append(z / np.float32(temperatures[len(scores)]) if temperatures is not None else z)
            with torch.no_grad():
                want = combiner(torch.from_numpy(np.stack(scores).astype(np.float32))).numpy()
            got = fused.run([OUTPUT_NAME], feeds)[0]
            d = float(np.abs(got - want).max())
            worst, agree = max(worst, d), min(agree, float((got.argmax(-1) == want.argmax(-1)).mean()))
            cases.append([b, length])
    report = {"cases": cases, "max_abs_diff": worst, "members_max_abs_diff": worst_member, "argmax_agreement": agree,
              "atol": atol, "reference": "the members (torch; onnx: files in onnxruntime) on token ids below the vocabulary, padded rows, "
                           "combined in torch"}
    if not worst <= atol or agree < 1.0:
        raise ExportError(f"the composed text ensemble disagrees with its torch members: max |Δ| = {worst:.3g} "
                          f"(allowed {atol:g}), argmax agreement {agree:.2%} (required 100%)")
    return report


# the strings a text bundle's probe records (Manifest.probe): words, punctuation, digits, accents, and one past
# any small max_length; those that give no token with the bundle's tokenizer are left out
PROBE_TEXTS = ("the", "hello world", "The quick brown fox jumps over the lazy dog.", "rain, 42 birds & 7 trains!",
               "déjà vu: naïve café", " ".join(["one two three four five six seven eight"] * 8))


def service_tokenizer(path: str | Path, max_length: int):
    """(tokenizer, pad id) as the service uses them (service/inputs.load_tokenizer): truncation at max_length,
    no padding of its own (rows are padded per batch with the file's pad id, 0 when it names none)."""
    tok = load_tokenizer(path)
    pad = int((tok.padding or {}).get("pad_id", 0))
    tok.no_padding()
    tok.enable_truncation(int(max_length))
    return tok, pad


def encode(tokenizer, pad: int, texts: Sequence[str], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Strings -> the text graph feeds `names` as the service makes them (service/inputs.py): ids truncated at
    the tokenizer's max_length, padded to the longest row with `pad`, mask 1 on tokens, token types zero. A
    string that gives no token is refused (DataFormatError), as the service refuses it: a row of padding alone."""
    encodings = [tokenizer.encode(t) for t in texts]
    lengths = [len(e.ids) for e in encodings]
    for i, n in enumerate(lengths):
        if n == 0:
            raise DataFormatError(f"text row {i}: expected a string that gives at least one token with the tokenizer "
                                  f"(the service refuses one that gives none); got {texts[i]!r:.80}")
    width = max(lengths + [1])
    ids = np.full((len(texts), width), pad, dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    for i, e in enumerate(encodings):
        ids[i, :lengths[i]] = e.ids
        mask[i, :lengths[i]] = 1
    made = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: made[n] for n in names}


def tokenize_inputs(specs: Sequence[TensorSpec], root: str | Path, X: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Named rows {bundle input: (N, ...)} with each text input's strings replaced by its graph feeds, tokenized
    with the tokenizer.json under `root` (a bundle or its staging directory) as the service tokenizes them."""
    out = dict(X)
    for s in specs:
        if s.kind == "text" and s.name in out:
            tok, pad = service_tokenizer(Path(root) / s.text["tokenizer"], s.text["max_length"])
            out |= encode(tok, pad, out.pop(s.name).tolist(), s.text["graph_inputs"])
    return out


def text_probe(composed: bytes, bundle_inputs: Sequence[TensorSpec], files: Mapping[str, str | Path],
               seed: int = 2) -> dict | None:
    """The manifest's probe of a text bundle: PROBE_TEXTS (those that give a token) as a client sends them,
    the other inputs' random rows, and the composed graph's probabilities on them tokenized as one batch the
    way the service does; the service re-runs it on load (runtime.check_probe) and refuses a bundle whose
    files do not reproduce it. None when an input is an image (its probe rows would be encoded images)."""
    from fusion.compose import random_feeds, session
    from fusion.export import OUTPUT_NAME

    if any(s.kind == "image" for s in bundle_inputs):
        return None
    spec = next(s for s in bundle_inputs if s.kind == "text")
    tok, pad = service_tokenizer(files[spec.text["tokenizer"]], spec.text["max_length"])
    texts = [t for t in PROBE_TEXTS if tok.encode(t).ids]
    if not texts:
        return None
    others = random_feeds({s.name: s for s in bundle_inputs if s.kind != "text"}, len(texts), np.random.default_rng(seed))
    feeds = {**encode(tok, pad, texts, spec.text["graph_inputs"]), **others}
    out = session(composed).run([OUTPUT_NAME], feeds)[0]
    return {"inputs": {spec.name: texts, **{k: v.tolist() for k, v in others.items()}}, "outputs": {"ensemble": out.tolist()}}


def tokenizer_file(inputs_sections: Sequence) -> tuple[Path, int, int] | None:
    """(tokenizer path, its vocabulary size, max_length) of the recipe's text input, or None without one."""
    for s in inputs_sections:
        if s.kind == "text":
            tok = load_tokenizer(s.tokenizer)
            return Path(s.tokenizer), tok.get_vocab_size(), int(s.max_length)
    return None


def files_of(text: tuple[Path, int, int] | None) -> Mapping[str, Path]:
    """{name in the bundle: source path} of the files a text bundle carries (its tokenizer.json)."""
    return {text[0].name: text[0]} if text else {}
