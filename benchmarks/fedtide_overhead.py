"""What a fedtide run costs over a bare PyTorch loop doing the same training.

One digits client, IID, one experience (all 10 classes), R rounds of one local epoch:
fedtide runs it as a Flower simulation on Ray (ClientApp in a Ray worker, Avalanche
learner, server-side evaluation after every round, run files); the bare loop trains
the same MLP for R epochs with the same optimiser and batch size and evaluates once
per epoch. The gap is fixed start-up (Ray, the worker's imports of torch, Avalanche
and Flower) plus a per-round cost (messages, rebuilding the learner, evaluation).

    python benchmarks/fedtide_overhead.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtide.data.datasets import load_dataset
from fedtide.models import build_model
from fedtide.records.run_folder import create_run_folder, read_metrics
from fedtide.runner.simulation import simulate
from fedtide.scenario.loading import parse_scenario


def bare_loop(rounds: int, batch_size: int, lr: float) -> float:
    data = load_dataset("digits", None)
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    for _ in range(rounds):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            (model(data.test_x).argmax(1) == data.test_y).float().mean()
    return time.perf_counter() - start


def fedtide_run(rounds: int, batch_size: int, lr: float) -> tuple[float, float, float]:
    """Total wall time, time to the end of round 1, and the mean time of the later rounds."""
    scenario = parse_scenario(
        {
            "name": "overhead",
            "stream": {"n_experiences": 1},
            "partition": {"kind": "iid", "num_clients": 1},
            "federation": {"rounds_per_experience": rounds},
            "client": {"epochs": 1, "batch_size": batch_size, "lr": lr},
            "continual": {"method": "naive"},
        }
    )
    with tempfile.TemporaryDirectory() as output:
        folder = create_run_folder(scenario, Path(output))
        start = time.perf_counter()
        simulate(scenario, folder)
        total = time.perf_counter() - start
        ends = [r["wall_time_s"] for r in read_metrics(folder) if r["type"] == "round"]
    return total, ends[0], (ends[-1] - ends[0]) / (len(ends) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    bare = bare_loop(args.rounds, 32, 0.05)
    total, first_round, later_round = fedtide_run(args.rounds, 32, 0.05)
    print(f"bare loop: {bare:.2f} s for {args.rounds} epochs ({bare / args.rounds * 1000:.0f} ms per epoch)")
    print(f"fedtide:   {total:.2f} s in all; round 1 ends {first_round:.2f} s after the server starts,")
    print(f"           later rounds take {later_round * 1000:.0f} ms each")
    per_round = later_round / (bare / args.rounds)
    print(f"fedtide / bare: {total / bare:.1f}x in all, {per_round:.1f}x per round after start-up")


if __name__ == "__main__":
    main()
