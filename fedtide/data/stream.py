"""The Avalanche datasets clients train on, cut from the loaded tensors by the StreamPlan's sample ids.

Every sample carries a `sample_id` data attribute (its id in the training pool, the
index the plan uses) so a replay buffer can be stored in client state as plain ids and
rebuilt exactly. A domain stream's pool is the training set once per experience, each
copy under its experience's transform (sample id d·N + i: sample i in experience d).
Under a canary audit the pool goes on after the training set with one
row per canary (sample id N + j for canary j of N training samples): its image from the
test data, its wrong label.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import (
    TaskAwareSupervisedClassificationDataset,
    _make_taskaware_tensor_classification_dataset,
)
from avalanche.benchmarks.utils.transform_groups import DefaultTransformGroups

from fedtide.data.datasets import load_dataset
from fedtide.data.domains import Transform, domain_transforms, is_cheap_per_sample, transformed
from fedtide.data.stream_plan import PlanInputs, build_plan, stream_plan
from fedtide.scenario.schema import Scenario

Dataset = TaskAwareSupervisedClassificationDataset


def training_pool(scenario: Scenario) -> Dataset:
    """Every sample a client may train on, by sample id (`pool.subset(ids)`); cached per process."""
    inputs = PlanInputs.of(scenario)
    if scenario.stream.kind == "domain":
        return _domain_pool(inputs)
    return _with_canaries(inputs) if inputs.canaries else _training_set(inputs.dataset, inputs.root)


@lru_cache(maxsize=4)
def _domain_pool(inputs: PlanInputs) -> Dataset:
    """The training set once per experience of a domain stream, each copy under its experience's transform:
    applied as a sample is read (a permutation), or once to the whole copy (a rotation)."""
    data = load_dataset(inputs.dataset, inputs.root)
    n = len(data.train_y)
    copies = [
        _with_sample_ids(data.train_x, data.train_y, first_id=d * n, transform=transform)
        if is_cheap_per_sample(transform)
        else _with_sample_ids(transformed(data.train_x, transform), data.train_y, first_id=d * n)
        for d, transform in enumerate(domain_transforms(inputs.stream_config, inputs.seed, data.train_x))
    ]
    pool = copies[0]
    for copy in copies[1:]:
        pool = pool.concat(copy)
    return pool


@lru_cache(maxsize=4)
def _training_set(name: str, root: str | None) -> Dataset:
    data = load_dataset(name, root)
    return _with_sample_ids(data.train_x, data.train_y)


@lru_cache(maxsize=4)
def _with_canaries(inputs: PlanInputs) -> Dataset:
    """The training set, then one row per canary of the plan (drawn for its clients and classes)."""
    data = load_dataset(inputs.dataset, inputs.root)
    canaries = build_plan(inputs).canaries
    images = data.test_x[torch.from_numpy(canaries.image)]
    rows = _with_sample_ids(images, torch.from_numpy(canaries.label), first_id=len(data.train_y))
    return _training_set(inputs.dataset, inputs.root).concat(rows)


def _with_sample_ids(
    x: torch.Tensor, y: torch.Tensor, first_id: int = 0, transform: Transform | None = None
) -> Dataset:
    base = _make_taskaware_tensor_classification_dataset(x, y, targets=y.tolist(), task_labels=0)
    ids = DataAttribute(list(range(first_id, first_id + len(y))), "sample_id")
    frozen = DefaultTransformGroups((transform, None)) if transform else None
    return Dataset([base], data_attributes=[ids], frozen_transform_groups=frozen)


def client_experiences(scenario: Scenario, client: int) -> list[Dataset]:
    """The client's own training data in each experience (possibly empty in some), as its plan lists it."""
    pool = training_pool(scenario)
    return [pool.subset(exp.train.tolist()) for exp in stream_plan(scenario).client(client).experiences]
