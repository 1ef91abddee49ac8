"""Two units, two ε's: a run with both DP levels reports a sample-level and a client-level ε side by
side, each with its neighbouring relation, never their minimum; a report compares runs at the ε
of one unit (`report.privacy_unit`) and says which runs have none of it.

Four tiny in-process runs (no DP, sample-level, client-level, both) are shared by the tests.
"""

import csv
import json

import pytest
import yaml
from rich.console import Console

from fedtide.privacy.accounting import epsilon_spent
from fedtide.records.report_options import ReportOptions, read_report_options
from fedtide.records.run_folder import SUMMARY_FILE, create_run_folder, read_summary
from fedtide.records.summary import RunSummary
from fedtide.report.console import summary_view
from fedtide.report.document import build_blocks
from fedtide.report.runs import find_runs, place_runs, seed_groups
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.runner.sweep import load_sweep, run_sweep
from fedtide.runner.validation import check_runnable
from fedtide.server.federation import run_federation
from tests.conftest import small_scenario

CLIENTS = 4
LEVELS = {
    "none": {"enabled": False},
    "sample": {"enabled": True, "level": "sample", "noise_multiplier": 1.0},
    "client": {"enabled": True, "level": "client", "client_level": {"noise_multiplier": 1.0}},
    "both": {"enabled": True, "level": "both", "noise_multiplier": 1.0, "client_level": {"noise_multiplier": 1.0}},
}


def tiny(name: str, privacy: dict):
    return small_scenario(
        name=name,
        privacy=privacy,
        stream={"n_experiences": 1},
        partition={"kind": "iid", "num_clients": CLIENTS},
        federation={"rounds_per_experience": 2},
        continual={"method": "naive"},
    )


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units") / "runs"
    for name, privacy in LEVELS.items():
        scenario = tiny(name, privacy)
        check_runnable(scenario)
        run_federation(InProcessGrid(CLIENTS), scenario, create_run_folder(scenario, folder))
    return folder


def summaries(runs_dir) -> dict[str, RunSummary]:
    return {name: read_summary(runs_dir / name) for name in LEVELS}


def test_a_run_of_both_levels_holds_both_epsilons_with_their_units_never_their_min(runs_dir):
    both = read_summary(runs_dir / "both")
    sample_eps, client_eps = both.privacy.epsilon_max, both.client_level.epsilon
    assert sample_eps != client_eps  # so that a min would show
    written = json.loads((runs_dir / "both" / SUMMARY_FILE).read_text())["epsilons"]
    assert written == [
        {"unit": "sample", "epsilon": sample_eps, "delta": both.privacy.delta, "adjacency": "add_remove",
         "sampling": "poisson"},
        {"unit": "client", "epsilon": client_eps, "delta": both.client_level.delta,
         "adjacency": getattr(both.client_level, "adjacency", "add_remove"),
         "sampling": getattr(both.client_level, "sampling", "fixed_size")},
    ]  # fmt: skip
    assert [g.to_dict() for g in both.guarantees] == written
    assert (both.epsilon_of("sample"), both.epsilon_of("client")) == (sample_eps, client_eps)
    assert not hasattr(both, "epsilon")  # no unit-less ε: nothing can hand out the min
    assert both.guarantees[0].neighbouring == "add or remove one sample of a client's dataset"
    assert both.guarantees[1].neighbouring.endswith("one client's data")

    one = summaries(runs_dir)
    assert one["sample"].units == ["sample"] and one["sample"].epsilon_of("client") is None
    assert one["client"].units == ["client"] and one["client"].epsilon_of("sample") is None
    assert one["none"].units == [] and "epsilons" not in json.loads((runs_dir / "none" / SUMMARY_FILE).read_text())

    console = Console(record=True, width=250)
    console.print(summary_view(both))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in text.splitlines() if "│ ε" in line}
    assert rows["ε, unit sample (max over clients)"] == (
        f"{sample_eps:.3f} (δ {both.privacy.delta:.1e}): add or remove one sample of a client's dataset, "
        "Poisson sampling of batches"
    )
    assert rows["ε, unit client"].startswith(f"{client_eps:.3f} (δ {both.client_level.delta:.1e}): add or remove one")


def test_a_report_places_each_run_at_the_epsilon_of_the_chosen_unit(runs_dir, run_cli, tmp_path):
    one = summaries(runs_dir)
    for unit, other in (("client", "sample"), ("sample", "client")):
        out = tmp_path / unit
        code, _, err = run_cli("report", str(runs_dir), "--privacy-unit", unit, "--output", str(out))
        assert code == 0, err
        rows = {row["run"].split("/")[-1]: row for row in csv.DictReader((out / "report.csv").open())}
        # the runs table holds both units side by side, whichever the report compares
        for name, summary in one.items():
            for u in ("sample", "client"):
                epsilon = summary.epsilon_of(u)
                expected = f"{epsilon:.2f}" if epsilon is not None else ("∞" if name == "none" else f"no {u} ε")
                assert rows[name][f"ε ({u})"] == expected
        # the comparison places each run at its ε of the chosen unit
        placed = {run.run_id.split("/")[-1]: run for run in place_runs(find_runs([runs_dir])[0], unit)}
        assert placed["both"].epsilon == one["both"].epsilon_of(unit)
        assert placed[unit].epsilon == one[unit].epsilon_of(unit)
        assert placed[other].epsilon is None and not placed[other].placed  # no ε of that unit: not ∞
        assert placed["none"].epsilon is None and placed["none"].placed  # ∞: at "no DP"
        markdown = (out / "report.md").read_text()
        assert f"Runs are compared at ε ({unit}); runs with no {unit}-level ε" in markdown
        assert f"| naive both-level DP | {unit} | 1 | {one['both'].epsilon_of(unit):.2f} ± n/a |" in markdown
        assert f"| naive {unit}-level DP | {unit} | 1 | {one[unit].epsilon_of(unit):.2f} ± n/a |" in markdown
        assert f"| naive {other}-level DP | {unit} | – | no {unit} ε |" in markdown
        assert "| naive | – | – | ∞ |" in markdown
        assert f"| naive {other}-level DP | no {unit} ε |" in markdown  # the comparison table


def test_several_runs_one_of_both_levels_need_the_unit_and_one_unit_each_are_separate_series(runs_dir, run_cli):
    code, _, err = run_cli("report", str(runs_dir), "--output", str(runs_dir.parent / "refused"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "report.privacy_unit: must be given" in " ".join(err.split()) and "--privacy-unit" in err

    runs = [run for run in find_runs([runs_dir])[0] if not run.run_id.endswith("both")]
    by_name = {run.run_id.split("/")[-1]: run for run in place_runs(runs)}
    one = summaries(runs_dir)
    assert by_name["sample"].epsilon == one["sample"].privacy.epsilon_max
    assert by_name["client"].epsilon == one["client"].client_level.epsilon
    points = {point.series: point for point in seed_groups(list(by_name.values()))}
    assert {series: point.unit for series, point in points.items()} == {
        "naive": None, "naive sample-level DP": "sample", "naive client-level DP": "client",
    }  # fmt: skip
    text = " ".join(b.text for b in build_blocks(runs) if hasattr(b, "text"))
    assert "Sample- and client-level runs are separate series, each at the ε of its own unit" in text

    # a run of both levels alone: nothing to compare, it shows both ε's
    code, _, err = run_cli("report", str(runs_dir / "both"))
    assert code == 0, err
    both, report = one["both"], (runs_dir / "both" / "report.md").read_text()
    sample, client = both.epsilon_of("sample"), both.epsilon_of("client")
    assert f"| {sample:.2f} | {both.privacy.delta:.1e} | 1 | {client:.2f} |" in report


def test_a_sweep_file_says_which_unit_its_report_compares(tmp_path):
    raw = {
        "name": "units",
        "stream": {"n_experiences": 1},
        "partition": {"kind": "iid", "num_clients": CLIENTS},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "client_level": {"noise_multiplier": 1.0}},
        "sweep": {"privacy.level": ["sample", "both"]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match=r"report.privacy_unit: must be given: point level-both runs sample- and"):
        load_sweep(path, output=tmp_path)
    with pytest.raises(Exception, match=r"report.privacy_unit: is 'samples' \(give one of: sample, client\)"):
        load_sweep(path, ["report.privacy_unit=samples"], output=tmp_path)
    path.write_text(yaml.safe_dump(raw | {"report": {"privacy_unit": "client"}}))
    plan = load_sweep(path, output=tmp_path)
    assert plan.report == ReportOptions(privacy_unit="client")
    run_sweep(plan, runner=lambda scenario, folder: None)  # runs nothing: the sweep folder keeps the option
    assert read_report_options(plan.folder) == ReportOptions(privacy_unit="client")
    assert yaml.safe_load((plan.folder / "sweep.yaml").read_text())["report"] == {"privacy_unit": "client"}


def test_epsilon_is_no_strategy_metric_and_each_client_s_epsilon_reaches_the_metrics(runs_dir):
    """ε travels in the reply's bookkeeping record, not in the MetricRecord Flower's strategies
    average by examples; metrics.jsonl still holds each client's own, what its accountant says."""
    for name, summary in summaries(runs_dir).items():
        assert "epsilon" not in (summary.strategy_metrics or {}), name
        lines = [json.loads(line) for line in (runs_dir / name / "metrics.jsonl").read_text().splitlines()]
        for line in (line for line in lines if line["type"] == "round"):
            assert "epsilon" not in line.get("strategy_metrics", {}), name
            if summary.privacy is None:
                assert all(client["epsilon"] == 0.0 for client in line["per_client"])
                continue
            for client in line["per_client"]:
                history = [(s, q, int(n)) for s, q, n in client["dp_history"]]
                assert client["epsilon"] == epsilon_spent(history, summary.privacy.delta, "rdp") > 0
            spent = line["privacy"]["epsilon_per_client"]
            assert spent == {str(c["partition_id"]): c["epsilon"] for c in line["per_client"]}  # all sampled
            # per-client ε as max and min over clients, never a mean of them
            assert (line["privacy"]["epsilon_max"], line["privacy"]["epsilon_min"]) == (
                max(spent.values()), min(spent.values())
            )
            assert "epsilon_mean" not in line["privacy"]


def test_a_report_gives_each_run_s_client_epsilons_as_max_and_min(runs_dir):
    runs = find_runs([runs_dir / "sample"])[0]
    spent = runs[0].summary.privacy.epsilon_per_client
    text = " ".join(b.text for b in build_blocks(runs) if hasattr(b, "text"))
    assert f"ε (sample) over its {CLIENTS} clients: max {max(spent.values()):.2f}" in text
    assert f"min {min(spent.values()):.2f} (client {min(spent, key=spent.get)})." in text
    assert "ε mean" not in text and "mean ε" not in text
