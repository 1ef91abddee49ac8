"""A strategy's and a method's own metrics: aggregated as declared, per round in the run files and the report.

One small in-process run (no Ray) of a strategy that reports its replies and a method
whose two metrics aggregate by `sum` and by `max` is shared by the tests.
"""

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from fedtide.continual.base import METRIC_AGGREGATIONS
from fedtide.records.metrics import ClientRoundRecord
from fedtide.records.run_folder import create_run_folder, read_metrics
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.server.federation import run_federation
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
    path = tmp_path / "median.yaml"
    path.write_text(yaml.safe_dump({"name": "median", "continual": {"method": "tests.metric_plugins:MedianMetric"}}))
    code, _, err = run_cli("validate", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        "continual.method: MedianMetric.metric_aggregation gives metric 'batches' the aggregation 'median' "
        "(use one of: mean, sum, max, min, last)"
    ) in " ".join(err.split())


def copy_run(source: Path, target: Path, seed: int, method: str | None = None, edit=None) -> Path:
    """A copy of a finished run under another seed (and method), its summary and metrics lines edited by
    `edit(line)`: a run the report reads as it would a real one."""
    shutil.copytree(source, target)
    scenario = yaml.safe_load((target / "scenario.yaml").read_text())
    scenario["seed"] = seed
    scenario["continual"]["method"] = method or scenario["continual"]["method"]
    (target / "scenario.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    summary = json.loads((target / "summary.json").read_text())
    summary |= {"seed": seed, "method": scenario["continual"]["method"]}
    (target / "summary.json").write_text(json.dumps(edit(summary)))
    lines = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    (target / "metrics.jsonl").write_text("".join(json.dumps(edit(line)) + "\n" for line in lines))
    return target


def as_old_run(line: dict) -> dict:
    """A line as runs before method_metrics wrote it: the strategy's average of the clients' keys kept."""
    line.pop("method_metrics", None)
    if "strategy_metrics" in line:
        line["strategy_metrics"] = {"num-examples": 117.99999999999999, "method.batches": 5.5, "replies": 3.0}
    return line


def test_the_report_and_report_csv_carry_each_runs_final_user_metrics(metrics_run, tmp_path):
    from fedtide.report.document import write_report
    from fedtide.report.runs import find_runs

    folder, summary = metrics_run
    shutil.copytree(folder, tmp_path / "small")
    old = copy_run(folder, tmp_path / "old", 0, edit=as_old_run)
    runs, _ = find_runs([tmp_path / "small", old])
    write_report(runs, tmp_path / "report")
    rows = {row["run"]: row for row in csv.DictReader((tmp_path / "report" / "report.csv").open())}
    new, before = rows["small"], rows["old"]
    user_columns = [column for column in new if column.startswith(("strategy.", "method."))]
    assert user_columns == list(new)[-3:] == ["strategy.replies", "method.batches", "method.largest_weight"]
    assert float(new["strategy.replies"]) == 4
    assert float(new["method.batches"]) == summary.method_metrics["batches"]
    assert float(new["method.largest_weight"]) == pytest.approx(summary.method_metrics["largest_weight"], rel=1e-5)
    # a run written before method_metrics existed reads, without its strategy's average of the clients' keys
    # (no strategy.num-examples or strategy.method.batches column above)
    assert (before["strategy.replies"], before["method.batches"], before["method.largest_weight"]) == ("3", "–", "–")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| strategy.replies | method.batches | method.largest_weight |" in markdown
    figure = tmp_path / "report" / "figures" / "small-user_metrics.png"
    assert "](figures/small-user_metrics.png)" in markdown and figure.stat().st_size > 5000
    assert "](figures/old-user_metrics.png)" in markdown  # its strategy's own metric, per round


def test_the_figure_has_a_panel_per_metric_with_each_rounds_value(metrics_run):
    from fedtide.report.figures import user_metrics_figure
    from fedtide.report.runs import find_runs

    folder, _ = metrics_run
    (run,), _ = find_runs([folder])
    figure = user_metrics_figure(run)
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in panels] == ["strategy.replies", "method.batches", "method.largest_weight"]
    batches = [line["method_metrics"]["batches"] for line in rounds_of(folder)]
    assert list(panels[1].lines[0].get_ydata()) == batches and list(panels[1].lines[0].get_xdata()) == [1, 2, 3, 4]


def test_sweep_tables_give_each_user_metric_as_mean_and_std_over_seeds(metrics_run, tmp_path):
    from fedtide.report.document import write_report
    from fedtide.report.runs import find_runs

    folder, summary = metrics_run
    shutil.copytree(folder, tmp_path / "runs" / "seed0")

    def more_batches(line: dict) -> dict:
        if line.get("method_metrics"):
            line["method_metrics"]["batches"] += 8
        return line

    copy_run(folder, tmp_path / "runs" / "seed1", 1, edit=more_batches)
    copy_run(folder, tmp_path / "runs" / "naive", 0, method="naive", edit=as_old_run)
    runs, _ = find_runs([tmp_path / "runs"])
    write_report(runs, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    header = "| series | privacy | final accuracy % | forgetting % | BWT % | strategy.replies | method.batches |"
    assert header + " method.largest_weight | seeds |" in markdown
    batches, largest = summary.method_metrics["batches"], summary.method_metrics["largest_weight"]
    row = re.search(r"^\| tests\.metric_plugins:CountsBatchesAndLargestWeight \|.*", markdown, re.M).group(0)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[-4:] == ["4 ± 0", f"{batches + 4:.4g} ± 4", f"{largest:.4g} ± 0", "2"]
    naive = [cell.strip() for cell in re.search(r"^\| naive \|.*", markdown, re.M).group(0).strip("|").split("|")]
    assert naive[-4:] == ["3 ± n/a", "–", "–", "1"]  # one run: no spread to show


def test_the_console_summary_shows_the_last_rounds_user_metrics(metrics_run):
    from rich.console import Console

    from fedtide.report.console import summary_view

    _, summary = metrics_run
    console = Console(file=io.StringIO(), width=200)
    console.print(summary_view(summary))
    text = console.file.getvalue()
    assert re.search(r"strategy\.replies \(last round\)\s+│ 4\b", text)
    assert re.search(rf"method\.batches \(last round\)\s+│ {summary.method_metrics['batches']:g}\b", text)
    assert f"{summary.method_metrics['largest_weight']:.6g}" in text


def test_under_client_level_dp_a_mean_weighs_clients_equally_and_their_weight_is_no_metric(tmp_path):
    scenario = small_scenario(
        stream={"n_experiences": 1},
        partition={"kind": "dirichlet", "alpha": 0.5, "num_clients": 4},
        federation={"rounds_per_experience": 2},
        continual={"method": "tests.metric_plugins:ReportsSquaredNorm"},  # undeclared: a mean
        privacy={"enabled": True, "level": "client", "client_level": {"noise_multiplier": 1.0}},
    )
    run_federation(InProcessGrid(4), scenario, create_run_folder(scenario, tmp_path))
    for record in rounds_of(tmp_path / "small"):
        norms = [c["method_metrics"]["squared_norm"] for c in record["per_client"] if c["num_examples"] > 0]
        examples = {c["num_examples"] for c in record["per_client"] if c["num_examples"] > 0}
        assert len(norms) > 1 and len(examples) > 1  # so that a mean by examples would differ
        assert record["method_metrics"] == {"squared_norm": pytest.approx(sum(norms) / len(norms))}
        assert "strategy_metrics" not in record  # FedAvg's average of num-examples and the weight is theirs


def test_the_privacy_utility_table_gives_each_user_metric_per_point(tmp_path):
    from fedtide.report.document import write_report
    from fedtide.report.runs import find_runs

    summaries = {}
    for noise in (0.5, 2.0):
        scenario = small_scenario(
            name=f"noise-{noise}",
            stream={"n_experiences": 1},
            partition={"kind": "iid", "num_clients": 4},
            federation={"rounds_per_experience": 2},  # client-level DP accepts no aggregate of its own
            continual={"method": METHOD},
            privacy={"enabled": True, "level": "client", "client_level": {"noise_multiplier": noise}},
        )
        summaries[noise] = run_federation(InProcessGrid(4), scenario, create_run_folder(scenario, tmp_path / "runs"))
    runs, _ = find_runs([tmp_path / "runs"])
    write_report(runs, tmp_path / "report")
    table = (tmp_path / "report" / "report.md").read_text().split("## Privacy-utility")[1]
    assert "| attack AUC | method.batches | method.largest_weight | seeds |" in table
    for noise, summary in summaries.items():
        row = re.search(rf"^\| {re.escape(METHOD)} \| client \| {noise:g} \|.*", table, re.M).group(0)
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[3].startswith(f"{summary.client_level.epsilon:.2f}")
        # one seed each: the mean is the run's own value (its spread over one run aside)
        means = [cell.split(" ± ")[0] for cell in cells[-3:-1]]
        assert means == [f"{summary.method_metrics['batches']:.4g}", f"{summary.method_metrics['largest_weight']:.4g}"]
