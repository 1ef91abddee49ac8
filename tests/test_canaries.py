"""Audit canaries: seeded draws of mislabelled held-out images, and the included ones as real training samples."""

import math

import numpy as np
import pytest
import torch

from fedtide.audit.membership import sample_losses
from fedtide.data.canaries import canary_capacity, draw_canaries
from fedtide.data.datasets import load_dataset
from fedtide.data.stream import client_experiences, training_pool
from fedtide.data.stream_plan import experience_classes, stream_plan
from fedtide.errors import ScenarioError
from fedtide.models import build_scenario_model
from fedtide.privacy.accounting import PrivateFootprint, largest_client_dataset, planned_steps
from tests.conftest import run_rounds, small_scenario, stored_method_state


def audited(canaries=200, **sections):
    return small_scenario(audit={"canaries": canaries}, **sections)


def test_canaries_are_seeded_held_out_images_with_a_wrong_label_of_their_experience():
    scenario = audited()
    canaries = stream_plan(scenario).canaries
    test_y = load_dataset("digits").test_y.numpy()
    classes = experience_classes(10, 3, None, seed=0)  # in stream order, as the plan draws them
    assert len(canaries) == 200 and len(set(canaries.image.tolist())) == 200
    assert np.array_equal(canaries.true_class, test_y[canaries.image])
    assert np.all(canaries.label != canaries.true_class)
    for label, own, experience in zip(canaries.label, canaries.true_class, canaries.experience):
        assert label in classes[experience] and own in classes[experience]  # 3-4 classes per experience
    assert np.all(np.bincount(canaries.true_class, minlength=10) <= np.bincount(test_y) // 2)
    assert 0.4 < canaries.included.mean() < 0.6
    assert set(canaries.client.tolist()) == {0, 1, 2, 3} and set(canaries.experience.tolist()) == {0, 1, 2}

    again = draw_canaries(200, test_y, classes, 4, seed=0)
    other = draw_canaries(200, test_y, classes, 4, seed=1)
    for field in ("image", "label", "experience", "client", "included"):
        assert np.array_equal(getattr(again, field), getattr(canaries, field))
        assert not np.array_equal(getattr(other, field), getattr(canaries, field))


def test_one_class_experiences_take_images_of_other_classes():
    test_y = load_dataset("digits").test_y.numpy()
    classes = [[c] for c in range(10)]
    canaries = draw_canaries(100, test_y, classes, 2, seed=0)
    assert np.array_equal(canaries.label, canaries.experience)
    assert np.all(canaries.true_class != canaries.label)


def test_more_canaries_than_half_the_test_data_is_a_one_line_error(tmp_path, run_cli):
    test_y = load_dataset("digits").test_y.numpy()
    capacity = canary_capacity(test_y)
    assert capacity == sum(n // 2 for n in np.bincount(test_y)) == 222  # 44-46 test images per digit class
    with pytest.raises(ScenarioError, match=r"audit\.canaries: 223 canaries, .*\(use at most 222 canaries\)"):
        stream_plan(audited(223))
    stream_plan(audited(222))
    (tmp_path / "s.yaml").write_text("name: s\naudit: {canaries: 500}\n")
    code, _, err = run_cli("validate", str(tmp_path / "s.yaml"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "use at most 222 canaries" in err
    for bad, message in (({"canaries": -1}, "audit.canaries"), ({"confidence": 1}, "audit.confidence")):
        (tmp_path / "s.yaml").write_text(f"name: s\naudit: {bad}\n")
        code, _, err = run_cli("validate", str(tmp_path / "s.yaml"))
        assert code == 2 and message in err


def test_included_canaries_join_exactly_their_client_s_data_of_their_experience():
    scenario = audited()
    plan = stream_plan(scenario)
    canaries = plan.canaries
    data = load_dataset("digits")
    first_id = len(data.train_y)
    regular = stream_plan(small_scenario())
    for client in range(4):
        for e, planned in enumerate(plan.client(client).experiences):
            plain = regular.client(client).experiences[e].train
            assert np.array_equal(planned.train[: len(plain)], plain)  # the regular samples, as without canaries
            mine = canaries.joining(e)[canaries.client[canaries.joining(e)] == client]
            assert np.array_equal(planned.train[len(plain) :] - first_id, mine)  # then its canaries
            dataset = client_experiences(scenario, client)[e]
            ids = np.asarray(list(dataset.sample_id))
            assert ids.tolist() == planned.train.tolist()
            assert np.all(canaries.included[mine]) and np.all(canaries.experience[mine] == e)
            canary_rows = [dataset[i] for i in np.flatnonzero(ids >= first_id)]
            assert [int(y) for _, y, _ in canary_rows] == canaries.label[mine].tolist()
            for (x, _, _), j in zip(canary_rows, mine):
                assert torch.equal(x, data.test_x[canaries.image[j]])
    every_id = np.concatenate([list(d.sample_id) for c in range(4) for d in client_experiences(scenario, c)])
    assert sorted(every_id[every_id >= first_id] - first_id) == np.flatnonzero(canaries.included).tolist()


def test_canary_images_leave_the_test_data_that_measures_accuracy_and_the_attack_s_non_members():
    plan = stream_plan(audited())
    canaries = plan.canaries
    for full, evaluated in zip(stream_plan(small_scenario()).test, plan.test):
        assert np.array_equal(evaluated, full[~np.isin(full, canaries.image)]) and len(evaluated) > len(full) / 2
    assert len(plan.held_out) == 450 - 200 and not np.isin(canaries.image, plan.held_out).any()


def test_without_canaries_the_plan_and_the_pool_hold_none():
    scenario = small_scenario()
    plan = stream_plan(scenario)
    assert plan.canaries is None and plan.held_out.tolist() == list(range(450))
    assert sum(len(ids) for ids in plan.test) == 450
    assert list(training_pool(scenario).sample_id) == list(range(1347))
    assert list(training_pool(audited()).sample_id) == list(range(1347 + 200))


def test_included_canaries_are_counted_in_the_privacy_accounting():
    scenario = audited(privacy={"enabled": True, "noise_multiplier": 1.0})
    sizes = [len(d) for d in client_experiences(scenario, 1)]
    assert sizes == stream_plan(scenario).client(1).sizes != stream_plan(small_scenario()).client(1).sizes
    batch = scenario.client.batch_size
    assert planned_steps(scenario, 1, PrivateFootprint()) == [
        (1 / math.ceil(n / batch), math.ceil(n / batch) * scenario.federation.rounds_per_experience) for n in sizes
    ]
    totals = [sum(len(d) for d in client_experiences(scenario, c)) for c in range(4)]
    assert largest_client_dataset(scenario) == max(totals)
    _, report, state = run_rounds(scenario, 1, [(0, 1)])
    assert report.num_examples == sizes[0]
    assert report.dp_history[-1][1] == pytest.approx(1 / math.ceil(sizes[0] / batch))  # the Poisson sample rate


def test_a_replay_buffer_keeps_canaries_by_sample_id_and_gets_them_back():
    scenario = audited(continual={"method": "replay", "mem_size": 1000})  # room for all of experience 0
    canaries = stream_plan(scenario).canaries
    client = int(canaries.client[canaries.joining(0)][0])
    mine = canaries.joining(0)[canaries.client[canaries.joining(0)] == client]
    _, _, state = run_rounds(scenario, client, [(0, 1), (1, 3)])
    ids = np.asarray(stored_method_state(state, scenario)["groups"][0]["ids"])
    first_id = len(load_dataset("digits").train_y)
    assert sorted(ids[ids >= first_id] - first_id) == mine.tolist()
    restored = training_pool(scenario).subset(ids.tolist())
    pairs = [(int(y), i - first_id) for y, i in zip(restored.targets, ids) if i >= first_id]
    assert [y for y, _ in pairs] == canaries.label[[j for _, j in pairs]].tolist()


@pytest.mark.parametrize("method", [{"method": "naive"}, {"method": "replay", "mem_size": 100}, {"method": "ewc"},
                                    {"method": "lwf"}])  # fmt: skip
def test_every_method_trains_on_its_client_s_canaries(method):
    """One client holding everything, trained hard on experience 1: its canaries there are learnt, the others not."""
    scenario = audited(partition={"kind": "iid", "num_clients": 1}, continual=method, client={"epochs": 40, "lr": 0.1})
    canaries = stream_plan(scenario).canaries
    arrays, report, _ = run_rounds(scenario, 0, [(0, 1), (1, 2)])
    assert report.num_examples == len(client_experiences(scenario, 0)[1])
    model = build_scenario_model(scenario)
    model.load_state_dict(arrays.to_torch_state_dict())
    images = load_dataset("digits").test_x[torch.from_numpy(canaries.image)]
    scores = sample_losses(model, images, torch.from_numpy(canaries.true_class)) - sample_losses(
        model, images, torch.from_numpy(canaries.label)
    )  # log p(canary label) - log p(its image's class)
    exp_1 = canaries.experience == 1
    inside, outside = scores[exp_1 & canaries.included], scores[exp_1 & ~canaries.included]
    assert np.mean(inside > np.median(outside)) > 0.8  # out canaries: the image's own class wins by ~4 nats
    assert np.median(inside) > np.quantile(outside, 0.75)
