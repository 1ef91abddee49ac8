"""Ray processes that a killed run left behind, ended before the next run starts Ray.

A run's private local Ray is started by Flower inside the fedtide process (the driver).
Ray ties its head processes (GCS, raylet, monitors) to the driver with the kernel's
parent-death signal, so a driver killed with SIGKILL takes them along, and the workers
die with their raylet. The raylet's own children do not: the dashboard agent and the
runtime-env agent notice that the raylet is gone, then try to report it to the dead GCS
and stay up long after it (ray-project/ray#52385; docs/benchmarks.md, "Ray's orphans").

Ray's own test for such a process (`ray._private.process_watcher`) is that its parent
is no longer its raylet; this module applies the same test at once: a `ray::` process
(an agent or a worker, as Ray retitles them) whose parent is neither a raylet nor
another `ray::` process (a worker's own subprocesses have the worker as parent) has
outlived its raylet. Only processes of sessions under the Ray temp folder that a run
started here would use (`RAY_TMPDIR`, else `TMPDIR`, else /tmp, then `ray/`: Ray's own
rule) are considered. Live runs, `ray start` clusters (their head daemons are not `ray::`
processes, and their agents' parent is a live raylet) and other users' processes are
never touched. Linux only (/proc); elsewhere nothing is done.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

_PROC = Path("/proc")


def ray_temp_dir() -> Path:
    """Where a local Ray started here keeps its sessions (`ray._common.utils.get_default_ray_temp_dir`)."""
    if "RAY_TMPDIR" in os.environ:
        root = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        root = os.environ["TMPDIR"]
    else:
        root = "/tmp"
    return Path(root) / "ray"


def end_orphaned_ray_processes(timeout: float = 10.0) -> list[int]:
    """SIGKILL this user's Ray processes whose raylet is gone, wait until they have exited, return their pids.

    SIGKILL, because an idle runtime-env agent may ignore SIGTERM (ray-project/ray#59162).
    """
    sessions = f"{ray_temp_dir()}/session_"
    orphans = [pid for pid in _own_ray_processes() if not _has_ray_parent(pid) and _uses(pid, sessions)]
    for pid in orphans:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.05)
    return orphans


def _own_ray_processes() -> list[int]:
    """This user's running Ray processes (agents and workers: `_is_ray_process`), this process excepted."""
    found = []
    for entry in _PROC.glob("[0-9]*"):
        try:
            own = entry.stat().st_uid == os.getuid()
            command = (entry / "cmdline").read_bytes()  # empty for a zombie: it has exited already
        except OSError:  # gone meanwhile
            continue
        if own and _is_ray_process(command) and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _is_ray_process(command: bytes) -> bool:
    """A process Ray retitled (`ray::Name`), or one of its agents that still has Python's command line:
    a script of the `ray` package (`.../ray/_private/runtime_env/agent/main.py`)."""
    return command.startswith(b"ray::") or _ray_script(command)


def _ray_script(command: bytes) -> bool:
    script = next((arg for arg in command.split(b"\0")[1:] if not arg.startswith(b"-")), b"")
    return b"/ray/" in script and script.endswith(b".py")


def _has_ray_parent(pid: int) -> bool:
    """Whether `pid`'s parent is a raylet or another `ray::` process, or a Ray script's parent is a live
    Python program (True if `pid` is gone: nothing to end)."""
    stat = _stat(pid)
    if stat is None:
        return True
    try:
        parent = (_PROC / stat[1] / "cmdline").read_bytes()
    except OSError:
        return False
    program = parent.split(b"\0", 1)[0]
    if parent.startswith(b"ray::") or program.endswith(b"/raylet") or program == b"raylet":
        return True
    # a Ray script whose parent is a Python program is a live driver's head process (its log
    # monitor, its dashboard); one left by a dead driver has been reparented to init
    try:
        command = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return True
    return _ray_script(command) and b"python" in program.rsplit(b"/", 1)[-1]


def _uses(pid: int, prefix: str) -> bool:
    """Whether `pid` holds a file whose path starts with `prefix` (a Ray process keeps its session's logs open)."""
    try:
        descriptors = list((_PROC / str(pid) / "fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor).startswith(prefix):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has exited: only its parent's reaping is left)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from its third field on (state, parent pid, ...), None if the process is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
