"""Replay under DP-SGD: one independent coin per sample keeps the buffer, so adding a sample to a
client's data changes no other sample's membership (Avalanche's reservoir swaps one out), and the
replayed samples are drawn by the accounted Poisson loader at the planned rate."""

import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

from fedtide.client.schedule import train_schedule
from fedtide.client.training import seed_everything
from fedtide.continual.builtin import Replay
from fedtide.data.stream import training_pool
from fedtide.data.stream_plan import stream_plan
from fedtide.errors import ScenarioError
from fedtide.privacy.coins import SampleCoins
from fedtide.privacy.dp_sgd import ClientPrivacy
from fedtide.privacy.footprint import PrivateFootprint
from fedtide.runner.validation import check_runnable
from fedtide.scenario.schema import PrivacyConfig
from tests.conftest import flat, initial_arrays, small_scenario, stored_method_state

SCENARIO = small_scenario()  # digits, 3 experiences, 4 Dirichlet clients
CLIENT = 1  # 97, 240 and 150 samples in the three experiences


def own_ids(scenario, client: int) -> list[list[int]]:
    """Sample ids of the client's data in each experience, in the client's order."""
    return [exp.train.tolist() for exp in stream_plan(scenario).client(client).experiences]


def buffer_after(ids: list[list[int]], mem_size: int, seed: int, private: bool, sizes=None) -> set[int]:
    """The buffer after consolidating each experience of `ids` as the client's rounds do, with or without DP.

    Under DP the coins' rates come from `sizes`, the planned sizes (those of `ids` unless given):
    neighbouring datasets are compared at the same public sizes, as the accountant compares them
    at the same sample rate.
    """
    pool = training_pool(SCENARIO)
    method = Replay(mem_size)
    method.bind(None, pool)
    if private:
        planned = sizes or [len(part) for part in ids]
        method.use_privacy(ClientPrivacy(PrivacyConfig(enabled=True), 1.0, [], SampleCoins(seed, CLIENT), planned))
    experiences = benchmark_from_datasets(train=[pool.subset(part) for part in ids]).train_stream
    for index, experience in enumerate(experiences):
        seed_everything(seed, CLIENT, 2 * index + 3)  # the round that consolidates it
        method.consolidate(SimpleNamespace(experience=experience))
    return {int(i) for i in method.storage.buffer.sample_id}


def test_adding_a_sample_changes_no_other_membership_under_dp_but_swaps_one_out_of_the_reservoir():
    ids = own_ids(SCENARIO, CLIENT)[:2]
    sizes = [len(part) for part in ids]
    outsiders = [own_ids(SCENARIO, 0)[e] for e in range(2)]  # another client's samples of the same experiences
    rng = np.random.default_rng(0)
    x_kept = 0
    for seed in range(40):
        experience = int(rng.integers(2))
        x = int(rng.choice(outsiders[experience]))
        added = [list(part) for part in ids]
        added[experience].insert(int(rng.integers(len(ids[experience]) + 1)), x)
        d = buffer_after(ids, 60, seed, private=True, sizes=sizes)
        d_plus_x = buffer_after(added, 60, seed, private=True, sizes=sizes)
        assert d_plus_x ^ d <= {x}, (seed, x)
        x_kept += x in d_plus_x
    assert 0 < x_kept < 40  # x's own coin decides: in the buffer of some seeds, not of others

    # Avalanche's reservoir, with x last in the experience's data so every other sample keeps its key:
    # whenever x's key ranks in, it takes exactly one other sample's place (a substitution)
    first = ids[0]
    swaps = 0
    for seed in range(20):
        x = int(outsiders[0][seed])
        d = buffer_after([first], 30, seed, private=False)
        d_plus_x = buffer_after([first + [x]], 30, seed, private=False)
        if x in d_plus_x:
            assert d_plus_x - d == {x} and len(d - d_plus_x) == 1, seed
            swaps += 1
        else:
            assert d_plus_x == d
    assert swaps > 0


def test_the_dp_buffer_has_a_random_size_of_mem_size_in_expectation():
    ids = own_ids(SCENARIO, CLIENT)[:2]  # 97 and 240 samples: a share of 30 each
    sizes = [len(buffer_after(ids, 60, seed, private=True)) for seed in range(300)]
    assert PrivateFootprint(replay_capacity=60).extra_samples([len(part) for part in ids]) == 60
    assert abs(statistics.mean(sizes) - 60) < 2.0  # its standard error is about 0.4
    assert min(sizes) < 60 < max(sizes)
    # an experience with fewer samples than its share is kept whole: 10 + 30 expected
    small = [ids[0][:10], ids[1]]
    sizes = [len(buffer_after(small, 60, seed, private=True)) for seed in range(300)]
    assert PrivateFootprint(replay_capacity=60).extra_samples([10, len(ids[1])]) == 40
    assert abs(statistics.mean(sizes) - 40) < 1.5


def dp_replay(mode: str = "hooks"):
    return small_scenario(
        partition={"kind": "iid", "num_clients": 2},
        continual={"method": "replay", "mem_size": 40},
        privacy={"enabled": True, "noise_multiplier": 1.0, "grad_sample_mode": mode},
    )


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_replay_round_draws_the_coin_buffer_inside_the_planned_poisson_loader(mode, monkeypatch):
    scenario = dp_replay(mode)
    made = []
    make_private = ClientPrivacy.make_private

    def spy(self, model, optimizer, dataset, batch_size, criterion, planned_samples=None):
        private = make_private(self, model, optimizer, dataset, batch_size, criterion, planned_samples)
        made.append((dataset, planned_samples, private))
        return private

    monkeypatch.setattr(ClientPrivacy, "make_private", spy)
    schedule = [(0, 1), (1, 3), (2, 5)]
    rounds = train_schedule(scenario, 0, schedule, initial_arrays(scenario))

    ids = own_ids(scenario, 0)
    sizes = [len(part) for part in ids]
    stored = stored_method_state(rounds[-1].state, scenario)
    assert stored["policy"] == "coins" and sorted(stored["groups"]) == [0, 1]
    coins = SampleCoins(scenario.seed, 0)
    buffer = set()
    for e in (0, 1):  # each kept by its own coin at rate share / planned size, nothing else
        group = stored["groups"][e]
        assert group["rate"] == pytest.approx(20 / sizes[e]) and group["size"] == sizes[e]
        assert set(group["ids"]) == {i for i, u in zip(ids[e], coins(ids[e])) if u < group["rate"]}
        buffer |= set(group["ids"])
    assert buffer  # replayed

    dataset, planned, private = made[-1]
    assert set(np.asarray(dataset.sample_id).tolist()) == set(ids[2]) | buffer  # replayed inside the DP loader
    assert private.loader.batch_sampler.num_samples == len(dataset) == sizes[2] + len(buffer)
    assert planned == sizes[2] + PrivateFootprint(replay_capacity=40).extra_samples(sizes[:2]) == sizes[2] + 40
    steps = math.ceil(planned / 32)
    assert private.loader.sample_rate == pytest.approx(1 / steps)
    assert private.optimizer.expected_batch_size == int(planned * (1 / steps))  # the planned mean batch
    # the accountant charged every round at its planned size: own samples plus the expected buffer
    footprint = PrivateFootprint(replay_capacity=40)
    expected = {}
    for e, _ in schedule:
        round_steps = math.ceil((sizes[e] + footprint.extra_samples(sizes[:e])) / 32)
        expected[1 / round_steps] = expected.get(1 / round_steps, 0) + round_steps * scenario.client.epochs
    record = rounds[-1].reply["privacy"]
    accounted = {}
    for sigma, rate, count in zip(record["sigmas"], record["rates"], record["steps"]):
        assert sigma == 1.0
        accounted[rate] = accounted.get(rate, 0) + count
    assert accounted == pytest.approx(expected)

    # the buffer travels as ids in the client's state: a client rebuilt from the state after
    # experience 1 trains experience 2 to the same weights
    resumed = train_schedule(scenario, 0, schedule[2:], rounds[1].reply["arrays"], rounds[1].state)
    assert np.array_equal(flat(resumed[-1].reply["arrays"]), flat(rounds[-1].reply["arrays"]))
    assert stored_method_state(resumed[-1].state, scenario) == stored


def test_class_balanced_replay_is_refused_under_dp():
    scenario = small_scenario(
        continual={"method": "replay", "storage": "class"},
        privacy={"enabled": True, "noise_multiplier": 1.0},
        resources={"backend": "in_process"},
    )
    with pytest.raises(ScenarioError, match="storage: experience"):
        check_runnable(scenario)
