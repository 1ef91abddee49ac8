"""Privacy accounting per client, cumulative over the whole run.

Each client keeps one Opacus accountant history — (noise multiplier, sample rate,
steps) entries — in its `Context.state`, so the engine rebuilt every round resumes
the same account: the ε a client reports is everything it has spent so far, not
one round's share (the mistake of Flower's Opacus example).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedtide.data.stream_plan import stream_plan
from fedtide.errors import ScenarioError
from fedtide.privacy.footprint import PrivateFootprint
from fedtide.privacy.history import History
from fedtide.scenario.schema import Scenario

MODE_FIELD = "privacy.grad_sample_mode"


class PrivateMethod(Protocol):
    """What the checks here need of a continual method, handed to them (privacy never imports the methods)."""

    adds_loss_term: bool

    def private_footprint(self) -> PrivateFootprint: ...


def check_grad_sample_mode(scenario: Scenario, method: PrivateMethod) -> None:
    """Refuse ghost clipping where a term joins the loss: it would be scaled per sample as if it were data."""
    if scenario.privacy.grad_sample_mode != "ghost":
        return
    if method.adds_loss_term:
        raise ScenarioError(
            MODE_FIELD,
            f"ghost clipping clips the data loss alone, and method '{scenario.continual.method}' "
            "may add its own term to it",
            "use grad_sample_mode: hooks, or a method whose class says adds_loss_term = False",
        )
    if scenario.federation.strategy.name.lower() == "fedprox":
        raise ScenarioError(
            MODE_FIELD,
            "ghost clipping clips the data loss alone, and FedProx adds its proximal term to it",
            "use grad_sample_mode: hooks",
        )


DEFAULT_NOISE_MULTIPLIER = 1.0
MAX_NOISE_MULTIPLIER = 100.0


def epsilon_spent(history: History, delta: float, accountant: str) -> float:
    """ε of everything in `history`, by Opacus's accountant of that name (0 when nothing was spent).

    Entries with the same noise and sample rate are one mechanism run for the sum of
    their steps, so they are merged first. For RDP, whose per-step divergence is
    additive, each mechanism's per-step RDP curve is computed once per process: it is
    the slow part (fractional orders), and every round of a client repeats the same ones.
    At very large noise both of Opacus's conversions can return a slightly negative ε
    (RDP's by its log((α-1)/α) term, PRV's by its discretisation): it is reported as 0.
    """
    if not history:
        return 0.0
    merged: dict[tuple[float, float], int] = defaultdict(int)
    for sigma, rate, steps in history:
        merged[(float(sigma), float(rate))] += int(steps)
    if accountant == "rdp":
        rdp = sum(steps * _rdp_per_step(sigma, rate) for (sigma, rate), steps in merged.items())
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return max(0.0, float(epsilon))
    account = create_accountant(mechanism=accountant)
    account.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
    return max(0.0, float(account.get_epsilon(delta=delta)))


@lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, rate: float) -> np.ndarray:
    orders = RDPAccountant.DEFAULT_ALPHAS
    return np.asarray(rdp_analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=orders))


def steps_and_rate(num_samples: int, batch_size: int) -> tuple[int, float]:
    """Steps per epoch and Poisson sample rate, as Opacus's DPDataLoader derives them."""
    steps = max(1, math.ceil(num_samples / batch_size))
    return steps, 1.0 / steps


def check_privacy(scenario: Scenario, method: PrivateMethod) -> None:
    """Refuse DP settings that cannot hold before any training: δ too large, target out of reach,
    a grad sample mode that cannot clip what the method adds to the loss."""
    if not scenario.privacy.private:
        return
    check_grad_sample_mode(scenario, method)
    footprint = method.private_footprint()
    largest = largest_client_dataset(scenario)
    delta = client_delta(scenario)
    if delta >= 1.0 / largest:
        raise ScenarioError(
            "privacy.delta",
            f"{delta} is not below 1/n = {1.0 / largest:.2e} for the largest client dataset (n={largest})",
            f"use a delta below {1.0 / largest:.1e}, e.g. {1.0 / (10 * largest):.1e}, or leave it unset",
        )
    for client in range(scenario.partition.num_clients):
        noise_multiplier(scenario, client, footprint)


def client_delta(scenario: Scenario) -> float:
    """δ: the scenario's, or 1 / (10 · the largest client dataset)."""
    return scenario.privacy.delta or 1.0 / (10 * largest_client_dataset(scenario))


def largest_client_dataset(scenario: Scenario) -> int:
    return stream_plan(scenario).largest_client_dataset()


def noise_multiplier(scenario: Scenario, partition_id: int, footprint: PrivateFootprint) -> float:
    """σ for this client: the configured one, or calibrated to spend `target_epsilon` over its planned run."""
    privacy = scenario.privacy
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    if privacy.target_epsilon is None:
        return DEFAULT_NOISE_MULTIPLIER
    return _calibrated(scenario.model_dump_json(), partition_id, footprint)


@lru_cache(maxsize=64)
def _calibrated(scenario_json: str, partition_id: int, footprint: PrivateFootprint) -> float:
    scenario = Scenario.model_validate_json(scenario_json)
    plan = planned_steps(scenario, partition_id, footprint)
    privacy = scenario.privacy
    return calibrate_noise(privacy.target_epsilon, privacy.accountant, client_delta(scenario), plan)


def planned_steps(scenario: Scenario, partition_id: int, footprint: PrivateFootprint) -> list[tuple[float, int]]:
    """(sample rate, steps) of every DP pass the client will make if sampled in every round.

    Training passes: each round of its experience e (for as many rounds as its schedule
    keeps it there) runs `epochs` Poisson epochs over its e data plus, for replay, its
    buffer. EWC adds one Fisher pass per past experience it consolidates.
    """
    own = stream_plan(scenario).client(partition_id)
    sizes = own.sizes
    batch, epochs = scenario.client.batch_size, scenario.client.epochs
    plan: list[tuple[float, int]] = []
    for e, size in enumerate(sizes):
        rounds = own.experiences[e].rounds  # its own schedule's: clients may stay in an experience unequally long
        if size == 0:
            continue
        for past in sizes[:e]:
            if past and footprint.passes_per_consolidation:
                steps, rate = steps_and_rate(past, batch)
                plan.append((rate, steps * footprint.passes_per_consolidation))
        steps, rate = steps_and_rate(size + footprint.extra_samples(sizes[:e]), batch)
        plan.append((rate, steps * epochs * rounds))
    return plan


def calibrate_noise(
    target: float,
    accountant: str,
    delta: float,
    plan: list[tuple[float, int]],
    field: str = "privacy.target_epsilon",
) -> float:
    """The smallest σ (to 1%) whose total ε over `plan` ((sample rate, steps) pairs) stays within `target`."""
    if not plan:
        return DEFAULT_NOISE_MULTIPLIER
    return smallest_noise(
        target, lambda sigma: epsilon_spent([(sigma, rate, steps) for rate, steps in plan], delta, accountant), field
    )


def smallest_noise(target: float, spent: Callable[[float], float], field: str) -> float:
    """The smallest σ (to 1%) at which `spent(σ)`, an ε that falls as σ grows, stays within `target`."""

    def quietly_spent(sigma: float) -> float:
        with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" at extreme trial sigmas
            warnings.simplefilter("ignore", UserWarning)
            return spent(sigma)

    if quietly_spent(MAX_NOISE_MULTIPLIER) > target:
        raise ScenarioError(
            field,
            f"{target} cannot be reached even with noise_multiplier={MAX_NOISE_MULTIPLIER}",
            "raise target_epsilon, or train fewer rounds/epochs or with larger batches",
        )
    low, high = 0.0, MAX_NOISE_MULTIPLIER
    while high - low > 0.01 * high:
        middle = (low + high) / 2
        low, high = (low, middle) if middle > 0 and quietly_spent(middle) <= target else (middle, high)
    return high
