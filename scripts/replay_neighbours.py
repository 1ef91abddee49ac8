"""How many other samples' replay-buffer membership one added sample changes (docs/results.md).

    python scripts/replay_neighbours.py [SCENARIO] [--client C] [--set key=value ...] [--trials N]

For one client of the scenario (default: scenarios/quickstart.yaml, client 0) it builds
neighbouring datasets D' (the client's data) and D = D' less one sample x (a random sample
of a random past experience; in D' it sits at its own place, or, second case, is moved
to the end of its experience's data), consolidates the client's experiences before the last one with
fedtide's `Replay` exactly as a client does (the same seed for D and D'), and counts the
samples other than x whose membership in the final buffer differs. It does so for the
buffer without DP (Avalanche's reservoir per experience) and under DP (independent coins,
`fedtide.continual.coin_buffer`), and prints the coin buffer's size over the trials.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from types import SimpleNamespace

import numpy as np
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

from fedtide.client.training import seed_everything
from fedtide.continual.methods import build_method
from fedtide.data.stream import training_pool
from fedtide.data.stream_plan import stream_plan
from fedtide.privacy.coins import SampleCoins
from fedtide.privacy.footprint import PrivateFootprint
from fedtide.scenario.loading import load_scenario


def client_ids(scenario, client: int) -> list[list[int]]:
    """Sample ids of the client's data in each experience, in the client's order."""
    return [exp.train.tolist() for exp in stream_plan(scenario).client(client).experiences]


def final_buffer(scenario, client: int, ids: list[list[int]], private: bool, sizes: list[int]) -> set[int]:
    """The buffer after consolidating every experience before the last, as the client's rounds do."""
    pool = training_pool(scenario)
    method = build_method(scenario.continual)
    method.bind(None, pool)
    if private:
        method.use_privacy(SimpleNamespace(coins=SampleCoins(scenario.seed, client), planned_sizes=sizes))
    experiences = benchmark_from_datasets(train=[pool.subset(part) for part in ids]).train_stream
    rounds = scenario.federation.rounds_per_experience
    for past in range(len(ids) - 1):
        if not ids[past]:
            continue
        seed_everything(scenario.seed, client, (past + 1) * rounds + 1)  # the round that consolidates it
        method.consolidate(SimpleNamespace(experience=experiences[past]))
    return {int(i) for i in method.storage.buffer.sample_id}


def without(ids: list[list[int]], experience: int, position: int) -> list[list[int]]:
    """The client's data less the sample at `position` of `experience`."""
    removed = [list(part) for part in ids]
    del removed[experience][position]
    return removed


def moved_last(ids: list[list[int]], experience: int, position: int) -> list[list[int]]:
    """The client's data with the sample at `position` of `experience` moved to its end."""
    moved = [list(part) for part in ids]
    moved[experience].append(moved[experience].pop(position))
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="scenarios/quickstart.yaml")
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a scenario override, key=value")
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    show = warnings.showwarning  # Avalanche re-enables its deprecation warning on every call: drop it at display
    warnings.showwarning = lambda message, *rest: (
        None if "deprecated function update" in str(message) else show(message, *rest)
    )
    base = load_scenario(args.scenario, args.overrides)
    ids = client_ids(base, args.client)
    sizes = [len(part) for part in ids]
    past = [e for e in range(len(ids) - 1) if ids[e]]
    rng = np.random.default_rng(12345)
    changed = {"reservoir, x at its place": [], "reservoir, x last": [], "coins (DP)": []}
    coin_sizes = []
    for trial in range(args.trials):
        scenario = base.model_copy(update={"seed": trial})
        experience = int(rng.choice(past))
        position = int(rng.integers(0, len(ids[experience])))
        x = ids[experience][position]
        last = moved_last(ids, experience, position)
        cases = {  # (D, D' = D + x, private)
            "reservoir, x at its place": (without(ids, experience, position), ids, False),
            "reservoir, x last": (without(last, experience, len(last[experience]) - 1), last, False),
            "coins (DP)": (without(ids, experience, position), ids, True),
        }
        for name, (smaller, larger, private) in cases.items():
            before = final_buffer(scenario, args.client, smaller, private, sizes)
            after = final_buffer(scenario, args.client, larger, private, sizes)
            changed[name].append(len((before ^ after) - {x}))
            if private:
                coin_sizes.append(len(after))
    mem = build_method(base.continual).mem_size
    print(f"{args.scenario}, client {args.client}: experience sizes {sizes}, mem_size {mem}, {args.trials} trials")
    for name, counts in changed.items():
        hit = sum(c > 0 for c in counts)
        print(
            f"{name}: other samples whose membership changed: mean {statistics.mean(counts):.2f}, "
            f"max {max(counts)}; trials with any: {hit}/{len(counts)}"
        )
    expected = PrivateFootprint(replay_capacity=mem).extra_samples(sizes[:-1])
    print(
        f"coin buffer size over {len(coin_sizes)} seeds: mean {statistics.mean(coin_sizes):.1f}, "
        f"sd {statistics.stdev(coin_sizes):.1f}, min {min(coin_sizes)}, max {max(coin_sizes)} "
        f"(planned expectation {expected}, mem_size {mem})"
    )


if __name__ == "__main__":
    main()
