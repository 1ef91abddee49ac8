"""Reading scenario files and `--set` overrides into a validated `Scenario`.

Every way a file can be wrong ends here as one `ScenarioError` line that names the
field, so the CLI never shows a pydantic or YAML traceback for a user's typo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedtide.errors import ScenarioError
from fedtide.scenario.schema import Scenario


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read a YAML scenario, apply `field.path=value` overrides, and validate it."""
    raw = read_yaml(Path(path))
    if "sweep" in raw:
        raise ScenarioError("sweep", f"{path} declares a sweep grid", f"run it with `fedtide sweep {path}`")
    apply_overrides(raw, overrides)
    return parse_scenario(raw)


def parse_scenario(raw: dict[str, Any]) -> Scenario:
    """Validate a scenario given as plain data (a parsed file, a run config, a JSON message)."""
    try:
        return Scenario.model_validate(raw)
    except ValidationError as error:
        raise ScenarioError("", _describe(error)) from None


def scenario_to_yaml(scenario: Scenario) -> str:
    """The fully resolved scenario, defaults included, as written into each run folder."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)


def read_yaml(path: Path) -> dict[str, Any]:
    """The file's mapping of sections, or one readable error for a missing or malformed file."""
    if not path.is_file():
        raise ScenarioError(str(path), "no such scenario file", "check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ScenarioError(str(path), f"is not valid YAML{where}", "fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ScenarioError(str(path), "must be a mapping of sections (name:, dataset:, ...)")
    return data


# Overriding one of these names switches component: the old one's parameters are dropped.
_COMPONENT_NAMES = {("continual", "method"), ("federation", "strategy", "name")}


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply `--set field.path=value` strings in order; values are parsed as YAML (numbers, lists...)."""
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep or not path:
            raise ScenarioError("--set", f"'{override}' is not field.path=value")
        set_field(raw, path.strip(), yaml.safe_load(text) if text.strip() else None)


def set_field(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set `a.b.c` to `value` in the raw mapping, creating sections on the way.

    Setting a different strategy name or continual method replaces that section, so
    `--set continual.method=ewc` on a replay scenario does not carry `mem_size` over
    to EWC; give the new component's parameters with further `--set`s after it.
    """
    keys = path.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ScenarioError(path, f"'{key}' is a value, not a section")
        node = child
    if tuple(keys) in _COMPONENT_NAMES and node.get(keys[-1]) != value:
        node.clear()
    node[keys[-1]] = value


def _describe(error: ValidationError) -> str:
    """One line per pydantic error, joined: `field.path: what is wrong`."""
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "scenario"
        if item["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown key (check the spelling; see `fedtide list`)")
        else:
            message = item["msg"].removeprefix("Value error, ")
            parts.append(f"{field}: {message}")
    return "; ".join(parts)
