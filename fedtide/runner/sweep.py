"""A grid of runs declared in a scenario file's `sweep:` section, run one after another or side by side.

```yaml
sweep:
  privacy.noise_multiplier: [0.0, 0.5, 1.0]   # any field path of the scenario
  continual.method: [naive, replay]           # switching method drops the old one's parameters
  continual: [{method: ewc, ewc_lambda: 10}, {method: replay, mem_size: 100}]   # or whole sections
  seeds: [0, 1, 2]                            # shorthand for `seed`
report:                                       # optional: what the sweep's report compares
  privacy_unit: client                        # the unit of ε (sample | client); default: the runs'
```

Each point of the cartesian product is a run folder `OUTPUT/<name>/<point>/` whose
name says the point (`noise_multiplier-0.5_method-replay_seed-0`). Every point is
validated before the first run starts. Each point's folder records the folders made
importable for plugins (the working folder and the sweep file's, `fedtide.registry`), and
a sweep that goes on imports its points' plugins from those again. A finished point (its
summary.json exists) is skipped when the sweep runs again, so an interrupted sweep resumes
where it stopped; an unfinished one resumes from its last checkpoint (as `fedtide resume`
does), or is started afresh if it stopped before its first. A folder that holds a
*different* scenario under a point's name is never touched: the sweep refuses to start.

Points run side by side where the machine or the cluster allows (`fedtide.runner.sweep_executors`):
in worker processes when their clients run in-process (`resources.backend: in_process`),
else as tasks on one Ray instance for the whole sweep. Every point's numbers are those
it gives run alone (each run seeds itself), so only the order in which points finish
changes.
"""

from __future__ import annotations

import copy
import itertools
import re
import shutil
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from fedtide.errors import FederationError, ScenarioError
from fedtide.records.checkpoint_files import checkpoint_round
from fedtide.records.report_options import REPORT_KEY, SWEEP_FILE, ReportOptions, parse_report_options
from fedtide.records.run_folder import SCENARIO_FILE, SUMMARY_FILE, prepare_run_folder, read_import_path
from fedtide.registry import make_importable, plugin_folders
from fedtide.runner.sweep_executors import Submit, local_processes, ray_tasks
from fedtide.runner.validation import available_cores, check_runnable
from fedtide.scenario.loading import apply_overrides, parse_scenario, read_yaml, set_field
from fedtide.scenario.schema import Scenario

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
    report: ReportOptions = ReportOptions()  # the file's `report:` section, kept in the sweep folder
    import_path: tuple[Path, ...] = ()  # the folders made importable for plugins, recorded in each new point

    @property
    def folder(self) -> Path:
        return self.output / self.name


def load_sweep(path: Path, overrides: list[str] | tuple[str, ...] = (), output: Path | None = None) -> Sweep:
    """Read the file, expand its grid and validate every point (nothing runs yet).

    Plugins are imported from the working folder and the file's (which new points record),
    and from the folders that points run before recorded, so a sweep that goes on from
    another working folder finds the plugins its runs used.
    """
    raw = read_yaml(path)
    apply_overrides(raw, overrides)  # `--set sweep.seeds=[0]` narrows the grid too
    grid = raw.pop(SWEEP_KEY, None)
    if not isinstance(grid, dict) or not grid:
        raise ScenarioError(SWEEP_KEY, f"{path} has no sweep grid", "add `sweep: {field.path: [values...]}`")
    for field, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"{SWEEP_KEY}.{field}", "must be a non-empty list of values", "e.g. [0.0, 1.0]")
    report = parse_report_options(raw.pop(REPORT_KEY, None))
    base = parse_scenario(raw)
    output_folder = Path(output if output is not None else base.output)
    assignments = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    own = plugin_folders(path)
    recorded = [read_import_path(output_folder / base.name / _point_name(a)) for a in assignments]
    make_importable(*own, *(folder for folders in recorded for folder in folders))
    points = [_point(raw, assignment) for assignment in assignments]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ScenarioError(SWEEP_KEY, "two grid points get the same run name", "list each value once per field")
    _check_report(points, report)
    return Sweep(base.name, output_folder, grid, points, report, tuple(own))


def _check_report(points: list[SweepPoint], report: ReportOptions) -> None:
    """A sweep whose report could not be written fails before it runs: with points of both DP levels,
    the report must be told which ε it compares (`fedtide.report.runs.place_runs`)."""
    both = [p for p in points if p.scenario.privacy.private and p.scenario.privacy.client_private]
    if both and len(points) > 1 and report.privacy_unit is None:
        raise ScenarioError(
            f"{REPORT_KEY}.privacy_unit",
            f"must be given: point {both[0].name} runs sample- and client-level DP, two ε's neither of which "
            "bounds the other, and the report compares one",
            "add report: {privacy_unit: sample} or {privacy_unit: client} to the sweep file",
        )


def _point(raw: dict[str, Any], assignment: dict[str, Any]) -> SweepPoint:
    scenario_raw = copy.deepcopy(raw)
    for field, value in assignment.items():
        set_field(scenario_raw, "seed" if field == SEEDS_KEY else field, value)
    name = _point_name(assignment)
    scenario_raw["name"] = name
    try:
        scenario = parse_scenario(scenario_raw)
        check_runnable(scenario)
    except ScenarioError as error:
        raise ScenarioError(f"{SWEEP_KEY} point {name}", str(error)) from None
    return SweepPoint(name, scenario)


def _point_name(assignment: dict[str, Any]) -> str:
    """The point's run folder name, which says its values: `noise_multiplier-0.5_method-replay_seed-0`."""
    return "_".join(f"{_label(field)}-{_slug(value)}" for field, value in assignment.items())


def _label(field: str) -> str:
    return "seed" if field == SEEDS_KEY else field.rsplit(".", 1)[-1]


def _slug(value: Any) -> str:
    """A value as it appears in a folder name: a section by its component's name, else by its
    settings (`{level: client, client_level: {target_epsilon: 8}}` -> `level-client.target_epsilon-8`)."""
    if isinstance(value, dict):
        if "method" in value or "name" in value:
            value = value.get("method", value.get("name"))
        else:
            return ".".join(f"{_slug(k)}-{_slug(v)}" for k, v in _leaves(value).items()) or "none"
    elif isinstance(value, list):
        value = "-".join(map(str, value))
    # a plugin path stays readable: "my_pkg.distill:Logit" -> "my_pkg.distill.Logit"
    return re.sub(r"[^A-Za-z0-9._]+", "", str(value).replace(":", ".")) or "none"


def _leaves(section: dict[str, Any]) -> dict[str, Any]:
    """A nested section's settings by their own names: {"client_level": {"noise": 1}} -> {"noise": 1}."""
    leaves: dict[str, Any] = {}
    for key, value in section.items():
        leaves |= _leaves(value) if isinstance(value, dict) else {key: value}
    return leaves


Runner = Callable[[Scenario, Path], None]
# How often the pooled loop wakes to refresh the progress view while points run.
REFRESH_S = 0.5


@dataclass
class SweepOutcome:
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]


def run_sweep(
    sweep: Sweep,
    on_point: Callable[[SweepPoint, str], None] | None = None,
    workers: int | None = None,
    runner: Runner | None = None,
    refresh: Callable[[], None] | None = None,
) -> SweepOutcome:
    """Run every point not finished yet; a failed run does not stop the others.

    Points whose clients run in-process (`resources.backend: in_process`) run in this
    process one after another, or with `workers` > 1 that many at a time in worker
    processes. Points on Ray run as Ray tasks on one Ray instance for the whole sweep,
    as many at a time as its resources allow (at most `workers`). A given `runner(scenario,
    folder)` runs every point here, one after another. `on_point` hears "skipped",
    "started", "finished" or "failed" for each point; `refresh` is called after every
    round of a point run here and every `REFRESH_S` while points run elsewhere.
    """
    _check_folders(sweep)
    address = _ray_address(sweep)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    written = {SWEEP_KEY: sweep.grid} | ({REPORT_KEY: sweep.report.to_dict()} if sweep.report.to_dict() else {})
    (sweep.folder / SWEEP_FILE).write_text(yaml.safe_dump(written, sort_keys=False))
    outcome = SweepOutcome([], [], {})
    notify = on_point or (lambda point, event: None)
    tick = refresh or (lambda: None)
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
    on_ray = any(point.scenario.resources.backend == "ray" for point, _ in pending)
    side_by_side = min(workers or available_cores(), len(pending))
    if runner is None and not on_ray and side_by_side > 1:
        with local_processes(side_by_side) as submit:
            _run_pooled(pending, submit, side_by_side, outcome, notify, tick, sweep.import_path)
    elif runner is None and on_ray:
        with ray_tasks(address) as submit:
            _run_pooled(pending, submit, workers or len(pending), outcome, notify, tick, sweep.import_path)
    else:
        run = runner or partial(_run_here, refresh=tick)
        for point, folder in pending:
            _fresh_or_resumed(folder, point.scenario, sweep.import_path)
            notify(point, "started")
            _record(outcome, notify, point, _attempt(partial(run, point.scenario, folder)))
    return outcome


def _run_here(scenario: Scenario, folder: Path, refresh: Callable[[], None]) -> None:
    from fedtide.runner.simulation import simulate_in_process

    simulate_in_process(scenario, folder, observer=lambda record: refresh())


def _run_pooled(
    pending: list[tuple[SweepPoint, Path]],
    submit: Submit,
    window: int,
    outcome: SweepOutcome,
    notify: Callable[[SweepPoint, str], None],
    refresh: Callable[[], None],
    import_path: tuple[Path, ...],
) -> None:
    """Keep up to `window` points submitted; record each as it ends, in whatever order."""
    queue = list(pending)
    running: dict[Future, tuple[SweepPoint, Path]] = {}
    while queue or running:
        while queue and len(running) < window:
            point, folder = queue.pop(0)
            _fresh_or_resumed(folder, point.scenario, import_path)
            running[submit(point.scenario, folder)] = (point, folder)
            notify(point, "started")
        done, _ = wait(running, timeout=REFRESH_S, return_when=FIRST_COMPLETED)
        for future in done:
            point, folder = running.pop(future)
            _record(outcome, notify, point, _pooled_failure(future.result(), folder))
        refresh()


def _pooled_failure(failure: str | None, folder: Path) -> str | None:
    """A run that finished elsewhere must have left its summary where this machine reads it."""
    if failure is None and not (folder / SUMMARY_FILE).is_file():
        return f"it finished on a Ray node that does not share {folder.parent}: put --output on a shared filesystem"
    return failure


def _ray_address(sweep: Sweep) -> str | None:
    """The one Ray cluster the sweep joins (None: a private Ray on this machine)."""
    addresses = {point.scenario.resources.ray_address for point in sweep.points}
    if len(addresses) > 1:
        raise ScenarioError(
            "resources.ray_address", "the sweep's points name different Ray clusters", "sweep one cluster at a time"
        )
    return addresses.pop()


def _fresh_or_resumed(folder: Path, scenario: Scenario, import_path: tuple[Path, ...]) -> None:
    """A new run folder for the point, unless it holds the point's interrupted run: the run resumes from it."""
    if not folder.exists():
        prepare_run_folder(folder, scenario, import_path)


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
