"""Offline data sets: IDX files (Fashion-MNIST, MNIST), scikit-learn digits, circles.

Pixels are in [0, 1] (``scaling = "unit"``) or [-1, 1] (``"symmetric"``, the papers' code's
``Normalize(0.5, 0.5)``); ``validation_fraction`` replaces the test set by a held-out part
of the training set, for choosing hyper-parameters without looking at the test set.

Every loader returns a ``Dataset`` of float32 numpy arrays with inputs flattened to
(n, features) and the image shape kept aside for convolutional and sequence models.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from .config import DataConfig

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = ("install the Debian package with `apt-get install dataset-fashion-mnist`, or "
                "pass --data-dir / data.dir pointing at a directory of IDX files")
IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True, eq=False)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple[int, ...]
    n_classes: int
    name: str

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array."""
    file = Path(path)
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise InvalidInputError("data.dir", f"cannot read {file}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise InvalidInputError("data.dir", f"{file} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InvalidInputError("data.dir", f"{file} is truncated (header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - header != count * dtype.itemsize:
        raise InvalidInputError("data.dir", f"{file} holds {len(raw) - header} data bytes, "
                                f"expected {count * dtype.itemsize} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def load_idx_dir(directory: str | os.PathLike, name: str = "idx") -> Dataset:
    """Train and test images and labels from the four standard IDX files in ``directory``."""
    folder = Path(directory)
    found = {key: _find(folder, stems) for key, stems in IDX_FILES.items()}
    missing = [IDX_FILES[k][0] for k, v in found.items() if v is None]
    if missing:
        raise InvalidInputError(
            "data.dir", f"no IDX data set in {folder} (missing {', '.join(missing)}[.gz]); "
            f"{INSTALL_HINT}")
    arrays = {key: read_idx(path) for key, path in found.items() if path is not None}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim < 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise InvalidInputError("data.dir", f"{part} images {images.shape} and labels "
                                    f"{labels.shape} do not match")
    image_shape = (1, *arrays["train_images"].shape[1:]) \
        if arrays["train_images"].ndim == 3 else tuple(arrays["train_images"].shape[1:])
    scale = 255.0 if arrays["train_images"].dtype == np.uint8 else 1.0

    def flat(images: np.ndarray) -> np.ndarray:
        return (images.reshape(images.shape[0], -1).astype(np.float32) / scale)

    y_train = arrays["train_labels"].astype(np.int64)
    y_test = arrays["test_labels"].astype(np.int64)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(flat(arrays["train_images"]), y_train, flat(arrays["test_images"]), y_test,
                   image_shape, n_classes, name)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    return x_tr, y_tr, x_te, y_te


def load_digits_dataset(config: DataConfig) -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], stratified train/test split."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, y_tr, x_te, y_te = _split(x, y, config.test_fraction, config.split_seed)
    return Dataset(x_tr, y_tr, x_te, y_te, (1, 8, 8), 10, "digits")


def load_circles_dataset(config: DataConfig) -> Dataset:
    """Two concentric circles in the plane (binary), generated with a fixed seed."""
    from sklearn.datasets import make_circles
    x, y = make_circles(n_samples=config.n_samples, noise=config.noise, factor=config.factor,
                        random_state=config.split_seed)
    x_tr, y_tr, x_te, y_te = _split(x.astype(np.float32), y.astype(np.int64),
                                    config.test_fraction, config.split_seed)
    return Dataset(x_tr, y_tr, x_te, y_te, (2,), 2, "circles")


def stratified_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset keeping each class's share (>= 1 per class)."""
    if not (0.0 < fraction <= 1.0):
        raise InvalidInputError("data.fraction", f"must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(y.shape[0])
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        count = max(1, int(round(fraction * members.size)))
        keep.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(keep))


def check_available(config: DataConfig, data_dir: str | None = None) -> None:
    """Fail at once (naming ``data.dir`` and the install command) when an IDX data set the
    configuration needs is not there; bundled data sets are always available."""
    if config.name not in ("fashion_mnist", "idx"):
        return
    directory = data_dir or config.dir or (FASHION_MNIST_DIR
                                           if config.name == "fashion_mnist" else "")
    if not directory or not Path(directory).is_dir():
        raise InvalidInputError("data.dir", f"{config.name} needs IDX files in "
                                f"{directory or '(no directory given)'}; {INSTALL_HINT}")
    missing = [stems[0] for stems in IDX_FILES.values() if _find(Path(directory), stems) is None]
    if missing:
        raise InvalidInputError("data.dir", f"no IDX data set in {directory} (missing "
                                f"{', '.join(missing)}[.gz]); {INSTALL_HINT}")


def load_dataset(config: DataConfig, seed: int = 0, data_dir: str | None = None) -> Dataset:
    """The configured data set, with the training set cut to ``config.fraction`` (seeded by
    the run's ``seed``, or by ``config.subset_seed`` when that is set)."""
    if config.name == "digits":
        data = load_digits_dataset(config)
    elif config.name == "circles":
        data = load_circles_dataset(config)
    elif config.name in ("fashion_mnist", "idx"):
        directory = data_dir or config.dir or (FASHION_MNIST_DIR
                                               if config.name == "fashion_mnist" else "")
        if not directory:
            raise InvalidInputError("data.dir", f"data set 'idx' needs a directory; "
                                    f"{INSTALL_HINT}")
        if not Path(directory).is_dir():
            raise InvalidInputError("data.dir", f"no such directory: {directory}; "
                                    f"{INSTALL_HINT}")
        data = load_idx_dir(directory, config.name)
    else:
        raise InvalidInputError("data.name", f"unknown data set {config.name!r}",
                                ["fashion_mnist", "idx", "digits", "circles"])
    if config.fraction < 1.0:
        keep = stratified_subset(data.y_train, config.fraction,
                                 seed if config.subset_seed < 0 else config.subset_seed)
        data = Dataset(data.x_train[keep], data.y_train[keep], data.x_test, data.y_test,
                       data.image_shape, data.n_classes, data.name)
    if config.validation_fraction > 0:
        data = validation_split(data, config.validation_fraction, config.split_seed)
    elif config.validation_folds:
        data = validation_fold(data, config.validation_folds, config.validation_fold,
                               config.split_seed)
    if config.scaling == "symmetric":
        data = Dataset(2.0 * data.x_train - 1.0, data.y_train, 2.0 * data.x_test - 1.0,
                       data.y_test, data.image_shape, data.n_classes, data.name)
    return data


def fold_assignment(labels: np.ndarray, folds: int, draw: int) -> np.ndarray:
    """The fold (0 .. folds-1) of every sample in a stratified ``folds``-fold partition drawn
    with seed ``draw``: each class's samples in a random order, class after class, dealt out
    to the folds in turn, so that every class is split as evenly as it can be (counts per
    fold differ by at most one within a class and over the whole set)."""
    rng = np.random.default_rng([draw, 104729])
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == label))
                            for label in np.unique(labels)]) if labels.size else \
        np.zeros(0, dtype=np.int64)
    fold_of = np.empty(labels.size, dtype=np.int64)
    fold_of[order] = np.arange(labels.size) % folds
    return fold_of


def validation_fold(data: Dataset, folds: int, fold: int, draw: int) -> Dataset:
    """Hold out fold ``fold`` of the stratified ``folds``-fold partition drawn with seed
    ``draw`` as the evaluation set (the test set is dropped): folds 0 .. folds-1 of one draw
    are a k-fold cross-validation, each training sample held out exactly once."""
    if folds > data.y_train.size:
        raise InvalidInputError("data.validation_folds", f"{folds} folds of "
                                f"{data.y_train.size} training samples leave a fold empty")
    fold_of = fold_assignment(data.y_train, folds, draw)
    held = np.flatnonzero(fold_of == fold)
    train = np.flatnonzero(fold_of != fold)
    return Dataset(data.x_train[train], data.y_train[train], data.x_train[held],
                   data.y_train[held], data.image_shape, data.n_classes,
                   f"{data.name}:validation")


def validation_split(data: Dataset, fraction: float, seed: int) -> Dataset:
    """Hold out a stratified, seeded ``fraction`` of the training set as the evaluation set
    (the test set is dropped, so nothing tuned on this data set can see it)."""
    rng = np.random.default_rng(seed + 7919)
    held_parts = []
    for label in np.unique(data.y_train):
        members = np.flatnonzero(data.y_train == label)
        # each class keeps at least one training sample
        count = min(members.size - 1, max(1, int(round(fraction * members.size))))
        held_parts.append(rng.choice(members, size=count, replace=False))
    held = np.sort(np.concatenate(held_parts))
    if held.size == 0:
        raise InvalidInputError("data.validation_fraction", f"{fraction} of "
                                f"{data.y_train.size} training samples leaves no validation "
                                "samples (every class has a single sample)")
    train = np.setdiff1d(np.arange(data.y_train.size), held)
    return Dataset(data.x_train[train], data.y_train[train], data.x_train[held],
                   data.y_train[held], data.image_shape, data.n_classes,
                   f"{data.name}:validation")
