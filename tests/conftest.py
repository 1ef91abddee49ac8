"""What the test modules share: scenarios small enough for 2 CPU cores, one in-process run of the small
scenario per session, a recording grid, direct training calls, the CLI in-process or as a subprocess, and
the `ray` marker kept honest (a test that starts a local Ray without it fails)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, Message

from fedtide.cli.commands import main
from fedtide.models import build_model
from fedtide.records.metrics import RoundRecord
from fedtide.records.run_folder import read_metrics
from fedtide.records.wire import client_round
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.runner.ray_housekeeping import ray_temp_dir
from fedtide.scenario.loading import parse_scenario
from fedtide.scenario.schema import Scenario

# The suite's models are tiny and its 2 cores are shared with Ray workers and subprocesses:
# a second intra-op thread gains nothing and, with another process busy, its waiting makes
# in-process training 2-3 times slower. The numbers are the same either way.
torch.set_num_threads(1)

# Every local Ray the suite starts (in this process, a subprocess or a SuperLink's) keeps its session
# folder here, so a test that started one is seen to, and the suite never meets another user's Ray.
# Short, under /tmp: Ray's Unix sockets live in it (path length limit ~107).
RAY_TMPDIR = Path(tempfile.mkdtemp(prefix="fedtide-suite-ray-", dir="/tmp"))


def pytest_configure(config):
    os.environ["RAY_TMPDIR"] = str(RAY_TMPDIR)


def pytest_unconfigure(config):
    shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


RAY_SESSIONS = pytest.StashKey[set[str]]()


def ray_sessions() -> set[str]:
    return {p.name for p in (RAY_TMPDIR / "ray").glob("session_2*")}


def pytest_collection_modifyitems(config, items):
    """A test that starts Ray is slow too: Ray's start alone takes seconds (`-m "not slow"` leaves it out).

    Modules are put in order of the time their slow tests take, most first (each test keeps its
    place in its module): `make test`'s two workers take whole modules in that order, so the
    long ones start first and the short ones fill in beside them rather than leave one
    worker waiting for the other at the end.
    """
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.slow)
    weight: dict[str, int] = {}
    for item in items:
        cost = 2 if item.get_closest_marker("ray") else int(item.get_closest_marker("slow") is not None)
        weight[item.module.__name__] = weight.get(item.module.__name__, 0) + cost
    items.sort(key=lambda item: -weight[item.module.__name__])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[RAY_SESSIONS] = ray_sessions()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """After the test and the fixtures it ended (a module's shared run counts for its first test)."""
    started = ray_sessions() - item.stash[RAY_SESSIONS]
    if started and item.get_closest_marker("ray") is None:
        pytest.fail(f"{item.nodeid} started Ray ({', '.join(sorted(started))}) but is not marked `ray`", pytrace=False)



class Crash(Exception):
    """Stands for anything that ends a run between two rounds."""


def crash_after(global_round: int):
    """A round observer that ends the run after `global_round`, as a kill would."""

    def observer(record):
        if record.round == global_round:
            raise Crash

    return observer


def write_scenario_file(tmp_path: Path, content: dict | str) -> Path:
    """`content` (a scenario as a dict, or YAML text) as tmp_path/scenario.yaml."""
    path = tmp_path / "scenario.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def small_scenario(**sections):
    """A digits scenario of 3 experiences, 4 Dirichlet clients and 2 rounds each, overridable."""
    raw = {
        "name": "small",
        "seed": 0,
        "stream": {"n_experiences": 3},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 4},
        "federation": {"rounds_per_experience": 2},
        "continual": {"method": "replay", "mem_size": 60},
        # half the default local training (2 epochs at lr 0.1): enough for every behaviour tested
        "client": {"epochs": 1, "lr": 0.05},
    }
    raw.update(sections)
    return parse_scenario(raw)


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every train message it delivered, every train reply, and how many
    messages each push carried: what went over the wire, which the run files only summarise."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__(num_nodes)
        self.delivered: list[Message] = []
        self.replies: list[Message] = []
        self.pushes: list[int] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.delivered += [m for m in messages if m.metadata.message_type == "train"]
        self.pushes.append(len(messages))
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.replies += [m for m in replies if m.metadata.message_type == "train"]
        return replies


def initial_arrays(scenario) -> ArrayRecord:
    """The scenario's model as every client of a direct training call starts from (seeded)."""
    torch.manual_seed(0)
    return ArrayRecord(build_model(scenario.model.name, scenario.input_shape, scenario.num_classes).state_dict())


def flat(arrays: ArrayRecord) -> np.ndarray:
    """Every weight in one vector, to measure how far training moved them."""
    return np.concatenate([a.numpy().ravel() for a in arrays.values()])


def run_rounds(scenario, partition_id, schedule, state=None, mu=0.0):
    """Train through `schedule` = [(experience, global_round), ...]; return last arrays, report, state."""
    from fedtide.client.schedule import train_schedule  # Avalanche: not for pytest-xdist's controller to import

    last = train_schedule(scenario, partition_id, schedule, initial_arrays(scenario), state, mu)[-1]
    return last.reply["arrays"], client_round(last.reply), last.state


ROOT = Path(__file__).resolve().parents[1]
FEDTIDE = [sys.executable, "-c", "from fedtide.cli.commands import main; main()"]


class Fedtide:
    """A `fedtide` command running in a subprocess, its output in files."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        name = f"{args[0]}-{time.monotonic_ns()}"
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            env = os.environ | {"PYTHONPATH": str(ROOT)}
            self.process = subprocess.Popen([*FEDTIDE, *args], stdout=out, stderr=err, env=env, cwd=tmp_path)

    def wait_for_round(self, folder: Path, global_round: int, timeout: float = 300) -> None:
        """Until metrics.jsonl has `global_round` rounds (the run must still be going)."""
        deadline = time.monotonic() + timeout
        while rounds_written(folder) < global_round:
            assert self.process.poll() is None, f"fedtide ended early: {self.err.read_text()}"
            assert time.monotonic() < deadline, f"no round {global_round} after {timeout} s"
            time.sleep(0.1)

    def stop(self, signum: int, timeout: float = 60) -> tuple[int, float]:
        """Send `signum`; the exit code and how long the process took to end."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        return code, time.monotonic() - sent


def rounds_written(folder: Path) -> int:
    """How many round lines a run has written to its metrics.jsonl so far."""
    if not (folder / "metrics.jsonl").is_file():
        return 0
    return sum(1 for r in read_metrics(folder) if r["type"] == "round")


def ray_session_processes(driver_pid: int) -> list[str]:
    """Running processes of the Ray sessions that process `driver_pid` started (holding their files)."""
    return session_processes(s.name for s in ray_temp_dir().glob(f"session_*_{driver_pid}"))


def session_processes(names: Iterable[str]) -> list[str]:
    """Running processes of these Ray sessions (folder names under `ray_temp_dir()`), holding their files."""
    sessions = [str(ray_temp_dir() / name) for name in names]
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited; only its parent's reaping is left
            command = entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()
            files = [os.readlink(fd) for fd in entry.joinpath("fd").iterdir()]
        except OSError:
            continue
        if any(path.startswith(session) for session in sessions for path in [command, *files]):
            found.append(f"{entry.name} {command[:60]}")
    return found


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write `array` as a uint8 idx file (the MNIST family's format), gzipped when `path` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_fashion_mnist(folder: Path, suffix: str = ".gz", train_per_class: int = 100) -> Path:
    """A small but valid Fashion-MNIST in `folder`: the four idx files, 28x28 images, labels 0-9.

    100 training images per class are enough for the shipped fmnist scenarios' partitioning
    (10 Dirichlet clients over 5 experiences) and DP calibration, so those scenarios validate
    on a machine without the Debian package.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", train_per_class), ("t10k", 20)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (len(labels), 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture(scope="session", autouse=True)
def fresh_cache(tmp_path_factory):
    """The suite's own `fedtide.data.cache` folder, starting empty (subprocesses and Ray workers inherit it)."""
    before = os.environ.get("FEDTIDE_CACHE_DIR")
    os.environ["FEDTIDE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedtide-cache"))
    yield
    if before is None:
        del os.environ["FEDTIDE_CACHE_DIR"]
    else:
        os.environ["FEDTIDE_CACHE_DIR"] = before


@dataclass(frozen=True)
class SmallRun:
    """`small_scenario()` run to the end in-process: the numbers its runs on any backend, stopped and
    resumed or swept, must give. Read it, never write to it: it is shared by the whole session."""

    scenario: Scenario
    folder: Path
    summary: dict
    observed: list[RoundRecord]  # what the run's observer was handed, round by round


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> SmallRun:
    from fedtide.records.run_folder import create_run_folder
    from fedtide.runner.simulation import simulate_in_process

    scenario = small_scenario()
    folder = create_run_folder(scenario, tmp_path_factory.mktemp("small-run"))
    observed: list[RoundRecord] = []
    simulate_in_process(scenario, folder, observer=observed.append)
    return SmallRun(scenario, folder, json.loads((folder / "summary.json").read_text()), observed)


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory) -> Path:
    """A folder to give as `dataset.root` to Fashion-MNIST scenarios (see `write_fashion_mnist`)."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"))


def cli(*args: str) -> tuple[int, str, str]:
    """Run `fedtide ARGS...` in-process; return (exit code, stdout, stderr). For module-scoped fixtures,
    which cannot use `run_cli`'s function-scoped capsys."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["fedtide", *args]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `fedtide ARGS...` in-process; return (exit code, stdout, stderr)."""

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fedtide", *args])
        code = 0
        try:
            main()
        except SystemExit as done:
            code = done.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def stored_method_state(records, scenario=None) -> dict:
    """The continual method's state as a client stored it in `Context.state`, decoded.

    `scenario` gives the model that stored modules are rebuilt into (any, for states without one).
    """
    from fedtide.client.state import METHOD_ARRAYS_KEY, METHOD_LAYOUT_KEY
    from fedtide.continual.state_codec import decode
    from fedtide.models import build_scenario_model

    scenario = scenario or small_scenario()
    model = build_scenario_model(scenario)
    return decode(records[METHOD_ARRAYS_KEY], records[METHOD_LAYOUT_KEY], model)
