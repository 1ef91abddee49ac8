"""The class-incremental stream uses every class, and partitions cover each experience exactly."""

import numpy as np
import pytest

from fedtide.data.split import classes_per_experience, experience_partitions, experience_samples, split_key
from fedtide.data.stream import build_stream, client_experiences
from tests.conftest import small_scenario


def test_uneven_split_uses_every_class():
    assert classes_per_experience(10, 3) == [4, 3, 3]
    assert classes_per_experience(10, 5) == [2, 2, 2, 2, 2]
    assert sum(classes_per_experience(100, 7)) == 100


def test_stream_classes_are_disjoint_and_complete():
    stream = build_stream(small_scenario())
    flat = [c for classes in stream.classes for c in classes]
    assert sorted(flat) == list(range(10))
    assert [len(c) for c in stream.classes] == [4, 3, 3]
    for classes, train, test in zip(stream.classes, stream.train, stream.test):
        assert set(train.targets) == set(classes) == set(test.targets)
    assert sum(len(t) for t in stream.train) == len(stream.full_train)


@pytest.mark.parametrize("seed", [0, 3])
def test_the_index_split_is_the_avalanche_stream_sample_for_sample(seed):
    """Validation, evaluation and accounting read `split`; clients train on Avalanche's stream."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

    scenario = small_scenario(seed=seed)
    stream = build_stream(scenario)
    key = split_key(scenario)
    for split, experiences in (("train", stream.train), ("test", stream.test)):
        assert [list(exp.sample_id) for exp in experiences] == [s.tolist() for s in experience_samples(key, split)]
    # the class order is the one Avalanche draws itself from the seed
    seeded = class_incremental_benchmark(
        {"train": stream.full_train}, num_classes_per_exp=[4, 3, 3], seed=seed
    ).train_stream
    assert [sorted(exp.classes_in_this_experience) for exp in seeded] == stream.classes


def test_given_class_order_is_followed():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    stream = build_stream(small_scenario(stream={"n_experiences": 5, "class_order": order}))
    assert stream.classes == [[8, 9], [6, 7], [4, 5], [2, 3], [0, 1]]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "shard"])
def test_partitions_cover_each_experience_once(kind):
    scenario = small_scenario(partition={"kind": kind, "num_clients": 4, "alpha": 0.3})
    stream = build_stream(scenario)
    for e, shares in enumerate(experience_partitions(scenario)):
        assert len(shares) == 4
        held = np.sort(np.concatenate(shares))
        if kind == "shard":  # ShardPartitioner may leave an incomplete last shard out
            assert len(np.unique(held)) == len(held) <= len(stream.train[e])
        else:
            assert held.tolist() == list(range(len(stream.train[e])))


def test_partitions_are_seeded_and_label_skewed():
    scenario = small_scenario(partition={"kind": "dirichlet", "alpha": 0.1, "num_clients": 4})
    first = experience_partitions(scenario)
    again = experience_partitions(small_scenario(partition={"kind": "dirichlet", "alpha": 0.1, "num_clients": 4}))
    assert all(np.array_equal(a, b) for ea, eb in zip(first, again) for a, b in zip(ea, eb))
    other_seed = experience_partitions(
        small_scenario(seed=1, partition={"kind": "dirichlet", "alpha": 0.1, "num_clients": 4})
    )
    assert any(not np.array_equal(a, b) for ea, eb in zip(first, other_seed) for a, b in zip(ea, eb))
    own = client_experiences(scenario, 0)
    assert [len(d) for d in own] == [len(first[e][0]) for e in range(3)]
    assert set(own[0].targets) <= set(build_stream(scenario).classes[0])
