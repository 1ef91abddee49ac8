"""A grid of runs declared in a scenario file's `sweep:` section, run one after another or side by side.

```yaml
sweep:
  privacy.noise_multiplier: [0.0, 0.5, 1.0]   # any field path of the scenario
  continual.method: [naive, replay]           # switching method drops the old one's parameters
  continual: [{method: ewc, ewc_lambda: 10}, {method: replay, mem_size: 100}]   # or whole sections
  seeds: [0, 1, 2]                            # shorthand for `seed`
```

Each point of the cartesian product is a run folder `OUTPUT/<name>/<point>/` whose
name says the point (`noise_multiplier-0.5_method-replay_seed-0`). Every point is
validated before the first run starts. A finished point (its summary.json exists)
is skipped when the sweep runs again, so an interrupted sweep resumes where it
stopped; an unfinished one resumes from its last checkpoint (as `fedtide resume`
does), or is started afresh if it stopped before its first. A folder that holds a
*different* scenario under a point's name is never touched: the sweep refuses to start.

Points whose clients run in-process (`resources.backend: in_process`) may run side by
side, each in a process of its own (`workers`); every point's numbers are those it gives
run alone (each run seeds itself), so only the order in which points finish changes.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from fedtide.data.loading import apply_overrides, parse_scenario, read_yaml, set_field
from fedtide.data.schema import Scenario
from fedtide.errors import FederationError, ScenarioError
from fedtide.run_files import SCENARIO_FILE, SUMMARY_FILE, checkpoint_round, prepare_run_folder
from fedtide.stopping import RunStopped
from fedtide.validation import check_runnable

SWEEP_KEY = "sweep"
SEEDS_KEY = "seeds"


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid: its folder name and its full scenario."""

    name: str
    scenario: Scenario


@dataclass(frozen=True)
class Sweep:
    name: str
    output: Path
    grid: dict[str, list[Any]]
    points: list[SweepPoint]

    @property
    def folder(self) -> Path:
        return self.output / self.name


def load_sweep(path: Path, overrides: list[str] | tuple[str, ...] = (), output: Path | None = None) -> Sweep:
    """Read the file, expand its grid and validate every point (nothing runs yet)."""
    raw = read_yaml(path)
    apply_overrides(raw, overrides)  # `--set sweep.seeds=[0]` narrows the grid too
    grid = raw.pop(SWEEP_KEY, None)
    if not isinstance(grid, dict) or not grid:
        raise ScenarioError(SWEEP_KEY, f"{path} has no sweep grid", "add `sweep: {field.path: [values...]}`")
    for field, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"{SWEEP_KEY}.{field}", "must be a non-empty list of values", "e.g. [0.0, 1.0]")
    base = parse_scenario(raw)
    points = [_point(raw, dict(zip(grid, values))) for values in itertools.product(*grid.values())]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ScenarioError(SWEEP_KEY, "two grid points get the same run name", "list each value once per field")
    return Sweep(base.name, Path(output if output is not None else base.output), grid, points)


def _point(raw: dict[str, Any], assignment: dict[str, Any]) -> SweepPoint:
    scenario_raw = copy.deepcopy(raw)
    for field, value in assignment.items():
        set_field(scenario_raw, "seed" if field == SEEDS_KEY else field, value)
    name = "_".join(f"{_label(field)}-{_slug(value)}" for field, value in assignment.items())
    scenario_raw["name"] = name
    try:
        scenario = parse_scenario(scenario_raw)
        check_runnable(scenario)
    except ScenarioError as error:
        raise ScenarioError(f"{SWEEP_KEY} point {name}", str(error)) from None
    return SweepPoint(name, scenario)


def _label(field: str) -> str:
    return "seed" if field == SEEDS_KEY else field.rsplit(".", 1)[-1]


def _slug(value: Any) -> str:
    """A value as it appears in a folder name: a section by its component's name."""
    if isinstance(value, dict):
        value = value.get("method", value.get("name", "-".join(f"{k}{v}" for k, v in value.items())))
    elif isinstance(value, list):
        value = "-".join(map(str, value))
    return re.sub(r"[^A-Za-z0-9._]+", "", str(value)) or "none"


Runner = Callable[[Scenario, Path], None]


@dataclass
class SweepOutcome:
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]


def run_sweep(
    sweep: Sweep, runner: Runner, on_point: Callable[[SweepPoint, str], None] | None = None, workers: int = 1
) -> SweepOutcome:
    """Run every point not finished yet; a failed run does not stop the others.

    `runner(scenario, folder)` runs one scenario into a prepared folder; `on_point`
    hears "skipped", "started", "finished" or "failed" for each point. With `workers`
    > 1 that many points run at a time, each in a process of its own, so `runner` must
    be a module-level function (it is sent to the worker by name).
    """
    _check_folders(sweep)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    (sweep.folder / "sweep.yaml").write_text(yaml.safe_dump({SWEEP_KEY: sweep.grid}, sort_keys=False))
    outcome = SweepOutcome([], [], {})
    notify = on_point or (lambda point, event: None)
    pending: list[tuple[SweepPoint, Path]] = []
    for point in sweep.points:
        folder = sweep.folder / point.name
        if (folder / SUMMARY_FILE).is_file():
            outcome.skipped.append(point.name)
            notify(point, "skipped")
            continue
        if folder.exists() and checkpoint_round(folder) is None:
            shutil.rmtree(folder)  # an interrupted run of this very scenario (checked above) with nothing to resume
        pending.append((point, folder))
    if workers <= 1 or len(pending) <= 1:
        for point, folder in pending:
            _fresh_or_resumed(folder, point.scenario)
            notify(point, "started")
            _record(outcome, notify, point, _attempt(partial(runner, point.scenario, folder)))
        return outcome
    context = multiprocessing.get_context("spawn")  # never fork a process holding torch's threads
    with ProcessPoolExecutor(workers, mp_context=context) as pool, _stop_points_with_the_sweep(pool):
        running: dict[Future, SweepPoint] = {}
        for point, folder in pending:
            _fresh_or_resumed(folder, point.scenario)
            running[pool.submit(runner, point.scenario, folder)] = point
            notify(point, "started")
        for future in as_completed(running):
            _record(outcome, notify, running[future], _attempt(future.result))
    return outcome


@contextmanager
def _stop_points_with_the_sweep(pool: ProcessPoolExecutor) -> Iterator[None]:
    """A stopped sweep (Ctrl-C, SIGTERM) starts no more points and passes the signal on to those running.

    Each then stops as a run does; their checkpoints stay, so running the sweep again resumes them.
    """
    try:
        yield
    except RunStopped as stop:
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, stop.signum)
        raise


def _fresh_or_resumed(folder: Path, scenario: Scenario) -> None:
    """A new run folder for the point, unless it holds the point's interrupted run: the run resumes from it."""
    if not folder.exists():
        prepare_run_folder(folder, scenario)


def _attempt(run: Callable[[], Any]) -> str | None:
    """None when the run finished, else the reason it failed (a run's own failure, not a bug)."""
    try:
        run()
    except FederationError as error:
        return str(error)
    return None


def _record(outcome: SweepOutcome, notify: Callable, point: SweepPoint, failure: str | None) -> None:
    if failure is None:
        outcome.ran.append(point.name)
        notify(point, "finished")
    else:
        outcome.failed[point.name] = failure
        notify(point, "failed")


def default_workers(sweep: Sweep) -> int:
    """As many points at a time as there are cores when every point runs in-process, else one."""
    if any(point.scenario.resources.backend != "in_process" for point in sweep.points):
        return 1
    return min(_cores(), len(sweep.points))


def check_workers(sweep: Sweep, workers: int) -> None:
    """Points on Ray run one at a time: each starts its own Ray instance for its clients."""
    if workers > 1 and default_workers(sweep) == 1:
        raise ScenarioError(
            "--workers",
            f"{workers} points at a time, but this sweep's clients run on Ray (resources.backend: ray)",
            "set resources.backend: in_process to run points side by side, or leave --workers unset",
        )


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_folders(sweep: Sweep) -> None:
    """Refuse to start if a point's folder holds another scenario (a different sweep's results)."""
    for point in sweep.points:
        written = sweep.folder / point.name / SCENARIO_FILE
        if written.is_file() and parse_scenario(yaml.safe_load(written.read_text())) != point.scenario:
            raise ScenarioError(
                "--output",
                f"{written.parent} holds a different scenario from this sweep's point",
                "give the sweep another --output or name, or move that folder",
            )
