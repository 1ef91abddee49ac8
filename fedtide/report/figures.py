"""The report's plots, drawn with matplotlib from finished runs.

Each function returns a Figure; `document.py` decides where the PNG goes. A
non-private run has ε = ∞: privacy-utility plots put it at the right edge of a log
ε axis under the tick "no DP", so the cost of privacy reads off as a gap. Every ε axis
names its unit; a point with no ε of the report's unit (`SeedGroup.placed`) is on none.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedtide.records.summary import LOW_FPR, SAMPLE, PerClientSummary  # noqa: E402
from fedtide.report.runs import RunResult, SeedGroup  # noqa: E402
from fedtide.report.streams import (  # noqa: E402
    first_rounds,
    joiners,
    run_rounds_per_stage,
    sorted_clients,
    stage_label,
    stage_spans,
)

_UNIT_AXIS = {SAMPLE: "sample: max over clients", "client": "client"}


def epsilon_axis_label(units: set[str | None], what: str = "ε spent") -> str:
    """`ε spent (unit sample: max over clients)`; series of two units each in their own."""
    units = sorted(units - {None})
    if len(units) == 1:
        return f"{what} (unit {_UNIT_AXIS[units[0]]})"
    return f"{what}, each series in its own unit ({'; '.join(_UNIT_AXIS[u] for u in units)})"


def accuracy_matrix_figure(run: RunResult) -> Figure:
    """A[e][j], accuracy on experience j after training experience e, as a heatmap (out of lockstep, after stage e)."""
    matrix = run.summary.accuracy_matrix
    size, width = len(matrix), max(len(row) for row in matrix)  # clients out of lockstep: a full row per stage
    grid = np.full((size, width), np.nan)
    for e, row in enumerate(matrix):
        grid[e, : len(row)] = 100 * np.asarray(row)
    labels = 0.0 if run.summary.per_client is None else 1.6  # out of lockstep, a row's label names its rounds
    figure, axes = plt.subplots(figsize=(1.1 * width + 2.2 + labels, 0.9 * size + 1.6))
    image = axes.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for e, row in enumerate(matrix):
        for j in range(len(row)):
            axes.text(j, e, f"{grid[e, j]:.0f}", ha="center", va="center", color="white" if grid[e, j] < 60 else "k")
    axes.set_xticks(range(width), [f"exp {j}" for j in range(width)])
    if run.summary.per_client is None:
        axes.set_yticks(range(size), [f"after {e}" for e in range(size)])
        axes.set_title(f"{run.run_id}: accuracy matrix (%)", fontsize=9)
    else:  # a row per stage: name it by its rounds
        spans = stage_spans(run.summary, run_rounds_per_stage(run))
        axes.set_yticks(range(size), [f"after {stage_label(s, span)}" for s, span in enumerate(spans)])
        axes.set_title(f"{run.run_id}: global accuracy matrix (%), a row per stage", fontsize=9)
    axes.set_xlabel("tested on")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    return figure


def accuracy_over_rounds_figure(run: RunResult) -> Figure:
    """Global accuracy on each experience's test data after every round; dotted lines end experiences.

    Out of lockstep the dotted lines end stages, a solid line is the accuracy on the classes
    some client has begun (`seen_accuracy`), the dashed mean is over every experience, and a
    vertical mark stands at each round where a client arrives: red where it joins with
    experiences no one before it holds (`streams.joiners`), green where it only starts late.
    """
    rounds, per_client = run.rounds, run.summary.per_client
    figure, axes = plt.subplots(figsize=(6.4 if per_client is None else 8.4, 3.4))
    for j in range(run.summary.n_experiences):
        seen = [(r.round, 100 * r.accuracy[j]) for r in rounds if len(r.accuracy) > j]
        if seen:
            axes.plot(*zip(*seen), marker=".", label=f"exp {j}")
    mean = "mean" if per_client is None else "mean, every experience"
    axes.plot([r.round for r in rounds], [100 * r.mean_accuracy for r in rounds], "k--", lw=1.5, label=mean)
    for boundary in stage_boundaries(run):
        axes.axvline(boundary + 0.5, color="grey", ls=":", lw=1)
    axes.set_xlabel("global round")
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(0, 100)
    if per_client is None:
        axes.set_title(f"{run.run_id}: accuracy per experience", fontsize=9)
        axes.legend(fontsize=7, ncol=2, loc="upper right")
    else:
        seen = [(r.round, 100 * r.seen_accuracy) for r in rounds if r.seen_accuracy is not None]
        if seen:
            axes.plot(*zip(*seen), "k-", lw=2, label="classes seen by any client")
        _mark_arrivals(axes, per_client)
        stages = f"dotted: stages of {run_rounds_per_stage(run)} rounds"
        axes.set_title(f"{run.run_id}: accuracy per experience ({stages})", fontsize=9)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return figure


def stage_boundaries(run: RunResult) -> list[int]:
    """The last round of every stage but the last: in lockstep, of every experience but the last."""
    per = run_rounds_per_stage(run)
    return list(range(per, run.summary.rounds, per))


def _mark_arrivals(axes, per_client: PerClientSummary) -> None:
    """A vertical line at each round where some client starts its first experience after the run's start."""
    starts, joined = first_rounds(per_client), set(joiners(per_client))
    arriving: dict[int, list[str]] = {}
    for client in sorted_clients(per_client):
        if starts[client] > min(starts.values()):
            arriving.setdefault(starts[client], []).append(client)
    for round_, clients in sorted(arriving.items()):
        joins = any(client in joined for client in clients)
        color = "tab:red" if joins else "tab:green"
        axes.axvline(round_, color=color, ls="-" if joins else "--", lw=1, alpha=0.6)
        words = [f"{client} {'joins' if client in joined else 'starts'}" for client in clients]
        axes.text(round_, 98, "client " + ", ".join(words), rotation=90, va="top", ha="right", fontsize=6, color=color)
    if arriving:
        axes.plot([], [], color="tab:green", ls="--", lw=1, label="a client starts late")
    if joined:
        axes.plot([], [], color="tab:red", lw=1, label="a client joins, new experiences")


def client_forgetting_figure(groups: list[tuple[str, list[tuple[str, float]]]]) -> Figure:
    """Each client's average forgetting, a box per group (a run, or a series' seeds pooled), a point per client.

    `groups` are (label, [(client, forgetting)]), drawn top to bottom; a lone group names each
    point by its client. The diamond is the mean of the group's points.
    """
    figure, axes = plt.subplots(figsize=(8.0, 2.0 + 0.6 * len(groups)))
    values = [[100 * f for _, f in points] for _, points in groups]
    axes.boxplot(values, positions=range(len(groups)), widths=0.5, orientation="horizontal", showfliers=False,
                 medianprops={"color": "grey"})  # fmt: skip
    for i, ((_, points), xs) in enumerate(zip(groups, values)):
        ys = i + (np.linspace(-0.12, 0.12, len(xs)) if len(xs) > 1 else np.zeros(1))
        axes.scatter(xs, ys, s=18, color="tab:blue", alpha=0.8, zorder=3, label="a client" if i == 0 else None)
        if len(groups) == 1:
            for x, y, (client, _) in zip(xs, ys, points):
                axes.annotate(f"client {client}", (x, y), xytext=(0, 6), textcoords="offset points", fontsize=7,
                              ha="center")  # fmt: skip
        label = "mean over clients" if i == 0 else None
        axes.scatter([np.mean(xs)], [i], marker="D", s=40, color="tab:red", zorder=4, label=label)
    axes.axvline(0, color="grey", ls=":", lw=0.8)
    axes.set_yticks(range(len(groups)), [textwrap.fill(label, 40) for label, _ in groups], fontsize=8)
    axes.set_ylim(len(groups) - 0.5, -0.5)
    axes.set_xlabel("average forgetting (%), each client over its own experiences")
    axes.set_title("Forgetting of each client", fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def epsilon_figure(run: RunResult) -> Figure:
    """Cumulative ε of each client after every round (a client not sampled keeps its value), and client-level ε."""
    spent = [(r.round, r.privacy.epsilon_per_client) for r in run.rounds if r.privacy]
    clients = sorted({c for _, per_client in spent for c in per_client}, key=int)
    figure, axes = plt.subplots(figsize=(6.4, 3.2))
    for client in clients:
        # a client enters the record when first sampled (fraction_train < 1 leaves some out at first)
        points = [(round_, per_client[client]) for round_, per_client in spent if client in per_client]
        axes.plot(*zip(*points), marker=".", lw=1, label=f"client {client} (unit sample)")
    client_level = [(r.round, r.client_level.epsilon) for r in run.rounds if r.client_level]
    if client_level:
        axes.plot(*zip(*client_level), color="black", marker="s", lw=2, label="unit client (server)")
    privacy, level = run.summary.privacy, run.summary.client_level
    for target in {privacy.target_epsilon if privacy else None, level.target_epsilon if level else None} - {None}:
        axes.axhline(target, color="red", ls="--", lw=1, label="target ε")
    axes.set_xlabel("global round")
    axes.set_ylabel("ε spent")
    deltas = [f"{name} δ={d.delta:.1e}" for name, d in (("sample", privacy), ("client", level)) if d]
    axes.set_title(f"{run.run_id}: ε per client ({', '.join(deltas)})", fontsize=9)
    if len(clients) <= 12:
        axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def user_metrics_figure(run: RunResult) -> Figure:
    """Each of the strategy's and the method's metrics after every round, one panel each; dotted lines
    end experiences (out of lockstep, stages). A metric given as a list of numbers has no line."""
    names = [name for name in run.final_metrics if run.metric_per_round(name)]
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, panels = plt.subplots(rows, columns, figsize=(3.6 * columns + 0.6, 2.6 * rows + 0.4), squeeze=False)
    for axes, name in zip(panels.flat, names):
        axes.plot(*zip(*run.metric_per_round(name)), marker=".")
        for boundary in stage_boundaries(run):
            axes.axvline(boundary + 0.5, color="grey", ls=":", lw=1)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("global round", fontsize=8)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in list(panels.flat)[len(names) :]:
        axes.set_visible(False)
    figure.suptitle(f"{run.run_id}: the strategy's and the method's metrics", fontsize=9)
    figure.tight_layout()
    return figure


_ROUND_TICKS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def _no_dp_x(points: list[SeedGroup]) -> float:
    """The x that stands for ε = ∞ (no DP): well right of the largest finite ε."""
    finite = [p.mean_std("epsilon")[0] for p in points if p.private]
    return 3 * max(finite) if finite else 10.0


def _curves(axes, points: list[SeedGroup], value: str, scale: float) -> None:
    points = [p for p in points if p.placed]
    no_dp_x = _no_dp_x(points)
    for series in dict.fromkeys(p.series for p in points):
        mine = [p for p in points if p.series == series]
        xs = [p.mean_std("epsilon")[0] if p.private else no_dp_x for p in mine]
        stats = [p.mean_std(value) for p in mine]
        axes.errorbar(
            xs, [scale * m for m, _ in stats], yerr=[scale * s for _, s in stats], marker="o", capsize=3, label=series
        )
    axes.set_xscale("log")
    finite = [p.mean_std("epsilon")[0] for p in points if p.private]
    ticks = [t for t in _ROUND_TICKS if finite and min(finite) / 1.5 <= t <= max(finite) * 1.5]
    axes.set_xticks([*ticks, no_dp_x], [*(f"{t:g}" for t in ticks), "no DP"])
    axes.minorticks_off()
    axes.set_xlabel(epsilon_axis_label({p.unit for p in points}))


def utility_figure(points: list[SeedGroup]) -> Figure:
    """Final average accuracy and average forgetting against ε, mean ± std over seeds."""
    figure, (accuracy, forgetting) = plt.subplots(1, 2, figsize=(11, 4))
    _curves(accuracy, points, "final_average_accuracy", 100)
    accuracy.set_ylabel("final average accuracy (%)")
    _curves(forgetting, points, "average_forgetting", 100)
    forgetting.set_ylabel("average forgetting (%)")
    accuracy.legend(fontsize=8)
    figure.suptitle("Privacy-utility: mean ± std over seeds", fontsize=10)
    figure.tight_layout()
    return figure


def comparison_figure(points: list[SeedGroup]) -> Figure:
    """Final average accuracy and forgetting per point (series, and ε where private), mean ± std over seeds."""
    labels = [p.series + (f"\n{_epsilon_label(p)}" if p.private else "") for p in points]
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.9 + 0.45 * len(points)), sharey=True)
    for ax, (value, title) in zip(axes, (("final_average_accuracy", "final average accuracy (%)"),
                                         ("average_forgetting", "average forgetting (%)"))):  # fmt: skip
        stats = [p.mean_std(value) for p in points]
        ax.barh(range(len(points)), [100 * m for m, _ in stats], xerr=[100 * s for _, s in stats], capsize=3)
        ax.set_xlabel(title)
    axes[0].set_yticks(range(len(points)), labels, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle("Series compared: mean ± std over seeds", fontsize=10)
    figure.tight_layout()
    return figure


def _epsilon_label(point: SeedGroup) -> str:
    return f"ε {point.mean_std('epsilon')[0]:.2g} ({point.unit})" if point.placed else f"no {point.unit} ε"


def audit_figure(points: list[SeedGroup], delta: float) -> Figure:
    """Measured membership leakage against ε, with what (ε, δ)-DP allows at 1% FPR."""
    figure, (auc, tpr) = plt.subplots(1, 2, figsize=(11, 4))
    _curves(auc, points, "auc_max", 1)
    auc.axhline(0.5, color="grey", ls=":", lw=1)
    auc.set_ylabel("attack AUC (worst client)")
    _curves(tpr, points, "tpr_at_1pct_fpr_max", 100)
    # the attack tests one sample's membership: e^ε·1% + δ bounds it at a sample-level ε
    finite = sorted({p.mean_std("epsilon")[0] for p in points if p.private and p.placed and p.unit == SAMPLE})
    if finite:
        grid = np.geomspace(min(finite), max(finite), 50)
        bound = [100 * min(1.0, math.exp(eps) * LOW_FPR + delta) for eps in grid]
        tpr.plot(grid, bound, color="red", ls="--", lw=1, label="DP bound e^ε·1% + δ (ε of unit sample)")
        tpr.legend(fontsize=8)
    tpr.set_ylabel("attack TPR at 1% FPR (%, worst client)")
    auc.legend(fontsize=8)
    figure.suptitle("Empirical privacy audit: loss-threshold membership inference", fontsize=10)
    figure.tight_layout()
    return figure


def canary_figure(runs: list[RunResult], series: dict[str, str]) -> Figure:
    """Each run's ε lower bound (canary audit) against the ε that protects a canary, with the line ε_lower = ε.

    A point above the line would mean the accountant is beaten. A dash above each point marks
    its audit's ceiling (the most it could show: every guess right); a point whose dash is
    not above the line could not have crossed it. Non-private runs (ε = ∞) stand at the
    right, under the tick "no DP"; `series` labels each run (by run id).
    """
    finite = [e for run in runs if (e := run.canary_audit.epsilon_audited) is not None]
    lowers = [run.canary_audit.epsilon_lower for run in runs]
    ceilings = [c for run in runs if (c := run.canary_audit.epsilon_ceiling) is not None]
    reach = max([*finite, *lowers, 1.0])
    no_dp_x = 1.4 * reach if finite else 1.0
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    line_end = max(finite, default=reach)
    axes.plot([0, line_end], [0, line_end], color="red", ls="--", lw=1, label="ε lower = ε (above: accountant beaten)")
    for name in dict.fromkeys(series[run.run_id] for run in runs):
        mine = [run for run in runs if series[run.run_id] == name]
        xs = [no_dp_x if (e := run.canary_audit.epsilon_audited) is None else e for run in mine]
        lows = [run.canary_audit.epsilon_lower for run in mine]
        color = axes.scatter(xs, lows, label=name, zorder=3).get_facecolor()[0]
        tops = [(x, low, run.canary_audit.epsilon_ceiling) for x, low, run in zip(xs, lows, mine)]
        tops = [(x, low, ceiling) for x, low, ceiling in tops if ceiling is not None]
        if tops:
            x, low, ceiling = zip(*tops)
            axes.vlines(x, low, ceiling, color=color, ls=":", lw=1, zorder=2)
            axes.scatter(x, ceiling, marker="_", s=160, color=color, zorder=3)
    if ceilings:
        axes.scatter([], [], marker="_", s=160, color="grey", label="ceiling (every guess right)")
    if finite:
        ticks = [t for t in axes.get_xticks() if 0 <= t <= 1.1 * max(finite)]
        axes.set_xticks([*ticks, no_dp_x], [*(f"{t:g}" for t in ticks), "no DP"])
        axes.set_xlim(-0.05 * no_dp_x, 1.1 * no_dp_x)
        axes.axvline((max(finite) + no_dp_x) / 2, color="grey", ls=":", lw=1)
    else:
        axes.set_xticks([no_dp_x], ["no DP"])
    top = 1.1 * max([*lowers, *ceilings, *finite, 0.5])
    axes.set_ylim(-0.03 * top, top)
    axes.set_xlabel(epsilon_axis_label({run.placed_unit for run in runs if run.private}, "ε spent (accountant)"))
    axes.set_ylabel("ε lower bound (canary audit)")
    confidences = sorted({run.canary_audit.confidence for run in runs})
    at = f"{confidences[0]:.0%}" if len(confidences) == 1 else "each run's"
    axes.set_title(f"Canary audit: lower bound on ε ({at} confidence) against the accountant's ε", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure
