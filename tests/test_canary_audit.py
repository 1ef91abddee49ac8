"""The canary audit on real runs: a clear lower bound on ε without DP, never above the accountant's ε with it.

Two in-process digits runs of one experience, two IID clients, 200 canaries and many
local epochs (20 per round, 2 rounds): non-private, the final model has memorised its
canaries and the audit's bound on ε is well above 1; the same training under DP-SGD at
ε = 1 must give a bound below the accountant's ε, which the non-private twin shows the
audit could have exceeded.
"""

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from fedtide.data.datasets import load_dataset
from fedtide.data.loading import parse_scenario
from fedtide.data.split import experience_canaries
from fedtide.metrics.canary_audit import bound_from_scores, canary_scores
from fedtide.models import build_scenario_model
from fedtide.privacy.accounting import client_delta
from fedtide.privacy.client_level import client_level_delta
from fedtide.report.console import summary_view
from fedtide.run_files import MODEL_FILE, create_run_folder, read_summary
from fedtide.simulation import simulate_in_process

CANARIES = 200


def audit_scenario(**sections):
    return parse_scenario(
        {
            "name": "canaries",
            "stream": {"n_experiences": 1},
            "partition": {"kind": "iid", "num_clients": 2},
            "federation": {"rounds_per_experience": 2},
            "client": {"epochs": 20, "lr": 0.2},
            "continual": {"method": "naive"},
            "resources": {"backend": "in_process"},
            "checkpoint": {"every": 0},
            "audit": {"canaries": CANARIES},
            **sections,
        }
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The non-private run and its DP twin, side by side in one folder as a sweep's points are."""
    folder = tmp_path_factory.mktemp("sweep")
    runs = {}
    for name, privacy in (
        ("plain", {}),
        ("dp", {"enabled": True, "target_epsilon": 1.0}),
        ("client-dp", {"enabled": True, "level": "client", "client_level": {"target_epsilon": 1.0}}),
    ):
        scenario = audit_scenario(name=name, privacy=privacy)
        run_dir = create_run_folder(scenario, folder)
        simulate_in_process(scenario, run_dir)
        runs[name] = (scenario, run_dir, json.loads((run_dir / "summary.json").read_text()))
    return folder, runs


def test_a_non_private_run_with_many_local_epochs_gives_a_clear_lower_bound(sweep):
    _, runs = sweep
    scenario, run_dir, summary = runs["plain"]
    audit = summary["audit"]["canaries"]
    canaries = experience_canaries(scenario)
    assert audit["canaries"] == CANARIES and audit["included"] == int(canaries.included.sum())
    assert audit["confidence"] == 0.95 and audit["delta"] == client_delta(scenario)  # the δ DP would use
    assert audit["epsilon_lower"] >= 1.0, audit
    assert audit["correct"] / audit["guesses"] > 0.9
    # the record is what the saved final model gives
    model = build_scenario_model(scenario, (1, 8, 8))
    model.load_state_dict(torch.load(run_dir / MODEL_FILE))
    images = load_dataset("digits").test_x[torch.from_numpy(canaries.image)]
    scores = canary_scores(model, canaries, images)
    epsilon, guesses, correct, k_in, k_out = bound_from_scores(scores, canaries.included, audit["delta"], 0.95)
    assert (epsilon, guesses, correct, k_in, k_out) == (
        audit["epsilon_lower"], audit["guesses"], audit["correct"], audit["guesses_in"], audit["guesses_out"],
    )  # fmt: skip
    assert np.mean(scores[canaries.included]) > np.mean(scores[~canaries.included]) + 2


def test_under_dp_the_lower_bound_never_beats_the_accountant(sweep):
    _, runs = sweep
    _, _, plain = runs["plain"]
    _, _, summary = runs["dp"]
    epsilon = summary["privacy"]["epsilon_max"]
    audit = summary["audit"]["canaries"]
    assert 0.9 < epsilon <= 1.0
    assert audit["delta"] == summary["privacy"]["delta"]
    assert audit["epsilon_lower"] <= epsilon, audit
    # the same training without DP beats this ε by far: the test fails if canaries escaped DP-SGD
    assert plain["audit"]["canaries"]["epsilon_lower"] > epsilon + 0.3


def test_under_client_level_dp_the_canaries_are_audited_against_the_client_level_guarantee(sweep):
    _, runs = sweep
    scenario, _, summary = runs["client-dp"]
    level, audit = summary["client_level"], summary["audit"]["canaries"]
    assert "privacy" not in summary and 0.9 < level["epsilon"] <= 1.0
    assert audit["delta"] == level["delta"] == client_level_delta(scenario)
    assert audit["epsilon_lower"] <= level["epsilon"], audit


def test_the_report_and_the_console_put_the_bound_beside_the_accountant_s_epsilon(sweep, run_cli):
    folder, runs = sweep
    code, _, err = run_cli("report", str(folder))
    assert code == 0, err
    report = (folder / "report.md").read_text()
    assert (
        "| run | method | strategy | DP level | σ (sample) | ε (sample) | δ (sample) | σ (client) | ε (client) "
        "| δ (client) | ε lower |" in report
    )
    assert "### Canary audit: a lower bound on ε" in report
    assert "![ε lower bound (canary audit) against the accountant's ε](figures/canary_epsilon.png)" in report
    assert (folder / "figures" / "canary_epsilon.png").stat().st_size > 5000
    for name, epsilon in (("plain", "∞"), ("dp", f"{runs['dp'][2]['privacy']['epsilon_max']:.2f}")):
        audit = runs[name][2]["audit"]["canaries"]
        row = (
            f"| {folder.name}/{name} | {CANARIES} | {audit['included']} | {audit['guesses_in']}/{audit['guesses_out']} "
            f"| {audit['correct']}/{audit['guesses']} | 95% | {audit['delta']:.1e} | {audit['epsilon_lower']:.2f} "
            f"| {epsilon} |"
        )
        assert row in report
        console = Console(record=True, width=200)
        console.print(summary_view(read_summary(runs[name][1])))
        assert (
            f"ε lower bound (canary audit, 95%) │ {audit['epsilon_lower']:.3f} ({audit['correct']}/{audit['guesses']} "
            f"guesses right, {CANARIES} canaries" in console.export_text()
        )
