"""Image datasets as in-memory tensors, found on disk without a network where possible.

A simulation reads each dataset once per process (server and every Ray worker), so
the loaded tensors are cached; they are read-only and never part of client state.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedtide.errors import ScenarioError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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


def load_dataset(name: str, root: str | None = None) -> ImageData:
    """Load a dataset by scenario name; a missing one is a `ScenarioError` saying where we looked."""
    return _load_cached(name, str(root) if root is not None else None)


@lru_cache(maxsize=4)
def _load_cached(name: str, root: str | None) -> ImageData:
    loaders = {
        "digits": _digits,
        "fashion_mnist": _fashion_mnist,
        "mnist": _torchvision("MNIST"),
        "cifar10": _torchvision("CIFAR10"),
        "cifar100": _torchvision("CIFAR100"),
    }
    if name not in loaders:
        raise ScenarioError("dataset.name", f"unknown dataset '{name}'", f"one of {sorted(loaders)}")
    train_x, train_y, test_x, test_y = loaders[name](root)
    mean, std = train_x.mean(), train_x.std()
    return ImageData((train_x - mean) / std, train_y, (test_x - mean) / std, test_y)


def _digits(root: str | None) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits, with a fixed stratified 75/25 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, stratify=digits.target, random_state=0
    )
    return _tensors(x_train, y_train, x_test, y_test)


def _fashion_mnist(root: str | None) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST idx files from `root`, the Debian package, or torchvision's download."""
    candidates = [Path(root)] if root else []
    candidates += [DEBIAN_FASHION_MNIST]
    for folder in candidates:
        for sub in (folder, folder / "FashionMNIST" / "raw"):
            if (sub / "train-images-idx3-ubyte.gz").is_file() or (sub / "train-images-idx3-ubyte").is_file():
                return _tensors(
                    _read_idx(sub, "train-images-idx3-ubyte")[:, None] / 255.0,
                    _read_idx(sub, "train-labels-idx1-ubyte"),
                    _read_idx(sub, "t10k-images-idx3-ubyte")[:, None] / 255.0,
                    _read_idx(sub, "t10k-labels-idx1-ubyte"),
                )
    try:
        return _torchvision("FashionMNIST")(root)
    except ScenarioError:
        looked = ", ".join(str(c) for c in candidates)
        raise ScenarioError(
            "dataset.root",
            f"Fashion-MNIST not found (looked in {looked}, and torchvision could not download it)",
            "apt-get install dataset-fashion-mnist, or set dataset.root to a folder with the idx files",
        ) from None


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    """Read an idx file (the MNIST family's format), gzipped or not."""
    path = folder / f"{stem}.gz"
    raw = gzip.decompress(path.read_bytes()) if path.is_file() else (folder / stem).read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).astype(np.float32)


def _torchvision(class_name: str):
    def load(root: str | None) -> tuple[torch.Tensor, ...]:
        import torchvision.datasets as tv

        folder = root or "data"
        dataset_class = getattr(tv, class_name)
        try:
            train = _open_torchvision(dataset_class, folder, train=True)
            test = _open_torchvision(dataset_class, folder, train=False)
        except (RuntimeError, OSError):
            raise ScenarioError(
                "dataset.root",
                f"{class_name} not found under '{folder}' and could not be downloaded",
                "set dataset.root to a folder holding torchvision's copy of it",
            ) from None
        return _tensors(*_as_arrays(train), *_as_arrays(test))

    return load


def _open_torchvision(dataset_class, root: str, train: bool):
    try:
        return dataset_class(root, train=train, download=False)
    except RuntimeError:
        return dataset_class(root, train=train, download=True)


def _as_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(dataset.data, dtype=np.float32) / 255.0
    data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return data, np.asarray(dataset.targets)


def _tensors(x_train, y_train, x_test, y_test) -> tuple[torch.Tensor, ...]:
    return (
        torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32),
        torch.as_tensor(np.asarray(y_train), dtype=torch.long),
        torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32),
        torch.as_tensor(np.asarray(y_test), dtype=torch.long),
    )
