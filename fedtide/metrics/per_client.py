"""Each client's accuracy matrix on its own stream, and its forgetting: what a stream out of lockstep is judged by.

When clients meet the experiences in their own order and at their own rounds, the
global matrix's rows (one per stage) mix clients in different experiences; forgetting
means something per client. Client k's row i is the global model's accuracy, after the
round that ended k's experience i, on the test data of k's experiences 0..i (in k's
order), as FedWeIT (Yoon et al. 2021) and GLFC (Dong et al. 2022) report per client;
forgetting and BWT over the matrix are Avalanche's (`fedtide.metrics.forgetting`).
"""

from __future__ import annotations

from statistics import fmean

from fedtide.data.stream_plan import ClientPlan, StreamPlan
from fedtide.metrics.forgetting import average_accuracy, average_forgetting, backward_transfer
from fedtide.records.summary import ClientStreamSummary, PerClientSummary


def per_client_summary(plan: StreamPlan, end_accuracies: dict[int, list[float]]) -> PerClientSummary:
    """Every client's stream summary from the accuracies on every experience after each round that ended a step."""
    clients = {str(own.client): client_stream(own, end_accuracies) for own in plan.clients}
    forgetting = [c.average_forgetting for c in clients.values() if c.average_forgetting is not None]
    bwt = [c.bwt for c in clients.values() if c.bwt is not None]
    return PerClientSummary(
        clients=clients,
        mean_final_average_accuracy=fmean(c.final_average_accuracy for c in clients.values()),
        mean_average_forgetting=fmean(forgetting) if forgetting else None,
        mean_bwt=fmean(bwt) if bwt else None,
    )


def client_stream(own: ClientPlan, end_accuracies: dict[int, list[float]]) -> ClientStreamSummary:
    order = [exp.experience for exp in own.experiences]
    matrix = [
        [end_accuracies[exp.end_round][order[j]] for j in range(i + 1)] for i, exp in enumerate(own.experiences)
    ]
    several = len(matrix) > 1
    return ClientStreamSummary(
        experiences=order,
        rounds=[[exp.start_round, exp.end_round] for exp in own.experiences],
        accuracy_matrix=matrix,
        final_average_accuracy=average_accuracy(matrix),
        average_forgetting=average_forgetting(matrix) if several else None,
        bwt=backward_transfer(matrix) if several else None,
    )
