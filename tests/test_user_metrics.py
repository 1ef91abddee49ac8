"""A strategy's and a method's own metrics: aggregated as declared, per round in the run files and the report.

One small in-process run (no Ray) of a strategy that reports its replies and a method
whose two metrics aggregate by `sum` and by `max` is shared by the tests.
"""

import pytest

from fedtide.continual.base import METRIC_AGGREGATIONS
from fedtide.run_files import ClientRoundRecord, create_run_folder, read_metrics
from fedtide.server.federation import run_federation
from fedtide.server.local_grid import InProcessGrid
from fedtide.server.method_metrics import _AGGREGATE, aggregate_method_metrics
from tests.conftest import small_scenario

STRATEGY = "tests.metric_plugins:ReportsReplies"
METHOD = "tests.metric_plugins:CountsBatchesAndLargestWeight"
# what a client's reply or record holds that is no metric of the strategy's or the method's
BOOKKEEPING = {"num-examples", "train_loss", "client-level-weight", "partition_id", "epsilon", "num_examples"}


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory):
    """The run's folder and summary: 2 experiences of 2 rounds, 4 clients, every one sampled."""
    scenario = small_scenario(
        stream={"n_experiences": 2},
        federation={"strategy": {"name": STRATEGY}, "rounds_per_experience": 2},
        continual={"method": METHOD},
    )
    base = tmp_path_factory.mktemp("metrics")
    summary = run_federation(InProcessGrid(4), scenario, create_run_folder(scenario, base))
    return base / "small", summary


def rounds_of(folder):
    return [line for line in read_metrics(folder) if line["type"] == "round"]


def test_method_metrics_per_round_are_the_declared_aggregates_of_the_clients_values(metrics_run):
    folder, summary = metrics_run
    rounds = rounds_of(folder)
    assert len(rounds) == 4
    for record in rounds:
        clients = [c["method_metrics"] for c in record["per_client"] if c["num_examples"] > 0]
        assert len(clients) == 4
        assert record["method_metrics"] == {
            "batches": sum(c["batches"] for c in clients),  # declared sum
            "largest_weight": max(c["largest_weight"] for c in clients),  # declared max
        }
        assert record["method_metrics"]["batches"] > 4  # every client trained a batch or more
        assert record["strategy_metrics"] == {"replies": 4}
    assert summary.method_metrics == rounds[-1]["method_metrics"]
    assert summary.strategy_metrics == {"replies": 4}


def test_no_bookkeeping_is_averaged_into_either_section(metrics_run):
    folder, summary = metrics_run
    for record in rounds_of(folder):
        for section in ("strategy_metrics", "method_metrics"):
            assert not BOOKKEEPING & set(record[section]), section
            assert not any(key.startswith("method.") for key in record[section]), section
    assert not BOOKKEEPING & (set(summary.strategy_metrics) | set(summary.method_metrics))


def client(partition: int, examples: int, **metrics: float) -> ClientRoundRecord:
    return ClientRoundRecord(
        partition_id=partition, num_examples=examples, train_loss=1.0, empty=0, consolidated=0,
        consolidation_counts=[], epsilon=0.0, noise_multiplier=0.0, budget_exhausted=0, method_metrics=metrics or None,
    )  # fmt: skip


def test_each_declared_aggregation_over_clients():
    # replies in any order; client 1 did not train (no metrics), client 3 reported only `a`
    reports = [client(2, 30, a=5.0, b=1.0), client(1, 0), client(0, 10, a=1.0, b=3.0), client(3, 60, a=2.0)]
    expected = {"mean": (1 * 10 + 5 * 30 + 2 * 60) / 100, "sum": 8.0, "max": 5.0, "min": 1.0, "last": 2.0}
    for how, value in expected.items():  # `last`: the highest partition id's
        assert aggregate_method_metrics(reports, {"a": how})["a"] == pytest.approx(value), how
    # undeclared: the mean by examples over the clients that reported it
    assert aggregate_method_metrics(reports, {})["b"] == pytest.approx((1 * 30 + 3 * 10) / 40)
    # under client-level DP clients weigh the same, as in the model's aggregate
    assert aggregate_method_metrics(reports, {}, equal_weights=True)["a"] == pytest.approx(8 / 3)
    assert aggregate_method_metrics([client(0, 0)], {}) is None
    assert set(_AGGREGATE) == set(METRIC_AGGREGATIONS)


def test_an_unknown_aggregation_is_one_line_naming_the_metric_and_the_allowed_names(run_cli, tmp_path):
    import yaml

    path = tmp_path / "median.yaml"
    path.write_text(yaml.safe_dump({"name": "median", "continual": {"method": "tests.metric_plugins:MedianMetric"}}))
    code, _, err = run_cli("validate", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        "continual.method: MedianMetric.metric_aggregation gives metric 'batches' the aggregation 'median' "
        "(use one of: mean, sum, max, min, last)"
    ) in " ".join(err.split())
