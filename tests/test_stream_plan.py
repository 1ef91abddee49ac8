"""The StreamPlan holds what each client trains on, and every consumer reads it rather than deriving its own."""

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedtide.audit import canaries, membership
from fedtide.data import stream
from fedtide.data.datasets import load_dataset
from fedtide.data.stream import client_experiences
from fedtide.data.stream_plan import classes_per_experience, stream_plan
from fedtide.models import build_scenario_model
from fedtide.privacy import accounting
from fedtide.privacy.footprint import PrivateFootprint
from fedtide.records.metrics import ClientRoundRecord
from fedtide.records.wire import experience_ends
from fedtide.server.continual_strategy import ContinualStrategy
from tests.conftest import small_scenario

TRAIN_LABELS = load_dataset("digits").train_y.numpy()
TEST_LABELS = load_dataset("digits").test_y.numpy()


def test_uneven_split_uses_every_class():
    assert classes_per_experience(10, 3) == [4, 3, 3]
    assert classes_per_experience(10, 5) == [2, 2, 2, 2, 2]
    assert sum(classes_per_experience(100, 7)) == 100


def test_experiences_have_disjoint_classes_covering_all_and_their_own_test_data():
    plan = stream_plan(small_scenario())
    assert [len(group) for group in plan.classes] == [4, 3, 3]
    assert sorted(c for group in plan.classes for c in group) == list(range(10))
    for group, test in zip(plan.classes, plan.test):
        assert sorted(set(TEST_LABELS[test].tolist())) == list(group)
        assert sorted(test.tolist()) == np.flatnonzero(np.isin(TEST_LABELS, group)).tolist()  # every one of them


def test_a_given_class_order_is_followed():
    plan = stream_plan(small_scenario(stream={"n_experiences": 5, "class_order": [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]}))
    assert plan.classes == ((8, 9), (6, 7), (4, 5), (2, 3), (0, 1))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "shard"])
def test_clients_hold_disjoint_samples_of_their_experience_s_classes_covering_it(kind):
    plan = stream_plan(small_scenario(partition={"kind": kind, "num_clients": 4, "alpha": 0.3}))
    assert len(plan.clients) == 4
    for e, group in enumerate(plan.classes):
        everyone = np.flatnonzero(np.isin(TRAIN_LABELS, group))
        held = np.concatenate([plan.client(c).experiences[e].train for c in range(4)])
        assert len(np.unique(held)) == len(held)  # no sample in two clients' data
        for c in range(4):
            own = plan.client(c).experiences[e]
            assert own.experience == e and own.classes == group
            assert set(TRAIN_LABELS[own.train].tolist()) <= set(group)
        if kind == "shard":  # ShardPartitioner may leave an incomplete last shard out
            assert set(held.tolist()) <= set(everyone.tolist())
        else:
            assert sorted(held.tolist()) == everyone.tolist()


def test_partitions_are_seeded_and_label_skewed():
    def plan_of(seed):
        return stream_plan(small_scenario(seed=seed, partition={"kind": "dirichlet", "alpha": 0.1, "num_clients": 4}))

    def samples(plan):
        return [exp.train.tolist() for own in plan.clients for exp in own.experiences]

    assert samples(plan_of(0)) == samples(plan_of(0)) != samples(plan_of(1))
    counts = [np.bincount(TRAIN_LABELS[exp.train], minlength=10) for exp in plan_of(0).client(0).experiences]
    assert any(count.max() > 0.6 * count.sum() for count in counts if count.sum())  # skewed towards a class


def test_experiences_start_in_lockstep_and_the_plan_says_what_a_client_trains_at_a_round():
    plan = stream_plan(small_scenario())  # 3 experiences of 2 rounds
    own = plan.client(1)
    assert [(exp.start_round, exp.end_round) for exp in own.experiences] == [(1, 2), (3, 4), (5, 6)]
    assert [own.at_round(r).experience for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert own.at_round(7) is None and own.at_round(0) is None
    assert own.total == sum(own.sizes) == sum(len(exp.train) for exp in own.experiences)


def test_what_a_client_consolidates_is_its_past_experiences_with_data():
    sparse = small_scenario(seed=1, partition={"kind": "dirichlet", "alpha": 0.05, "num_clients": 20})
    own = stream_plan(sparse).client(6)
    assert own.sizes == [0, 5, 2]
    assert own.to_consolidate(0, 2) == [1]  # experience 0 held nothing
    assert own.to_consolidate(2, 2) == [] and own.to_consolidate(0, 0) == []
    assert stream_plan(sparse).client(4).sizes[:2] == [1, 2]
    assert stream_plan(sparse).client(4).to_consolidate(0, 2) == [0, 1]
    assert stream_plan(sparse).client(4).to_consolidate(1, 2) == [1]


def test_the_server_sends_the_ends_of_the_experiences_the_plan_has_a_client_consolidate(monkeypatch):
    for field in ("_run_id", "_node_id", "_task_id"):  # what a Message needs outside a running federation
        monkeypatch.setattr(TaskIdentity, field, 1)
    sparse = small_scenario(seed=1, partition={"kind": "dirichlet", "alpha": 0.05, "num_clients": 20})
    model = build_scenario_model(sparse)
    arrays = ArrayRecord(model.state_dict())
    strategy = ContinualStrategy(FedAvg(), reference=arrays, partition_of={106: 6, 104: 4}, plan=stream_plan(sparse))
    strategy.round_ends = {2: arrays, 4: arrays}  # what train_round kept: the weights that ended experiences 0, 1
    strategy.begin_experience(2, arrays, ConfigRecord(), rounds=2)
    sent = {}
    for node in (106, 104):
        message = Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type="train")
        strategy._add_experience_ends(message, server_round=2)
        sent[node] = sorted(experience_ends(message.content))
    assert sent == {106: [1], 104: [0, 1]}  # client 6 has nothing of experience 0 to consolidate


def test_a_client_that_did_not_consolidate_what_it_owed_is_sent_those_weights_again():
    """A client out of privacy budget replies before consolidating: the server must not take its past
    experiences as settled, or it would consolidate them later at the wrong weights."""
    scenario = small_scenario(seed=1)
    arrays = ArrayRecord(build_scenario_model(scenario).state_dict())
    strategy = ContinualStrategy(FedAvg(), reference=arrays, partition_of={100: 0}, plan=stream_plan(scenario))
    held = [i for i, exp in enumerate(stream_plan(scenario).client(0).experiences[:2]) if exp.size]
    report = ClientRoundRecord(
        partition_id=0, num_examples=0, train_loss=0.0, empty=0, consolidated=0, consolidation_counts=[0, 0, 0],
        epsilon=0.0, noise_multiplier=0.0, budget_exhausted=1,
    )  # fmt: skip
    strategy._settle(100, 0, report, global_round=5)  # in experience 2, owing 0 and 1
    assert held and strategy.settled_through == {}
    strategy._settle(100, 0, replace(report, consolidation_counts=[1, 1, 0], budget_exhausted=0), global_round=5)
    assert strategy.settled_through == {100: 2}


def shrunk(plan, client: int, keep: int):
    """`plan` with `client` keeping only the first `keep` samples of each experience."""
    own = plan.client(client)
    experiences = tuple(replace(exp, train=exp.train[:keep]) for exp in own.experiences)
    clients = tuple(replace(own, experiences=experiences) if c == client else p for c, p in enumerate(plan.clients))
    return replace(plan, clients=clients)


def test_client_datasets_are_the_planned_samples(monkeypatch):
    scenario = small_scenario()
    for c, own in enumerate(stream_plan(scenario).clients):
        datasets = client_experiences(scenario, c)
        assert [list(d.sample_id) for d in datasets] == [exp.train.tolist() for exp in own.experiences]
        assert [list(d.targets) for d in datasets] == [TRAIN_LABELS[exp.train].tolist() for exp in own.experiences]
    monkeypatch.setattr(stream, "stream_plan", lambda _: shrunk(stream_plan(scenario), 2, keep=5))
    assert [len(d) for d in client_experiences(scenario, 2)] == [5, 5, 5]


def test_the_membership_audit_s_members_are_the_plan_s_training_samples(monkeypatch):
    scenario = small_scenario()
    model = build_scenario_model(scenario)
    plan = stream_plan(scenario)
    before = membership.audit_clients(scenario, model)["per_client"]
    assert all(0 < before[str(c)]["members"] <= own.total for c, own in enumerate(plan.clients))
    monkeypatch.setattr(membership, "stream_plan", lambda _: shrunk(plan, 1, keep=4))
    after = membership.audit_clients(scenario, model)["per_client"]
    assert after["1"]["members"] == after["1"]["nonmembers"] == 12  # 4 a class at most: all class-matched
    assert after["0"] == before["0"]


def test_planned_dp_steps_and_the_largest_client_dataset_read_the_plan(monkeypatch):
    scenario = small_scenario(privacy={"enabled": True, "noise_multiplier": 1.0}, partition={"kind": "iid"})
    plan = stream_plan(scenario)
    batch, passes = scenario.client.batch_size, scenario.federation.rounds_per_experience * scenario.client.epochs
    steps = [(1 / -(-n // batch), -(-n // batch) * passes) for n in plan.client(0).sizes]
    assert accounting.planned_steps(scenario, 0, PrivateFootprint()) == steps
    assert accounting.largest_client_dataset(scenario) == max(own.total for own in plan.clients)

    everyone_small = plan
    for c in range(len(plan.clients)):
        everyone_small = shrunk(everyone_small, c, keep=33 if c == 0 else 10)
    monkeypatch.setattr(accounting, "stream_plan", lambda _: everyone_small)
    assert accounting.planned_steps(scenario, 0, PrivateFootprint()) == [(1 / 2, 2 * passes)] * 3
    assert accounting.largest_client_dataset(scenario) == 3 * 33
    assert accounting.client_delta(scenario) == 1 / (10 * 99)


def test_the_canary_audit_reads_the_plan_s_canaries(monkeypatch):
    scenario = small_scenario(audit={"canaries": 40})
    plan = stream_plan(scenario)
    model = build_scenario_model(scenario)
    assert canaries.audit_canaries(scenario, model, None, None).canaries == 40
    fewer = replace(plan.canaries, **{f: getattr(plan.canaries, f)[:10] for f in (
        "image", "true_class", "label", "experience", "client", "included")})  # fmt: skip
    monkeypatch.setattr(canaries, "stream_plan", lambda _: replace(plan, canaries=fewer))
    audit = canaries.audit_canaries(scenario, model, None, None)
    assert audit.canaries == 10 and audit.included == int(fewer.included.sum())


def test_the_plan_is_built_once_per_process_and_shared_by_scenarios_that_differ_elsewhere():
    scenario = small_scenario()
    assert stream_plan(scenario) is stream_plan(small_scenario())
    assert stream_plan(scenario) is stream_plan(small_scenario(client={"lr": 0.01}, privacy={"enabled": True}))
    assert stream_plan(scenario) is not stream_plan(small_scenario(federation={"rounds_per_experience": 3}))
