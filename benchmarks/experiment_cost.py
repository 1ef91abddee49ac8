"""What one experiment costs: the same federated training as a bare loop, as plain Flower and as fedtide.

The work (issue 11): digits, 10 IID clients, one experience with every class, 15 rounds
of 2 local epochs, MLP, SGD lr 0.05, batch 32, FedAvg, the global test accuracy after
each round. Each variant runs as its own process and is timed whole, start to exit:

- bare loop: one process trains the 10 shards in turn each round and averages them;
- plain Flower: `benchmarks/plain_flower.py` (`run_simulation` on Ray, one CPU per client);
- fedtide run: `fedtide run` on Ray (audit, run files and report included);
- fedtide in-process: `fedtide run --set resources.backend=in_process` (no Ray).

Then the lean commands against `import torch` (`fedtide --help`; `fedtide validate` on
the quickstart, first with an empty `fedtide.data.cache` folder each time, then with the
digits split and partitions kept; `fedtide report` on a quickstart run), and a 4-point
sweep of the quickstart (2 methods x 2 seeds) against the same four points run one by
one with `fedtide run`, both on Ray.

    python benchmarks/experiment_cost.py [--only experiment|lean|sweep]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CLIENTS, ROUNDS, EPOCHS = 10, 15, 2
SCENARIO = {
    "name": "cost",
    "seed": 0,
    "dataset": {"name": "digits"},
    "model": {"name": "mlp"},
    "stream": {"n_experiences": 1},
    "partition": {"kind": "iid", "num_clients": CLIENTS},
    "federation": {"rounds_per_experience": ROUNDS},
    "client": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.05},
    "continual": {"method": "naive"},
    "resources": {"num_cpus_per_client": 1},
}
BARE = f"""
import torch
from fedtide.data.datasets import load_dataset
from fedtide.models import build_model
data, model = load_dataset("digits"), build_model("mlp", (1, 8, 8), 10, seed=0)
for _ in range({ROUNDS}):
    states, sizes = [], []
    for shard in range({CLIENTS}):
        x, y = data.train_x[shard::{CLIENTS}], data.train_y[shard::{CLIENTS}]
        local = build_model("mlp", (1, 8, 8), 10)
        local.load_state_dict(model.state_dict())
        optimizer = torch.optim.SGD(local.parameters(), lr=0.05)
        for _ in range({EPOCHS}):
            for batch in torch.randperm(len(y)).split(32):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(local(x[batch]), y[batch]).backward()
                optimizer.step()
        states.append(local.state_dict())
        sizes.append(len(y))
    model.load_state_dict({{k: sum(s[k] * n for s, n in zip(states, sizes)) / sum(sizes) for k in states[0]}})
    with torch.no_grad():
        (model(data.test_x).argmax(1) == data.test_y).float().mean()
"""


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


# The sweep of issue 11: the quickstart, 2 methods x 2 seeds.
SWEEP_GRID = {"continual.method": ["naive", "replay"], "seeds": [0, 1]}
QUICKSTART = Path(__file__).parents[1] / "scenarios" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["experiment", "lean", "sweep"], help="run one part only")
    only = parser.parse_args().only
    python, here = sys.executable, Path(__file__).parent
    fedtide = str(Path(python).with_name("fedtide"))
    print(f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}")
    if only in (None, "experiment"):
        one_experiment(python, here, fedtide)
    if only in (None, "lean"):
        lean_commands(python, fedtide)
    if only in (None, "sweep"):
        sweep_against_runs(fedtide)


def one_experiment(python: str, here: Path, fedtide: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        scenario = Path(folder) / "cost.yaml"
        scenario.write_text(yaml.safe_dump(SCENARIO))
        walls = {
            "import torch": timed([python, "-c", "import torch"]),
            "bare loop": timed([python, "-c", BARE]),
            "plain Flower": timed([python, str(here / "plain_flower.py"), "--clients", str(CLIENTS),
                                   "--rounds", str(ROUNDS), "--epochs", str(EPOCHS)]),
            "fedtide run": timed([fedtide, "run", str(scenario), "--output", f"{folder}/ray"]),
            "fedtide in-process": timed([fedtide, "run", str(scenario), "--set", "resources.backend=in_process",
                                         "--output", f"{folder}/local"]),
        }  # fmt: skip
    for name, wall in walls.items():
        print(f"{name:20s} {wall:6.1f} s   {wall / walls['plain Flower']:5.2f}x plain Flower   "
              f"{wall / walls['bare loop']:5.1f}x bare loop")  # fmt: skip


def lean_commands(python: str, fedtide: str, repeats: int = 5) -> None:
    """Median of `repeats` each, interleaved so that a busy moment hits them alike.

    Every command uses a cache folder of its own (`FEDTIDE_CACHE_DIR`): "nothing kept" an
    empty one each time, the others the one the quickstart run below filled.
    """
    with tempfile.TemporaryDirectory() as folder:
        kept = {**os.environ, "FEDTIDE_CACHE_DIR": f"{folder}/cache"}
        subprocess.run([fedtide, "run", str(QUICKSTART), "--set", "resources.backend=in_process",
                        "--output", folder], check=True, capture_output=True, env=kept)  # fmt: skip
        commands = {
            "import torch": [python, "-c", "import torch"],
            "fedtide --help": [fedtide, "--help"],
            "validate, nothing kept": [fedtide, "validate", str(QUICKSTART)],
            "fedtide validate": [fedtide, "validate", str(QUICKSTART)],
            "fedtide report": [fedtide, "report", f"{folder}/quickstart"],
        }
        walls: dict[str, list[float]] = {name: [] for name in commands}
        for repeat in range(repeats):
            for name, command in commands.items():
                empty = {**os.environ, "FEDTIDE_CACHE_DIR": f"{folder}/empty-{repeat}"}
                walls[name].append(timed(command, empty if name.endswith("nothing kept") else kept))
    torch_wall = statistics.median(walls["import torch"])
    for name, times in walls.items():
        wall = statistics.median(times)
        print(f"{name:24s} {wall:6.2f} s   {wall / torch_wall:5.2f}x import torch   "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)})")  # fmt: skip


def sweep_against_runs(fedtide: str) -> None:
    raw = yaml.safe_load(QUICKSTART.read_text())
    with tempfile.TemporaryDirectory() as folder:
        sweep_file = Path(folder) / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({**raw, "name": "sweep4", "sweep": SWEEP_GRID}))
        separate = sum(
            timed([fedtide, "run", str(QUICKSTART), "--set", f"continual.method={method}", "--set", f"seed={seed}",
                   "--output", f"{folder}/separate"])
            for method in SWEEP_GRID["continual.method"] for seed in SWEEP_GRID["seeds"]
        )  # fmt: skip
        swept = timed([fedtide, "sweep", str(sweep_file), "--output", f"{folder}/sweep"])
    print(f"4 separate runs      {separate:6.1f} s")
    print(f"one 4-point sweep    {swept:6.1f} s   {swept / separate:5.2f}x the separate runs")


if __name__ == "__main__":
    main()
