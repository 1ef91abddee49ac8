"""Sweeps and reports: grid expansion, resuming an interrupted sweep, and a report whose numbers are the runs'.

One small sweep (2 noise levels x 2 seeds on digits) is shared by the tests: it is
interrupted after two runs, then resumed by `fedtide sweep`, which must run only the
other two and write the report.
"""

import csv
import io
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from fedtide.audit.membership import audit_clients
from fedtide.cli.progress import SweepProgress
from fedtide.models import build_scenario_model
from fedtide.records.run_folder import read_summary
from fedtide.runner.simulation import simulate_in_process
from fedtide.runner.sweep import load_sweep, run_sweep
from fedtide.scenario.loading import parse_scenario
from tests.conftest import cli

SWEEP = {
    "name": "pu",
    "dataset": {"name": "digits"},
    "stream": {"n_experiences": 2},
    "partition": {"kind": "iid", "num_clients": 2},
    "federation": {"rounds_per_experience": 1},
    "client": {"epochs": 2, "lr": 0.1},
    "continual": {"method": "replay", "mem_size": 50},
    "privacy": {"enabled": True, "delta": 1.0e-4},
    "sweep": {"privacy.noise_multiplier": [0.0, 1.0], "seeds": [0, 1]},
}
NAMES = [
    "noise_multiplier-0.0_seed-0",
    "noise_multiplier-0.0_seed-1",
    "noise_multiplier-1.0_seed-0",
    "noise_multiplier-1.0_seed-1",
]


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Interrupted(Exception):
    pass


@dataclass
class SweepRun:
    """The shared sweep: its files, and what each step of making it saw."""

    base: Path
    path: Path
    folder: Path
    started: list[str]  # the points the interrupted sweep started, in order
    interrupted: dict[str, str | None]  # each point's summary.json when the interruption hit
    resumed: tuple[int, str, str]  # `fedtide sweep` run again: exit code, stdout, stderr
    again: tuple[int, str, str]  # and once more, everything done


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> SweepRun:
    """Run two points in-process, get 'interrupted' on the third, then resume with the CLI (its points on
    Ray), then run the CLI once more. Every test that reads the sweep's files gets them whole, in any order."""
    base = tmp_path_factory.mktemp("sweep")
    path = write(base, SWEEP)
    plan = load_sweep(path, output=base / "runs")
    started: list[str] = []

    def interrupting_runner(scenario, folder):
        started.append(scenario.name)
        if len(started) == 3:
            raise Interrupted  # as if Ctrl-C hit after the folder was made
        simulate_in_process(scenario, folder)

    with pytest.raises(Interrupted):
        run_sweep(plan, runner=interrupting_runner)
    summaries = {n: plan.folder / n / "summary.json" for n in NAMES}
    interrupted = {n: file.read_text() if file.is_file() else None for n, file in summaries.items()}
    resumed = cli("sweep", str(path), "--output", str(base / "runs"))
    again = cli("sweep", str(path), "--output", str(base / "runs"))
    return SweepRun(base, path, plan.folder, started, interrupted, resumed, again)


def test_a_sweep_expands_any_field_paths_and_whole_sections(tmp_path):
    raw = dict(SWEEP, sweep={
        "privacy.noise_multiplier": [0.0, 2.0],
        "continual": [{"method": "ewc", "ewc_lambda": 5}, {"method": "naive"}],
        "continual.method": ["lwf"],
        "seeds": [3],
    })  # fmt: skip
    raw["sweep"].pop("continual.method")
    plan = load_sweep(write(tmp_path, raw), output=tmp_path)
    assert [p.name for p in plan.points] == [
        "noise_multiplier-0.0_continual-ewc_seed-3",
        "noise_multiplier-0.0_continual-naive_seed-3",
        "noise_multiplier-2.0_continual-ewc_seed-3",
        "noise_multiplier-2.0_continual-naive_seed-3",
    ]
    ewc = plan.points[2].scenario
    assert (ewc.continual.method, ewc.continual.params, ewc.privacy.noise_multiplier, ewc.seed) == (
        "ewc", {"ewc_lambda": 5}, 2.0, 3
    )
    assert plan.points[0].scenario.privacy.private is False
    assert plan.folder == tmp_path / "pu"
    # switching the method by path drops the base method's parameters
    switched = load_sweep(write(tmp_path, dict(SWEEP, sweep={"continual.method": ["lwf"]})), output=tmp_path)
    assert switched.points[0].scenario.continual.params == {}
    # a section with no component name is named by its settings, nested ones by their own names
    levels = [{"enabled": False}, {"enabled": True, "level": "client", "client_level": {"target_epsilon": 8}}]
    by_level = load_sweep(write(tmp_path, dict(SWEEP, sweep={"privacy": levels})), output=tmp_path)
    assert [p.name for p in by_level.points] == [
        "privacy-enabled-False",
        "privacy-enabled-True.level-client.target_epsilon-8",
    ]
    assert by_level.points[1].scenario.privacy.client_level.target_epsilon == 8


def test_bad_sweeps_fail_before_anything_runs(tmp_path, run_cli):
    cases = [
        ({"privacy.noise_multiplier": 1.0}, "sweep.privacy.noise_multiplier: must be a non-empty list"),
        ({"privacy.noise_multipler": [1.0]}, "privacy.noise_multipler: unknown key"),
        ({"continual.method": ["replay", "nope"]}, "sweep point method-nope: continual.method: unknown method"),
    ]
    for grid, message in cases:
        code, out, err = run_cli("sweep", str(write(tmp_path, dict(SWEEP, sweep=grid))), "--output", str(tmp_path))
        assert code == 2, out
        assert message in " ".join(err.split())
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pu").exists()
    code, _, err = run_cli("run", str(write(tmp_path, SWEEP)))
    assert code == 2 and "fedtide sweep" in err


@pytest.mark.ray
def test_an_interrupted_sweep_keeps_finished_runs_and_resumes_only_the_rest(sweep_dir):
    folder = sweep_dir.folder
    assert sweep_dir.started == NAMES[:3]
    assert [text is not None for text in sweep_dir.interrupted.values()] == [True, True, False, False]
    code, out, err = sweep_dir.resumed
    assert code == 0, err
    assert "2 ran, 2 skipped" in out
    assert all((folder / n / "summary.json").is_file() for n in NAMES)
    for name in NAMES[:2]:  # untouched
        assert (folder / name / "summary.json").read_text() == sweep_dir.interrupted[name]
    code, out, _ = sweep_dir.again
    assert code == 0 and "0 ran, 4 skipped" in out


@pytest.mark.ray
def test_a_sweep_never_overwrites_a_folder_holding_another_scenario(sweep_dir, run_cli):
    base, folder = sweep_dir.base, sweep_dir.folder
    other = write(base / "runs", dict(SWEEP, client={"epochs": 3, "lr": 0.1}))
    before = (folder / NAMES[0] / "summary.json").read_text()
    code, _, err = run_cli("sweep", str(other), "--output", str(base / "runs"))
    assert code == 2 and "holds a different scenario" in err
    assert (folder / NAMES[0] / "summary.json").read_text() == before


@pytest.mark.ray
def test_private_points_spend_epsilon_and_noise_zero_is_the_non_private_point(sweep_dir):
    folder = sweep_dir.folder
    summaries = {n: read_summary(folder / n) for n in NAMES}
    assert summaries[NAMES[0]].privacy is None
    private = summaries[NAMES[2]].privacy
    assert private.epsilon_max > 0 and set(private.noise_multiplier.values()) == {1.0}
    assert summaries[NAMES[0]].seed == 0 and summaries[NAMES[1]].seed == 1


@pytest.mark.ray
def test_report_tables_carry_the_runs_numbers(sweep_dir):
    folder = sweep_dir.folder
    summaries = {f"pu/{n}": read_summary(folder / n) for n in NAMES}
    rows = {row["run"]: row for row in csv.DictReader((folder / "report.csv").open())}
    assert set(rows) == set(summaries)
    for run, summary in summaries.items():
        row = rows[run]
        assert float(row["final accuracy %"]) == pytest.approx(100 * summary.final_average_accuracy, abs=0.005)
        assert float(row["forgetting %"]) == pytest.approx(100 * summary.average_forgetting, abs=0.005)
        assert float(row["BWT %"]) == pytest.approx(100 * summary.bwt, abs=0.005)
        assert float(row["attack AUC"]) == pytest.approx(summary.audit.auc_max, abs=0.0005)
        expected_epsilon = f"{summary.privacy.epsilon_max:.2f}" if summary.privacy else "∞"
        assert row["ε (sample)"] == expected_epsilon

    # the privacy-utility table: mean ± std over the two seeds of each noise level
    markdown = (folder / "report.md").read_text()
    for noise in ("0.0", "1.0"):
        seeds = [summaries[f"pu/noise_multiplier-{noise}_seed-{s}"].final_average_accuracy for s in (0, 1)]
        mean, std = 100 * statistics.fmean(seeds), 100 * statistics.pstdev(seeds)
        assert f"| {mean:.2f} ± {std:.2f} |" in markdown
    assert "![Final average accuracy and forgetting against ε](figures/utility_vs_epsilon.png)" in markdown
    for image in re.findall(r"\]\((figures/[^)]+)\)", markdown):
        assert (folder / image).stat().st_size > 5000


@pytest.mark.ray
def test_report_html_is_one_self_contained_file(sweep_dir):
    folder = sweep_dir.folder
    page = (folder / "report.html").read_text()
    assert not re.search(r"https?://", page)
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(re.findall(r"\]\(figures/", (folder / "report.md").read_text()))
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert "<link" not in page and "<script" not in page
    for n in NAMES:
        assert f"pu/{n}" in page


@pytest.mark.ray
def test_the_recorded_audit_is_the_saved_model_attacked_again(sweep_dir):
    folder = sweep_dir.folder
    run = folder / NAMES[2]
    scenario = parse_scenario(yaml.safe_load((run / "scenario.yaml").read_text()))
    model = build_scenario_model(scenario)
    model.load_state_dict(torch.load(run / "model.pt"))
    recorded = json.loads((run / "summary.json").read_text())["audit"]
    assert audit_clients(scenario, model) == recorded
    assert set(recorded["per_client"]) == {"0", "1"}
    for result in recorded["per_client"].values():
        assert result["members"] == result["nonmembers"] > 100
        assert 0.3 < result["auc"] < 0.7  # DP-trained for 2 rounds: no real leak


@pytest.mark.ray
def test_report_of_one_run_and_of_several_folders(sweep_dir, run_cli):
    base, folder = sweep_dir.base, sweep_dir.folder
    code, out, err = run_cli("report", str(folder / NAMES[2]))
    assert code == 0, err
    single = (folder / NAMES[2] / "report.md").read_text()
    assert "ε over rounds" in single and "Privacy-utility" not in single
    code, _, err = run_cli("report", str(folder / NAMES[0]), str(folder / NAMES[3]), "--output", str(base / "two"))
    assert code == 0, err
    assert len(list(csv.DictReader((base / "two" / "report.csv").open()))) == 2
    code, _, err = run_cli("report", str(base / "nothing-here"))
    assert code == 2 and "is not a folder" in err


@pytest.mark.ray
def test_in_process_points_side_by_side_give_each_points_numbers(sweep_dir, tmp_path):
    """Two points at a time, each in a worker process, in-process clients: the numbers of the
    points run here (the first two) and as Ray tasks (the last two, resumed by the CLI)."""
    folder = sweep_dir.folder
    path = write(tmp_path, dict(SWEEP, resources={"backend": "in_process"}))
    plan = load_sweep(path, output=tmp_path / "runs")
    events: list[str] = []
    outcome = run_sweep(plan, lambda point, event: events.append(event), workers=2)
    assert events[:2] == ["started", "started"] and events.count("started") == len(NAMES)
    assert sorted(outcome.ran) == sorted(NAMES)
    for name in NAMES:
        side_by_side, alone = read_summary(plan.folder / name), read_summary(folder / name)
        assert side_by_side.accuracy_matrix == alone.accuracy_matrix
        assert side_by_side.privacy == alone.privacy and side_by_side.audit == alone.audit


@pytest.mark.ray
def test_the_sweep_view_counts_rounds_over_the_points_it_runs(sweep_dir):
    plan = load_sweep(sweep_dir.path, output=sweep_dir.base / "runs")
    with SweepProgress(plan, Console(file=io.StringIO())) as view:
        skipped, finished, running, _ = plan.points
        view.on_point(skipped, "skipped")
        view.on_point(finished, "finished")
        view.on_point(running, "started")  # its metrics.jsonl holds both its rounds
        task = view.progress.tasks[0]
        assert (task.completed, task.total) == (4, 6)
        assert task.fields["status"] == "1 done · 1 running · 1 left"


def test_a_sweep_joins_one_ray_cluster(tmp_path, run_cli):
    grid = {"resources.ray_address": ["10.0.0.1:6379", "10.0.0.2:6379"]}
    code, _, err = run_cli("sweep", str(write(tmp_path, dict(SWEEP, sweep=grid))), "--output", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "resources.ray_address: the sweep's points name different Ray clusters" in " ".join(err.split())
    assert not (tmp_path / "pu").exists()


def test_a_plugin_path_keeps_its_dots_in_the_point_name(tmp_path):
    grid = {"continual.method": ["tests.metric_plugins:ReportsSquaredNorm", "naive"]}
    plan = load_sweep(write(tmp_path, dict(SWEEP, privacy={"enabled": False}, sweep=grid)), output=tmp_path)
    assert [p.name for p in plan.points] == ["method-tests.metric_plugins.ReportsSquaredNorm", "method-naive"]
