"""What a run measures as it goes: each round's record in metrics.jsonl, and the totals its summary is made of.

After every round the global model is evaluated on the test data of every experience
seen so far; the last round of an experience gives one row of the accuracy matrix. The
running totals (`RunTotals`) are one typed object, and that object is what a checkpoint
stores and a resumed run takes back.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord

from fedtide.continual.methods import method_class
from fedtide.data.datasets import load_dataset
from fedtide.data.domains import domain_transforms, transformed
from fedtide.data.stream_plan import StreamPlan, stream_plan
from fedtide.metrics.evaluation import experience_accuracies
from fedtide.models import build_scenario_model
from fedtide.privacy.client_level import ClientLevelMechanism
from fedtide.privacy.dp_fedavg import DPFedAvg
from fedtide.records.metrics import ExperienceRecord, RoundClientLevel, RoundPrivacy, RoundRecord
from fedtide.records.run_folder import append_log, append_metrics, truncate_metrics
from fedtide.records.summary import FaultSummary
from fedtide.scenario.schema import Scenario
from fedtide.server.continual_strategy import RoundOutcome
from fedtide.server.method_metrics import aggregate_method_metrics
from fedtide.server.run_totals import RunTotals


class Evaluation:
    """The server's model and each experience's test data: what every round's accuracies are measured on."""

    def __init__(self, scenario: Scenario) -> None:
        data = load_dataset(scenario.dataset.name, scenario.dataset.root)
        self.plan: StreamPlan = stream_plan(scenario)
        self.classes = [list(group) for group in self.plan.classes]
        self.test_sets = [(data.test_x[ids], data.test_y[ids]) for ids in self.plan.test]
        if scenario.stream.kind == "domain":
            transforms = domain_transforms(scenario.stream, scenario.seed, data.train_x)
            self.test_sets = [(transformed(x, t), y) for (x, y), t in zip(self.test_sets, transforms)]
        self.model = build_scenario_model(scenario, seed=scenario.seed)

    def accuracies(self, arrays: ArrayRecord, stage: int) -> list[float]:
        """The accuracy of `arrays` on the test data of experiences 0..`stage` in lockstep; else of every
        experience, since clients meet them in their own order."""
        seen = self.test_sets[: stage + 1] if self.plan.schedule.lockstep else self.test_sets
        return experience_accuracies(self.model, arrays, seen)

    def seen_accuracy(self, accuracies: list[float], global_round: int) -> float:
        """The accuracy on the union of the test data of every experience some client has begun by `global_round`."""
        seen = self.plan.schedule.seen(global_round)
        sizes = [len(self.test_sets[e][1]) for e in seen]
        return sum(accuracies[e] * n for e, n in zip(seen, sizes)) / sum(sizes)


class RunRecorder:
    """Evaluates the global model after each round and writes the run's metrics as they come."""

    def __init__(
        self,
        scenario: Scenario,
        run_dir: Path,
        evaluation: Evaluation,
        started: float,
        client_level: ClientLevelMechanism | None = None,
        dp_fedavg: DPFedAvg | None = None,
    ) -> None:
        self.evaluation = evaluation
        self.run_dir = run_dir
        self.started = started  # a time.monotonic(): when the server began building its model and data
        self.metric_aggregation = method_class(scenario.continual.method).metric_aggregation
        self.private = scenario.privacy.private
        self.client_level = client_level  # client-level DP's mechanism, None without it
        self.dp_fedavg = dp_fedavg  # the wrapper that clips under client-level DP: its round's norm is recorded
        self.totals = RunTotals.start(scenario.partition.num_clients)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def restore(self, totals: RunTotals, wall_time_s: float, metrics_length: int) -> None:
        """Go on from a checkpoint: its totals, its wall time, and metrics.jsonl as it was then."""
        self.totals = totals
        self.started = time.monotonic() - wall_time_s
        truncate_metrics(self.run_dir, metrics_length)

    def fault_summary(self) -> FaultSummary:
        dropped = self.totals.dropped
        return FaultSummary(
            clients_dropped=sum(dropped.values()), dropped_per_client={str(k): v for k, v in dropped.items()}
        )

    def record(
        self, experience: int, server_round: int, arrays: ArrayRecord, outcome: RoundOutcome, stage_end: bool
    ) -> RoundRecord:
        """Measure `arrays` after the stage's round `server_round` (in lockstep, the experience's), add the round
        to the totals and the files; `stage_end`: the stage's last round, which gives a row of the matrix."""
        totals = self.totals
        accuracies = self.evaluation.accuracies(arrays, experience)
        seen = self.evaluation.seen_accuracy(accuracies, outcome.global_round)
        if outcome.global_round in self.evaluation.plan.schedule.end_rounds:
            totals.end_accuracies[outcome.global_round] = accuracies
        equal = self.client_level is not None  # client-level DP weighs clients equally
        method_metrics = aggregate_method_metrics(outcome.reports, self.metric_aggregation, equal)
        privacy = self._privacy_record(outcome) if self.private else None
        client_level = self._client_level_record(outcome) if self.client_level is not None else None
        record = round_record(
            experience, server_round, accuracies, outcome, self.elapsed(), privacy, client_level, method_metrics, seen
        )
        totals.failures += record.clients["failed"]
        totals.strategy_metrics = outcome.strategy_metrics or totals.strategy_metrics
        totals.method_metrics = method_metrics or totals.method_metrics
        for failure in outcome.failure_logs:
            append_log(self.run_dir, failure)
        for drop in outcome.dropped:
            totals.dropped[drop.partition_id] += 1
        totals.ray_nodes.update(r.ray_node_id for r in outcome.reports if r.ray_node_id)
        append_metrics(self.run_dir, record)
        if stage_end:
            totals.matrix.append(accuracies)
            append_metrics(self.run_dir, ExperienceRecord(experience, accuracies))
        return record

    def _privacy_record(self, outcome: RoundOutcome) -> RoundPrivacy:
        """Cumulative ε per client (carried over for clients not sampled this round)."""
        epsilon, stopped = self.totals.epsilon, self.totals.stopped
        for report in outcome.reports:
            epsilon[report.partition_id] = report.epsilon
            if report.budget_exhausted:
                stopped.add(report.partition_id)
        values = list(epsilon.values())
        return RoundPrivacy(
            epsilon_max=max(values),
            epsilon_min=min(values),
            epsilon_per_client={str(k): v for k, v in sorted(epsilon.items())},
            budget_exhausted_clients=sorted(stopped),
        )

    def _client_level_record(self, outcome: RoundOutcome) -> RoundClientLevel:
        """ε of the noisy aggregates so far: every round releases one, empty or not."""
        self.totals.aggregated.append(outcome.aggregated)
        return RoundClientLevel(
            epsilon=self.client_level.epsilon(len(self.totals.aggregated)),
            clipping_norm=self.clipping_norm(),
            aggregated=outcome.aggregated,
        )

    def clipping_norm(self) -> float:
        """The norm the last round's updates were clipped to (adaptive clipping moves it)."""
        return float(self.dp_fedavg.round_clipping_norm)


def round_record(
    experience: int,
    server_round: int,
    accuracies: list[float],
    outcome: RoundOutcome,
    wall_time_s: float,
    privacy: RoundPrivacy | None,
    client_level: RoundClientLevel | None = None,
    method_metrics: dict[str, float] | None = None,
    seen_accuracy: float | None = None,
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
        seen_accuracy=seen_accuracy,
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
