"""What makes a stream impossible with the rest of its scenario: one line naming the field, or None."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtide.scenario.schedule import schedule_problem

if TYPE_CHECKING:
    from fedtide.scenario.schema import Scenario


def stream_problem(scenario: Scenario) -> str | None:
    """The first reason `scenario`'s stream cannot run; None when it can."""
    if scenario.stream.kind == "domain" and scenario.audit.canaries:
        return (
            "audit.canaries: a canary is a test image relabelled within its experience's classes, which a "
            "domain stream does not split; set canaries: 0, or use kind: class"
        )
    if scenario.stream.lockstep:
        return None
    stream, federation = scenario.stream, scenario.federation
    problem = schedule_problem(stream, scenario.partition.num_clients, federation.rounds_per_experience, scenario.seed)
    if problem:
        return problem
    plan = scenario.schedule
    present = [len(plan.present(r)) for r in range(1, plan.last_round + 1)]
    fewest = min(present)
    if federation.min_train_nodes > fewest:
        return (
            f"federation.min_train_nodes={federation.min_train_nodes}, but round {present.index(fewest) + 1} has "
            f"only {fewest} clients in the stream (Flower's sampling would wait for more forever); lower it"
        )
    if scenario.privacy.client_private and fewest < scenario.partition.num_clients:
        return (
            "privacy.level: client-level DP accounts for sampling from all partition.num_clients clients in every "
            "round, but stream.arrivals or stream.clients keep some out of some rounds; use level: sample, or "
            "keep every client in the stream"
        )
    return None
