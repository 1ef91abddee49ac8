"""One client's training call, run directly (the same function the ClientApp calls)."""

import numpy as np
from flwr.serverapp.strategy import FedProx

from fedtide.data.stream_plan import stream_plan
from fedtide.server.strategies import build_strategy
from tests.conftest import flat, initial_arrays, run_rounds, small_scenario, stored_method_state


def test_fedprox_proximal_term_changes_the_update_on_dirichlet_clients():
    scenario = small_scenario(
        partition={"kind": "dirichlet", "alpha": 0.1, "num_clients": 10},
        continual={"method": "naive"},
        client={"epochs": 3},
    )
    start = flat(initial_arrays(scenario))
    plain, _, _ = run_rounds(scenario, 2, [(0, 1)], mu=0.0)
    proximal, _, _ = run_rounds(scenario, 2, [(0, 1)], mu=1.0)
    assert not np.allclose(flat(plain), flat(proximal))
    # the proximal term pulls the local model towards the global one
    assert np.linalg.norm(flat(proximal) - start) < np.linalg.norm(flat(plain) - start)


def test_fedprox_is_flowers_strategy_with_mu_from_the_scenario():
    scenario = small_scenario(federation={"strategy": {"name": "fedprox", "proximal_mu": 0.05}})
    strategy = build_strategy(scenario.federation, num_clients=4)
    assert type(strategy) is FedProx
    assert strategy.proximal_mu == 0.05


def test_consolidation_happens_once_per_past_experience_across_many_rounds():
    scenario = small_scenario(continual={"method": "ewc"})
    schedule = [(e, 2 * e + k + 1) for e in range(3) for k in range(2)]
    _, report, state = run_rounds(scenario, 1, schedule)
    assert report.consolidation_counts == [1, 1, 0]
    stored = stored_method_state(state, scenario)
    assert set(stored["anchor"]) == set(stored["importance"]) == {0, 1}


def test_client_that_skipped_experiences_consolidates_each_once():
    scenario = small_scenario(continual={"method": "lwf"})
    _, report, _ = run_rounds(scenario, 0, [(0, 1), (2, 5), (2, 6)])
    assert report.consolidation_counts == [1, 1, 0]
    assert report.consolidated == 0  # the second round of experience 2 consolidated nothing new


def test_replay_buffer_survives_the_context_as_sample_ids():
    scenario = small_scenario(continual={"method": "replay", "mem_size": 30})
    _, _, state = run_rounds(scenario, 3, [(0, 1), (1, 3)])
    ids = np.asarray(stored_method_state(state, scenario)["groups"][0]["ids"])
    first_experience_ids = set(stream_plan(scenario).client(3).experiences[0].train.tolist())
    assert 0 < len(ids) <= 30
    assert set(ids.tolist()) <= first_experience_ids
    # the restored buffer is used: training continues from it and keeps the same ids
    _, _, state = run_rounds(scenario, 3, [(1, 4)], state=state)
    assert np.array_equal(stored_method_state(state, scenario)["groups"][0]["ids"], ids)


def test_ewc_penalty_changes_training_after_consolidation():
    schedule = [(0, 1), (1, 3)]
    naive, _, _ = run_rounds(small_scenario(continual={"method": "naive"}), 1, schedule)
    ewc, _, _ = run_rounds(small_scenario(continual={"method": "ewc", "ewc_lambda": 50.0}), 1, schedule)
    assert not np.allclose(flat(naive), flat(ewc))


def test_client_without_data_in_an_experience_reports_it():
    scenario = small_scenario(partition={"kind": "dirichlet", "alpha": 0.05, "num_clients": 20})
    sizes = [own.sizes for own in stream_plan(scenario).clients]
    empty = [(e, c) for c, row in enumerate(sizes) for e, n in enumerate(row) if n == 0]
    assert empty, "Dirichlet(0.05) over 20 clients leaves some client without data"
    experience, client = empty[0]
    arrays, report, _ = run_rounds(scenario, client, [(experience, 1)])
    assert (report.empty, report.num_examples) == (True, 0)
    assert np.array_equal(flat(arrays), flat(initial_arrays(scenario)))
