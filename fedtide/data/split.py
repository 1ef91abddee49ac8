"""Which samples each experience holds, and each client's share of them, as plain index arrays.

A class-incremental split needs no Avalanche: an experience is the samples of its
classes. fedtide draws the class order as Avalanche's `class_incremental_benchmark`
would from a seed (`torch.randperm` after seeding), from a generator of its own, and
hands that order to Avalanche, so the stream it builds (`fedtide.data.stream`) and these
indices agree sample for sample (tests/test_stream.py). Validation, the server's
evaluation and the accountant's sampling rates use them without importing Avalanche.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedtide.data.datasets import load_dataset
from fedtide.data.partition import check_num_clients, partition_experiences
from fedtide.data.schema import PartitionConfig, Scenario

# What a split depends on: dataset name, root, experiences, class order given, seed.
SplitKey = tuple[str, str | None, int, tuple[int, ...] | None, int]


def classes_per_experience(num_classes: int, n_experiences: int) -> list[int]:
    """How many classes each experience gets: as equal as possible, earlier ones take the rest.

    Every class is used: 10 classes in 3 experiences give 4, 3, 3 (Avalanche's
    `nc_benchmark` would refuse or drop classes instead).
    """
    base, extra = divmod(num_classes, n_experiences)
    return [base + (1 if e < extra else 0) for e in range(n_experiences)]


def split_key(scenario: Scenario) -> SplitKey:
    order = tuple(scenario.stream.class_order) if scenario.stream.class_order else None
    root = str(scenario.dataset.root) if scenario.dataset.root else None
    return scenario.dataset.name, root, scenario.stream.n_experiences, order, scenario.seed


@lru_cache(maxsize=4)
def experience_classes(key: SplitKey) -> list[list[int]]:
    """The classes of each experience: the given order, else Avalanche's seeded permutation."""
    name, root, n_experiences, order, seed = key
    num_classes = int(load_dataset(name, root).train_y.max()) + 1
    if order is None:
        order = tuple(torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist())
    sizes = classes_per_experience(num_classes, n_experiences)
    starts = np.cumsum([0, *sizes])
    return [list(order[starts[e] : starts[e + 1]]) for e in range(n_experiences)]


def experience_samples(key: SplitKey, split: str) -> list[np.ndarray]:
    """Indices into the train or test data of each experience's samples, in Avalanche's order.

    Avalanche builds an experience by prepending each class's samples in turn, so its
    last class comes first; within a class, samples keep the dataset's order.
    """
    data = load_dataset(key[0], key[1])
    labels = (data.train_y if split == "train" else data.test_y).numpy()
    return [
        np.concatenate([np.flatnonzero(labels == c) for c in reversed(classes)])
        for classes in experience_classes(key)
    ]


def experience_partitions(scenario: Scenario) -> list[list[np.ndarray]]:
    """For each experience, the positions in its training data held by each client."""
    return _partitions(split_key(scenario), scenario.partition.model_dump_json())


@lru_cache(maxsize=4)
def _partitions(key: SplitKey, partition_json: str) -> list[list[np.ndarray]]:
    labels = load_dataset(key[0], key[1]).train_y.numpy()
    experiences = experience_samples(key, "train")
    config = PartitionConfig.model_validate_json(partition_json)
    check_num_clients([len(samples) for samples in experiences], config)
    return partition_experiences([labels[samples] for samples in experiences], config, seed=key[-1])
