"""Finished runs as a report sees them, and how a sweep's runs group into series and points.

A report reads only what runs wrote (scenario.yaml, metrics.jsonl, summary.json),
so it can be rebuilt at any time, over one run, a sweep, or runs from several places.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedtide.errors import ScenarioError
from fedtide.run_files import (
    SCENARIO_FILE,
    SUMMARY_FILE,
    AuditSummary,
    CanaryAudit,
    RoundRecord,
    RunSummary,
    read_rounds,
    read_summary,
)

# Fields that vary between runs without making them a different method or setting.
_NOT_A_SETTING = ("name", "seed", "output")


@dataclass(frozen=True)
class RunResult:
    """One finished run: where it is, what was run, and what it measured."""

    folder: Path
    run_id: str
    scenario: dict[str, Any]
    summary: RunSummary
    rounds: list[RoundRecord] = field(repr=False)

    @property
    def private(self) -> bool:
        return self.summary.private

    @property
    def epsilon(self) -> float | None:
        """ε spent (`RunSummary.epsilon`: sample-level, the largest over clients, or client-level),
        or None for a non-private run (ε = ∞)."""
        return self.summary.epsilon

    @property
    def delta(self) -> float | None:
        """δ of the ε the report shows."""
        summary = self.summary
        if summary.privacy and (not summary.client_level or summary.privacy.epsilon_max <= summary.epsilon):
            return summary.privacy.delta
        return summary.client_level.delta if summary.client_level else None

    @property
    def noise(self) -> float:
        """The noise multiplier: sample-level (mean over clients, each may have its own), else client-level."""
        if self.summary.privacy:
            sigmas = list(self.summary.privacy.noise_multiplier.values())
            return sum(sigmas) / len(sigmas)
        return self.summary.client_level.noise_multiplier if self.summary.client_level else 0.0

    @property
    def audit(self) -> AuditSummary | None:
        return self.summary.audit

    @property
    def canary_audit(self) -> CanaryAudit | None:
        """The canary audit's lower bound on ε and its guesses; None for a run without canaries."""
        return self.summary.audit.canaries if self.summary.audit else None


def find_runs(paths: list[Path]) -> tuple[list[RunResult], list[Path]]:
    """Every finished run under `paths` (a run folder, or any folder holding run folders).

    Returns the runs in path order and the unfinished run folders found (scenario.yaml
    but no summary.json: interrupted or still running), which a report leaves out.
    """
    runs: list[RunResult] = []
    unfinished: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ScenarioError(str(path), "is not a folder", "give run folders or folders that hold them")
        folders = sorted({p.parent for p in path.rglob(SCENARIO_FILE)})
        if not folders:
            raise ScenarioError(str(path), "holds no run (no scenario.yaml under it)", "give a run or sweep folder")
        for folder in folders:
            if not (folder / SUMMARY_FILE).is_file():
                unfinished.append(folder)
                continue
            run_id = folder.relative_to(path.parent).as_posix()
            scenario = yaml.safe_load((folder / SCENARIO_FILE).read_text())
            runs.append(RunResult(folder, run_id, scenario, read_summary(folder), read_rounds(folder)))
    if not runs:
        raise ScenarioError(", ".join(map(str, paths)), "holds no finished run (no summary.json)", "run it first")
    return runs, unfinished


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"privacy": {"enabled": true}} -> {"privacy.enabled": true}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settings(run: RunResult) -> dict[str, Any]:
    return {k: v for k, v in flatten(run.scenario).items() if k not in _NOT_A_SETTING}


def series_labels(runs: list[RunResult]) -> dict[str, str]:
    """A label per run naming what sets its series apart: the non-privacy settings that vary.

    In a sweep over noise x method x seed this is the method; in one over privacy levels
    too, the method and the level ("replay client-level DP"). A component's parameter
    (Replay's mem_size) counts only if it varies between runs of that same component.
    """
    settings = [_settings(run) for run in runs]
    owners = {"continual.": "continual.method", "federation.strategy.": "federation.strategy.name"}

    def varies(key: str) -> bool:
        owner = next((o for prefix, o in owners.items() if key.startswith(prefix) and key != o), None)
        values: dict[Any, set[str]] = defaultdict(set)
        for s in settings:
            if key in s:
                values[s.get(owner) if owner else None].add(repr(s[key]))
        return any(len(v) > 1 for v in values.values())

    keys = sorted({k for s in settings for k in s if not k.startswith("privacy.")})
    varying = [k for k in keys if k != "continual.method" and varies(k)]
    levels = {run.summary.privacy_level for run in runs if run.private}
    labels = {}
    for run, setting in zip(runs, settings):
        parts = [f"{k.rsplit('.', 1)[-1]}={setting[k]}" for k in varying if k in setting]
        if len(levels) > 1 and run.private:  # sample- and client-level DP are different curves
            parts.append(f"{run.summary.privacy_level}-level DP")
        labels[run.run_id] = " ".join([run.summary.method, *parts])
    return labels


@dataclass(frozen=True)
class SeedGroup:
    """Runs that differ only in their seed: one point of a privacy-utility curve."""

    series: str
    privacy: str
    runs: list[RunResult]

    def mean_std(self, value: str) -> tuple[float, float]:
        values = [float(v) for v in (_value(run, value) for run in self.runs) if v is not None]
        if not values:
            return float("nan"), float("nan")
        return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0

    @property
    def private(self) -> bool:
        return self.runs[0].private


def _value(run: RunResult, name: str) -> float | None:
    if name == "epsilon":
        return run.epsilon
    if name in ("auc_max", "tpr_at_1pct_fpr_max"):
        return getattr(run.audit, name) if run.audit else None
    return getattr(run.summary, name)


def seed_groups(runs: list[RunResult]) -> list[SeedGroup]:
    """Runs grouped by series and privacy setting, seeds pooled; ordered by series then ε."""
    labels = series_labels(runs)
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        settings = _settings(run)
        privacy = repr(sorted((k, v) for k, v in settings.items() if k.startswith("privacy.")))
        key = repr(sorted((k, v) for k, v in settings.items() if not k.startswith("privacy.")))
        groups[(key, privacy)].append(run)
    points = [SeedGroup(labels[group[0].run_id], privacy, group) for (_, privacy), group in groups.items()]
    return sorted(points, key=lambda p: (p.series, not p.private, p.mean_std("epsilon")[0]))
