"""Client-level DP: Flower's DP wrappers around the scenario's strategy, clipping that binds, and ε by Opacus."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtide.aggregation import build_strategy
from fedtide.errors import ScenarioError
from fedtide.privacy.client_level import (
    CLIENT_WEIGHT_KEY,
    client_level_delta,
    client_level_epsilon,
    client_noise_multiplier,
    prepare_reply,
    wrap_strategy,
)
from fedtide.run_files import RunSummary, create_run_folder, read_rounds
from fedtide.server.continual_strategy import ContinualStrategy
from fedtide.server.federation import run_federation
from fedtide.validation import check_runnable
from tests.conftest import small_scenario
from tests.test_continual_strategy import RecordingGrid

CLIENTS = 4


def scenario_with(client_level: dict, level: str = "client", **sections):
    raw = {
        "stream": {"n_experiences": 2},
        "partition": {"kind": "iid", "num_clients": CLIENTS},
        "federation": {"rounds_per_experience": 2},
        "continual": {"method": "naive"},
        "privacy": {"enabled": True, "level": level, "client_level": client_level},
    }
    return small_scenario(**(raw | sections))


def run(scenario, tmp_path, grid=None) -> tuple[RunSummary, RecordingGrid]:
    grid = grid or RecordingGrid(scenario.partition.num_clients)
    check_runnable(scenario)
    return run_federation(grid, scenario, create_run_folder(scenario, tmp_path)), grid


def global_weights_per_round(grid: RecordingGrid) -> list[list[np.ndarray]]:
    """The global model each round started from (the arrays of its first train message)."""
    firsts: dict[tuple[int, int], ArrayRecord] = {}
    for message in grid.delivered:
        config = message.content["config"]
        firsts.setdefault((int(config["round-offset"]), int(config["server-round"])), message.content["arrays"])
    return [firsts[key].to_numpy_ndarrays() for key in sorted(firsts)]


def steps(weights: list[list[np.ndarray]]) -> list[float]:
    """The L2 distance the global model moved in each round."""
    return [
        float(np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b, strict=True))))
        for a, b in zip(weights, weights[1:])
    ]


def test_epsilon_is_opacus_rdp_over_every_round_at_the_client_sampling_rate(tmp_path):
    scenario = scenario_with(
        {"noise_multiplier": 1.5},
        federation={"rounds_per_experience": 2, "fraction_train": 0.5, "min_train_nodes": 1},
    )
    summary, _ = run(scenario, tmp_path)
    level = summary.client_level
    assert summary.privacy is None and summary.privacy_level == "client"
    assert (level.noise_multiplier, level.sample_rate, level.sampled_per_round, level.rounds) == (1.5, 0.5, 2, 4)
    assert level.aggregated_per_round == [2, 2, 2, 2]
    assert level.delta == client_level_delta(scenario) == 1 / (10 * CLIENTS)
    # recomputed from the summary alone, with Opacus's own accountant
    accountant = RDPAccountant()
    accountant.history = [(level.noise_multiplier, level.sample_rate, level.rounds)]
    assert level.epsilon == pytest.approx(accountant.get_epsilon(delta=level.delta), rel=1e-9)
    per_round = [r.client_level.epsilon for r in read_rounds(tmp_path / "small")]
    assert len(per_round) == 4 and per_round == sorted(per_round) and per_round[0] > 0
    assert per_round[-1] == pytest.approx(level.epsilon, rel=1e-9)
    # sampling half the clients amplifies: every client in every round spends more at the same noise
    everyone = scenario_with({"noise_multiplier": 1.5})
    assert client_level_epsilon(everyone, 1.5, [4] * 4) > level.epsilon


def test_target_epsilon_calibrates_the_noise_to_spend_at_most_the_target():
    for accountant, opacus_accountant in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        scenario = scenario_with({"target_epsilon": 3.0})
        scenario.privacy.accountant = accountant
        sigma = client_noise_multiplier(scenario)
        spent = client_level_epsilon(scenario, sigma, [CLIENTS] * scenario.total_rounds)
        assert 2.7 < spent <= 3.0, accountant
        check = opacus_accountant()
        check.history = [(sigma, 1.0, scenario.total_rounds)]
        assert check.get_epsilon(delta=client_level_delta(scenario)) == pytest.approx(spent, rel=1e-6)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_clipping_on_the_server_or_on_the_clients_gives_the_same_run(tmp_path, clipping):
    settings = {"noise_multiplier": 0.3, "clipping": clipping, "clipping_norm": 0.5, "clipped_count_stddev": 1.0}
    server, _ = run(scenario_with(settings | {"clip_on": "server"}, name="server"), tmp_path)
    client, _ = run(scenario_with(settings | {"clip_on": "client"}, name="client"), tmp_path)
    assert server.accuracy_matrix == client.accuracy_matrix
    assert server.client_level.clipping_norm == pytest.approx(client.client_level.clipping_norm)
    if clipping == "adaptive":  # the norm moved towards the median update norm
        assert server.client_level.clipping_norm != 0.5


def test_each_round_moves_the_global_model_by_at_most_the_clipping_norm(tmp_path):
    """With negligible noise the new global model is the equal-weight mean of clipped clients' models."""
    tight, tight_grid = run(scenario_with({"noise_multiplier": 1e-9, "clipping_norm": 0.05}, name="tight"), tmp_path)
    loose, loose_grid = run(scenario_with({"noise_multiplier": 1e-9, "clipping_norm": 1e6}, name="loose"), tmp_path)
    tight_steps = steps(global_weights_per_round(tight_grid))
    loose_steps = steps(global_weights_per_round(loose_grid))
    assert all(step <= 0.05 * (1 + 1e-4) for step in tight_steps), tight_steps
    assert max(tight_steps) > 0.04  # clients moved further: the bound binds
    assert min(loose_steps) > 0.05
    assert tight.final_average_accuracy != loose.final_average_accuracy


def test_more_noise_costs_accuracy_and_the_noise_does_not_depend_on_what_else_drew_from_numpy(tmp_path):
    quiet, _ = run(scenario_with({"noise_multiplier": 1e-3}, name="quiet"), tmp_path)
    noisy, _ = run(scenario_with({"noise_multiplier": 5.0}, name="noisy"), tmp_path)
    assert quiet.final_average_accuracy > noisy.final_average_accuracy + 0.1
    np.random.seed(12345)  # a different global numpy state before the run: the server reseeds per round
    again, _ = run(scenario_with({"noise_multiplier": 5.0}, name="noisy-again"), tmp_path)
    assert again.accuracy_matrix == noisy.accuracy_matrix


def test_both_levels_in_one_run_report_both_epsilons(tmp_path):
    scenario = scenario_with({"target_epsilon": 8.0}, level="both")
    scenario.privacy.noise_multiplier = 1.0
    summary, _ = run(scenario, tmp_path)
    assert summary.privacy_level == "both"
    assert summary.privacy.epsilon_max > 0 and 0 < summary.client_level.epsilon <= 8.0
    assert summary.epsilon_of("sample") == summary.privacy.epsilon_max  # two guarantees, never their min
    assert summary.epsilon_of("client") == summary.client_level.epsilon
    rounds = read_rounds(tmp_path / "small")
    assert all(r.privacy is not None and r.client_level is not None for r in rounds)


def test_clients_are_averaged_with_equal_weights_under_client_level_dp():
    scenario = scenario_with({"noise_multiplier": 1.0})
    strategy = build_strategy(scenario.federation, CLIENTS, CLIENT_WEIGHT_KEY)
    assert strategy.weighted_by_key == CLIENT_WEIGHT_KEY
    wrapped = wrap_strategy(strategy, scenario, 1.0)
    assert isinstance(wrapped, DifferentialPrivacyServerSideFixedClipping) and wrapped.strategy is strategy
    named = ContinualStrategy(wrapped, reference=ArrayRecord(), partition_of={})
    assert named.name == "flwr.serverapp.strategy.fedavg.FedAvg"  # errors name the user's strategy
    own = scenario_with({"noise_multiplier": 1.0}, federation={"strategy": {"name": "fedavg", "weighted_by_key": "x"}})
    assert build_strategy(own.federation, CLIENTS, CLIENT_WEIGHT_KEY).weighted_by_key == "x"  # the user's wins
    assert isinstance(build_strategy(scenario.federation, CLIENTS), FedAvg)


def reply(arrays: list[np.ndarray], examples: int = 10) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({f"w{i}": Array(a) for i, a in enumerate(arrays)}),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_a_client_clips_its_update_with_flowers_functions(clipping):
    scenario = scenario_with({"clip_on": "client", "clipping": clipping, "clipped_count_stddev": 1.0})
    sent = ArrayRecord({"w0": Array(np.zeros(3, dtype=np.float32)), "w1": Array(np.ones(1, dtype=np.float32))})
    content = reply([np.array([3.0, 0.0, 0.0], dtype=np.float32), np.array([5.0], dtype=np.float32)])  # |Δ| = 5
    prepare_reply(scenario, ConfigRecord({KEY_CLIPPING_NORM: 2.0}), sent, content)
    clipped = content["arrays"].to_numpy_ndarrays()
    assert np.allclose(clipped[0], [1.2, 0, 0]) and np.allclose(clipped[1], [1 + 1.6])  # Δ scaled by 2/5
    assert clipped[0].dtype == np.float32 and list(content["arrays"].keys()) == ["w0", "w1"]
    assert content["metrics"][CLIENT_WEIGHT_KEY] == 1.0
    assert (KEY_NORM_BIT in content["metrics"]) == (clipping == "adaptive")
    if clipping == "adaptive":
        assert content["metrics"][KEY_NORM_BIT] == 1


def test_server_side_clipping_leaves_the_reply_to_the_server():
    scenario = scenario_with({"noise_multiplier": 1.0})
    content = reply([np.array([30.0], dtype=np.float32)])
    prepare_reply(scenario, ConfigRecord({}), ArrayRecord({"w0": Array(np.zeros(1, dtype=np.float32))}), content)
    assert content["arrays"].to_numpy_ndarrays()[0][0] == 30.0
    assert content["metrics"][CLIENT_WEIGHT_KEY] == 1.0


@pytest.mark.parametrize(
    ("client_level", "field", "fix"),
    [
        ({"delta": 0.5}, "privacy.client_level.delta", "use a delta below 2.5e-01"),
        ({"target_epsilon": 1e-4, "delta": 1e-6}, "privacy.client_level.target_epsilon", "raise target_epsilon"),
        (
            {"clipping": "adaptive", "noise_multiplier": 1.0},
            "privacy.client_level.clipped_count_stddev",
            "set clipped_count_stddev above 0.5",
        ),
    ],
)
def test_impossible_client_level_settings_name_the_field(client_level, field, fix):
    with pytest.raises(ScenarioError) as raised:
        check_runnable(scenario_with(client_level))
    assert raised.value.field == field and fix in str(raised.value)


def test_noise_and_target_together_are_refused():
    with pytest.raises(ScenarioError, match="privacy.client_level: give noise_multiplier or target_epsilon, not both"):
        scenario_with({"noise_multiplier": 1.0, "target_epsilon": 3.0})



def test_a_report_draws_sample_and_client_level_runs_as_separate_series(tmp_path):
    from fedtide.report.document import TableBlock, build_blocks
    from fedtide.report.runs import find_runs, seed_groups

    base = {"stream": {"n_experiences": 1}, "federation": {"rounds_per_experience": 2}}
    for name, privacy in (
        ("none", {"enabled": False}),
        ("sample", {"enabled": True, "level": "sample", "noise_multiplier": 1.0}),
        ("client", {"enabled": True, "level": "client", "client_level": {"noise_multiplier": 1.0}}),
    ):
        scenario = small_scenario(name=name, privacy=privacy, continual={"method": "naive"}, **base)
        run_federation(RecordingGrid(4), scenario, create_run_folder(scenario, tmp_path / "runs"))
    runs, _ = find_runs([tmp_path / "runs"])
    by_name = {run.run_id.split("/")[-1]: run for run in runs}
    assert by_name["client"].epsilon == by_name["client"].summary.client_level.epsilon
    assert by_name["client"].noise == 1.0 and by_name["client"].delta == 1 / (10 * CLIENTS)
    assert by_name["none"].epsilon is None and by_name["none"].delta is None
    series = {point.series for point in seed_groups(runs)}
    assert series == {"naive", "naive sample-level DP", "naive client-level DP"}
    table = next(b for b in build_blocks(runs) if isinstance(b, TableBlock))
    level = table.columns.index("DP level")
    assert sorted(row[level] for row in table.rows) == ["client", "sample", "–"]


def test_a_round_that_averages_fewer_updates_than_it_sampled_is_accounted_at_its_smaller_noise(tmp_path):
    """Dirichlet(0.05) over 5 experiences leaves a client without data in the first four: its reply
    is not averaged, the mean has 3 terms while the noise was calibrated to 4 (sensitivity C/3)."""
    scenario = scenario_with(
        {"noise_multiplier": 2.0},
        stream={"n_experiences": 5},
        partition={"kind": "dirichlet", "alpha": 0.05, "num_clients": CLIENTS},
        federation={"rounds_per_experience": 1},
    )
    summary, _ = run(scenario, tmp_path)
    level = summary.client_level
    rounds = read_rounds(tmp_path / "small")
    trained = [sum(c.num_examples > 0 for c in r.per_client) for r in rounds]
    assert level.aggregated_per_round == [r.client_level.aggregated for r in rounds] == trained
    assert min(trained) < CLIENTS
    accountant = RDPAccountant()  # recomputed from the summary alone, round by round
    accountant.history = [
        (level.noise_multiplier * a / level.sampled_per_round, level.sample_rate, 1) for a in level.aggregated_per_round
    ]
    assert level.epsilon == pytest.approx(accountant.get_epsilon(delta=level.delta), rel=1e-9)
    assert level.epsilon > client_level_epsilon(scenario, 2.0, [CLIENTS] * len(rounds))  # more than planned
