"""fedtide's Flower ServerApp.

Under `flwr run .` the scenario comes from the run config (`scenario` = a YAML path,
`output` = the runs folder, `set` = space-separated field=value overrides), or
`resume` = an unfinished run's folder continues that run from its checkpoint. Paths are
relative to the SuperLink's working directory; a scenario path not found there is
looked up in the app that `flwr run` shipped, so `scenarios/quickstart.yaml` runs on
any SuperLink. The
`fedtide run` CLI instead builds a ServerApp around a scenario it has already
validated, with a progress observer.

The experience loop and its metrics (Avalanche's) are imported when the ServerApp
starts: under `run_simulation` that happens while Flower starts Ray and the clients.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtide.records.run_folder import create_run_folder, read_run_scenario
from fedtide.scenario.loading import load_scenario
from fedtide.scenario.schema import Scenario
from fedtide.stop_signals import RunStopped

if TYPE_CHECKING:
    from fedtide.server.run_parts import RoundObserver

APP_ROOT = Path(__file__).resolve().parents[2]  # the project folder that `flwr run .` packaged


def make_server_app(
    scenario: Scenario | None = None,
    run_dir: Path | None = None,
    observer: RoundObserver | None = None,
    started_at: float | None = None,
) -> ServerApp:
    """A ServerApp for a given scenario and run folder, or one that reads them from the run config.

    `started_at` (a `time.time()`): when the command began, for the summary's `startup_s`.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # imported here, in the ServerApp's thread, while Flower's simulation starts Ray
        from fedtide.server.federation import run_federation

        try:
            if scenario is not None:
                run_federation(grid, scenario, run_dir or create_run_folder(scenario), observer, started_at)
            elif resume := str(context.run_config.get("resume", "")):
                run_federation(grid, read_run_scenario(Path(resume)), Path(resume))
            else:
                config = context.run_config
                overrides = str(config.get("set", "")).split()
                loaded = load_scenario(scenario_path(str(config["scenario"])), overrides)
                folder = create_run_folder(loaded, Path(str(config["output"])) if "output" in config else None)
                run_federation(grid, loaded, folder)
        except RunStopped:  # on Ray this thread only stops waiting; the main thread reports the stop
            return

    return server_app


def scenario_path(path: str) -> Path:
    """`path` as given if it exists, else the same relative path inside this app (the FAB's copy)."""
    given = Path(path)
    shipped = APP_ROOT / given
    if given.is_absolute() or given.exists() or not shipped.is_file():
        return given
    return shipped


app = make_server_app()
