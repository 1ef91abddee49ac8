"""The class-incremental stream, global (server) and per client.

Avalanche's `class_incremental_benchmark` splits the classes into experiences; each
experience's training data is then partitioned across clients. Every sample carries
a `sample_id` data attribute (its index in the full training set) so a replay buffer
can be stored in client state as plain indices and rebuilt exactly.

Under a canary audit the training pool goes on after the training set with one row per
canary (sample id N + j for canary j of N training samples), and each experience's
training data with the canaries whose coin put them in it (`fedtide.data.split`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import (
    TaskAwareSupervisedClassificationDataset,
    _make_taskaware_tensor_classification_dataset,
)

from fedtide.data.datasets import ImageData, load_dataset
from fedtide.data.schema import Scenario
from fedtide.data.split import (
    SplitKey,
    canaries_of,
    experience_classes,
    experience_partitions,
    split_key,
)

Dataset = TaskAwareSupervisedClassificationDataset


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
    return _build_stream(split_key(scenario))


@lru_cache(maxsize=4)
def _build_stream(key: SplitKey) -> ClassIncrementalStream:
    data = load_dataset(key[0], key[1])
    train = _with_sample_ids(data.train_x, data.train_y)
    test = _with_sample_ids(data.test_x, data.test_y)
    classes = experience_classes(key)
    benchmark = class_incremental_benchmark(
        {"train": train, "test": test},
        class_order=[c for group in classes for c in group],
        num_classes_per_exp=[len(group) for group in classes],
    )
    return ClassIncrementalStream(
        data=data,
        full_train=train,
        train=[exp.dataset for exp in benchmark.train_stream],
        test=[exp.dataset for exp in benchmark.test_stream],
        classes=[sorted(group) for group in classes],
    )


def _with_sample_ids(x, y, first_id: int = 0) -> Dataset:
    base = _make_taskaware_tensor_classification_dataset(x, y, targets=y.tolist(), task_labels=0)
    return Dataset([base], data_attributes=[DataAttribute(list(range(first_id, first_id + len(y))), "sample_id")])


@dataclass(frozen=True)
class TrainingData:
    """What clients train on: every sample by its sample id, and each experience's training data."""

    pool: Dataset  # pool.subset(ids) is the samples of those sample ids
    experiences: list[Dataset]


def training_data(scenario: Scenario) -> TrainingData:
    """The stream's training data, followed by the audit's canaries when there are any (cached per process)."""
    if not scenario.audit.canaries:
        stream = build_stream(scenario)
        return TrainingData(stream.full_train, stream.train)
    return _with_canaries(split_key(scenario), scenario.audit.canaries, scenario.partition.num_clients)


@lru_cache(maxsize=4)
def _with_canaries(key: SplitKey, count: int, num_clients: int) -> TrainingData:
    stream = _build_stream(key)
    canaries = canaries_of(key, count, num_clients)
    data = stream.data
    rows = _with_sample_ids(
        data.test_x[torch.from_numpy(canaries.image)], torch.from_numpy(canaries.label), first_id=len(stream.full_train)
    )
    return TrainingData(
        pool=stream.full_train.concat(rows),
        experiences=[exp.concat(rows.subset(canaries.joining(e).tolist())) for e, exp in enumerate(stream.train)],
    )


def client_experiences(scenario: Scenario, partition_id: int) -> list[Dataset]:
    """The client's own training data in each experience (possibly empty in some), its canaries included."""
    experiences = training_data(scenario).experiences
    shares = experience_partitions(scenario)
    return [exp.subset(shares[e][partition_id].tolist()) for e, exp in enumerate(experiences)]
