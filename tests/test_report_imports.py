"""The report is read-side: its records round-trip the run files, and it loads no training stack.

The run folder here is written by hand through the typed records and the run-file
writers, so the report is exercised on every section (DP, audit, a failed client, a
client first sampled in round 2) without torch ever being needed to produce it.
"""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from fedtide.records.metrics import ClientFailure, ClientRoundRecord, ExperienceRecord, RoundPrivacy, RoundRecord
from fedtide.records.run_folder import (
    METRICS_FILE,
    SUMMARY_FILE,
    append_metrics,
    prepare_run_folder,
    read_rounds,
    read_summary,
    write_summary,
)
from fedtide.records.summary import AuditSummary, ClientAudit, PrivacySummary, RunSummary
from fedtide.scenario.loading import parse_scenario

HEAVY = ("torch", "avalanche", "ray", "flwr", "opacus")

# A round line as the version before the typed records wrote it (quick_dp, cut to two clients).
OLD_ROUND_LINE = (
    '{"type": "round", "round": 1, "experience": 0, "round_in_experience": 1, "accuracy": [0.6813186813186813], '
    '"mean_accuracy": 0.6813186813186813, "train_loss": 2.088394005556819, "clients": {"sampled": 2, "replied": 2, '
    '"failed": 0, "empty": 0}, "per_client": [{"partition_id": 0, "num_examples": 9, "train_loss": '
    '2.0907411575317383, "empty": 0, "consolidated": 0, "consolidation_counts": [0, 0, 0, 0, 0], "epsilon": '
    '5.733567976251924, "noise_multiplier": 1.0, "budget_exhausted": 0, "ray_node_id": "5ea12683", "hostname": '
    '"vm", "dp_history": [[1.0, 1.0, 2]]}, {"partition_id": 1, "num_examples": 21, "train_loss": 2.023709535598755, '
    '"empty": 0, "consolidated": 0, "consolidation_counts": [0, 0, 0, 0, 0], "epsilon": 5.671716972289063, '
    '"noise_multiplier": 1.0, "budget_exhausted": 0, "ray_node_id": "5ea12683", "hostname": "vm", "dp_history": '
    '[[1.0, 0.5, 4]]}], "wall_time_s": 16.249, "privacy": {"epsilon_max": 5.733567976251924, "epsilon_mean": '
    '5.702642474270493, "epsilon_per_client": {"0": 5.733567976251924, "1": 5.671716972289063}, '
    '"budget_exhausted_clients": []}}'
)
# summary.json's keys, in the order every version so far has written them.
SUMMARY_KEYS = [
    "name", "seed", "strategy", "method", "num_clients", "n_experiences", "rounds", "classes_per_experience",
    "accuracy_matrix", "final_average_accuracy", "average_forgetting", "bwt", "clients_failed", "wall_time_s",
    "ray_nodes", "privacy", "audit",
]  # fmt: skip


def client(partition_id: int, epsilon: float) -> ClientRoundRecord:
    return ClientRoundRecord(
        partition_id=partition_id, num_examples=20, train_loss=0.5, empty=0, consolidated=0,
        consolidation_counts=[0, 0], epsilon=epsilon, noise_multiplier=1.0, budget_exhausted=0,
        dp_history=[[1.0, 0.5, 4]],
    )  # fmt: skip


def spent(epsilons: dict[str, float]) -> RoundPrivacy:
    values = list(epsilons.values())
    return RoundPrivacy(
        epsilon_max=max(values), epsilon_min=min(values), epsilon_per_client=epsilons,
        budget_exhausted_clients=[],
    )  # fmt: skip


def write_run(folder) -> RunSummary:
    """A finished private two-experience run: client 1 fails round 1 and first trains in round 2."""
    prepare_run_folder(folder, parse_scenario({"name": "by-hand", "stream": {"n_experiences": 2}}))
    records = [
        RoundRecord(
            round=1, experience=0, round_in_experience=1, accuracy=[0.9], mean_accuracy=0.9, train_loss=0.3,
            clients={"sampled": 2, "replied": 1, "failed": 1, "empty": 0}, per_client=[client(0, 1.5)],
            failures=[ClientFailure(partition_id=1, reason="ValueError: no")], wall_time_s=1.0,
            privacy=spent({"0": 1.5}),
        ),
        ExperienceRecord(0, [0.9]),
        RoundRecord(
            round=2, experience=1, round_in_experience=1, accuracy=[0.2, 0.8], mean_accuracy=0.5, train_loss=0.4,
            clients={"sampled": 2, "replied": 2, "failed": 0, "empty": 0}, per_client=[client(0, 2.0), client(1, 1.5)],
            wall_time_s=2.0, privacy=spent({"0": 2.0, "1": 1.5}),
        ),
        ExperienceRecord(1, [0.2, 0.8]),
    ]  # fmt: skip
    for record in records:
        append_metrics(folder, record)
    summary = RunSummary(
        name="by-hand", seed=0, strategy="fedavg", method="naive", num_clients=2, n_experiences=2, rounds=2,
        classes_per_experience=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], accuracy_matrix=[[0.9], [0.2, 0.8]],
        final_average_accuracy=0.5, average_forgetting=0.7, bwt=-0.7, clients_failed=1, wall_time_s=3.0, ray_nodes=[],
        privacy=PrivacySummary(
            delta=1e-4, accountant="rdp", max_grad_norm=1.0, noise_multiplier={"0": 1.0, "1": 1.0},
            target_epsilon=None, epsilon_max=2.0, epsilon_per_client={"0": 2.0, "1": 1.5}, budget_exhausted_clients=[],
        ),
        audit=AuditSummary(
            attack="loss threshold", auc_mean=0.51, auc_max=0.52, tpr_at_1pct_fpr_mean=0.01, tpr_at_1pct_fpr_max=0.02,
            per_client={c: ClientAudit(auc=0.5, tpr_at_1pct_fpr=0.01, members=10, nonmembers=10) for c in "01"},
        ),
    )  # fmt: skip
    write_summary(folder, summary)
    return summary


def test_typed_records_read_and_write_the_files_byte_for_byte(tmp_path):
    summary = write_run(tmp_path / "run")
    text = (tmp_path / "run" / SUMMARY_FILE).read_text()
    assert read_summary(tmp_path / "run") == summary
    assert list(json.loads(text)) == SUMMARY_KEYS
    assert json.dumps(read_summary(tmp_path / "run").to_dict(), indent=2) + "\n" == text
    lines = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["round", "experience", "round", "experience"]
    assert "failures" in json.loads(lines[0]) and "failures" not in json.loads(lines[2])
    assert [json.dumps(r.to_dict()) for r in read_rounds(tmp_path / "run")] == [lines[0], lines[2]]
    assert json.dumps(ExperienceRecord.from_dict(json.loads(lines[3])).to_dict()) == lines[3]

    old = RoundRecord.from_dict(json.loads(OLD_ROUND_LINE))
    assert json.dumps(old.to_dict()) == OLD_ROUND_LINE
    assert old.privacy.epsilon_per_client["1"] == old.per_client[1].epsilon and old.per_client[0].hostname == "vm"


def test_a_section_given_as_its_json_form_is_held_typed():
    """The server may hand sections over as dicts; readers see the same typed record either way."""
    typed = RoundRecord.from_dict(json.loads(OLD_ROUND_LINE))
    as_json = typed.to_dict()
    del as_json["type"]
    assert RoundRecord(**as_json) == typed
    assert isinstance(typed.per_client[0], ClientRoundRecord) and isinstance(typed.privacy, RoundPrivacy)


def test_a_summary_that_is_not_fedtide_s_fails_naming_the_file(tmp_path, run_cli):
    summary = write_run(tmp_path / "run").to_dict()
    del summary["accuracy_matrix"]
    (tmp_path / "run" / SUMMARY_FILE).write_text(json.dumps(summary))
    code, _, err = run_cli("report", str(tmp_path / "run"))
    assert code == 2 and f"{tmp_path / 'run' / SUMMARY_FILE}: is not a fedtide run file" in " ".join(err.split())


@pytest.mark.parametrize("args", [["--help"], ["report", "RUN"]], ids=["help", "report"])
def test_the_report_and_help_load_no_training_stack(tmp_path, args):
    write_run(tmp_path / "run")
    args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    code = (
        "import sys\n"
        "import fedtide.report.document, fedtide.report.figures, fedtide.report.runs, fedtide.records.run_folder\n"
        "from fedtide.cli.commands import main\n"
        "sys.argv = ['fedtide', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as done:\n    assert not done.code, done.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    if args[0] == "report":
        report = (tmp_path / "run" / "report.md").read_text()
        assert "fedavg + naive, 2 clients, 2 experiences" in report and "ε over rounds" in report
        assert (tmp_path / "run" / "figures" / "run-epsilon.png").stat().st_size > 5000


# What checking the quickstart needs from the data libraries the first time: the digits split
# (scikit-learn, which brings scipy and pandas) and the partitions (datasets, flwr-datasets).
# Once both are kept on disk (fedtide.data.cache), none of them; and never Avalanche, Ray,
# Opacus, or flwr-datasets' plotting helpers (seaborn, matplotlib).
FIRST_CHECK_ONLY = ("sklearn", "scipy", "pandas", "pyarrow", "datasets", "flwr_datasets")
NEVER_IN_VALIDATE = ("avalanche", "ray", "opacus", "seaborn", "matplotlib", "flwr_datasets.visualization")
WATCHED = FIRST_CHECK_ONLY + NEVER_IN_VALIDATE


@pytest.mark.slow
def test_validate_loads_no_avalanche_ray_or_opacus(tmp_path, monkeypatch):
    """Checking a scenario with a built-in method reads data and builds the model, nothing more.

    Checked again, with the digits split and the partitions kept on disk, it imports no data library.
    Each interpreter checks replay, then EWC, listing what each check left loaded.
    """
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path))
    code = (
        "import json, sys\n"
        "from fedtide.cli.commands import main\n"
        "for method in ('replay', 'ewc'):\n"
        "    sys.argv = ['fedtide', 'validate', 'scenarios/quickstart.yaml', '--set', f'continual.method={method}']\n"
        "    try:\n        main()\n    except SystemExit as done:\n        assert not done.code, done.code\n"
        f"    print('loaded:', json.dumps(sorted(m for m in {WATCHED!r} if m in sys.modules)))"
    )
    loaded = []
    for _ in range(2):  # nothing kept, then the digits split and the partitions kept
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("ok: 'quickstart'") == 2
        loaded.append([json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("loaded:")])
    (replay, ewc), kept = loaded
    assert "sklearn" in replay and "flwr_datasets" in replay  # the split and partitions were made
    assert not (set(replay) | set(ewc)) & set(NEVER_IN_VALIDATE) and kept == [[], []]


def write_plain_run(folder, continual: dict, seed: int, accuracy: float) -> None:
    """A finished non-private one-experience run of `continual` (a method and its parameters)."""
    prepare_run_folder(folder, parse_scenario({"name": folder.name, "seed": seed, "continual": continual,
                                               "stream": {"n_experiences": 1}}))  # fmt: skip
    append_metrics(folder, RoundRecord(
        round=1, experience=0, round_in_experience=1, accuracy=[accuracy], mean_accuracy=accuracy, train_loss=0.3,
        clients={"sampled": 1, "replied": 1, "failed": 0, "empty": 0}, per_client=[client(0, 0.0)], wall_time_s=1.0,
    ))  # fmt: skip
    append_metrics(folder, ExperienceRecord(0, [accuracy]))
    write_summary(folder, RunSummary(
        name=folder.name, seed=seed, strategy="fedavg", method=continual["method"], num_clients=1, n_experiences=1,
        rounds=1, classes_per_experience=[list(range(10))], accuracy_matrix=[[accuracy]],
        final_average_accuracy=accuracy, average_forgetting=0.0, bwt=0.0, clients_failed=0, wall_time_s=1.0,
        ray_nodes=[], audit=AuditSummary(
            attack="loss threshold", auc_mean=0.5, auc_max=0.5, tpr_at_1pct_fpr_mean=0.01, tpr_at_1pct_fpr_max=0.01,
            per_client={"0": ClientAudit(auc=0.5, tpr_at_1pct_fpr=0.01, members=10, nonmembers=10)},
        ),
    ))  # fmt: skip


def test_a_report_without_privacy_shows_no_privacy_and_compares_the_methods(tmp_path, run_cli):
    for seed, (naive, replay) in enumerate([(0.30, 0.60), (0.34, 0.70)]):
        write_plain_run(tmp_path / "sweep" / f"naive-{seed}", {"method": "naive"}, seed, naive)
        write_plain_run(tmp_path / "sweep" / f"replay-{seed}", {"method": "replay", "mem_size": 50}, seed, replay)
    code, _, err = run_cli("report", str(tmp_path / "sweep"))
    assert code == 0, err
    report = (tmp_path / "sweep" / "report.md").read_text()
    for privacy_only in ("noise σ", "δ", "Privacy-utility", "clients dropped", "| client |", "ε lower", "Canary"):
        assert privacy_only not in report
    assert (tmp_path / "sweep" / "report.csv").read_text().splitlines()[0].split(",")[:4] == [
        "run", "method", "strategy", "final accuracy %",
    ]
    assert "## Comparison" in report and (tmp_path / "sweep" / "figures" / "comparison.png").stat().st_size > 5000
    assert "| naive | none | 32.00 ± 2.00 |" in report and "| replay | none | 65.00 ± 5.00 |" in report
    assert "method parameters: mem_size=50." in report


def test_flwr_datasets_plotting_is_still_there_for_whoever_imports_it():
    """Partitioning imports flwr-datasets without its `visualization`; importing that later gets the real one."""
    code = (
        "import sys\n"
        "from fedtide.data.partition import flwr_partitioners\n"
        "flwr_partitioners()\n"
        "assert 'seaborn' not in sys.modules and 'flwr_datasets.visualization' not in sys.modules\n"
        "from flwr_datasets import visualization\n"
        "import flwr_datasets\n"
        "assert flwr_datasets.visualization is visualization is sys.modules['flwr_datasets.visualization']\n"
        "print(visualization.plot_label_distributions.__module__, 'seaborn' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["flwr_datasets.visualization.label_distribution", "True"]


def test_a_point_of_one_run_shows_its_spread_as_n_a_not_zero(tmp_path, run_cli):
    write_plain_run(tmp_path / "sweep" / "naive-0", {"method": "naive"}, 0, 0.30)
    write_plain_run(tmp_path / "sweep" / "replay-0", {"method": "replay", "mem_size": 50}, 0, 0.60)
    code, _, err = run_cli("report", str(tmp_path / "sweep"))
    assert code == 0, err
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "| naive | none | 30.00 ± n/a |" in report and "| replay | none | 60.00 ± n/a |" in report
    assert "± 0.00" not in report


def test_the_wall_time_is_split_into_start_up_rounds_and_end_of_run(tmp_path):
    from fedtide.report.console import wall_time_row

    write_plain_run(tmp_path / "old", {"method": "naive"}, 0, 0.5)
    old = read_summary(tmp_path / "old")  # written before the split: wall_time_s only, labelled as the rounds'
    assert old.startup_s is None and wall_time_row(old) == ("wall time (rounds)", "1.0 s")
    split = replace(old, startup_s=8.14, rounds_s=2.4, end_s=0.36)
    write_summary(tmp_path / "old", split)
    assert read_summary(tmp_path / "old") == split
    assert json.loads((tmp_path / "old" / SUMMARY_FILE).read_text())["startup_s"] == 8.14
    assert wall_time_row(split) == ("wall time", "10.9 s: start-up 8.1 s, rounds 2.4 s, end of run 0.4 s")
