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
  included, whatever they point at).
* **Operators outside onnxruntime's built-in domains** (a custom op from `evil.ops`): they need a
  custom-op library, i.e. native code. The service never registers one; refusing them here gives
  a clear error instead of onnxruntime's.

This is a small protobuf reader over the ONNX schema's field numbers (onnx.proto3), not a parser:
it walks graphs, nested subgraphs (If/Loop bodies), attributes, sparse tensors and local functions,
and skips tensor payloads by length. It needs neither `onnx` nor any copy of the model.
"""

from __future__ import annotations

from fusion.errors import BundleError

# operator domains implemented inside onnxruntime itself; "" and "ai.onnx" are the default domain
BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
MAX_DEPTH = 32  # nested subgraphs deeper than this are refused (no real model comes close)

# field numbers from onnx.proto3
MODEL_GRAPH, MODEL_OPSET, MODEL_FUNCTIONS = 7, 8, 25
OPSET_DOMAIN = 1
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE, NODE_DOMAIN = 5, 7
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE, ATTR_SPARSES = 5, 6, 10, 11, 22, 23
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
SPARSE_VALUES, SPARSE_INDICES = 1, 2
FUNCTION_NODE, FUNCTION_OPSET, FUNCTION_DOMAIN = 7, 9, 10
EXTERNAL = 1


class UnsafeModelError(BundleError):
    """An ONNX file the service will not load: external data, a non-builtin operator domain, or not ONNX."""


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Malformed("truncated or overlong varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) for each field of one message; values of wire type 2 are memoryviews."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise _Malformed(f"wire type {wire}")
        if i > n:
            raise _Malformed("truncated message")
        yield number, wire, value


def _text(value) -> str:
    return bytes(value).decode("utf-8", "replace")


class _Walker:
    def __init__(self, local_domains: set[str]):
        self.allowed = BUILTIN_DOMAINS | local_domains

    def domain(self, value, where: str) -> None:
        d = _text(value)
        if d not in self.allowed:
            raise UnsafeModelError(
                f"uses operator domain '{d:.80}' ({where}), which onnxruntime does not implement itself "
                f"(a custom-op library would be native code); expected one of {sorted(self.allowed)}"
            )

    def tensor(self, buf, depth: int) -> None:
        name = ""
        for number, wire, value in _fields(buf):
            if number == TENSOR_NAME and wire == 2:
                name = _text(value)
            elif number == TENSOR_EXTERNAL_DATA or (number == TENSOR_DATA_LOCATION and wire == 0 and value == EXTERNAL):
                raise UnsafeModelError(
                    f"tensor '{name:.80}' keeps its data in an external file; the service loads only "
                    f"self-contained ONNX files (external files are not covered by the manifest's digests)"
                )

    def sparse(self, buf, depth: int) -> None:
        for number, wire, value in _fields(buf):
            if number in (SPARSE_VALUES, SPARSE_INDICES) and wire == 2:
                self.tensor(value, depth)

    def graph(self, buf, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise UnsafeModelError(f"subgraphs nested deeper than {MAX_DEPTH} levels")
        for number, wire, value in _fields(buf):
            if wire != 2:
                continue
            if number == GRAPH_NODE:
                self.node(value, depth)
            elif number == GRAPH_INITIALIZER:
                self.tensor(value, depth)
            elif number == GRAPH_SPARSE_INITIALIZER:
                self.sparse(value, depth)

    def node(self, buf, depth: int) -> None:
        for number, wire, value in _fields(buf):
            if wire != 2:
                continue
            if number == NODE_DOMAIN:
                self.domain(value, "a node")
            elif number == NODE_ATTRIBUTE:
                self.attribute(value, depth)

    def attribute(self, buf, depth: int) -> None:
        for number, wire, value in _fields(buf):
            if wire != 2:
                continue
            if number in (ATTR_T, ATTR_TENSORS):
                self.tensor(value, depth)
            elif number in (ATTR_G, ATTR_GRAPHS):
                self.graph(value, depth + 1)
            elif number in (ATTR_SPARSE, ATTR_SPARSES):
                self.sparse(value, depth)

    def function(self, buf, depth: int) -> None:
        for number, wire, value in _fields(buf):
            if wire != 2:
                continue
            if number == FUNCTION_NODE:
                self.node(value, depth + 1)
            elif number == FUNCTION_OPSET:
                self.opset(value, "a local function's opset_import")

    def opset(self, buf, where: str) -> None:
        for number, wire, value in _fields(buf):
            if number == OPSET_DOMAIN and wire == 2:
                self.domain(value, where)


def check_model(data: bytes, file: str) -> None:
    """Raise UnsafeModelError (naming `file`) unless `data` is a self-contained ONNX model whose
    operators all come from onnxruntime's built-in domains (or from functions the model defines)."""
    buf = memoryview(data)
    try:
        # local functions (FunctionProto) are plain ONNX, inlined by onnxruntime: their domains are allowed
        top = list(_fields(buf))
        local = set()
        for number, wire, value in top:
            if number == MODEL_FUNCTIONS and wire == 2:
                local |= {_text(v) for n, w, v in _fields(value) if n == FUNCTION_DOMAIN and w == 2}
        walker = _Walker(local)
        graphs = 0
        for number, wire, value in top:
            if wire != 2:
                continue
            if number == MODEL_GRAPH:
                graphs += 1
                walker.graph(value, 0)
            elif number == MODEL_OPSET:
                walker.opset(value, "the model's opset_import")
            elif number == MODEL_FUNCTIONS:
                walker.function(value, 0)
        if graphs != 1:
            raise _Malformed(f"{graphs} graphs")
    except UnsafeModelError as exc:
        raise UnsafeModelError(f"{file}: {exc}") from None
    except (_Malformed, IndexError) as exc:
        raise UnsafeModelError(f"{file}: not an ONNX model (malformed protobuf: {exc})") from None
