"""The files of one run folder, written and read.

scenario.yaml (the resolved scenario), import_path.json (the folders the run made
importable for its "module:Class" plugins, so that a resume imports them as it did),
metrics.jsonl (a `RoundRecord` per round and an `ExperienceRecord` per experience, written
as the run goes), model.pt, summary.json (a `RunSummary`), and while the run is unfinished
checkpoint/ (its latest checkpoint, round-NNNN.pkl, and the clients-*.pkl files of client
states it names: `fedtide.server.checkpoint`). A run never writes into an existing
folder: a second run of the same name gets a numbered sibling; only `fedtide resume`
continues one. summary.json appears only, and whole, when the run has finished. Readers
(the report, the CLI) use the records, never torch: this module imports none.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from fedtide.errors import ScenarioError
from fedtide.records.checkpoint_files import checkpoint_round
from fedtide.records.metrics import ExperienceRecord, RoundRecord
from fedtide.records.summary import RunSummary
from fedtide.scenario.loading import parse_scenario, scenario_to_yaml
from fedtide.scenario.schema import Scenario

SCENARIO_FILE = "scenario.yaml"
IMPORT_PATH_FILE = "import_path.json"  # {"folders": [...]}: absolute folders put on sys.path for plugins
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"  # the final global weights (a torch state_dict), written by the server
LOG_FILE = "errors.log"  # every failure in full (tracebacks), where the console and metrics have one line
NOTICES_FILE = "run.log"  # the libraries' log lines and warnings, kept off the console (`fedtide.notices`)


def create_run_folder(scenario: Scenario, output: Path | None = None, import_path: Sequence[Path] = ()) -> Path:
    """Make a fresh folder `output/name` (or `name-2`, `name-3`...) holding the resolved scenario.

    `import_path`: the folders this run made importable for its plugins (`fedtide.registry.plugin_folders`).
    """
    parent = Path(output if output is not None else scenario.output)
    parent.mkdir(parents=True, exist_ok=True)
    folder, suffix = parent / scenario.name, 1
    while True:
        try:
            return prepare_run_folder(folder, scenario, import_path)
        except FileExistsError:
            suffix += 1
            folder = parent / f"{scenario.name}-{suffix}"


def prepare_run_folder(folder: Path, scenario: Scenario, import_path: Sequence[Path] = ()) -> Path:
    """Create `folder` (which must not exist yet) with the resolved scenario, and where its plugins come from."""
    folder.mkdir(parents=True)
    (folder / SCENARIO_FILE).write_text(scenario_to_yaml(scenario))
    if import_path:
        folders = [str(Path(path).resolve()) for path in import_path]
        (folder / IMPORT_PATH_FILE).write_text(json.dumps({"folders": folders}, indent=1) + "\n")
    return folder


def read_import_path(folder: Path) -> list[Path]:
    """The folders a run made importable for its plugins; none for a run that recorded none (or no such folder)."""
    path = folder / IMPORT_PATH_FILE
    if not path.is_file():
        return []
    return [Path(name) for name in json.loads(path.read_text())["folders"]]


def read_run_scenario(folder: Path) -> Scenario:
    """The scenario a run folder was made for (its scenario.yaml)."""
    path = folder / SCENARIO_FILE
    if not path.is_file():
        raise ScenarioError(str(folder), "is not a run folder (no scenario.yaml in it)", "give a folder under runs/")
    return parse_scenario(yaml.safe_load(path.read_text()))


def unfinished_run(scenario: Scenario, output: Path | None = None) -> tuple[Path, int] | None:
    """A folder that a run of `scenario` would take or has taken, holding an unfinished run of it to resume.

    Looks where `create_run_folder` would (`name`, `name-2`, ...) for a folder with this
    very scenario, no summary.json and a checkpoint; returns it with its checkpoint's round.
    """
    parent = Path(output if output is not None else scenario.output)
    taken = re.compile(re.escape(scenario.name) + r"(?:-(\d+))?")
    numbered = {}
    for path in parent.glob(f"{scenario.name}*"):
        if match := taken.fullmatch(path.name):
            numbered[int(match.group(1) or 1)] = path
    for _, folder in sorted(numbered.items()):
        done = checkpoint_round(folder)
        if done is None or (folder / SUMMARY_FILE).exists() or not (folder / SCENARIO_FILE).is_file():
            continue
        try:
            same = read_run_scenario(folder) == scenario
        except ScenarioError:  # a scenario.yaml this version cannot read is not this scenario
            same = False
        if same:
            return folder, done
    return None


def append_metrics(folder: Path, record: RoundRecord | ExperienceRecord) -> None:
    with (folder / METRICS_FILE).open("a") as stream:
        stream.write(json.dumps(record.to_dict()) + "\n")


def append_log(folder: Path, text: str) -> Path:
    """Add a failure, in full, to the run's log; the path is what one-line messages point to."""
    path = folder / LOG_FILE
    with path.open("a") as stream:
        stream.write(text.rstrip("\n") + "\n\n")
    return path


def metrics_length(folder: Path) -> int:
    """How many bytes of metrics.jsonl are on disk, made durable first (a checkpoint records it)."""
    path = folder / METRICS_FILE
    with path.open("rb") as stream:
        os.fsync(stream.fileno())
    return path.stat().st_size


def truncate_metrics(folder: Path, length: int) -> None:
    """Cut metrics.jsonl back to its first `length` bytes: the rounds a checkpoint holds, not those run after it."""
    path = folder / METRICS_FILE
    if path.stat().st_size < length:
        raise ScenarioError(
            str(path), f"is shorter than its checkpoint records ({length} bytes)", "start the run afresh"
        )
    os.truncate(path, length)


def write_summary(folder: Path, summary: RunSummary) -> None:
    """Write summary.json atomically, so a reader never sees half of it."""
    partial = folder / (SUMMARY_FILE + ".partial")
    partial.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    os.replace(partial, folder / SUMMARY_FILE)


def read_summary(folder: Path) -> RunSummary:
    with _run_file(folder / SUMMARY_FILE) as path:
        return RunSummary.from_dict(json.loads(path.read_text()))


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as written, one dict per line (`type`: round or experience)."""
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines() if line]


def rounds_done(folder: Path) -> int:
    """How many rounds a run, perhaps still going, has written (without parsing its records)."""
    try:
        lines = (folder / METRICS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(line.startswith(f'{{"type": "{RoundRecord._TYPE}"') for line in lines)


def read_rounds(folder: Path) -> list[RoundRecord]:
    with _run_file(folder / METRICS_FILE):
        return [RoundRecord.from_dict(r) for r in read_metrics(folder) if r["type"] == RoundRecord._TYPE]


@contextmanager
def _run_file(path: Path) -> Iterator[Path]:
    """A file another program wrote, or one edited by hand, fails naming the file, not with a traceback."""
    try:
        yield path
    except (KeyError, TypeError, ValueError) as error:
        raise ScenarioError(str(path), f"is not a fedtide run file ({type(error).__name__}: {error})") from None
