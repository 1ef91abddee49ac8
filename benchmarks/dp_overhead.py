"""DP-SGD step time over non-private step time, per model and per Opacus grad sample mode.

Every loop runs the same model, batch size and data; a DP loop is Opacus's make_private
(Poisson sampling, per-sample clipping, noise) in one `grad_sample_mode`: "hooks"
(fedtide's default), "functorch", "ew" (expanded weights; measured for reference,
fedtide cannot use it) and "ghost" (ghost clipping, whose loss runs two backward passes).
The mode changes time only: each DP step is accounted alike, so ε does not move.

The machine is shared, so the loops are timed in alternation: each repeat times a block
of steps of the non-private loop and of every DP loop back to back, a ratio is taken
within the repeat, and the median (and range) of the repeats' ratios is printed.
Anchor: about 1.55x for Opacus's MNIST CNN on CPU (Opacus README).

    python benchmarks/dp_overhead.py [--steps 10] [--repeats 9] [--batch-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import opacus
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedtide.models import build_model

CASES = [("mlp", (1, 8, 8), "digits-sized"), ("cnn", (1, 28, 28), "Fashion-MNIST-sized")]
MODES = ["hooks", "functorch", "ew", "ghost"]

Step = Callable[[], None]


def training_step(model, optimizer, loader: DataLoader, criterion) -> Step:
    """One step of the loop: next batch (a fresh epoch when one ends), forward, backward, update."""
    batches: Iterator = iter(())

    def step() -> None:
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def plain_step(name: str, shape: tuple[int, int, int], data: TensorDataset, batch_size: int) -> Step:
    model = build_model(name, shape, 10, seed=0)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    return training_step(model, torch.optim.SGD(model.parameters(), lr=0.05), loader, torch.nn.CrossEntropyLoss())


def private_step(name: str, shape: tuple[int, int, int], data: TensorDataset, batch_size: int, mode: str) -> Step:
    """Opacus's make_private in `mode`; ghost clipping returns the loss that runs its two passes."""
    model = build_model(name, shape, 10, seed=0)
    criterion = torch.nn.CrossEntropyLoss()
    made = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        criterion=criterion,
        data_loader=DataLoader(data, batch_size=batch_size),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        module, optimizer, criterion, loader = made
    else:
        module, optimizer, loader = made
    return training_step(module, optimizer, loader, criterion)


def seconds_per_step(step: Step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(loops: dict[str, Step], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of every loop in each repeat, the loops timed back to back (after a warm-up)."""
    for step in loops.values():
        seconds_per_step(step, 3)
    times: dict[str, list[float]] = {label: [] for label in loops}
    for _ in range(repeats):
        for label, step in loops.items():
            times[label].append(seconds_per_step(step, steps))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per loop in each repeat")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 is what a client with num_cpus_per_client: 1 gets"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for known in ("Secure RNG turned off", "Full backward hook is firing"):
        warnings.filterwarnings("ignore", message=known)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, opacus {opacus.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; batch {args.batch_size}, "
        f"{args.repeats} repeats of {args.steps} steps per loop"
    )
    for name, shape, label in CASES:
        print(f"{name} ({label} input {'x'.join(map(str, shape))})")
        print(f"  {'mode':10s} {'non-DP ms':>10s} {'DP ms':>8s} {'DP/non-DP':>10s}  range of repeats")
        size = args.batch_size * 40
        data = TensorDataset(torch.randn(size, *shape), torch.randint(0, 10, (size,)))
        loops = {"non-DP": plain_step(name, shape, data, args.batch_size)}
        loops |= {mode: private_step(name, shape, data, args.batch_size, mode) for mode in MODES}
        times = measure(loops, args.steps, args.repeats)
        plain = times["non-DP"]
        for mode in MODES:
            ratios = [dp / base for dp, base in zip(times[mode], plain)]
            print(
                f"  {mode:10s} {1000 * statistics.median(plain):10.2f} {1000 * statistics.median(times[mode]):8.2f} "
                f"{statistics.median(ratios):9.2f}x  {min(ratios):.2f}-{max(ratios):.2f}x"
            )


if __name__ == "__main__":
    main()
