"""Your own data: .npz, .npy and CSV files, their checks and their one-line errors."""

import numpy as np
import pytest
from conftest import synthetic_digits

from sae_jax.data import DataError
from sae_jax.data.arrays import load_arrays, standardization, standardize


def test_npz_with_both_splits_and_images_of_any_shape(tmp_path):
    x, y = synthetic_digits(30, 1)
    x_test, y_test = synthetic_digits(10, 2)
    path = tmp_path / "d.npz"
    np.savez(path, x=x.reshape(30, 8, 8), y=y.astype(np.int64), x_test=x_test, y_test=y_test)
    data = load_arrays(path)
    np.testing.assert_array_equal(data.train_images, x)  # [30, 8, 8] flattened
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    np.testing.assert_array_equal(data.train_labels, y)
    np.testing.assert_array_equal(data.test_images, x_test)
    np.testing.assert_array_equal(data.test_labels, y_test)
    assert data.source == f"npz file {path}"


def test_npy_is_images_alone(tmp_path):
    x = np.random.default_rng(0).random((20, 3, 4, 2)).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    data = load_arrays(tmp_path / "x.npy")
    assert data.train_images.shape == (20, 24) and data.train_images.dtype == np.float32
    np.testing.assert_allclose(data.train_images, x.reshape(20, 24), rtol=1e-6)
    assert data.train_labels is None and data.test_images is None and data.test_labels is None


def test_csv_with_a_header_and_a_named_label_column(tmp_path):
    rows = ["a,label,b,c", "0.5,2,0.25,1", "0,0,1,0.75", "1,1,0,0"]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    data = load_arrays(tmp_path / "d.csv", label_column="label")
    np.testing.assert_array_equal(data.train_labels, [2, 0, 1])
    np.testing.assert_allclose(data.train_images, [[0.5, 0.25, 1], [0, 1, 0.75], [1, 0, 0]])
    # without a header the label column is an index; whole numbers 0..255 are pixels
    (tmp_path / "p.csv").write_text("3,0,255,17\n1,128,4,0\n")
    data = load_arrays(tmp_path / "p.csv", label_column="0")
    np.testing.assert_array_equal(data.train_labels, [3, 1])
    assert data.train_images.dtype == np.uint8
    np.testing.assert_array_equal(data.train_images, [[0, 255, 17], [128, 4, 0]])
    # no label column: every column is a feature, and there are no labels
    assert load_arrays(tmp_path / "p.csv").train_images.shape == (2, 4)


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


X = np.zeros((4, 3), np.uint8)
Y = np.zeros(4, np.int64)


@pytest.mark.parametrize(
    "write,message",
    [
        (lambda p: p / "missing.npz", "missing.npz: file not found"),
        (lambda p: (p / "d.txt").write_text("1") and p / "d.txt", "unknown format '.txt'"),
        (lambda p: _npz(p, y=Y), "d.npz: no array 'x' (the training images)"),
        (lambda p: _npz(p, x=X, labels=Y), "d.npz: unknown array 'labels'; expected x"),
        (lambda p: _npz(p, x=X, y_test=Y), "d.npz: y_test without x_test"),
        (lambda p: _npz(p, x=X, y=Y[:3]), "d.npz: y: expected one label per example, shape (4,)"),
        (lambda p: _npz(p, x=X, y=Y - 1), "d.npz: y: label -1 at example 0 is negative"),
        (lambda p: _npz(p, x=X, y=Y + 0.5), "d.npz: y: label 0.5 at example 0 is not a whole"),
        (
            lambda p: _npz(p, x=X, y=Y, x_test=X[:, :2]),
            "x_test has 2 features per example, x has 3",
        ),
        (lambda p: _npz(p, x=X, y=Y, x_test=X), "labels for one split only"),
        (lambda p: _npz(p, x=X[:0]), "d.npz: x: expected examples [n, ...] with n >= 1"),
        (lambda p: _npz(p, x=np.zeros(4)), "d.npz: x: expected examples [n, ...] with n >= 1"),
        (lambda p: _npz(p, x=X.astype(np.int64)), "d.npz: x: int64 values; pass uint8 pixels"),
        (lambda p: _npz(p, x=X.astype(bool)), "d.npz: x: expected numbers, got dtype bool"),
        (
            lambda p: _npz(p, x=np.full((2, 2), 2.0)),
            "x: float values must be in [0, 1] (got max 2)",
        ),
        (lambda p: _npz(p, x=np.array([[0, np.nan]])), "d.npz: x: nan at example 0, feature 1"),
        (lambda p: (p / "d.npz").write_bytes(b"PK\x03\x04junk") and p / "d.npz", "cannot read"),
    ],
)
def test_bad_arrays_are_one_named_error(tmp_path, write, message):
    path = write(tmp_path)
    with pytest.raises(DataError) as e:
        load_arrays(path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,label_column,message",
    [
        ("a,b,c\n1,0,1\n0,1\n", None, "d.csv: line 3 has 2 values, expected 3"),
        ("1,0,1\n\n1,1,1\n0,1\n", None, "d.csv: line 4 has 2 values, expected 3"),
        ("0,1,1\n1,0,1,0\n", None, "d.csv: line 2 has 4 values, expected 3"),
        ("a,b\n1,x\n", None, "d.csv: line 2: 'x' is not a number"),
        ("1,nan\n", None, "d.csv: x: nan at example 0, feature 1"),
        ("a,b\n", None, "d.csv: no examples (only a header)"),
        ("", None, "d.csv: empty CSV file"),
        ("a,b\n1,0\n", "label", "d.csv: no label column 'label' (its columns are a, b"),
        ("1,0\n", "7", "d.csv: no label column '7' (it has no header"),
    ],
)
def test_bad_csv_is_one_named_error(tmp_path, text, label_column, message):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DataError) as e:
        load_arrays(tmp_path / "d.csv", label_column=label_column)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_label_column_is_for_csv_only(tmp_path):
    with pytest.raises(DataError, match="--label_column=y: only for CSV files"):
        load_arrays(_npz(tmp_path, x=X), label_column="y")


def test_standardize_allows_any_finite_numbers_and_uses_the_training_statistics(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(50, 7, (200, 5)) * [1, 2, 3, 4, 0]  # the last feature is constant
    data = load_arrays(_npz(tmp_path, x=x, x_test=x[:10] + 1), standardize=True)
    mean, std = standardization(data.train_images)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, [*x.std(0)[:4], 1.0], rtol=1e-4)  # constant: 1
    z = standardize(data.test_images, mean, std)
    np.testing.assert_allclose(z, (x[:10] + 1 - x.mean(0)) / [*x.std(0)[:4], 1.0], atol=1e-4)
    with pytest.raises(DataError, match=r"x: inf at example 0"):
        load_arrays(_npz(tmp_path, x=np.array([[np.inf, 1.0]])), standardize=True)
