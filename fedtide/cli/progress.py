"""The live views of `fedtide run` (rounds of one run) and `fedtide sweep` (rounds of every point).

A sweep's points may run in other processes or on other Ray nodes, so its view reads
what they have written: each running point's metrics.jsonl gains a line per round, and
the rounds done over all points to run give the bar and its ETA.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedtide.records.run_folder import rounds_done

if TYPE_CHECKING:
    from fedtide.records.metrics import RoundRecord
    from fedtide.runner.sweep import Sweep, SweepPoint


def run_progress(console: Console) -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, TextColumn("{task.fields[status]}"), console=console)


def round_status(record: RoundRecord) -> str:
    status = (
        f"exp {record.experience} | acc {100 * record.mean_accuracy:.1f}% "
        f"| loss {record.train_loss or 0:.3f} | failed {record.clients['failed']}"
    )
    if record.privacy:
        status += f" | ε(sample) max {record.privacy.epsilon_max:.2f}"
    if record.client_level:
        status += f" | ε(client) {record.client_level.epsilon:.2f}"
    return status


class SweepProgress:
    """Rounds done over the points this sweep runs, points done / running / left, and the ETA."""

    def __init__(self, sweep: Sweep, console: Console) -> None:
        self.folders: dict[str, Path] = {p.name: sweep.folder / p.name for p in sweep.points}
        self.rounds: dict[str, int] = {p.name: p.scenario.total_rounds for p in sweep.points}
        self.state: dict[str, str] = dict.fromkeys(self.folders, "left")
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds")]
        columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
        self.progress = Progress(*columns, console=console)
        self.task: TaskID | None = None

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        self.task = self.progress.add_task("sweep", total=sum(self.rounds.values()), status="starting...")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_point(self, point: SweepPoint, event: str) -> None:
        self.state[point.name] = {"started": "running"}.get(event, event)
        if event == "skipped":  # finished before: not part of what this sweep runs
            self.progress.update(self.task, total=self.progress.tasks[0].total - self.rounds[point.name])
        self.refresh()

    def refresh(self) -> None:
        done = sum(
            self.rounds[name] if state in ("finished", "failed") else rounds_done(self.folders[name])
            for name, state in self.state.items()
            if state not in ("left", "skipped")
        )
        counts = {s: sum(v == s for v in self.state.values()) for s in ("finished", "running", "left", "failed")}
        status = f"{counts['finished']} done · {counts['running']} running · {counts['left']} left"
        if counts["failed"]:
            status += f" · {counts['failed']} failed"
        self.progress.update(self.task, completed=done, status=status)
