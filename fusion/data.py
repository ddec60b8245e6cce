"""Data sets: scikit-learn's bundled digits by default, user `.npz` / `.csv` files, fixed seeded splits.

Clients always send raw features; the scaling (per-feature standardisation fitted on the train
split) is recorded here and baked into every exported graph.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from fusion.errors import DataFormatError

DEFAULT_SEED = 0
TEST_FRACTION = 0.25  # of all rows
VAL_FRACTION = 0.20  # of the rows left after the test split


@dataclass(frozen=True)
class Scaling:
    """Per-feature standardisation `(x - mean) / std`, fitted on the train split."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, X: np.ndarray) -> "Scaling":
        mean = X.mean(axis=0)
        std = X.std(axis=0)
        std = np.where(std < 1e-6, 1.0, std)  # constant pixels (digits' corners) stay finite
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def apply(self, X: np.ndarray) -> np.ndarray:
        return ((X - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"kind": "standardize", "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Dataset:
    """A split data set of raw features (float32) and labels (int64 classes or float32 targets)."""

    name: str
    task: str  # "classification" | "regression"
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple = ()
    image_shape: tuple[int, ...] | None = None  # (channels, height, width) when rows are images
    scaling: Scaling = field(default=None)  # type: ignore[assignment]

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def named(self) -> bool:
        """Whether rows are named inputs ({input name: (n, ...) array}, `split_named`) rather than (n, F)."""
        return isinstance(self.X_train, dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "n_train": len(self.y_train),
            "n_val": len(self.y_val),
            "n_test": len(self.y_test),
            "split_seed": DEFAULT_SEED,
        }


def split(
    X: np.ndarray,
    y: np.ndarray,
    *,
    name: str,
    task: str = "classification",
    image_shape: tuple[int, ...] | None = None,
    seed: int = DEFAULT_SEED,
) -> Dataset:
    """Fixed seeded split into train/val/test, stratified for classification.

    X: (n_samples, n_features) raw features; y: (n_samples,) labels.
    """
    X = np.asarray(X, dtype=np.float32)
    if task == "classification":
        classes, y = np.unique(np.asarray(y), return_inverse=True)
        y = y.astype(np.int64)
        stratify = y
    else:
        classes, y, stratify = (), np.asarray(y, dtype=np.float32), None
    X_rest, X_test, y_rest, y_test = train_test_split(
        X, y, test_size=TEST_FRACTION, random_state=seed, stratify=stratify
    )
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=VAL_FRACTION, random_state=seed,
        stratify=y_rest if stratify is not None else None,
    )
    return Dataset(
        name=name, task=task,
        X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val, X_test=X_test, y_test=y_test,
        classes=tuple(c.item() for c in classes), image_shape=image_shape,
        scaling=Scaling.fit(X_train),
    )


def split_named(
    arrays: dict[str, np.ndarray], y: np.ndarray, *, name: str, task: str = "classification",
    seed: int = DEFAULT_SEED,
) -> Dataset:
    """`split` for named inputs (a bring-your-own bundle's `[[inputs]]`): the same seeded, stratified
    train/val/test split, applied row-wise to every array; X_* are {input name: (n_split, ...) array}.

    The split is drawn on row indices, so a single input gives the rows `split` gives for that array
    (train_test_split shuffles indices the same way whatever the rows hold). No scaling is fitted:
    normalisation of named inputs lives in the members' own graphs."""
    y = np.asarray(y)
    if task == "classification":
        classes, y = np.unique(y, return_inverse=True)
        y = y.astype(np.int64)
        stratify = y
    else:
        classes, y, stratify = (), y.astype(np.float32), None
    idx = np.arange(len(y))
    rest, test, y_rest, y_test = train_test_split(idx, y, test_size=TEST_FRACTION, random_state=seed, stratify=stratify)
    train, val, y_train, y_val = train_test_split(
        rest, y_rest, test_size=VAL_FRACTION, random_state=seed, stratify=y_rest if stratify is not None else None,
    )

    def part(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v[rows]) for k, v in arrays.items()}

    return Dataset(
        name=name, task=task, X_train=part(train), y_train=y_train, X_val=part(val), y_val=y_val,
        X_test=part(test), y_test=y_test, classes=tuple(c.item() for c in classes),
    )


NPZ_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
              "uint8": np.uint8, "bool": np.bool_}


def load_named(path: str | Path, specs, *, task: str = "classification", seed: int = DEFAULT_SEED) -> Dataset:
    """A `.npz` with one array per input (`specs`: the recipe's `[[inputs]]` / TensorSpecs, each with
    `name`, `dtype`, `shape`) plus `y`, split by `split_named`. Every array is checked against its spec:
    present, rows equal to y's, fixed dimensions equal, values castable to the dtype without loss."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".npz":
        raise DataFormatError(f"{path}: expected an existing .npz file (one array per input name, plus 'y')")
    names = [s.name for s in specs]
    try:
        with np.load(path, allow_pickle=False) as npz:  # never unpickle user data
            missing = sorted((set(names) | {"y"}) - set(npz.files))
            if missing:
                raise DataFormatError(f"{path}: expected arrays {names + ['y']} (one per input, plus 'y'); "
                                      f"missing {missing}; got {sorted(npz.files)}")
            raw = {n: npz[n] for n in names}
            y = npz["y"]
    except DataFormatError:
        raise
    except Exception as exc:  # zipfile/ValueError from a malformed archive or an object array
        raise DataFormatError(f"{path}: not a readable .npz archive of numeric arrays ({exc})") from None
    y = y.reshape(-1) if y.ndim > 1 and y.shape[1] == 1 else y
    if y.ndim != 1 or len(y) < 10:
        raise DataFormatError(f"{path}: expected y of shape (n_samples >= 10,); got {y.shape}")
    arrays = {}
    for s in specs:
        a, want = raw[s.name], list(s.shape)
        if getattr(s, "kind", "tensor") == "text":  # one string per row, tokenized later (fusion/text.py)
            if a.dtype.kind != "U" or a.shape != (len(y),):
                raise DataFormatError(f"{path}: text input '{s.name}' expected a numpy unicode string array of shape "
                                      f"[{len(y)}] (dtype '<U…', one string per row, as y's rows); got dtype {a.dtype} "
                                      f"shape {list(a.shape)}")
            arrays[s.name] = a
            continue
        if a.ndim != len(want) or a.shape[0] != len(y) or any(
                isinstance(d, int) and d != g for d, g in zip(want[1:], a.shape[1:])):
            raise DataFormatError(f"{path}: input '{s.name}' expected shape {[len(y)] + want[1:]} (rows as y's; "
                                  f"named dimensions free); got {list(a.shape)}")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise DataFormatError(f"{path}: input '{s.name}' expected numbers; got dtype {a.dtype}")
        cast = a.astype(NPZ_DTYPES[s.dtype])
        if np.issubdtype(cast.dtype, np.floating) and not np.isfinite(cast).all():
            raise DataFormatError(f"{path}: input '{s.name}' holds NaN or infinite values")
        if not np.issubdtype(cast.dtype, np.floating) and not np.array_equal(cast, a):
            raise DataFormatError(f"{path}: input '{s.name}' expected {s.dtype} values; got {a.dtype} values "
                                  f"that change when cast")
        arrays[s.name] = cast
    try:
        return split_named(arrays, y, name=path.stem, task=task, seed=seed)
    except ValueError as exc:  # e.g. a class with one row cannot be split with stratification
        raise DataFormatError(f"{path}: cannot make a stratified train/val/test split: {exc}") from None


def load_digits(seed: int = DEFAULT_SEED) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1797 rows of 8x8 pixels valued 0..16, 10 classes."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    return split(bunch.data, bunch.target, name="digits", image_shape=(1, 8, 8), seed=seed)


def load_file(
    path: str | Path, *, label_column: str = "label", task: str = "classification",
    seed: int = DEFAULT_SEED,
) -> Dataset:
    """A user data set: `.npz` with arrays `X` and `y`, or `.csv` with a header and a label column."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        X, y = _read_npz(path)
    elif suffix == ".csv":
        X, y = _read_csv(path, label_column)
    else:
        raise DataFormatError(f"{path}: expected a .npz or .csv file; got a '{suffix}' file")
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[0] < 10:
        raise DataFormatError(
            f"{path}: expected X of shape (n_samples >= 10, n_features) and y of shape (n_samples,); "
            f"got X {X.shape} and y {y.shape}"
        )
    if not np.isfinite(X).all():
        raise DataFormatError(f"{path}: X holds NaN or infinite values")
    try:
        return split(X, y, name=path.stem, task=task, seed=seed)
    except ValueError as exc:  # e.g. a class with one row cannot be split with stratification
        raise DataFormatError(f"{path}: cannot make a stratified train/val/test split: {exc}") from None


def load(source: str = "digits", **kwargs) -> Dataset:
    """`digits` or a path to a user file."""
    if source == "digits":
        return load_digits(seed=kwargs.get("seed", DEFAULT_SEED))
    return load_file(source, **kwargs)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:  # never unpickle user data
            missing = {"X", "y"} - set(npz.files)
            if missing:
                raise DataFormatError(
                    f"{path}: expected arrays 'X' and 'y'; got {sorted(npz.files)}"
                )
            X, y = npz["X"], npz["y"]
    except DataFormatError:
        raise
    except Exception as exc:  # zipfile/ValueError from a malformed archive or an object array
        raise DataFormatError(f"{path}: not a readable .npz archive of numeric arrays ({exc})") from None
    if not np.issubdtype(X.dtype, np.number):
        raise DataFormatError(f"{path}: expected numeric X; got dtype {X.dtype}")
    return X.astype(np.float32), y.reshape(-1) if y.ndim > 1 and y.shape[1] == 1 else y


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        raise DataFormatError(f"{path}: expected a header row and data rows; got {len(rows)} rows")
    header, body = rows[0], rows[1:]
    if label_column not in header:
        raise DataFormatError(
            f"{path}: expected a label column named '{label_column}'; got columns {header}"
        )
    j = header.index(label_column)
    X, y = [], []
    for lineno, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataFormatError(
                f"{path}, line {lineno}: expected {len(header)} fields; got {len(row)}"
            )
        try:
            X.append([float(v) for i, v in enumerate(row) if i != j])
        except ValueError as exc:
            raise DataFormatError(f"{path}, line {lineno}: expected numbers; {exc}") from None
        y.append(row[j])
    y_arr = np.asarray(y)
    try:
        y_arr = y_arr.astype(np.int64)
    except ValueError:
        pass  # string labels stay strings; split() maps them to class indices
    return np.asarray(X, dtype=np.float32), y_arr
