"""Checkpoints and resume: a run stopped after any round and resumed gives the uninterrupted run's numbers.

Each case runs a small digits scenario (3 experiences x 2 rounds, 4 clients, in-process)
once straight through and once stopped after a round (an observer raising, as a crash
would) and resumed from its checkpoint. The summary (accuracy matrix, forgetting, BWT,
ε per client, audit) and every metrics.jsonl line but the wall time must be equal, and
the resumed part must run only the rounds after the checkpoint. The cases cover what a
checkpoint must carry: clients' replay buffers (reservoir, and coins under DP), EWC anchors
and importances, the DP accountant's history, FedProx, a server-momentum strategy's state,
and the node sampling RNG (fraction_train < 1), stopped inside an experience and at its end.
"""

import json
import pickle
import threading

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedtide.errors import FederationError, ScenarioError
from fedtide.records.checkpoint_files import CHECKPOINT_DIR, checkpoint_round
from fedtide.records.run_folder import create_run_folder, prepare_run_folder, read_metrics
from fedtide.runner.simulation import simulate_in_process
from fedtide.runner.sweep import load_sweep, run_sweep
from fedtide.server.checkpoint import Checkpoint, ClientStates, read_checkpoint, strategy_state, write_checkpoint
from fedtide.server.run_totals import RunTotals
from tests.conftest import Crash, crash_after, small_scenario

SUMMARY_NUMBERS = (
    "accuracy_matrix",
    "final_average_accuracy",
    "average_forgetting",
    "bwt",
    "clients_failed",
    "privacy",
    "client_level",
    "audit",
    "faults",
    "strategy_metrics",
    "method_metrics",
)

CASES = {
    # name: (scenario sections, stop after this global round, expected checkpoint round)
    "naive": ({"continual": {"method": "naive"}}, 3, 3),
    "naive-with-dropout": ({"continual": {"method": "naive"}, "faults": {"dropout": 0.3}}, 5, 5),
    "replay-at-experience-end": ({}, 4, 4),
    "ewc-half-sampled-every-2": (
        {
            "continual": {"method": "ewc", "ewc_lambda": 50.0},
            "federation": {"rounds_per_experience": 3, "fraction_train": 0.5},
            "checkpoint": {"every": 2},
        },
        5,
        4,  # round 5 ran but was not checkpointed: it is run again (its metrics line cut) from inside experience 1
    ),
    "fedprox": (
        {"federation": {"rounds_per_experience": 2, "strategy": {"name": "fedprox", "proximal_mu": 0.1}}},
        3,
        3,
    ),
    "fedavgm-momentum": (
        {
            "continual": {"method": "naive"},
            "federation": {"rounds_per_experience": 2, "strategy": {"name": "fedavgm", "server_momentum": 0.9}},
        },
        3,
        3,
    ),
    "dp-ewc": (
        {
            "continual": {"method": "ewc"},
            "privacy": {"enabled": True, "noise_multiplier": 1.0, "delta": 1.0e-4},
        },
        3,
        3,
    ),
    "dp-replay-at-experience-end": (  # the coin buffer's groups (ids, rates) and the accountant's history
        {"privacy": {"enabled": True, "noise_multiplier": 1.0, "delta": 1.0e-4}},
        4,
        4,
    ),
    "user-metrics-stopped-after-the-last-round": (  # the summary's last metrics come from the checkpoint's totals
        {
            "continual": {"method": "tests.metric_plugins:CountsBatchesAndLargestWeight"},
            "federation": {"rounds_per_experience": 2, "strategy": {"name": "tests.metric_plugins:ReportsReplies"}},
        },
        6,
        6,
    ),
    "client-level-adaptive-clipping": (  # the clipping norm moves every round: the wrapper's state
        {
            "continual": {"method": "naive"},
            "privacy": {
                "enabled": True,
                "level": "client",
                "client_level": {"noise_multiplier": 0.5, "clipping": "adaptive", "clipped_count_stddev": 1.0},
            },
        },
        3,
        3,
    ),
}


def run_to_end(scenario, folder, rounds_seen=None):
    simulate_in_process(scenario, folder, observer=rounds_seen.append if rounds_seen is not None else None)
    return json.loads((folder / "summary.json").read_text())


def without_wall_time(lines):
    return [{k: v for k, v in line.items() if k != "wall_time_s"} for line in lines]


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_run_gives_the_uninterrupted_runs_numbers(case, tmp_path):
    sections, stop, checkpointed = CASES[case]
    scenario = small_scenario(**sections)
    straight = create_run_folder(scenario, tmp_path / "straight")
    expected = run_to_end(scenario, straight)

    stopped = create_run_folder(scenario, tmp_path / "stopped")
    with pytest.raises(Crash):
        simulate_in_process(scenario, stopped, observer=crash_after(stop))
    assert checkpoint_round(stopped) == checkpointed
    assert [r["round"] for r in read_metrics(stopped) if r["type"] == "round"] == list(range(1, stop + 1))

    rounds_seen = []
    resumed = run_to_end(scenario, stopped, rounds_seen)
    assert [r.round for r in rounds_seen] == list(range(checkpointed + 1, scenario.total_rounds + 1))
    assert {k: resumed.get(k) for k in SUMMARY_NUMBERS} == {k: expected.get(k) for k in SUMMARY_NUMBERS}
    assert without_wall_time(read_metrics(stopped)) == without_wall_time(read_metrics(straight))
    assert not (stopped / CHECKPOINT_DIR).exists()  # a finished run keeps no checkpoint
    if scenario.privacy.private:
        assert max(resumed["privacy"]["epsilon_per_client"].values()) > 0


def test_a_checkpoint_holds_every_clients_state_and_the_strategys(tmp_path):
    scenario = small_scenario(
        federation={"rounds_per_experience": 2, "strategy": {"name": "fedavgm", "server_momentum": 0.9}}
    )
    folder = create_run_folder(scenario, tmp_path)
    with pytest.raises(Crash):
        simulate_in_process(scenario, folder, observer=crash_after(3))
    checkpoint = read_checkpoint(folder, scenario)
    assert checkpoint.round == 3
    states = checkpoint.federation["client_states"]
    assert sorted(states) == [0, 1, 2, 3]
    for state in states.values():  # replay's buffer ids and the consolidation counts, as ClientState keeps them
        assert state["fedtide.cli.progress"]["counts"] == [1, 0, 0]
        assert "fedtide.method.arrays" in state
    assert pickle.loads(checkpoint.federation["strategy"]["momentum_vector"]) is not None
    assert sorted(checkpoint.federation["round_ends"]) == [2]  # the weights that ended experience 0
    assert checkpoint.totals.matrix == [r["accuracy"] for r in read_metrics(folder) if r["type"] == "experience"]


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path):
    scenario = small_scenario()
    folder = create_run_folder(scenario, tmp_path)
    with pytest.raises(Crash):
        simulate_in_process(scenario, folder, observer=crash_after(2))
    before = read_checkpoint(folder, scenario)
    files = sorted(p.name for p in (folder / CHECKPOINT_DIR).iterdir())
    assert files[-1] == "round-0002.pkl" and all(name.startswith("clients-") for name in files[:-1])
    before.federation["client_states"].put(0, before.federation["client_states"][1])  # a state to write
    unpicklable = before.__class__(**{**before.__dict__, "round": 3, "totals": {"lock": threading.Lock()}})
    with pytest.raises(TypeError):
        write_checkpoint(folder, unpicklable)
    assert sorted(p.name for p in (folder / CHECKPOINT_DIR).iterdir()) == files  # no partial file left
    assert read_checkpoint(folder, scenario).round == 2
    with pytest.raises(ScenarioError, match="another scenario"):
        read_checkpoint(folder, small_scenario(seed=1))
    totals_as_a_dict = before.__class__(**{**before.__dict__, "round": 3, "totals": {"matrix": []}})
    write_checkpoint(folder, totals_as_a_dict)  # as an earlier fedtide wrote its totals
    with pytest.raises(ScenarioError, match="written by an earlier fedtide"):
        read_checkpoint(folder, scenario)


def test_a_strategys_state_is_its_attributes_less_unpicklable_functions():
    strategy = FedAvg(train_metrics_aggr_fn=lambda records, key: records[0])
    state = strategy_state(strategy)
    assert "train_metrics_aggr_fn" not in state and pickle.loads(state["fraction_train"]) == 1.0
    strategy.guard = threading.Lock()  # state that a checkpoint would lose
    with pytest.raises(FederationError, match="attribute 'guard' cannot be checkpointed"):
        strategy_state(strategy)


def test_checkpoint_every_0_writes_none_and_clients_send_no_state(tmp_path):
    scenario = small_scenario(checkpoint={"every": 0})
    folder = create_run_folder(scenario, tmp_path)
    with pytest.raises(Crash):
        simulate_in_process(scenario, folder, observer=crash_after(3))
    assert checkpoint_round(folder) is None and not (folder / CHECKPOINT_DIR).exists()


def test_a_sweep_resumes_its_interrupted_point_from_the_checkpoint(tmp_path, small_run):
    path = tmp_path / "sweep.yaml"
    raw = small_scenario().model_dump(mode="json") | {"resources": {"backend": "in_process"}, "sweep": {"seeds": [0]}}
    path.write_text(json.dumps(raw))  # JSON is YAML
    plan = load_sweep(path, output=tmp_path / "runs")
    point = plan.points[0]
    alone = small_run.summary  # the same scenario run alone

    folder = prepare_run_folder(plan.folder / point.name, point.scenario)
    with pytest.raises(Crash):
        simulate_in_process(point.scenario, folder, observer=crash_after(4))

    rounds_seen = []
    outcome = run_sweep(plan, runner=lambda scenario, where: run_to_end(scenario, where, rounds_seen))
    assert outcome.ran == [point.name] and not outcome.failed
    assert [r.round for r in rounds_seen] == [5, 6]
    resumed = json.loads((folder / "summary.json").read_text())
    assert {k: resumed.get(k) for k in SUMMARY_NUMBERS} == {k: alone.get(k) for k in SUMMARY_NUMBERS}


def test_the_cli_refuses_to_run_over_an_unfinished_run_and_resumes_it(tmp_path, run_cli, small_run):
    scenario = small_scenario(resources={"backend": "in_process"})
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(scenario.model_dump(mode="json")))
    expected = small_run.summary  # the same scenario run straight through
    folder = create_run_folder(scenario, tmp_path / "runs")
    with pytest.raises(Crash):
        simulate_in_process(scenario, folder, observer=crash_after(3))

    code, _, err = run_cli("run", str(path), "--output", str(tmp_path / "runs"))
    assert code == 2
    assert " ".join(err.split()) == (
        f"error: {folder} holds an unfinished run of this scenario (round 3/6): fedtide resume {folder} "
        "(to start afresh instead, give another --output or move that folder)"
    )
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["small"]  # no new run folder
    code, out, err = run_cli("resume", str(folder))
    assert code == 0, err
    # the console wraps a long path anywhere, even inside a name: compare without any white space
    assert f"resuming{folder}afterround3/6".replace(" ", "") in "".join(out.split())
    resumed = json.loads((folder / "summary.json").read_text())
    assert {k: resumed.get(k) for k in SUMMARY_NUMBERS} == {k: expected.get(k) for k in SUMMARY_NUMBERS}
    code, _, err = run_cli("resume", str(folder))
    assert code == 2 and "holds a finished run" in err


def test_resume_refuses_a_folder_without_checkpoint(tmp_path, run_cli):
    folder = create_run_folder(small_scenario(), tmp_path)
    code, _, err = run_cli("resume", str(folder))
    assert code == 2 and "has no checkpoint to resume from" in err
    code, _, err = run_cli("resume", str(tmp_path / "nothing"))
    assert code == 2 and "is not a run folder" in err


def test_a_checkpoint_writes_only_the_client_states_that_changed(tmp_path):
    """Its cost follows the clients that trained since the last one, not the clients that exist."""
    scenario = small_scenario()
    states = ClientStates()

    def checkpoint(global_round):
        return Checkpoint(
            round=global_round,
            arrays=ArrayRecord(),
            federation={"client_states": states},
            totals=RunTotals.start(0),
            wall_time_s=0.0,
            rng={},
            metrics_length=0,
            scenario=scenario.model_dump_json(),
        )

    def state(version):
        return RecordDict({"progress": ConfigRecord({"version": version})})

    def written(name):
        with (tmp_path / CHECKPOINT_DIR / name).open("rb") as stream:
            return pickle.load(stream)

    for partition in range(200):
        states.put(partition, state(0))
    write_checkpoint(tmp_path, checkpoint(1))
    for global_round in range(2, 40):
        for partition in (global_round % 7, 10 + global_round % 7):  # 2 of 200 train each round
            states.put(partition, state(global_round))
        write_checkpoint(tmp_path, checkpoint(global_round))
        name, count = states.chain[-1]
        assert count == 2 and sorted(written(name)) == sorted({global_round % 7, 10 + global_round % 7})
    on_disk = {p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()}
    assert on_disk == {"round-0039.pkl", *(name for name, _ in states.chain)}
    resumed = read_checkpoint(tmp_path, scenario).federation["client_states"]
    assert len(resumed) == 200 and resumed.chain == states.chain
    versions = {p: resumed[p]["progress"]["version"] for p in resumed}
    assert versions == {p: max([0] + [r for r in range(2, 40) if p in (r % 7, 10 + r % 7)]) for p in range(200)}

    rewritten = 0
    for global_round in range(40, 300):  # the chain is rewritten whole once it holds twice the clients' states
        states.put(global_round % 200, state(global_round))
        write_checkpoint(tmp_path, checkpoint(global_round))
        assert sum(count for _, count in states.chain) <= 2 * len(states)
        rewritten += states.chain == [(states.chain[0][0], 200)]
    assert rewritten == 1
    assert len(list((tmp_path / CHECKPOINT_DIR).iterdir())) == len(states.chain) + 1
