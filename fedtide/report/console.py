"""The end-of-run tables `fedtide run` prints: the accuracy matrix, each client's stream out of lockstep, and the
headline numbers."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from fedtide.records.summary import CLIENT, SAMPLE, PerClientSummary, RunSummary
from fedtide.report.runs import metric_text
from fedtide.report.streams import CLIENT_COLUMNS, client_rows, stage_label, stage_spans

_EPSILON_ROW = {SAMPLE: "ε, unit sample (max over clients)", CLIENT: "ε, unit client"}


def summary_view(summary: RunSummary, rounds_per_experience: int | None = None) -> Group:
    """The accuracy matrix, each client's stream when clients are not in lockstep, and the headline numbers.

    Out of lockstep the matrix's rows are stages of `rounds_per_experience` rounds (the
    scenario's; without it, as `streams.rounds_per_stage` reads them from the summary).
    """
    per_client = summary.per_client
    tables = [accuracy_grid(summary)] if per_client is None else [
        stage_grid(summary, rounds_per_experience), clients_table(per_client)
    ]  # fmt: skip
    headline = Table(title=f"Run '{summary.name}': {summary.strategy} + {summary.method}")
    headline.add_column("metric")
    headline.add_column("value")  # left: an ε row names its neighbouring relation after the number
    for label, value in _headline(summary):
        headline.add_row(label, value)
    headline.add_row("clients failed", str(summary.clients_failed))
    if summary.faults:
        headline.add_row("clients dropped (simulated faults)", summary.faults.describe())
    for guarantee in summary.guarantees:  # each ε with its own unit: two levels are two guarantees
        headline.add_row(_EPSILON_ROW[guarantee.unit], guarantee.describe().removeprefix("ε "))
    canaries = summary.audit.canaries if summary.audit else None
    if canaries:
        ceiling = "" if canaries.epsilon_ceiling is None else f"ceiling {canaries.epsilon_ceiling:.3f}; "
        headline.add_row(
            f"ε lower bound (canary audit, {canaries.confidence:.0%})",
            f"{canaries.epsilon_lower:.3f} ({ceiling}{canaries.correct}/{canaries.guesses} guesses right, "
            f"{canaries.canaries} canaries, δ {canaries.delta:.2e})",
        )
        if canaries.blind_at(canaries.epsilon_audited):
            headline.add_row(
                "canary audit's reach",
                f"could not have detected a violation at ε {canaries.epsilon_audited:.3f} "
                "(its ceiling is not above it)",
            )
    if summary.privacy and summary.privacy.budget_exhausted_clients:
        headline.add_row("clients out of budget", ", ".join(map(str, summary.privacy.budget_exhausted_clients)))
    if summary.client_level:
        level = summary.client_level
        headline.add_row("client-level σ, sample rate q", f"{level.noise_multiplier:.3g}, {level.sample_rate:g}")
    for section, metrics in (("strategy", summary.strategy_metrics), ("method", summary.method_metrics)):
        for name, value in (metrics or {}).items():  # the last round's: the run's final value
            headline.add_row(f"{section}.{name} (last round)", metric_text(value))
    headline.add_row(*wall_time_row(summary))
    return Group(*tables, headline)


def _headline(summary: RunSummary) -> list[tuple[str, str]]:
    """Final accuracy, forgetting and BWT; out of lockstep the accuracy is the final global model's on every
    experience and forgetting and BWT are the means over clients (`fedtide.report.streams`), so each says so."""
    if summary.per_client is None:
        return [
            ("final average accuracy", f"{100 * summary.final_average_accuracy:.2f}%"),
            ("average forgetting", f"{100 * summary.average_forgetting:.2f}%"),
            ("BWT", f"{100 * summary.bwt:.2f}%"),
        ]
    means = summary.per_client
    return [
        ("final average accuracy (global model, every experience)", f"{100 * summary.final_average_accuracy:.2f}%"),
        ("final average accuracy (mean over clients)", _percent(means.mean_final_average_accuracy)),
        ("average forgetting (mean over clients)", _percent(means.mean_average_forgetting)),
        ("BWT (mean over clients)", _percent(means.mean_bwt)),
    ]


def _percent(value: float | None) -> str:
    """`12.34%`; `–` where no client held two experiences (nothing to forget)."""
    return "–" if value is None else f"{100 * value:.2f}%"


def accuracy_grid(summary: RunSummary) -> Table:
    """Lockstep: A[e][j] is lower-triangular, row e after every client's experience e."""
    matrix = summary.accuracy_matrix
    grid = Table(title="Accuracy matrix A[e][j] (rows: after experience e; columns: test on j)")
    grid.add_column("after", justify="right")
    for j in range(len(matrix)):
        grid.add_column(f"exp {j}", justify="right")
    for e, row in enumerate(matrix):
        cells = [f"{100 * a:.1f}" for a in row] + [""] * (len(matrix) - len(row))
        grid.add_row(f"exp {e}", *cells)
    return grid


def stage_grid(summary: RunSummary, rounds_per_experience: int | None) -> Table:
    """Out of lockstep: a full row per stage on every experience, each row named by its rounds."""
    matrix = summary.accuracy_matrix
    grid = Table(title="Global accuracy matrix (rows: after stage s; columns: test on experience j)")
    grid.add_column("after")
    for j in range(max(len(row) for row in matrix)):
        grid.add_column(f"exp {j}", justify="right")
    for s, (row, span) in enumerate(zip(matrix, stage_spans(summary, rounds_per_experience))):
        grid.add_row(stage_label(s, span), *(f"{100 * a:.1f}" for a in row))
    return grid


def clients_table(per_client: PerClientSummary) -> Table:
    """Each client's stream, its final accuracy, forgetting and BWT over its own experiences, and the means."""
    table = Table(title="Each client over its own experiences (accuracy %; joined: mid-run, with new experiences)")
    for column in CLIENT_COLUMNS:
        table.add_column(column, justify="left" if column in CLIENT_COLUMNS[:2] else "right")
    *clients, means = client_rows(per_client)
    for i, row in enumerate(clients):
        table.add_row(*row, end_section=i == len(clients) - 1)
    table.add_row(*means, style="bold")
    return table


def wall_time_row(summary: RunSummary) -> tuple[str, str]:
    """The command's time split into start-up, rounds and end of run; a run written before the
    split existed has only `wall_time_s`, which is mostly its rounds, and is labelled so."""
    if summary.startup_s is None or summary.rounds_s is None or summary.end_s is None:
        return "wall time (rounds)", f"{summary.wall_time_s:.1f} s"
    total = summary.startup_s + summary.rounds_s + summary.end_s
    return (
        "wall time",
        f"{total:.1f} s: start-up {summary.startup_s:.1f} s, rounds {summary.rounds_s:.1f} s, "
        f"end of run {summary.end_s:.1f} s",
    )
