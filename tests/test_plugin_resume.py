"""A run imports its "module:Class" plugins from folders it records, and its resume imports them from there again.

The plugins live where users keep them without a package: the method beside the scenario
file, the strategy in the folder `fedtide run` starts in. The run is a `fedtide`
subprocess, killed with SIGKILL after a checkpoint, and resumed from another working
folder, where neither module is importable but through the run's record.
"""

import importlib
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml

from fedtide.records.checkpoint_files import checkpoint_round
from fedtide.records.run_folder import IMPORT_PATH_FILE, create_run_folder, read_import_path
from fedtide.runner.simulation import simulate_in_process
from fedtide.runner.sweep import load_sweep, run_sweep
from fedtide.scenario.loading import load_scenario
from tests.conftest import Fedtide, small_scenario

METHOD_MODULE = '''
from avalanche.training.plugins import SupervisedPlugin


class PullBeside(SupervisedPlugin):
    """An L2 pull to the weights that ended the last experience (state: its anchor)."""

    dp_compatible = True

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength = strength
        self.anchor = {}

    def before_backward(self, strategy, **kwargs) -> None:
        if self.anchor:
            pull = sum(((p - self.anchor[n]) ** 2).sum() for n, p in strategy.model.named_parameters())
            strategy.loss += 0.5 * self.strength * pull

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.anchor = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}
'''

STRATEGY_MODULE = '''
from flwr.serverapp.strategy import FedAvg


class CountingFedAvg(FedAvg):
    """FedAvg that counts the rounds it aggregated (state a checkpoint must carry)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.aggregated = 0

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.aggregated += 1
        metrics["aggregated"] = float(self.aggregated)
        return arrays, metrics
'''


PLUGIN_MODULES = ("pull_beside", "cwd_counting")
NUMBERS = ("accuracy_matrix", "final_average_accuracy", "average_forgetting", "bwt", "clients_failed", "audit")


@pytest.fixture
def unimported(monkeypatch):
    """The plugin modules not imported in this process, and `sys.path` as it was, before and after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)
    yield
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


def plugin_project(root: Path) -> tuple[Path, Path]:
    """root/project/cwd_counting.py and root/project/scenarios/{small.yaml, pull_beside.py}: (project, scenario)."""
    project = root / "project"
    (project / "scenarios").mkdir(parents=True)
    (project / "cwd_counting.py").write_text(STRATEGY_MODULE)
    (project / "scenarios" / "pull_beside.py").write_text(METHOD_MODULE)
    scenario = small_scenario(
        resources={"backend": "in_process"},
        continual={"method": "pull_beside:PullBeside", "strength": 2.0},
        federation={"rounds_per_experience": 2, "strategy": {"name": "cwd_counting:CountingFedAvg"}},
    )
    path = project / "scenarios" / "small.yaml"
    path.write_text(yaml.safe_dump(scenario.model_dump(mode="json")))
    return project, path


@pytest.mark.slow
def test_a_killed_run_of_plugins_beside_its_scenario_resumes_from_another_folder(
    tmp_path, run_cli, monkeypatch, unimported
):
    project, path = plugin_project(tmp_path)
    folder = project / "runs" / "small"
    run = Fedtide(project, "run", "scenarios/small.yaml", "--output", "runs")
    run.wait_for_round(folder, 3)
    run.process.send_signal(signal.SIGKILL)
    run.process.wait(30)
    done = checkpoint_round(folder)
    assert done is not None and done >= 2 and not (folder / "summary.json").exists()
    assert read_import_path(folder) == [project.resolve(), (project / "scenarios").resolve()]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # without the record, the plugins cannot be found from elsewhere: the exact failure of issue 20
    unrecorded = shutil.copytree(folder, elsewhere / "unrecorded")
    (unrecorded / IMPORT_PATH_FILE).unlink()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli("resume", str(unrecorded))
    assert code == 2 and "cannot import 'cwd_counting'" in err and "the run recorded no plugin folders" in err
    moved = shutil.copytree(folder, elsewhere / "moved")  # recorded, but the module is no longer there
    (moved / IMPORT_PATH_FILE).write_text(json.dumps({"folders": [str(elsewhere)]}))
    code, _, err = run_cli("resume", str(moved))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"(the run imported its plugins from {elsewhere}: put the module back there, or install it)" in err

    assert not set(PLUGIN_MODULES) & set(sys.modules)  # so only the recorded folders can bring them back
    code, _, err = run_cli("resume", str(folder))  # from elsewhere, as the two above
    assert code == 0, err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["strategy_metrics"]["aggregated"] == 6.0  # the count went on from the checkpoint's

    monkeypatch.syspath_prepend(str(project))
    monkeypatch.syspath_prepend(str(project / "scenarios"))
    scenario = load_scenario(path)
    straight = create_run_folder(scenario, tmp_path / "straight")
    simulate_in_process(scenario, straight)
    expected = json.loads((straight / "summary.json").read_text())
    assert {k: summary[k] for k in (*NUMBERS, "strategy_metrics")} == {
        k: expected[k] for k in (*NUMBERS, "strategy_metrics")
    }


def test_a_sweep_records_its_plugin_folders_and_goes_on_from_another_folder(tmp_path, monkeypatch, unimported):
    project, path = plugin_project(tmp_path)
    raw = yaml.safe_load(path.read_text()) | {"name": "sw", "sweep": {"seeds": [0, 1]}}
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(project)
    plan = load_sweep(path, output=tmp_path / "runs")
    assert plan.import_path == (project.resolve(), (project / "scenarios").resolve())
    outcome = run_sweep(plan, runner=lambda scenario, folder: None)
    assert outcome.ran == ["seed-0", "seed-1"]
    assert read_import_path(plan.folder / "seed-0") == list(plan.import_path)

    # from another folder, with the sweep file moved away from its plugin: found through the points' record
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = shutil.move(path, elsewhere / "sweep.yaml")
    monkeypatch.chdir(elsewhere)
    sys.path[:] = [p for p in sys.path if p not in map(str, plan.import_path)]
    for name in PLUGIN_MODULES:
        del sys.modules[name]
    importlib.invalidate_caches()
    assert [p.name for p in load_sweep(Path(moved), output=tmp_path / "runs").points] == ["seed-0", "seed-1"]
