"""Where a sweep's points run side by side: worker processes on this machine, or Ray tasks.

A point is one whole run whose clients are called in-process (`simulate_in_process`),
so its numbers are those of the same scenario run alone on either backend (clients seed
themselves per round and the server orders replies by partition). The pools differ only
in where that run happens:

- `local_processes`: spawned processes on this machine, for `resources.backend: in_process`;
- `ray_tasks`: one Ray instance for the whole sweep (this machine's, or the cluster in
  `resources.ray_address`); each point is a Ray task holding its clients' resources, and
  Ray reuses its worker processes from point to point, so imports and the cached dataset
  are paid once per worker rather than once per run.

Either way a pool is a `submit(point, folder) -> Future` whose result is None when the
run finished, else the reason it failed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from fedtide.errors import FederationError, ScenarioError
from fedtide.notices import route_notices, verbosity
from fedtide.scenario.schema import Scenario
from fedtide.stop_signals import RunStopped

Submit = Callable[[Scenario, Path], "Future[str | None]"]


def run_point(scenario: Scenario, folder: Path) -> str | None:
    """Run one point into its prepared folder; the reason it failed, or None."""
    from fedtide.runner.simulation import simulate_in_process

    try:
        simulate_in_process(scenario, folder)
    except (FederationError, ScenarioError) as error:
        return str(error)
    return None


@contextmanager
def local_processes(workers: int) -> Iterator[Submit]:
    """`workers` spawned processes (never forked: the parent may hold torch's threads).

    A stopped sweep (Ctrl-C, SIGTERM) starts no more points and passes the signal on to
    the running ones, which stop as a run does and keep their checkpoints: running the
    sweep again resumes them. The workers keep the libraries' notices in each point's
    run.log, as this process does (`fedtide.notices`).
    """
    routed = {} if verbosity() is None else {"initializer": route_notices, "initargs": (verbosity(),)}
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, **routed) as pool:
        try:
            yield lambda scenario, folder: pool.submit(run_point, scenario, folder)
        except RunStopped as stop:
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, stop.signum)
            raise


@contextmanager
def ray_tasks(address: str | None) -> Iterator[Submit]:
    """Ray started (or joined) once for the sweep, and shut down (or left) whatever happens.

    Each task asks for what one of the point's clients asks for: the clients run one
    after another inside it, with that many torch threads. The workers' output reaches
    this console only if the command is verbose; their notices go to each point's run.log.
    """
    import ray

    verbose = verbosity()
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}  # plugins beside the scenario
    ray.init(
        address=address or "local",
        runtime_env=runtime_env,
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=bool(verbose),
        include_dashboard=False,
    )
    try:
        remote = ray.remote(_run_point_task)

        def submit(scenario: Scenario, folder: Path) -> Future[str | None]:
            resources = scenario.resources
            task = remote.options(num_cpus=resources.num_cpus_per_client, num_gpus=resources.num_gpus_per_client)
            return task.remote(scenario.model_dump_json(), str(folder), verbose).future()

        yield submit
    finally:
        ray.shutdown()


def _run_point_task(scenario_json: str, folder: str, verbose: bool | None) -> str | None:
    """The Ray task: the scenario travels as JSON, the folder as a path (shared with the driver)."""
    if verbose is not None:
        route_notices(verbose)
    return run_point(Scenario.model_validate_json(scenario_json), Path(folder))
