"""Image datasets as in-memory tensors, found on disk without a network where possible.

`DATASETS` is the one place a dataset is added: its name, its loader, and what a
scenario must know without loading it (input shape, number of classes), which the
schema's name check, the models' input layer and `fedtide list` read. A loaded dataset
that disagrees with its entry is refused, so the entry stays true. The module imports
no torch until a dataset is loaded: the schema, which the report reads, imports it.

A simulation reads each dataset once per process (server and every Ray worker), so
the loaded tensors are cached; they are read-only and never part of client state.
The digits' train/test split is also kept on disk (`fedtide.data.cache`), so that
loading them needs no scikit-learn import once it has been made.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedtide.data.cache import cache_file, read_arrays, write_arrays
from fedtide.errors import ScenarioError

if TYPE_CHECKING:
    import torch

    Loader = Callable[[str | None], tuple[torch.Tensor, ...]]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_UBYTE = 0x08  # the idx type code of unsigned bytes, the only one the MNIST family uses
# How to replace a damaged Fashion-MNIST idx file (the only idx files fedtide reads itself).
IDX_FIX = "replace it with an intact copy of Fashion-MNIST's idx files (the Debian package dataset-fashion-mnist)"


@dataclass(frozen=True)
class ImageData:
    """Train and test images (N, C, H, W), standardised, with integer labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset fedtide knows: how to load it, and what a scenario knows of it before loading it."""

    loader: Loader  # root (or None) -> train images, train labels, test images, test labels
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    description: str  # for `fedtide list`


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset `name`; an unknown name is a `ScenarioError` listing the known ones."""
    if name not in DATASETS:
        raise ScenarioError("dataset.name", f"unknown dataset '{name}'", f"one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, root: str | None = None) -> ImageData:
    """Load a dataset by scenario name; a missing one is a `ScenarioError` saying where we looked."""
    return _load_cached(name, str(root) if root is not None else None)


@lru_cache(maxsize=4)
def _load_cached(name: str, root: str | None) -> ImageData:
    spec = dataset_spec(name)
    train_x, train_y, test_x, test_y = spec.loader(root)
    mean, std = train_x.mean(), train_x.std()
    data = ImageData((train_x - mean) / std, train_y, (test_x - mean) / std, test_y)
    classes = int(max(train_y.max(), test_y.max())) + 1
    if data.input_shape != spec.input_shape or classes > spec.num_classes:
        raise ScenarioError(
            "dataset.root",
            f"the {name} found holds images of shape {data.input_shape} in {classes} classes, "
            f"where {name} has {spec.input_shape} in {spec.num_classes}",
            f"point dataset.root at a copy of {name} itself",
        )
    return data


def _digits(root: str | None) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits, with a fixed stratified 75/25 train/test split.

    Importing scikit-learn brings scipy and pandas with it, more than half an `import torch`,
    for a 0.5 MB split that never changes: the arrays scikit-learn made are kept on disk
    (`fedtide.data.cache`) and read back as they were saved.
    """
    path = cache_file("digits", ("scikit-learn",))
    arrays = read_arrays(path, list(_SPLIT)) if path else None
    if arrays is None:
        arrays = _digits_split()
        if path:
            write_arrays(path, dict(zip(_SPLIT, arrays, strict=True)))
    return _tensors(*arrays)


_SPLIT = ("x_train", "y_train", "x_test", "y_test")


def _digits_split() -> list[np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, stratify=digits.target, random_state=0
    )
    return [x_train, y_train, x_test, y_test]


def _fashion_mnist(root: str | None) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST idx files from `root`, the Debian package, or torchvision's download."""
    candidates = [Path(root)] if root else []
    candidates += [DEBIAN_FASHION_MNIST]
    for folder in candidates:
        for sub in (folder, folder / "FashionMNIST" / "raw"):
            if (sub / "train-images-idx3-ubyte.gz").is_file() or (sub / "train-images-idx3-ubyte").is_file():
                return _tensors(*_idx_split(sub, "train"), *_idx_split(sub, "t10k"))
    try:
        return _torchvision("FashionMNIST")(root)
    except ScenarioError:
        looked = ", ".join(str(c) for c in candidates)
        raise ScenarioError(
            "dataset.root",
            f"Fashion-MNIST not found (looked in {looked}, and torchvision could not download it)",
            "apt-get install dataset-fashion-mnist, or set dataset.root to a folder with the idx files",
        ) from None


def _idx_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's images (N, 1, H, W) in [0, 1] and labels, which must pair up one to one."""
    images = _read_idx(folder, f"{prefix}-images-idx3-ubyte", ndim=3)
    labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte", ndim=1)
    if len(images) != len(labels):
        raise ScenarioError(
            "dataset.root",
            f"'{folder}' holds {len(images)} {prefix} images but {len(labels)} {prefix} labels",
            IDX_FIX,
        )
    return images[:, None].astype(np.float32) / 255.0, labels


def _read_idx(folder: Path, stem: str, ndim: int) -> np.ndarray:
    """Read an `ndim`-dimensional uint8 idx file (the MNIST family's format), gzipped or not.

    A truncated download or a foreign file would otherwise fail deep in numpy, or reshape
    into garbage: any damage is a `ScenarioError` naming the file.
    """
    path = folder / f"{stem}.gz"
    if not path.is_file():
        path = folder / stem
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except FileNotFoundError:
        raise ScenarioError("dataset.root", f"'{path}(.gz)' is missing", IDX_FIX) from None
    except (OSError, EOFError, zlib.error) as error:  # not gzip, truncated gzip, bad deflate data or CRC
        raise ScenarioError("dataset.root", f"'{path}' cannot be read: {error}", IDX_FIX) from None
    try:
        return _idx_array(raw, ndim)
    except ValueError as error:
        raise ScenarioError("dataset.root", f"'{path}' is not a valid idx file: {error}", IDX_FIX) from None


def _idx_array(raw: bytes, ndim: int) -> np.ndarray:
    """The array in an idx file's bytes; a `ValueError` saying how they differ from the format."""
    magic = bytes([0, 0, IDX_UBYTE, ndim])
    header = 4 + 4 * ndim
    if raw[:4] != magic:
        raise ValueError(f"magic number 0x{raw[:4].hex()}, expected 0x{magic.hex()} (uint8, {ndim} dimensions)")
    if len(raw) < header:
        raise ValueError(f"{len(raw)} bytes, shorter than its {header}-byte header")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != math.prod(shape):
        raise ValueError(
            f"its header declares shape {shape} ({math.prod(shape)} bytes) but it holds {len(raw) - header} "
            "(truncated or damaged)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


# What torchvision raises for a copy it cannot use: RuntimeError for one it finds missing (or,
# for CIFAR, failing its checksum) or cannot reshape, OSError for a failed download, and
# AssertionError, ValueError, TypeError or KeyError from its idx reader for a damaged header.
_TORCHVISION_ERRORS = (RuntimeError, OSError, AssertionError, ValueError, TypeError, KeyError)


def _torchvision(class_name: str):
    def load(root: str | None) -> tuple[torch.Tensor, ...]:
        import torchvision.datasets as tv

        folder = root or "data"
        dataset_class = getattr(tv, class_name)
        try:
            train = _open_torchvision(dataset_class, folder, train=True)
            test = _open_torchvision(dataset_class, folder, train=False)
        except _TORCHVISION_ERRORS as error:
            raise ScenarioError(
                "dataset.root",
                f"{class_name} not found or unreadable under '{folder}', and no intact copy could be downloaded "
                f"(torchvision: {str(error).strip() or type(error).__name__})",
                "set dataset.root to a folder holding torchvision's copy; delete a damaged copy to download it again",
            ) from None
        return _tensors(*_as_arrays(train), *_as_arrays(test))

    return load


def _open_torchvision(dataset_class, root: str, train: bool):
    """The copy under `root`; failing that, let torchvision download what is missing or fails its checks."""
    try:
        return dataset_class(root, train=train, download=False)
    except _TORCHVISION_ERRORS:
        return dataset_class(root, train=train, download=True)


def _as_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(dataset.data, dtype=np.float32) / 255.0
    data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return data, np.asarray(dataset.targets)


def _tensors(x_train, y_train, x_test, y_test) -> tuple[torch.Tensor, ...]:
    import torch

    return (
        torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32),
        torch.from_numpy(np.array(y_train, dtype=np.int64)),  # a copy: idx labels are read-only buffers
        torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32),
        torch.from_numpy(np.array(y_test, dtype=np.int64)),
    )


# The one place a dataset is added (see the module docstring).
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(_digits, (1, 8, 8), 10, "scikit-learn's digits, bundled"),
    "fashion_mnist": DatasetSpec(_fashion_mnist, (1, 28, 28), 10, "Fashion-MNIST (idx files)"),
    "mnist": DatasetSpec(_torchvision("MNIST"), (1, 28, 28), 10, "torchvision's MNIST"),
    "cifar10": DatasetSpec(_torchvision("CIFAR10"), (3, 32, 32), 10, "torchvision's CIFAR-10"),
    "cifar100": DatasetSpec(_torchvision("CIFAR100"), (3, 32, 32), 100, "torchvision's CIFAR-100"),
}
