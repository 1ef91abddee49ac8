"""A report over finished runs: report.html (self-contained), report.md, report.csv, figures/*.png.

This module says what the report holds, section by section, as a list of blocks; the
blocks and their HTML and Markdown renderings are `fedtide.report.blocks`, the runs
table (also report.csv) is `fedtide.report.runs_table`, the blocks of runs whose clients
are not in lockstep `fedtide.report.stream_blocks`.
"""

from __future__ import annotations

import math
import re
from datetime import date
from pathlib import Path

from fedtide.records.summary import CLIENT, PRIVACY_UNITS, SAMPLE
from fedtide.report import figures
from fedtide.report.blocks import (
    FIGURES_DIR,
    Block,
    Heading,
    Image,
    TableBlock,
    Text,
    png,
    render_html,
    render_markdown,
    write_atomic,
)
from fedtide.report.runs import (
    RunResult,
    SeedGroup,
    metric_names,
    place_runs,
    seed_groups,
    series_labels,
)
from fedtide.report.runs_table import epsilon_cell, number, pct, runs_csv, runs_table
from fedtide.report.stream_blocks import client_blocks, forgetting_comparison, stage_matrix_table
from fedtide.report.streams import streams_text

HTML_FILE, MARKDOWN_FILE, CSV_FILE = "report.html", "report.md", "report.csv"


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
            write_atomic(output / FIGURES_DIR / block.name, block.png)
    write_atomic(output / MARKDOWN_FILE, render_markdown(blocks).encode())
    write_atomic(output / CSV_FILE, runs_csv(runs).encode())
    write_atomic(output / HTML_FILE, render_html(blocks).encode())
    return output / HTML_FILE


def build_blocks(runs: list[RunResult], unfinished: list[Path] = (), privacy_unit: str | None = None) -> list[Block]:
    """The report's content, in reading order: privacy sections only when some run is private.

    Runs are compared at ε of `privacy_unit`, else as `place_runs` places them."""
    runs = place_runs(runs, privacy_unit)
    blocks: list[Block] = [Heading(_title(runs), 1), Text(_preamble(runs, unfinished))]
    blocks += [Heading("Runs"), runs_table(runs)]
    points = seed_groups(runs)
    if len(points) > 1:
        blocks += _comparison(points) + forgetting_comparison(points)
    if len(points) > 1 and any(run.private for run in runs):
        blocks += _privacy_utility(points)
    blocks += _audit(runs, points)
    blocks += _canary_audit(runs)
    blocks += [Heading("Each run")]
    for run in runs:
        blocks += _run_details(run)
    return blocks


def _chosen_unit(runs: list[RunResult]) -> str | None:
    """The unit the report was asked to compare runs at (`place_runs` gave it to every run), else None."""
    return next((run.unit for run in runs if run.unit), None)


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
    text += streams_text(runs)
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
        Image("comparison.png", "Final average accuracy and forgetting per series, mean ± std over seeds", png(
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
    """ε against utility, a point per seed group. Runs whose clients are not in lockstep fit as they are:
    their summary's `average_forgetting` is already the mean over clients of each one's own forgetting
    (`per_client.mean_average_forgetting`), and `final_average_accuracy` the final global model's mean
    over every experience (`fedtide.report.streams`)."""
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
        Image("utility_vs_epsilon.png", "Final average accuracy and forgetting against ε", png(
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
        blocks.append(Image("audit_vs_epsilon.png", "Attack success against ε", png(
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
            epsilon = epsilon_cell(epsilons.get(client, 0.0)) if run.summary.privacy else run.epsilon_text(SAMPLE)
            rows.append([
                run.run_id, client, str(result.members), str(result.nonmembers), number(result.auc),
                pct(result.tpr_at_1pct_fpr), epsilon,
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
            epsilon_cell(audit.epsilon_lower),
            "–" if audit.epsilon_ceiling is None else epsilon_cell(audit.epsilon_ceiling),
            "–" if audit.epsilon_audited is None else epsilon_cell(audit.epsilon_audited),
        ]  # fmt: skip
        for run in audited
        if (audit := run.canary_audit)
    ]
    blocks: list[Block] = [Heading("Canary audit: a lower bound on ε", 3), Text(text)]
    if len(audited) > 1:
        labels = series_labels(runs)
        title = "ε lower bound (canary audit) against the ε that protects a canary"
        blocks.append(Image("canary_epsilon.png", title, png(figures.canary_figure(audited, labels))))
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
        _matrix_table(run),
        Image(f"{stem}-accuracy_matrix.png", "Accuracy matrix", png(figures.accuracy_matrix_figure(run))),
        Image(f"{stem}-accuracy_rounds.png", "Accuracy per experience over rounds", png(
            figures.accuracy_over_rounds_figure(run))),
    ]  # fmt: skip
    if summary.per_client:
        blocks += client_blocks(run, stem)
    if run.private:
        blocks.append(Image(f"{stem}-epsilon.png", "ε over rounds", png(figures.epsilon_figure(run))))
    if any(run.metric_per_round(name) for name in run.final_metrics):
        blocks.append(Image(f"{stem}-user_metrics.png", "The strategy's and the method's metrics over rounds", png(
            figures.user_metrics_figure(run))))
    return blocks


def _matrix_table(run: RunResult) -> TableBlock:
    """Lockstep: lower-triangular, row e after experience e; out of lockstep a full row per stage."""
    matrix = run.summary.accuracy_matrix
    if run.summary.per_client:
        return stage_matrix_table(run)
    return TableBlock(
        ["after", *(f"exp {j}" for j in range(len(matrix)))],
        [[f"exp {e}", *(pct(a) for a in row), *([""] * (len(matrix) - len(row)))] for e, row in enumerate(matrix)],
    )


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


def _mean_std(point: SeedGroup, value: str, scale: float, form: str) -> str:
    """`61.75 ± 1.20` over seeds; `61.75 ± n/a` for one run, whose spread is unknown rather than 0."""
    mean, std = point.mean_std(value)
    spread = form.format(scale * std) if point.spread_known(value) else "n/a"
    return f"{form.format(scale * mean)} ± {spread}"


