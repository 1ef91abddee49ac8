"""The experience × round loop of a federated continual-learning run.

Each experience is one call of the strategy's own `start()` for `rounds_per_experience`
rounds; the train config tells clients which experience they are in and the offset
of global rounds (global round r = e*R + k). After every round the global model is
evaluated on the test data of every experience seen so far; the last round of an
experience gives one row of the accuracy matrix.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedtide.aggregation import build_strategy
from fedtide.data.schema import Scenario
from fedtide.data.stream import build_stream
from fedtide.errors import FederationError, ScenarioError
from fedtide.metrics.audit import audit_clients
from fedtide.metrics.evaluation import experience_accuracies
from fedtide.metrics.forgetting import average_accuracy, average_forgetting, backward_transfer
from fedtide.models import build_scenario_model
from fedtide.privacy.accounting import client_delta, noise_multiplier
from fedtide.run_files import MODEL_FILE, append_metrics, write_summary
from fedtide.server.array_check import check_strategy_arrays, strategy_name
from fedtide.server.grid import PartitionOrderedGrid

RoundObserver = Callable[[dict[str, Any]], None]


class _RunRecorder:
    """Evaluates the global model after each round and writes the run's metrics as they come."""

    def __init__(
        self, scenario: Scenario, grid: PartitionOrderedGrid, run_dir: Path, observer: RoundObserver | None
    ) -> None:
        self.stream = build_stream(scenario)
        self.model = build_scenario_model(scenario, self.stream.data.input_shape, scenario.seed)
        self.grid = grid
        self.run_dir = run_dir
        self.rounds = scenario.federation.rounds_per_experience
        self.observer = observer
        self.started = time.monotonic()
        self.matrix: list[list[float]] = []
        self.rounds_done = 0
        self.failures = 0
        self.private = scenario.privacy.private
        self.epsilon: dict[int, float] = {}  # latest cumulative ε per client
        self.stopped: set[int] = set()  # clients that hit their privacy budget
        self.ray_nodes: set[str] = set()  # Ray nodes that ran a client
        self.strategy: object = None  # set by run_federation; its arrays are checked every round

    def evaluate_fn(self, experience: int) -> Callable[[int, ArrayRecord], None]:
        """The `evaluate_fn` that `Strategy.start` calls after each round of `experience`."""
        return partial(self._after_round, experience)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def _privacy_record(self, clients: list[dict]) -> dict:
        """Cumulative ε per client (carried over for clients not sampled this round)."""
        for client in clients:
            self.epsilon[client["partition_id"]] = client["epsilon"]
            if client["budget_exhausted"]:
                self.stopped.add(client["partition_id"])
        values = list(self.epsilon.values())
        return {
            "epsilon_max": max(values),
            "epsilon_mean": sum(values) / len(values),
            "epsilon_per_client": {str(k): v for k, v in sorted(self.epsilon.items())},
            "budget_exhausted_clients": sorted(self.stopped),
        }

    def _after_round(self, experience: int, server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:  # start() also evaluates the initial weights; the previous round did
            return None
        check_strategy_arrays(arrays, self.model, self.strategy, server_round)
        self.rounds_done += 1
        accuracies = experience_accuracies(self.model, arrays, self.stream.test[: experience + 1])
        record = _round_record(experience, server_round, self.rounds, accuracies, self.grid)
        record["wall_time_s"] = self.elapsed()
        self.failures += record["clients"]["failed"]
        self.ray_nodes.update(c["ray_node_id"] for c in record["per_client"] if c.get("ray_node_id"))
        if self.private:
            record["privacy"] = self._privacy_record(record["per_client"])
        append_metrics(self.run_dir, record)
        if server_round == self.rounds:
            self.matrix.append(accuracies)
            append_metrics(self.run_dir, {"type": "experience", "experience": experience, "accuracy": accuracies})
        if self.observer:
            self.observer(record)
        return None


def run_federation(grid: Grid, scenario: Scenario, run_dir: Path, observer: RoundObserver | None = None) -> dict:
    """Run every experience and round of `scenario`, writing metrics and the summary to `run_dir`."""
    num_clients = scenario.partition.num_clients
    rounds = scenario.federation.rounds_per_experience
    ordered = PartitionOrderedGrid(grid)
    recorder = _RunRecorder(scenario, ordered, run_dir, observer)
    arrays = ArrayRecord(recorder.model.state_dict())
    ordered.discover(num_clients)
    strategy = build_strategy(scenario.federation, num_clients)
    recorder.strategy = strategy

    for experience in range(scenario.stream.n_experiences):
        random.seed(scenario.seed * 1000 + experience)  # Flower samples nodes with `random`
        try:
            result = strategy.start(
                ordered,
                arrays,
                num_rounds=rounds,
                train_config=train_config(scenario, experience),
                evaluate_fn=recorder.evaluate_fn(experience),
            )
        except (FederationError, ScenarioError):
            raise
        except Exception as error:
            if _raised_in(error, _RunRecorder._after_round):
                raise  # fedtide's own evaluation: a bug to see whole
            raise _strategy_failure(strategy, recorder.rounds_done + 1, error) from error
        if len(result.arrays) > 0:
            arrays = result.arrays

    recorder.model.load_state_dict(arrays.to_torch_state_dict())
    torch.save(recorder.model.state_dict(), run_dir / MODEL_FILE)  # to evaluate or audit the run again later
    matrix = recorder.matrix
    summary = {
        "name": scenario.name,
        "seed": scenario.seed,
        "strategy": scenario.federation.strategy.name,
        "method": scenario.continual.method,
        "num_clients": num_clients,
        "n_experiences": scenario.stream.n_experiences,
        "rounds": scenario.total_rounds,
        "classes_per_experience": recorder.stream.classes,
        "accuracy_matrix": matrix,
        "final_average_accuracy": average_accuracy(matrix),
        "average_forgetting": average_forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "clients_failed": recorder.failures,
        "wall_time_s": recorder.elapsed(),
        "ray_nodes": sorted(recorder.ray_nodes),
    }
    if recorder.private:
        summary["privacy"] = {
            "delta": client_delta(scenario),
            "accountant": scenario.privacy.accountant,
            "max_grad_norm": scenario.privacy.max_grad_norm,
            "noise_multiplier": {str(c): noise_multiplier(scenario, c) for c in range(num_clients)},
            "target_epsilon": scenario.privacy.target_epsilon,
            "epsilon_max": max(recorder.epsilon.values(), default=0.0),
            "epsilon_per_client": {str(k): v for k, v in sorted(recorder.epsilon.items())},
            "budget_exhausted_clients": sorted(recorder.stopped),
        }
    summary["audit"] = audit_clients(scenario, recorder.model)
    write_summary(run_dir, summary)
    return summary


def _raised_in(error: BaseException, function: Callable) -> bool:
    frames = traceback.walk_tb(error.__traceback__)
    return any(frame.f_code is function.__code__ for frame, _ in frames)


def _strategy_failure(strategy: object, global_round: int, error: Exception) -> FederationError:
    """One line naming the strategy, the round and where it raised, for the user who wrote it.

    Without it the exception surfaces through Flower's simulation threads as a long
    traceback that is mostly Flower's and Ray's frames.
    """
    where = traceback.extract_tb(error.__traceback__)[-1]
    return FederationError(
        f"strategy {strategy_name(strategy)} raised in round {global_round}: {type(error).__name__}: {error} "
        f"({Path(where.filename).name}:{where.lineno}, in {where.name})"
    )


def train_config(scenario: Scenario, experience: int) -> ConfigRecord:
    """What every train message of `experience` tells clients (and the strategy): docs/extending.md."""
    rounds = scenario.federation.rounds_per_experience
    return ConfigRecord(
        {
            "experience": experience,
            "n-experiences": scenario.stream.n_experiences,
            "rounds-per-experience": rounds,
            "round-offset": experience * rounds,
            "scenario": scenario.model_dump_json(),
        }
    )


def _round_record(
    experience: int, server_round: int, rounds: int, accuracies: list[float], grid: PartitionOrderedGrid
) -> dict[str, Any]:
    replies = grid.last_train_replies
    clients = [_client_metrics(reply) for reply in replies if not reply.has_error()]
    trained = [c for c in clients if c["num_examples"] > 0]
    examples = sum(c["num_examples"] for c in trained)
    loss = sum(c["train_loss"] * c["num_examples"] for c in trained) / examples if examples else None
    return {
        "type": "round",
        "round": experience * rounds + server_round,
        "experience": experience,
        "round_in_experience": server_round,
        "accuracy": accuracies,
        "mean_accuracy": sum(accuracies) / len(accuracies),
        "train_loss": loss,
        "clients": {
            "sampled": grid.last_train_sent,
            "replied": len(clients),
            "failed": grid.last_train_sent - len(clients),
            "empty": sum(c["empty"] for c in clients),
        },
        "per_client": clients,
    }


def _client_metrics(reply: Message) -> dict[str, Any]:
    metrics = reply.content["metrics"]
    return {
        "partition_id": int(metrics["partition_id"]),
        "num_examples": int(metrics["num-examples"]),
        "train_loss": float(metrics["train_loss"]),
        "empty": int(metrics["empty"]),
        "consolidated": int(metrics["consolidated"]),
        "consolidation_counts": [int(c) for c in metrics["consolidation_counts"]],
        "epsilon": float(metrics["epsilon"]),
        "noise_multiplier": float(metrics["noise_multiplier"]),
        "budget_exhausted": int(metrics["budget_exhausted"]),
        **_host(reply),
    } | _privacy_history(reply)


def _privacy_history(reply: Message) -> dict[str, Any]:
    """The client's accountant history as (sigma, sample rate, steps) rows, when it trains privately."""
    if "privacy" not in reply.content:
        return {}
    record = reply.content["privacy"]
    return {"dp_history": [list(row) for row in zip(record["sigmas"], record["rates"], record["steps"])]}


def _host(reply: Message) -> dict[str, Any]:
    """The Ray node and machine that ran the client (see `fedtide.client.app.host_record`)."""
    if "host" not in reply.content:
        return {}
    record = reply.content["host"]
    return {"ray_node_id": str(record["ray_node_id"]), "hostname": str(record["hostname"])}
