"""DP through the whole federation: utility falls as noise rises, and budgets are reported."""

import json

from fedtide.data.stream_plan import stream_plan
from fedtide.privacy.accounting import client_delta, epsilon_spent, steps_and_rate
from fedtide.records.run_folder import create_run_folder
from fedtide.runner.simulation import simulate_in_process
from tests.conftest import small_scenario

ROUNDS = 4


def scenario_with(privacy: dict):
    return small_scenario(
        stream={"n_experiences": 1},
        partition={"kind": "iid", "num_clients": 2},
        federation={"rounds_per_experience": ROUNDS},
        client={"epochs": 1, "lr": 0.1},
        continual={"method": "naive"},
        privacy=privacy,
    )


def run(scenario, tmp_path) -> dict:
    folder = create_run_folder(scenario, tmp_path)
    simulate_in_process(scenario, folder)
    return json.loads((folder / "summary.json").read_text())


def test_accuracy_falls_as_noise_rises_and_budget_stops_are_reported(tmp_path):
    noisy = scenario_with({"enabled": True, "noise_multiplier": 4.0})
    # a budget that three of the four rounds fit in: every client stops before the last round
    steps, rate = steps_and_rate(max(own.sizes[0] for own in stream_plan(noisy).clients), 32)
    three_rounds = epsilon_spent([(4.0, rate, 3 * steps)], client_delta(noisy), "rdp")
    budgeted = scenario_with({"enabled": True, "noise_multiplier": 4.0, "target_epsilon": three_rounds * 1.01})

    accuracy = {
        "non-private": run(scenario_with({"enabled": True, "noise_multiplier": 0.0}), tmp_path),
        "sigma=1": run(scenario_with({"enabled": True, "noise_multiplier": 1.0}), tmp_path),
        "sigma=4, budget": run(budgeted, tmp_path),
    }
    finals = {k: v["final_average_accuracy"] for k, v in accuracy.items()}
    print("final accuracy by noise:", finals)
    assert finals["non-private"] > finals["sigma=1"] > finals["sigma=4, budget"]
    assert "privacy" not in accuracy["non-private"]

    private = accuracy["sigma=1"]["privacy"]
    assert private["epsilon_max"] > 0 and private["budget_exhausted_clients"] == []
    assert private["delta"] == client_delta(scenario_with({"enabled": True}))
    limited = accuracy["sigma=4, budget"]["privacy"]
    assert limited["budget_exhausted_clients"] == [0, 1]
    assert limited["epsilon_max"] <= budgeted.privacy.target_epsilon
