"""What one round's checkpoint costs as the clients that exist grow while those that train do not.

A real client state is taken from a run (the scale benchmark's work: Fashion-MNIST, MLP,
Replay with mem_size 200, 100 clients, 10 a round, one round, checkpointed), copied to
N clients that have all trained before, and then each round 10 of them change. Timed:
`write_checkpoint` of such a round (pickle, fsync, rename, cleanup), median of `--rounds`,

- "whole": the clients' states as one dict inside the checkpoint file (how every
  checkpoint was written before; `write_checkpoint` still does this with a plain dict);
- "changed": a `ClientStates`, which writes the 10 states that changed and names the
  chain of files holding the rest.

    python benchmarks/checkpoint_cost.py [--clients 100 1000 10000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from flwr.app import ArrayRecord

from fedtide.records.checkpoint_files import CHECKPOINT_DIR
from fedtide.records.run_folder import create_run_folder
from fedtide.runner.simulation import simulate_in_process
from fedtide.scenario.loading import parse_scenario
from fedtide.server.checkpoint import Checkpoint, ClientStates, read_checkpoint, write_checkpoint
from fedtide.server.run_totals import RunTotals

PER_ROUND = 10


def one_client_state(folder: Path):
    """The Context.state a client of the scale benchmark's run sends with its reply after one round."""
    scenario = parse_scenario(
        {
            "name": "state",
            "seed": 0,
            "dataset": {"name": "fashion_mnist"},
            "model": {"name": "mlp"},
            "stream": {"n_experiences": 2},
            "partition": {"kind": "iid", "num_clients": 100},
            "federation": {"rounds_per_experience": 1, "fraction_train": PER_ROUND / 100, "min_train_nodes": PER_ROUND},
            "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "continual": {"method": "replay", "mem_size": 200},
            "resources": {"backend": "in_process"},
            "checkpoint": {"every": 1},
        }
    )
    run_dir = create_run_folder(scenario, folder)

    class Stop(Exception):
        pass

    def stop_after_round_2(record):  # round 2 consolidates experience 0: the replay buffer holds samples
        if record.round == 2:
            raise Stop

    try:
        simulate_in_process(scenario, run_dir, observer=stop_after_round_2)
    except Stop:
        pass
    states = read_checkpoint(run_dir, scenario).federation["client_states"]
    return scenario, max(states.values(), key=lambda s: len(pickle.dumps(s)))


def time_rounds(run_dir: Path, scenario, states, clients: int, rounds: int) -> tuple[float, int]:
    """Median seconds of one round's write_checkpoint, and the bytes that round wrote."""
    times, written = [], 0
    for index in range(rounds):
        global_round = index + 2
        if isinstance(states, ClientStates):  # a whole dict is written whole whatever changed
            for partition in range(index * PER_ROUND, (index + 1) * PER_ROUND):
                states.put(partition % clients, states[partition % clients])
        checkpoint = _checkpoint(scenario, states, global_round)
        before = {p.name for p in (run_dir / CHECKPOINT_DIR).iterdir()}
        start = time.perf_counter()
        write_checkpoint(run_dir, checkpoint)
        times.append(time.perf_counter() - start)
        written = sum(p.stat().st_size for p in (run_dir / CHECKPOINT_DIR).iterdir() if p.name not in before)
    return statistics.median(times), written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(f"{datetime.date.today()}, {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, load {os.getloadavg()[0]:.2f} at the start")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        scenario, state = one_client_state(Path(folder) / "source")
        size = len(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
        print(f"one client's state: {size / 1024:.1f} KiB pickled; {PER_ROUND} of N clients change each round")
        print(f"{'clients':>7s} {'whole: per round':>17s} {'written':>10s} {'changed':>17s} {'written':>10s}")
        for clients in args.clients:
            row = []
            for kind in ("whole", "changed"):
                run_dir = Path(folder) / f"{kind}{clients}"
                run_dir.mkdir()
                blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
                every = {partition: pickle.loads(blob) for partition in range(clients)}  # one object each, as in a run
                states = ClientStates(every) if kind == "changed" else every
                write_checkpoint(run_dir, _checkpoint(scenario, states, 1))  # every client has trained before
                row.append(time_rounds(run_dir, scenario, states, clients, args.rounds))
            (whole, whole_bytes), (changed, changed_bytes) = row
            print(f"{clients:7d} {whole * 1000:15.1f}ms {whole_bytes / 2**20:8.2f}MiB "
                  f"{changed * 1000:17.1f}ms {changed_bytes / 2**20:8.2f}MiB", flush=True)  # fmt: skip
    print(f"load {os.getloadavg()[0]:.2f} at the end")


def _checkpoint(scenario, states, global_round: int) -> Checkpoint:
    """A checkpoint holding the clients' states only (the rest is alike whatever the clients)."""
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


if __name__ == "__main__":
    main()
