"""What one experiment costs: the same federated training as a bare loop, as plain Flower and as fedtide.

The work (issue 11): digits, 10 IID clients, one experience with every class, 15 rounds
of 2 local epochs, MLP, SGD lr 0.05, batch 32, FedAvg, the global test accuracy after
each round. Each variant runs as its own process and is timed whole, start to exit:

- bare loop: one process trains the 10 shards in turn each round and averages them;
- plain Flower: `benchmarks/plain_flower.py` (`run_simulation` on Ray, one CPU per client);
- fedtide run: `fedtide run` on Ray (audit, run files and report included);
- fedtide in-process: `fedtide run --set resources.backend=in_process` (no Ray).

    python benchmarks/experiment_cost.py
"""

from __future__ import annotations

import os
import platform
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


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    python, here = sys.executable, Path(__file__).parent
    fedtide = str(Path(python).with_name("fedtide"))
    print(f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}")
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


if __name__ == "__main__":
    main()
