"""What a round costs as the federation grows while the clients in a round do not.

The work (issue 11, "Scale"): Fashion-MNIST, MLP, Replay (mem_size 200), 2 experiences of
3 rounds, 1 local epoch, 10 clients sampled per round (`federation.fraction_train` =
10/N, `min_train_nodes` 10), no checkpoints, with N = 100 and N = 1,000 clients in all
(issue 21 adds 10,000: `--clients 100 1000 10000`).
Each run is its own `fedtide run` process; from its `metrics.jsonl` (`wall_time_s` is
cumulative from the run's start):

- start-up: from the process's start to the first line of its metrics.jsonl (seen by a
  0.2 s poll), less one round (the median below): imports, data, Ray and its workers;
- per round: the median of the differences between consecutive rounds, leaving out the
  first round of each experience (it also carries consolidation and the first calls of
  the experience's workers);
- peak memory: the largest sum of RSS over the `fedtide run` process and its descendants
  (Ray's GCS, raylet and workers), sampled every 0.2 s with psutil (pages shared between
  processes count once per process, as RSS does).

    python benchmarks/scale.py [--clients 100 1000] [--backends ray in_process] [--trees before=DIR after=DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

PER_ROUND, EXPERIENCES, ROUNDS = 10, 2, 3


def scenario(num_clients: int) -> dict:
    return {
        "name": f"scale{num_clients}",
        "seed": 0,
        "dataset": {"name": "fashion_mnist"},
        "model": {"name": "mlp"},
        "stream": {"n_experiences": EXPERIENCES},
        "partition": {"kind": "iid", "num_clients": num_clients},
        "federation": {
            "rounds_per_experience": ROUNDS,
            "fraction_train": PER_ROUND / num_clients,
            "min_train_nodes": PER_ROUND,
        },
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "continual": {"method": "replay", "mem_size": 200},
        "resources": {"num_cpus_per_client": 1},
        "checkpoint": {"every": 0},
    }


class PeakMemory:
    """The largest RSS summed over `root` and its descendants (Ray's GCS, raylet and workers), sampled in a thread."""

    def __init__(self, root: psutil.Process, metrics: Path, interval: float = 0.2) -> None:
        self.root, self.metrics, self.interval, self.peak = root, metrics, interval, 0
        self.first_record: float | None = None  # when metrics.jsonl first held a line (time.time())
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                processes = []
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            if self.first_record is None and self.metrics.exists() and self.metrics.stat().st_size:
                self.first_record = time.time()
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def run_once(fedtide: str, folder: Path, num_clients: int, backend: str, env: dict[str, str]) -> dict:
    scenario_file = folder / f"scale{num_clients}.yaml"
    output = folder / backend
    start = time.time()
    process = subprocess.Popen(
        [fedtide, "run", str(scenario_file), "--set", f"resources.backend={backend}", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    metrics = output / f"scale{num_clients}" / "metrics.jsonl"
    memory = PeakMemory(psutil.Process(process.pid), metrics)
    _, stderr = process.communicate()
    wall = time.time() - start
    peak = memory.stop()
    if process.returncode:
        raise RuntimeError(f"fedtide run failed ({backend}, {num_clients} clients): {stderr.decode()[-2000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rounds = [r for r in records if "round_in_experience" in r]
    steps = [b["wall_time_s"] - a["wall_time_s"] for a, b in zip(rounds, rounds[1:]) if b["round_in_experience"] > 1]
    per_round = statistics.median(steps)
    return {
        "startup": memory.first_record - start - per_round,
        "per_round": per_round,
        "steps": steps,
        "wall": wall,
        "peak_gib": peak / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--backends", nargs="+", default=["ray", "in_process"], choices=["ray", "in_process"])
    parser.add_argument("--trees", nargs="+", default=[], metavar="NAME=PATH",
                        help="source trees to compare (each first on PYTHONPATH): before=/tmp/main")  # fmt: skip
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.trees) or {"this tree": ""}
    fedtide = str(Path(sys.executable).with_name("fedtide"))
    print(f"{datetime.date.today()}, {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, load {os.getloadavg()[0]:.2f} at the start")  # fmt: skip
    print(f"{'tree':10s} {'backend':11s} {'clients':>7s} {'start-up':>9s} {'per round':>10s} {'whole run':>10s} "
          f"{'peak':>9s}   rounds")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        # The partitions are made once per scenario, by `fedtide validate`, and kept in the benchmark's own cache
        # folder, so that no run pays for them (a run's first time with a scenario adds 1-5 s per process).
        base = {**os.environ, "FEDTIDE_CACHE_DIR": f"{folder}/cache"}
        for num_clients in args.clients:
            scenario_file = Path(folder) / f"scale{num_clients}.yaml"
            scenario_file.write_text(yaml.safe_dump(scenario(num_clients)))
            subprocess.run([fedtide, "validate", str(scenario_file)], check=True, capture_output=True, env=base)
        for backend in args.backends:
            for num_clients in args.clients:
                for name, path in trees.items():
                    env = {**base, "PYTHONPATH": os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")]))}
                    with tempfile.TemporaryDirectory(dir=folder) as run_folder:
                        shutil.copy(Path(folder) / f"scale{num_clients}.yaml", run_folder)
                        result = run_once(fedtide, Path(run_folder), num_clients, backend, env)
                    print(f"{name:10s} {backend:11s} {num_clients:7d} {result['startup']:8.1f}s "
                          f"{result['per_round']:9.2f}s {result['wall']:9.1f}s {result['peak_gib']:6.2f} GiB   "
                          f"({', '.join(f'{s:.2f}' for s in result['steps'])})", flush=True)  # fmt: skip
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
