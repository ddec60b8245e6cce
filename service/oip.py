"""Open Inference Protocol (KServe v2 / Triton) REST: JSON tensors and the binary-data extension.

Request body: JSON `{"id"?, "inputs": [{"name", "shape", "datatype", "data" | parameters.binary_data_size}],
"outputs"?: [{"name", "parameters"?: {"binary_data": bool}}]}`; with the binary extension the JSON
header's length is in the `Inference-Header-Content-Length` HTTP header and raw little-endian
tensors follow it in input order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import orjson

from fusion.errors import InputError
from service import payload
from service.inputs import OIP_DATATYPE

HEADER_LENGTH = "inference-header-content-length"
DTYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
}
OUTPUT_PROBS = "probabilities"
OUTPUT_LABEL = "label"


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    X: np.ndarray  # (B, F) float32
    outputs: dict[str, bool]  # requested output -> binary; empty: all outputs as JSON
    binary_default: bool
    parameters: dict


def parse(body: bytes, header_length: str | None, n_features: int, max_rows: int) -> InferRequest:
    """An inference request body -> InferRequest. Every field is type-checked: a malformed request is
    an InputError (400) naming the field, never another exception (a 500)."""
    head, binary = _split(body, header_length)
    payload.check_value_count(head, max_rows * n_features, f"{max_rows} rows (FUSION_MAX_ROWS) of {n_features} features")
    req = payload.parse_json(head)
    if not isinstance(req, dict):
        raise InputError(f"expected an inference request object; got {_kind(req)}")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        if not isinstance(inputs, list):
            got = _kind(inputs)
        else:
            got = f"a list of {len(inputs)}" if len(inputs) != 1 else f"a list holding {_kind(inputs[0])}"
        raise InputError(f"expected 'inputs' to be a list with one tensor object (FP32 [batch, {n_features}]); got {got}")
    maybe_booleans = b"true" in head or b"false" in head  # booleans need a walk of 'data' only if the text has some
    X, used = _tensor(inputs[0], binary, n_features, max_rows, maybe_booleans)
    if used != len(binary):
        raise InputError(f"expected {used} bytes of binary tensor data after the JSON header; got {len(binary)}")
    return _request(req, X)


def _kind(v) -> str:
    return "null" if v is None else "boolean" if isinstance(v, bool) else type(v).__name__


def _parameters(obj: dict, where: str) -> dict:
    """`obj["parameters"]`: an object, or {} when absent."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InputError(f"expected 'parameters' of {where} to be an object; got {_kind(params)}")
    return params


def _flag(params: dict, name: str, where: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise InputError(f"expected parameter '{name}' of {where} to be true or false; got {_kind(value)}")
    return value


def _tensor(t: dict, binary: memoryview, n_features: int, max_rows: int, maybe_booleans: bool = True) -> tuple[np.ndarray, int]:
    name, shape, dtype = t.get("name", "input"), t.get("shape"), t.get("datatype")
    if not isinstance(name, str):
        raise InputError(f"expected the input tensor's 'name' to be a string; got {_kind(name)}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InputError(f"expected datatype one of {sorted(DTYPES)}; got {dtype!r:.40}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputError(f"expected shape [batch, {n_features}]; got {shape!r:.60}")
    if shape[1] != n_features:
        raise InputError(f"expected {n_features} features per row (shape [batch, {n_features}]); got shape {shape}")
    if shape[0] < 1 or shape[0] > max_rows:
        raise InputError(f"expected between 1 and {max_rows} rows; got shape {shape}")
    n = shape[0] * shape[1]
    size = _parameters(t, f"input '{name}'").get("binary_data_size")
    if size is not None:
        nbytes = n * np.dtype(DTYPES[dtype]).itemsize
        if not isinstance(size, int) or isinstance(size, bool) or size != nbytes or len(binary) < nbytes:
            raise InputError(f"expected {nbytes} bytes for {dtype} {shape}; got binary_data_size {size!r:.40} and {len(binary)} bytes")
        X = np.frombuffer(binary[:nbytes], dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).reshape(shape)
        return payload.finite_float32(X, name), nbytes
    data = t.get("data")
    if not isinstance(data, list):
        raise InputError(f"expected 'data' (a flat or nested list of {n} numbers) or binary data; got {_kind(data)}")
    # the length first: numpy never walks more than the shape allows (a 4M-number 'data' for shape [1, 64])
    flat = len(data) == n and not (data and isinstance(data[0], list))
    if not flat and not (len(data) == shape[0] and all(type(r) is list and len(r) == shape[1] for r in data)):
        raise InputError(f"expected {n} numbers in 'data' for shape {shape} (flat, or {shape[0]} lists of {shape[1]}); "
                         f"got a list of {len(data)}")
    if maybe_booleans:
        _refuse_booleans(data, name, dtype)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise InputError(f"expected 'data' as a flat or regularly nested list of {n} numbers; got irregular lists") from None
    if arr.dtype.kind not in "iuf" or arr.size != n:
        what = "numbers" if arr.dtype.kind in "iuf" else {"U": "strings", "S": "byte strings", "b": "booleans",
                                                           "c": "complex numbers"}.get(arr.dtype.kind, "values that are not all numbers")
        raise InputError(f"expected {n} numbers in 'data' for shape {shape}; got {arr.size} {what}")
    return payload.finite_float32(arr.reshape(shape), name), 0


def parse_named(body: bytes, header_length: str | None, named, limits) -> InferRequest:
    """An inference request for a bundle with named inputs (service/inputs.py): one tensor per input, by
    name; encoded images and strings as BYTES (JSON: strings, images base64; binary: each element
    4-byte little-endian length-prefixed, images raw). `X` is the graph's feeds."""
    head, binary = _split(body, header_length)
    per_row = named.values_per_row()
    if per_row is not None:
        payload.check_value_count(head, limits.max_rows * per_row, f"{limits.max_rows} rows (FUSION_MAX_ROWS) of the bundle's inputs")
    req = payload.parse_json(head)
    if not isinstance(req, dict):
        raise InputError(f"expected an inference request object; got {_kind(req)}")
    tensors = req.get("inputs")
    expected = ", ".join(f"{t['name']} ({t['datatype']} {t['shape']})" for t in named.oip_metadata())
    if not isinstance(tensors, list) or not tensors or not all(isinstance(t, dict) for t in tensors):
        raise InputError(f"expected 'inputs' to be a list of tensor objects: {expected}; got {_kind(tensors)}")
    values, offset = {}, 0
    for k, t in enumerate(tensors):
        name = t.get("name")
        if not isinstance(name, str) or name not in named.specs:
            raise InputError(f"inputs[{k}]: unknown input {name!r:.60}; expected the inputs {expected}")
        if name in values:
            raise InputError(f"inputs[{k}]: input '{name}' given twice; expected each of {expected} once")
        values[name], used = _named_tensor(t, name, named.specs[name], binary[offset:], limits.max_rows, len(body))
        offset += used
    if offset != len(binary):
        raise InputError(f"expected {offset} bytes of binary tensor data after the JSON header; got {len(binary)}")
    feeds = named.convert(values, limits)
    return _request(req, feeds)


def _named_tensor(t: dict, name: str, spec, binary: memoryview, max_rows: int, body_bytes: int):
    """One named input tensor -> (the value service/inputs.py converts: a list of str/bytes or an array,
    bytes of binary data used)."""
    shape, dtype = t.get("shape"), t.get("datatype")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputError(f"input '{name}': expected 'shape' a list of non-negative integers; got {shape!r:.60}")
    # Python ints, never numpy's int64 product (it wraps: [1, 2**32, 2**32] gave 0 and a 500 at the reshape).
    # Every element takes at least one byte of the body (a JSON number a character, a binary element its
    # bytes), so neither the count nor any one dimension can exceed the body's size in a real request.
    n = math.prod(shape)
    if n > body_bytes or max(shape) > body_bytes:
        raise InputError(f"input '{name}': expected a shape whose dimensions and element count fit this {body_bytes}-byte "
                         f"request (every element takes at least one byte); got shape {shape} ({n} elements)")
    if not 1 <= shape[0] <= max_rows:
        raise InputError(f"input '{name}': expected between 1 and {max_rows} rows; got shape {shape}")
    size = _parameters(t, f"input '{name}'").get("binary_data_size")
    if spec.kind in ("image", "text") and dtype == "BYTES":
        if len(shape) != 1 and not (len(shape) == 2 and shape[1] == 1):
            raise InputError(f"input '{name}': expected BYTES of shape [batch] (one {spec.kind} per row); got {shape}")
        if size is not None:
            return _bytes_elements(binary, size, n, name), size
        data = t.get("data")
        if not isinstance(data, list) or len(data) != n or not all(isinstance(v, str) for v in data):
            raise InputError(f"input '{name}': expected 'data' a list of {n} strings (BYTES {shape}); got {_kind(data)}")
        return data, 0
    if spec.kind == "text":
        raise InputError(f"input '{name}': expected datatype BYTES (strings); got {dtype!r:.40}")
    allowed = ("UINT8", "FP32") if spec.kind == "image" else (OIP_DATATYPE[spec.dtype],)
    if dtype not in allowed:
        want = "BYTES (encoded PNG/JPEG), UINT8 or FP32 pixels" if spec.kind == "image" else allowed[0]
        raise InputError(f"input '{name}': expected datatype {want}; got {dtype!r:.40}")
    np_dtype = np.dtype(np.bool_ if dtype == "BOOL" else DTYPES[dtype])
    if size is not None:
        nbytes = n * np_dtype.itemsize
        if not isinstance(size, int) or isinstance(size, bool) or size != nbytes or len(binary) < nbytes:
            raise InputError(f"input '{name}': expected {nbytes} bytes for {dtype} {shape}; got binary_data_size "
                             f"{size!r:.40} and {len(binary)} bytes")
        return np.frombuffer(binary[:nbytes], dtype=np_dtype.newbyteorder("<") if np_dtype.itemsize > 1 else np_dtype).reshape(shape), nbytes
    data = t.get("data")
    if not isinstance(data, list):
        raise InputError(f"input '{name}': expected 'data' (a flat or nested list of {n} values) or binary data; got {_kind(data)}")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise InputError(f"input '{name}': expected 'data' as a flat or regularly nested list of {n} values; got irregular lists") from None
    if arr.size != n:
        raise InputError(f"input '{name}': expected {n} values in 'data' for shape {shape}; got {arr.size}")
    if (dtype == "BOOL") != (arr.dtype.kind == "b") or (arr.dtype.kind not in "iufb"):
        raise InputError(f"input '{name}': expected 'data' of {dtype} values; got values of dtype {arr.dtype}")
    if dtype.startswith(("INT", "UINT")) and arr.dtype.kind == "f":
        raise InputError(f"input '{name}': expected integers ({dtype}); got floats")
    if dtype != "BOOL" and payload_has_boolean(data):
        raise InputError(f"input '{name}': expected {dtype} numbers; got a boolean among them")
    return arr.reshape(shape), 0


def payload_has_boolean(data: list) -> bool:
    return any(isinstance(v, bool) or (isinstance(v, list) and payload_has_boolean(v)) for v in data)


def _bytes_elements(binary: memoryview, size, n: int, name: str) -> list[bytes]:
    """BYTES in the binary extension: n elements, each a 4-byte little-endian length then its bytes."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > len(binary):
        raise InputError(f"input '{name}': expected binary_data_size within the {len(binary)} bytes after the header; got {size!r:.40}")
    out, pos, blob = [], 0, binary[:size]
    for i in range(n):
        if pos + 4 > size:
            raise InputError(f"input '{name}': expected {n} length-prefixed BYTES elements in {size} bytes; element {i} is cut short")
        length = int.from_bytes(blob[pos:pos + 4], "little")
        pos += 4
        if pos + length > size:
            raise InputError(f"input '{name}': element {i} declares {length} bytes; only {size - pos} remain")
        out.append(bytes(blob[pos:pos + length]))
        pos += length
    if pos != size:
        raise InputError(f"input '{name}': expected {n} BYTES elements filling binary_data_size {size}; {size - pos} bytes left over")
    return out


def _refuse_booleans(data: list, name: str, dtype: str) -> None:
    """numpy reads `true` as 1: refuse booleans among the numbers of a numeric datatype, as /predict does."""
    rows = data if data and isinstance(data[0], list) else [data]
    for i, r in enumerate(rows):
        if bool in set(map(type, r)):
            j = next(j for j, v in enumerate(r) if isinstance(v, bool))
            at = f"[{i}][{j}]" if rows is data else f"[{j}]"
            raise InputError(f"{name} data{at}: expected a number ({dtype}); got boolean {str(r[j]).lower()}")


def response(model: str, version: str, req: InferRequest, probs: np.ndarray, labels: list, extra: dict) -> tuple[bytes, dict]:
    """The body and extra headers of an inference response (JSON, or JSON header + binary tensors)."""
    tensors = {OUTPUT_PROBS: ("FP32", list(probs.shape), np.ascontiguousarray(probs, dtype=np.float32))}
    if labels is not None:  # class labels, as /predict's "predictions"
        if all(isinstance(y, int) and not isinstance(y, bool) for y in labels):
            tensors[OUTPUT_LABEL] = ("INT64", [len(labels)], np.asarray(labels, dtype=np.int64))
        else:
            tensors[OUTPUT_LABEL] = ("BYTES", [len(labels)], np.asarray([str(y) for y in labels], dtype=object))
    missing = sorted(set(req.outputs) - set(tensors))
    if missing:
        raise InputError(f"output {missing} is not produced by this model; expected some of {sorted(tensors)}")
    wanted = req.outputs or {name: req.binary_default for name in tensors}
    outs, blobs = [], []
    for name, binary in wanted.items():
        dtype, shape, arr = tensors[name]
        out = {"name": name, "datatype": dtype, "shape": shape}
        if binary and dtype == "BYTES":
            raise InputError("the binary-data extension is supported for numeric outputs; request 'label' as JSON")
        if binary:
            blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = arr.reshape(-1).tolist() if dtype == "BYTES" else arr.reshape(-1)
        outs.append(out)
    body = {"model_name": model, "model_version": version, "outputs": outs}
    if req.id is not None:
        body["id"] = req.id
    if extra:
        body["parameters"] = extra
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def metadata(model: str, version: str, n_features: int, classes: tuple, platform: str = "onnxruntime_onnx", *,
             inputs: list[dict] | None = None) -> dict:
    """`probabilities` (FP32 [batch, classes]; regression: the predictions) and, for classification,
    `label`: the class labels (INT64 for integer classes, BYTES otherwise), as /predict's predictions.
    `inputs`: a named-input bundle's tensors (service/inputs.Inputs.oip_metadata); None: the flat FP32 input."""
    outputs = [{"name": OUTPUT_PROBS, "datatype": "FP32", "shape": [-1, max(len(classes), 1)]}]
    if classes:
        ints = all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
        outputs.append({"name": OUTPUT_LABEL, "datatype": "INT64" if ints else "BYTES", "shape": [-1]})
    return {
        "name": model, "versions": [version], "platform": platform,
        "inputs": inputs if inputs is not None else [{"name": "input", "datatype": "FP32", "shape": [-1, n_features]}],
        "outputs": outputs,
    }


def _request(req: dict, inputs) -> InferRequest:
    """The rest of an infer request once its inputs are parsed: requested outputs, parameters and id."""
    requested = req.get("outputs")
    if requested is not None and not isinstance(requested, list):
        raise InputError(f"expected 'outputs' to be a list of {{\"name\": ...}} objects; got {_kind(requested)}")
    outputs = {}
    for k, o in enumerate(requested or []):
        if not isinstance(o, dict) or o.get("name") not in (OUTPUT_PROBS, OUTPUT_LABEL):
            raise InputError(f"expected requested outputs named '{OUTPUT_PROBS}' or '{OUTPUT_LABEL}'; got {o!r:.80}")
        outputs[o["name"]] = _flag(_parameters(o, f"outputs[{k}]"), "binary_data", f"outputs[{k}]")
    params = _parameters(req, "the request")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InputError(f"expected 'id' to be a string; got {_kind(rid)}")
    return InferRequest(rid, inputs, outputs, _flag(params, "binary_data_output", "the request"), params)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) of an infer body; the binary extension's header length, checked."""
    if header_length is None:
        return body, memoryview(b"")
    n = payload.ascii_int(header_length, "Inference-Header-Content-Length")
    if n > len(body):
        raise InputError(f"expected Inference-Header-Content-Length <= body size {len(body)}; got '{header_length}'")
    return body[:n], memoryview(body)[n:]
