"""Simulated client faults (`faults:`): who drops is seeded and reproducible, and a dropped client does nothing.

Runs go through real Flower strategies and fedtide's ClientApp on the in-process grid.
That the same clients are sampled and drop on Ray, whatever its scheduling order, is shown by
tests/test_stream_schedules.py's Ray run (half the clients sampled, 20% dropping, an outage).
"""

import copy
import json
import random

import pytest
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

from fedtide.client.app import describe
from fedtide.client.app import train as fedtide_train
from fedtide.errors import FederationError
from fedtide.records.run_folder import create_run_folder, read_metrics, read_summary
from fedtide.report.runs import find_runs
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.scenario.loading import parse_scenario
from fedtide.server.faults import DROPOUT, UNAVAILABLE, FaultPlan
from fedtide.server.federation import run_federation
from tests.conftest import small_scenario

NUMBERS = ("accuracy_matrix", "final_average_accuracy", "average_forgetting", "bwt", "clients_failed", "privacy")

# 4 clients, 2 experiences x 3 rounds: client 3 is out in rounds 2-4 (across the experience
# boundary), every client in round 3; the others drop at 30%. min_train_nodes 4 shows that
# Flower's FedAvg aggregates the replies it gets when they are fewer.
FAULTS = {
    "dropout": 0.3,
    "unavailable": [{"clients": [3], "rounds": [2, 4]}, {"clients": [0, 1, 2, 3], "rounds": [3, 3]}],
}


def faulty_scenario(**sections):
    raw = {
        "stream": {"n_experiences": 2},
        "federation": {"rounds_per_experience": 3, "min_train_nodes": 4},
        "continual": {"method": "replay", "mem_size": 30},
        "faults": FAULTS,
    }
    return small_scenario(**(raw | sections))


def run(scenario, folder, grid=None, observer=None):
    grid = grid or InProcessGrid(scenario.partition.num_clients)
    run_federation(grid, scenario, create_run_folder(scenario, folder), observer)
    return folder / scenario.name


def rounds_of(folder) -> list[dict]:
    return [r for r in read_metrics(folder) if r["type"] == "round"]


def dropped_pairs(folder, fault: str | None = None) -> list[tuple[int, int]]:
    """(client, global round) of every drop, in order."""
    return [
        (d["partition_id"], r["round"])
        for r in rounds_of(folder)
        for d in r.get("dropped", [])
        if fault is None or d["fault"] == fault
    ]


def numbers(folder) -> dict:
    """What a run measured (its summary but for wall time, Ray nodes and the audit, which has its own tests)."""
    summary = json.loads((folder / "summary.json").read_text())
    return {k: summary.get(k) for k in (*NUMBERS, "faults")}


def trained(record: dict) -> set[int]:
    return {c["partition_id"] for c in record["per_client"]}


def sampled(record: dict) -> set[int]:
    return trained(record) | {d["partition_id"] for d in record.get("dropped", [])}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """The faulty run, and a copy of every client's stored state (partition id -> Context.state) after each round."""
    grid = InProcessGrid(4)
    states: list[dict[int, RecordDict]] = []

    def keep_states(_record) -> None:
        states.append({int(c.node_config["partition-id"]): copy.deepcopy(c.state) for c in grid.contexts.values()})

    folder = run(faulty_scenario(), tmp_path_factory.mktemp("faulty"), grid, keep_states)
    return folder, states


def test_the_same_seed_drops_the_same_clients_in_the_same_rounds_with_the_same_numbers(faulty, tmp_path):
    folder, _ = faulty
    again = run(faulty_scenario(), tmp_path)
    assert dropped_pairs(again) == dropped_pairs(folder)
    assert len(dropped_pairs(folder, DROPOUT)) > 0
    assert numbers(again) == numbers(folder)


def test_counts_in_metrics_and_summary_agree(faulty):
    folder, _ = faulty
    records = rounds_of(folder)
    for record in records:
        clients = record["clients"]
        assert clients["sampled"] == 4  # every client is sampled: faults change no sampling
        assert clients["dropped"] == len(record.get("dropped", []))
        assert clients["replied"] == len(record["per_client"]) == 4 - clients["dropped"]
        assert clients["failed"] == 0 and "failures" not in record
        assert not trained(record) & {d["partition_id"] for d in record.get("dropped", [])}
    summary = read_summary(folder)
    pairs = dropped_pairs(folder)
    assert summary.faults.clients_dropped == len(pairs) == sum(r["clients"]["dropped"] for r in records)
    assert summary.faults.dropped_per_client == {str(c): sum(p[0] == c for p in pairs) for c in range(4)}
    assert summary.clients_failed == 0


def test_unavailable_clients_never_train_in_their_stretch(faulty):
    folder, _ = faulty
    records = {r["round"]: r for r in rounds_of(folder)}
    for round_ in (2, 3, 4):
        assert 3 not in trained(records[round_])
        assert {"partition_id": 3, "fault": UNAVAILABLE} in records[round_]["dropped"]
    assert dropped_pairs(folder, UNAVAILABLE) == [(3, 2), (0, 3), (1, 3), (2, 3), (3, 3), (3, 4)]


def test_a_round_every_client_dropped_keeps_the_weights_and_the_run_goes_on(faulty):
    folder, _ = faulty
    records = {r["round"]: r for r in rounds_of(folder)}
    assert records[3]["clients"] == {"sampled": 4, "dropped": 4, "replied": 0, "failed": 0, "empty": 0}
    assert records[3]["train_loss"] is None
    assert records[3]["accuracy"] == records[2]["accuracy"]  # the global model did not move
    assert len(records) == 6 and (folder / "summary.json").is_file()


def test_fewer_replies_than_min_train_nodes_still_move_the_model_as_in_flowers_fedavg(faulty):
    folder, _ = faulty
    records = rounds_of(folder)
    short = [r for r in records if 0 < r["clients"]["replied"] < 4]  # min_train_nodes is 4
    assert short, "some round had fewer replies than min_train_nodes"
    for record in short:
        previous = next(r for r in records if r["round"] == record["round"] - 1) if record["round"] > 1 else None
        if previous and previous["experience"] == record["experience"]:
            assert record["accuracy"] != previous["accuracy"]  # the replies it had moved the model


def test_a_dropped_client_keeps_its_state_until_it_trains_again(faulty):
    folder, after = faulty  # after[i]: the stored states after global round i + 1
    records = {r["round"]: r for r in rounds_of(folder)}
    assert [after[r - 1][3] == after[0][3] for r in (2, 3, 4)] == [True, True, True]
    back = min(r for r, record in records.items() if r > 4 and 3 in trained(record))
    assert after[back - 1][3] != after[0][3]
    # it consolidated experience 0 once, when it trained again in experience 1
    counts = next(c for c in records[back]["per_client"] if c["partition_id"] == 3)["consolidation_counts"]
    assert counts == [1, 0]
    for client, round_ in dropped_pairs(folder):
        if round_ > 1:
            assert after[round_ - 1][client] == after[round_ - 2][client]


HALF = {"rounds_per_experience": 3, "fraction_train": 0.5, "min_train_nodes": 2}


@pytest.fixture(scope="module")
def half_sampled(tmp_path_factory):
    """Half the clients sampled each round, 30% of them dropping."""
    return run(faulty_scenario(federation=HALF, faults={"dropout": 0.3}), tmp_path_factory.mktemp("half"))


def test_who_drops_does_not_depend_on_who_else_was_sampled_and_dropping_changes_no_sampling(
    faulty, half_sampled, tmp_path
):
    folder, _ = faulty
    with_faults = half_sampled
    without = run(faulty_scenario(federation=HALF, faults={}), tmp_path)
    half_records, plain_records = rounds_of(with_faults), rounds_of(without)
    assert [sampled(r) for r in half_records] == [sampled(r) for r in plain_records]
    assert {len(sampled(r)) for r in half_records} == {2}
    full_drops = set(dropped_pairs(folder, DROPOUT))
    half_drops = set(dropped_pairs(with_faults))
    assert half_drops
    # the full run samples every client every round, so it decided every pair the half run sampled
    # (but for its unavailable ones): each drops in one run exactly when it drops in the other
    decided = {(c, r["round"]) for r in half_records for c in sampled(r)} - set(dropped_pairs(folder, UNAVAILABLE))
    assert half_drops & decided == full_drops & decided
    assert half_drops & decided


def test_dropout_zero_changes_nothing(tmp_path):
    plain = small_scenario(stream={"n_experiences": 2}, continual={"method": "naive"})
    zero = parse_scenario(plain.model_dump(mode="json") | {"faults": {"dropout": 0.0}})
    first, second = run(plain, tmp_path / "plain"), run(zero, tmp_path / "zero")
    assert numbers(first) == numbers(second)
    assert numbers(first)["faults"] is None
    strip = ("wall_time_s",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in rounds_of(first)] == [
        {k: v for k, v in r.items() if k not in strip} for r in rounds_of(second)
    ]


def test_a_dropped_private_client_spends_no_epsilon_that_round(tmp_path):
    scenario = small_scenario(
        stream={"n_experiences": 2},
        continual={"method": "naive"},
        privacy={"enabled": True, "noise_multiplier": 1.0},
        faults={"dropout": 0.4},
    )
    folder = run(scenario, tmp_path)
    records = rounds_of(folder)
    spent = [r["privacy"]["epsilon_per_client"] for r in records]
    checked = 0
    for i, record in enumerate(records[1:], start=1):
        for drop in record.get("dropped", []):
            client = str(drop["partition_id"])
            if client in spent[i - 1]:
                assert spent[i][client] == spent[i - 1][client]
                checked += 1
        for report in record["per_client"]:
            client = str(report["partition_id"])
            if report["num_examples"] > 0 and client in spent[i - 1]:
                assert spent[i][client] > spent[i - 1][client]  # training does spend
    assert checked > 0, "some client dropped after it had spent ε"
    assert read_summary(folder).privacy.epsilon_per_client == spent[-1]


flaky = ClientApp()
flaky.query()(describe)


@flaky.train()
def _train_unless_client_two(msg: Message, context) -> Message:
    if int(context.node_config["partition-id"]) == 2:
        raise RuntimeError("client 2 broke on purpose")
    return fedtide_train(msg, context)


def test_a_real_client_failure_is_still_a_failure_beside_the_drops(tmp_path):
    scenario = small_scenario(stream={"n_experiences": 2}, continual={"method": "naive"}, faults={"dropout": 0.3})
    grid = InProcessGrid(4, client_app=flaky)
    folder = run(scenario, tmp_path, grid)
    records = rounds_of(folder)
    for record in records:
        two_dropped = (2, record["round"]) in dropped_pairs(folder)
        failures = record.get("failures", [])
        assert [f["partition_id"] for f in failures] == ([] if two_dropped else [2])
        assert all("client 2 broke on purpose" in f["reason"] for f in failures)
        assert record["clients"]["failed"] == len(failures)
    summary = read_summary(folder)
    assert summary.clients_failed == sum(1 for r in records if r.get("failures"))
    assert summary.faults.clients_dropped == len(dropped_pairs(folder)) > 0


def test_a_round_in_which_every_client_not_dropped_fails_still_stops_the_run(tmp_path):
    scenario = small_scenario(
        continual={"method": "tests.broken_method:BrokenMethod"},
        faults={"unavailable": [{"clients": [0], "rounds": [1, 1]}]},
    )
    with pytest.raises(FederationError) as raised:
        run(scenario, tmp_path)
    message = str(raised.value)
    assert message.startswith("every sampled client that did not drop failed in round 1; client 1 said: ")
    assert "broken_method exploded on purpose" in message


def test_the_plan_reads_no_shared_random_state_and_nests_across_dropout_rates():
    faults = parse_scenario({"faults": {"dropout": 0.2}}).faults
    state = random.getstate()
    low = {(c, r) for c in range(20) for r in range(1, 51) if FaultPlan(faults, seed=0).fault(c, r)}
    assert random.getstate() == state
    high_faults = faults.model_copy(update={"dropout": 0.5})
    high = {(c, r) for c in range(20) for r in range(1, 51) if FaultPlan(high_faults, seed=0).fault(c, r)}
    other_seed = {(c, r) for c in range(20) for r in range(1, 51) if FaultPlan(faults, seed=1).fault(c, r)}
    assert low < high
    assert abs(len(low) / 1000 - 0.2) < 0.04 and abs(len(high) / 1000 - 0.5) < 0.05
    assert other_seed != low


def test_the_report_shows_the_drops(faulty, tmp_path):
    from fedtide.report.document import write_report

    folder, _ = faulty
    runs, _ = find_runs([folder])
    write_report(runs, tmp_path / "report")
    summary = read_summary(folder)
    markdown = (tmp_path / "report" / "report.md").read_text()
    per_client = ", ".join(str(summary.faults.dropped_per_client[str(c)]) for c in range(4))
    assert f"dropped by simulated faults: {summary.faults.clients_dropped} (per client 0..3: {per_client})." in markdown
    header, row = (tmp_path / "report" / "report.csv").read_text().splitlines()[:2]
    assert row.split(",")[header.split(",").index("clients dropped")] == str(summary.faults.clients_dropped)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("faults.dropout=1.0", "faults.dropout: Input should be less than 1"),
        ("faults.dropout=-0.1", "faults.dropout: Input should be greater than or equal to 0"),
        ("faults.unavailable=[{clients: [10], rounds: [1, 2]}]", "faults.unavailable.0.clients: no client 10"),
        ("faults.unavailable=[{clients: [-1], rounds: [1, 2]}]", "faults.unavailable.0.clients: client ids are"),
        ("faults.unavailable=[{clients: [1], rounds: [14, 16]}]", "faults.unavailable.0.rounds: [14, 16] ends after"),
        ("faults.unavailable=[{clients: [1], rounds: [0, 2]}]", "faults.unavailable.0.rounds: [0, 2] is not"),
        ("faults.unavailable=[{clients: [1], rounds: [3, 2]}]", "faults.unavailable.0.rounds: [3, 2] is not"),
        ("faults.dropuot=0.1", "faults.dropuot: unknown key"),
    ],
)
def test_a_bad_faults_field_is_one_line_naming_it_and_exit_2(tmp_path, run_cli, setting, expected):
    code, out, err = run_cli("validate", "scenarios/quickstart.yaml", "--set", setting)
    assert code == 2, out + err
    assert expected in " ".join(err.split())
    assert "Traceback" not in out + err
