"""The console and the report of runs whose clients are not in lockstep: the global matrix's rows are
stages named by their rounds, each client's stream and numbers are listed as summary.json has them,
forgetting is drawn as a distribution over clients, arrivals are marked, and the runs table and the
privacy-utility section carry the per-client means.

Two tiny runs of one out-of-lockstep stream (own orders, staggered starts, a leaver, a joiner), one
without DP through `fedtide run` and one with sample-level DP, are shared by the tests; a lockstep
run (`small_run`) checks that nothing of the lockstep output changed.
"""

import csv
import html
import io
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from matplotlib.lines import Line2D
from rich.console import Console

from fedtide.records.run_folder import create_run_folder, read_summary
from fedtide.records.summary import RunSummary
from fedtide.report import figures
from fedtide.report.console import summary_view
from fedtide.report.document import write_report
from fedtide.report.runs import find_runs
from fedtide.runner.simulation import simulate_in_process
from tests.conftest import cli, small_scenario

CLIENTS, ROUNDS_PER_STAGE = 5, 3
STREAM = {
    "n_experiences": 4,
    "client_order": "per_client",
    # clients 0-3 start at rounds 1-4, 2 rounds an experience; one of them leaves after one;
    # client 4 joins mid-run holding experience 3 alone
    "arrivals": {
        "start": "staggered", "every": 1, "rounds": [2, 2], "leaving": 1, "leave_after": 1,
        "joining": 1, "new_experiences": 1,
    },
}  # fmt: skip
JOINER = str(CLIENTS - 1)


def streams_scenario(name: str, privacy: dict | None = None) -> dict:
    raw = small_scenario(
        name=name,
        stream=STREAM,
        partition={"kind": "dirichlet", "alpha": 1.0, "num_clients": CLIENTS},
        federation={"rounds_per_experience": ROUNDS_PER_STAGE},
        privacy=privacy or {"enabled": False},
        resources={"backend": "in_process"},
    ).model_dump(mode="json")
    return raw


@dataclass(frozen=True)
class StreamRuns:
    base: Path  # both runs' folders, and the report over both (report/)
    console: str  # what `fedtide run` printed for the plain run
    plain: Path
    private: Path

    def summary(self, folder: Path) -> dict:
        return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def stream_runs(tmp_path_factory) -> StreamRuns:
    base = tmp_path_factory.mktemp("streams")
    path = base / "plain.yaml"
    path.write_text(yaml.safe_dump(streams_scenario("plain")))
    code, out, err = cli("run", str(path), "--output", str(base / "runs"))
    assert code == 0, err
    private = small_scenario(**streams_scenario("private", {"enabled": True, "noise_multiplier": 1.0}))
    simulate_in_process(private, create_run_folder(private, base / "runs"))
    runs, _ = find_runs([base / "runs"])
    write_report(runs, base / "report")
    return StreamRuns(base, out, base / "runs" / "plain", base / "runs" / "private")


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def client_cells(summary: dict) -> list[list[str]]:
    """The clients' table as summary.json says it should read: id, order, rounds, accuracy, forgetting, BWT."""
    per_client = summary["per_client"]
    rows = []
    for client, stream in sorted(per_client["clients"].items(), key=lambda item: int(item[0])):
        rows.append([
            client + (" (joined)" if client == JOINER else ""),
            " → ".join(map(str, stream["experiences"])),
            f"{stream['rounds'][0][0]}–{stream['rounds'][-1][1]}",
            percent(stream["final_average_accuracy"]),
            percent(stream["average_forgetting"]),
            percent(stream["bwt"]),
        ])  # fmt: skip
    means = ("mean_final_average_accuracy", "mean_average_forgetting", "mean_bwt")
    return [*rows, ["mean", "", "", *(percent(per_client[key]) for key in means)]]


def stage_names(summary: dict) -> list[str]:
    """stage s (rounds a–b), a per row of the global matrix; the last stage may be shorter."""
    names = []
    for s in range(len(summary["accuracy_matrix"])):
        first, last = s * ROUNDS_PER_STAGE + 1, min((s + 1) * ROUNDS_PER_STAGE, summary["rounds"])
        names.append(f"stage {s} (" + (f"round {first})" if first == last else f"rounds {first}–{last})"))
    return names


def console_text(summary: RunSummary, *args) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(summary_view(summary, *args))
    return console.file.getvalue()


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


def test_the_stream_is_out_of_lockstep_as_the_tests_need(stream_runs):
    summary = stream_runs.summary(stream_runs.plain)
    clients = summary["per_client"]["clients"]
    assert len(clients) == CLIENTS and summary["rounds"] % ROUNDS_PER_STAGE  # a shorter last stage
    assert len({tuple(c["experiences"]) for c in clients.values()}) > 2  # own orders
    assert clients[JOINER]["experiences"] == [3] and clients[JOINER]["rounds"][0][0] > 1
    assert sum(c["average_forgetting"] is None for c in clients.values()) == 2  # the joiner and the leaver


def test_the_console_names_stages_and_lists_every_client_with_its_numbers(stream_runs):
    summary = stream_runs.summary(stream_runs.plain)
    text = console_text(read_summary(stream_runs.plain), ROUNDS_PER_STAGE)
    rows = table_rows(text)
    assert rows[: len(summary["accuracy_matrix"])] == [
        [name, *(f"{100 * a:.1f}" for a in row)] for name, row in zip(stage_names(summary), summary["accuracy_matrix"])
    ]
    assert re.search(r"┃ after\s+┃ exp 0 ┃ exp 1 ┃ exp 2 ┃ exp 3 ┃", text)  # every column titled
    expected = client_cells(summary)
    start = rows.index(expected[0])
    assert rows[start : start + len(expected)] == expected
    per_client, headline = summary["per_client"], {row[0]: row[1] for row in rows if len(row) == 2}
    assert headline["final average accuracy (global model, every experience)"] == (
        f"{percent(summary['final_average_accuracy'])}%"
    )
    assert headline["final average accuracy (mean over clients)"] == (
        f"{percent(per_client['mean_final_average_accuracy'])}%"
    )
    assert headline["average forgetting (mean over clients)"] == f"{percent(per_client['mean_average_forgetting'])}%"
    assert headline["BWT (mean over clients)"] == f"{percent(per_client['mean_bwt'])}%"
    # without the scenario's stage length the console reads it off the summary: the same here
    assert console_text(read_summary(stream_runs.plain)) == text
    # `fedtide run` printed both tables, every client in them
    printed = stream_runs.console
    assert "Global accuracy matrix" in printed and "Each client over its own experiences" in printed
    assert f"{JOINER} (joined)" in printed and stage_names(summary)[-1] in printed


def test_the_lockstep_console_keeps_its_triangular_matrix(small_run):
    summary = read_summary(small_run.folder)
    assert summary.per_client is None
    text = console_text(summary)
    assert "Accuracy matrix A (rows: after" in text  # rich reads the title's "[e][j]" as markup, as it always did
    assert "stage" not in text and "Each client" not in text and "mean over clients" not in text
    matrix = small_run.summary["accuracy_matrix"]
    assert table_rows(text)[: len(matrix)] == [
        [f"exp {e}", *(f"{100 * a:.1f}" for a in row), *([""] * (len(matrix) - len(row)))]
        for e, row in enumerate(matrix)
    ]
    accuracy = f"{percent(summary.final_average_accuracy)}%"
    assert table_rows(text)[len(matrix)] == ["final average accuracy", accuracy]


def test_the_run_report_shows_each_client_and_their_forgetting(stream_runs):
    folder = stream_runs.plain  # `fedtide run` wrote its report
    summary = stream_runs.summary(folder)
    markdown, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    for row in client_cells(summary):
        assert "| " + " | ".join(row) + " |" in markdown
        assert "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" in page
    for name, row in zip(stage_names(summary), summary["accuracy_matrix"]):
        assert "| " + " | ".join([name, *(percent(a) for a in row)]) + " |" in markdown
    single = [c for c, stream in summary["per_client"]["clients"].items() if stream["average_forgetting"] is None]
    assert f"Held one experience, nothing to forget (no forgetting, left out of its mean): {', '.join(single)}." in (
        markdown
    )
    assert f"marked (joined): {JOINER}." in markdown
    assert "![Average forgetting of each client](figures/plain-client_forgetting.png)" in markdown
    for figure in ("client_forgetting", "accuracy_rounds", "accuracy_matrix"):
        assert (folder / "figures" / f"plain-{figure}.png").stat().st_size > 5000


def test_the_accuracy_over_rounds_marks_stages_arrivals_and_the_seen_classes(stream_runs):
    (run,), _ = find_runs([stream_runs.plain])
    figure = figures.accuracy_over_rounds_figure(run)
    axes = figure.axes[0]
    summary = stream_runs.summary(stream_runs.plain)
    seen = next(line for line in axes.lines if line.get_label() == "classes seen by any client")
    assert list(seen.get_ydata()) == pytest.approx([100 * r.seen_accuracy for r in run.rounds])
    verticals = [line for line in axes.lines if isinstance(line, Line2D) and len(set(line.get_xdata())) == 1]
    stage_ends = sorted({line.get_xdata()[0] for line in verticals if line.get_linestyle() == ":"})
    assert stage_ends == [r + 0.5 for r in range(ROUNDS_PER_STAGE, summary["rounds"], ROUNDS_PER_STAGE)]
    starts = {c: s["rounds"][0][0] for c, s in summary["per_client"]["clients"].items()}
    arrivals = sorted({line.get_xdata()[0] for line in verticals if line.get_linestyle() != ":"})
    assert arrivals == sorted({r for r in starts.values() if r > 1})
    texts = " ".join(t.get_text() for t in axes.texts)
    assert f"{JOINER} joins" in texts and texts.count("joins") == 1
    assert all(f"{c} starts" in texts for c, r in starts.items() if r > 1 and c != JOINER)


def test_the_forgetting_figure_has_a_point_per_client_that_can_forget_and_their_mean(stream_runs):
    clients = stream_runs.summary(stream_runs.plain)["per_client"]["clients"]
    points = [(c, s["average_forgetting"]) for c, s in clients.items() if s["average_forgetting"] is not None]
    axes = figures.client_forgetting_figure([("plain", points)]).axes[0]
    dots, mean = (collection.get_offsets() for collection in axes.collections[:2])
    assert list(dots[:, 0]) == pytest.approx([100 * f for _, f in points])
    assert mean[0][0] == pytest.approx(100 * statistics.fmean(f for _, f in points))
    assert [t.get_text() for t in axes.texts] == [f"client {c}" for c, _ in points]


def test_report_csv_and_tables_carry_the_client_means(stream_runs, small_run):
    runs, _ = find_runs([stream_runs.base / "runs", small_run.folder])
    write_report(runs, stream_runs.base / "with-lockstep")
    rows = {row["run"]: row for row in csv.DictReader((stream_runs.base / "with-lockstep" / "report.csv").open())}
    for name in ("plain", "private"):
        per_client = stream_runs.summary(stream_runs.base / "runs" / name)["per_client"]
        row = rows[f"runs/{name}"]
        assert row["final accuracy % (client mean)"] == percent(per_client["mean_final_average_accuracy"])
        assert row["forgetting % (client mean)"] == percent(per_client["mean_average_forgetting"])
        assert row["forgetting %"] == row["forgetting % (client mean)"]  # summary's forgetting is that mean
    lockstep = rows[small_run.folder.name]
    assert lockstep["final accuracy % (client mean)"] == lockstep["forgetting % (client mean)"] == "–"
    assert float(lockstep["forgetting %"]) == pytest.approx(100 * small_run.summary["average_forgetting"], abs=0.005)


def test_privacy_utility_and_the_forgetting_spread_over_per_client_runs(stream_runs):
    markdown = (stream_runs.base / "report" / "report.md").read_text()
    assert "## Privacy-utility" in markdown and "## Forgetting per client" in markdown
    assert (stream_runs.base / "report" / "figures" / "client_forgetting.png").stat().st_size > 5000
    section = markdown[markdown.index("## Privacy-utility") : markdown.index("## Empirical privacy audit")]
    for name in ("plain", "private"):
        summary = stream_runs.summary(stream_runs.base / "runs" / name)
        forgetting = summary["per_client"]["mean_average_forgetting"]
        assert summary["average_forgetting"] == forgetting
        row = next(line for line in section.splitlines() if line.startswith("| replay") and (
            ("| ∞ |" in line) == (name == "plain")))  # fmt: skip
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4:6] == [f"{percent(summary['final_average_accuracy'])} ± n/a", f"{percent(forgetting)} ± n/a"]
    assert "final accuracy is the final global model's mean over every experience" in markdown
