"""Compare the numbers of two trees of finished runs: did a change move any result?

    python scripts/compare_runs.py BEFORE_DIR AFTER_DIR

Every summary.json under BEFORE_DIR is matched by its relative path under AFTER_DIR;
the accuracy matrix, averages, forgetting, BWT, failures, classes, the privacy section
(σ, ε per client, δ), the audit and, out of lockstep, the per-client section (each
client's matrix, forgetting, BWT) must be equal to the bit. So must every line of the
run's metrics.jsonl, all but what differs between two runs of the same scenario
anyway: wall times (`wall_time_s` wherever it stands) and Ray's node ids (new in every
Ray run). A key only AFTER's lines have (a field a change added, such as `seen_accuracy`)
is not a difference: it is listed once as added, and the keys both have must be equal.
Exits 1 when any run differs or is missing, printing what differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COMPARED = (
    "classes_per_experience",
    "accuracy_matrix",
    "final_average_accuracy",
    "average_forgetting",
    "bwt",
    "clients_failed",
    "privacy",
    "audit",
    "per_client",
)
# Keys of metrics.jsonl that two runs of the same scenario need not share.
NOT_COMPARED = {"wall_time_s", "ray_node_id"}


def numbers(path: Path) -> dict:
    summary = json.loads(path.read_text())
    return {key: summary.get(key) for key in COMPARED}


def without_times(value: Any) -> Any:
    """`value` (a parsed JSON line) less the keys in `NOT_COMPARED`, at any depth."""
    if isinstance(value, dict):
        return {key: without_times(item) for key, item in value.items() if key not in NOT_COMPARED}
    if isinstance(value, list):
        return [without_times(item) for item in value]
    return value


def as_before(new: Any, old: Any, added: set[str]) -> Any:
    """`new` with only the keys `old` has, at any depth; the keys left out go to `added`."""
    if isinstance(new, dict) and isinstance(old, dict):
        added.update(key for key in new if key not in old)
        return {key: as_before(item, old[key], added) for key, item in new.items() if key in old}
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [as_before(n, o, added) for n, o in zip(new, old)]
    return new


ADDED: set[str] = set()  # keys only the AFTER runs' metrics.jsonl lines have


def metrics_difference(before: Path, after: Path) -> str | None:
    """Where two metrics.jsonl files differ (the first line, and its keys that differ); None when they agree."""
    if not before.is_file():
        return None  # a run folder made before metrics.jsonl existed has nothing to compare
    if not after.is_file():
        return "metrics.jsonl missing"
    old = [without_times(json.loads(line)) for line in before.read_text().splitlines() if line.strip()]
    new = [without_times(json.loads(line)) for line in after.read_text().splitlines() if line.strip()]
    for number, (a, b) in enumerate(zip(old, new), start=1):
        b = as_before(b, a, ADDED)
        if a != b:
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            return f"metrics.jsonl line {number} ({a.get('type')}): {', '.join(keys)}"
    if len(old) != len(new):
        return f"metrics.jsonl has {len(old)} lines before, {len(new)} after"
    return None


def main(before: Path, after: Path) -> int:
    paths = sorted(p.relative_to(before) for p in before.rglob("summary.json"))
    same = 0
    for relative in paths:
        if not (after / relative).is_file():
            print(f"missing: {relative}")
            continue
        old, new = numbers(before / relative), numbers(after / relative)
        differences = [k for k in COMPARED if old[k] != new[k]]
        folder = relative.parent
        metrics = metrics_difference(before / folder / "metrics.jsonl", after / folder / "metrics.jsonl")
        if metrics:
            differences.append(metrics)
        if differences:
            print(f"differs: {relative}: {', '.join(differences)}")
        else:
            same += 1
    if ADDED:
        print(f"keys only the after runs have (new fields, not compared): {', '.join(sorted(ADDED))}")
    print(f"{same}/{len(paths)} runs have identical numbers (summary.json and metrics.jsonl)")
    return 0 if same == len(paths) else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
