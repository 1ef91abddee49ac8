"""Everything that can be checked about a scenario before Ray or Flower start.

`fedtide validate` runs exactly these checks, and `fedtide run` runs them first, so
a bad strategy name or a missing dataset fails in a second with one line, not
after a simulation has started.
"""

from __future__ import annotations

import os

import torch

from fedtide.continual.hooks import check_hooks
from fedtide.continual.methods import build_method, require_dp_compatible
from fedtide.data.datasets import load_dataset
from fedtide.data.stream_plan import stream_plan
from fedtide.errors import ScenarioError
from fedtide.models import build_scenario_model
from fedtide.scenario.schema import Scenario
from fedtide.server.strategies import build_strategy


def check_runnable(scenario: Scenario) -> None:
    """Raise `ScenarioError` for anything that would make the run fail at start."""
    build_strategy(scenario.federation, scenario.partition.num_clients)
    method = build_method(scenario.continual)
    check_hooks(method, scenario.continual.method)
    if scenario.privacy.private:
        require_dp_compatible(method, scenario.continual.method)
    load_dataset(scenario.dataset.name, scenario.dataset.root)  # found, readable, and as registered
    stream_plan(scenario)  # the data can serve the clients (and canaries) asked for
    if scenario.privacy.private:
        from fedtide.privacy.accounting import check_privacy  # Opacus, only for a private run

        check_privacy(scenario, method)
    if scenario.privacy.client_private:
        from fedtide.privacy.client_level import check_client_level  # Opacus's accountant
        from fedtide.privacy.dp_fedavg import require_accountable

        check_client_level(scenario)
        require_accountable(build_strategy(scenario.federation, scenario.partition.num_clients), scenario)
    if scenario.privacy.secure_rng and scenario.privacy.private:
        check_secure_mode()
    build_scenario_model(scenario)
    check_resources(scenario)


def check_secure_mode() -> None:
    """Opacus's `secure_mode` draws DP-SGD's noise from torchcsprng; refuse the run before it starts without it."""
    import importlib.util

    if importlib.util.find_spec("torchcsprng") is None:
        raise ScenarioError(
            "privacy.secure_rng",
            "sample-level DP-SGD with secure_rng runs Opacus in secure_mode, which needs the torchcsprng "
            "package, and it is not installed",
            "install torchcsprng for your torch, or use secure_rng with level: client only",
        )


def check_resources(scenario: Scenario) -> None:
    """Refuse per-client resources that the run's Ray could never grant.

    Flower's Ray backend would build an empty actor pool, log the error, and leave the
    server waiting for replies that never come: a hang instead of a message. The
    resources of a cluster (`ray_address`) are known only once joined, so only a
    private local Ray is checked against this machine.
    """
    resources = scenario.resources
    if resources.backend == "in_process":
        if resources.ray_address is not None:
            raise ScenarioError(
                "resources.backend",
                "in_process runs every client in this process, so it cannot use the Ray cluster in ray_address",
                "unset resources.ray_address, or use backend: ray",
            )
        return
    if resources.device == "cuda" and resources.num_gpus_per_client == 0:
        raise ScenarioError(
            "resources.device",
            "cuda, but num_gpus_per_client is 0, and Ray hides the GPUs from clients without a GPU share",
            "set resources.num_gpus_per_client, e.g. 0.25 for four clients per GPU",
        )
    if resources.ray_address is not None:
        return
    cpus = available_cores()
    if resources.num_cpus_per_client > cpus:
        raise ScenarioError(
            "resources.num_cpus_per_client",
            f"{resources.num_cpus_per_client:g} CPUs per client, but this machine has {cpus}",
            f"use at most {cpus}, or join a larger Ray cluster with resources.ray_address",
        )
    gpus = torch.cuda.device_count()
    if resources.num_gpus_per_client > gpus:
        raise ScenarioError(
            "resources.num_gpus_per_client",
            f"{resources.num_gpus_per_client:g} GPU per client, but this machine has {gpus} CUDA GPU(s)",
            "set it to 0 to train on the CPU, or join a Ray cluster with GPUs with resources.ray_address",
        )


def available_cores() -> int:
    """The cores this process may run on (its affinity, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
