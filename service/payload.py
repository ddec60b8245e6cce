"""Request bodies -> validated float32 batches. Every failure says what was expected and what was got.

One parser, one parse: orjson reads every body. It refuses what JSON does not allow (NaN, Infinity,
numbers beyond float64, lone surrogates, bytes that are not UTF-8), and its error says where; the
message names the token from that, rather than parsing the body a second time with a lenient parser
(the stdlib's took 4x orjson's time on large bodies, and let lone surrogates through to a 500 later).
Whatever `parse_json` returns can therefore be written back as JSON.

Before a batch body is parsed, its size in values is checked against what the endpoint can use
(`check_value_count`): orjson makes every value a Python object while holding the GIL, so 8 MiB of
`0,0,...` (4M values) held the event loop ~0.2-0.4 s even from a worker thread; the count is a
`bytes.count`, a few ms at 8 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from fusion.errors import InputError, PayloadTooLargeError

PREDICT_FIELDS = ("inputs", "variant", "routing_key")
VALUE_SLACK = 4096  # separators allowed beyond the batch's numbers: the other fields, OIP parameters and outputs


def parse_json(body: bytes):
    """Parse a JSON body once (orjson); NaN, ±Infinity and numbers beyond float64 are named, with where."""
    if not body:
        raise InputError("expected a JSON body; got an empty body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid_json(exc) from None


def _invalid_json(exc: orjson.JSONDecodeError) -> InputError:
    where = f"line {exc.lineno}, column {exc.colno}"
    doc, pos = exc.doc, exc.pos
    if isinstance(doc, str):
        for token in ("NaN", "Infinity"):
            if doc.startswith(token, pos):
                sign = "-" if pos > 0 and doc[pos - 1] == "-" else ""
                return InputError(f"expected a finite number (JSON has no NaN or Infinity); got {sign}{token} at {where}")
    if "infinity when parsed" in exc.msg:
        return InputError(f"expected a finite number; got one beyond float64 range at {where}")
    return InputError(f"expected a JSON body; got invalid JSON ({exc})")


def check_value_count(body: bytes, max_values: int, what: str) -> None:
    """413 before parsing when `body` (JSON) holds more values than `max_values` (+ VALUE_SLACK): every
    array element or object member but the first of each follows a comma, so commas + 1 bounds the
    values from below (a comma inside a string counts too: the slack covers ordinary text)."""
    commas = body.count(b",")
    if commas > max_values + VALUE_SLACK:
        raise PayloadTooLargeError(f"expected a body of at most {max_values} numbers ({what}); "
                                   f"got about {commas + 1} values, refused before parsing")


def ascii_int(text: str, what: str, max_digits: int = 18) -> int:
    """A non-negative integer in ASCII digits only, at most `max_digits` of them. `str.isdigit()` is
    true of '²' and other scripts' digits, which `int()` refuses or reads; `int()` also takes signs,
    spaces and '_', and refuses more than 4300 digits: none of that is a length."""
    if not (0 < len(text) <= max_digits and text.isascii() and text.isdigit()):
        raise InputError(f"expected {what} as a non-negative integer (at most {max_digits} ASCII digits); got '{text[:40]}'")
    return int(text)


@dataclass(frozen=True)
class PredictRequest:
    """A checked /predict body: the batch and the optional routing fields (None when absent or empty)."""

    X: np.ndarray  # (n, F) float32, finite; a bundle with named inputs: {graph input: array} (service/inputs.py)
    variant: str | None
    routing_key: str | None


def parse_predict(body: bytes, n_features: int, max_rows: int) -> PredictRequest:
    """A /predict body `{"inputs": [[...], ...], "variant"?, "routing_key"?}` -> PredictRequest."""
    check_value_count(body, max_rows * n_features, f"{max_rows} rows (FUSION_MAX_ROWS) of {n_features} features")
    data = parse_json(body)
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object like {{\"inputs\": [[...], ...]}}; got {_describe(data)}")
    unknown = sorted(set(data) - set(PREDICT_FIELDS))
    if unknown:
        raise InputError(f"unexpected fields {unknown}; expected 'inputs' and optionally 'variant', 'routing_key'")
    if "inputs" not in data:
        raise InputError("expected a field 'inputs' with a list of rows; got none")
    X = rows_to_array(data["inputs"], n_features, max_rows)
    if b"true" in body or b"false" in body:
        check_value_types(data["inputs"])
    for name in ("variant", "routing_key"):  # checked before any header fallback: 0, [] or false are not "absent"
        if data.get(name) is not None and not isinstance(data[name], str):
            raise InputError(f"expected '{name}' to be a string; got {_describe(data[name])}")
    return PredictRequest(X, data.get("variant") or None, data.get("routing_key") or None)


def parse_predict_named(body: bytes, named, limits) -> PredictRequest:
    """A /predict body for a bundle with named inputs (service/inputs.py): `{"inputs": {name: value, ...}}`,
    or the one input's value itself when the bundle has one input; `X` is then the graph's feeds."""
    per_row = named.values_per_row()
    if per_row is not None:  # dynamic dimensions: the body limit bounds what is parsed
        check_value_count(body, limits.max_rows * per_row, f"{limits.max_rows} rows (FUSION_MAX_ROWS) of the bundle's inputs")
    data = parse_json(body)
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object like {{\"inputs\": {{name: value, ...}}}}; got {_describe(data)}")
    unknown = sorted(set(data) - set(PREDICT_FIELDS))
    if unknown:
        raise InputError(f"unexpected fields {unknown}; expected 'inputs' and optionally 'variant', 'routing_key'")
    if "inputs" not in data:
        raise InputError("expected a field 'inputs' with the bundle's named inputs; got none")
    for name in ("variant", "routing_key"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise InputError(f"expected '{name}' to be a string; got {_describe(data[name])}")
    feeds = named.parse(data["inputs"], limits)
    return PredictRequest(feeds, data.get("variant") or None, data.get("routing_key") or None)


def _describe(v) -> str:
    return "null" if v is None else type(v).__name__ if not isinstance(v, bool) else "boolean"


def rows_to_array(rows, n_features: int, max_rows: int, *, field: str = "inputs") -> np.ndarray:
    """A JSON list of rows of numbers -> (n, n_features) float32, checked for shape, type and finiteness."""
    if not isinstance(rows, list):
        raise InputError(f"expected '{field}' to be a list of rows of {n_features} numbers; got {_describe(rows)}")
    if not rows:
        raise InputError(f"expected at least one row in '{field}'; got an empty list")
    if len(rows) > max_rows:
        raise InputError(
            f"expected at most {max_rows} rows per request; got {len(rows)}"
        )
    if not all(type(r) is list and len(r) == n_features for r in rows):  # before numpy walks a huge row
        _diagnose(rows, n_features, field)
    X = None
    try:
        X = np.array(rows)
    except (ValueError, TypeError):
        pass  # nested values: diagnosed below
    if X is None or X.dtype.kind not in "iuf" or X.ndim != 2 or X.shape[1] != n_features:
        _diagnose(rows, n_features, field)
        raise InputError(f"expected '{field}' as a list of rows of {n_features} numbers within float32 range")
    return finite_float32(X, field)


def check_value_types(rows: list, field: str = "inputs") -> None:
    """Reject booleans hidden among numbers (numpy would read `true` as 1.0)."""
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if isinstance(v, bool):
                raise InputError(f"{field}[{i}][{j}]: expected a number; got boolean {str(v).lower()}")


def _diagnose(rows: list, n_features: int, field: str) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise InputError(f"{field}[{i}]: expected a row (list) of {n_features} numbers; got {_describe(row)}")
        if len(row) != n_features and row and all(isinstance(v, list) for v in row):
            raise InputError(f"{field}[{i}]: expected a row of {n_features} numbers; got a list of {len(row)} list(s): one "
                             f"level of nesting too many ('{field}' is a list of rows, each a list of numbers)")
        if len(row) != n_features:
            raise InputError(f"{field}[{i}]: expected {n_features} features per row; got {len(row)}")
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"{field}[{i}][{j}]: expected a number; got {_describe(v)} {v!r:.40}")


def finite_float32(X: np.ndarray, field: str = "inputs") -> np.ndarray:
    """(n, F) numbers -> C-contiguous float32; NaN, ±Inf and values beyond float32's range are refused."""
    with np.errstate(over="ignore", invalid="ignore"):
        X32 = np.ascontiguousarray(X, dtype=np.float32)
    bad = ~np.isfinite(X32)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        got = float(X[i, j])  # a plain value in the message: "nan", "1e+39", never "np.float64(nan)"
        raise InputError(f"{field}[{i}][{j}]: expected a finite number within float32 range; got {got}")
    return X32
