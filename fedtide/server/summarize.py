"""A finished run's summary: accuracy, forgetting, each level's ε, and the audits of the final model."""

from __future__ import annotations

from fedtide.audit.canaries import audit_canaries
from fedtide.audit.membership import audit_clients
from fedtide.continual.methods import build_method
from fedtide.metrics.forgetting import average_accuracy, average_forgetting, backward_transfer
from fedtide.metrics.per_client import per_client_summary
from fedtide.privacy.accounting import client_delta, noise_multiplier
from fedtide.records.summary import (
    AuditSummary,
    ClientLevelSummary,
    PrivacySummary,
    RunSummary,
    privacy_guarantees,
)
from fedtide.scenario.schema import Scenario
from fedtide.server.recorder import RunRecorder


def summarize(scenario: Scenario, recorder: RunRecorder, faults: bool) -> RunSummary:
    """What the run measured, its final model already in `recorder.evaluation.model`; `faults`: it simulated some.

    The session's timings (`startup_s`, ...) are the caller's to add.
    """
    totals, model = recorder.totals, recorder.evaluation.model
    matrix, plan = totals.matrix, recorder.evaluation.plan
    per_client = None if plan.schedule.lockstep else per_client_summary(plan, totals.end_accuracies)
    forgetting, bwt = average_forgetting(matrix), backward_transfer(matrix)
    if per_client is not None:  # the global matrix's rows are stages, in which clients hold different experiences
        forgetting, bwt = per_client.mean_average_forgetting or 0.0, per_client.mean_bwt or 0.0
    privacy = _privacy_summary(scenario, recorder) if recorder.private else None
    client_level = _client_level_summary(scenario, recorder) if recorder.client_level is not None else None
    canaries = audit_canaries(
        scenario,
        model,
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
        classes_per_experience=recorder.evaluation.classes,
        accuracy_matrix=matrix,
        final_average_accuracy=average_accuracy(matrix),
        average_forgetting=forgetting,
        bwt=bwt,
        clients_failed=totals.failures,
        wall_time_s=recorder.elapsed(),
        ray_nodes=sorted(totals.ray_nodes),
        privacy=privacy,
        client_level=client_level,
        epsilons=privacy_guarantees(privacy, client_level) or None,
        audit=AuditSummary.from_dict({**audit_clients(scenario, model), "canaries": canaries}),
        faults=recorder.fault_summary() if faults else None,
        strategy_metrics=totals.strategy_metrics,
        method_metrics=totals.method_metrics,
        per_client=per_client,
    )


def _privacy_summary(scenario: Scenario, recorder: RunRecorder) -> PrivacySummary:
    footprint = build_method(scenario.continual).private_footprint()
    epsilon = recorder.totals.epsilon
    return PrivacySummary(
        delta=client_delta(scenario),
        accountant=scenario.privacy.accountant,
        max_grad_norm=scenario.privacy.max_grad_norm,
        noise_multiplier={
            str(c): noise_multiplier(scenario, c, footprint) for c in range(scenario.partition.num_clients)
        },
        target_epsilon=scenario.privacy.target_epsilon,
        epsilon_max=max(epsilon.values(), default=0.0),
        epsilon_per_client={str(k): v for k, v in sorted(epsilon.items())},
        budget_exhausted_clients=sorted(recorder.totals.stopped),
    )


def _client_level_summary(scenario: Scenario, recorder: RunRecorder) -> ClientLevelSummary:
    config, mechanism, wrapper = scenario.privacy.client_level, recorder.client_level, recorder.dp_fedavg
    aggregated = recorder.totals.aggregated
    adaptive = wrapper.adaptive
    return ClientLevelSummary(
        sampling=mechanism.sampling,
        adjacency=mechanism.adjacency,
        num_clients=mechanism.num_clients,
        noise_multiplier=mechanism.noise_multiplier,
        accounted_noise_multiplier=mechanism.accounted_noise_multiplier,
        sample_rate=mechanism.sample_rate,
        expected_clients=mechanism.expected_clients,
        rounds=len(aggregated),
        aggregated_per_round=list(aggregated),
        delta=mechanism.delta,
        accountant="dp-accounting rdp" if mechanism.adjacency == "replace_one" else mechanism.accountant,
        clipping=config.clipping,
        clip_on=config.clip_on,
        initial_clipping_norm=config.clipping_norm,
        clipping_norm=recorder.clipping_norm(),
        clipped_count_stddev=adaptive.count_stddev if adaptive else None,
        update_noise_multiplier=wrapper.update_noise_multiplier if adaptive else None,
        target_epsilon=config.target_epsilon,
        epsilon=mechanism.epsilon(len(aggregated)),
        secure_rng=scenario.privacy.secure_rng,
    )
