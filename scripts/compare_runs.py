"""Compare the numbers of two trees of finished runs: did a change move any result?

    python scripts/compare_runs.py BEFORE_DIR AFTER_DIR

Every summary.json under BEFORE_DIR is matched by its relative path under AFTER_DIR;
the accuracy matrix, averages, forgetting, BWT, failures, classes, the privacy section
(σ, ε per client, δ) and the audit must be equal to the bit. Wall times are not compared.
Exits 1 when any run differs or is missing, printing what differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMPARED = (
    "classes_per_experience",
    "accuracy_matrix",
    "final_average_accuracy",
    "average_forgetting",
    "bwt",
    "clients_failed",
    "privacy",
    "audit",
)


def numbers(path: Path) -> dict:
    summary = json.loads(path.read_text())
    return {key: summary.get(key) for key in COMPARED}


def main(before: Path, after: Path) -> int:
    paths = sorted(p.relative_to(before) for p in before.rglob("summary.json"))
    same = 0
    for relative in paths:
        if not (after / relative).is_file():
            print(f"missing: {relative}")
            continue
        old, new = numbers(before / relative), numbers(after / relative)
        if old == new:
            same += 1
        else:
            print(f"differs: {relative}: {', '.join(k for k in COMPARED if old[k] != new[k])}")
    print(f"{same}/{len(paths)} runs have identical numbers")
    return 0 if same == len(paths) else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
