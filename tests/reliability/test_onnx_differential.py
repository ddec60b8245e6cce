"""Security review (issue 13), finding 1: the ONNX check must read every byte as protobuf does.

The reader kept all bits of a varint tag; protobuf's C++ parser (onnxruntime's) keeps the low 32.
A tag written as 5 bytes with bit 32 set was "unknown" to the reader and field 13/14 of a
TensorProto (external data) to onnxruntime: the bundle passed the check and the session read a file
from the server's working directory as weights.

* `test_sec1_overlong_tag_external_data_is_refused`: the review's exact payload, in a bundle.
* `test_sec1_enum_value_aliasing_is_refused`: `data_location = 2^32 + 1`, EXTERNAL to protobuf.
* `test_sec1_ort_format_polyglot_is_refused`: valid ONNX protobuf that onnxruntime would read as
  an ORT-format (flatbuffers) model instead.
* `test_sec1_every_tag_of_a_model_aliased_is_refused`: the same trick on every field of a model.
* `test_sec1_schema_matches_onnx`: every field number the reader knows, checked against the
  installed `onnx`'s descriptors, both ways (a message field the reader does not know is a gap).
* `test_sec1_differential_against_onnx_parsers`: a corpus (tests/reliability/onnx_corpus.py) and
  hypothesis mutations of it; whenever either of onnx's parsers (Python/upb, and C++ protobuf,
  the one onnxruntime links) sees external data, a domain outside the allowed set or subgraphs
  nested too deep, the reader refuses; every clean corpus file is accepted.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion.errors import BundleError
from service import onnx_check
from tests.reliability import bundles, onnx_corpus
from tests.reliability import onnx_wire as w
from tests.reliability.harness import record

onnx = pytest.importorskip("onnx")
TENSOR = "onnx.TensorProto"
BUILTIN = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}  # the policy (issue 13): onnxruntime's built-in domains
MAX_DEPTH = 32  # subgraphs nested deeper are refused
EXAMPLES = 1000  # mutated models per run of the differential test
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = (onnx.TensorProto.DESCRIPTOR.fields_by_name[n].number
                                              for n in ("external_data", "data_location"))


def overlong(f: w.Field) -> None:
    """Write f's tag as 5 bytes with bit 32 set: protobuf C++ reads the same field, upb refuses."""
    f.tag = w.varint((f.number << 3) | f.wire, length=5, high=w.TAG_HIGH_BIT)


def external_via_overlong_tags(location: str) -> tuple[bytes, bytes]:
    """The review's payload: bundles.external_data_model, with the tags of W1's external_data and
    data_location fields over-long. (model bytes, the weights' raw bytes)"""
    model, raw = bundles.external_data_model(location)
    tree = w.parse(model, onnx.ModelProto.DESCRIPTOR)
    hits = 0
    for fields, kind in w.messages(tree):
        if kind == TENSOR:
            for f in fields:
                if f.number in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION):
                    overlong(f)
                    hits += 1
    assert hits == 4, f"expected W1's 3 external_data entries and its data_location; found {hits}"
    return w.encode(tree), raw


# ---- the review's payload --------------------------------------------------------------------


def test_sec1_overlong_tag_external_data_is_refused(v1, tmp_path, monkeypatch):
    from service import runtime

    evil, raw = external_via_overlong_tags("w.bin")
    # what each parser makes of it: upb (onnx's Python) refuses the tag, protobuf C++ keeps its low
    # 32 bits and sees the external reference, and onnxruntime reads the file from its cwd
    with pytest.raises(Exception, match="(?i)parsing|decode|corrupt"):
        onnx.load_model_from_string(evil)
    cpp = onnx.load_from_string(onnx.shape_inference.infer_shapes(evil).SerializeToString())
    w1 = next(t for t in cpp.graph.initializer if t.name == "W1")
    assert w1.data_location == onnx.TensorProto.EXTERNAL
    assert {e.key: e.value for e in w1.external_data}["location"] == "w.bin"

    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)
    X = bundles.digits_like(4)
    honest = ort.InferenceSession(bundles.member_model(0, 0), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
    (tmp_path / "w.bin").write_bytes(raw)
    read = ort.InferenceSession(evil, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
    (tmp_path / "w.bin").write_bytes(np.full(len(raw) // 4, 0.25, np.float32).tobytes())
    other = ort.InferenceSession(evil, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
    assert np.allclose(read, honest, atol=1e-6) and not np.allclose(other, honest, atol=1e-3), \
        "onnxruntime should take W1 from ./w.bin (that is the attack); it did not"

    with pytest.raises(onnx_check.UnsafeModelError, match="members/mlp_0.onnx"):
        onnx_check.check_model(evil, "members/mlp_0.onnx")
    bundle = bundles.rewrite(v1, tmp_path / "evil_bundle", {"members/mlp_0.onnx": evil})
    with pytest.raises(BundleError) as err:
        runtime.load(bundle)
    assert "members/mlp_0.onnx" in str(err.value), str(err.value)
    record("sec1_overlong_tag", refused=str(err.value)[:240], onnxruntime_read_cwd_file=True)


def test_sec1_enum_value_aliasing_is_refused():
    """data_location written as 2^32 + 1 (and 2^63 + 1): both protobuf parsers read an enum's low 32
    bits, EXTERNAL; the old reader compared the whole value with 1."""
    for value in (1 | (1 << 32), 1 | (1 << 63)):
        tree = w.parse(bundles.member_model(0, 0), onnx.ModelProto.DESCRIPTOR)
        graph = next(f for f in tree if f.number == 7).value
        tensor = next(f for f in graph if f.number == 5).value
        tensor.append(w.integer(TENSOR_DATA_LOCATION, value))
        blob = w.encode(tree)
        assert findings(onnx.load_model_from_string(blob)) == {"external data"}
        with pytest.raises(onnx_check.UnsafeModelError, match="external file"):
            onnx_check.check_model(blob, "m.onnx")


def test_sec1_ort_format_polyglot_is_refused():
    """A valid ONNX protobuf (producer_name placed so that bytes 4..8 read 'ORTM'): onnxruntime
    switches to its ORT-format (flatbuffers) parser for it; the reader refuses it."""
    import onnxruntime as ort

    model = onnx.load_from_string(bundles.member_model(0, 0))
    model.ClearField("producer_name")
    blob = model.SerializeToString()
    assert blob[:2] == b"\x08\x08"  # ir_version 8 first
    polyglot = blob[:2] + b"\x12\x08ORTMxxxx" + blob[2:]  # producer_name "ORTMxxxx" at offset 2
    assert polyglot[4:8] == b"ORTM" and onnx.load_model_from_string(polyglot).producer_name == "ORTMxxxx"
    with pytest.raises(Exception, match="ORT model verification failed"):
        ort.InferenceSession(polyglot, providers=["CPUExecutionProvider"])  # read as flatbuffers, not ONNX
    with pytest.raises(onnx_check.UnsafeModelError, match="ORT-format"):
        onnx_check.check_model(polyglot, "m.onnx")


# ---- the schema, against onnx's own -----------------------------------------------------------

SCALAR_KIND = {  # FieldDescriptor.TYPE_* -> the reader's kind
    1: "i64", 2: "i32", 3: "varint", 4: "varint", 5: "varint", 6: "i64", 7: "i32", 8: "varint", 9: "len",
    12: "len", 13: "varint", 14: "varint", 15: "i32", 16: "i64", 17: "varint", 18: "varint",
}


def test_sec1_schema_matches_onnx():
    """SCHEMA holds exactly the messages reachable from onnx.ModelProto, each with exactly onnx's
    field numbers, names, kinds (scalar wire kind or message type) and repetition; and the fields
    the reader decides on are the ones their names say."""
    reachable, todo = {}, [onnx.ModelProto.DESCRIPTOR]
    while todo:
        d = todo.pop()
        if d.full_name in reachable:
            continue
        reachable[d.full_name] = d
        todo += [f.message_type for f in d.fields if f.message_type is not None]
    assert {f"onnx.{k}" for k in onnx_check.SCHEMA} == set(reachable), \
        f"schema messages differ: only in onnx {set(reachable) - {f'onnx.{k}' for k in onnx_check.SCHEMA}}, " \
        f"only in the reader {[k for k in onnx_check.SCHEMA if f'onnx.{k}' not in reachable]}"
    n_fields = 0
    for kind, fields in onnx_check.SCHEMA.items():
        d = reachable[f"onnx.{kind}"]
        theirs = {f.number: onnx_check.Field(f.name, f.message_type.full_name.removeprefix("onnx.") if f.message_type
                                             else SCALAR_KIND[f.type], f.is_repeated) for f in d.fields}
        assert fields == theirs, f"{kind}: reader {fields} != onnx {theirs}"
        n_fields += len(fields)
    schema = onnx_check.SCHEMA
    assert [schema[k][n].name for k, n in onnx_check.DOMAIN_FIELDS] == ["domain", "domain"]
    tensor_fields = (onnx_check.EXTERNAL_DATA, onnx_check.DATA_LOCATION, onnx_check.TENSOR_NAME)
    assert [schema["TensorProto"][n].name for n in tensor_fields] == ["external_data", "data_location", "name"]
    assert onnx.TensorProto.DataLocation.Value("DEFAULT") == onnx_check.DEFAULT_LOCATION
    assert schema["ModelProto"][onnx_check.MODEL_GRAPH].name == "graph"
    assert schema["ModelProto"][onnx_check.MODEL_FUNCTIONS].name == "functions"
    assert schema["FunctionProto"][onnx_check.FUNCTION_DOMAIN].name == "domain"
    assert onnx_check.BUILTIN_DOMAINS == BUILTIN
    record("sec1_schema", messages=len(schema), fields=n_fields, onnx=onnx.__version__)


# ---- every field's tag, length and varint, aliased -------------------------------------------


def _spellings(f: w.Field) -> list[tuple[str, str, bytes]]:
    """Non-canonical spellings of f's tag, length and varint value: (what, how, bytes)."""
    key = (f.number << 3) | f.wire
    minimal = len(w.varint(key))
    out = [("tag", "bit 32 set", w.varint(key, 5, high=w.TAG_HIGH_BIT)),
           ("tag", "zero-padded", w.varint(key, minimal + 1)), ("tag", "6 bytes", w.varint(key, 6))]
    if f.wire == w.LEN:
        body = len(w.encode(f.value)) if isinstance(f.value, list) else len(f.value)
        out.append(("size", "zero-padded", w.varint(body, len(w.varint(body)) + 1)))
    if f.wire == w.VARINT:
        out += [("raw", "zero-padded", w.varint(f.value, len(w.varint(f.value)) + 1)),
                ("raw", "11 bytes", w.varint(f.value, 11))]
    return out


def test_sec1_every_tag_of_a_model_aliased_is_refused():
    """For every field occurrence of several models (every message, every nesting level): its tag
    written as 5 bytes with bit 32 set (the review's trick), and in turn one other non-canonical
    spelling (tag zero-padded or 6 bytes long, length zero-padded, varint zero-padded or 11 bytes
    long): each variant alone is refused."""
    models = {"member": bundles.member_model(0, 0), **dict(onnx_corpus.constructs())}
    tried, spellings, messages, turn = 0, Counter(), Counter(), 0
    for name, data in models.items():
        tree = w.parse(data, onnx.ModelProto.DESCRIPTOR)
        onnx_check.check_model(data, name)  # the clean file passes
        for fields, kind in w.messages(tree):
            for f in fields:
                first, *others = _spellings(f)
                turn += 1
                for what, how, spelled in (first, others[turn % len(others)]):
                    setattr(f, what, spelled)
                    mutated = w.encode(tree)
                    setattr(f, what, None)
                    with pytest.raises(onnx_check.UnsafeModelError, match="malformed protobuf"):
                        onnx_check.check_model(mutated, name)
                    tried += 1
                    spellings[f"{what} {how}"] += 1
                messages[kind.removeprefix("onnx.")] += 1
    assert spellings["tag bit 32 set"] == sum(messages.values()) > 500
    record("sec1_every_field_aliased", models=len(models), fields=sum(messages.values()), variants_refused=tried,
           by_spelling=dict(spellings), fields_by_message=dict(messages))


# ---- the differential test -------------------------------------------------------------------
#
# Two oracles, both onnx's own parsers: Python's (upb, `onnx.load_model_from_string`) and protobuf
# C++ (onnx's C extension parses the bytes and writes them back canonically in
# `shape_inference.infer_shapes`; onnxruntime links the same parser). They differ exactly on the
# review's trick: upb refuses a tag above 32 bits, C++ keeps its low 32 bits.


def python_view(data: bytes):
    try:
        return onnx.load_model_from_string(data)
    except Exception:  # noqa: BLE001 - any refusal: this parser sees no model
        return None


def cpp_view(data: bytes):
    """(the model as protobuf C++ read it, or None; how): "identity" (read and written back by the
    inliner with nothing to inline: an identity on every clean corpus file), "infer_shapes" (the
    fallback, which adds value_info), "parsed" (C++ read the bytes but both round trips failed on
    the model's content) or "unparseable" (C++ refused the bytes)."""
    from onnx.onnx_cpp2py_export import inliner, shape_inference

    for how, roundtrip in (("identity", lambda: inliner.inline_selected_functions(data, [], False)),
                           ("infer_shapes", lambda: shape_inference.infer_shapes(data, False, False, False))):
        try:
            return onnx.ModelProto.FromString(roundtrip()), how
        except Exception as exc:  # noqa: BLE001
            if "Unable to parse proto" in str(exc):
                return None, "unparseable"
    return None, "parsed"


def _raw(text) -> bytes:
    return text if isinstance(text, bytes) else text.encode()  # upb gives bytes for a proto2 string that is not UTF-8


def findings(model) -> set[str]:
    """What the policy forbids in a parsed model, found by protobuf reflection over every message
    (not by field numbers): external data in any TensorProto, a NodeProto or OperatorSetIdProto
    domain outside the built-in ones and the model's own function domains, subgraphs too deep."""
    allowed = {d.encode() for d in BUILTIN} | {_raw(f.domain) for f in model.functions}
    out: set[str] = set()

    def walk(msg, graphs: int) -> None:
        kind = msg.DESCRIPTOR.full_name
        if kind == TENSOR and (msg.data_location == onnx.TensorProto.EXTERNAL or len(msg.external_data)):
            out.add("external data")
        elif kind in ("onnx.NodeProto", "onnx.OperatorSetIdProto") and _raw(msg.domain) not in allowed:
            out.add(f"domain {_raw(msg.domain)[:40]!r}")
        elif kind == "onnx.GraphProto":
            if graphs > MAX_DEPTH:
                out.add("subgraphs too deep")
            graphs += 1
        for fd, value in msg.ListFields():
            if fd.message_type is not None:
                for v in (value if fd.is_repeated else (value,)):
                    walk(v, graphs)

    walk(model, 0)
    return out


def refuses(data: bytes) -> str | None:
    try:
        onnx_check.check_model(data, "m.onnx")
        return None
    except onnx_check.UnsafeModelError as exc:
        return str(exc)


@pytest.fixture(scope="module")
def corpus():
    return onnx_corpus.corpus()


def test_sec1_corpus_clean_files_accepted_hostile_refused(corpus):
    """Every corpus file as written: refused exactly when an oracle finds something forbidden (so no
    clean file is refused); both parsers read each file the same (the C++ round trip is an identity)."""
    by_source, wrong = Counter(), []
    for name, data in corpus:
        py, (cpp, how) = python_view(data), cpp_view(data)
        assert py is not None and how == "identity" and py == cpp, f"{name}: onnx's parsers read it differently ({how})"
        found = findings(py) | findings(cpp)
        refused = refuses(data)
        if bool(found) != bool(refused):
            wrong.append((name, sorted(found), refused))
        by_source[f"{name.split('/')[0]} {'refused' if refused else 'accepted'}"] += 1
    assert not wrong, wrong
    record("sec1_corpus", files=len(corpus), by_source=dict(by_source))


# ---- mutations -------------------------------------------------------------------------------

# domains to inject: custom, onnxruntime-internal, a look-alike, and allowed ones (built-in, a corpus function's)
DOMAINS = ("evil.ops", "ai.onnx.preview.training", "com.microsoft.nchwc", "org.pytorch.aten", "ai.onnx.ml ",
           "ai.onnx", "", "com.microsoft", "local.fusion")
LOCATIONS = ("w.bin", "../../outside.bin", "/etc/hostname", "README.md")


def spelled_tag(draw, number: int, wire: int) -> bytes | None:
    """A tag for a field we add: canonical (None) or over-long in one of the ways parsers disagree on."""
    key = (number << 3) | wire
    how = draw(st.sampled_from(("canonical", "canonical", "bit 32+", "zero-padded", "6+ bytes")))
    if how == "bit 32+":
        return w.varint(key, 5, high=draw(st.integers(1, 7)) << 32)
    if how == "zero-padded":
        return w.varint(key, draw(st.integers(len(w.varint(key)) + 1, 5)))
    if how == "6+ bytes":
        return w.varint(key, draw(st.integers(6, 10)))
    return None


def external_fields(draw) -> list[w.Field]:
    """data_location = EXTERNAL (1, or 1 with high bits that protobuf drops reading an enum) and/or
    external_data entries, each with a canonical or over-long tag."""
    out = []
    mode = draw(st.sampled_from(("data_location", "external_data", "both")))
    if mode != "external_data":
        f = w.integer(TENSOR_DATA_LOCATION, draw(st.sampled_from((1, 1, 1 | (1 << 32), 1 | (1 << 63)))))
        f.tag = spelled_tag(draw, TENSOR_DATA_LOCATION, w.VARINT)
        out.append(f)
    if mode != "data_location":
        for key, value in (("location", draw(st.sampled_from(LOCATIONS))), ("length", "16")):
            f = w.message(TENSOR_EXTERNAL_DATA, [w.string(1, key), w.string(2, value)], kind="onnx.StringStringEntryProto")
            f.tag = spelled_tag(draw, TENSOR_EXTERNAL_DATA, w.LEN)
            out.append(f)
    return out


def payload_graph(draw, depth: int):
    """A graph whose innermost of `depth` nested levels (If-style `g` attributes) holds a clean
    Identity, a node from a drawn domain, or an initializer with external data."""
    from onnx import TensorProto, helper, numpy_helper

    what = draw(st.sampled_from(("clean", "domain", "external")))
    domain = draw(st.sampled_from(DOMAINS)) if what == "domain" else ""
    node = helper.make_node("Identity", ["x"], ["y"], domain=domain)
    init = numpy_helper.from_array(np.zeros(4, np.float32), "x")
    graph = w.of(helper.make_graph([node], "inner", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                   [init]))
    if what == "external":
        tensor = next(f for f in graph if f.kind == TENSOR)
        tensor.value += external_fields(draw)
    for level in range(depth):
        attr = w.of(helper.make_attribute("body", helper.make_graph([], f"level{level}", [], [])))
        attr.append(w.message(6, graph, kind="onnx.GraphProto"))
        outer = w.of(helper.make_graph([helper.make_node("If", ["c"], ["y"])], f"outer{level}", [], []))
        next(f for f in outer if f.number == 1).value.append(w.message(5, attr, kind="onnx.AttributeProto"))
        graph = outer
    return graph


def pick(draw, tree, kinds: tuple[str, ...] | None = None):
    """A random message of the tree (of one of `kinds`): (its fields, its type)."""
    found = [(fields, kind) for fields, kind in w.messages(tree) if kinds is None or kind in kinds]
    return draw(st.sampled_from(found)) if found else (None, None)


def mutate(draw, tree, op: str) -> str:
    """Apply `op` to the tree; returns what was done (for the tally)."""
    from onnx import helper, numpy_helper

    if op in ("alias", "duplicate", "drop", "wire type"):
        fields, kind = pick(draw, tree)
        if not fields:
            return f"{op} (empty message)"
        i = draw(st.integers(0, len(fields) - 1))
        f = fields[i]
        if op == "alias":
            what, how, spelled = draw(st.sampled_from(_spellings(f)))
            setattr(f, what, spelled)
            return f"alias {what} {how}"
        if op == "duplicate":
            fields.insert(draw(st.integers(0, len(fields))), f.copy())
        elif op == "drop":
            fields.pop(i)
        else:
            f.tag = w.varint((f.number << 3) | draw(st.sampled_from([t for t in (0, 1, 2, 3, 4, 5) if t != f.wire])))
        return op
    if op == "inject external data":
        target = draw(st.sampled_from(("a tensor", "new initializer", "new attribute")))
        if target == "a tensor":
            fields, _ = pick(draw, tree, (TENSOR,))
            if fields is not None:
                fields += external_fields(draw)
                return f"{op} into {target}"
        tensor = w.of(numpy_helper.from_array(np.zeros(4, np.float32), "injected")) + external_fields(draw)
        if target == "new attribute":
            fields, _ = pick(draw, tree, ("onnx.NodeProto",))
            if fields is not None:
                attr = [w.string(1, "value"), w.integer(20, 4), w.message(5, tensor, kind=TENSOR)]
                fields.append(w.message(5, attr, kind="onnx.AttributeProto"))
                return f"{op} into {target}"
        fields, _ = pick(draw, tree, ("onnx.GraphProto",))
        fields.append(w.message(5, tensor, kind=TENSOR))
        return f"{op} into new initializer"
    if op == "inject domain":
        fields, kind = pick(draw, tree, ("onnx.NodeProto", "onnx.OperatorSetIdProto"))
        if fields is None:
            return f"{op} (no node)"
        number = 7 if kind == "onnx.NodeProto" else 1
        f = w.string(number, draw(st.sampled_from(DOMAINS)))
        f.tag = spelled_tag(draw, number, w.LEN)
        fields.append(f)  # the last occurrence of a singular field wins in protobuf
        return f"{op} into {kind.removeprefix('onnx.')}"
    if op == "nest graphs":
        fields, _ = pick(draw, tree, ("onnx.NodeProto",))
        if fields is None:
            return f"{op} (no node)"
        depth = draw(st.sampled_from((0, 1, 2, 5, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 40)))
        attr = [w.string(1, "nested"), w.integer(20, 5), w.message(6, payload_graph(draw, depth), kind="onnx.GraphProto")]
        fields.append(w.message(5, attr, kind="onnx.AttributeProto"))
        return f"{op} (depth {depth})"
    if op == "add function":
        domain = draw(st.sampled_from(DOMAINS))
        default = w.of(numpy_helper.from_array(np.zeros(4, np.float32), "default"))
        if draw(st.booleans()):
            default += external_fields(draw)
        fn = w.of(helper.make_function(domain, "Injected", ["X"], ["Y"], [
            helper.make_node("Identity", ["X"], ["Y"], domain=draw(st.sampled_from(DOMAINS)))],
            [helper.make_opsetid("", bundles.OPSET)]))
        fn.append(w.message(11, [w.string(1, "t"), w.integer(20, 4), w.message(5, default, kind=TENSOR)],
                            kind="onnx.AttributeProto"))
        f = w.message(25, fn, kind="onnx.FunctionProto")
        f.tag = spelled_tag(draw, 25, w.LEN)
        tree.append(f)
        return op
    if op == "add training_info":
        info = [w.message(2, payload_graph(draw, draw(st.integers(0, 2))), kind="onnx.GraphProto")]
        f = w.message(20, info, kind="onnx.TrainingInfoProto")
        f.tag = spelled_tag(draw, 20, w.LEN)
        tree.append(f)
        return op
    raise AssertionError(op)


TREE_OPS = ("alias", "duplicate", "drop", "wire type", "inject external data", "inject domain", "nest graphs",
            "add function", "add training_info")
# the injections twice as often as the structural edits, most of which leave bytes no parser reads
OP_WEIGHTS = TREE_OPS + TREE_OPS[4:]


def test_sec1_differential_against_onnx_parsers(corpus):
    """Hypothesis mutations of the corpus: whenever either oracle parses the bytes and finds
    something forbidden, the reader refuses the file."""
    trees = {name: data for name, data in corpus}
    names = sorted(trees)
    tally, outcome, examples = Counter(), Counter(), [0]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data):
        draw = data.draw
        name = draw(st.sampled_from(names))
        tree = w.parse(trees[name], onnx.ModelProto.DESCRIPTOR)
        for op in draw(st.lists(st.sampled_from(OP_WEIGHTS), min_size=1, max_size=3)):
            tally[mutate(draw, tree, op)] += 1
        blob = w.encode(tree)
        cut = draw(st.sampled_from((None,) * 6 + ("truncate", "overwrite")))
        if cut == "truncate" and blob:
            blob = blob[:draw(st.integers(0, len(blob) - 1))]
        elif cut == "overwrite" and blob:
            buf = bytearray(blob)
            for _ in range(draw(st.integers(1, 4))):
                buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
            blob = bytes(buf)
        if cut:
            tally[cut] += 1
        py, (cpp, cpp_state) = python_view(blob), cpp_view(blob)
        found = {f"python: {x}" for x in (findings(py) if py is not None else ())}
        found |= {f"c++: {x}" for x in (findings(cpp) if cpp is not None else ())}
        refused = refuses(blob)
        examples[0] += 1
        outcome["reader refused" if refused else "reader accepted"] += 1
        outcome[f"python {'parsed' if py is not None else 'refused'}, c++ {cpp_state}"] += 1
        if found:
            outcome["forbidden per an oracle"] += 1
            if py is None:
                outcome["forbidden per c++ only (upb refused the bytes)"] += 1
        assert not (found and not refused), f"{name}: the oracles found {sorted(found)}; the reader accepted it"
        disagree = (py is None) != (cpp_state == "unparseable")
        assert not (disagree and not refused), f"{name}: upb {'refused' if py is None else 'parsed'} the bytes, " \
                                               f"protobuf C++ {cpp_state}; the reader accepted them"
        if not refused and cpp_state == "identity":
            assert py == cpp, f"{name}: the reader accepted bytes that upb and protobuf C++ read differently"
            outcome["accepted, both parsers read the same model"] += 1

    run()
    assert examples[0] >= EXAMPLES // 2, examples  # hypothesis ran about as many as asked
    assert outcome["forbidden per an oracle"] > examples[0] // 5, outcome  # the mutations do reach forbidden states
    assert outcome["reader accepted"] > examples[0] // 20, outcome  # and clean ones
    record("sec1_onnx_differential", corpus_files=len(corpus), mutated_models=examples[0],
           mutations=dict(sorted(tally.items())), outcomes=dict(sorted(outcome.items())))
