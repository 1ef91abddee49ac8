"""Clients' Avalanche datasets, cut from the loaded tensors by the plan, are the ones Avalanche's benchmark gave.

Runs made before the StreamPlan trained on `class_incremental_benchmark`'s experiences,
partitioned by position; the plan's sample ids must reproduce them sample for sample, or
every number of a run moves.
"""

import numpy as np
import pytest
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

from fedtide.data.datasets import load_dataset
from fedtide.data.partition import partition_experiences
from fedtide.data.stream import Dataset, client_experiences, training_pool
from fedtide.data.stream_plan import experience_classes, stream_plan
from tests.conftest import small_scenario


def with_ids(x, y):
    """A tensor dataset whose samples carry their index as `sample_id`, as the training pool's do."""
    base = _make_taskaware_tensor_classification_dataset(x, y, targets=y.tolist(), task_labels=0)
    return Dataset([base], data_attributes=[DataAttribute(list(range(len(y))), "sample_id")])


@pytest.mark.parametrize("seed", [0, 3])
def test_client_datasets_are_avalanche_s_experiences_partitioned_by_position(seed):
    scenario = small_scenario(seed=seed)
    data = load_dataset("digits")
    classes = experience_classes(10, 3, None, seed)
    streams = class_incremental_benchmark(
        {"train": training_pool(scenario), "test": with_ids(data.test_x, data.test_y)},
        class_order=[c for group in classes for c in group],
        num_classes_per_exp=[len(group) for group in classes],
    )
    trains = [exp.dataset for exp in streams.train_stream]
    positions = partition_experiences([np.asarray(list(exp.targets)) for exp in trains], scenario.partition, seed)
    plan = stream_plan(scenario)
    for client in range(4):
        for e, dataset in enumerate(client_experiences(scenario, client)):
            expected = trains[e].subset(positions[e][client].tolist())
            planned = plan.client(client).experiences[e].train.tolist()
            assert list(dataset.sample_id) == list(expected.sample_id) == planned
            assert list(dataset.targets) == list(expected.targets)
    assert [list(exp.dataset.sample_id) for exp in streams.test_stream] == [ids.tolist() for ids in plan.test]
    # the class order is the one Avalanche draws itself from the seed
    drawn = class_incremental_benchmark({"train": training_pool(scenario)}, num_classes_per_exp=[4, 3, 3], seed=seed)
    assert [tuple(sorted(exp.classes_in_this_experience)) for exp in drawn.train_stream] == list(plan.classes)


def test_a_client_dataset_holds_its_planned_samples_with_their_images_and_labels():
    scenario = small_scenario(audit={"canaries": 40})
    data = load_dataset("digits")
    first_canary = len(data.train_y)
    canaries = stream_plan(scenario).canaries
    for e, dataset in enumerate(client_experiences(scenario, 2)):
        for i, sample_id in enumerate(stream_plan(scenario).client(2).experiences[e].train):
            x, y, task = dataset[i]
            if sample_id < first_canary:
                assert torch.equal(x, data.train_x[sample_id]) and y == data.train_y[sample_id]
            else:
                j = sample_id - first_canary
                assert torch.equal(x, data.test_x[canaries.image[j]]) and y == canaries.label[j]
            assert task == 0
