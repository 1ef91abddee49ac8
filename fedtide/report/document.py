"""A report over finished runs: report.html (self-contained), report.md, report.csv, figures/*.png.

The report is built once as a list of blocks (headings, text, tables, figures) and
rendered twice, so the HTML and the Markdown always say the same thing. The HTML
embeds its PNGs as data URIs and links nothing outside itself: it can be mailed or
attached to a paper's supplement and opens offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from fedtide.records.summary import CLIENT, PRIVACY_UNITS, SAMPLE
from fedtide.report import figures
from fedtide.report.runs import (
    RunResult,
    SeedGroup,
    metric_names,
    metric_text,
    place_runs,
    seed_groups,
    series_labels,
)

HTML_FILE, MARKDOWN_FILE, CSV_FILE, FIGURES_DIR = "report.html", "report.md", "report.csv", "figures"
# Each unit's σ, ε and δ side by side: a run with both levels has two guarantees, neither the run's.
UNIT_COLUMNS = {unit: (f"σ ({unit})", f"ε ({unit})", f"δ ({unit})") for unit in PRIVACY_UNITS}
RUN_COLUMNS = [
    "run", "method", "strategy", "DP level", *UNIT_COLUMNS["sample"], *UNIT_COLUMNS["client"], "ε lower",
    "final accuracy %", "forgetting %", "BWT %", "attack AUC", "TPR@1%FPR %", "clients dropped", "wall time s",
]  # fmt: skip
PRIVACY_COLUMNS = ("DP level",)  # shown only when some run is private; a unit's columns when some run has it
FAULT_COLUMNS = ("clients dropped",)  # shown only when some run simulated faults
CANARY_COLUMNS = ("ε lower",)  # shown only when some run has a canary audit


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class TableBlock:
    columns: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    name: str
    caption: str
    png: bytes


Block = Heading | Text | TableBlock | Image


def write_report(
    runs: list[RunResult], output: Path, unfinished: list[Path] = (), privacy_unit: str | None = None
) -> Path:
    """Write the report of `runs` into `output`, comparing them at ε of `privacy_unit` (`place_runs`);
    returns the HTML file's path."""
    blocks = build_blocks(runs, unfinished, privacy_unit)
    output.mkdir(parents=True, exist_ok=True)
    (output / FIGURES_DIR).mkdir(exist_ok=True)
    for block in blocks:
        if isinstance(block, Image):
            _write_atomic(output / FIGURES_DIR / block.name, block.png)
    _write_atomic(output / MARKDOWN_FILE, render_markdown(blocks).encode())
    _write_atomic(output / CSV_FILE, _csv(runs).encode())
    _write_atomic(output / HTML_FILE, render_html(blocks).encode())
    return output / HTML_FILE


def build_blocks(runs: list[RunResult], unfinished: list[Path] = (), privacy_unit: str | None = None) -> list[Block]:
    """The report's content, in reading order: privacy sections only when some run is private.

    Runs are compared at ε of `privacy_unit`, else as `place_runs` places them."""
    runs = place_runs(runs, privacy_unit)
    blocks: list[Block] = [Heading(_title(runs), 1), Text(_preamble(runs, unfinished))]
    blocks += [Heading("Runs"), _runs_table(runs)]
    points = seed_groups(runs)
    if len(points) > 1:
        blocks += _comparison(points)
    if len(points) > 1 and any(run.private for run in runs):
        blocks += _privacy_utility(points)
    blocks += _audit(runs, points)
    blocks += _canary_audit(runs)
    blocks += [Heading("Each run")]
    for run in runs:
        blocks += _run_details(run)
    return blocks


def _runs_table(runs: list[RunResult]) -> TableBlock:
    """The runs side by side, the user metrics' final values (`strategy.NAME`, `method.NAME`) last."""
    columns, rows = _shown_columns(runs), [run_row(run) for run in runs]
    keep = [i for i, column in enumerate(RUN_COLUMNS) if column in columns]
    names = metric_names(runs)
    return TableBlock(
        columns + names,
        [[row[i] for i in keep] + [metric_text(run.final_metrics.get(name)) for name in names]
         for run, row in zip(runs, rows)],
    )  # fmt: skip


def _chosen_unit(runs: list[RunResult]) -> str | None:
    """The unit the report was asked to compare runs at (`place_runs` gave it to every run), else None."""
    return next((run.unit for run in runs if run.unit), None)


def _shown_columns(runs: list[RunResult]) -> list[str]:
    hidden = set() if any(run.private for run in runs) else set(PRIVACY_COLUMNS)
    for unit, columns in UNIT_COLUMNS.items():
        hidden |= set() if any(unit in run.summary.units for run in runs) else set(columns)
    hidden |= set() if any(run.summary.faults for run in runs) else set(FAULT_COLUMNS)
    hidden |= set() if any(run.canary_audit for run in runs) else set(CANARY_COLUMNS)
    return [column for column in RUN_COLUMNS if column not in hidden]


def run_row(run: RunResult) -> list[str]:
    """One line of the runs table, as printed (percentages with two decimals)."""
    summary, audit = run.summary, run.audit
    return [
        run.run_id,
        summary.method,
        summary.strategy,
        summary.privacy_level or "–",
        *(cell for unit in PRIVACY_UNITS for cell in _unit_cells(run, unit)),
        _epsilon(run.canary_audit.epsilon_lower) if run.canary_audit else "–",
        _pct(summary.final_average_accuracy),
        _pct(summary.average_forgetting),
        _pct(summary.bwt),
        _number(audit.auc_max if audit else None),
        _pct(audit.tpr_at_1pct_fpr_max if audit else None),
        str(summary.faults.clients_dropped) if summary.faults else "–",
        f"{summary.wall_time_s:.1f}",
    ]


def _unit_cells(run: RunResult, unit: str) -> list[str]:
    """σ, ε and δ of `unit`: σ 0 and ε ∞ without DP; `no client ε` for a private run of another unit."""
    guarantee = run.summary.guarantee(unit)
    if guarantee is None:
        return ["0" if not run.private else "–", run.epsilon_text(unit), "–"]
    return [f"{run.noise_of(unit):.3g}", f"{guarantee.epsilon:.2f}", f"{guarantee.delta:.1e}"]


def _title(runs: list[RunResult]) -> str:
    if len(runs) == 1:
        return f"fedtide report: {runs[0].run_id}"
    sources = dict.fromkeys(run.run_id.split("/")[0] for run in runs)
    return f"fedtide report: {', '.join(sources)} ({len(runs)} runs)"


def _preamble(runs: list[RunResult], unfinished: list[Path]) -> str:
    text = (
        f"Generated {date.today().isoformat()} from {len(runs)} finished run(s). Accuracy is the global model's "
        "test accuracy; forgetting and BWT follow Avalanche's definitions over the accuracy matrix."
    )
    if any(run.private for run in runs):
        text += " " + _units_text(runs)
    if unfinished:
        text += f" Left out, unfinished (no summary.json): {', '.join(p.name for p in unfinished)}."
    return text


def _units_text(runs: list[RunResult]) -> str:
    """What each ε of the report is a guarantee about, and which one the runs are compared at."""
    relations = {
        unit: sorted({f"{g.neighbouring}, {g.sampled_by}" for run in runs if (g := run.summary.guarantee(unit))})
        for unit in PRIVACY_UNITS
    }
    text = "Every ε names its unit and its neighbouring relation."
    if relations[SAMPLE]:
        text += (
            " ε (sample) is sample-level DP-SGD's, each client by its own accountant on its own dataset, the largest "
            f"over clients: {'; '.join(relations[SAMPLE])}."
        )
    if relations[CLIENT]:
        text += (
            f" ε (client) is the server's over its noisy aggregates (client-level DP): {'; '.join(relations[CLIENT])}."
        )
    if any(len(run.summary.units) > 1 for run in runs):
        text += " A run with both levels has both ε's, side by side: neither bounds the other."
    placed = {run.placed_unit for run in runs if run.private} - {None}
    if len(runs) > 1 and placed:
        unit = _chosen_unit(runs)
        if unit:
            text += f" Runs are compared at ε ({unit})"
            unplaced = [run.run_id for run in runs if not run.placed]
            text += (
                f"; runs with no {unit}-level ε are in the tables as \"no {unit} ε\" and on no ε axis: "
                f"{', '.join(unplaced)}." if unplaced else "."
            )
        elif len(placed) > 1:
            text += (
                " Sample- and client-level runs are separate series, each at the ε of its own unit; "
                "report.privacy_unit (fedtide report --privacy-unit) compares all at one."
            )
        else:
            text += f" Runs are compared at ε ({placed.pop()})."
    return text


def _comparison(points: list[SeedGroup]) -> list[Block]:
    """Every series and setting side by side, private or not: what a method sweep is for."""
    names = _scalar_metrics(points)
    columns = ["series", "privacy", "final accuracy %", "forgetting %", "BWT %", *names, "seeds"]
    rows = [
        [
            point.series,
            _privacy_cell(point),
            _mean_std(point, "final_average_accuracy", 100, "{:.2f}"),
            _mean_std(point, "average_forgetting", 100, "{:.2f}"),
            _mean_std(point, "bwt", 100, "{:.2f}"),
            *(_metric_mean_std(point, name) for name in names),
            str(len(point.runs)),
        ]
        for point in points
    ]
    return [
        Heading("Comparison"),
        Text("Each row pools the runs that differ only in their seed: mean ± standard deviation (n/a for one run)."),
        Image("comparison.png", "Final average accuracy and forgetting per series, mean ± std over seeds", _png(
            figures.comparison_figure(points))),
        TableBlock(columns, rows),
    ]  # fmt: skip


def _privacy_cell(point: SeedGroup) -> str:
    """`ε 1.23 ± 0.01 (sample)`, `none` without DP, `no client ε` for a point of another unit."""
    if not point.private:
        return "none"
    if not point.placed:
        return point.runs[0].epsilon_text()
    return f"ε {_mean_std(point, 'epsilon', 1, '{:.2f}')} ({point.unit})"


def _privacy_utility(points: list[SeedGroup]) -> list[Block]:
    names = _scalar_metrics(points)
    columns = ["series", "unit", "noise σ", "ε", "final accuracy %", "forgetting %", "attack AUC", *names, "seeds"]
    rows = []
    for point in points:
        noise = point.runs[0].noise_of(point.unit) if point.unit else None
        placed = point.private and point.placed  # else ∞ (no DP) or no ε of the report's unit
        epsilon = _mean_std(point, "epsilon", 1, "{:.2f}") if placed else point.runs[0].epsilon_text()
        rows.append(
            [
                point.series,
                point.unit or "–",
                "–" if noise is None else f"{noise:.3g}",
                epsilon,
                _mean_std(point, "final_average_accuracy", 100, "{:.2f}"),
                _mean_std(point, "average_forgetting", 100, "{:.2f}"),
                _mean_std(point, "auc_max", 1, "{:.3f}"),
                *(_metric_mean_std(point, name) for name in names),
                str(len(point.runs)),
            ]
        )
    return [
        Heading("Privacy-utility"),
        Text("Each point pools the runs that differ only in their seed: mean ± standard deviation (n/a for one run)."),
        Image("utility_vs_epsilon.png", "Final average accuracy and forgetting against ε", _png(
            figures.utility_figure(points))),
        TableBlock(columns, rows),
    ]


def _audit(runs: list[RunResult], points: list[SeedGroup]) -> list[Block]:
    private = [run for run in runs if run.private]
    text = (
        "A loss-threshold membership-inference attack on the final global model: for each client, its "
        "training samples (members) against held-out test samples of the same classes in the same numbers "
        "(non-members). AUC 0.5 means the attacker learns nothing."
    )
    if private:
        text += (
            " (ε, δ)-DP caps the true-positive rate at 1% false positives at e^ε·1% + δ, for an ε of unit sample "
            "(the attack tests one sample's membership; a client-level ε under add/remove bounds one sample only "
            "through group privacy). The bound holds for every attack; the measured values show what this attack "
            "gets."
        )
    blocks: list[Block] = [Heading("Empirical privacy audit"), Text(text)]
    placed = [run for run in private if run.placed]
    if len(points) > 1 and placed:
        delta = max((run.delta for run in placed if run.placed_unit == SAMPLE), default=0.0)  # the bound's
        blocks.append(Image("audit_vs_epsilon.png", "Attack success against ε", _png(
            figures.audit_figure(points, delta))))
    if not private:  # without DP there is no bound to hold the attack against: the runs table has it
        blocks.append(Text("Each run's attack AUC and TPR (worst client) are in the runs table above."))
        return blocks
    # the attack guesses samples' membership: each client's own sample-level ε is the bound that speaks of it
    columns = ["run", "client", "members", "non-members", "AUC", "TPR@1%FPR %", "ε (sample, this client)"]
    rows = []
    for run in runs:
        epsilons = run.summary.privacy.epsilon_per_client if run.summary.privacy else {}
        for client, result in (run.audit.per_client if run.audit else {}).items():
            # a client that never trained spent nothing
            epsilon = _epsilon(epsilons.get(client, 0.0)) if run.summary.privacy else run.epsilon_text(SAMPLE)
            rows.append([
                run.run_id, client, str(result.members), str(result.nonmembers), _number(result.auc),
                _pct(result.tpr_at_1pct_fpr), epsilon,
            ])  # fmt: skip
    if rows:
        blocks.append(TableBlock(columns, rows))
    return blocks


def _canary_audit(runs: list[RunResult]) -> list[Block]:
    """Each run's lower bound on ε from its canaries beside its accountant's ε; a figure for several runs."""
    audited = [run for run in runs if run.canary_audit]
    if not audited:
        return []
    text = (
        "Canaries (Steinke, Nasr & Jagielski 2023): held-out test images with a wrong label, each put into one "
        "client's training data by a fair coin. The final model scores each canary (log-probability of its label "
        "minus that of its image's class); the auditor guesses \"in\" for the highest scores and \"out\" for the "
        "lowest, and its right guesses give the largest ε that (ε, δ)-DP could not have produced, at the stated "
        "confidence (several guess plans fixed in advance share it: a union bound). ε lower is a lower bound, "
        "ε (a canary) the accountant's upper bound for one canary's coin: the sample-level ε, or the client-level "
        "ε through group privacy (2ε at δ(1 + e^ε) under add/remove; ε under replace-one). ε lower above it would "
        "mean the accountant is wrong. A non-private run is audited at the δ a DP run of its scenario would use. "
        "The ceiling is the largest ε lower the canaries could show, every guess right, set by their number, δ "
        "and the confidence alone: where it is not above ε, the audit could not have detected a violation of ε."
    )
    columns = [
        "run", "canaries", "in", "guesses in/out", "right", "confidence", "δ", "ε lower", "ceiling", "ε (a canary)"
    ]  # fmt: skip
    rows = [
        [
            run.run_id, str(audit.canaries), str(audit.included), f"{audit.guesses_in}/{audit.guesses_out}",
            f"{audit.correct}/{audit.guesses}", f"{audit.confidence:.0%}", f"{audit.delta:.1e}",
            _epsilon(audit.epsilon_lower), "–" if audit.epsilon_ceiling is None else _epsilon(audit.epsilon_ceiling),
            "–" if audit.epsilon_audited is None else _epsilon(audit.epsilon_audited),
        ]  # fmt: skip
        for run in audited
        if (audit := run.canary_audit)
    ]
    blocks: list[Block] = [Heading("Canary audit: a lower bound on ε", 3), Text(text)]
    if len(audited) > 1:
        labels = series_labels(runs)
        title = "ε lower bound (canary audit) against the ε that protects a canary"
        blocks.append(Image("canary_epsilon.png", title, _png(figures.canary_figure(audited, labels))))
    blocks.append(TableBlock(columns, rows))
    blind = [run.run_id for run in audited if run.canary_audit.blind_at(run.canary_audit.epsilon_audited)]
    if blind:
        blocks.append(Text(
            f"Could not have detected a violation at their ε (ceiling not above ε): {', '.join(blind)}."
        ))  # fmt: skip
    return blocks


def _run_details(run: RunResult) -> list[Block]:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "__", run.run_id)
    summary = run.summary
    matrix = summary.accuracy_matrix
    blocks: list[Block] = [
        Heading(run.run_id, 3),
        Text(
            f"{summary.strategy} + {summary.method}, {summary.num_clients} clients, "
            f"{summary.n_experiences} experiences (classes {summary.classes_per_experience}), "
            f"{summary.rounds} rounds, seed {summary.seed}; clients failed: {summary.clients_failed}"
            + (f"; dropped by simulated faults: {summary.faults.describe()}." if summary.faults else ".")
            + _parameters(run)
            + _client_epsilons(run)
        ),
        TableBlock(
            ["after", *(f"exp {j}" for j in range(len(matrix)))],
            [[f"exp {e}", *(_pct(a) for a in row), *([""] * (len(matrix) - len(row)))] for e, row in
             enumerate(matrix)],
        ),
        Image(f"{stem}-accuracy_matrix.png", "Accuracy matrix", _png(figures.accuracy_matrix_figure(run))),
        Image(f"{stem}-accuracy_rounds.png", "Accuracy per experience over rounds", _png(
            figures.accuracy_over_rounds_figure(run))),
    ]  # fmt: skip
    if run.private:
        blocks.append(Image(f"{stem}-epsilon.png", "ε over rounds", _png(figures.epsilon_figure(run))))
    if any(run.metric_per_round(name) for name in run.final_metrics):
        blocks.append(Image(f"{stem}-user_metrics.png", "The strategy's and the method's metrics over rounds", _png(
            figures.user_metrics_figure(run))))
    return blocks


def render_html(blocks: list[Block]) -> str:
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, TableBlock):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(block.png).decode()
            caption = html.escape(block.caption)
            body.append(
                f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}'
                "</figcaption></figure>"
            )
    title = html.escape(next(b.text for b in blocks if isinstance(b, Heading)))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def render_markdown(blocks: list[Block]) -> str:
    lines = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, TableBlock):
            lines.append("| " + " | ".join(block.columns) + " |")
            lines.append("|" + "---|" * len(block.columns))
            lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            lines.append("")
        else:
            lines += [f"![{block.caption}]({FIGURES_DIR}/{block.name})", ""]
    return "\n".join(lines)


def _csv(runs: list[RunResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    table = _runs_table(runs)
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buffer.getvalue()


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` whole, so an interrupted report never leaves a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _parameters(run: RunResult) -> str:
    """The components' parameters as the run was given them (the scenario's own values)."""
    continual = {k: v for k, v in run.scenario.get("continual", {}).items() if k != "method"}
    strategy = {k: v for k, v in run.scenario.get("federation", {}).get("strategy", {}).items() if k != "name"}
    parts = [
        f"{label} parameters: {', '.join(f'{k}={v}' for k, v in params.items())}"
        for label, params in (("method", continual), ("strategy", strategy))
        if params
    ]
    return f" {'; '.join(parts)}." if parts else ""


def _client_epsilons(run: RunResult) -> str:
    """Each client's sample-level ε is its own guarantee: the largest and smallest, never a mean of them."""
    spent = run.summary.privacy.epsilon_per_client if run.summary.privacy else {}
    if not spent:
        return ""
    high, low = max(spent, key=spent.get), min(spent, key=spent.get)
    return (
        f" ε (sample) over its {len(spent)} clients: max {spent[high]:.2f} (client {high}), "
        f"min {spent[low]:.2f} (client {low})."
    )


def _scalar_metrics(points: list[SeedGroup]) -> list[str]:
    """The user metrics a seed group can average: those no run gives as a list."""
    runs = [run for point in points for run in point.runs]
    return [name for name in metric_names(runs) if not any(isinstance(r.final_metrics.get(name), list) for r in runs)]


def _metric_mean_std(point: SeedGroup, name: str) -> str:
    """A user metric's mean ± std over the point's seeds; `–` where none of its runs has it."""
    return "–" if math.isnan(point.mean_std(name)[0]) else _mean_std(point, name, 1, "{:.4g}")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _epsilon(value: float | None) -> str:
    return "∞" if value is None else f"{value:.2f}"


def _mean_std(point: SeedGroup, value: str, scale: float, form: str) -> str:
    """`61.75 ± 1.20` over seeds; `61.75 ± n/a` for one run, whose spread is unknown rather than 0."""
    mean, std = point.mean_std(value)
    spread = form.format(scale * std) if point.spread_known(value) else "n/a"
    return f"{form.format(scale * mean)} ± {spread}"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
    "td:first-child,th:first-child{text-align:left}"
    "figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}"
    "h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"
)
