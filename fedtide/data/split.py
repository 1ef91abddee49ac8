"""Which samples each experience holds, and each client's share of them, as plain index arrays.

A class-incremental split needs no Avalanche: an experience is the samples of its
classes. fedtide draws the class order as Avalanche's `class_incremental_benchmark`
would from a seed (`torch.randperm` after seeding), from a generator of its own, and
hands that order to Avalanche, so the stream it builds (`fedtide.data.stream`) and these
indices agree sample for sample (tests/test_stream.py). Validation, the server's
evaluation and the accountant's sampling rates use them without importing Avalanche.

Under a canary audit (`audit.canaries`, `fedtide.data.canaries`) an experience's training
data is its samples followed by the canaries whose coin put them in it; each canary's
position there is in its client's share, after the client's regular positions, which
stay exactly as without canaries. Canary images leave the test data accuracy is measured on.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedtide.data.canaries import Canaries, draw_canaries
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
    """For each experience, the positions in its training data held by each client, canaries included.

    Everything that trains or accounts for a client's data reads these: its datasets
    (`fedtide.data.stream.client_experiences`), its DP sample rates, planned steps and δ.
    """
    key, partition = split_key(scenario), scenario.partition.model_dump_json()
    if not scenario.audit.canaries:
        return _partitions(key, partition)
    return _partitions_with_canaries(key, partition, scenario.audit.canaries)


def regular_partitions(scenario: Scenario) -> list[list[np.ndarray]]:
    """`experience_partitions` without the canaries: positions into `experience_samples(key, "train")`."""
    return _partitions(split_key(scenario), scenario.partition.model_dump_json())


def experience_canaries(scenario: Scenario) -> Canaries | None:
    """The scenario's audit canaries (None without a canary audit), drawn once per process."""
    if not scenario.audit.canaries:
        return None
    return canaries_of(split_key(scenario), scenario.audit.canaries, scenario.partition.num_clients)


def evaluation_samples(scenario: Scenario) -> list[np.ndarray]:
    """Indices into the test data of each experience's samples that measure accuracy: all but canary images."""
    samples = experience_samples(split_key(scenario), "test")
    canaries = experience_canaries(scenario)
    if canaries is None:
        return samples
    return [ids[~np.isin(ids, canaries.image)] for ids in samples]


def held_out_test_samples(scenario: Scenario) -> np.ndarray:
    """Indices of the test images that no client may have trained on: all but canary images."""
    size = len(load_dataset(scenario.dataset.name, scenario.dataset.root).test_y)
    canaries = experience_canaries(scenario)
    everything = np.arange(size)
    return everything if canaries is None else np.setdiff1d(everything, canaries.image)


@lru_cache(maxsize=4)
def canaries_of(key: SplitKey, count: int, num_clients: int) -> Canaries:
    """`count` canaries for `num_clients` clients on the split `key` (`draw_canaries`)."""
    test_labels = load_dataset(key[0], key[1]).test_y.numpy()
    return draw_canaries(count, test_labels, experience_classes(key), num_clients, seed=key[-1])


@lru_cache(maxsize=4)
def _partitions_with_canaries(key: SplitKey, partition_json: str, count: int) -> list[list[np.ndarray]]:
    shares = _partitions(key, partition_json)
    canaries = canaries_of(key, count, len(shares[0]))
    with_canaries = []
    for e, (samples, clients) in enumerate(zip(experience_samples(key, "train"), shares)):
        joining = canaries.joining(e)
        positions = len(samples) + np.arange(len(joining), dtype=np.int64)
        with_canaries.append(
            [np.concatenate([share, positions[canaries.client[joining] == c]]) for c, share in enumerate(clients)]
        )
    return with_canaries


@lru_cache(maxsize=4)
def _partitions(key: SplitKey, partition_json: str) -> list[list[np.ndarray]]:
    labels = load_dataset(key[0], key[1]).train_y.numpy()
    experiences = experience_samples(key, "train")
    config = PartitionConfig.model_validate_json(partition_json)
    check_num_clients([len(samples) for samples in experiences], config)
    return partition_experiences([labels[samples] for samples in experiences], config, seed=key[-1])
