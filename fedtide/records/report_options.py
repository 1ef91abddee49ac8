"""What a report is asked (`ReportOptions`), as a sweep folder's sweep.yaml or `fedtide report`'s flags give it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedtide.errors import ScenarioError
from fedtide.records.summary import PRIVACY_UNITS

SWEEP_FILE = "sweep.yaml"  # in a sweep's folder: its grid, and the report options its file gave
REPORT_KEY = "report"  # a sweep file's section of report options (`ReportOptions`)


@dataclass(frozen=True)
class ReportOptions:
    """What a report is asked, independent of any scenario: a sweep file's `report:` section
    (kept in the sweep folder's sweep.yaml), or `fedtide report`'s flags.

    `privacy_unit` is the unit of the ε a report compares runs at (sample | client); None
    takes it from the runs (`fedtide.report.runs.place_runs`).
    """

    privacy_unit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("privacy_unit", self.privacy_unit),) if v is not None}


def parse_report_options(raw: Any, where: str = REPORT_KEY) -> ReportOptions:
    """A `report:` section (None when there is none); an unknown key or unit fails naming its field."""
    if raw is None:
        return ReportOptions()
    if not isinstance(raw, dict):
        raise ScenarioError(where, "must be a section", "e.g. report: {privacy_unit: client}")
    unknown = sorted(set(raw) - {"privacy_unit"})
    if unknown:
        raise ScenarioError(f"{where}.{unknown[0]}", "unknown key", "the report options are: privacy_unit")
    unit = raw.get("privacy_unit")
    if unit is not None and unit not in PRIVACY_UNITS:
        raise ScenarioError(f"{where}.privacy_unit", f"is {unit!r}", f"give one of: {', '.join(PRIVACY_UNITS)}")
    return ReportOptions(privacy_unit=unit)


def read_report_options(folder: Path) -> ReportOptions:
    """The report options a sweep folder's sweep.yaml holds (none for a run folder, or a sweep without any)."""
    path = folder / SWEEP_FILE
    if not path.is_file():
        return ReportOptions()
    raw = yaml.safe_load(path.read_text()) or {}
    return parse_report_options(raw.get(REPORT_KEY) if isinstance(raw, dict) else None, f"{path}: {REPORT_KEY}")
