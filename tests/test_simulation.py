"""Full runs: files, metrics, consolidation counts, and the same numbers on Ray as in-process.

One in-process federated run is shared by most assertions; the same scenario on
Flower's Ray simulation, its clients all on one worker in another order, must give
identical numbers and leave no Ray process behind, so the fast in-process runs stand
for the real thing.
"""

import json
import random

import pytest
import torch
import yaml

from fedtide.metrics.forgetting import average_forgetting, backward_transfer
from fedtide.records.run_folder import create_run_folder, read_metrics
from fedtide.runner.simulation import simulate, simulate_in_process
from fedtide.scenario.loading import parse_scenario
from tests.conftest import ray_sessions, session_processes, small_scenario

NUMBERS = ("accuracy_matrix", "final_average_accuracy", "average_forgetting", "bwt", "clients_failed")


def run(scenario, tmp_path_factory, observed=None, runner=simulate_in_process):
    folder = create_run_folder(scenario, tmp_path_factory.mktemp("runs"))
    runner(scenario, folder, observer=observed.append if observed is not None else None)
    return folder, json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def federated_run(small_run):
    assert small_run.scenario == small_scenario(continual={"method": "replay", "mem_size": 60})
    return small_run.scenario, small_run.folder, small_run.summary, small_run.observed


def test_run_folder_holds_resolved_scenario_metrics_and_summary(federated_run):
    scenario, folder, summary, observed = federated_run
    assert parse_scenario(yaml.safe_load((folder / "scenario.yaml").read_text())) == scenario
    rounds = [r for r in read_metrics(folder) if r["type"] == "round"]
    assert [r["round"] for r in rounds] == list(range(1, 7))
    assert [len(r["accuracy"]) for r in rounds] == [1, 1, 2, 2, 3, 3]
    assert [r.round for r in observed] == list(range(1, 7))
    for record in rounds:
        assert record["clients"] == {"sampled": 4, "dropped": 0, "replied": 4, "failed": 0, "empty": 0}
        assert [c["partition_id"] for c in record["per_client"]] == [0, 1, 2, 3]
        assert record["train_loss"] > 0
    assert summary["rounds"] == 6 and summary["num_clients"] == 4


def test_every_client_consolidates_each_past_experience_exactly_once(federated_run):
    _, folder, _, _ = federated_run
    rounds = [r for r in read_metrics(folder) if r["type"] == "round"]
    for partition in range(4):
        mine = [c for r in rounds for c in r["per_client"] if c["partition_id"] == partition]
        assert sum(c["consolidated"] for c in mine) == 2
        assert mine[-1]["consolidation_counts"] == [1, 1, 0]
        # consolidation happens in the first round of each later experience, never in others
        assert [c["consolidated"] for c in mine] == [0, 0, 1, 0, 1, 0]


def test_summary_forgetting_matches_the_recorded_matrix(federated_run):
    _, folder, summary, _ = federated_run
    rows = [r["accuracy"] for r in read_metrics(folder) if r["type"] == "experience"]
    assert rows == summary["accuracy_matrix"]
    hand = sum(rows[j][j] - rows[-1][j] for j in range(len(rows) - 1)) / (len(rows) - 1)
    assert summary["average_forgetting"] == pytest.approx(hand)
    assert summary["bwt"] == pytest.approx(-hand)
    assert average_forgetting(rows) == summary["average_forgetting"]
    assert backward_transfer(rows) == summary["bwt"]
    assert summary["final_average_accuracy"] == pytest.approx(sum(rows[-1]) / 3)


@pytest.mark.ray
def test_same_scenario_and_seed_give_identical_numbers_on_ray_whatever_the_worker_layout(
    federated_run, tmp_path_factory
):
    """Rerun on Ray with one worker: it serves every client, in another order than the in-process run."""
    scenario, _, summary, _ = federated_run
    torch.rand(17)  # whatever state this process's RNGs are in
    random.random()
    one_worker = parse_scenario(scenario.model_dump(mode="json") | {"resources": {"num_cpus_per_client": 2}})
    before = ray_sessions()
    ray_folder, again = run(one_worker, tmp_path_factory, runner=simulate)
    started = ray_sessions() - before
    assert len(started) == 1 and session_processes(started) == []  # a run that ends leaves no Ray process
    assert again["ray_nodes"]  # the clients did run on Ray
    assert {k: again[k] for k in NUMBERS} == {k: summary[k] for k in NUMBERS}
    assert summary["final_average_accuracy"] > 0.2
    # in-process with the same CPUs per client, even the clients' reported losses are Ray's to the bit
    local_folder, _ = run(one_worker, tmp_path_factory)
    assert train_losses(local_folder) == train_losses(ray_folder)


def train_losses(folder) -> list[list[float]]:
    rounds = [r for r in read_metrics(folder) if r["type"] == "round"]
    return [[c["train_loss"] for c in r["per_client"]] for r in rounds]


def test_a_strategy_that_raises_stops_the_run_with_one_line_naming_it(tmp_path, run_cli):
    """End to end through the CLI: exit code 1, one line, the metrics so far kept.

    In-process: the strategy runs in the ServerApp, whatever runs the clients, and the message is the
    server's. How a run's error leaves Flower's Ray simulation as that one line (no Ray or Flower
    traceback) is `test_a_client_error_on_ray_is_one_line_naming_the_users_line_and_the_log`'s.
    """
    scenario = tmp_path / "raises.yaml"
    scenario.write_text(
        yaml.safe_dump(
            {
                "name": "raises",
                "partition": {"kind": "iid", "num_clients": 2},
                "stream": {"n_experiences": 2},
                "federation": {"strategy": {"name": "tests.broken_strategy:RaisesInRoundTwo"}},
                "resources": {"backend": "in_process"},
            }
        )
    )
    code, out, err = run_cli("run", str(scenario), "--output", str(tmp_path / "runs"))
    message = " ".join(err.split())
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    assert message.startswith("run failed: strategy tests.broken_strategy.RaisesInRoundTwo raised in round 2:")
    assert "ValueError: aggregation broke on purpose (broken_strategy.py:" in message
    assert "in aggregate_train)" in message
    folder = tmp_path / "runs" / "raises"
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if r["type"] == "round"] == [1]  # what ran before is kept
    assert not (folder / "summary.json").exists()


@pytest.mark.ray
def test_a_client_error_on_ray_is_one_line_naming_the_users_line_and_the_log(tmp_path, run_cli):
    """A user's plugin raising in every Ray worker: one line, no Ray or Flower traceback, the full one logged."""
    scenario = tmp_path / "broken.yaml"
    scenario.write_text(
        yaml.safe_dump(
            {
                "name": "broken",
                "partition": {"kind": "iid", "num_clients": 2},
                "stream": {"n_experiences": 2},
                "continual": {"method": "tests.broken_method:BrokenMethod"},
                "resources": {"num_cpus_per_client": 2},
            }
        )
    )
    code, out, err = run_cli("run", str(scenario), "--output", str(tmp_path / "runs"))
    log = tmp_path / "runs" / "broken" / "errors.log"
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out and "\x1b[" not in err
    assert " ".join(err.split()) == (
        "run failed: every sampled client failed in round 1; client 0 said: continual method "
        "'tests.broken_method:BrokenMethod' failed in training: RuntimeError: broken_method exploded on purpose "
        f"(broken_method.py:10, in before_training_exp); full log: {log}"
    )
    assert "failed (below)" in out
    logged = log.read_text()
    assert logged.startswith("client 0, round 1: continual method") and "client 1, round 1:" in logged
    assert 'broken_method.py", line 10, in before_training_exp' in logged


def test_the_in_process_backend_runs_the_cli_without_ray_and_gives_the_same_numbers(federated_run, tmp_path, run_cli):
    scenario, _, summary, _ = federated_run
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(scenario.model_dump(mode="json") | {"resources": {"backend": "in_process"}}))
    code, out, err = run_cli("run", str(path), "--output", str(tmp_path / "runs"))
    assert code == 0, err
    local = json.loads((tmp_path / "runs" / "small" / "summary.json").read_text())
    assert local["ray_nodes"] == []  # no client ran in a Ray worker (a Ray run lists its nodes)
    assert {k: local[k] for k in NUMBERS} == {k: summary[k] for k in NUMBERS}
