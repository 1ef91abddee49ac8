"""Canaries for the one-run privacy audit: held-out images with wrong labels, each in or out by a coin flip.

Steinke, Nasr & Jagielski (2023, "Privacy auditing with one (1) training run") audit a
DP training run with m canaries, each included in the training data independently with
probability 1/2; an auditor who guesses the coin flips from the trained model can be
right only so often under (ε, δ)-DP (`fedtide.audit.canaries`).

A canary here is a TEST image (never anyone's training data) with a label that is not
its class, so the model gives it that label only if it saw and memorised it. Each is
drawn, from the scenario seed alone, an experience, an image of one of its classes, a
label among its other classes, and a client; its coin decides whether it joins that
client's training data of that experience. This module only draws them (numpy, no data loading):
`fedtide.data.stream_plan` places the included ones in their clients' planned samples and
`fedtide.data.stream` in the training pool.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from fedtide.errors import ScenarioError

FIELD = "audit.canaries"
_STREAM = zlib.crc32(b"fedtide canaries")  # keeps the canary draws apart from every other seeded draw


@dataclass(frozen=True, eq=False)
class Canaries:
    """m canaries, one entry per canary in every array (canary j is entry j)."""

    image: np.ndarray  # its image's index in the test data
    true_class: np.ndarray  # that image's class
    label: np.ndarray  # the wrong label it is trained with, a class of `experience`
    experience: np.ndarray
    client: np.ndarray
    included: np.ndarray  # bool: the coin flip; only these are ever trained on

    def __len__(self) -> int:
        return len(self.image)

    def joining(self, experience: int) -> np.ndarray:
        """The included canaries of `experience`, in canary order: they follow its regular training samples."""
        return np.flatnonzero(self.included & (self.experience == experience))


def canary_capacity(test_labels: np.ndarray) -> int:
    """How many canaries the test data can give at most: half of each class's images (the rest measure accuracy)."""
    return int(sum(count // 2 for count in np.bincount(test_labels)))


def draw_canaries(
    count: int, test_labels: np.ndarray, classes: list[list[int]], num_clients: int, seed: int
) -> Canaries:
    """Draw `count` canaries from the test data, seeded by `seed` alone.

    Canary by canary: an experience, uniform over those that can still give one; an image,
    uniform over the test images of that experience's classes (of any other class when
    the experience has only one), a class giving at most half of its images; a label,
    uniform over the experience's classes other than the image's. Then a client for each,
    uniform, and a fair coin. A canary is thus an image of its experience mislabelled as
    another class of it: a model that has not seen it gives that label little probability
    even once the experience's classes are partly forgotten. The draws use their own
    random streams, so e.g. the coins do not change with the number of clients.
    """
    capacity = canary_capacity(test_labels)
    if count > capacity:
        raise _too_many(count, capacity, len(test_labels))
    pick_rng, label_rng, client_rng, coin_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, _STREAM]).spawn(4)
    )
    # Each class's test images in a seeded order; a class gives its first `left[c]` still unused.
    queues = {c: list(pick_rng.permutation(np.flatnonzero(test_labels == c))) for c in np.unique(test_labels)}
    left = {c: len(queue) // 2 for c, queue in queues.items()}
    image, experience, label = [], [], []
    for _ in range(count):
        sources = [_image_classes(group, classes, left) for group in classes]
        open_experiences = [e for e, source in enumerate(sources) if source]
        if not open_experiences:
            raise _too_many(count, len(image), len(test_labels))
        e = open_experiences[pick_rng.integers(len(open_experiences))]
        weights = np.asarray([left[c] for c in sources[e]], dtype=float)
        own = sources[e][pick_rng.choice(len(weights), p=weights / weights.sum())]
        left[own] -= 1
        image.append(queues[own].pop())
        experience.append(e)
        others = [c for c in classes[e] if c != own]
        label.append(others[label_rng.integers(len(others))])
    client = client_rng.integers(num_clients, size=count)
    included = coin_rng.random(count) < 0.5
    image = np.asarray(image, dtype=np.int64)
    return Canaries(
        image=image,
        true_class=test_labels[image].astype(np.int64),
        label=np.asarray(label, dtype=np.int64),
        experience=np.asarray(experience, dtype=np.int64),
        client=client.astype(np.int64),
        included=included,
    )


def _image_classes(group: list[int], classes: list[list[int]], left: dict[int, int]) -> list[int]:
    """The classes an experience of classes `group` may take a canary image from (those with images left)."""
    if len(group) > 1:
        return [c for c in group if left.get(c, 0)]
    return [c for other in classes for c in other if c not in group and left.get(c, 0)]


def _too_many(count: int, possible: int, test_size: int) -> ScenarioError:
    return ScenarioError(
        FIELD,
        f"{count} canaries, but the test data ({test_size} images) can give at most {possible}: canaries take at "
        "most half of each class's test images (the rest measure accuracy), from their experience's classes",
        f"use at most {possible} canaries",
    )
