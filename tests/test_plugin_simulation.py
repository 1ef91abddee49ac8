"""`fedtide check-plugin` on strategies: real 2-round Flower federations over the in-process grid.

The example strategy passes, and a strategy whose aggregate holds NaNs stops the
run with one line naming its class.
"""

import tempfile
from pathlib import Path

from fedtide.cli.check_plugin import check_plugin
from tests.broken_strategy import ReturnsNumpyDict


def test_check_plugin_passes_on_the_example_strategy():
    report = check_plugin("experience_momentum", {"momentum": 0.5})
    assert report.ok, report.message
    assert report.kind == "strategy"
    assert [c.name for c in report.checks] == [
        "loads",
        "federation completes",
        "aggregated arrays fit the model every round",
        "global model evaluates",
    ]
    assert report.checks[1].detail.startswith("2 rounds")


def test_check_plugin_stops_a_strategy_returning_nan_arrays_naming_it(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the check's run folder goes
    code, out, err = run_cli("check-plugin", "tests.broken_strategy:NaNStrategy")
    message = " ".join(err.split())
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert message.startswith("check failed: strategy 'tests.broken_strategy:NaNStrategy' failed check")
    assert "strategy tests.broken_strategy.NaNStrategy returned malformed arrays in round 1" in message
    assert "'1.weight' holds non-finite values (NaN or inf)" in message
    log = Path(message.rsplit("full log: ", 1)[1])
    assert log.is_relative_to(tmp_path) and "malformed arrays" in log.read_text()  # still there after the check


def test_check_plugin_names_the_types_a_strategy_returned_and_its_def(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = check_plugin("tests.broken_strategy:ReturnsNumpyDict")
    at = f"broken_strategy.py:{ReturnsNumpyDict.aggregate_train.__code__.co_firstlineno}, in aggregate_train"
    assert report.failure.name == "federation completes"
    assert (
        "ReturnsNumpyDict.aggregate_train returned (dict, MetricRecord) in round 1, expected (ArrayRecord | None, "
        f"MetricRecord | None) ({at}): wrap them, from flwr.app: ArrayRecord(" in report.message
    )
    assert "numpy" not in report.message.split("wrap them")[0]  # not numpy's AttributeError


def test_check_plugin_takes_more_clients_and_scenario_overrides(run_cli):
    """A robust aggregator is checked with enough clients to trim: --clients, and --override for the rest."""
    code, out, err = run_cli(
        "check-plugin", "fedtrimmedavg", "--set", "beta=0.25", "--clients", "4",
        "--override", "stream.n_experiences=3",
    )  # fmt: skip
    assert code == 0, err
    assert "3 rounds, 4 clients replying" in " ".join(out.split())
    code, _, err = run_cli("check-plugin", "fedavg", "--override", "stream.n_experiences=0")
    assert code == 1 and "failed check 'loads'" in " ".join(err.split())
