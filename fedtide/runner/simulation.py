"""Running a scenario on Flower's simulation runtime (Ray backend), or in this process without Ray."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.simulation import run_simulation

from fedtide.client.app import app as client_app
from fedtide.notices import notices_kept_in, verbosity
from fedtide.records.summary import RunSummary
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.runner.ray_housekeeping import end_orphaned_ray_processes
from fedtide.scenario.schema import Scenario
from fedtide.server.app import make_server_app
from fedtide.stop_signals import stops_through_the_server

if TYPE_CHECKING:
    from fedtide.server.federation import RoundObserver


def backend_config(scenario: Scenario) -> dict:
    """Ray resources per client and the Ray instance to run on.

    Ray packs as many clients as fit on each node (Flower sizes its actor pool per node
    from `ray.nodes()`); fractional `num_gpus` packs several clients per GPU.

    Flower's Ray backend calls `ray.init(runtime_env=..., **init_args)` only when Ray is
    not initialised yet, and `ray.shutdown()` when the run ends (which only disconnects
    from an existing cluster), so every run connects afresh. `address` is always given:
    "local" when no cluster is asked for, because a bare `ray.init()` silently joins any
    cluster it finds (`RAY_ADDRESS`, `/tmp/ray/ray_current_cluster`). The other init args
    are legal when joining a cluster (Ray refuses num_cpus/num_gpus/resources/
    object_store_memory there; fedtide passes none of them). The workers' output stays in
    Ray's session logs unless the command is verbose (`fedtide.notices`).
    """
    verbose = bool(verbosity())
    return {
        "client_resources": {
            "num_cpus": scenario.resources.num_cpus_per_client,
            "num_gpus": scenario.resources.num_gpus_per_client,
        },
        "init_args": {
            "address": scenario.resources.ray_address or "local",
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }


def run_scenario(
    scenario: Scenario, run_dir: Path, observer: RoundObserver | None = None, started_at: float | None = None
) -> None:
    """Run the scenario to completion on its `resources.backend`; metrics and summary land in `run_dir`.

    `started_at` (a `time.time()`, default now): when the command began, the origin of the
    summary's `startup_s`.
    """
    if scenario.resources.backend == "in_process":
        simulate_in_process(scenario, run_dir, observer, started_at)
    else:
        simulate(scenario, run_dir, observer, started_at)


def simulate(
    scenario: Scenario, run_dir: Path, observer: RoundObserver | None = None, started_at: float | None = None
) -> None:
    """Run the scenario on Flower's Ray simulation; metrics and summary land in `run_dir`.

    Ray processes left without their raylet are ended before (a killed run's) and after
    (workers still busy when Ray shut down outlive it by seconds): `fedtide.runner.ray_housekeeping`.
    """
    started_at = time.time() if started_at is None else started_at  # Ray's start-up is part of start-up
    end_orphaned_ray_processes()
    try:
        with notices_kept_in(run_dir), stops_through_the_server():
            run_simulation(
                server_app=make_server_app(scenario, run_dir, observer, started_at),
                client_app=client_app,
                num_supernodes=scenario.partition.num_clients,
                backend_config=backend_config(scenario),
            )
    finally:
        end_orphaned_ray_processes()


def simulate_in_process(
    scenario: Scenario, run_dir: Path, observer: RoundObserver | None = None, started_at: float | None = None
) -> RunSummary:
    """The same run with every client called in this process, one after another: no Ray start-up.

    The numbers are those of `simulate` (clients seed themselves per round and the
    server orders replies by partition); what is lost is parallelism and isolation.
    Clients get the torch threads a Ray worker would (Ray sets OMP_NUM_THREADS to the
    worker's CPUs): the weights do not depend on it, but the reported train losses
    differ in their eighth digit with another thread count.
    """
    from fedtide.server.federation import run_federation

    started_at = time.time() if started_at is None else started_at
    grid = InProcessGrid(scenario.partition.num_clients)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(scenario.resources.num_cpus_per_client)))
    try:
        with notices_kept_in(run_dir):
            return run_federation(grid, scenario, run_dir, observer, started_at)
    finally:
        torch.set_num_threads(threads)
