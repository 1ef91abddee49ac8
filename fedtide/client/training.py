"""One federated training call of one client: consolidate what is due, then train a round.

Everything a client must remember between rounds (consolidation progress, the
method's state) goes through Flower's `Context.state`, so it behaves the same under
the Ray simulation and a real `flwr run` deployment.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtide.client.learner import ProximalTerm, RoundLearner
from fedtide.models import build_model
from fedtide.scenarios.schema import Scenario
from fedtide.scenarios.stream import build_stream, client_experiences
from fedtide.strategies.continual import ContinualMethod, build_method

PROGRESS_KEY = "fedtide.progress"
METHOD_ARRAYS_KEY = "fedtide.method.arrays"
METHOD_VALUES_KEY = "fedtide.method.values"


@dataclass(frozen=True)
class RoundTask:
    """What the server asks of a client in one round."""

    scenario: Scenario
    partition_id: int
    experience: int
    global_round: int
    proximal_mu: float = 0.0


def run_training_round(
    task: RoundTask, global_arrays: ArrayRecord, state: RecordDict
) -> tuple[ArrayRecord, MetricRecord]:
    """Consolidate past experiences once each, train one round, and update `state` in place."""
    scenario = task.scenario
    seed_everything(scenario.seed, task.partition_id, task.global_round)
    stream = build_stream(scenario)
    own_data = client_experiences(scenario, task.partition_id)
    experiences = benchmark_from_datasets(train=own_data).train_stream

    model = build_model(scenario.model.name, stream.data.input_shape, scenario.num_classes)
    model.load_state_dict(global_arrays.to_torch_state_dict())
    method = build_method(scenario.continual)
    _load_method(method, state, stream.full_train, model)

    extra = [ProximalTerm(task.proximal_mu, model)] if task.proximal_mu > 0 else []
    learner = RoundLearner(model, method, scenario.client, device=pick_device(scenario), extra_plugins=extra)

    progress = _progress(state, scenario.stream.n_experiences)
    consolidated_now = 0
    for past in range(int(progress["done_through"]), task.experience):
        if len(own_data[past]) > 0:
            learner.consolidate(experiences[past], past)
            progress["counts"][past] += 1
            consolidated_now += 1
    progress["done_through"] = max(int(progress["done_through"]), task.experience)

    examples = len(own_data[task.experience])
    loss = learner.train_round(experiences[task.experience], task.experience) if examples else float("nan")

    state[PROGRESS_KEY] = ConfigRecord({"done_through": progress["done_through"], "counts": progress["counts"]})
    _save_method(method, state)
    metrics = MetricRecord(
        {
            "num-examples": examples,
            "train_loss": loss if examples else 0.0,
            "partition_id": task.partition_id,
            "empty": int(examples == 0),
            "consolidated": consolidated_now,
            "consolidation_counts": list(progress["counts"]),
        }
    )
    return ArrayRecord(learner.model.cpu().state_dict()), metrics


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
