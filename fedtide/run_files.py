"""The files of one run folder, and the typed records they hold.

scenario.yaml (the resolved scenario), metrics.jsonl (a `RoundRecord` per round and an
`ExperienceRecord` per experience, written as the run goes), model.pt, summary.json (a
`RunSummary`). A run never writes into an existing folder: a second run of the same
name gets a numbered sibling. summary.json appears only, and whole, when the run has
finished. Readers (the report) use the records, never torch: this module imports none.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedtide.data.loading import scenario_to_yaml
from fedtide.data.schema import Scenario

SCENARIO_FILE = "scenario.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"  # the final global weights (a torch state_dict), written by the server
# The false-positive rate at which a summary's audit reports the attack's true-positive rate.
LOW_FPR = 0.01


@dataclass(frozen=True)
class PrivacySummary:
    """Sample-level DP-SGD of a run: each client's noise and cumulative ε, by its own accountant."""

    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: dict[str, float]  # per client (calibrated per client under target_epsilon)
    target_epsilon: float | None
    epsilon_max: float
    epsilon_per_client: dict[str, float]
    budget_exhausted_clients: list[int]


@dataclass(frozen=True)
class AuditSummary:
    """The membership-inference attack on the final model: per client, with mean and worst case."""

    attack: str
    auc_mean: float | None
    auc_max: float | None
    tpr_at_1pct_fpr_mean: float | None
    tpr_at_1pct_fpr_max: float | None
    per_client: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class RunSummary:
    """summary.json: what a finished run measured."""

    name: str
    seed: int
    strategy: str
    method: str
    num_clients: int
    n_experiences: int
    rounds: int
    classes_per_experience: list[list[int]]
    accuracy_matrix: list[list[float]]  # A[e][j]: accuracy on experience j after training experience e
    final_average_accuracy: float
    average_forgetting: float
    bwt: float
    clients_failed: int
    wall_time_s: float
    ray_nodes: list[str]
    privacy: PrivacySummary | None = None
    audit: AuditSummary | None = None

    @property
    def private(self) -> bool:
        return self.privacy is not None

    def to_dict(self) -> dict[str, Any]:
        return _without_none(asdict(self), ("privacy", "audit"))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSummary:
        privacy = PrivacySummary(**raw["privacy"]) if "privacy" in raw else None
        audit = AuditSummary(**raw["audit"]) if "audit" in raw else None
        return cls(**_known(cls, raw) | {"privacy": privacy, "audit": audit})


@dataclass(frozen=True)
class RoundRecord:
    """One line of metrics.jsonl per global round: the global model's accuracy and the clients' round.

    `per_client` holds each replying client's `ClientRoundReport` as written by
    `fedtide.protocol`; `failures` the reasons of clients that failed (when any did);
    `privacy` the cumulative ε per client (under DP).
    """

    round: int
    experience: int
    round_in_experience: int
    accuracy: list[float]  # on each experience seen so far
    mean_accuracy: float
    train_loss: float | None  # None when no client trained
    clients: dict[str, int]  # sampled, replied, failed, empty
    per_client: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] | None = None
    wall_time_s: float = 0.0
    privacy: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "round"} | _without_none(asdict(self), ("failures", "privacy"))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundRecord:
        return cls(**_known(cls, raw))


@dataclass(frozen=True)
class ExperienceRecord:
    """One line of metrics.jsonl per finished experience: its row of the accuracy matrix."""

    experience: int
    accuracy: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "experience"} | asdict(self)


def _without_none(raw: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if not (k in optional and v is None)}


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}




def create_run_folder(scenario: Scenario, output: Path | None = None) -> Path:
    """Make a fresh folder `output/name` (or `name-2`, `name-3`...) holding the resolved scenario."""
    parent = Path(output if output is not None else scenario.output)
    parent.mkdir(parents=True, exist_ok=True)
    folder, suffix = parent / scenario.name, 1
    while True:
        try:
            return prepare_run_folder(folder, scenario)
        except FileExistsError:
            suffix += 1
            folder = parent / f"{scenario.name}-{suffix}"


def prepare_run_folder(folder: Path, scenario: Scenario) -> Path:
    """Create `folder` (which must not exist yet) with the resolved scenario in it."""
    folder.mkdir(parents=True)
    (folder / SCENARIO_FILE).write_text(scenario_to_yaml(scenario))
    return folder


def append_metrics(folder: Path, record: RoundRecord | ExperienceRecord) -> None:
    with (folder / METRICS_FILE).open("a") as stream:
        stream.write(json.dumps(record.to_dict()) + "\n")


def write_summary(folder: Path, summary: RunSummary) -> None:
    """Write summary.json atomically, so a reader never sees half of it."""
    partial = folder / (SUMMARY_FILE + ".partial")
    partial.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    os.replace(partial, folder / SUMMARY_FILE)


def read_summary(folder: Path) -> RunSummary:
    return RunSummary.from_dict(json.loads((folder / SUMMARY_FILE).read_text()))


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as written, one dict per line (`type`: round or experience)."""
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines() if line]


def read_rounds(folder: Path) -> list[RoundRecord]:
    return [RoundRecord.from_dict(r) for r in read_metrics(folder) if r["type"] == "round"]
