"""Running a scenario on Flower's simulation runtime (Ray backend) from Python or the CLI."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.simulation import run_simulation

from fedtide.client.app import app as client_app
from fedtide.scenarios.schema import Scenario
from fedtide.server.app import make_server_app
from fedtide.server.federation import RoundObserver


def backend_config(scenario: Scenario) -> dict:
    """Ray resources per client (Ray packs as many clients as fit on the machine)."""
    return {
        "client_resources": {
            "num_cpus": scenario.resources.num_cpus_per_client,
            "num_gpus": scenario.resources.num_gpus_per_client,
        },
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False},
    }


def simulate(scenario: Scenario, run_dir: Path, observer: RoundObserver | None = None) -> None:
    """Run the scenario to completion; metrics and summary land in `run_dir`."""
    run_simulation(
        server_app=make_server_app(scenario, run_dir, observer),
        client_app=client_app,
        num_supernodes=scenario.partition.num_clients,
        backend_config=backend_config(scenario),
    )
