"""Splitting one experience's training data across clients with flwr-datasets partitioners.

Partitioning is applied to each experience separately (seeded by experience), so
every client's share follows the same non-IID law in every experience.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import TYPE_CHECKING

import numpy as np

from fedtide.data.cache import cache_file, read_arrays, write_arrays
from fedtide.errors import ScenarioError
from fedtide.scenario.schema import PartitionConfig

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS = {
    "iid": "IidPartitioner (uniform random split)",
    "dirichlet": "DirichletPartitioner (label skew, alpha)",
    "pathological": "PathologicalPartitioner (classes_per_client classes each)",
    "shard": "ShardPartitioner (shards_per_client label-sorted shards each)",
}


def check_num_clients(experience_sizes: list[int], config: PartitionConfig, holders: list[int] | None = None) -> None:
    """Refuse more clients (or, for `shard`, client shards) than an experience has training samples.

    Each experience's training data is partitioned on its own among the clients that hold
    it (`holders[e]` of them; default every client), so the tightest one bounds the federation;
    flwr-datasets would fail later naming no field (or, for IID and shards, with an
    IndexError or a ZeroDivisionError).
    """
    holders = holders or [config.num_clients] * len(experience_sizes)
    shards = config.shards_per_client if config.kind == "shard" else 1
    tightest = min(range(len(experience_sizes)), key=lambda e: experience_sizes[e] / holders[e])
    size, clients = experience_sizes[tightest], holders[tightest]
    if clients * shards > size:
        each = f" x {shards} shards each" if shards > 1 else ""
        fewer = ", or fewer experiences (stream.n_experiences) so each holds more" if len(experience_sizes) > 1 else ""
        raise ScenarioError(
            "partition.num_clients",
            f"{clients} clients{each}, but experience {tightest} has only "
            f"{size} training samples to partition among them (each experience is partitioned on its own)",
            f"use at most {size // shards * config.num_clients // clients} clients{fewer}",
        )


_FLWR_DATASETS_IMPORT = threading.Lock()


def flwr_partitioners() -> types.ModuleType:
    """`flwr_datasets.partitioner`, imported without the plotting helpers partitioning never uses.

    `flwr_datasets/__init__.py` imports its `visualization` subpackage, and with it seaborn,
    scipy.stats and matplotlib.pyplot, on every `fedtide validate` and run: a large part of
    a validate's time (docs/benchmarks.md, "No plotting for partitioning"). While the package
    is first imported, an empty module stands in for that one subpackage; it is removed afterwards, so a later
    `import flwr_datasets.visualization` (or `from flwr_datasets import visualization`)
    imports the real one. Nothing of flwr-datasets itself is replaced.
    """
    with _FLWR_DATASETS_IMPORT:
        if "flwr_datasets" not in sys.modules:
            name = "flwr_datasets.visualization"
            placeholder = types.ModuleType(name)
            sys.modules[name] = placeholder
            try:
                import flwr_datasets  # noqa: F401
            finally:
                if sys.modules.get(name) is placeholder:
                    del sys.modules[name]
                package = sys.modules.get("flwr_datasets")
                if getattr(package, "visualization", None) is placeholder:
                    delattr(package, "visualization")
    import flwr_datasets.partitioner

    return flwr_datasets.partitioner


def partition_experiences(
    experience_labels: list[np.ndarray], config: PartitionConfig, seed: int, holders: list[int] | None = None
) -> list[list[np.ndarray]]:
    """Each experience's labels partitioned on their own (experience e seeded `seed * 1000 + e`), among
    `holders[e]` clients (default: all `config.num_clients`; fewer when the stream gives it to some only).

    The partitions are flwr-datasets' output for these labels, this partition section and
    seed, so they are kept on disk under a name made of exactly those and the versions of
    flwr-datasets and datasets (`fedtide.data.cache`): checking or running a scenario whose
    partitions were made before imports neither. A partitioner's refusal is never kept.
    """
    configs = [config] * len(experience_labels)
    if holders is not None:
        configs = [config.model_copy(update={"num_clients": count}) for count in holders]
    names = [[f"e{e}c{c}" for c in range(each.num_clients)] for e, each in enumerate(configs)]
    labels = [np.ascontiguousarray(each, dtype=np.int64).tobytes() for each in experience_labels]
    key = [config.model_dump_json(), str(seed), *labels] + ([] if holders is None else [str(holders)])
    path = cache_file("partitions", ("flwr-datasets", "datasets"), *key)
    kept = read_arrays(path, [name for row in names for name in row]) if path else None
    if kept is not None:
        flat = iter(kept)
        return [[next(flat) for _ in row] for row in names]
    parts = [
        partition_labels(each, configs[e], seed=seed * 1000 + e) for e, each in enumerate(experience_labels)
    ]
    if path:
        write_arrays(path, {name: part for row, shares in zip(names, parts) for name, part in zip(row, shares)})
    return parts


def partition_labels(labels: np.ndarray, config: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Positions into `labels` held by each client, in client order."""
    from datasets import Dataset

    table = Dataset.from_dict({"label": labels.tolist(), "position": list(range(len(labels)))})
    if config.kind == "iid":
        table = table.shuffle(seed=seed)
    partitioner = _partitioner(config, seed, n_classes=len(np.unique(labels)))
    partitioner.dataset = table
    try:
        return [
            np.asarray(partitioner.load_partition(client)["position"], dtype=np.int64)
            for client in range(config.num_clients)
        ]
    except ValueError as error:
        raise ScenarioError(f"partition ({config.kind})", str(error).splitlines()[0]) from None


def _partitioner(config: PartitionConfig, seed: int, n_classes: int) -> Partitioner:
    n = config.num_clients
    partitioners = flwr_partitioners()
    if config.kind == "iid":
        return partitioners.IidPartitioner(num_partitions=n)
    if config.kind == "dirichlet":
        return partitioners.DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=config.alpha,
            min_partition_size=config.min_size,
            self_balancing=False,
            seed=seed,
        )
    if config.kind == "pathological":
        if config.classes_per_client > n_classes:
            raise ScenarioError(
                "partition.classes_per_client",
                f"{config.classes_per_client} exceeds the {n_classes} classes of an experience",
                f"use at most {n_classes}",
            )
        return partitioners.PathologicalPartitioner(
            num_partitions=n,
            partition_by="label",
            num_classes_per_partition=config.classes_per_client,
            seed=seed,
        )
    return partitioners.ShardPartitioner(
        num_partitions=n,
        partition_by="label",
        num_shards_per_partition=config.shards_per_client,
        seed=seed,
    )
