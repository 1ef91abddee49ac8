"""Class-incremental digits with one IID client reproduces the single-learner ordering.

van de Ven et al. (2022, Table 2), class-IL Split MNIST: None 19.9%, EWC 20.6%,
LwF 21.9%, replay 88.8%. Regularisation methods (EWC, SI, LwF) stay near fine-tuning
in class-IL; replay is far above. The shipped `scenarios/centralized_split.yaml` is run as is.
"""

import json

from fedtide.records.run_folder import create_run_folder
from fedtide.runner.simulation import simulate_in_process
from fedtide.scenario.loading import load_scenario


def final_accuracy(method: str, tmp_path) -> float:
    scenario = load_scenario("scenarios/centralized_split.yaml", [f"continual.method={method}"])
    folder = create_run_folder(scenario, tmp_path)
    simulate_in_process(scenario, folder)
    return json.loads((folder / "summary.json").read_text())["final_average_accuracy"]


def test_replay_far_above_naive_ewc_si_lwf(tmp_path):
    accuracy = {m: final_accuracy(m, tmp_path) for m in ("naive", "ewc", "si", "lwf", "replay")}
    print("final average accuracy:", accuracy)
    assert accuracy["replay"] >= 2 * accuracy["naive"]
    assert accuracy["replay"] > 0.75
    for method in ("naive", "ewc", "si", "lwf"):
        # one experience of five remembered: about 20%, as in the paper
        assert 0.15 <= accuracy[method] <= 0.35, method
        assert accuracy["replay"] > accuracy[method] + 0.4
