"""`resources.ray_address`: a run on an existing Ray cluster, proven on a real 2-node cluster.

The cluster test starts a Ray head and a second Ray node on this machine with `ray start`,
each with its own temp dir (Ray >= 2.x accepts `--temp-dir` per node) and its own free
ports, runs a 2-client scenario on it with one CPU per node and one CPU per client (so Ray
must put one client actor on each node), and checks that the per-client metrics name both
nodes. It stops exactly the processes it started: each `ray start --block` runs in its own
session (process group), and killing that group takes the node's GCS, raylet, agents and
workers with it. A bare `ray stop` would kill every Ray process on the machine.

Ray maps 127.0.0.1 to the machine's reachable address for the nodes' own IPs (see
`ray._private.services.resolve_ip_for_localhost`); the GCS still answers on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from fedtide.records.run_folder import create_run_folder, read_metrics
from fedtide.runner.simulation import backend_config, simulate
from fedtide.runner.sweep import load_sweep, run_sweep
from tests.conftest import small_scenario

RAY = Path(sys.executable).parent / "ray"

# Run in a separate interpreter so the test process never stays connected to the cluster.
LIST_NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
deadline = time.monotonic() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(sorted(n["NodeID"] for n in alive)))
ray.shutdown()
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class RayCluster:
    """A head and `workers` more nodes started with `ray start --block`, each in its own session."""

    def __init__(self, workers: int = 1, cpus_per_node: int = 1) -> None:
        self.workers = workers
        self.cpus = cpus_per_node
        self.nodes: list[tuple[subprocess.Popen, Path]] = []  # (ray start process, temp dir)
        self.address = ""

    def __enter__(self) -> RayCluster:
        try:
            gcs, client, dashboard, *agents = free_ports(3 + 1 + self.workers)
            self.address = f"127.0.0.1:{gcs}"
            head = [
                "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                "--include-dashboard=false", f"--dashboard-port={dashboard}",
            ]  # fmt: skip
            self._start(head, agents[0])
            for agent in agents[1:]:
                self._start([f"--address={self.address}"], agent)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, role: list[str], agent_port: int) -> None:
        # Short temp dirs: Ray's Unix sockets live under them (path length limit ~107).
        temp = Path(tempfile.mkdtemp(prefix="ftray-", dir="/tmp"))
        log = (temp / "ray-start.log").open("w")
        command = [
            str(RAY), "start", "--block", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
            f"--temp-dir={temp}", f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.nodes.append((process, temp))
        # `ray start` writes the cluster address into its temp dir once the node is up, then blocks.
        deadline = time.monotonic() + 45
        while not (temp / "ray_current_cluster").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text()[-1500:]
                pytest.skip(f"`ray start` cannot run here ({' '.join(command[2:4])}): {tail}")
            time.sleep(0.2)

    def node_ids(self, timeout: float = 30) -> list[str]:
        """The alive nodes of this cluster, once all of them have joined."""
        done = subprocess.run(
            [sys.executable, "-c", LIST_NODES, self.address, str(1 + self.workers), str(timeout)],
            capture_output=True, text=True, timeout=timeout + 30, check=True,
        )  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    def processes(self) -> list[str]:
        """Processes still alive from this cluster: in a node's process group, or naming its temp dir."""
        groups = {process.pid for process, _ in self.nodes}
        temps = [str(temp) for _, temp in self.nodes]
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            if fields[0] == "Z":
                continue
            if int(fields[2]) in groups or any(temp in command for temp in temps):
                found.append(f"{entry.name} {command[:120]}")
        return found

    def stop(self) -> None:
        """Stop exactly the processes this cluster started (worker node first, head last)."""
        for process, _ in reversed(self.nodes):
            _kill_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        for process, _ in self.nodes:
            _kill_group(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        for line in self.processes():  # anything that left the group but still names our temp dir
            _kill(int(line.split()[0]), signal.SIGKILL)
        for _, temp in self.nodes:
            shutil.rmtree(temp, ignore_errors=True)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.mark.ray
@pytest.mark.skipif(not RAY.exists(), reason=f"no `ray` executable beside {sys.executable}")
def test_scenario_runs_on_both_nodes_of_an_existing_cluster(tmp_path):
    cluster = RayCluster(workers=1, cpus_per_node=1)
    with cluster:
        expected_nodes = cluster.node_ids()
        assert len(expected_nodes) == 2, expected_nodes
        scenario = small_scenario(
            stream={"n_experiences": 2},
            partition={"kind": "iid", "num_clients": 2},
            federation={"rounds_per_experience": 2},
            resources={"num_cpus_per_client": 1, "ray_address": cluster.address},
        )
        folder = create_run_folder(scenario, tmp_path)
        simulate(scenario, folder)
        summary = json.loads((folder / "summary.json").read_text())
        rounds = [r for r in read_metrics(folder) if r["type"] == "round"]
        # the driver disconnected at the end of the run (Flower calls ray.shutdown()); the cluster stays
        assert cluster.node_ids(timeout=5) == expected_nodes

        # a sweep of two seeds on the same cluster: one Ray task per point, one CPU each
        raw = scenario.model_dump(mode="json") | {"sweep": {"seeds": [0, 1]}}
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
        outcome = run_sweep(load_sweep(tmp_path / "sweep.yaml", output=tmp_path / "swept"))
        assert sorted(outcome.ran) == ["seed-0", "seed-1"] and not outcome.failed
        point = json.loads((tmp_path / "swept" / "small" / "seed-0" / "summary.json").read_text())
        assert point["accuracy_matrix"] == summary["accuracy_matrix"]  # a Ray task's point = the actors' run
        assert cluster.node_ids(timeout=5) == expected_nodes  # the sweep left the cluster, did not stop it
    assert cluster.processes() == []

    assert summary["rounds"] == 4 and summary["clients_failed"] == 0
    assert len(rounds) == 4
    clients = [c for r in rounds for c in r["per_client"]]
    assert len(clients) == 8
    used = {c["ray_node_id"] for c in clients}
    assert used == set(expected_nodes)
    assert summary["ray_nodes"] == expected_nodes
    assert {c["hostname"] for c in clients} == {socket.gethostname()}


def test_backend_config_joins_the_cluster_asked_for_and_otherwise_starts_a_private_ray():
    assert backend_config(small_scenario())["init_args"]["address"] == "local"
    for address in ("auto", "10.0.0.5:6379", "head-node:6379"):
        config = backend_config(small_scenario(resources={"ray_address": address, "num_gpus_per_client": 0.25}))
        assert config["init_args"]["address"] == address
        assert config["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
        # Ray refuses these when joining an existing cluster
        assert not {"num_cpus", "num_gpus", "resources", "object_store_memory"} & set(config["init_args"])


@pytest.mark.parametrize("address", ["6379", "head", "head:port", "ray://head:10001", ":6379", "head:70000"])
def test_malformed_ray_address_is_one_line_naming_the_field(tmp_path, run_cli, address):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: s\n")
    code, out, err = run_cli("validate", str(scenario), "--set", f"resources.ray_address='{address}'")
    assert code == 2
    assert "resources.ray_address" in err and "host:port" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err

