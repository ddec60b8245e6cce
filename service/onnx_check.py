"""Refuse ONNX files that could read other files or need code from outside onnxruntime, before
onnxruntime parses them.

A bundle's ONNX files are verified against the manifest's digests, but the manifest comes with the
files: whoever can write one can write the other. Two things in an ONNX file reach beyond its own
verified bytes:

* **External data**: a tensor whose values live in another file (`data_location = EXTERNAL`). The
  service parses models from bytes, so onnxruntime resolves such a path against the process's
  working directory, not the bundle (seen with onnxruntime 1.32: a model loaded from bytes read
  `secret.bin` from the server's cwd), and that file is covered by no digest. `fusion build` writes
  single-file models, so any external reference is refused (`../`, absolute paths and links
  included, whatever they point at), wherever a TensorProto can sit: initializers, sparse
  initializers, node and function attributes (and their defaults), subgraphs, training graphs.
* **Operators outside onnxruntime's built-in domains** (a custom op from `evil.ops`): they need a
  custom-op library, i.e. native code. The service never registers one; refusing them here gives
  a clear error instead of onnxruntime's.

This is a small protobuf reader over the ONNX schema (`SCHEMA`: every message and field number of
onnx.proto, onnx 1.23; tests/reliability/test_onnx_differential.py checks it against the installed
`onnx`), not a general parser, and it needs neither `onnx` nor any copy of the model. Its one rule
is that it must never read a byte run as a different field than onnxruntime's protobuf does
(issue 13: a tag written as 5 bytes with bit 32 set was "unknown" here, while protobuf C++ keeps the
low 32 bits and read it as a tensor's external-data field). So it reads *every* message of the file
against the schema and refuses, rather than interprets, anything a protobuf writer never produces
and parsers may read differently:

* tags longer than 5 bytes or above 32 bits, field number 0, wire types other than 0, 1, 2, 5
  (groups 3/4 included), and over-long varints anywhere (zero-padded: `0x81 0x80 0x00` for 1),
  varints over 10 bytes or 64 bits, lengths over 2^31 - 1 or past the end of their message;
* a field the schema does not define, or a known field with another wire type than its own
  (protobuf keeps those as unknown fields; a newer onnxruntime might not);
* messages nested deeper than protobuf's own recursion limit (100), subgraphs deeper than 32;
* a `data_location` other than 0 (protobuf reads an enum's low 32 bits: 2^32 + 1 is EXTERNAL);
* bytes that onnxruntime would not read as protobuf at all: `InferenceSession(bytes)` takes any
  buffer with the flatbuffers identifier `ORTM` at offset 4 for an ORT-format model (a protobuf
  string can put it there).

Packed numeric payloads and bytes (`raw_data`, strings) are data: skipped by their length.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusion.errors import BundleError

# operator domains implemented inside onnxruntime itself; "" and "ai.onnx" are the default domain
BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
MAX_DEPTH = 32  # nested subgraphs deeper than this are refused (no real model comes close)
MAX_NESTING = 100  # messages inside messages: protobuf's default recursion limit (deeper fails to parse there)

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types; 3 and 4 (groups) are not used by ONNX and refused
MAX_TAG = (1 << 32) - 1  # protobuf C++ reads tags as 32 bits (ReadTag); upb refuses more
MAX_SIZE = (1 << 31) - 1  # protobuf's ReadSize refuses lengths of 2 GiB and more
MAX_VARINT = (1 << 64) - 1
EXTERNAL_DATA, DATA_LOCATION, TENSOR_NAME, DEFAULT_LOCATION = 13, 14, 8, 0  # TensorProto


@dataclass(frozen=True)
class Field:
    """One field of the schema: its name in onnx.proto, what it holds ("varint", "i64", "i32",
    "len" for strings and bytes, or the name of a message in SCHEMA), and whether it repeats."""

    name: str
    kind: str
    repeated: bool = False


def _f(name: str, kind: str) -> Field:
    return Field(name, kind)


def _r(name: str, kind: str) -> Field:
    return Field(name, kind, True)


# every message reachable from ModelProto, with its field numbers (onnx.proto, onnx 1.23)
SCHEMA: dict[str, dict[int, Field]] = {
    "ModelProto": {
        1: _f("ir_version", "varint"), 8: _r("opset_import", "OperatorSetIdProto"), 2: _f("producer_name", "len"),
        3: _f("producer_version", "len"), 4: _f("domain", "len"), 5: _f("model_version", "varint"),
        6: _f("doc_string", "len"), 7: _f("graph", "GraphProto"), 14: _r("metadata_props", "StringStringEntryProto"),
        20: _r("training_info", "TrainingInfoProto"), 25: _r("functions", "FunctionProto"),
        26: _r("configuration", "DeviceConfigurationProto"),
    },
    "OperatorSetIdProto": {1: _f("domain", "len"), 2: _f("version", "varint")},
    "GraphProto": {
        1: _r("node", "NodeProto"), 2: _f("name", "len"), 5: _r("initializer", "TensorProto"),
        15: _r("sparse_initializer", "SparseTensorProto"), 10: _f("doc_string", "len"),
        11: _r("input", "ValueInfoProto"), 12: _r("output", "ValueInfoProto"), 13: _r("value_info", "ValueInfoProto"),
        14: _r("quantization_annotation", "TensorAnnotation"), 16: _r("metadata_props", "StringStringEntryProto"),
    },
    "StringStringEntryProto": {1: _f("key", "len"), 2: _f("value", "len")},
    "TrainingInfoProto": {
        1: _f("initialization", "GraphProto"), 2: _f("algorithm", "GraphProto"),
        3: _r("initialization_binding", "StringStringEntryProto"), 4: _r("update_binding", "StringStringEntryProto"),
    },
    "FunctionProto": {
        1: _f("name", "len"), 4: _r("input", "len"), 5: _r("output", "len"), 6: _r("attribute", "len"),
        11: _r("attribute_proto", "AttributeProto"), 7: _r("node", "NodeProto"), 8: _f("doc_string", "len"),
        9: _r("opset_import", "OperatorSetIdProto"), 10: _f("domain", "len"), 13: _f("overload", "len"),
        12: _r("value_info", "ValueInfoProto"), 14: _r("metadata_props", "StringStringEntryProto"),
    },
    "DeviceConfigurationProto": {1: _f("name", "len"), 2: _f("num_devices", "varint"), 3: _r("device", "len")},
    "NodeProto": {
        1: _r("input", "len"), 2: _r("output", "len"), 3: _f("name", "len"), 4: _f("op_type", "len"),
        7: _f("domain", "len"), 8: _f("overload", "len"), 5: _r("attribute", "AttributeProto"),
        6: _f("doc_string", "len"), 9: _r("metadata_props", "StringStringEntryProto"),
        10: _r("device_configurations", "NodeDeviceConfigurationProto"),
    },
    "TensorProto": {
        1: _r("dims", "varint"), 2: _f("data_type", "varint"), 3: _f("segment", "TensorProto.Segment"),
        4: _r("float_data", "i32"), 5: _r("int32_data", "varint"), 6: _r("string_data", "len"),
        7: _r("int64_data", "varint"), 8: _f("name", "len"), 12: _f("doc_string", "len"), 9: _f("raw_data", "len"),
        13: _r("external_data", "StringStringEntryProto"), 14: _f("data_location", "varint"),
        10: _r("double_data", "i64"), 11: _r("uint64_data", "varint"), 16: _r("metadata_props", "StringStringEntryProto"),
    },
    "TensorProto.Segment": {1: _f("begin", "varint"), 2: _f("end", "varint")},
    "SparseTensorProto": {1: _f("values", "TensorProto"), 2: _f("indices", "TensorProto"), 3: _r("dims", "varint")},
    "ValueInfoProto": {
        1: _f("name", "len"), 2: _f("type", "TypeProto"), 3: _f("doc_string", "len"),
        4: _r("metadata_props", "StringStringEntryProto"),
    },
    "TensorAnnotation": {1: _f("tensor_name", "len"), 2: _r("quant_parameter_tensor_names", "StringStringEntryProto")},
    "AttributeProto": {
        1: _f("name", "len"), 21: _f("ref_attr_name", "len"), 13: _f("doc_string", "len"), 20: _f("type", "varint"),
        2: _f("f", "i32"), 3: _f("i", "varint"), 4: _f("s", "len"), 5: _f("t", "TensorProto"), 6: _f("g", "GraphProto"),
        22: _f("sparse_tensor", "SparseTensorProto"), 14: _f("tp", "TypeProto"), 7: _r("floats", "i32"),
        8: _r("ints", "varint"), 9: _r("strings", "len"), 10: _r("tensors", "TensorProto"), 11: _r("graphs", "GraphProto"),
        23: _r("sparse_tensors", "SparseTensorProto"), 15: _r("type_protos", "TypeProto"),
    },
    "NodeDeviceConfigurationProto": {
        1: _f("configuration_id", "len"), 2: _r("sharding_spec", "ShardingSpecProto"), 3: _f("pipeline_stage", "varint"),
    },
    "TypeProto": {
        1: _f("tensor_type", "TypeProto.Tensor"), 4: _f("sequence_type", "TypeProto.Sequence"),
        5: _f("map_type", "TypeProto.Map"), 9: _f("optional_type", "TypeProto.Optional"),
        8: _f("sparse_tensor_type", "TypeProto.SparseTensor"), 7: _f("opaque_type", "TypeProto.Opaque"),
        6: _f("denotation", "len"),
    },
    "ShardingSpecProto": {
        1: _f("tensor_name", "len"), 2: _r("device", "varint"), 3: _r("index_to_device_group_map", "IntIntListEntryProto"),
        4: _r("sharded_dim", "ShardedDimProto"),
    },
    "TypeProto.Tensor": {1: _f("elem_type", "varint"), 2: _f("shape", "TensorShapeProto")},
    "TypeProto.Sequence": {1: _f("elem_type", "TypeProto")},
    "TypeProto.Map": {1: _f("key_type", "varint"), 2: _f("value_type", "TypeProto")},
    "TypeProto.Optional": {1: _f("elem_type", "TypeProto")},
    "TypeProto.SparseTensor": {1: _f("elem_type", "varint"), 2: _f("shape", "TensorShapeProto")},
    "TypeProto.Opaque": {1: _f("domain", "len"), 2: _f("name", "len")},
    "IntIntListEntryProto": {1: _f("key", "varint"), 2: _r("value", "varint")},
    "ShardedDimProto": {1: _f("axis", "varint"), 2: _r("simple_sharding", "SimpleShardedDimProto")},
    "TensorShapeProto": {1: _r("dim", "TensorShapeProto.Dimension")},
    "SimpleShardedDimProto": {1: _f("dim_value", "varint"), 2: _f("dim_param", "len"), 3: _f("num_shards", "varint")},
    "TensorShapeProto.Dimension": {1: _f("dim_value", "varint"), 2: _f("dim_param", "len"), 3: _f("denotation", "len")},
}
WIRE = {"varint": VARINT, "i64": I64, "i32": I32, "len": LEN}  # any message kind: LEN
# operator domains the reader decides on: NodeProto.domain, OperatorSetIdProto.domain (model and function opset imports)
DOMAIN_FIELDS = {("NodeProto", 7): "a node", ("OperatorSetIdProto", 1): "an opset_import"}
MODEL_GRAPH, MODEL_FUNCTIONS, FUNCTION_DOMAIN = 7, 25, 10
ORT_FORMAT_ID = b"ORTM"  # onnxruntime's ORT-format file identifier, at bytes 4..8 (flatbuffers' convention)


class UnsafeModelError(BundleError):
    """An ONNX file the service will not load: external data, a non-builtin operator domain, or not ONNX."""


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, i: int, what: str, max_bytes: int, max_value: int) -> tuple[int, int]:
    """The varint at buf[i] as protobuf writes it (at most `max_bytes` bytes, at most `max_value`,
    no zero padding): (value, next index). Any other spelling of a number is refused, not read."""
    start, n = i, len(buf)
    value = shift = 0
    while True:
        if i >= n:
            raise _Malformed(f"truncated {what}")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if i - start >= max_bytes:
            raise _Malformed(f"{what} longer than {max_bytes} bytes")
    if b == 0 and i - start > 1:
        raise _Malformed(f"over-long {what}: {i - start} bytes for the value {value} (zero padding)")
    if value > max_value:
        raise _Malformed(f"{what} {value:#x} above {max_value:#x} (protobuf would keep only the low bits)")
    return value, i


def _fields(buf: memoryview):
    """(field number, wire type, value) for each field of one message: an int for varints, a
    memoryview for length-delimited values, None for fixed-size ones (skipped)."""
    i, n = 0, len(buf)
    while i < n:
        key = buf[i]
        if key < 0x80:
            i += 1
        else:
            key, i = _varint(buf, i, "tag", 5, MAX_TAG)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == VARINT:
            value, i = _varint(buf, i, f"varint (field {number})", 10, MAX_VARINT)
        elif wire == LEN:
            size, i = _varint(buf, i, f"length (field {number})", 5, MAX_SIZE)
            if size > n - i:
                raise _Malformed(f"field {number}: length {size} past the end of its message ({n - i} bytes left)")
            value, i = buf[i:i + size], i + size
        elif wire in (I64, I32):
            value, i = None, i + (8 if wire == I64 else 4)
            if i > n:
                raise _Malformed(f"truncated fixed-size field {number}")
        else:
            raise _Malformed(f"wire type {wire} (field {number}); ONNX uses 0, 1, 2 and 5 only")
        yield number, wire, value


def _text(value) -> str:
    return bytes(value).decode("utf-8", "replace")


class _Reader:
    """Reads every message of a model against SCHEMA, deciding on external data and domains."""

    def __init__(self, local_domains: set[bytes]):
        self.allowed = {d.encode() for d in BUILTIN_DOMAINS} | local_domains  # raw bytes: no decoding ambiguity

    def domain(self, value, where: str) -> None:
        if bytes(value) not in self.allowed:
            allowed = sorted(_text(d) for d in self.allowed)
            raise UnsafeModelError(
                f"uses operator domain '{_text(value):.80}' ({where}), which onnxruntime does not implement itself "
                f"(a custom-op library would be native code); expected one of {allowed}"
            )

    def message(self, buf: memoryview, kind: str, nesting: int = 0, graphs: int = 0) -> None:
        """Check one message of type `kind`; `graphs`: how many GraphProtos enclose it."""
        if nesting > MAX_NESTING:
            raise UnsafeModelError(f"messages nested deeper than {MAX_NESTING} levels (protobuf's own limit)")
        if kind == "GraphProto":
            if graphs > MAX_DEPTH:
                raise UnsafeModelError(f"subgraphs nested deeper than {MAX_DEPTH} levels")
            graphs += 1
        schema = SCHEMA[kind]
        name, external = "", []
        for number, wire, value in _fields(buf):
            field = schema.get(number)
            if field is None:
                raise UnsafeModelError(
                    f"field {number} (wire type {wire}) of a {kind} is not in the ONNX schema this check reads "
                    f"(onnx.proto, onnx 1.23); a file is refused rather than read in part"
                )
            expected = WIRE.get(field.kind, LEN)
            if wire != expected and not (wire == LEN and field.repeated and field.kind in ("varint", "i32", "i64")):
                raise _Malformed(f"{kind}.{field.name} (field {number}) with wire type {wire}; expected {expected}")
            if field.kind in SCHEMA:
                self.message(value, field.kind, nesting + 1, graphs)
            elif (kind, number) in DOMAIN_FIELDS:
                self.domain(value, DOMAIN_FIELDS[kind, number])
            if kind == "TensorProto":
                if number == TENSOR_NAME:
                    name = _text(value)
                elif number == EXTERNAL_DATA and "external_data" not in external:
                    external.append("external_data")
                elif number == DATA_LOCATION and value != DEFAULT_LOCATION:
                    external.append(f"data_location {value}")  # EXTERNAL is 1; protobuf reads the low 32 bits
        if external:
            raise UnsafeModelError(
                f"tensor '{name:.80}' keeps its data in an external file ({', '.join(external)}); the service loads only "
                f"self-contained ONNX files (external files are not covered by the manifest's digests)"
            )


def check_model(data: bytes, file: str) -> None:
    """Raise UnsafeModelError (naming `file`) unless `data` is a self-contained ONNX model whose
    operators all come from onnxruntime's built-in domains (or from functions the model defines),
    written as protobuf writes it."""
    buf = memoryview(data)
    if bytes(buf[4:8]) == ORT_FORMAT_ID:
        raise UnsafeModelError(f"{file}: bytes 4..8 are '{ORT_FORMAT_ID.decode()}': onnxruntime would read the file "
                               f"as an ORT-format (flatbuffers) model, not as the ONNX protobuf this check reads")
    try:
        # local functions (FunctionProto) are plain ONNX, inlined by onnxruntime: their domains are allowed
        local, graphs = set(), 0
        for number, wire, value in _fields(buf):
            if number == MODEL_GRAPH:
                graphs += 1
            elif number == MODEL_FUNCTIONS and wire == LEN:
                local |= {bytes(v) for n, w, v in _fields(value) if n == FUNCTION_DOMAIN and w == LEN}
        if graphs != 1:
            raise _Malformed(f"{graphs} graphs; a model has exactly one")
        _Reader(local).message(buf, "ModelProto")
    except UnsafeModelError as exc:
        raise UnsafeModelError(f"{file}: {exc}") from None
    except (_Malformed, IndexError) as exc:
        raise UnsafeModelError(f"{file}: not an ONNX model as protobuf writes it (malformed protobuf: {exc})") from None
