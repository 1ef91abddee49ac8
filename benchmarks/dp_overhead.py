"""DP-SGD step time over non-private step time, for fedtide's default models on this machine.

Both loops run the same model, batch size and data; the DP loop is Opacus's
make_private (Poisson sampling, per-sample gradients, clipping, noise), as fedtide's
clients use it. Anchor: about 1.55x for Opacus's MNIST CNN on CPU (Opacus README).

    python benchmarks/dp_overhead.py [--steps 60] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedtide.models import build_model

CASES = [("mlp", (1, 8, 8), "digits-sized"), ("cnn", (1, 28, 28), "Fashion-MNIST-sized")]


def seconds_per_step(model, loader, optimizer, steps: int) -> float:
    criterion = torch.nn.CrossEntropyLoss()
    done, start = 0, 0.0
    while done < steps + 5:
        for x, y in loader:
            if done == 5:  # warm-up steps are not timed
                start = time.perf_counter()
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps + 5:
                break
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for name, shape, label in CASES:
        data = TensorDataset(torch.randn(args.batch_size * 40, *shape), torch.randint(0, 10, (args.batch_size * 40,)))
        plain_model = build_model(name, shape, 10, seed=0)
        plain = seconds_per_step(
            plain_model,
            DataLoader(data, batch_size=args.batch_size, shuffle=True),
            torch.optim.SGD(plain_model.parameters(), lr=0.05),
            args.steps,
        )
        dp_model = build_model(name, shape, 10, seed=0)
        model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=dp_model,
            optimizer=torch.optim.SGD(dp_model.parameters(), lr=0.05),
            data_loader=DataLoader(data, batch_size=args.batch_size),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
        private = seconds_per_step(model, loader, optimizer, args.steps)
        print(
            f"{name:4s} ({label}, batch {args.batch_size}): non-DP {1000 * plain:.2f} ms/step, "
            f"DP {1000 * private:.2f} ms/step, DP/non-DP = {private / plain:.2f}x"
        )


if __name__ == "__main__":
    main()
