"""The report's blocks for runs whose clients are not in lockstep: the stages' matrix, each client's
stream and numbers, and how forgetting spreads over clients (`fedtide.report.streams` says what they show)."""

from __future__ import annotations

from fedtide.report import figures
from fedtide.report.blocks import Block, Heading, Image, TableBlock, Text, png
from fedtide.report.runs import RunResult, SeedGroup
from fedtide.report.streams import (
    CLIENT_COLUMNS,
    client_rows,
    joiners,
    pct,
    run_rounds_per_stage,
    sorted_clients,
    stage_label,
    stage_spans,
)


def stage_matrix_table(run: RunResult) -> TableBlock:
    """The global accuracy matrix out of lockstep: a row per stage, labelled by its rounds, on every experience."""
    matrix = run.summary.accuracy_matrix
    spans = stage_spans(run.summary, run_rounds_per_stage(run))
    width = max(len(row) for row in matrix)
    return TableBlock(
        ["after", *(f"exp {j}" for j in range(width))],
        [[stage_label(s, span), *(pct(a) for a in row)] for s, (row, span) in enumerate(zip(matrix, spans))],
    )


def client_blocks(run: RunResult, stem: str) -> list[Block]:
    """A run's clients out of lockstep: the table of their streams and numbers, and forgetting's spread."""
    per_client = run.summary.per_client
    single = [c for c in sorted_clients(per_client) if per_client.clients[c].average_forgetting is None]
    text = (
        "Clients are not in lockstep: the matrix above has a row per stage of "
        f"{run_rounds_per_stage(run)} global rounds, on every experience. Each client's numbers are over its own "
        "experiences in its own order: its row i is the global model after the round that ended its experience i, "
        "on its experiences 0..i. Forgetting and BWT are Avalanche's over that matrix; the means are over clients."
    )
    if single:
        text += f" Held one experience, nothing to forget (no forgetting, left out of its mean): {', '.join(single)}."
    joined = joiners(per_client)
    if joined:
        text += f" Joined mid-run with experiences no client there before held, marked (joined): {', '.join(joined)}."
    blocks: list[Block] = [Text(text), TableBlock(CLIENT_COLUMNS, client_rows(per_client))]
    if per_client.forgetting():
        blocks.append(Image(f"{stem}-client_forgetting.png", "Average forgetting of each client", png(
            figures.client_forgetting_figure([(run.run_id, _forgetting_points(run))]))))  # fmt: skip
    return blocks


def _forgetting_points(run: RunResult) -> list[tuple[str, float]]:
    clients = run.summary.per_client.clients
    return [(c, f) for c in sorted_clients(run.summary.per_client) if (f := clients[c].average_forgetting) is not None]


def forgetting_comparison(points: list[SeedGroup]) -> list[Block]:
    """Per-client forgetting of every point that has clients out of lockstep, its seeds' clients pooled."""
    groups = [
        (point.series + ("" if not point.private else f" (ε {point.runs[0].epsilon_text()})"),
         [(c, f) for run in point.runs if run.summary.per_client for c, f in _forgetting_points(run)])
        for point in points
    ]  # fmt: skip
    groups = [(label, values) for label, values in groups if values]
    if not groups:
        return []
    return [
        Heading("Forgetting per client"),
        Text(
            "Clients not in lockstep each forget over their own experiences: a point per client (its seeds' clients "
            "pooled), the box their quartiles, the diamond their mean. The tables' forgetting is each run's mean over "
            "its clients."
        ),
        Image("client_forgetting.png", "Average forgetting of each client, per series", png(
            figures.client_forgetting_figure(groups))),
    ]  # fmt: skip
