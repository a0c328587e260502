"""Offline data: the IDX reader on files written here, digits, circles, stratified fractions."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from asyncbalance.config import from_mapping
from asyncbalance.errors import InvalidInputError
from asyncbalance.training.config import DataConfig
from asyncbalance.training.data import load_dataset, read_idx, stratified_subset


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s)
                                                        for s in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_idx_dir(root: Path, compress: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 5, 4)).astype(np.uint8)
    labels = np.arange(20) % 3
    write_idx(root / "train-images-idx3-ubyte", images, compress)
    write_idx(root / "train-labels-idx1-ubyte", labels, compress)
    write_idx(root / "t10k-images-idx3-ubyte", images[:6], compress)
    write_idx(root / "t10k-labels-idx1-ubyte", labels[:6], compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_loads(tmp_path: Path, compress: bool) -> None:
    images, labels = make_idx_dir(tmp_path, compress)
    data = load_dataset(DataConfig(name="idx", dir=str(tmp_path)))
    assert data.x_train.shape == (20, 20) and data.x_train.dtype == np.float32
    np.testing.assert_allclose(data.x_train[3], images[3].ravel() / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_train, labels)
    assert data.image_shape == (1, 5, 4) and data.n_classes == 3
    assert data.x_test.shape == (6, 20)


def test_data_dir_argument_overrides_config(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, False)
    data = load_dataset(DataConfig(name="fashion_mnist", dir="/nonexistent"),
                        data_dir=str(tmp_path))
    assert data.x_train.shape[0] == 20


def test_missing_dataset_gives_install_hint(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="data.dir.*apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(name="fashion_mnist", dir=str(tmp_path / "nope")))
    with pytest.raises(InvalidInputError, match="missing train-images-idx3-ubyte.*apt-get"):
        load_dataset(DataConfig(name="idx", dir=str(tmp_path)))


def test_corrupt_idx_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(InvalidInputError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((3, 2), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(InvalidInputError, match="expected 6"):
        read_idx(tmp_path / "short")


def test_digits_and_circles() -> None:
    digits = load_dataset(DataConfig(name="digits"))
    assert digits.n_features == 64 and digits.n_classes == 10
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    circles = load_dataset(DataConfig(name="circles", n_samples=200))
    assert circles.n_features == 2 and set(np.unique(circles.y_train)) == {0, 1}


@pytest.mark.parametrize("fraction", [0.01, 0.05])
def test_stratified_fraction_keeps_class_shares(fraction: float) -> None:
    y = np.repeat(np.arange(10), [600, 500, 700, 600, 600, 650, 550, 600, 600, 600])
    keep = stratified_subset(y, fraction, seed=3)
    counts = np.bincount(y[keep], minlength=10)
    expected = np.round(fraction * np.bincount(y))
    np.testing.assert_array_equal(counts, expected)
    assert np.array_equal(keep, stratified_subset(y, fraction, seed=3))
    assert not np.array_equal(keep, stratified_subset(y, fraction, seed=4))
    assert len(np.unique(keep)) == len(keep)


def test_tiny_fraction_keeps_every_class() -> None:
    y = np.repeat(np.arange(3), 10)
    assert set(y[stratified_subset(y, 0.01, 0)]) == {0, 1, 2}


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_outside_unit_interval_is_refused(fraction: float) -> None:
    with pytest.raises(InvalidInputError, match=r"data.fraction: must be in \(0, 1\]"):
        from_mapping(DataConfig, {"fraction": fraction}, "data")
    with pytest.raises(InvalidInputError, match="fraction"):
        stratified_subset(np.zeros(4, int), fraction, 0)
