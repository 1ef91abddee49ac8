"""The input transform of each experience of a domain-incremental stream, drawn as Avalanche's generators draw it.

`rotation` is RotatedMNIST's: a fixed `RandomRotation(degrees=(a, a))` per experience, the
angle from `stream.domain.angles` or `numpy.random.RandomState(seed).randint(-180, 181)`;
`permutation` is PermutedMNIST's: `PixelsPermutation` of `RandomState(seed).permutation`
over every pixel. fedtide's images are standardised, so the corners a rotation uncovers
are filled with the training set's smallest value (the background) rather than 0.
Avalanche's generators build their benchmarks on MNIST downloads, so only their
transforms and draws are taken here; the transform is frozen into the Avalanche dataset
(`DefaultTransformGroups`), as theirs are, and applies wherever the sample is read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from avalanche.benchmarks.classic.cmnist import PixelsPermutation
from torchvision.transforms import RandomRotation

from fedtide.scenario.stream import StreamConfig

Transform = Callable[[torch.Tensor], torch.Tensor]


def domain_transforms(stream: StreamConfig, seed: int, train_x: torch.Tensor) -> list[Transform]:
    """One transform per experience of the domain stream `stream`, for images shaped like `train_x`'s."""
    rng = np.random.RandomState(seed)
    config = stream.transform
    if config.transform == "permutation":
        pixels = int(np.prod(train_x.shape[1:]))
        return [PixelsPermutation(torch.from_numpy(rng.permutation(pixels))) for _ in range(stream.n_experiences)]
    background = float(train_x.min())
    return [RandomRotation(degrees=(angle, angle), fill=background) for angle in rotation_angles(stream, seed)]


def rotation_angles(stream: StreamConfig, seed: int) -> list[float]:
    """The rotation of each experience in degrees: listed, or RotatedMNIST's seeded draw."""
    if stream.transform.angles is not None:
        return list(stream.transform.angles)
    rng = np.random.RandomState(seed)
    return [float(rng.randint(-180, 181)) for _ in range(stream.n_experiences)]


def transformed(images: torch.Tensor, transform: Transform) -> torch.Tensor:
    """`images` under `transform`, each as it would be alone.

    A fixed rotation of the whole batch gives each image exactly what rotating it alone
    gives (tests/test_stream_schedules.py pins it) in a fraction of the time; a permutation
    must go image by image (on a batch it would permute across images).
    """
    if isinstance(transform, RandomRotation):
        return transform(images)
    return torch.stack([transform(image) for image in images])


def is_cheap_per_sample(transform: Transform) -> bool:
    """Whether applying `transform` as each sample is read costs little: a permutation is an index, a
    rotation an interpolation (several times a permuted run's training time), so rotated images are made once."""
    return not isinstance(transform, RandomRotation)
