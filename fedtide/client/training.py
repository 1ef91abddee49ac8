"""One federated training call of one client: plan, consolidate what is due, then train a round.

Everything a client must remember between rounds goes through `ClientState` over
Flower's `Context.state`, so it behaves the same under the Ray simulation and a real
`flwr run` deployment.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from flwr.app import ArrayRecord, RecordDict

from fedtide.client.learner import ProximalTerm, RoundLearner
from fedtide.client.state import ClientState, ConsolidationProgress
from fedtide.continual.base import ContinualMethod
from fedtide.continual.methods import build_method, require_dp_compatible
from fedtide.continual.state_check import refuse_lost_state, state_fingerprints
from fedtide.data.stream import Dataset, client_experiences, training_pool
from fedtide.data.stream_plan import ClientPlan, stream_plan
from fedtide.errors import RoundFailed
from fedtide.models import build_scenario_model
from fedtide.privacy.accounting import client_delta, epsilon_spent, noise_multiplier
from fedtide.privacy.budget import BudgetGuard
from fedtide.privacy.coins import SampleCoins
from fedtide.privacy.dp_sgd import ClientPrivacy
from fedtide.privacy.footprint import PrivateFootprint
from fedtide.records.metrics import ClientRoundRecord
from fedtide.records.wire import reply_content
from fedtide.scenario.schema import Scenario


@dataclass(frozen=True)
class RoundTask:
    """What the server asks of a client in one round.

    `experience_ends` holds, for past experiences this client may still have to
    consolidate, the global weights that ended them (the server sends those it has
    not seen the client settle); a past experience missing from it ended with the
    weights of this round's message.
    """

    scenario: Scenario
    partition_id: int
    experience: int  # its own experience this round: an index into its plan's `experiences`
    global_round: int
    proximal_mu: float = 0.0
    experience_ends: dict[int, ArrayRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundPlan:
    """What this call will do, settled before any private data is touched."""

    pending: list[int]  # past experiences to consolidate now, in order
    examples: int  # the client's own samples of this experience
    consolidation_passes: list[int]  # sizes of the DP passes consolidation makes
    replay_extra: int  # past samples that join the DP training set

    @property
    def private_training(self) -> int:
        return self.examples + self.replay_extra


def plan_round(
    task: RoundTask, progress: ConsolidationProgress, own: ClientPlan, footprint: PrivateFootprint
) -> RoundPlan:
    """This round's work from the client's plan: the experiences it still has to settle, the sizes DP plans with."""
    sizes = own.sizes
    pending = own.to_consolidate(progress.done_through, task.experience)
    return RoundPlan(
        pending=pending,
        examples=sizes[task.experience],
        consolidation_passes=[sizes[p] for p in pending] * footprint.passes_per_consolidation,
        replay_extra=footprint.extra_samples(sizes[: task.experience]),
    )


def run_training_round(task: RoundTask, global_arrays: ArrayRecord, records: RecordDict) -> RecordDict:
    """Consolidate past experiences once each, train one round, and update `records` in place.

    The reply's records are described in `fedtide.records.wire`.
    """
    scenario = task.scenario
    own = stream_plan(scenario).client(task.partition_id)
    experiences = benchmark_from_datasets(train=client_experiences(scenario, task.partition_id)).train_stream
    # Seeded only now: building the process's data caches draws from the global RNGs the
    # first time, and which client a Ray worker serves first must not change its numbers.
    seed_everything(scenario.seed, task.partition_id, task.global_round)

    model = build_scenario_model(scenario)
    _load_weights(model, global_arrays)
    state = ClientState(records, len(own.experiences))
    name = scenario.continual.method
    with method_phase(name, "construction"):
        method = build_method(scenario.continual)
    pool = training_pool(scenario)
    method.bind(model, pool)  # sample ids index it, canaries' too
    privacy = _client_privacy(task, state, method, own.sizes)
    if privacy:  # before the method's state is loaded: replay's buffer policy depends on it
        method.use_privacy(privacy)
    with method_phase(name, "load"):
        state.restore_method(method, model)

    progress = state.progress
    plan = plan_round(task, progress, own, method.private_footprint())
    learner = _learner(task, model, method, privacy, plan.private_training)
    start = state_fingerprints(method)  # what the round starts from: any change must reach state_dict()
    guard = BudgetGuard(scenario, privacy, client_delta(scenario)) if privacy else None
    if plan.examples and guard and not guard.allows(plan.private_training, plan.consolidation_passes):
        return reply_content(_report(task, progress, privacy, guard, empty=False), global_arrays)

    _consolidate(task, plan.pending, learner, model, experiences, global_arrays, progress)

    examples, loss, classes = plan.examples, 0.0, None
    if examples and (guard is None or guard.allows(plan.private_training)):  # the sizes the DP loader samples by
        with method_phase(name, "training"):
            loss = learner.train_round(experiences[task.experience], task.experience)
        check_finite(task, model, loss)
        classes = sorted({int(label) for label in experiences[task.experience].dataset.targets})
    else:
        examples = 0

    state.progress = progress
    with method_phase(name, "save"):
        state.store_method(method)
        refuse_lost_state(name, method, start, lambda: rebuilt_method(scenario, model, pool, privacy, state))
    if privacy:
        state.privacy_history = privacy.history
    with method_phase(name, "metrics"):
        reported = {key: float(value) for key, value in method.metrics().items()} if examples else None
    empty = own.sizes[task.experience] == 0
    report = _report(task, progress, privacy, guard, empty, examples, loss, len(plan.pending), reported, classes)
    return reply_content(report, ArrayRecord(model.cpu().state_dict()))


def _consolidate(
    task: RoundTask,
    pending: list[int],
    learner: RoundLearner,
    model: torch.nn.Module,
    experiences: list,
    global_arrays: ArrayRecord,
    progress: ConsolidationProgress,
) -> None:
    """Consolidate each of the `pending` past experiences once, at the global weights that ended it."""
    ends = {past: task.experience_ends[past] for past in pending if past in task.experience_ends}
    for past in pending:
        if ends:  # at the weights that ended `past`: the server's, or this round's for the last one
            _load_weights(model, ends.get(past, global_arrays))
        with method_phase(task.scenario.continual.method, f"consolidation of experience {past}"):
            learner.consolidate(experiences[past], past)
        progress.counts[past] += 1
    if ends:
        _load_weights(model, global_arrays)  # training starts from this round's weights
    progress.done_through = max(progress.done_through, task.experience)


def _load_weights(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    model.load_state_dict(arrays.to_torch_state_dict())


def _learner(
    task: RoundTask, model: torch.nn.Module, method: ContinualMethod, privacy: ClientPrivacy | None, planned: int
):
    extra: list = [ProximalTerm(task.proximal_mu, model)] if task.proximal_mu > 0 else []
    if privacy:  # the round's sample rate and steps come from the planned training set (replay's buffer included)
        extra.append(privacy.training_plugin(method.private_training_data, planned, task.scenario.continual.method))
    device = pick_device(task.scenario)
    return RoundLearner(model, method, task.scenario.client, device=device, extra_plugins=extra)


def rebuilt_method(
    scenario: Scenario, model: torch.nn.Module, pool: Dataset, privacy: ClientPrivacy | None, state: ClientState
) -> ContinualMethod:
    """The method as the next call will build it from `state`: constructed, bound, restored, plugins made."""
    method = build_method(scenario.continual)
    method.bind(model, pool)
    if privacy:
        method.use_privacy(privacy)
    state.restore_method(method, model)
    method.plugins()
    return method


class ClientDiverged(RoundFailed):
    """Local training blew up (non-finite loss or weights); the message says what to lower."""


def check_finite(task: RoundTask, model: torch.nn.Module, loss: float) -> None:
    """Stop a client whose training diverged, naming it, rather than send the server NaN weights."""
    if math.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters()):
        return
    client = task.scenario.client
    raise ClientDiverged(
        f"client {task.partition_id} diverged in round {task.global_round}: train loss {loss:.4g}, "
        f"weights no longer finite (lower client.lr, now {client.lr:g}, or the continual method's strength)"
    )


class MethodFailed(RoundFailed):
    """A continual method (or one of its plugins) raised; the message names it and the phase."""


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Train on the client's CPU share whatever runtime calls it.

    The last bits of a float32 matrix product depend on how many threads split it, and so
    do the trained weights: fedtide's Ray backend gives a worker `num_cpus_per_client`
    threads (Ray's OMP_NUM_THREADS), the in-process one sets the same, and `flwr run`'s
    runtime would otherwise leave torch at the machine's core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def method_phase(method_name: str, phase: str) -> Iterator[None]:
    """Re-raise any error of a method's code as `MethodFailed` naming the method and the phase.

    The reply's error reaches the server as text, so the method's name must be in it:
    "continual method 'my_pkg.mod:Name' failed in training: RuntimeError: ...". A
    `RoundFailed` already names who and why (a refused DP claim), and passes unchanged.
    """
    try:
        yield
    except RoundFailed:  # named already
        raise
    except Exception as error:
        raise MethodFailed(
            f"continual method '{method_name}' failed in {phase}: {type(error).__name__}: {error}"
        ) from error


def seed_everything(seed: int, partition_id: int, global_round: int) -> None:
    """Seed every RNG from (seed, client, round) so results do not depend on Ray's scheduling."""
    derived = zlib.crc32(f"{seed}/{partition_id}/{global_round}".encode())
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)


def pick_device(scenario: Scenario) -> str:
    wanted = scenario.resources.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def _client_privacy(
    task: RoundTask, state: ClientState, method: ContinualMethod, sizes: list[int]
) -> ClientPrivacy | None:
    """This round's DP-SGD, resuming the client's account; refuses a method that is not DP-compatible.

    `sizes` are the client's experience sizes, as `planned_steps` plans its DP passes with them.
    """
    config = task.scenario.privacy
    if not config.private:
        return None
    require_dp_compatible(method, task.scenario.continual.method)
    sigma = noise_multiplier(task.scenario, task.partition_id, method.private_footprint())
    coins = SampleCoins(task.scenario.seed, task.partition_id)
    return ClientPrivacy(config, sigma, state.privacy_history, coins=coins, planned_sizes=sizes)


def _report(
    task: RoundTask,
    progress: ConsolidationProgress,
    privacy: ClientPrivacy | None,
    guard: BudgetGuard | None,
    empty: bool,
    examples: int = 0,
    loss: float = 0.0,
    consolidated: int = 0,
    method_metrics: dict[str, float] | None = None,
    classes: list[int] | None = None,
) -> ClientRoundRecord:
    epsilon = 0.0
    if privacy:
        epsilon = epsilon_spent(privacy.history, client_delta(task.scenario), privacy.config.accountant)
    return ClientRoundRecord(
        partition_id=task.partition_id,
        num_examples=examples,
        train_loss=loss,
        empty=int(empty),
        consolidated=consolidated,
        consolidation_counts=list(progress.counts),
        epsilon=epsilon,
        noise_multiplier=privacy.noise_multiplier if privacy else 0.0,
        budget_exhausted=int(guard.exhausted) if guard else 0,
        experience=task.experience,
        classes=classes,
        method_metrics=method_metrics or None,
        dp_history=[list(row) for row in privacy.history] if privacy else None,
    )
