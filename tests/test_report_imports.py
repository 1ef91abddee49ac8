"""The report is read-side: writing one from run files loads no torch, Avalanche, Ray, Flower or Opacus."""

import json
import subprocess
import sys

from fedtide.data.loading import parse_scenario, scenario_to_yaml
from fedtide.run_files import (
    METRICS_FILE,
    SCENARIO_FILE,
    SUMMARY_FILE,
    AuditSummary,
    ExperienceRecord,
    RoundRecord,
    RunSummary,
)

HEAVY = ("torch", "avalanche", "ray", "flwr", "opacus")


def write_run(folder) -> RunSummary:
    """A finished two-experience run, written by hand through the typed records."""
    folder.mkdir()
    scenario = parse_scenario({"name": "by-hand", "stream": {"n_experiences": 2}})
    (folder / SCENARIO_FILE).write_text(scenario_to_yaml(scenario))
    clients = {"sampled": 2, "replied": 2, "failed": 0, "empty": 0}
    records = [
        RoundRecord(1, 0, 1, [0.9], 0.9, 0.3, clients, wall_time_s=1.0),
        ExperienceRecord(0, [0.9]),
        RoundRecord(2, 1, 1, [0.2, 0.8], 0.5, 0.4, clients, wall_time_s=2.0),
        ExperienceRecord(1, [0.2, 0.8]),
    ]
    (folder / METRICS_FILE).write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    audit = AuditSummary("loss threshold", 0.51, 0.52, 0.01, 0.02, {"0": {"auc": 0.52, "tpr_at_1pct_fpr": 0.02,
                                                                           "members": 10, "nonmembers": 10}})
    summary = RunSummary(
        "by-hand", 0, "fedavg", "naive", 2, 2, 2, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], [[0.9], [0.2, 0.8]],
        0.5, 0.7, -0.7, 0, 3.0, [], audit=audit,
    )  # fmt: skip
    (folder / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def test_typed_records_round_trip_the_files_exactly(tmp_path):
    summary = write_run(tmp_path / "run")
    raw = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert "privacy" not in raw and raw["audit"]["auc_max"] == 0.52
    assert RunSummary.from_dict(raw) == summary and RunSummary.from_dict(raw).to_dict() == raw
    lines = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [line["type"] for line in lines] == ["round", "experience", "round", "experience"]
    assert RoundRecord.from_dict(lines[2]).to_dict() == lines[2] and "failures" not in lines[2]


def test_writing_a_report_imports_no_training_stack(tmp_path):
    write_run(tmp_path / "run")
    code = (
        "import sys; from fedtide.cli import main; sys.argv = ['fedtide', 'report', sys.argv[1]]\n"
        "try:\n    main()\nexcept SystemExit as done:\n    assert not done.code, done.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "report.html").is_file()
    assert "fedavg + naive, 2 clients, 2 experiences" in (tmp_path / "run" / "report.md").read_text()
