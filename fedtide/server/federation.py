"""The experience × round loop of a federated continual-learning run, and its record.

Each experience is one call of Flower's `Strategy.start` for `rounds_per_experience`
rounds, on the scenario's strategy wrapped in `ContinualStrategy` (which tells
clients the experience and checks what comes back). After every round the global
model is evaluated on the test data of every experience seen so far; the last round
of an experience gives one row of the accuracy matrix.

After every `checkpoint.every`-th round (and the last) the run is checkpointed
(`fedtide.server.checkpoint`). A run folder that holds a checkpoint is continued from
it: the server takes back the global model, the strategy, its totals and RNG states,
gives every client back its `Context.state`, cuts metrics.jsonl back to the checkpoint,
and runs the remaining rounds only; the result is the uninterrupted run's.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtide.aggregation import federation_strategy
from fedtide.continual.methods import build_method, method_class
from fedtide.data.datasets import load_dataset
from fedtide.data.schema import Scenario
from fedtide.data.split import evaluation_samples, experience_classes, split_key
from fedtide.errors import FederationError
from fedtide.metrics.audit import audit_clients
from fedtide.metrics.canary_audit import audit_canaries
from fedtide.metrics.evaluation import experience_accuracies
from fedtide.metrics.forgetting import average_accuracy, average_forgetting, backward_transfer
from fedtide.models import build_scenario_model
from fedtide.privacy.accounting import client_delta, noise_multiplier
from fedtide.privacy.client_level import client_level_mechanism, client_noise_multiplier
from fedtide.privacy.dp_fedavg import DPFedAvg
from fedtide.protocol import RESTORE_STATE
from fedtide.records.metrics import ExperienceRecord, RoundClientLevel, RoundPrivacy, RoundRecord
from fedtide.records.run_folder import (
    MODEL_FILE,
    append_log,
    append_metrics,
    metrics_length,
    truncate_metrics,
    write_summary,
)
from fedtide.records.summary import (
    AuditSummary,
    ClientLevelSummary,
    FaultSummary,
    PrivacySummary,
    RunSummary,
    privacy_guarantees,
)
from fedtide.server.checkpoint import (
    Checkpoint,
    read_checkpoint,
    remove_checkpoints,
    restore_rng,
    rng_state,
    write_checkpoint,
)
from fedtide.server.continual_strategy import ContinualStrategy, RoundOutcome
from fedtide.server.faults import FaultPlan
from fedtide.server.grid import PartitionOrderedGrid
from fedtide.server.method_metrics import aggregate_method_metrics
from fedtide.stopping import reclaim_signals

RoundObserver = Callable[[RoundRecord], None]


class _RunRecorder:
    """Evaluates the global model after each round, writes the run's metrics as they come, and checkpoints."""

    # The running totals the summary is made of: checkpointed, and taken back by a resumed run.
    TOTALS = (
        "matrix", "failures", "epsilon", "stopped", "ray_nodes", "dropped", "strategy_metrics", "aggregated",
        "method_metrics",
    )  # fmt: skip

    def __init__(self, scenario: Scenario, run_dir: Path, observer: RoundObserver | None) -> None:
        data = load_dataset(scenario.dataset.name, scenario.dataset.root)
        key = split_key(scenario)
        self.classes = [sorted(group) for group in experience_classes(key)]
        self.test_sets = [(data.test_x[ids], data.test_y[ids]) for ids in evaluation_samples(scenario)]
        self.model = build_scenario_model(scenario, data.input_shape, scenario.seed)
        self.run_dir = run_dir
        self.rounds = scenario.federation.rounds_per_experience
        self.total_rounds = scenario.total_rounds
        self.checkpoint_every = scenario.checkpoint.every
        self.scenario_json = scenario.model_dump_json()
        self.observer = observer
        self.started = time.monotonic()
        self.matrix: list[list[float]] = []
        self.failures = 0
        self.strategy_metrics: dict[str, float | list[float]] | None = None  # the last round's
        self.method_metrics: dict[str, float] | None = None  # the last round's
        self.metric_aggregation = method_class(scenario.continual.method).metric_aggregation
        self.dropped = dict.fromkeys(range(scenario.partition.num_clients), 0)  # per client, over rounds
        self.scenario = scenario
        self.private = scenario.privacy.private
        self.client_level = (
            client_level_mechanism(scenario, client_noise_multiplier(scenario))
            if scenario.privacy.client_private
            else None
        )
        self.aggregated: list[int] = []  # client-level DP: the clipped updates each round summed
        self.epsilon: dict[int, float] = {}  # latest cumulative ε per client
        self.stopped: set[int] = set()  # clients that hit their privacy budget
        self.ray_nodes: set[str] = set()  # Ray nodes that ran a client

    def evaluate_fn(self, experience: int, federation: ContinualStrategy) -> Callable[[int, ArrayRecord], None]:
        """The `evaluate_fn` that `Strategy.start` calls after each round of `experience`."""
        return partial(self._after_round, experience, federation)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Go on from a checkpoint: its totals, its wall time, and metrics.jsonl as it was then."""
        for name in self.TOTALS:  # a checkpoint written before a total existed keeps its start value
            setattr(self, name, checkpoint.totals.get(name, getattr(self, name)))
        self.started = time.monotonic() - checkpoint.wall_time_s
        truncate_metrics(self.run_dir, checkpoint.metrics_length)

    def _checkpoint(self, global_round: int, arrays: ArrayRecord, federation: ContinualStrategy) -> None:
        """Checkpoint after `global_round` if one is due: every `checkpoint.every` rounds, and after the last."""
        every = self.checkpoint_every
        if not every or (global_round % every and global_round != self.total_rounds):
            return
        checkpoint = Checkpoint(
            round=global_round,
            arrays=arrays,
            federation=federation.checkpoint_state(),
            totals={name: getattr(self, name) for name in self.TOTALS},
            wall_time_s=self.elapsed(),
            rng=rng_state(),
            metrics_length=metrics_length(self.run_dir),
            scenario=self.scenario_json,
        )
        write_checkpoint(self.run_dir, checkpoint)

    def _privacy_record(self, outcome: RoundOutcome) -> RoundPrivacy:
        """Cumulative ε per client (carried over for clients not sampled this round)."""
        for report in outcome.reports:
            self.epsilon[report.partition_id] = report.epsilon
            if report.budget_exhausted:
                self.stopped.add(report.partition_id)
        values = list(self.epsilon.values())
        return RoundPrivacy(
            epsilon_max=max(values),
            epsilon_min=min(values),
            epsilon_per_client={str(k): v for k, v in sorted(self.epsilon.items())},
            budget_exhausted_clients=sorted(self.stopped),
        )

    def fault_summary(self) -> FaultSummary:
        return FaultSummary(
            clients_dropped=sum(self.dropped.values()),
            dropped_per_client={str(k): v for k, v in self.dropped.items()},
        )

    def _after_round(self, experience: int, federation: ContinualStrategy, server_round: int, arrays: ArrayRecord):
        if server_round == 0:  # start() also evaluates the initial weights; the previous round did
            return None
        server_round = federation.round_in_experience(server_round)
        outcome = federation.last_round
        accuracies = experience_accuracies(self.model, arrays, self.test_sets[: experience + 1])
        privacy = self._privacy_record(outcome) if self.private else None
        client_level = None
        if self.client_level is not None:
            self.aggregated.append(outcome.aggregated)
            epsilon = self.client_level.epsilon(len(self.aggregated))  # every round releases, empty or not
            client_level = RoundClientLevel(
                epsilon=epsilon, clipping_norm=outcome.clipping_norm, aggregated=outcome.aggregated
            )
        equal = self.client_level is not None  # client-level DP weighs clients equally
        method_metrics = aggregate_method_metrics(outcome.reports, self.metric_aggregation, equal)
        record = _round_record(
            experience, server_round, accuracies, outcome, self.elapsed(), privacy, client_level, method_metrics
        )
        self.failures += record.clients["failed"]
        self.strategy_metrics = outcome.strategy_metrics or self.strategy_metrics
        self.method_metrics = method_metrics or self.method_metrics
        for failure in outcome.failure_logs:
            append_log(self.run_dir, failure)
        outcome.failure_logs.clear()  # logged; a later fatal error logs only its own round
        for drop in outcome.dropped:
            self.dropped[drop.partition_id] += 1
        self.ray_nodes.update(r.ray_node_id for r in outcome.reports if r.ray_node_id)
        append_metrics(self.run_dir, record)
        if server_round == self.rounds:
            self.matrix.append(accuracies)
            append_metrics(self.run_dir, ExperienceRecord(experience, accuracies))
        self._checkpoint(record.round, arrays, federation)
        if self.observer:
            self.observer(record)
        return None


def run_federation(
    grid: Grid,
    scenario: Scenario,
    run_dir: Path,
    observer: RoundObserver | None = None,
    started_at: float | None = None,
) -> RunSummary:
    """Run every experience and round of `scenario`, writing metrics, checkpoints and the summary to `run_dir`.

    When `run_dir` holds a checkpoint (an interrupted run: `fedtide resume`), go on from it.
    `started_at` (a `time.time()`) is when the command began, the origin of the summary's
    `startup_s`; default: now.
    """
    started_at = time.time() if started_at is None else started_at
    num_clients = scenario.partition.num_clients
    rounds = scenario.federation.rounds_per_experience
    ordered = PartitionOrderedGrid(grid)
    recorder = _RunRecorder(scenario, run_dir, observer)
    arrays = ArrayRecord(recorder.model.state_dict())
    ordered.discover(num_clients)
    reclaim_signals()  # the nodes answered, so a Ray backend is up, and ray.init took SIGTERM
    client_private = scenario.privacy.client_private
    strategy = federation_strategy(scenario, recorder.client_level.noise_multiplier if client_private else None)
    faults = FaultPlan(scenario.faults, scenario.seed) if scenario.faults.active else None
    secure = scenario.privacy.enabled and scenario.privacy.secure_rng
    federation = ContinualStrategy(
        strategy,
        reference=arrays,
        partition_of=ordered.partition_of,
        faults=faults,
        seed=None if secure else scenario.seed,
    )
    done = 0
    if checkpoint := read_checkpoint(run_dir, scenario):
        arrays, done = checkpoint.arrays, checkpoint.round
        federation.restore(checkpoint.federation)
        recorder.restore(checkpoint)
        _give_back_client_states(ordered, federation.client_states)
        restore_rng(checkpoint.rng)  # last: building the model and the data above draws from them

    first, ran = divmod(done, rounds)
    rounds_began = time.time()
    try:
        for experience in range(first, scenario.stream.n_experiences):
            done_here = ran if experience == first else 0
            if not done_here:  # Flower samples nodes with `random`; OS entropy under secure_rng
                random.seed(None if secure else scenario.seed * 1000 + experience)
            federation.begin_experience(experience, arrays, train_config(scenario, experience), rounds, done_here)
            result = federation.start(
                ordered, arrays, num_rounds=rounds - done_here, evaluate_fn=recorder.evaluate_fn(experience, federation)
            )
            if len(result.arrays) > 0:
                arrays = result.arrays
    except FederationError as error:  # one line for the console; the tracebacks go to the run's log
        for failure in federation.last_round.failure_logs:
            append_log(run_dir, failure)
        log = append_log(run_dir, "".join(traceback.format_exception(error)))
        raise FederationError(f"{error}; full log: {log}") from error

    rounds_ended = time.time()
    recorder.model.load_state_dict(arrays.to_torch_state_dict())
    torch.save(recorder.model.state_dict(), run_dir / MODEL_FILE)  # to evaluate or audit the run again later
    summary = replace(
        _run_summary(scenario, recorder, federation),
        startup_s=round(rounds_began - started_at, 3),
        rounds_s=round(rounds_ended - rounds_began, 3),
        end_s=round(time.time() - rounds_ended, 3),
    )
    write_summary(run_dir, summary)
    remove_checkpoints(run_dir)
    return summary


def _run_summary(scenario: Scenario, recorder: _RunRecorder, federation: ContinualStrategy) -> RunSummary:
    """What the finished run measured: accuracy, forgetting, each level's ε, and the audits of the final model."""
    matrix = recorder.matrix
    privacy = _privacy_summary(scenario, recorder) if recorder.private else None
    client_level = _client_level_summary(scenario, recorder, federation) if scenario.privacy.client_private else None
    canaries = audit_canaries(
        scenario,
        recorder.model,
        privacy.epsilon_max if privacy else None,
        client_level.epsilon if client_level else None,
    )
    return RunSummary(
        name=scenario.name,
        seed=scenario.seed,
        strategy=scenario.federation.strategy.name,
        method=scenario.continual.method,
        num_clients=scenario.partition.num_clients,
        n_experiences=scenario.stream.n_experiences,
        rounds=scenario.total_rounds,
        classes_per_experience=recorder.classes,
        accuracy_matrix=matrix,
        final_average_accuracy=average_accuracy(matrix),
        average_forgetting=average_forgetting(matrix),
        bwt=backward_transfer(matrix),
        clients_failed=recorder.failures,
        wall_time_s=recorder.elapsed(),
        ray_nodes=sorted(recorder.ray_nodes),
        privacy=privacy,
        client_level=client_level,
        epsilons=privacy_guarantees(privacy, client_level) or None,
        audit=AuditSummary.from_dict({**audit_clients(scenario, recorder.model), "canaries": canaries}),
        faults=recorder.fault_summary() if federation.faults else None,
        strategy_metrics=recorder.strategy_metrics,
        method_metrics=recorder.method_metrics,
    )


def _privacy_summary(scenario: Scenario, recorder: _RunRecorder) -> PrivacySummary:
    footprint = build_method(scenario.continual).private_footprint()
    return PrivacySummary(
        delta=client_delta(scenario),
        accountant=scenario.privacy.accountant,
        max_grad_norm=scenario.privacy.max_grad_norm,
        noise_multiplier={
            str(c): noise_multiplier(scenario, c, footprint) for c in range(scenario.partition.num_clients)
        },
        target_epsilon=scenario.privacy.target_epsilon,
        epsilon_max=max(recorder.epsilon.values(), default=0.0),
        epsilon_per_client={str(k): v for k, v in sorted(recorder.epsilon.items())},
        budget_exhausted_clients=sorted(recorder.stopped),
    )


def _client_level_summary(
    scenario: Scenario, recorder: _RunRecorder, federation: ContinualStrategy
) -> ClientLevelSummary:
    config, mechanism = scenario.privacy.client_level, recorder.client_level
    wrapper: DPFedAvg = federation.strategy
    adaptive = wrapper.adaptive
    return ClientLevelSummary(
        sampling=mechanism.sampling,
        adjacency=mechanism.adjacency,
        num_clients=mechanism.num_clients,
        noise_multiplier=mechanism.noise_multiplier,
        accounted_noise_multiplier=mechanism.accounted_noise_multiplier,
        sample_rate=mechanism.sample_rate,
        expected_clients=mechanism.expected_clients,
        rounds=len(recorder.aggregated),
        aggregated_per_round=list(recorder.aggregated),
        delta=mechanism.delta,
        accountant="dp-accounting rdp" if mechanism.adjacency == "replace_one" else mechanism.accountant,
        clipping=config.clipping,
        clip_on=config.clip_on,
        initial_clipping_norm=config.clipping_norm,
        clipping_norm=federation.last_round.clipping_norm,
        clipped_count_stddev=adaptive.count_stddev if adaptive else None,
        update_noise_multiplier=wrapper.update_noise_multiplier if adaptive else None,
        target_epsilon=config.target_epsilon,
        epsilon=mechanism.epsilon(len(recorder.aggregated)),
        secure_rng=scenario.privacy.secure_rng,
    )


def _give_back_client_states(grid: PartitionOrderedGrid, states: dict[int, RecordDict]) -> None:
    """Send every checkpointed client its `Context.state` before the first resumed round."""
    node_of = {partition: node for node, partition in grid.partition_of.items()}
    messages = [
        Message(state, dst_node_id=node_of[partition], message_type=f"query.{RESTORE_STATE}")
        for partition, state in states.items()
    ]
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            partition = grid.partition_of[reply.metadata.src_node_id]
            reason = reply.error.reason
            raise FederationError(f"client {partition} could not take back its checkpointed state: {reason}")


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
            "checkpoint": scenario.checkpoint.every > 0,  # clients then send their Context.state with replies
        }
    )


def _round_record(
    experience: int,
    server_round: int,
    accuracies: list[float],
    outcome: RoundOutcome,
    wall_time_s: float,
    privacy: RoundPrivacy | None,
    client_level: RoundClientLevel | None = None,
    method_metrics: dict[str, float] | None = None,
) -> RoundRecord:
    reports = outcome.reports
    trained = [r for r in reports if r.num_examples > 0]
    examples = sum(r.num_examples for r in trained)
    return RoundRecord(
        round=outcome.global_round,
        experience=experience,
        round_in_experience=server_round,
        accuracy=accuracies,
        mean_accuracy=sum(accuracies) / len(accuracies),
        train_loss=sum(r.train_loss * r.num_examples for r in trained) / examples if examples else None,
        clients={
            "sampled": outcome.sampled,
            "dropped": len(outcome.dropped),
            "replied": len(reports),
            "failed": outcome.sent - len(reports),
            "empty": sum(r.empty for r in reports),
        },
        per_client=reports,
        failures=outcome.failures or None,
        dropped=outcome.dropped or None,
        wall_time_s=wall_time_s,
        privacy=privacy,
        client_level=client_level,
        strategy_metrics=outcome.strategy_metrics,
        method_metrics=method_metrics,
    )
