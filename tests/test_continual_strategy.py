"""The wrapper around the user's strategy, driven by real Flower strategies over the in-process grid."""

import csv

import numpy as np
import pytest

from fedtide.errors import FederationError
from fedtide.records.run_folder import create_run_folder, read_metrics
from fedtide.records.wire import experience_end_key
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.server.federation import run_federation
from tests.broken_strategy import ReadsConfigLr, ReadsLoss, ReturnsArraysOnly, ReturnsNumpyDict
from tests.conftest import RecordingGrid, small_scenario


def def_line(strategy: type) -> str:
    """Where a strategy's aggregate_train is defined, as error lines name a user's def."""
    return f"broken_strategy.py:{strategy.aggregate_train.__code__.co_firstlineno}, in aggregate_train"


def run(scenario, tmp_path, grid=None):
    grid = grid or InProcessGrid(scenario.partition.num_clients)
    return run_federation(grid, scenario, create_run_folder(scenario, tmp_path)), grid


def test_a_client_sampled_late_is_sent_the_weights_that_ended_the_experience(tmp_path):
    scenario = small_scenario(
        stream={"n_experiences": 2},
        partition={"kind": "iid", "num_clients": 4},
        federation={"rounds_per_experience": 3, "fraction_train": 0.5, "min_train_nodes": 2},
        continual={"method": "ewc"},
    )
    grid = RecordingGrid(4)
    run(scenario, tmp_path, grid)
    experience_1 = [m for m in grid.delivered if m.content["config"]["experience"] == 1]
    ended = experience_1[0].content["arrays"]  # round 1 of experience 1 starts from the weights that ended 0
    seen: set[int] = set()
    late = 0
    for message in experience_1:
        node, server_round = message.metadata.dst_node_id, int(message.content["config"]["server-round"])
        owed = server_round > 1 and node not in seen
        assert (experience_end_key(0) in message.content) == owed
        if owed:
            late += 1
            for key, array in message.content[experience_end_key(0)].items():
                assert np.array_equal(array.numpy(), ended[key].numpy())
        seen.add(node)
    assert late > 0, "with half the clients sampled a round, some are first sampled after round 1"


def test_with_every_client_sampled_nothing_extra_is_sent(tmp_path):
    grid = RecordingGrid(4)
    run(small_scenario(continual={"method": "naive"}), tmp_path, grid)
    assert len(grid.delivered) == 4 * 3 * 2  # every client, every round of the 3 experiences
    assert not any(k.startswith("experience-end") for m in grid.delivered for k in m.content.keys())


def test_bookkeeping_is_not_averaged_into_the_strategys_metrics(tmp_path):
    """Each client's ε and consolidation counts travel beside its metrics, so FedAvg, which averages
    every key of the replies' MetricRecords, never sees them; the run files keep each client's own."""
    scenario = small_scenario(stream={"n_experiences": 2}, privacy={"enabled": True, "noise_multiplier": 1.0})
    grid = RecordingGrid(4)
    summary, _ = run(scenario, tmp_path, grid)
    assert len(grid.replies) == 4 * 2 * 2
    for reply in grid.replies:
        assert set(reply.content["metrics"]) == {"num-examples", "train_loss"}
        assert {"partition_id", "epsilon", "consolidation_counts"} <= set(reply.content["client"])
    rounds = [r for r in read_metrics(tmp_path / "small") if r["type"] == "round"]
    assert all("strategy_metrics" not in r for r in rounds)  # FedAvg reported nothing but the clients' own
    last = {int(m.content["client"]["partition_id"]): m.content["client"] for m in grid.replies[-4:]}
    assert [c["partition_id"] for c in rounds[-1]["per_client"]] == [0, 1, 2, 3]
    for client in rounds[-1]["per_client"]:
        own = last[client["partition_id"]]
        assert client["epsilon"] == own["epsilon"] > 0
        assert client["consolidation_counts"] == list(own["consolidation_counts"]) == [1, 0]
    assert len({c["epsilon"] for c in rounds[-1]["per_client"]}) > 1  # an average would have made them one
    assert summary.clients_failed == 0


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (
            "tests.broken_strategy:RaisesInExperienceOne",
            "strategy tests.broken_strategy.RaisesInExperienceOne raised in round 3: ValueError: aggregation broke "
            "on purpose in experience 1 (broken_strategy.py:",
        ),
        (
            "tests.broken_strategy:ReturnsArraysOnly",
            "strategy tests.broken_strategy.ReturnsArraysOnly.aggregate_train returned ArrayRecord in round 1, "
            f"expected (ArrayRecord | None, MetricRecord | None) ({def_line(ReturnsArraysOnly)}): "
            "return the pair (arrays, metrics)",
        ),
        (
            "tests.broken_strategy:ReturnsNumpyDict",
            "strategy tests.broken_strategy.ReturnsNumpyDict.aggregate_train returned (dict, MetricRecord) in round 1, "
            f"expected (ArrayRecord | None, MetricRecord | None) ({def_line(ReturnsNumpyDict)}): wrap them, from "
            "flwr.app: ArrayRecord({name: Array.from_numpy_ndarray(a), ...}), MetricRecord({name: number})",
        ),
        (
            "tests.broken_strategy:ReadsLoss",
            "strategy tests.broken_strategy.ReadsLoss raised in round 1: KeyError: 'loss' (broken_strategy.py:"
            f"{ReadsLoss.aggregate_train.__code__.co_firstlineno + 3}, in aggregate_train); a reply holds the "
            "records arrays, metrics, client, host; its metrics holds num-examples, train_loss; its client holds "
            "partition_id,",
        ),
        (
            "tests.broken_strategy:ReadsConfigLr",
            "strategy tests.broken_strategy.ReadsConfigLr raised in round 1: KeyError: 'lr' (broken_strategy.py:"
            f"{ReadsConfigLr.configure_train.__code__.co_firstlineno + 1}, in configure_train); the config holds "
            "experience, n-experiences, rounds-per-experience, round-offset, scenario, checkpoint",
        ),
        (
            "tests.broken_strategy:NaNStrategy",
            "strategy tests.broken_strategy.NaNStrategy returned malformed arrays in round 1: '1.weight' holds "
            "non-finite values (NaN or inf)",
        ),
    ],
)
def test_a_strategys_mistake_names_it_and_the_global_round(tmp_path, strategy, expected):
    scenario = small_scenario(
        stream={"n_experiences": 2}, federation={"strategy": {"name": strategy}, "rounds_per_experience": 2}
    )
    with pytest.raises(FederationError) as raised:
        run(scenario, tmp_path)
    assert str(raised.value).startswith(expected)


def test_a_weighting_key_the_replies_lack_lists_the_keys_they_hold(tmp_path):
    scenario = small_scenario(federation={"strategy": {"name": "fedavg", "weighted_by_key": "loss"}})
    with pytest.raises(FederationError) as raised:
        run(scenario, tmp_path)
    message = str(raised.value)
    assert "FedAvg raised in round 1: InconsistentMessageReplies: Missing required key `loss`" in message
    assert "its metrics holds num-examples, train_loss; its client holds partition_id" in message
    assert len(message.splitlines()) == 1


def test_a_round_where_every_client_fails_names_the_round_and_a_client(tmp_path):
    scenario = small_scenario(continual={"method": "tests.broken_method:BrokenMethod"})
    with pytest.raises(FederationError) as raised:
        run(scenario, tmp_path)
    message = str(raised.value)
    assert message.startswith("every sampled client failed in round 1; client 0 said:")
    assert "continual method 'tests.broken_method:BrokenMethod' failed in training" in message


def test_a_strategys_and_a_methods_own_metrics_reach_the_run_files_and_the_report(tmp_path):
    from fedtide.report.document import write_report
    from fedtide.report.runs import find_runs

    scenario = small_scenario(
        stream={"n_experiences": 2},
        federation={"strategy": {"name": "tests.metric_plugins:ReportsReplies"}},
        continual={"method": "tests.metric_plugins:ReportsSquaredNorm"},
    )
    summary, _ = run(scenario, tmp_path)
    folder = tmp_path / "small"
    rounds = [r for r in read_metrics(folder) if r["type"] == "round"]
    for record in rounds:
        trained = [c for c in record["per_client"] if c["num_examples"] > 0]
        assert all(c["method_metrics"]["squared_norm"] > 0 for c in trained)
        assert all("method_metrics" not in c for c in record["per_client"] if c["num_examples"] == 0)
        # undeclared, the method's metric is a mean weighted by examples, fedtide's own
        examples = sum(c["num_examples"] for c in trained)
        weighted = sum(c["method_metrics"]["squared_norm"] * c["num_examples"] for c in trained) / examples
        assert record["method_metrics"] == {"squared_norm": pytest.approx(weighted)}
        # what FedAvg only averaged back of the clients' MetricRecords is not the strategy's metric
        assert record["strategy_metrics"] == {"replies": len(trained)}
    assert summary.strategy_metrics == rounds[-1]["strategy_metrics"]
    assert summary.method_metrics == rounds[-1]["method_metrics"]
    runs, _ = find_runs([folder])
    write_report(runs, folder)
    (row,) = csv.DictReader((folder / "report.csv").open())
    assert float(row["strategy.replies"]) == len(rounds[-1]["per_client"])
    assert float(row["method.squared_norm"]) == pytest.approx(summary.method_metrics["squared_norm"], rel=1e-5)
