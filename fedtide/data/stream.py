"""The class-incremental stream, global (server) and per client.

Avalanche's `class_incremental_benchmark` splits the classes into experiences; each
experience's training data is then partitioned across clients. Every sample carries
a `sample_id` data attribute (its index in the full training set) so a replay buffer
can be stored in client state as plain indices and rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import (
    TaskAwareSupervisedClassificationDataset,
    _make_taskaware_tensor_classification_dataset,
)

from fedtide.data.datasets import ImageData, load_dataset
from fedtide.data.partition import check_num_clients, partition_labels
from fedtide.data.schema import PartitionConfig, Scenario

Dataset = TaskAwareSupervisedClassificationDataset


def classes_per_experience(num_classes: int, n_experiences: int) -> list[int]:
    """How many classes each experience gets: as equal as possible, earlier ones take the rest.

    Every class is used: 10 classes in 3 experiences give 4, 3, 3 (Avalanche's
    `nc_benchmark` would refuse or drop classes instead).
    """
    base, extra = divmod(num_classes, n_experiences)
    return [base + (1 if e < extra else 0) for e in range(n_experiences)]


@dataclass(frozen=True)
class ClassIncrementalStream:
    """Per-experience train/test datasets of the whole population, and their classes."""

    data: ImageData
    full_train: Dataset
    train: list[Dataset]
    test: list[Dataset]
    classes: list[list[int]]


def build_stream(scenario: Scenario) -> ClassIncrementalStream:
    """The scenario's stream, cached per process (it depends only on data, order and seed)."""
    return _build_stream(*_stream_key(scenario))


def _stream_key(scenario: Scenario) -> tuple:
    order = tuple(scenario.stream.class_order) if scenario.stream.class_order else None
    root = str(scenario.dataset.root) if scenario.dataset.root else None
    return scenario.dataset.name, root, scenario.stream.n_experiences, order, scenario.seed


@lru_cache(maxsize=4)
def _build_stream(name: str, root: str | None, n_experiences: int, order: tuple[int, ...] | None, seed: int):
    data = load_dataset(name, root)
    train = _with_sample_ids(data.train_x, data.train_y)
    test = _with_sample_ids(data.test_x, data.test_y)
    sizes = classes_per_experience(int(data.train_y.max()) + 1, n_experiences)
    benchmark = class_incremental_benchmark(
        {"train": train, "test": test},
        class_order=list(order) if order else None,
        num_classes_per_exp=sizes,
        seed=None if order else seed,
    )
    return ClassIncrementalStream(
        data=data,
        full_train=train,
        train=[exp.dataset for exp in benchmark.train_stream],
        test=[exp.dataset for exp in benchmark.test_stream],
        classes=[sorted(exp.classes_in_this_experience) for exp in benchmark.train_stream],
    )


def _with_sample_ids(x, y) -> Dataset:
    base = _make_taskaware_tensor_classification_dataset(x, y, targets=y.tolist(), task_labels=0)
    return Dataset([base], data_attributes=[DataAttribute(list(range(len(y))), "sample_id")])


def client_experiences(scenario: Scenario, partition_id: int) -> list[Dataset]:
    """The client's own training data in each experience (possibly empty in some)."""
    stream = build_stream(scenario)
    shares = experience_partitions(scenario)
    return [exp.subset(shares[e][partition_id].tolist()) for e, exp in enumerate(stream.train)]


def experience_partitions(scenario: Scenario) -> list[list[np.ndarray]]:
    """For each experience, the positions in its training data held by each client."""
    return _partitions(_stream_key(scenario), scenario.partition.model_dump_json())


@lru_cache(maxsize=4)
def _partitions(stream_key: tuple, partition_json: str) -> list[list[np.ndarray]]:
    stream = _build_stream(*stream_key)
    config = PartitionConfig.model_validate_json(partition_json)
    seed = stream_key[-1]
    check_num_clients([len(exp) for exp in stream.train], config)
    return [
        partition_labels(np.asarray(exp.targets), config, seed=seed * 1000 + e) for e, exp in enumerate(stream.train)
    ]
