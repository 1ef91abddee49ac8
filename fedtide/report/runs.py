"""Finished runs as a report sees them, and how a sweep's runs group into series and points.

A report reads only what runs wrote (scenario.yaml, metrics.jsonl, summary.json),
so it can be rebuilt at any time, over one run, a sweep, or runs from several places.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from fedtide.errors import ScenarioError
from fedtide.records.metrics import RoundRecord
from fedtide.records.report_options import REPORT_KEY, read_report_options
from fedtide.records.run_folder import SCENARIO_FILE, SUMMARY_FILE, read_rounds, read_summary
from fedtide.records.summary import (
    CLIENT,
    PRIVACY_UNITS,
    SAMPLE,
    AuditSummary,
    CanaryAudit,
    PrivacyGuarantee,
    RunSummary,
)

# Fields that vary between runs without making them a different method or setting.
_NOT_A_SETTING = ("name", "seed", "output")
# A user metric's name in the report: `strategy.NAME` (what aggregate_train returned of its own) or
# `method.NAME` (the method's metric aggregated over clients as it declares), from these record fields.
METRIC_SECTIONS = {"strategy": "strategy_metrics", "method": "method_metrics"}
# What runs written before strategy_metrics kept only the strategy's own keys have in it: the
# strategy's average of the clients' MetricRecords, never a metric of the strategy's.
_CLIENTS_KEYS = ("num-examples", "train_loss", "client-level-weight")
MetricValue = float | list[float]


@dataclass(frozen=True)
class RunResult:
    """One finished run: where it is, what was run, and what it measured.

    `unit` is the unit of the ε the report places the run at (`place_runs`); None places
    it at the one unit it has (a run with two is placed only once a unit is chosen).
    """

    folder: Path
    run_id: str
    scenario: dict[str, Any]
    summary: RunSummary
    rounds: list[RoundRecord] = field(repr=False)
    unit: str | None = None

    @property
    def private(self) -> bool:
        return self.summary.private

    @property
    def placed_unit(self) -> str | None:
        """The unit the run is placed at: the chosen one, else the run's only one (None: none or two)."""
        units = self.summary.units
        return self.unit or (units[0] if len(units) == 1 else None)

    @property
    def guarantee(self) -> PrivacyGuarantee | None:
        """The guarantee of the unit the run is placed at; None when it has none of that unit."""
        unit = self.placed_unit
        return self.summary.guarantee(unit) if unit else None

    @property
    def epsilon(self) -> float | None:
        """ε of the unit the run is placed at (sample: the largest over clients); None for a
        non-private run (ε = ∞) and for a private run with no ε of that unit (`placed` is False)."""
        return self.guarantee.epsilon if self.guarantee else None

    @property
    def placed(self) -> bool:
        """Whether the run has a place on an ε axis: at its ε, or at "no DP" when not private.

        A private run with no ε of the report's unit (a sample-level run when the report
        compares client-level ε) has none: it is not ε = ∞, it is not measured in that unit.
        """
        return not self.private or self.guarantee is not None

    @property
    def delta(self) -> float | None:
        """δ of the ε the report shows."""
        return self.guarantee.delta if self.guarantee else None

    @property
    def noise(self) -> float:
        """The noise multiplier of the unit shown: sample-level (mean over clients, each may have its
        own), client-level; 0 when none."""
        return self.noise_of(self.placed_unit) if self.placed_unit else 0.0

    def noise_of(self, unit: str) -> float | None:
        """σ of `unit`'s DP (sample-level: the mean over clients), None when the run has none."""
        if unit == SAMPLE and self.summary.privacy:
            sigmas = list(self.summary.privacy.noise_multiplier.values())
            return sum(sigmas) / len(sigmas)
        if unit == CLIENT and self.summary.client_level:
            return self.summary.client_level.noise_multiplier
        return None

    def epsilon_text(self, unit: str | None = None) -> str:
        """ε as the tables print it: `1.23`; `∞` for a non-private run; `no client ε` for a private
        run without that unit; with no unit given, a run placed at none shows each of its ε's."""
        unit = unit or self.placed_unit
        if not self.private:
            return "∞"
        if unit is None:
            return " · ".join(f"{g.epsilon:.2f} ({g.unit})" for g in self.summary.guarantees)
        epsilon = self.summary.epsilon_of(unit)
        return f"no {unit} ε" if epsilon is None else f"{epsilon:.2f}"

    @property
    def audit(self) -> AuditSummary | None:
        return self.summary.audit

    @cached_property
    def final_metrics(self) -> dict[str, MetricValue]:
        """The strategy's and the method's metrics of the last round that had any, as `strategy.NAME`
        and `method.NAME` (summary.json's); empty for a run without them."""
        return _named_metrics(self.summary)

    def metric_per_round(self, name: str) -> list[tuple[int, float]]:
        """(global round, value) of a user metric (`strategy.NAME`, `method.NAME`), in the rounds
        whose value is a number."""
        return [
            (record.round, value)
            for record in self.rounds
            if isinstance(value := _named_metrics(record).get(name), float | int)
        ]

    @property
    def canary_audit(self) -> CanaryAudit | None:
        """The canary audit's lower bound on ε and its guesses; None for a run without canaries."""
        return self.summary.audit.canaries if self.summary.audit else None


PRIVACY_UNIT_OPTION = f"{REPORT_KEY}.privacy_unit"


def place_runs(runs: list[RunResult], privacy_unit: str | None = None) -> list[RunResult]:
    """Each run with the unit of ε the report compares it at.

    Given a unit (`report.privacy_unit`, `--privacy-unit`), every run is placed at its ε of
    that unit; a private run without one is "no ε of that unit", left off the ε axes and
    said so in the tables. Without one, each run is placed at the one unit it has: runs of
    one unit are compared in it, and sample- and client-level runs side by side become
    separate series (their labels name the level), each in its own unit, never on one
    curve. A run of both levels has two ε's and neither bounds the other, so a report over
    several runs that holds one must be told the unit: it refuses with one line naming the
    option. A report of that run alone shows both ε's.
    """
    if privacy_unit is not None:
        if privacy_unit not in PRIVACY_UNITS:
            raise ScenarioError(
                PRIVACY_UNIT_OPTION, f"is {privacy_unit!r}", f"give one of: {', '.join(PRIVACY_UNITS)}"
            )
        return [replace(run, unit=privacy_unit) for run in runs]
    two = [run for run in runs if len(run.summary.units) > 1]
    if two and len(runs) > 1:
        raise ScenarioError(
            PRIVACY_UNIT_OPTION,
            f"must be given: {two[0].run_id} has a sample-level and a client-level ε and neither bounds the "
            "other, so the report cannot choose which to compare",
            "pass --privacy-unit sample|client to fedtide report, or put report: {privacy_unit: ...} in the "
            "sweep file",
        )
    return [replace(run, unit=None) for run in runs]


def saved_privacy_unit(paths: list[Path]) -> str | None:
    """The `report.privacy_unit` the sweeps among `paths` were run with (their sweep.yaml); None when none says.

    Sweeps that say different units fail: which one the report compares must then be given.
    """
    units = {read_report_options(path).privacy_unit for path in paths if path.is_dir()} - {None}
    if len(units) > 1:
        raise ScenarioError(
            PRIVACY_UNIT_OPTION, f"differs between the sweeps given ({', '.join(sorted(units))})",
            "pass --privacy-unit sample|client to choose",
        )  # fmt: skip
    return units.pop() if units else None


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
    too, the method and the level ("replay client-level DP"), and the client sampling where
    it varies ("replay client-level DP (fixed sampling)"). A component's parameter
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
    samplings = {run.summary.client_level.sampling for run in runs if run.summary.client_level}
    labels = {}
    for run, setting in zip(runs, settings):
        parts = [f"{k.rsplit('.', 1)[-1]}={setting[k]}" for k in varying if k in setting]
        if len(levels) > 1 and run.private:  # sample- and client-level DP are different curves
            parts.append(f"{run.summary.privacy_level}-level DP")
        if len(samplings) > 1 and run.summary.client_level:  # so are Poisson and fixed-size client sampling
            parts.append(f"({run.summary.client_level.sampling} sampling)")
        labels[run.run_id] = " ".join([run.summary.method, *parts])
    return labels


@dataclass(frozen=True)
class SeedGroup:
    """Runs that differ only in their seed: one point of a privacy-utility curve."""

    series: str
    privacy: str
    runs: list[RunResult]

    def mean_std(self, value: str) -> tuple[float, float]:
        """Over the runs that have `value`; the std of one run is 0.0 here (a figure draws no bar),
        which the tables show as "n/a" (`spread_known`)."""
        values = self._values(value)
        if not values:
            return float("nan"), float("nan")
        return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0

    def spread_known(self, value: str) -> bool:
        """Whether `value` varies over at least two runs: one run has no spread to show, not a spread of 0."""
        return len(self._values(value)) > 1

    def _values(self, value: str) -> list[float]:
        return [float(v) for v in (_value(run, value) for run in self.runs) if v is not None]

    @property
    def private(self) -> bool:
        return self.runs[0].private

    @property
    def placed(self) -> bool:
        """Whether the point has a place on an ε axis (`RunResult.placed`)."""
        return self.runs[0].placed

    @property
    def unit(self) -> str | None:
        """The unit of the ε the point is placed at (None: not private)."""
        return self.runs[0].placed_unit if self.private else None


def _named_metrics(record: RunSummary | RoundRecord) -> dict[str, MetricValue]:
    """A record's user metrics by report name (`METRIC_SECTIONS`)."""
    named = {}
    for section, attribute in METRIC_SECTIONS.items():
        for key, value in (getattr(record, attribute) or {}).items():
            if section == "strategy" and (key in _CLIENTS_KEYS or key.startswith("method.")):
                continue
            named[f"{section}.{key}"] = value
    return named


def metric_names(runs: list[RunResult]) -> list[str]:
    """Every user metric of `runs` by report name: the strategy's first, each in order of appearance."""
    names = dict.fromkeys(name for run in runs for name in run.final_metrics)
    return sorted(names, key=lambda name: not name.startswith("strategy."))


def metric_text(value: MetricValue | None) -> str:
    """A user metric's value as tables and the console print it: six significant digits, a list's
    numbers side by side, `–` for a run without it."""
    if value is None:
        return "–"
    return " ".join(f"{v:.6g}" for v in value) if isinstance(value, list) else f"{value:.6g}"


def _value(run: RunResult, name: str) -> float | None:
    if name == "epsilon":
        return run.epsilon
    if name.partition(".")[0] in METRIC_SECTIONS:  # a user metric; a list of numbers has no mean
        value = run.final_metrics.get(name)
        return value if isinstance(value, float | int) else None
    if name in ("auc_max", "tpr_at_1pct_fpr_max"):
        return getattr(run.audit, name) if run.audit else None
    return getattr(run.summary, name)


def seed_groups(runs: list[RunResult]) -> list[SeedGroup]:
    """Runs grouped by series and privacy setting, seeds pooled; ordered by series then ε
    (the non-private point, then points with no ε of the report's unit, last)."""
    labels = series_labels(runs)
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        settings = _settings(run)
        privacy = repr(sorted((k, v) for k, v in settings.items() if k.startswith("privacy.")))
        key = repr(sorted((k, v) for k, v in settings.items() if not k.startswith("privacy.")))
        groups[(key, privacy)].append(run)
    points = [SeedGroup(labels[group[0].run_id], privacy, group) for (_, privacy), group in groups.items()]
    return sorted(
        points, key=lambda p: (p.series, not p.private, not p.placed, p.mean_std("epsilon")[0] if p.placed else 0.0)
    )
