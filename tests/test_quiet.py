"""Quiet by default: the console shows fedtide's lines; the libraries' notices go to run.log unless --verbose.

Each command runs as a `fedtide` subprocess, as a user runs it: logging and warnings are
process-wide, and the noise came from library imports, Flower's logger and a sweep's
spawned workers, none of which an in-process call would show as a user sees them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import small_scenario

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("INFO", "DeprecationWarning", "warnings.warn")


def tiny(tmp_path: Path, **sections) -> Path:
    """2 experiences x 1 round, 2 in-process clients with replay (whose Avalanche calls warn)."""
    raw = small_scenario(
        stream={"n_experiences": 2},
        partition={"kind": "iid", "num_clients": 2},
        federation={"rounds_per_experience": 1},
        client={"epochs": 1},
        resources={"backend": "in_process"},
    ).model_dump(mode="json")
    raw.update(sections)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fedtide(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", "from fedtide.cli.commands import main; main()", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(word in line for word in NOISE)]


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("quiet")
    return tmp_path, fedtide(tmp_path, "run", str(tiny(tmp_path)), "--output", "runs")


@pytest.mark.slow
def test_a_run_prints_no_library_notices_and_keeps_them_in_run_log(quiet_run):
    tmp_path, done = quiet_run
    assert noise(done.stdout + done.stderr) == []
    assert done.stderr == ""
    log = (tmp_path / "runs" / "small" / "run.log").read_text()
    assert "flwr INFO: aggregate_train: Received" in log  # Flower's INFO lines (its FedAvg logs each round)
    assert "DeprecationWarning" in log  # Avalanche's (replay) and JAXopt's


@pytest.mark.slow
def test_the_summary_splits_the_commands_time_and_the_console_shows_it(quiet_run):
    tmp_path, done = quiet_run
    summary = json.loads((tmp_path / "runs" / "small" / "summary.json").read_text())
    assert summary["startup_s"] > 0 and summary["rounds_s"] > 0 and summary["end_s"] > 0
    assert summary["startup_s"] > summary["rounds_s"]  # imports and data for 2 rounds of 2 tiny clients
    assert "start-up" in done.stdout and "end of run" in done.stdout


@pytest.mark.slow
def test_run_log_holds_each_warning_once(quiet_run):
    tmp_path, _ = quiet_run
    log = (tmp_path / "runs" / "small" / "run.log").read_text()
    warned = [line for line in log.splitlines() if "py.warnings" in line]
    assert warned and len(warned) == len(set(line.split(" py.warnings ")[1] for line in warned))


@pytest.mark.slow
def test_verbose_prints_the_notices_too(tmp_path):
    done = fedtide(tmp_path, "run", str(tiny(tmp_path)), "--output", "runs", "--verbose")
    assert any("INFO" in line for line in done.stderr.splitlines())
    assert "DeprecationWarning" in done.stderr
    assert "DeprecationWarning" in (tmp_path / "runs" / "small" / "run.log").read_text()


@pytest.mark.slow
def test_a_sweep_of_side_by_side_points_prints_only_fedtide_lines(tmp_path):
    path = tiny(tmp_path, sweep={"seeds": [0, 1]})
    done = fedtide(tmp_path, "sweep", str(path), "--output", "runs", "--workers", "2")
    assert noise(done.stdout + done.stderr) == []
    assert len(done.stdout.splitlines()) <= 5  # folder, the view's last state, counts, report
    for point in ("seed-0", "seed-1"):
        assert "flwr INFO: aggregate_train: Received" in (tmp_path / "runs" / "small" / point / "run.log").read_text()


def test_fedtides_own_warnings_print_and_notices_before_the_folder_exists_are_kept(tmp_path, capsys):
    import logging

    from fedtide.notices import notices_kept_in, route_notices

    route_notices()
    logging.getLogger("flwr").warning("a Flower round line")
    logging.getLogger("fedtide.privacy.opacus_model").warning("model adapted for Opacus")
    err = capsys.readouterr().err
    assert "warning: model adapted for Opacus" in err and "Flower round line" not in err
    folder = tmp_path / "sweep"  # made only once the sweep has validated its points
    with notices_kept_in(folder) as log:
        logging.getLogger("flwr").warning("another")
        folder.mkdir()
        logging.getLogger("flwr").warning("and a third")
    kept = [line.split(": ", 1)[1] for line in log.read_text().splitlines()]
    # the last four: earlier tests in this process may have left notices of their own before them
    assert kept[-4:] == ["a Flower round line", "model adapted for Opacus", "another", "and a third"]
