"""`fedtide check-plugin` on strategies: real 2-round Flower federations over the in-process grid.

The example strategy passes, and a strategy whose aggregate holds NaNs stops the
run with one line naming its class.
"""

from fedtide.plugin_check import check_plugin


def test_check_plugin_passes_on_the_example_strategy():
    report = check_plugin("experience_momentum", {"momentum": 0.5})
    assert report.ok, report.message
    assert report.kind == "strategy"
    assert [c.name for c in report.checks] == [
        "loads",
        "2-round federation completes",
        "aggregated arrays fit the model every round",
        "global model evaluates",
    ]
    assert report.checks[1].detail.startswith("2 rounds")


def test_check_plugin_stops_a_strategy_returning_nan_arrays_naming_it(run_cli):
    code, out, err = run_cli("check-plugin", "tests.broken_strategy:NaNStrategy")
    message = " ".join(err.split())
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert message.startswith("check failed: strategy 'tests.broken_strategy:NaNStrategy' failed check")
    assert "strategy tests.broken_strategy.NaNStrategy returned malformed arrays in round 1" in message
    assert "'1.weight' holds non-finite values (NaN or inf)" in message
