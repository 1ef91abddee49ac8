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

from fedtide.runner.ray_housekeeping import end_orphaned_ray_processes

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


def kill_all(pids: list[int]) -> None:
    """End the stand-ins a test started, whichever of them are still running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
        kill_all(started)
        if worker:
            worker.wait(10)


# `python -c SCRIPT_START PYTHON SCRIPT LOG` starts `PYTHON -u SCRIPT LOG` (SCRIPT holds LOG open) and prints its pid.
SCRIPT_START = (
    "import subprocess, sys; "
    "child = subprocess.Popen([sys.argv[1], '-u', sys.argv[2], sys.argv[3]], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(child.pid, flush=True)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_agent_that_kept_pythons_command_line_is_ended_once_its_parent_is_gone(tmp_path, monkeypatch):
    """Ray's runtime-env agent runs as `python -u .../ray/_private/runtime_env/agent/main.py` without a
    `ray::` title; left by a SIGKILLed run it survives its raylet. A live driver's own Ray scripts
    (its log monitor) have the driver, a Python process, as parent: they are left alone."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    session = tmp_path / "ray" / "session_2026-01-01_00-00-00_000000_1" / "logs"
    session.mkdir(parents=True)
    script = tmp_path / "site-packages" / "ray" / "_private" / "runtime_env" / "agent" / "main.py"
    script.parent.mkdir(parents=True)
    script.write_text(HOLD)
    started: list[int] = []
    try:
        launched = subprocess.run(
            [sys.executable, "-c", SCRIPT_START, sys.executable, str(script), str(session / "agent.log")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        started.append(int(launched.stdout))  # its parent has exited: an orphan
        wait_until_holding(started[-1], session / "agent.log")
        driver = subprocess.Popen(
            [sys.executable, "-c", SCRIPT_START + "; import time; time.sleep(600)", sys.executable, str(script),
             str(session / "monitor.log")],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(driver.pid)
        started.append(int(driver.stdout.readline()))  # its parent, a Python program, runs
        wait_until_holding(started[-1], session / "monitor.log")

        assert end_orphaned_ray_processes() == [started[0]]
        assert not running(started[0]) and running(started[2])
    finally:
        kill_all(started)
