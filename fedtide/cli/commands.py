"""The `fedtide` command: run, resume, sweep, report, validate, list and check-plugin.

User errors (`ScenarioError`) print one line and exit with code 2; nothing is
written for a scenario that fails validation. The libraries' log lines and warnings go to
the run's run.log, not the console, unless `--verbose` (`fedtide.notices`). Ctrl-C
(SIGINT) or SIGTERM stops a run, resume or sweep cleanly with one line and exit code 130
or 143.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedtide.errors import FederationError, ScenarioError

if TYPE_CHECKING:
    from fedtide.records.metrics import RoundRecord

cli = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    help="Federated continual learning simulator.",
)
console = Console()
err_console = Console(stderr=True)
STARTED = time.time()  # the command's start (this module is imported first): the origin of a run's start-up time



def _importable_folder(scenario_file: Path) -> Path:
    """Plugins named "module:Class" are found next to the scenario file (and in the current folder)."""
    from fedtide.registry import make_importable, plugin_folders

    make_importable(*plugin_folders(scenario_file))
    return scenario_file


ScenarioArg = Annotated[Path, typer.Argument(help="Scenario YAML file.", callback=_importable_folder)]
OutputOption = Annotated[Path | None, typer.Option(help="Folder for runs (default: the scenario's output, runs/).")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Also print the libraries' log lines and warnings (else in run.log).")
]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a field: --set federation.strategy.name=fedprox")
]


class PrivacyUnit(StrEnum):
    """`fedtide report --privacy-unit`: what one neighbouring dataset differs by."""

    sample = "sample"
    client = "client"


def main() -> None:
    """Entry point: turn user errors into one line and exit code 2."""
    from fedtide.notices import route_notices

    route_notices()
    try:
        code = cli(standalone_mode=False)  # click returns a command's typer.Exit code here
    except ScenarioError as error:
        err_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except FederationError as error:
        err_console.print(f"[red]run failed:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:  # click's usage errors
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(2)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


@cli.command()
def run(
    scenario_file: ScenarioArg,
    set_: SetOption = None,
    output: OutputOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run a scenario; writes runs/<name>/ (scenario.yaml, metrics.jsonl, model.pt, summary.json, report.html).

    Refuses (exit 2) when the folder holds an unfinished run of the same scenario: resume it instead.
    """
    _verbose(verbose)
    scenario = _load_checked(scenario_file, set_)
    from fedtide.records.run_folder import create_run_folder, unfinished_run
    from fedtide.registry import plugin_folders

    if found := unfinished_run(scenario, output):
        folder, done = found
        raise ScenarioError(
            "",
            f"{folder} holds an unfinished run of this scenario (round {done}/{scenario.total_rounds}): "
            f"fedtide resume {folder}",
            "to start afresh instead, give another --output or move that folder",
        )
    run_dir = create_run_folder(scenario, output, plugin_folders(scenario_file))
    console.print(f"run folder: [bold]{run_dir}[/bold]")
    _run_to_the_end(scenario, run_dir, done=0)


@cli.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="The folder of an unfinished run, e.g. runs/quickstart.")],
    verbose: VerboseOption = False,
) -> None:
    """Continue a stopped or killed run from its last checkpoint; the rounds it holds are not run again.

    Its plugins are imported from the folders the run made importable (its import_path.json), whatever
    the working folder now: the resume's own working folder and the scenario's are not added.
    """
    _verbose(verbose)
    from fedtide.records.checkpoint_files import checkpoint_round
    from fedtide.records.run_folder import SUMMARY_FILE, read_import_path, read_run_scenario
    from fedtide.registry import PluginNotFound, make_importable
    from fedtide.runner.validation import check_runnable

    scenario = read_run_scenario(run_dir)
    if (run_dir / SUMMARY_FILE).exists():
        raise ScenarioError(str(run_dir), "holds a finished run (it has summary.json)", "nothing to resume")
    done = checkpoint_round(run_dir)
    if done is None:
        raise ScenarioError(
            str(run_dir),
            "has no checkpoint to resume from (it stopped before its first one, or checkpoint.every is 0)",
            "run its scenario again with fedtide run",
        )
    folders = read_import_path(run_dir)
    make_importable(*folders)
    try:
        check_runnable(scenario)
    except PluginNotFound as error:
        where = f"imported its plugins from {', '.join(map(str, folders))}" if folders else "recorded no plugin folders"
        raise ScenarioError(
            error.field, error.problem, f"the run {where}: put the module back there, or install it"
        ) from None
    console.print(f"resuming [bold]{run_dir}[/bold] after round {done}/{scenario.total_rounds}")
    _run_to_the_end(scenario, run_dir, done)


def _run_to_the_end(scenario, run_dir: Path, done: int) -> None:
    """Run (or go on running) `scenario` in `run_dir` under a progress bar, then show its summary and report."""
    from fedtide.cli.progress import round_status, run_progress
    from fedtide.records.run_folder import read_summary
    from fedtide.report.console import summary_view
    from fedtide.runner.simulation import run_scenario
    from fedtide.stop_signals import stopped_message

    with _stops_with(lambda: stopped_message(run_dir, scenario.total_rounds)), run_progress(console) as progress:
        starting = "starting Ray..." if scenario.resources.backend == "ray" else "starting..."
        task = progress.add_task("rounds", total=scenario.total_rounds, completed=done, status=starting)

        def on_round(record: RoundRecord) -> None:
            progress.update(task, completed=record.round, status=round_status(record))

        try:
            run_scenario(scenario, run_dir, observer=on_round, started_at=STARTED)
        except FederationError:
            progress.update(task, status="[red]failed[/red] (below)")
            raise
    console.print(summary_view(read_summary(run_dir), scenario.federation.rounds_per_experience))
    console.print(f"report: [bold]{_write_report([run_dir], run_dir)}[/bold]")


@contextmanager
def _stops_with(message: Callable[[], str]) -> Iterator[None]:
    """SIGINT or SIGTERM within: stop cleanly, print `message()` (one line) and exit 130 or 143."""
    from fedtide.stop_signals import RunStopped, stop_on_signals

    try:
        with stop_on_signals():
            yield
    except RunStopped as stop:
        err_console.print(message(), highlight=False, soft_wrap=True)
        raise typer.Exit(stop.exit_code) from None


_SWEEP_STOPPED = (
    "stopped; run the same fedtide sweep again to go on: finished runs are kept, "
    "unfinished ones resume from their last checkpoints"
)


@cli.command()
def sweep(
    scenario_file: ScenarioArg,
    set_: SetOption = None,
    output: OutputOption = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Most points at a time (default: one per core in-process, as Ray's resources allow).", min=1),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the grid in the file's `sweep:` section; a re-run skips the runs already finished."""
    from fedtide.cli.progress import SweepProgress
    from fedtide.notices import notices_kept_in
    from fedtide.runner.sweep import load_sweep, run_sweep

    _verbose(verbose)
    plan = load_sweep(scenario_file, set_ or [], output)
    console.print(f"sweep folder: [bold]{plan.folder}[/bold] ({len(plan.points)} runs)")
    with _stops_with(lambda: _SWEEP_STOPPED), notices_kept_in(plan.folder), SweepProgress(plan, console) as view:
        outcome = run_sweep(plan, view.on_point, workers, refresh=view.refresh)
    console.print(
        f"{len(outcome.ran)} ran, {len(outcome.skipped)} skipped (finished before), {len(outcome.failed)} failed"
    )
    console.print(f"report: [bold]{_write_report([plan.folder], plan.folder)}[/bold]")
    for name, reason in outcome.failed.items():
        err_console.print(f"[red]run failed:[/red] {name}: {reason}", highlight=False, soft_wrap=True)
    if outcome.failed:
        raise typer.Exit(1)


@cli.command()
def report(
    folders: Annotated[list[Path], typer.Argument(help="Run folders, sweep folders, or folders holding them.")],
    output: Annotated[Path | None, typer.Option(help="Where to write (default: the folder, if only one).")] = None,
    privacy_unit: Annotated[
        PrivacyUnit | None,
        typer.Option(
            help="The unit of the ε runs are compared at (report.privacy_unit). Default: the sweep's report "
            "section, else each run's own unit; required over several runs when one has both levels.",
            case_sensitive=False,
        ),
    ] = None,
) -> None:
    """Write report.html (self-contained), report.md, report.csv and figures/ for finished runs."""
    target = output or (folders[0] if len(folders) == 1 else Path("report"))
    unit = privacy_unit.value if privacy_unit else None
    console.print(f"report: [bold]{_write_report(folders, target, unit)}[/bold]")


def _write_report(folders: list[Path], target: Path, privacy_unit: str | None = None) -> Path:
    """The report of the runs under `folders`, at ε of `privacy_unit`, else of the unit their sweep file gave."""
    from fedtide.report.document import write_report
    from fedtide.report.runs import find_runs, saved_privacy_unit

    runs, unfinished = find_runs(folders)
    return write_report(runs, target, unfinished, privacy_unit or saved_privacy_unit(folders))


@cli.command()
def validate(scenario_file: ScenarioArg, set_: SetOption = None) -> None:
    """Check a scenario (schema, names, dataset, partitioning), or every point of a sweep, without running."""
    from fedtide.runner.sweep import SWEEP_KEY, load_sweep
    from fedtide.scenario.loading import read_yaml

    if SWEEP_KEY in read_yaml(scenario_file):
        plan = load_sweep(scenario_file, set_ or [])
        console.print(f"[green]ok[/green]: sweep '{plan.name}': {len(plan.points)} runs into {plan.folder}")
        return
    scenario = _load_checked(scenario_file, set_)
    console.print(
        f"[green]ok[/green]: '{scenario.name}': {scenario.dataset.name}, {scenario.stream.describe()}, "
        f"{scenario.partition.num_clients} clients ({scenario.partition.kind}), "
        f"{scenario.federation.strategy.name} + {scenario.continual.method}, {scenario.total_rounds} rounds"
    )


@cli.command("list")
def list_components() -> None:
    """Show the built-in strategies, continual methods, datasets, models and partitioners."""
    from fedtide.continual.methods import METHOD, all_methods
    from fedtide.data.datasets import DATASETS
    from fedtide.data.partition import PARTITIONERS
    from fedtide.models import MODELS
    from fedtide.registry import installed_plugins
    from fedtide.server.strategies import STRATEGIES, STRATEGY

    strategies = {n: f"flwr.serverapp.strategy.{c.__name__}" for n, c in STRATEGIES.items()}
    # continual methods get a third column: whether they may run under DP-SGD
    known = all_methods()
    methods = {n: (m.description, "yes" if m.dp_compatible else "no") for n, m in known.items()}
    methods |= {n: (what, "see check-plugin") for n, what in installed_plugins(METHOD).items()}
    sections = {
        "federation.strategy.name": strategies | installed_plugins(STRATEGY),
        "continual.method": methods,
        "dataset.name": {
            n: f"{d.description}: {d.num_classes} classes, {'x'.join(map(str, d.input_shape))}"
            for n, d in DATASETS.items()
        },
        "model.name": MODELS,
        "partition.kind": PARTITIONERS,
    }
    for field, entries in sections.items():
        table = Table(title=field, title_justify="left")
        table.add_column("name")
        table.add_column("what")
        if field == "continual.method":
            table.add_column("DP-compatible")
        for name, what in entries.items():
            table.add_row(name, *(what if isinstance(what, tuple) else (what,)))
        console.print(table)
    console.print(
        'Any "pkg.module:Name" class works too for the strategy and the continual method (docs/extending.md); '
        "check one with: fedtide check-plugin NAME [--set key=value ...]"
    )


@cli.command()
def new(
    kind: Annotated[str, typer.Argument(help="strategy or method")],
    name: Annotated[str, typer.Argument(help="A lower-case module name, e.g. trimmed_mean")],
    folder: Annotated[Path, typer.Option("--dir", help="Where to write NAME.py and NAME.yaml.")] = Path("."),
) -> None:
    """Write a minimal, runnable, commented plugin (NAME.py) and a scenario using it (NAME.yaml)."""
    from fedtide.cli.new_plugin import write_plugin

    module, scenario = write_plugin(kind, name, folder)
    console.print(
        f"wrote [bold]{module}[/bold] and [bold]{scenario}[/bold]; run it with: fedtide run {scenario}", soft_wrap=True
    )


@cli.command("check-plugin")
def check_plugin(
    name: Annotated[str, typer.Argument(help='A strategy or continual method: short name or "pkg.module:Name".')],
    set_: Annotated[list[str] | None, typer.Option("--set", help="A constructor parameter: --set key=value")] = None,
    clients: Annotated[int, typer.Option(help="Clients in the check's federation (trimming needs > 2).", min=1)] = 2,
    override: Annotated[
        list[str] | None, typer.Option(help="A field of the check's scenario: --override federation.fraction_train=0.5")
    ] = None,
) -> None:
    """Run the plugin contract checks on digits clients x 2 experiences; exit 1 naming a failed check."""
    from fedtide.cli.check_plugin import check_plugin as run_checks
    from fedtide.cli.check_plugin import parse_params
    from fedtide.registry import make_importable

    make_importable(Path.cwd())
    with warnings.catch_warnings():  # Avalanche's and Opacus's notices about their own APIs
        warnings.simplefilter("ignore")
        report = run_checks(name, parse_params(set_ or []), clients, override or [])
    table = Table(title=f"{report.kind or 'plugin'} {name}", title_justify="left")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for check in report.checks:
        table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAILED[/red]", check.detail)
    console.print(table)
    if not report.ok:
        err_console.print(f"[red]check failed:[/red] {report.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _load_checked(scenario_file: Path, overrides: list[str] | None):
    from fedtide.runner.validation import check_runnable
    from fedtide.scenario.loading import load_scenario

    scenario = load_scenario(scenario_file, overrides or [])
    check_runnable(scenario)
    return scenario


def _verbose(verbose: bool) -> None:
    """`--verbose`: the libraries' notices are printed as well as kept in run.log."""
    from fedtide.notices import route_notices

    route_notices(verbose)
