"""Data: the digits split (sizes, stratification, determinism, scaling) and user .npz/.csv files."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_digits

from fusion.data import TEST_FRACTION, VAL_FRACTION, Scaling, load, load_digits, load_file
from fusion.errors import DataFormatError


def rows_as_set(X: np.ndarray, y: np.ndarray) -> list[tuple]:
    return sorted((*map(float, x), int(t)) for x, t in zip(X, y))


# ---------------------------------------------------------------- digits

def test_digits_split_sizes(digits):
    n = len(sk_digits().target)
    n_test = math.ceil(n * TEST_FRACTION)  # scikit-learn rounds the test share up
    n_val = math.ceil((n - n_test) * VAL_FRACTION)
    assert (len(digits.y_train), len(digits.y_val), len(digits.y_test)) == (n - n_test - n_val, n_val, n_test)
    assert (n, n_test, n_val) == (1797, 450, 270)
    assert digits.X_train.shape == (1077, 64) and digits.X_train.dtype == np.float32
    assert digits.y_train.dtype == np.int64
    assert digits.classes == tuple(range(10)) and digits.image_shape == (1, 8, 8)
    assert digits.describe() == {"name": "digits", "task": "classification", "n_train": 1077, "n_val": 270,
                                 "n_test": 450, "split_seed": 0}


def test_digits_splits_partition_the_raw_data(digits):
    bunch = sk_digits()
    X = np.concatenate([digits.X_train, digits.X_val, digits.X_test])
    y = np.concatenate([digits.y_train, digits.y_val, digits.y_test])
    assert rows_as_set(X, y) == rows_as_set(bunch.data, bunch.target)  # nothing lost, nothing duplicated
    assert X.min() == 0 and X.max() == 16  # raw pixels, not scaled


def test_digits_split_is_stratified(digits):
    overall = np.bincount(sk_digits().target) / 1797
    for y in (digits.y_train, digits.y_val, digits.y_test):
        counts = np.bincount(y, minlength=10)
        assert np.abs(counts - overall * len(y)).max() <= 1.0  # each class within one row of its share


def test_digits_split_is_deterministic_and_seeded(digits):
    again = load_digits()
    for a, b in ((digits.X_train, again.X_train), (digits.y_val, again.y_val), (digits.X_test, again.X_test)):
        np.testing.assert_array_equal(a, b)
    other = load_digits(seed=1)
    assert not np.array_equal(digits.y_test, other.y_test)
    assert load("digits").scaling == digits.scaling


def test_scaling_is_fitted_on_train_and_recorded(digits):
    s = digits.scaling
    np.testing.assert_allclose(s.mean, digits.X_train.mean(0), rtol=1e-6, atol=1e-6)
    std = digits.X_train.std(0)
    np.testing.assert_allclose(s.std, np.where(std < 1e-6, 1.0, std), rtol=1e-6)
    assert (std < 1e-6).any()  # digits has constant corner pixels: they get std 1, not a division by 0
    Z = s.apply(digits.X_train)
    assert Z.dtype == np.float32 and np.isfinite(Z).all()
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-4)
    d = s.to_dict()
    assert d["kind"] == "standardize" and len(d["mean"]) == len(d["std"]) == 64
    assert Scaling(tuple(d["mean"]), tuple(d["std"])) == s


# ---------------------------------------------------------------- user files

def blobs(n=60, f=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.normal(0, 1, (n, f)) + y[:, None] * 3
    return X.astype(np.float32), y


def test_npz_loads_with_the_same_split_logic(tmp_path):
    X, y = blobs()
    path = tmp_path / "blobs.npz"
    np.savez(path, X=X, y=y)
    d = load_file(path)
    assert d.name == "blobs" and d.task == "classification" and d.classes == (0, 1, 2)
    assert d.n_features == 5 and d.image_shape is None
    assert len(d.y_test) == math.ceil(60 * TEST_FRACTION)
    assert rows_as_set(np.concatenate([d.X_train, d.X_val, d.X_test]),
                       np.concatenate([d.y_train, d.y_val, d.y_test])) == rows_as_set(X, y)
    np.testing.assert_allclose(d.scaling.mean, d.X_train.mean(0), atol=1e-5)


def test_npz_with_column_vector_labels_loads(tmp_path):
    X, y = blobs()
    np.savez(tmp_path / "col.npz", X=X, y=y[:, None])
    assert load_file(tmp_path / "col.npz").classes == (0, 1, 2)


def test_csv_loads_with_string_labels_and_any_label_position(tmp_path):
    X, y = blobs(f=3)
    names = np.array(["cat", "dog", "eel"])[y]
    lines = ["a,species,b,c"] + [f"{r[0]},{lab},{r[1]},{r[2]}" for r, lab in zip(X, names)]
    path = tmp_path / "pets.csv"
    path.write_text("\n".join(lines) + "\n")
    d = load_file(path, label_column="species")
    assert d.classes == ("cat", "dog", "eel") and d.n_features == 3
    X_all = np.concatenate([d.X_train, d.X_val, d.X_test])
    y_all = np.concatenate([d.y_train, d.y_val, d.y_test])
    assert rows_as_set(X_all, y_all) == rows_as_set(X, y)  # cat->0, dog->1, eel->2, label column dropped


def test_csv_regression(tmp_path):
    X, _ = blobs(f=2)
    t = X.sum(1) * 0.5
    path = tmp_path / "reg.csv"
    path.write_text("x0,x1,label\n" + "".join(f"{a},{b},{c}\n" for (a, b), c in zip(X, t)))
    d = load_file(path, task="regression")
    assert d.task == "regression" and d.classes == () and d.y_train.dtype == np.float32


def write(path, text):
    path.write_text(text)
    return path


def good_csv_lines(n=20):
    return ["f0,f1,label"] + [f"{i},{i * 2},{i % 2}" for i in range(n)]


MALFORMED = {
    "missing label column": lambda p: write(p / "d.csv", "f0,f1,target\n1,2,0\n"),
    "ragged csv row": lambda p: write(p / "d.csv", "\n".join(good_csv_lines()[:5] + ["1,2"] + good_csv_lines()[5:])),
    "non-numeric csv value": lambda p: write(p / "d.csv", "\n".join(good_csv_lines()[:3] + ["1,abc,0"] + good_csv_lines()[3:])),
    "csv header only": lambda p: write(p / "d.csv", "f0,f1,label\n"),
    "csv too few rows": lambda p: write(p / "d.csv", "\n".join(good_csv_lines(5))),
    "csv nan feature": lambda p: write(p / "d.csv", "\n".join(good_csv_lines() + ["nan,1,0"])),
    "npz without X": lambda p: (np.savez(p / "d.npz", features=np.zeros((20, 2)), y=np.zeros(20)), p / "d.npz")[1],
    "npz object array": lambda p: (np.savez(p / "d.npz", X=np.array([[1, "a"]] * 20, dtype=object), y=np.zeros(20)), p / "d.npz")[1],
    "npz string X": lambda p: (np.savez(p / "d.npz", X=np.array([["a", "b"]] * 20), y=np.zeros(20)), p / "d.npz")[1],
    "pickle named npz": lambda p: ((p / "d.npz").write_bytes(pickle.dumps({"X": np.zeros((20, 2)), "y": np.zeros(20)})), p / "d.npz")[1],
    "not a zip": lambda p: write(p / "d.npz", "this is not an archive"),
    "npz length mismatch": lambda p: (np.savez(p / "d.npz", X=np.zeros((20, 2)), y=np.zeros(19)), p / "d.npz")[1],
    "npz 1-d X": lambda p: (np.savez(p / "d.npz", X=np.zeros(20), y=np.zeros(20)), p / "d.npz")[1],
    "npz 2-d y": lambda p: (np.savez(p / "d.npz", X=np.zeros((20, 2)), y=np.zeros((20, 2))), p / "d.npz")[1],
    "npz inf": lambda p: (np.savez(p / "d.npz", X=np.full((20, 2), np.inf), y=np.arange(20) % 2), p / "d.npz")[1],
    "class with one row": lambda p: write(p / "d.csv", "\n".join(good_csv_lines(30) + ["5,7,9"])),
    "wrong extension": lambda p: write(p / "d.txt", "\n".join(good_csv_lines())),
    "no such file": lambda p: p / "missing.csv",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_give_one_data_format_error_naming_the_file(tmp_path, case):
    path = MALFORMED[case](tmp_path)
    with pytest.raises(DataFormatError) as info:
        load_file(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert "\n" not in msg and len(msg) < 500
    assert isinstance(info.value, ValueError)


def test_error_messages_say_what_was_expected(tmp_path):
    with pytest.raises(DataFormatError, match=r"expected a label column named 'label'; got columns \['f0', 'f1', 'target'\]"):
        load_file(MALFORMED["missing label column"](tmp_path))
    with pytest.raises(DataFormatError, match=r"line 6: expected 3 fields; got 2"):
        load_file(MALFORMED["ragged csv row"](tmp_path))
    with pytest.raises(DataFormatError, match=r"expected arrays 'X' and 'y'; got \['features', 'y'\]"):
        load_file(MALFORMED["npz without X"](tmp_path))
    with pytest.raises(DataFormatError, match=r"expected a .npz or .csv file; got a '.txt' file"):
        load_file(MALFORMED["wrong extension"](tmp_path))
