"""Request bodies -> validated float32 batches. Every failure says what was expected and what was got."""

from __future__ import annotations

import json

import numpy as np
import orjson

from fusion.errors import InputError


def parse_json(body: bytes):
    """Parse a JSON body; NaN/Infinity tokens are read (stdlib) so that the finite check can name them."""
    if not body:
        raise InputError("expected a JSON body; got an empty body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:  # the stdlib accepts NaN / Infinity / huge exponents, so the value check can say where they are
            return json.loads(body)
        except (ValueError, RecursionError):
            raise InputError(f"expected a JSON body; got invalid JSON ({exc})") from None


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
    X = None
    try:
        X = np.array(rows)
    except (ValueError, TypeError):
        pass  # ragged rows: diagnosed below
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
        raise InputError(
            f"{field}[{i}][{j}]: expected a finite number within float32 range; got {X.flat[i * X.shape[1] + j]!r}"
        )
    return X32
