"""The same ServerApp and ClientApp run as a Flower App under `flwr run .`.

The module starts one SuperLink with the simulation runtime on free loopback ports (and
stops it); the app is submitted to it with `flwr run`, the scenario and the output folder
coming from the run config, exactly as a user would pass them. The run config's other
way in, `resume`, is the same ServerApp called on the in-process grid: which runtime
carries the messages does not change what they hold (a run resumed on Ray:
tests/test_stop.py), and each `flwr run` costs a Ray start and a training stack's imports.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedtide.records.run_folder import create_run_folder, read_metrics
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.runner.simulation import simulate_in_process
from fedtide.scenario.loading import load_scenario
from fedtide.server.app import app
from tests.conftest import small_scenario

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NUMBERS = ("accuracy_matrix", "final_average_accuracy", "average_forgetting", "bwt", "audit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A SuperLink in simulation mode on loopback, working in an empty folder; yields its HTTP API address.

    The module's runs share it, one after the other, as a user's runs share theirs."""
    http, fleet, control = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--database",
            ":flwr-in-memory:",
            "--host",
            "127.0.0.1",
            "--port",
            str(http),
            "--fleet-api-address",
            f"127.0.0.1:{fleet}",
            "--control-api-address",
            f"127.0.0.1:{control}",
        ],
        env=os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path_factory.mktemp("superlink"),
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", http)) == 0:
                break
        time.sleep(0.5)
    yield f"127.0.0.1:{http}"
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def flwr_env(tmp_path: Path, superlink: str) -> dict[str, str]:
    """An environment whose Flower configuration sends `flwr run` to this SuperLink."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedtide-test"\n\n'
        f'[superlink.fedtide-test]\naddress = "{superlink}"\ninsecure = true\n'
    )
    return os.environ | {"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.ray  # the SuperLink's simulation runtime runs the clients on Ray
def test_flwr_run_executes_a_scenario_from_the_run_config(tmp_path, superlink):
    bin_dir = BIN
    env = flwr_env(tmp_path, superlink)
    overrides = "partition.num_clients=2 stream.n_experiences=2 federation.rounds_per_experience=1 name=viaflwr"
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", overrides.split())
    simulate_in_process(scenario, create_run_folder(scenario, tmp_path / "in-process"))
    # a relative path the SuperLink's folder lacks: found in the app that `flwr run .` ships
    run_config = f'scenario="scenarios/quickstart.yaml" output="{tmp_path / "runs"}" set="{overrides}"'
    done = subprocess.run(
        [
            *[str(bin_dir / "flwr"), "run", str(REPO), "fedtide-test", "--stream"],
            *["--federation-config", "num-supernodes=2", "--run-config", run_config],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary_file = tmp_path / "runs" / "viaflwr" / "summary.json"
    assert summary_file.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["num_clients"] == 2 and summary["rounds"] == 2
    expected = json.loads((tmp_path / "in-process" / "viaflwr" / "summary.json").read_text())
    for key in NUMBERS:  # the scenario and overrides of the run config, run as `fedtide run` would
        assert summary[key] == expected[key], key


def test_the_apps_resume_run_config_continues_a_stopped_run_from_its_checkpoint(tmp_path):
    """`resume` in the run config continues a run folder: the clients, fresh, get their state back from the
    checkpoint through the messages of Flower's grid (here the in-process one, as `flwr run` would call the app)."""
    scenario = small_scenario(partition={"kind": "iid", "num_clients": 2}, stream={"n_experiences": 2})
    straight = create_run_folder(scenario, tmp_path / "straight")
    simulate_in_process(scenario, straight)
    stopped = create_run_folder(scenario, tmp_path / "stopped")

    class Crash(Exception):
        pass

    def crash_after_round_3(record):
        if record.round == 3:
            raise Crash

    with pytest.raises(Crash):
        simulate_in_process(scenario, stopped, observer=crash_after_round_3)

    run_config = {"scenario": "scenarios/quickstart.yaml", "output": "runs", "set": "", "resume": str(stopped)}
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    app(InProcessGrid(2, run_config), server)
    assert (stopped / "summary.json").is_file()
    resumed, expected = (json.loads((f / "summary.json").read_text()) for f in (stopped, straight))
    for key in NUMBERS:
        assert resumed[key] == expected[key], key
    rounds = [r["per_client"] for r in read_metrics(stopped) if r["type"] == "round"]
    assert [r["round"] for r in read_metrics(stopped) if r["type"] == "round"] == [1, 2, 3, 4]
    assert [c["consolidation_counts"] for c in rounds[-1]] == [[1, 0], [1, 0]]  # consolidated once, before the stop
