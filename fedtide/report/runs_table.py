"""The runs table of a report (and report.csv): one row per run, the columns that some run has."""

from __future__ import annotations

import csv
import io

from fedtide.records.summary import PRIVACY_UNITS
from fedtide.report.blocks import TableBlock
from fedtide.report.runs import RunResult, metric_names, metric_text

# Runs whose clients are not in lockstep (`summary.per_client`): the means over clients of each one's own
# final accuracy and forgetting (`fedtide.report.streams`); "forgetting %" is that same mean there.
CLIENT_MEAN_COLUMNS = ("final accuracy % (client mean)", "forgetting % (client mean)")
# Each unit's σ, ε and δ side by side: a run with both levels has two guarantees, neither the run's.
UNIT_COLUMNS = {unit: (f"σ ({unit})", f"ε ({unit})", f"δ ({unit})") for unit in PRIVACY_UNITS}
RUN_COLUMNS = [
    "run", "method", "strategy", "DP level", *UNIT_COLUMNS["sample"], *UNIT_COLUMNS["client"], "ε lower",
    "final accuracy %", "forgetting %", "BWT %", *CLIENT_MEAN_COLUMNS, "attack AUC", "TPR@1%FPR %",
    "clients dropped", "wall time s",
]  # fmt: skip
PRIVACY_COLUMNS = ("DP level",)  # shown only when some run is private; a unit's columns when some run has it
FAULT_COLUMNS = ("clients dropped",)  # shown only when some run simulated faults
CANARY_COLUMNS = ("ε lower",)  # shown only when some run has a canary audit


def runs_table(runs: list[RunResult]) -> TableBlock:
    """The runs side by side, the user metrics' final values (`strategy.NAME`, `method.NAME`) last."""
    columns, rows = shown_columns(runs), [run_row(run) for run in runs]
    keep = [i for i, column in enumerate(RUN_COLUMNS) if column in columns]
    names = metric_names(runs)
    return TableBlock(
        columns + names,
        [[row[i] for i in keep] + [metric_text(run.final_metrics.get(name)) for name in names]
         for run, row in zip(runs, rows)],
    )  # fmt: skip


def shown_columns(runs: list[RunResult]) -> list[str]:
    hidden = set() if any(run.private for run in runs) else set(PRIVACY_COLUMNS)
    for unit, columns in UNIT_COLUMNS.items():
        hidden |= set() if any(unit in run.summary.units for run in runs) else set(columns)
    hidden |= set() if any(run.summary.faults for run in runs) else set(FAULT_COLUMNS)
    hidden |= set() if any(run.canary_audit for run in runs) else set(CANARY_COLUMNS)
    hidden |= set() if any(run.summary.per_client for run in runs) else set(CLIENT_MEAN_COLUMNS)
    return [column for column in RUN_COLUMNS if column not in hidden]


def run_row(run: RunResult) -> list[str]:
    """One line of the runs table, as printed (percentages with two decimals)."""
    summary, audit = run.summary, run.audit
    return [
        run.run_id,
        summary.method,
        summary.strategy,
        summary.privacy_level or "–",
        *(cell for unit in PRIVACY_UNITS for cell in unit_cells(run, unit)),
        epsilon_cell(run.canary_audit.epsilon_lower) if run.canary_audit else "–",
        pct(summary.final_average_accuracy),
        pct(summary.average_forgetting),
        pct(summary.bwt),
        pct(summary.per_client.mean_final_average_accuracy if summary.per_client else None),
        pct(summary.per_client.mean_average_forgetting if summary.per_client else None),
        number(audit.auc_max if audit else None),
        pct(audit.tpr_at_1pct_fpr_max if audit else None),
        str(summary.faults.clients_dropped) if summary.faults else "–",
        f"{summary.wall_time_s:.1f}",
    ]


def unit_cells(run: RunResult, unit: str) -> list[str]:
    """σ, ε and δ of `unit`: σ 0 and ε ∞ without DP; `no client ε` for a private run of another unit."""
    guarantee = run.summary.guarantee(unit)
    if guarantee is None:
        return ["0" if not run.private else "–", run.epsilon_text(unit), "–"]
    return [f"{run.noise_of(unit):.3g}", f"{guarantee.epsilon:.2f}", f"{guarantee.delta:.1e}"]


def runs_csv(runs: list[RunResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    table = runs_table(runs)
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buffer.getvalue()


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def epsilon_cell(value: float | None) -> str:
    return "∞" if value is None else f"{value:.2f}"
