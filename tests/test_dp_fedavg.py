"""DP-FedAvg's release against neighbouring client sets built by hand, and where it departs from Flower's wrappers.

Each test drives the wrapper the runs use (`federation_strategy`) on replies made here, so
a client's effect on a release is measured on the mechanism itself: two releases drawn
with the same seed carry the same noise, and their difference is exactly what one client
changed.
"""

import math
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAdam, FedAvg
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedtide.errors import ScenarioError
from fedtide.privacy.client_clipping import CLIENT_WEIGHT_KEY
from fedtide.privacy.client_level import client_level_mechanism
from fedtide.privacy.dp_fedavg import DPFedAvg, require_accountable
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.runner.validation import check_runnable
from fedtide.server.strategies import federation_strategy
from tests.conftest import small_scenario

CLIENTS = 8
C = 1.0
PROBE = 40_000  # coordinates no client moves: the noise alone, to measure its standard deviation
GRID = InProcessGrid(CLIENTS)  # also what lets a server make Messages (Flower's run identity)


def scenario_with(client_level: dict, strategy: str = "fedavg", fraction: float = 0.5, **strategy_parameters):
    return small_scenario(
        stream={"n_experiences": 2},
        partition={"kind": "iid", "num_clients": CLIENTS},
        federation={
            "strategy": {"name": strategy, **strategy_parameters},
            "fraction_train": fraction,
            "rounds_per_experience": 2,
        },
        continual={"method": "naive"},
        privacy={"enabled": True, "level": "client", "client_level": {"clipping_norm": C} | client_level},
    )


def model(signal, probe: np.ndarray | None = None) -> ArrayRecord:
    return ArrayRecord(
        {
            "signal": Array(np.asarray(signal, dtype=np.float32)),
            "probe": Array(np.zeros(PROBE, dtype=np.float32) if probe is None else probe.astype(np.float32)),
        }
    )


def reply(update, norm_bit: int | None = None, probe: np.ndarray | None = None) -> Message:
    metrics = {CLIENT_WEIGHT_KEY: 1.0, "num-examples": 10} | ({KEY_NORM_BIT: norm_bit} if norm_bit is not None else {})
    content = RecordDict({"arrays": model(update, probe), "metrics": MetricRecord(metrics)})
    return Message(content, dst_node_id=1, message_type="train")


def release(strategy, replies) -> dict[str, np.ndarray]:
    """One round of the wrapper from the zero model: configure (it keeps the round's global weights), aggregate."""
    strategy.configure_train(1, model(np.zeros(3)), ConfigRecord(), GRID)
    arrays, _ = strategy.aggregate_train(1, replies)
    return {key: array.numpy() for key, array in arrays.items()}


def shift_and_noise(scenario, sigma: float, first, second) -> tuple[float, float]:
    """How far one release moves between two sets of replies (same seed, so same noise), and the noise's std."""
    one = release(federation_strategy(scenario, sigma), first)
    other = release(federation_strategy(scenario, sigma), second)
    assert np.array_equal(one["probe"], other["probe"])  # the same noise: the difference is the clients'
    return float(np.linalg.norm(one["signal"] - other["signal"])), float(np.std(one["probe"]))


# Three sampled clients with large updates (clipped to C), and the client whose data differs:
# x pushes along the first axis, y (in x's place in a fixed-size sample) the opposite way.
OTHERS = [[0.0, 9.0, 0.0], [0.0, 0.0, 7.0], [0.0, -5.0, 5.0]]
X, Y, ZERO = [10.0, 0.0, 0.0], [-10.0, 0.0, 0.0], [0.0, 0.0, 0.0]
PAIRS = {  # (sampling, adjacency): the replies of a round on neighbouring client sets, the rest coupled
    ("poisson", "add_remove"): (OTHERS, [*OTHERS, X]),  # x's coin came up: its update is added
    ("fixed", "add_remove"): ([*OTHERS, Y], [*OTHERS, X]),  # x added to the population took y's place
    ("fixed", "replace_one"): ([*OTHERS, Y], [*OTHERS, X]),  # y's data replaced by x's
    ("fixed", "zero_out"): ([*OTHERS, ZERO], [*OTHERS, X]),  # x's update replaced by zero
}


@pytest.mark.parametrize(("sampling", "adjacency"), list(PAIRS))
def test_one_clients_largest_effect_on_a_release_is_the_sensitivity_the_accountant_is_charged(sampling, adjacency):
    sigma = 2.0
    scenario = scenario_with({"noise_multiplier": sigma, "sampling": sampling, "adjacency": adjacency})
    first, second = PAIRS[(sampling, adjacency)]
    shift, noise = shift_and_noise(scenario, sigma, [reply(u) for u in first], [reply(u) for u in second])
    mechanism = client_level_mechanism(scenario, sigma)
    # the release moved by `sensitivity` noise standard deviations over σ: the accountant's multiplier
    assert shift / noise == pytest.approx(1 / mechanism.accounted_noise_multiplier, rel=0.02)
    assert mechanism.accounted_noise_multiplier == (sigma if (sampling, adjacency) in {
        ("poisson", "add_remove"), ("fixed", "zero_out")} else sigma / 2)  # fmt: skip
    assert noise == pytest.approx(sigma * C / (0.5 * CLIENTS), rel=0.02)  # σ·C over the fixed denominator qN = m


def test_a_client_that_does_not_reply_leaves_the_denominator_and_the_noise_as_they_were():
    """Flower's wrapper averages the replies that came: a missing one makes each of the rest weigh more."""
    scenario = scenario_with({"noise_multiplier": 1.0, "sampling": "fixed"})
    everyone = release(federation_strategy(scenario, 1.0), [reply(u) for u in [*OTHERS, X]])
    one_missing = release(federation_strategy(scenario, 1.0), [reply(u) for u in OTHERS])
    assert np.array_equal(everyone["probe"], one_missing["probe"])
    moved = everyone["signal"] - one_missing["signal"]
    assert np.allclose(moved, [C / 4, 0, 0], atol=1e-6)  # x's clipped update over m = 4, nothing else moved


def test_poisson_sampling_takes_each_client_by_its_own_coin_at_the_rate_accounted():
    scenario = scenario_with({"noise_multiplier": 1.0}, fraction=0.3)
    strategy, grid = federation_strategy(scenario, 1.0), GRID
    taken = []
    random.seed(3)  # Flower's FedAvg lists the clients in an order drawn from `random`, seeded by the run
    for _ in range(600):
        messages = strategy.configure_train(1, model(np.zeros(3)), ConfigRecord(), grid)
        taken.append({message.metadata.dst_node_id for message in messages})
        strategy.aggregate_train(1, [])  # a release, noise only when nobody was sampled
    sizes = [len(nodes) for nodes in taken]
    assert len(set(sizes)) >= 5 and min(sizes) <= 1  # the sample's size is random, not m
    assert np.mean(sizes) == pytest.approx(0.3 * CLIENTS, rel=0.06)
    rates = [sum(node in nodes for nodes in taken) / len(taken) for node in grid.get_node_ids()]
    assert all(abs(rate - 0.3) < 0.07 for rate in rates), rates
    together = [sum(a in nodes and b in nodes for nodes in taken) / len(taken) for a, b in [grid.get_node_ids()[:2]]]
    assert together[0] == pytest.approx(0.09, abs=0.035)  # independent coins: q² for a pair
    again = federation_strategy(scenario, 1.0)  # the same seed draws the same coins
    random.seed(3)
    first = again.configure_train(1, model(np.zeros(3)), ConfigRecord(), grid)
    assert {m.metadata.dst_node_id for m in first} == taken[0]


def test_adaptive_clipping_moves_the_norm_towards_the_target_quantile_where_flower_moves_it_away():
    """Every update is clipped, so the median update norm is above C: Andrew et al. raise C; Flower lowers it."""
    sigma, settings = 1e-6, {"clipping": "adaptive", "clipped_count_stddev": 1e-3, "clip_norm_lr": 0.2}
    scenario = scenario_with({"noise_multiplier": sigma} | settings)
    ours = federation_strategy(scenario, sigma)
    release(ours, [reply(u) for u in [*OTHERS, X]])
    assert ours.clipping_norm == pytest.approx(C * math.exp(0.2 * 0.5), rel=1e-3)  # fraction unclipped 0
    flowers = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(weighted_by_key=CLIENT_WEIGHT_KEY), sigma, 4, initial_clipping_norm=C, clip_norm_lr=0.2,
        clipped_count_stddev=1e-3,
    )
    release(flowers, [reply(u) for u in [*OTHERS, X]])
    assert flowers.clipping_norm == pytest.approx(C * math.exp(-0.2 * 0.5), rel=1e-3)
    small = federation_strategy(scenario, sigma)  # every update well inside C: C falls towards them
    release(small, [reply([0.1, 0.0, 0.0]) for _ in range(4)])
    assert small.clipping_norm == pytest.approx(C * math.exp(-0.2 * 0.5), rel=1e-3)


def test_adaptive_noise_is_sized_for_the_norm_the_updates_were_clipped_at():
    sigma, settings = 0.5, {"clipping": "adaptive", "clipped_count_stddev": 1.0}
    scenario = scenario_with({"noise_multiplier": sigma} | settings)
    ours = federation_strategy(scenario, sigma)
    noise = np.std(release(ours, [reply(u) for u in [*OTHERS, X]])["probe"])
    assert ours.clipping_norm > 1.05 * C  # the norm moved after the round ...
    assert noise == pytest.approx(ours.update_noise_multiplier * C / 4, rel=0.02)  # ... its noise is for C
    flowers = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(weighted_by_key=CLIENT_WEIGHT_KEY), sigma, 4, initial_clipping_norm=C, clipped_count_stddev=1.0
    )
    flower_noise = np.std(release(flowers, [reply(u) for u in [*OTHERS, X]])["probe"])
    assert flower_noise == pytest.approx(flowers.noise_multiplier * flowers.clipping_norm / 4, rel=0.02)
    assert flowers.clipping_norm < 0.95 * C  # Flower's noise follows the norm it moved to, not the one it clipped at


@pytest.mark.parametrize("clip_on", ["server", "client"])
def test_one_client_moves_the_adaptive_count_by_half_and_the_two_queries_combine_to_sigma(clip_on):
    """Centred bits: a client's presence moves the count by ±½ whichever its bit (Flower's uncentred count: 0 or 1)."""
    sigma, settings = 0.5, {"clipping": "adaptive", "clipped_count_stddev": 1.0, "clip_on": clip_on}
    scenario = scenario_with({"noise_multiplier": sigma} | settings)

    def log_norm_after(updates: list[list[float]]) -> float:
        strategy = federation_strategy(scenario, sigma)
        bits = [int(np.linalg.norm(u) > C) for u in updates]
        release(strategy, [reply(u, bit if clip_on == "client" else None) for u, bit in zip(updates, bits)])
        return math.log(strategy.clipping_norm)

    without = log_norm_after(OTHERS)
    with_unclipped, with_clipped = log_norm_after([*OTHERS, [0.1, 0, 0]]), log_norm_after([*OTHERS, X])
    step = 0.2 * 0.5 / 4  # η · ½ / D
    assert with_unclipped - without == pytest.approx(-step, abs=1e-12)
    assert with_clipped - without == pytest.approx(step, abs=1e-12)
    strategy = federation_strategy(scenario, sigma)
    combined = (strategy.update_noise_multiplier**-2 + (2 * strategy.adaptive.count_stddev) ** -2) ** -0.5
    assert combined == pytest.approx(sigma, rel=1e-12)


def test_a_server_optimizer_is_handed_the_noisy_average():
    """DP-FedOpt: FedAdam's step from the noised average (Flower's wrapper noises FedAdam's output instead)."""
    adam = federation_strategy(scenario_with({"noise_multiplier": 1.0}, strategy="fedadam"), 1.0)
    average = federation_strategy(scenario_with({"noise_multiplier": 1.0}), 1.0)
    replies = [reply(u) for u in [*OTHERS, X]]
    stepped = release(adam, replies)
    noisy = release(average, [reply(u) for u in [*OTHERS, X]])
    reference = FedAdam(weighted_by_key=CLIENT_WEIGHT_KEY)
    reference.configure_train(1, model(np.zeros(3)), ConfigRecord(), GRID)
    arrays, _ = reference.aggregate_train(1, [reply(noisy["signal"], probe=noisy["probe"])])
    assert np.allclose(arrays["signal"].numpy(), stepped["signal"])
    assert np.allclose(arrays["probe"].numpy(), stepped["probe"])
    assert not np.allclose(stepped["signal"], noisy["signal"])  # FedAdam did take a step of its own


@pytest.mark.parametrize(
    ("name", "parameters"),
    [(name, {}) for name in ("krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg")]
    + [("qfedavg", {"client_learning_rate": 0.1})],
)
def test_aggregates_the_noise_does_not_cover_are_refused_before_anything_runs(name, parameters):
    with pytest.raises(ScenarioError) as raised:
        check_runnable(scenario_with({"noise_multiplier": 1.0}, strategy=name, **parameters))
    assert raised.value.field == "federation.strategy.name" and "FedAvg" in str(raised.value)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_averages_and_server_optimizers_are_accepted(name):
    check_runnable(scenario_with({"noise_multiplier": 1.0}, strategy=name))


def test_a_user_strategy_with_its_own_aggregate_and_sampling_parameters_are_refused():
    class Reweighted(FedAvg):
        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, replies)

    scenario = scenario_with({"noise_multiplier": 1.0})
    with pytest.raises(ScenarioError, match="federation.strategy.name: client-level DP accounts"):
        require_accountable(Reweighted(), scenario)

    class Renamed(FedAvg):  # keeps FedAvg's aggregate: accepted
        pass

    require_accountable(Renamed(), scenario)
    for parameter, value in (("fraction_train", 0.9), ("weighted_by_key", "num-examples")):
        with pytest.raises(ScenarioError) as raised:
            check_runnable(scenario_with({"noise_multiplier": 1.0}, **{parameter: value}))
        assert raised.value.field == f"federation.strategy.{parameter}"


def test_a_strategy_that_samples_on_its_own_is_stopped_at_the_first_round():
    class SamplesTwo(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            return list(super().configure_train(server_round, arrays, config, grid))[:2]

    scenario = scenario_with({"noise_multiplier": 1.0})
    wrapper = DPFedAvg(SamplesTwo(weighted_by_key=CLIENT_WEIGHT_KEY), 1.0, C, CLIENTS, 0.5)
    with pytest.raises(ValueError, match="sent 2 train messages where client-level DP expects 8"):
        wrapper.configure_train(1, model(np.zeros(3)), ConfigRecord(), GRID)
    assert scenario.privacy.client_level.sampling == "poisson"
