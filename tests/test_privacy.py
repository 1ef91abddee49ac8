"""DP-SGD on clients: cumulative ε that Opacus's accountant reproduces, budgets, penalties kept."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedtide.client.schedule import train_schedule
from fedtide.continual.methods import build_method
from fedtide.data.split import experience_partitions
from fedtide.models import build_model
from fedtide.privacy.accounting import client_delta, noise_multiplier
from fedtide.privacy.dp_sgd import opacus_ready
from tests.conftest import small_scenario, stored_method_state
from tests.test_client import flat, initial_arrays

SCHEDULE = [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5)]


def private_scenario(method="naive", method_params=None, **privacy):
    return small_scenario(
        partition={"kind": "iid", "num_clients": 2},
        continual={"method": method, **(method_params or {})},
        privacy={"enabled": True, "max_grad_norm": 1.0, **(privacy or {"noise_multiplier": 1.0})},
    )


def run_private(scenario, schedule=SCHEDULE, mu=0.0, partition_id=0):
    """Train through the schedule; return final arrays and each round's reply."""
    rounds = train_schedule(scenario, partition_id, schedule, initial_arrays(scenario), proximal_mu=mu)
    return rounds[-1].reply["arrays"], [r.reply for r in rounds]


def history(reply) -> list[tuple[float, float, int]]:
    record = reply["privacy"]
    return list(zip(record["sigmas"], record["rates"], record["steps"]))


def test_epsilon_is_cumulative_and_recomputed_by_opacus():
    scenario = private_scenario()
    _, replies = run_private(scenario)
    reported = [reply["metrics"]["epsilon"] for reply in replies]
    assert all(b > a for a, b in zip(reported, reported[1:])), reported
    for reply, epsilon in zip(replies, reported):
        accountant = RDPAccountant()
        accountant.history = history(reply)
        assert accountant.get_epsilon(delta=client_delta(scenario)) == pytest.approx(epsilon, rel=1e-9)
    # the steps on record are every Poisson step of every round, counted from the data sizes
    sizes = [len(exp[0]) for exp in experience_partitions(scenario)]
    expected_steps = sum(math.ceil(sizes[e] / scenario.client.batch_size) for e, _ in SCHEDULE)
    assert sum(steps for _, _, steps in history(replies[-1])) == expected_steps
    expected_rates = {1 / math.ceil(sizes[e] / scenario.client.batch_size) for e, _ in SCHEDULE}
    assert sorted({rate for _, rate, _ in history(replies[-1])}) == pytest.approx(sorted(expected_rates))


def test_ewc_and_fedprox_penalties_survive_the_dp_optimizer():
    naive, _ = run_private(private_scenario("naive"))
    ewc, ewc_replies = run_private(private_scenario("ewc", noise_multiplier=1.0))
    assert not np.allclose(flat(naive), flat(ewc))
    start = flat(initial_arrays(private_scenario()))
    plain, _ = run_private(private_scenario(), schedule=[(0, 1)])
    proximal, _ = run_private(private_scenario(), schedule=[(0, 1)], mu=5.0)
    assert not np.allclose(flat(plain), flat(proximal))
    # same noise draws (same seed): the proximal term pulls the update towards the global model
    assert np.linalg.norm(flat(proximal) - start) < np.linalg.norm(flat(plain) - start)


def test_si_under_dp_spends_nothing_more_and_its_penalty_survives():
    """SI's integral reads only weights and the privatised p.grad after each DP step: post-processing."""
    naive, naive_replies = run_private(private_scenario("naive"), schedule=SCHEDULE[:4])
    si_scenario = private_scenario("si", {"si_lambda": 1000.0}, noise_multiplier=1.0)
    rounds = train_schedule(si_scenario, 0, SCHEDULE[:4], initial_arrays(si_scenario))
    replies, arrays, state = [r.reply for r in rounds], rounds[-1].reply["arrays"], rounds[-1].state
    assert [int(r["client"]["consolidated"]) for r in replies] == [0, 0, 1, 0]
    assert history(replies[-1]) == history(naive_replies[-1])  # the same DP steps, nothing else charged
    assert replies[-1]["metrics"]["epsilon"] == naive_replies[-1]["metrics"]["epsilon"]
    importance = stored_method_state(state, si_scenario)["importance"].values()
    assert sum(int((i > 0).sum()) for i in importance) > 100  # learned from the noised path
    assert not np.allclose(flat(naive), flat(arrays))  # same noise draws: only the penalty differs


def test_ewc_fisher_pass_under_dp_is_charged_to_the_accountant():
    _, naive = run_private(private_scenario("naive"), schedule=SCHEDULE[:3])
    _, ewc = run_private(private_scenario("ewc", noise_multiplier=1.0), schedule=SCHEDULE[:3])
    naive_steps = sum(s for *_, s in history(naive[-1]))
    ewc_steps = sum(s for *_, s in history(ewc[-1]))
    experience_0 = len(experience_partitions(private_scenario())[0][0])
    assert ewc_steps - naive_steps == math.ceil(experience_0 / 32)  # one Poisson pass over experience 0
    assert ewc[-1]["metrics"]["epsilon"] > naive[-1]["metrics"]["epsilon"]


def test_replay_buffer_is_inside_the_poisson_sampled_dataset():
    scenario = small_scenario(
        partition={"kind": "iid", "num_clients": 2},
        continual={"method": "replay", "mem_size": 40},
        privacy={"enabled": True, "noise_multiplier": 1.0},
    )
    _, replies = run_private(scenario, schedule=[(0, 1), (1, 3)])
    size_1 = len(experience_partitions(scenario)[1][0])
    rate_with_buffer = 1 / math.ceil((size_1 + 40) / 32)
    assert history(replies[-1])[-1][1] == pytest.approx(rate_with_buffer)


def test_budget_stops_a_client_before_it_exceeds_the_target():
    scenario = private_scenario(noise_multiplier=1.0, target_epsilon=3.0)
    _, replies = run_private(scenario)
    epsilons = [reply["metrics"]["epsilon"] for reply in replies]
    stopped = [reply["client"]["budget_exhausted"] for reply in replies]
    assert max(epsilons) <= 3.0
    assert stopped[0] is False and stopped[-1] is True
    assert replies[-1]["metrics"]["num-examples"] == 0


def test_target_epsilon_calibrates_noise_to_spend_about_the_target():
    scenario = small_scenario(
        partition={"kind": "iid", "num_clients": 2},
        federation={"rounds_per_experience": 1},
        privacy={"enabled": True, "target_epsilon": 2.0},
    )
    _, replies = run_private(scenario, schedule=[(0, 1), (1, 2), (2, 3)])
    final = replies[-1]["metrics"]["epsilon"]
    assert 1.9 <= final <= 2.0
    footprint = build_method(scenario.continual).private_footprint()
    assert replies[-1]["client"]["noise_multiplier"] == noise_multiplier(scenario, 0, footprint) > 0.5


def test_opacus_validator_fixes_batchnorm_and_keeps_builtin_models():
    model = build_model("cnn", (1, 8, 8), 10)
    assert opacus_ready(model) is model
    with_batchnorm = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    fixed = opacus_ready(with_batchnorm)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in fixed.modules())
