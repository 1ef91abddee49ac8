"""The files of one run folder: scenario.yaml, metrics.jsonl (as the run goes), model.pt, summary.json.

A run never writes into an existing folder: a second run of the same name gets a
numbered sibling. summary.json appears only, and whole, when the run has finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedtide.data.loading import scenario_to_yaml
from fedtide.data.schema import Scenario

SCENARIO_FILE = "scenario.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"  # the final global weights (a torch state_dict), written by the server
# The false-positive rate at which a summary's audit reports the attack's true-positive rate.
LOW_FPR = 0.01


def create_run_folder(scenario: Scenario, output: Path | None = None) -> Path:
    """Make a fresh folder `output/name` (or `name-2`, `name-3`...) holding the resolved scenario."""
    parent = Path(output if output is not None else scenario.output)
    parent.mkdir(parents=True, exist_ok=True)
    folder, suffix = parent / scenario.name, 1
    while True:
        try:
            return prepare_run_folder(folder, scenario)
        except FileExistsError:
            suffix += 1
            folder = parent / f"{scenario.name}-{suffix}"


def prepare_run_folder(folder: Path, scenario: Scenario) -> Path:
    """Create `folder` (which must not exist yet) with the resolved scenario in it."""
    folder.mkdir(parents=True)
    (folder / SCENARIO_FILE).write_text(scenario_to_yaml(scenario))
    return folder


def append_metrics(folder: Path, record: dict[str, Any]) -> None:
    with (folder / METRICS_FILE).open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """Write summary.json atomically, so a reader never sees half of it."""
    partial = folder / (SUMMARY_FILE + ".partial")
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(partial, folder / SUMMARY_FILE)


def read_summary(folder: Path) -> dict[str, Any]:
    return json.loads((folder / SUMMARY_FILE).read_text())


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines() if line]
