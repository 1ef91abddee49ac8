"""The same ServerApp and ClientApp run as a Flower App under `flwr run .`.

The test starts its own SuperLink with the simulation runtime on free loopback ports
(and stops it), then submits the app with `flwr run`; the scenario and the output
folder come from the run config, exactly as a user would pass them.
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

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def superlink(tmp_path):
    """A SuperLink in simulation mode on loopback, working in an empty folder; yields its HTTP API address."""
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
        cwd=tmp_path,
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


def test_flwr_run_executes_a_scenario_from_the_run_config(tmp_path, superlink):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedtide-test"\n\n'
        f'[superlink.fedtide-test]\naddress = "{superlink}"\ninsecure = true\n'
    )
    bin_dir = BIN
    env = os.environ | {"FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    overrides = "partition.num_clients=2 stream.n_experiences=2 federation.rounds_per_experience=1 name=viaflwr"
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
    assert len(summary["accuracy_matrix"]) == 2
    assert 0.0 <= summary["final_average_accuracy"] <= 1.0
