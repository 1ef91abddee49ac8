"""What the console and the report show of a stream whose clients are not in lockstep (`summary.per_client`).

Out of lockstep the global accuracy matrix has a row per stage (`federation.rounds_per_experience`
global rounds, the server's unit) over every experience, in which clients hold different
experiences; forgetting means something per client, over its own experiences in its own order
(`fedtide.metrics.per_client`). So the stages are labelled by their rounds, each client's stream
and numbers get a table, and the report draws how forgetting spreads over clients, not only its mean.

What is global and what is per client, out of lockstep: summary.json's `final_average_accuracy`
is the final global model's mean accuracy over every experience (the last stage's row), while
its `average_forgetting` and `bwt` are the means over clients (`per_client.mean_*`), each
client's over its own matrix (0.0 where no client held two experiences, as in a lockstep run of
one). So the comparison and privacy-utility tables, which read those summary fields, compare a
per-client forgetting with a global accuracy; the runs table adds the clients' mean final
accuracy beside it.
"""

from __future__ import annotations

from fedtide.records.summary import PerClientSummary, RunSummary
from fedtide.report.runs import RunResult

CLIENT_COLUMNS = ["client", "experiences (its order)", "rounds", "final accuracy %", "forgetting %", "BWT %"]
JOINED = " (joined)"  # after a joiner's id in the clients' table


def rounds_per_stage(summary: RunSummary, rounds_per_experience: int | None = None) -> int:
    """A stage's rounds: the scenario's `federation.rounds_per_experience` when given (and it gives the
    summary's number of stages), else the smallest that does (the last stage may be shorter)."""
    stages = max(1, len(summary.accuracy_matrix))
    if rounds_per_experience and -(-summary.rounds // rounds_per_experience) == stages:
        return rounds_per_experience
    return -(-summary.rounds // stages)


def run_rounds_per_stage(run: RunResult) -> int:
    """The run's stage length, from the scenario it ran (`scenario.yaml`) where it says."""
    return rounds_per_stage(run.summary, run.scenario.get("federation", {}).get("rounds_per_experience"))


def stage_spans(summary: RunSummary, rounds_per_experience: int | None = None) -> list[tuple[int, int]]:
    """Each stage's first and last global round, one per row of the global accuracy matrix."""
    per = rounds_per_stage(summary, rounds_per_experience)
    return [(s * per + 1, min((s + 1) * per, summary.rounds)) for s in range(len(summary.accuracy_matrix))]


def stage_label(stage: int, span: tuple[int, int]) -> str:
    """`stage 1 (rounds 4–6)`: a row of the global matrix out of lockstep."""
    first, last = span
    return f"stage {stage} (" + (f"round {first})" if first == last else f"rounds {first}–{last})")


def sorted_clients(per_client: PerClientSummary) -> list[str]:
    return sorted(per_client.clients, key=int)


def first_rounds(per_client: PerClientSummary) -> dict[str, int]:
    """The global round at which each client starts its first experience: when it arrives."""
    return {client: stream.rounds[0][0] for client, stream in per_client.clients.items()}


def joiners(per_client: PerClientSummary) -> list[str]:
    """The clients that joined mid-run holding experiences no one there before them holds.

    Read from the clients' streams alone (a summary carries no arrival rules): a client that
    starts after the first ones and shares no experience with any client that started before
    it. A late start over experiences others already hold is a staggered start, not a joiner.
    """
    starts = first_rounds(per_client)
    first = min(starts.values())
    found = []
    for client in sorted_clients(per_client):
        earlier = {
            e for other, stream in per_client.clients.items() if starts[other] < starts[client]
            for e in stream.experiences
        }  # fmt: skip
        if starts[client] > first and not earlier & set(per_client.clients[client].experiences):
            found.append(client)
    return found


def client_rows(per_client: PerClientSummary) -> list[list[str]]:
    """A row per client (`CLIENT_COLUMNS`), percentages with two decimals, then the means over clients.

    Forgetting and BWT are `–` for a client that held one experience: it had nothing to forget,
    and the means leave it out.
    """
    joined = set(joiners(per_client))
    rows = []
    for client in sorted_clients(per_client):
        stream = per_client.clients[client]
        rows.append([
            client + (JOINED if client in joined else ""),
            " → ".join(map(str, stream.experiences)),
            f"{stream.rounds[0][0]}–{stream.rounds[-1][1]}",
            pct(stream.final_average_accuracy),
            pct(stream.average_forgetting),
            pct(stream.bwt),
        ])  # fmt: skip
    means = [pct(per_client.mean_final_average_accuracy), pct(per_client.mean_average_forgetting)]
    return [*rows, ["mean", "", "", *means, pct(per_client.mean_bwt)]]


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def streams_text(runs: list[RunResult]) -> str:
    """The preamble's word on runs out of lockstep: which numbers are global and which per client."""
    if not any(run.summary.per_client for run in runs):
        return ""
    return (
        " Where clients are not in lockstep, final accuracy is the final global model's mean over every experience, "
        "while forgetting and BWT are means over clients, each client's over its own experiences in its own order; "
        "the client mean columns give the clients' mean final accuracy beside them, and each client's numbers are "
        "in a table under its run."
    )
