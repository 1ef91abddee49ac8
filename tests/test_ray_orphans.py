"""Ending the Ray processes a killed run left: only `ray::` processes whose raylet is gone, of this Ray temp folder.

Real processes stand in for Ray's: Ray retitles its agents and workers `ray::Name`, which
a process gets here as its argv[0]; each holds a log file open as Ray's do in their
session folder. (tests/test_stop.py ends the leftovers of a real SIGKILLed Ray run.)
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from fedtide.ray_orphans import end_orphaned_ray_processes

HOLD = "import sys, time; log = open(sys.argv[1], 'a'); time.sleep(600)"
# `python -c START PYTHON TITLE LOG` starts a `ray::TITLE` process holding LOG open and prints its pid;
# then it exits, so that process is left without its parent.
START = (
    "import subprocess, sys; "
    f"child = subprocess.Popen([sys.argv[2], '-c', {HOLD!r}, sys.argv[3]], executable=sys.argv[1], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(child.pid, flush=True)"
)
WORKER = START + "; import time; time.sleep(600)"  # stays: a `ray::` worker whose own subprocess holds LOG


def holds(pid: int, path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until_holding(pid: int, path) -> None:
    deadline = time.monotonic() + 30
    while not holds(pid, path):
        assert time.monotonic() < deadline, f"process {pid} never opened {path}"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_only_ray_processes_whose_raylet_is_gone_in_this_temp_folder_are_ended(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    session = tmp_path / "ray" / "session_2026-01-01_00-00-00_000000_1" / "logs"
    session.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    started: list[int] = []
    worker = None

    def orphan(title: str, log) -> int:
        launched = subprocess.run(
            [sys.executable, "-c", START, sys.executable, title, str(log)], capture_output=True, text=True, check=True
        )
        started.append(int(launched.stdout))
        wait_until_holding(started[-1], log)
        return started[-1]

    try:
        agent = orphan("ray::DashboardAgent", session / "dashboard_agent.log")
        stranger = orphan("ray::NotOurs", elsewhere / "agent.log")  # another Ray temp folder's
        worker = subprocess.Popen(
            ["ray::ClientAppActor", "-c", WORKER, sys.executable, "ray::DataLoader", str(session / "loader.log")],
            executable=sys.executable,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(worker.pid)
        loader = int(worker.stdout.readline())
        started.append(loader)
        wait_until_holding(loader, session / "loader.log")

        assert end_orphaned_ray_processes() == [agent]
        assert not running(agent)
        assert running(stranger) and running(worker.pid) and running(loader)
    finally:
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if worker:
            worker.wait(10)
