"""Streams out of lockstep keep fedtide's semantics (issue 22 item 3).

The schedule gives each client the steps its rules say; a client trains only on the classes
its schedule gives it at each round and only while it is in the stream; it consolidates
each experience it finished exactly once, at the weights that ended it, whatever the
sampling, faults, arrivals and departures; DP plans and calibrates each client's noise on
its own rounds; a run stopped and resumed, or run on Ray, gives the numbers of the
uninterrupted in-process run; a domain experience is the data under its transform.

Three small digits runs (4 experiences or fewer, 1-2 rounds each, 1 epoch) serve most tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from torchvision.transforms import RandomRotation

from fedtide.audit.membership import AuditedImages
from fedtide.continual.methods import build_method
from fedtide.data.datasets import load_dataset
from fedtide.data.stream import client_experiences, training_pool
from fedtide.data.stream_plan import stream_plan
from fedtide.privacy.accounting import noise_multiplier, planned_steps
from fedtide.records.checkpoint_files import checkpoint_round
from fedtide.records.run_folder import create_run_folder, read_metrics
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.runner.simulation import simulate, simulate_in_process
from fedtide.scenario import schedule as schedules
from fedtide.scenario.loading import load_scenario
from fedtide.scenario.schedule import Schedule, schedule
from fedtide.scenario.schema import Scenario
from fedtide.scenario.stream import StreamConfig
from fedtide.server.checkpoint import read_checkpoint
from fedtide.server.faults import DROPOUT, UNAVAILABLE
from fedtide.server.federation import run_federation
from fedtide.server.recorder import Evaluation
from scripts.compare_runs import metrics_difference, numbers
from tests.conftest import Crash, crash_after, small_scenario, stored_method_state
from tests.conftest import write_scenario_file as write

DIGITS = load_dataset("digits")
TRAIN_LABELS = DIGITS.train_y.numpy()


def steps_of(plan: Schedule) -> dict[int, list[tuple[int, int, int]]]:
    """Each client's steps as (experience, start round, rounds)."""
    return {c.client: [(s.experience, s.start_round, s.rounds) for s in c.steps] for c in plan.clients}


def timing(num_clients: int = 6, rounds: int = 2, seed: int = 0, **stream) -> dict[int, list[tuple[int, int, int]]]:
    return steps_of(schedule(StreamConfig.model_validate(stream), num_clients, rounds, seed))


def follow_on(steps: list[tuple[int, int, int]]) -> bool:
    """Each step starts the round after the one before ends."""
    return all(start == s + r for (_, s, r), (_, start, _) in zip(steps, steps[1:]))


# --- 1. the schedule the rules give (no training) ---


def test_staggered_clients_start_every_rounds_apart_each_step_right_after_the_last():
    got = timing(4, 2, n_experiences=3, arrivals={"start": "staggered", "every": 2})
    assert got == {k: [(0, 1 + 2 * k, 2), (1, 3 + 2 * k, 2), (2, 5 + 2 * k, 2)] for k in range(4)}
    scenario = small_scenario(stream={"n_experiences": 3, "arrivals": {"start": "staggered", "every": 2}})
    assert scenario.total_rounds == 12  # client 3: rounds 7..12
    assert scenario.schedule.present(1) == [0] and scenario.schedule.present(12) == [3]


def test_random_starts_lie_within_max_delay_the_earliest_at_round_1():
    for seed in range(4):
        got = timing(6, 2, seed, n_experiences=3, arrivals={"start": "random", "max_delay": 3})
        starts = [steps[0][1] for steps in got.values()]
        assert min(starts) == 1 and max(starts) <= 4 and all(follow_on(steps) for steps in got.values())
        assert all([e for e, _, _ in steps] == [0, 1, 2] for steps in got.values())
        assert len(set(starts)) > 1


def test_a_rounds_range_gives_each_step_its_own_count_within_it():
    got = timing(6, 2, n_experiences=4, arrivals={"rounds": [1, 3]})
    counts = [r for steps in got.values() for _, _, r in steps]
    assert set(counts) == {1, 2, 3}  # 24 draws: each of 1..3 is drawn
    assert all(steps[0][1] == 1 and follow_on(steps) for steps in got.values())


def test_per_client_orders_are_permutations_that_differ_between_clients():
    got = timing(6, 2, n_experiences=4, client_order="per_client")
    orders = [tuple(e for e, _, _ in steps) for steps in got.values()]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    assert len(set(orders)) >= 4  # 6 draws of 24 permutations
    assert all([(s, r) for _, s, r in steps] == [(1, 2), (3, 2), (5, 2), (7, 2)] for steps in got.values())
    assert timing(6, 2, 1, n_experiences=4, client_order="per_client") != got  # the seed draws them


def test_leavers_stop_after_leave_after_experiences_of_the_order_they_would_have_walked():
    rules = {"n_experiences": 4, "client_order": "per_client", "arrivals": {"rounds": [1, 3]}}
    staying = timing(6, 2, **rules)
    leaving = timing(6, 2, **(rules | {"arrivals": {"rounds": [1, 3], "leaving": 2, "leave_after": 3}}))
    leavers = [k for k, steps in leaving.items() if len(steps) != 4]
    assert len(leavers) == 2 and all(len(leaving[k]) == 3 for k in leavers)
    assert all(leaving[k] == staying[k][: len(leaving[k])] for k in range(6))  # orders, starts, rounds unmoved


def test_joiners_hold_only_the_new_experiences_and_start_at_join_round():
    got = timing(6, 2, n_experiences=4, arrivals={"joining": 2, "new_experiences": 2, "join_round": 4})
    assert got[4] == got[5] == [(2, 4, 2), (3, 6, 2)]
    assert all(steps == [(0, 1, 2), (1, 3, 2)] for k, steps in got.items() if k < 4)
    # by default they join halfway through the others' rounds (4 rounds: at round 3)
    default = timing(6, 2, n_experiences=4, client_order="per_client", arrivals={"joining": 2, "new_experiences": 2})
    assert [steps[0][1] for steps in default.values()] == [1, 1, 1, 1, 3, 3]
    assert all({e for e, _, _ in default[k]} == ({2, 3} if k >= 4 else {0, 1}) for k in range(6))
    # the plan gives the joiners classes no one else holds
    scenario = small_scenario(stream={"n_experiences": 4, "arrivals": {"joining": 1}})
    plan = stream_plan(scenario)
    held = [{c for exp in own.experiences for c in TRAIN_LABELS[exp.train]} for own in plan.clients]
    assert held[3] == set(plan.classes[3]) and not held[3] & (held[0] | held[1] | held[2])


def test_a_listed_client_takes_what_it_lists_and_the_others_follow_the_rules():
    got = timing(
        4,
        2,
        n_experiences=3,
        arrivals={"start": "staggered", "every": 1},
        clients={1: {"order": [2, 0], "start_round": 5, "rounds": 1}, 2: {"leave_after": 1}},
    )
    assert got[1] == [(2, 5, 1), (0, 6, 1)]
    assert got[2] == [(0, 3, 2)]
    assert got[0] == [(0, 1, 2), (1, 3, 2), (2, 5, 2)] and got[3] == [(0, 4, 2), (1, 6, 2), (2, 8, 2)]


def test_the_same_seed_gives_the_same_schedule_and_one_rule_never_moves_anothers_draws():
    rules = {
        "n_experiences": 4,
        "client_order": "per_client",
        "arrivals": {"start": "random", "max_delay": 2, "rounds": [1, 3]},
    }
    first = timing(6, 2, 3, **rules)
    schedules._schedule.cache_clear()  # drawn again, not read back
    assert timing(6, 2, 3, **rules) == first

    def orders(got):
        return {k: [e for e, _, _ in steps] for k, steps in got.items()}

    def rounds(got):
        return {k: [r for _, _, r in steps] for k, steps in got.items()}

    leaving = timing(6, 2, 3, **(rules | {"arrivals": {**rules["arrivals"], "leaving": 3, "leave_after": 1}}))
    assert all(orders(leaving)[k] == orders(first)[k][: len(leaving[k])] for k in range(6))
    assert all(rounds(leaving)[k] == rounds(first)[k][: len(leaving[k])] for k in range(6))
    assert [s[0][1] for s in leaving.values()] == [s[0][1] for s in first.values()]  # the starts
    shared = timing(6, 2, 3, **(rules | {"client_order": "shared"}))
    assert rounds(shared) == rounds(first) and [s[0][1] for s in shared.values()] == [s[0][1] for s in first.values()]
    together = timing(6, 2, 3, **(rules | {"arrivals": {"rounds": [1, 3]}}))
    assert orders(together) == orders(first) and rounds(together) == rounds(first)


PARTITION = {"kind": "iid", "num_clients": 4}
IMPOSSIBLE = {
    "joining": ({"n_experiences": 3, "arrivals": {"joining": 4}}, {}, "stream.arrivals.joining=4"),
    "new_experiences": (
        {"n_experiences": 3, "arrivals": {"joining": 1, "new_experiences": 3}},
        {},
        "stream.arrivals.new_experiences=3",
    ),
    "leave_after": (
        {"n_experiences": 3, "arrivals": {"leaving": 1, "leave_after": 3}},
        {},
        "stream.arrivals.leave_after=3",
    ),
    "empty_round": (  # client 0 ends at round 3, client 1 starts at round 6
        {"n_experiences": 3, "arrivals": {"start": "staggered", "every": 5}},
        {"federation": {"rounds_per_experience": 1}},
        "stream.arrivals: no client is in the stream at round 4",
    ),
    "listed_id": ({"n_experiences": 3, "clients": {9: {"order": [0]}}}, {}, "stream.clients: no client 9"),
    "listed_repeats": (
        {"n_experiences": 3, "clients": {0: {"order": [0, 0, 1]}}},
        {},
        "stream.clients.0.order: [0, 0, 1]",
    ),
    "min_train_nodes": (
        {"n_experiences": 3, "arrivals": {"start": "staggered"}},
        {"federation": {"min_train_nodes": 2}},
        "federation.min_train_nodes=2",
    ),
    "client_level_dp": (
        {"n_experiences": 3, "arrivals": {"start": "staggered"}},
        {"privacy": {"enabled": True, "level": "client"}},
        "privacy.level: client-level DP",
    ),
    "domain_canaries": ({"kind": "domain", "n_experiences": 3}, {"audit": {"canaries": 10}}, "audit.canaries:"),
    "domain_class_order": (
        {"kind": "domain", "n_experiences": 3, "class_order": list(range(10))},
        {},
        "stream: class_order orders the classes of a class-incremental stream",
    ),
    "domain_angles": (
        {"kind": "domain", "n_experiences": 3, "domain": {"angles": [0, 90]}},
        {},
        "stream: domain.angles gives 2 angles for n_experiences=3",
    ),
}


@pytest.mark.parametrize("case", IMPOSSIBLE)
def test_an_impossible_stream_is_one_line_naming_the_field(case, tmp_path, run_cli):
    stream, sections, expected = IMPOSSIBLE[case]
    code, out, err = run_cli("validate", str(write(tmp_path, {"partition": PARTITION, "stream": stream, **sections})))
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


# --- the runs: in-process, keeping the global model after each round and each client's final state ---

ASYNC = {  # staggered starts, each client its own order, one joiner and one leaver; every client sampled
    "stream": {
        "n_experiences": 4,
        "client_order": "per_client",
        "arrivals": {"start": "staggered", "joining": 1, "leaving": 1, "leave_after": 2},
    },
    "partition": {"kind": "iid", "num_clients": 5},
    "federation": {"rounds_per_experience": 1},
    "continual": {"method": "ewc"},
}
SPARSE = {  # the same stream over Dirichlet shares, half the clients in the stream sampled, dropouts, an outage
    **ASYNC,
    "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 6},
    "federation": {"rounds_per_experience": 2, "fraction_train": 0.5},
    "faults": {"dropout": 0.2, "unavailable": [{"clients": [1], "rounds": [4, 6]}]},
}
DOMAIN = {  # permuted digits (a rotation costs ~1 ms a read), each client its own order of the permutations
    "stream": {
        "kind": "domain",
        "n_experiences": 3,
        "client_order": "per_client",
        "domain": {"transform": "permutation"},
    },
    "federation": {"rounds_per_experience": 2},
    "continual": {"method": "replay", "mem_size": 30},
}


@dataclass(frozen=True)
class KeptRun:
    scenario: Scenario
    folder: Path
    summary: dict
    rounds: list[dict]  # metrics.jsonl's round lines
    arrays_after: dict[int, ArrayRecord]  # the global model after each global round
    states: dict[int, RecordDict]  # each client's Context.state at the end


def run_keeping(scenario: Scenario, parent: Path) -> KeptRun:
    """Run in-process, reading the global model after each round from its checkpoint (written every round)."""
    grid = InProcessGrid(scenario.partition.num_clients)
    folder = create_run_folder(scenario, parent)
    after: dict[int, ArrayRecord] = {}

    def keep_model(record) -> None:
        after[record.round] = read_checkpoint(folder, scenario).arrays

    run_federation(grid, scenario, folder, keep_model)
    states = {int(context.node_config["partition-id"]): context.state for context in grid.contexts.values()}
    rounds = [r for r in read_metrics(folder) if r["type"] == "round"]
    return KeptRun(scenario, folder, json.loads((folder / "summary.json").read_text()), rounds, after, states)


@pytest.fixture(scope="module")
def async_run(tmp_path_factory) -> KeptRun:
    return run_keeping(small_scenario(**ASYNC), tmp_path_factory.mktemp("async"))


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> KeptRun:
    return run_keeping(small_scenario(**SPARSE), tmp_path_factory.mktemp("sparse"))


@pytest.fixture(scope="module")
def domain_run(tmp_path_factory) -> KeptRun:
    return run_keeping(small_scenario(**DOMAIN), tmp_path_factory.mktemp("domain"))


def entries(run: KeptRun, client: int) -> list[tuple[int, dict]]:
    """(global round, per_client entry) of each round the client replied in."""
    return [(r["round"], c) for r in run.rounds for c in r["per_client"] if c["partition_id"] == client]


# --- 2. a client trains only on what its schedule gives it, only while it is in the stream ---


@pytest.mark.parametrize("name", ["async_run", "sparse_run"])
def test_a_client_trains_only_on_the_classes_its_schedule_gives_it_and_only_in_its_rounds(name, request):
    run: KeptRun = request.getfixturevalue(name)
    plan, timeline = stream_plan(run.scenario), run.scenario.schedule
    everyone_sampled = run.scenario.federation.fraction_train == 1 and not run.scenario.faults.active
    assert [r["round"] for r in run.rounds] == list(range(1, timeline.last_round + 1))
    for record in run.rounds:
        global_round, present = record["round"], set(timeline.present(record["round"]))
        replied = {c["partition_id"] for c in record["per_client"]}
        dropped = {d["partition_id"] for d in record.get("dropped", [])}
        assert replied | dropped <= present  # no client out of the stream is ever sampled
        assert replied == present or not everyone_sampled
        for entry in record["per_client"]:
            own = plan.client(entry["partition_id"])
            step = timeline.clients[own.client].step_at(global_round)
            assert entry["experience"] == own.step_at(global_round) == step
            now = own.at_round(global_round)
            held = sorted({int(c) for c in TRAIN_LABELS[now.train]})
            assert entry["classes"] == (held or None)  # the classes of its samples of that experience
            assert set(held) <= set(now.classes) == set(plan.classes[now.experience])
    joined = plan.client(run.scenario.partition.num_clients - 1).experiences[0]
    before = [e["classes"] or [] for r in run.rounds if r["round"] < joined.start_round for e in r["per_client"]]
    assert not set(joined.classes) & {c for classes in before for c in classes}  # no one trained on them before


# --- 3. consolidation: once per client per finished experience, at the weights that ended it ---


@pytest.mark.parametrize("name", ["async_run", "sparse_run"])
def test_each_client_consolidates_each_experience_it_finished_exactly_once(name, request):
    """After any reply in its own step s, a client has consolidated once each earlier step it holds data in,
    and nothing else: skipped rounds, skipped steps, drops and outages change when, never how often."""
    run: KeptRun = request.getfixturevalue(name)
    plan = stream_plan(run.scenario)
    for own in plan.clients:
        sizes, reached = own.sizes, 0
        assert entries(run, own.client), f"client {own.client} never replied"
        for _, entry in entries(run, own.client):
            step = entry["experience"]
            assert entry["consolidated"] == sum(1 for i in range(reached, step) if sizes[i])
            assert entry["consolidation_counts"] == [int(i < step and sizes[i] > 0) for i in range(len(sizes))]
            reached = step
        final = entries(run, own.client)[-1][1]["consolidation_counts"]
        assert max(final) <= 1 and sum(final) == sum(1 for i in range(reached) if sizes[i])


@pytest.mark.parametrize("name", ["async_run", "sparse_run"])
def test_a_client_anchors_each_experience_at_the_global_weights_that_ended_it(name, request):
    """EWC's anchor for a client's step is the global model after that step's last round, even when the
    client next trains many rounds later (the server sends those weights): DESIGN's consolidation rule."""
    run: KeptRun = request.getfixturevalue(name)
    plan, late = stream_plan(run.scenario), 0
    for client, state in run.states.items():
        own = plan.client(client)
        anchors = stored_method_state(state, run.scenario)["anchor"]
        consolidated = [i for i, count in enumerate(entries(run, client)[-1][1]["consolidation_counts"]) if count]
        assert sorted(anchors) == consolidated
        for step, anchor in anchors.items():
            ended = run.arrays_after[own.experiences[step].end_round]
            for key, param in anchor.items():
                assert np.array_equal(param.data.numpy(), ended[key].numpy()), (client, step, key)
        first_in = {entry["experience"]: r for r, entry in reversed(entries(run, client))}
        consolidated_at = {step: min(r for s, r in first_in.items() if s > step) for step in consolidated}
        late += sum(r > own.experiences[step].end_round + 1 for step, r in consolidated_at.items())
    if run.scenario.federation.fraction_train < 1:
        assert late > 0  # some client consolidated rounds after its step ended: the server's kept weights were used


# --- 4. DP: each client's planned steps, σ and ε follow its own schedule ---


def dp_scenario(privacy: dict, **stream) -> Scenario:
    return small_scenario(
        stream={"n_experiences": 3, **stream},
        partition={"kind": "iid", "num_clients": 4},
        federation={"rounds_per_experience": 2},
        continual={"method": "naive"},
        client={"epochs": 2, "lr": 0.05},
        privacy={"enabled": True, **privacy},
    )


def test_dp_planned_steps_are_each_clients_own_rounds_times_epochs_times_steps():
    scenario = dp_scenario({"noise_multiplier": 1.0}, arrivals={"rounds": [1, 3]})
    footprint = build_method(scenario.continual).private_footprint()
    batch, epochs = scenario.client.batch_size, scenario.client.epochs
    rounds = set()
    for client in scenario.schedule.clients:
        own = stream_plan(scenario).client(client.client)
        expected = []
        for step, experience in zip(client.steps, own.experiences):
            steps = math.ceil(experience.size / batch)  # Poisson batches of one epoch, as Opacus's loader makes them
            expected.append((1 / steps, steps * epochs * step.rounds))
            rounds.add(step.rounds)
        assert planned_steps(scenario, client.client, footprint) == expected
    assert rounds == {1, 2, 3}


def test_a_client_that_stays_longer_gets_more_noise_and_the_others_keep_theirs():
    footprint = build_method(dp_scenario({}).continual).private_footprint()

    def sigmas(rounds: int) -> list[float]:
        scenario = dp_scenario({"target_epsilon": 5.0}, clients={0: {"rounds": rounds}})
        return [noise_multiplier(scenario, client, footprint) for client in (0, 1)]

    few, many = sigmas(1), sigmas(3)
    assert many[0] > few[0]
    assert many[1] == few[1]  # client 1's schedule and data did not change


def test_a_calibrated_run_keeps_every_clients_epsilon_within_target_spending_nearly_all(tmp_path):
    """Every client sampled in each of its rounds spends what its own schedule planned: just under the target."""
    target = 5.0
    scenario = dp_scenario({"target_epsilon": target}, arrivals={"rounds": [1, 3]})
    simulate_in_process(scenario, folder := create_run_folder(scenario, tmp_path))
    privacy = json.loads((folder / "summary.json").read_text())["privacy"]
    footprint = build_method(scenario.continual).private_footprint()
    for client in range(4):
        assert 0.9 * target < privacy["epsilon_per_client"][str(client)] <= target
        assert privacy["noise_multiplier"][str(client)] == noise_multiplier(scenario, client, footprint)
    assert privacy["budget_exhausted_clients"] == []


# --- 5. resume mid-run equals the uninterrupted run ---

RESUMED = {  # case: (the uninterrupted run, stopped after this global round)
    "per_client-half-sampled-with-faults": ("sparse_run", 5),  # inside a stage; client 2 owes a consolidation
    "staggered-joining-leaving": ("async_run", 3),  # the joiner has just joined
    "domain-per_client": ("domain_run", 3),
}


@pytest.mark.parametrize("case", RESUMED)
def test_a_resumed_run_gives_the_uninterrupted_runs_numbers(case, request, tmp_path):
    name, stop = RESUMED[case]
    straight: KeptRun = request.getfixturevalue(name)
    scenario = straight.scenario
    stopped = create_run_folder(scenario, tmp_path)
    with pytest.raises(Crash):
        simulate_in_process(scenario, stopped, observer=crash_after(stop))
    assert checkpoint_round(stopped) == stop
    seen = []
    simulate_in_process(scenario, stopped, observer=seen.append)
    assert [r.round for r in seen] == list(range(stop + 1, scenario.total_rounds + 1))
    assert same_numbers(straight.folder, stopped)


def same_numbers(expected: Path, got: Path) -> bool:
    """scripts/compare_runs.py's comparison: summary.json's numbers (per-client ones too), every line of
    metrics.jsonl but wall times and Ray node ids."""
    assert numbers(got / "summary.json") == numbers(expected / "summary.json")
    assert numbers(got / "summary.json")["per_client"] is not None
    assert metrics_difference(expected / "metrics.jsonl", got / "metrics.jsonl") is None
    return True


# --- 6. Ray gives the in-process numbers ---


# the sparse stream with more dropping, so that a sampled client drops too (at 20% none does)
ON_RAY = {**SPARSE, "faults": {**SPARSE["faults"], "dropout": 0.3}}


@pytest.mark.ray
def test_ray_gives_the_in_process_numbers_for_a_stream_out_of_lockstep(tmp_path):
    """Two Ray workers (one CPU a client, 2 cores) run the clients in their own order: the same clients are
    sampled, drop and train, and every metrics line and number is the in-process run's. The run stands for
    the faults on Ray too (tests/test_faults.py): half the clients in the stream sampled, some dropping, one
    client out for three rounds."""
    scenario = small_scenario(**ON_RAY)
    here = run_keeping(scenario, tmp_path / "in-process")
    folder = create_run_folder(scenario, tmp_path / "ray")
    simulate(scenario, folder)
    assert same_numbers(here.folder, folder)
    ray_summary = json.loads((folder / "summary.json").read_text())
    assert ray_summary["faults"] == here.summary["faults"] and ray_summary["ray_nodes"]
    # what the comparison covered: rounds that sampled only some of the clients present, and both kinds of drop
    assert {d["fault"] for r in here.rounds for d in r.get("dropped", [])} == {DROPOUT, UNAVAILABLE}
    sampled = [{c["partition_id"] for c in r["per_client"] + r.get("dropped", [])} for r in here.rounds]
    present = [set(scenario.schedule.present(r["round"])) for r in here.rounds]
    assert all(s <= p for s, p in zip(sampled, present)) and any(s < p for s, p in zip(sampled, present))


# --- 7. a domain experience is the data under its transform ---


def domain_scenario(**domain) -> Scenario:
    return small_scenario(stream={"kind": "domain", "n_experiences": 3, "domain": domain})


def pool_images(scenario: Scenario, experience: int, ids: list[int]) -> torch.Tensor:
    pool, n = training_pool(scenario), len(TRAIN_LABELS)
    samples = [pool[experience * n + i] for i in ids]
    assert [int(y) for _, y, _ in samples] == TRAIN_LABELS[ids].tolist()
    return torch.stack([x for x, _, _ in samples])


SOME = list(range(0, 1347, 97))


def test_a_rotated_experience_is_the_training_and_test_set_turned_by_its_angle():
    scenario = domain_scenario(angles=[0, 90, 180])
    test_sets = Evaluation(scenario).test_sets
    for d, quarter_turns in enumerate([0, 1, 2]):  # counter-clockwise, as torchvision rotates
        turned = torch.rot90(DIGITS.train_x[SOME], quarter_turns, dims=(-2, -1))
        assert torch.equal(pool_images(scenario, d, SOME), turned)
        x, y = test_sets[d]
        assert torch.equal(x, torch.rot90(DIGITS.test_x, quarter_turns, dims=(-2, -1)))
        assert torch.equal(y, DIGITS.test_y)
    for client in range(4):  # a client's own datasets hold its samples under its experiences' rotations
        own = stream_plan(scenario).client(client)
        for d, dataset in enumerate(client_experiences(scenario, client)):
            ids = own.experiences[d].train[:5] % len(TRAIN_LABELS)
            turned = torch.rot90(DIGITS.train_x[ids], own.experiences[d].experience, dims=(-2, -1))
            assert torch.equal(torch.stack([dataset[i][0] for i in range(5)]), turned)


def test_seeded_rotations_and_permutations_are_avalanche_s_draws_applied_to_the_raw_images():
    seed, raw, background = 0, DIGITS.train_x[SOME], float(DIGITS.train_x.min())
    rng = np.random.RandomState(seed)  # RotatedMNIST's: one randint(-180, 181) per experience
    for d in range(3):
        rotate = RandomRotation(degrees=(angle := rng.randint(-180, 181), angle), fill=background)
        assert torch.equal(pool_images(domain_scenario(), d, SOME), torch.stack([rotate(x) for x in raw]))
    rng = np.random.RandomState(seed)  # PermutedMNIST's: one permutation of every pixel per experience
    permuted = domain_scenario(transform="permutation")
    for d in range(3):
        order = torch.from_numpy(rng.permutation(64))
        expected = raw.reshape(len(SOME), -1)[:, order].reshape(raw.shape)
        assert torch.equal(pool_images(permuted, d, SOME), expected)
        x, _ = Evaluation(permuted).test_sets[d]
        assert torch.equal(x, DIGITS.test_x.reshape(len(x), -1)[:, order].reshape(x.shape))


def test_a_domain_stream_without_rotation_repeats_the_same_images():
    scenario = domain_scenario(angles=[0, 0, 0])
    every = list(range(0, len(TRAIN_LABELS), 5))
    for d in range(3):
        assert torch.equal(pool_images(scenario, d, every), DIGITS.train_x[every])
        assert torch.equal(Evaluation(scenario).test_sets[d][0], DIGITS.test_x)
    plan = stream_plan(scenario)
    assert plan.classes == (tuple(range(10)),) * 3
    for own in plan.clients:  # experience d's sample ids are d·N + i: image i, under d's (here no) rotation
        assert all(np.array_equal(e.train // len(TRAIN_LABELS), np.full(e.size, e.experience)) for e in own.experiences)


def test_the_membership_audit_scores_a_domain_member_as_its_client_trained_on_it():
    """Its image under its experience's transform, against test images under the same one and of its class."""
    scenario = domain_scenario(transform="permutation")
    plan, n = stream_plan(scenario), len(TRAIN_LABELS)
    images = AuditedImages(scenario, DIGITS, plan.held_out)
    ids = plan.client(0).training_set_ids()[::40]
    assert len(set((ids // n).tolist())) == 3  # members of every experience
    x, y = images.members(ids)
    pool = training_pool(scenario)
    assert torch.equal(x, torch.stack([pool[int(i)][0] for i in ids]))
    assert torch.equal(y, DIGITS.train_y[ids % n])
    assert np.array_equal(images.member_keys(ids), ids // n * 10 + TRAIN_LABELS[ids % n])
    test_labels = DIGITS.test_y.numpy()
    assert np.array_equal(images.test_keys, np.concatenate([d * 10 + test_labels for d in range(3)]))


def test_a_sweep_over_stream_fields_makes_one_point_per_setting(tmp_path):
    """`sweep: {stream.client_order: [...], stream.kind: [...]}` works like any other field (issue 22 item 5)."""
    from fedtide.runner.sweep import load_sweep

    path = write(
        tmp_path,
        {
            "name": "streams",
            "partition": {"num_clients": 4},
            "stream": {"n_experiences": 3},
            "sweep": {"stream.client_order": ["shared", "per_client"], "stream.kind": ["class", "domain"]},
        },
    )
    sweep = load_sweep(path, output=tmp_path / "runs")
    points = {point.name: point.scenario.stream for point in sweep.points}
    assert sorted(points) == [
        "client_order-per_client_kind-class",
        "client_order-per_client_kind-domain",
        "client_order-shared_kind-class",
        "client_order-shared_kind-domain",
    ]
    assert points["client_order-shared_kind-class"].lockstep
    assert not points["client_order-per_client_kind-domain"].lockstep
    assert points["client_order-per_client_kind-domain"].kind == "domain"
    orders = [[s.experience for s in c.steps] for c in sweep.points[2].scenario.schedule.clients]
    assert sweep.points[2].scenario.stream.client_order == "per_client" and len({tuple(o) for o in orders}) > 1


def test_validate_describes_the_stream_and_its_length(run_cli):
    code, out, err = run_cli("validate", "scenarios/fcl_async.yaml")
    assert code == 0, err
    assert (
        "5 class-incremental experiences, each client its own order, staggered starts, 2-4 rounds per experience, "
        "2 leaving after 3, 2 joining with 1 new, 10 clients"
    ) in " ".join(out.split())
    assert f"{load_scenario('scenarios/fcl_async.yaml').total_rounds} rounds" in " ".join(out.split())
    code, out, _ = run_cli("validate", "scenarios/domain_permuted.yaml")
    assert code == 0 and "5 domain-incremental (by permutation) experiences, 10 clients" in " ".join(out.split())
