"""The canary audit on real runs: a clear lower bound on ε without DP, never above the accountant's ε with it.

In-process digits runs of one experience, two IID clients, 200 canaries and many local
epochs (20 per round, 2 rounds): non-private, the final model has memorised its canaries
and the audit's bound on ε is well above 1; the same training under DP-SGD at ε = 1, and
under client-level DP at ε = 1, must give a bound below the accountant's ε. Each of those
checks first asserts that the audit's ceiling (ε lower with every guess right) is above
that ε, so that "ε lower ≤ ε" could fail, and the non-private twin shows that these
canaries do reach above it when nothing protects them.

Client-level DP's default δ = 1 / (10 · N) is 0.05 for two clients, where 200 canaries can
show nothing (ceiling 0): the client-level twin sets `client_level.delta: 1e-4` instead,
far cheaper than the some hundred clients that would bring the default δ low enough
(README, "Canary audit", has the numbers). A third client-level run keeps the default δ
to check that the record, the console and the report say that such an audit could not
have detected a violation.
"""

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from rich.console import Console

from fedtide.audit.canaries import audit_ceiling, bound_from_scores, canary_scores
from fedtide.data.datasets import load_dataset
from fedtide.data.stream_plan import stream_plan
from fedtide.models import build_scenario_model
from fedtide.privacy.accounting import client_delta
from fedtide.privacy.client_level import client_level_delta
from fedtide.records.run_folder import MODEL_FILE, create_run_folder, read_summary
from fedtide.records.summary import RunSummary
from fedtide.report.console import summary_view
from fedtide.report.document import Text, build_blocks
from fedtide.report.runs import find_runs
from fedtide.runner.simulation import simulate_in_process
from fedtide.scenario.loading import parse_scenario

CANARIES = 200
BLIND = "could not have detected a violation at ε"


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
    """The non-private run and its DP twins, side by side in one folder as a sweep's points are."""
    folder = tmp_path_factory.mktemp("sweep")
    runs = {}
    client_level = {"enabled": True, "level": "client", "client_level": {"target_epsilon": 1.0}}
    for name, privacy in (
        ("plain", {}),
        ("dp", {"enabled": True, "target_epsilon": 1.0}),
        # replace-one: a canary's coin is one neighbouring step (under add/remove it is two: group privacy)
        ("client-dp", {**client_level, "client_level": {
            "target_epsilon": 1.0, "delta": 1e-4, "sampling": "fixed", "adjacency": "replace_one"}}),  # fmt: skip
        ("client-dp-default-delta", client_level),  # δ = 1 / (10 · 2)
    ):
        scenario = audit_scenario(name=name, privacy=privacy)
        run_dir = create_run_folder(scenario, folder)
        simulate_in_process(scenario, run_dir)
        runs[name] = (scenario, run_dir, json.loads((run_dir / "summary.json").read_text()))
    return folder, runs


@pytest.mark.slow
def test_a_non_private_run_with_many_local_epochs_gives_a_clear_lower_bound(sweep):
    _, runs = sweep
    scenario, run_dir, summary = runs["plain"]
    audit = summary["audit"]["canaries"]
    canaries = stream_plan(scenario).canaries
    assert audit["canaries"] == CANARIES and audit["included"] == int(canaries.included.sum())
    assert audit["confidence"] == 0.95 and audit["delta"] == client_delta(scenario)  # the δ DP would use
    assert audit["epsilon_lower"] >= 1.0, audit
    assert audit["correct"] / audit["guesses"] > 0.9
    assert audit["epsilon_ceiling"] == audit_ceiling(CANARIES, audit["delta"], 0.95) >= audit["epsilon_lower"]
    # the record is what the saved final model gives
    model = build_scenario_model(scenario)
    model.load_state_dict(torch.load(run_dir / MODEL_FILE))
    images = load_dataset("digits").test_x[torch.from_numpy(canaries.image)]
    scores = canary_scores(model, canaries, images)
    epsilon, guesses, correct, k_in, k_out = bound_from_scores(scores, canaries.included, audit["delta"], 0.95)
    assert (epsilon, guesses, correct, k_in, k_out) == (
        audit["epsilon_lower"], audit["guesses"], audit["correct"], audit["guesses_in"], audit["guesses_out"],
    )  # fmt: skip
    assert np.mean(scores[canaries.included]) > np.mean(scores[~canaries.included]) + 2


@pytest.mark.slow
def test_under_dp_the_lower_bound_never_beats_the_accountant(sweep):
    _, runs = sweep
    _, _, plain = runs["plain"]
    _, _, summary = runs["dp"]
    epsilon = summary["privacy"]["epsilon_max"]
    audit = summary["audit"]["canaries"]
    assert 0.9 < epsilon <= 1.0
    assert audit["delta"] == summary["privacy"]["delta"]
    assert audit["epsilon_ceiling"] > epsilon + 1  # the check below can fail: these canaries could show more
    assert audit["epsilon_lower"] <= epsilon, audit
    # the same training without DP beats this ε by far: the test fails if canaries escaped DP-SGD
    assert plain["audit"]["canaries"]["epsilon_lower"] > epsilon + 0.3


@pytest.mark.slow
def test_under_client_level_dp_the_canaries_are_audited_against_the_client_level_guarantee(sweep):
    _, runs = sweep
    _, _, plain = runs["plain"]
    scenario, _, summary = runs["client-dp"]
    level, audit = summary["client_level"], summary["audit"]["canaries"]
    assert "privacy" not in summary and 0.9 < level["epsilon"] <= 1.0 and level["adjacency"] == "replace_one"
    assert audit["delta"] == level["delta"] == client_level_delta(scenario) == 1e-4
    assert audit["epsilon_audited"] == level["epsilon"]
    assert audit["epsilon_ceiling"] > level["epsilon"] + 1  # the check below can fail
    assert audit["epsilon_lower"] <= level["epsilon"], audit
    # unprotected, the same canaries beat this ε (at δ 1.4e-4; at the smaller 1e-4 their bound is only higher)
    assert plain["audit"]["canaries"]["delta"] > audit["delta"]
    assert plain["audit"]["canaries"]["epsilon_lower"] > level["epsilon"] + 0.3


@pytest.mark.slow
def test_at_the_default_client_level_delta_of_two_clients_the_audit_is_blind_and_says_so(sweep):
    """δ = 0.05: no outcome of 200 canaries rejects (ε, δ)-DP at any ε, so "ε lower ≤ ε" holds whatever leaked."""
    _, runs = sweep
    _, run_dir, summary = runs["client-dp-default-delta"]
    level, audit = summary["client_level"], summary["audit"]["canaries"]
    assert level["delta"] == 0.05 and level["adjacency"] == "add_remove"
    # a canary's coin changes one sample: two add/remove steps at the client level (group privacy)
    assert audit["epsilon_audited"] == 2 * level["epsilon"]
    assert audit["delta"] == pytest.approx((1 + math.exp(level["epsilon"])) * 0.05)
    assert audit["epsilon_ceiling"] == audit["epsilon_lower"] == 0.0
    console = Console(record=True, width=200)
    console.print(summary_view(read_summary(run_dir)))
    assert f"{BLIND} {audit['epsilon_audited']:.3f}" in console.export_text()


@pytest.mark.slow
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
    assert "![ε lower bound (canary audit) against the ε that protects a canary](figures/canary_epsilon.png)" in report
    assert (folder / "figures" / "canary_epsilon.png").stat().st_size > 5000
    columns = "| run | canaries | in | guesses in/out | right | confidence | δ | ε lower | ceiling | ε (a canary) |"
    assert columns in report
    assert (
        "Could not have detected a violation at their ε (ceiling not above ε): "
        f"{folder.name}/client-dp-default-delta.\n" in report
    )
    epsilons = {"plain": "–", "dp": f"{runs['dp'][2]['privacy']['epsilon_max']:.2f}"}
    epsilons |= {
        name: f"{runs[name][2]['audit']['canaries']['epsilon_audited']:.2f}" for name in runs if name != "plain"
    }
    for name, epsilon in epsilons.items():
        audit = runs[name][2]["audit"]["canaries"]
        row = (
            f"| {folder.name}/{name} | {CANARIES} | {audit['included']} | {audit['guesses_in']}/{audit['guesses_out']} "
            f"| {audit['correct']}/{audit['guesses']} | 95% | {audit['delta']:.1e} | {audit['epsilon_lower']:.2f} "
            f"| {audit['epsilon_ceiling']:.2f} | {epsilon} |"
        )
        assert row in report
        console = Console(record=True, width=200)
        console.print(summary_view(read_summary(runs[name][1])))
        text = console.export_text()
        (line,) = [line for line in text.splitlines() if "ε lower bound (canary audit, 95%) │" in line]
        assert (
            f"│ {audit['epsilon_lower']:.3f} (ceiling {audit['epsilon_ceiling']:.3f}; "
            f"{audit['correct']}/{audit['guesses']} guesses right, {CANARIES} canaries" in " ".join(line.split())
        )
        assert (BLIND in text) == (name == "client-dp-default-delta")


@pytest.mark.slow
def test_a_summary_written_before_the_ceiling_existed_reads_writes_back_and_shows_without_it(sweep):
    _, runs = sweep
    _, run_dir, summary = runs["client-dp-default-delta"]
    raw = copy.deepcopy(summary)
    del raw["audit"]["canaries"]["epsilon_ceiling"]
    del raw["audit"]["canaries"]["epsilon_audited"]
    old = RunSummary.from_dict(raw)
    assert old.audit.canaries.epsilon_ceiling is None and old.audit.canaries.epsilon_audited is None
    assert json.dumps(old.to_dict()) == json.dumps(raw)  # the same keys in the same order
    audit = raw["audit"]["canaries"]
    console = Console(record=True, width=200)
    console.print(summary_view(old))
    text = " ".join(console.export_text().split())
    assert f"│ {audit['epsilon_lower']:.3f} ({audit['correct']}/{audit['guesses']} guesses right" in text
    assert BLIND not in text  # without a ceiling the console claims nothing about the audit's reach
    (run,), _ = find_runs([run_dir])
    blocks = build_blocks([replace(run, summary=old)])
    (table,) = [block for block in blocks if getattr(block, "columns", [None])[-2:] == ["ceiling", "ε (a canary)"]]
    assert table.rows[0][-2:] == ["–", "–"]
    assert not any(isinstance(block, Text) and "Could not have detected" in block.text for block in blocks)
