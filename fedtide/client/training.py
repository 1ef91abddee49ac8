"""One federated training call of one client: consolidate what is due, then train a round.

Everything a client must remember between rounds (consolidation progress, the
method's state) goes through Flower's `Context.state`, so it behaves the same under
the Ray simulation and a real `flwr run` deployment.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtide.client.learner import ProximalTerm, RoundLearner
from fedtide.continual.base import ContinualMethod
from fedtide.continual.methods import build_method, require_dp_compatible
from fedtide.data.schema import Scenario
from fedtide.data.stream import build_stream, client_experiences
from fedtide.models import build_scenario_model
from fedtide.privacy.accounting import History, client_delta, epsilon_spent, noise_multiplier, steps_and_rate
from fedtide.privacy.dp_sgd import ClientPrivacy

PROGRESS_KEY = "fedtide.progress"
METHOD_ARRAYS_KEY = "fedtide.method.arrays"
METHOD_VALUES_KEY = "fedtide.method.values"
PRIVACY_KEY = "fedtide.privacy.history"


@dataclass(frozen=True)
class RoundTask:
    """What the server asks of a client in one round."""

    scenario: Scenario
    partition_id: int
    experience: int
    global_round: int
    proximal_mu: float = 0.0


def run_training_round(task: RoundTask, global_arrays: ArrayRecord, state: RecordDict) -> RecordDict:
    """Consolidate past experiences once each, train one round, and update `state` in place.

    The reply holds the model (`arrays`), the metrics Flower's strategies aggregate
    (`metrics`) and, under DP, the client's whole accountant history (`privacy`) so
    its ε can be checked independently.
    """
    scenario = task.scenario
    stream = build_stream(scenario)
    own_data = client_experiences(scenario, task.partition_id)
    experiences = benchmark_from_datasets(train=own_data).train_stream
    # Seeded only now: building the process's data caches draws from the global RNGs the
    # first time, and which client a Ray worker serves first must not change its numbers.
    seed_everything(scenario.seed, task.partition_id, task.global_round)

    model = build_scenario_model(scenario, stream.data.input_shape)
    model.load_state_dict(global_arrays.to_torch_state_dict())
    name = scenario.continual.method
    with method_phase(name, "construction"):
        method = build_method(scenario.continual)
    with method_phase(name, "load"):
        _load_method(method, state, stream.full_train, model)
    privacy = _client_privacy(task, state)
    if privacy:
        require_dp_compatible(method, name)
    extra: list = [ProximalTerm(task.proximal_mu, model)] if task.proximal_mu > 0 else []
    if privacy:
        method.use_privacy(privacy)
        extra.append(privacy.training_plugin(method))
    learner = RoundLearner(model, method, scenario.client, device=pick_device(scenario), extra_plugins=extra)

    progress = _progress(state, scenario.stream.n_experiences)
    pending = [p for p in range(int(progress["done_through"]), task.experience) if len(own_data[p]) > 0]
    examples = len(own_data[task.experience])
    budget = BudgetGuard(scenario, privacy)
    planned = examples + method.planned_private_extra([len(d) for d in own_data[: task.experience]])
    consolidation_passes = [len(own_data[p]) for p in pending] * method.private_passes_per_consolidation
    if examples and not budget.allows(training=planned, other_passes=consolidation_passes):
        metrics = _metrics(task, 0, 0.0, progress, 0, privacy, empty=False, exhausted=True)
        return _reply(global_arrays, metrics, privacy)

    for past in pending:
        with method_phase(name, f"consolidation of experience {past}"):
            learner.consolidate(experiences[past], past)
        progress["counts"][past] += 1
    progress["done_through"] = max(int(progress["done_through"]), task.experience)

    extra_data = method.private_training_data() if privacy else None
    if examples and budget.allows(training=examples + (len(extra_data) if extra_data else 0)):
        with method_phase(name, "training"):
            loss = learner.train_round(experiences[task.experience], task.experience)
    else:
        loss, examples = 0.0, 0

    state[PROGRESS_KEY] = ConfigRecord({"done_through": progress["done_through"], "counts": progress["counts"]})
    with method_phase(name, "save"):
        _save_method(method, state)
    if privacy:
        state[PRIVACY_KEY] = history_record(privacy.history)
    empty = len(own_data[task.experience]) == 0
    metrics = _metrics(task, examples, loss, progress, len(pending), privacy, empty, budget.exhausted)
    return _reply(ArrayRecord(model.cpu().state_dict()), metrics, privacy)


class MethodFailed(RuntimeError):
    """A continual method (or one of its plugins) raised; the message names it and the phase."""


@contextmanager
def method_phase(method_name: str, phase: str) -> Iterator[None]:
    """Re-raise any error of a method's code as `MethodFailed` naming the method and the phase.

    The reply's error reaches the server as text, so the method's name must be in it:
    "continual method 'my_pkg.mod:Name' failed in training: RuntimeError: ...".
    """
    try:
        yield
    except MethodFailed:
        raise
    except Exception as error:
        raise MethodFailed(
            f"continual method '{method_name}' failed in {phase}: {type(error).__name__}: {error}"
        ) from error


def _reply(arrays: ArrayRecord, metrics: MetricRecord, privacy: ClientPrivacy | None) -> RecordDict:
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    if privacy:
        content["privacy"] = history_record(privacy.history)
    return content


class BudgetGuard:
    """Refuses DP passes that would take a client past `target_epsilon`, so ε never exceeds it."""

    def __init__(self, scenario: Scenario, privacy: ClientPrivacy | None) -> None:
        self.privacy = privacy
        self.target = scenario.privacy.target_epsilon if privacy else None
        self.delta = client_delta(scenario) if privacy else 0.0
        self.batch_size, self.epochs = scenario.client.batch_size, scenario.client.epochs
        self.exhausted = False

    def allows(self, training: int, other_passes: list[int] = ()) -> bool:
        """Whether a training round over `training` samples (and single passes over others) fits."""
        if self.target is None or self.exhausted:
            return not self.exhausted
        sigma = self.privacy.noise_multiplier
        plan = []
        for size, epochs in [(n, 1) for n in other_passes] + [(training, self.epochs)]:
            steps, rate = steps_and_rate(size, self.batch_size)
            plan.append((sigma, rate, steps * epochs))
        spent = epsilon_spent(self.privacy.history + plan, self.delta, self.privacy.config.accountant)
        self.exhausted = spent > self.target
        return not self.exhausted


def history_record(history: History) -> ConfigRecord:
    return ConfigRecord(
        {"sigmas": [h[0] for h in history], "rates": [h[1] for h in history], "steps": [h[2] for h in history]}
    )


def history_from_state(state: RecordDict) -> History:
    if PRIVACY_KEY not in state:
        return []
    record = state[PRIVACY_KEY]
    return list(zip(map(float, record["sigmas"]), map(float, record["rates"]), map(int, record["steps"])))


def _client_privacy(task: RoundTask, state: RecordDict) -> ClientPrivacy | None:
    config = task.scenario.privacy
    if not config.private:
        return None
    sigma = noise_multiplier(task.scenario, task.partition_id)
    return ClientPrivacy(config, sigma, history_from_state(state))


def _metrics(
    task: RoundTask,
    examples: int,
    loss: float,
    progress: dict,
    consolidated: int,
    privacy: ClientPrivacy | None,
    empty: bool,
    exhausted: bool,
) -> MetricRecord:
    epsilon = 0.0
    if privacy:
        epsilon = epsilon_spent(privacy.history, client_delta(task.scenario), privacy.config.accountant)
    return MetricRecord(
        {
            "num-examples": examples,
            "train_loss": loss,
            "partition_id": task.partition_id,
            "empty": int(empty),
            "consolidated": consolidated,
            "consolidation_counts": list(progress["counts"]),
            "epsilon": epsilon,
            "noise_multiplier": privacy.noise_multiplier if privacy else 0.0,
            "budget_exhausted": int(exhausted),
        }
    )


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


def _progress(state: RecordDict, n_experiences: int) -> dict:
    if PROGRESS_KEY in state:
        record = state[PROGRESS_KEY]
        return {"done_through": int(record["done_through"]), "counts": list(record["counts"])}
    return {"done_through": 0, "counts": [0] * n_experiences}


def _load_method(method: ContinualMethod, state: RecordDict, full_train, model: torch.nn.Module) -> None:
    if METHOD_VALUES_KEY not in state:
        return
    arrays = {k: v.numpy() for k, v in state[METHOD_ARRAYS_KEY].items()}
    values = dict(state[METHOD_VALUES_KEY])
    method.load(arrays, values, full_train, model)


def _save_method(method: ContinualMethod, state: RecordDict) -> None:
    arrays, values = method.save()
    state[METHOD_ARRAYS_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    state[METHOD_VALUES_KEY] = ConfigRecord(values)
