"""What fedtide keeps on disk (`fedtide.data.cache`) is the library's own output, and a damaged copy is made again."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedtide.data import datasets, partition
from fedtide.data.stream_plan import experience_classes, stream_order
from fedtide.errors import ScenarioError
from fedtide.scenario.schema import PartitionConfig
from tests.conftest import small_scenario


def test_digits_read_back_from_the_cache_are_scikit_learn_s_split(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path))
    made = datasets._digits(None)
    [kept] = tmp_path.glob("digits-*.npz")
    read = datasets._digits(None)
    split = datasets._tensors(*datasets._digits_split())
    for tensors in (made, read):
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(tensors, split, strict=True))

    kept.write_bytes(kept.read_bytes()[:-100])  # truncated: made again, and kept again whole
    assert all(torch.equal(a, b) for a, b in zip(datasets._digits(None), split, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(datasets._digits(None), split, strict=True))
    assert kept.stat().st_size > 100_000 and [p.name for p in tmp_path.iterdir()] == [kept.name]


def test_digits_load_without_scikit_learn_once_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path))
    code = "import sys\nfrom fedtide.data.datasets import load_dataset\nload_dataset('digits')\n"
    code += "print('sklearn' in sys.modules)"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True) for _ in range(2)]
    assert [run.stdout.strip() for run in runs] == ["True", "False"], [run.stderr for run in runs]


def test_an_unwritable_cache_folder_only_means_no_cache(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert datasets._digits(None)[0].shape == (1347, 1, 8, 8)


def experience_labels(scenario) -> list[np.ndarray]:
    labels = datasets.load_dataset("digits").train_y.numpy()
    classes = experience_classes(10, scenario.stream.n_experiences, None, scenario.seed)
    return [labels[stream_order(labels, group)] for group in classes]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "shard"])
def test_partitions_read_back_are_flwr_datasets_output(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path))
    config = PartitionConfig(kind=kind, num_clients=4, alpha=0.3)
    labels = experience_labels(small_scenario())
    direct = [partition.partition_labels(each, config, seed=7000 + e) for e, each in enumerate(labels)]
    made = partition.partition_experiences(labels, config, seed=7)
    [kept] = tmp_path.glob("partitions-*.npz")

    def recomputed(*args, **kwargs):
        raise AssertionError("partitioned again instead of read back")

    monkeypatch.setattr(partition, "partition_labels", recomputed)
    read = partition.partition_experiences(labels, config, seed=7)
    for shares in (made, read):
        assert [[c.dtype for c in e] for e in shares] == [[np.dtype(np.int64)] * 4] * 3
        assert [[c.tolist() for c in e] for e in shares] == [[c.tolist() for c in e] for e in direct]
    monkeypatch.undo()

    # any other input is another file: other labels, seed or section are partitioned, not read back
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path))
    other_labels = [each[::-1] for each in labels]
    others = [
        (other_labels, config, 7),
        (labels, config, 8),
        (labels, config.model_copy(update={"num_clients": 3}), 7),
    ]
    for each_labels, each_config, seed in others:
        got = partition.partition_experiences(each_labels, each_config, seed)
        want = [partition.partition_labels(x, each_config, seed=seed * 1000 + e) for e, x in enumerate(each_labels)]
        assert [[c.tolist() for c in e] for e in got] == [[c.tolist() for c in e] for e in want]
    assert len(list(tmp_path.glob("partitions-*.npz"))) == 4 and kept.exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"kind": "dirichlet", "num_clients": 4, "min_size": 100}, "partition (dirichlet): "),
        ({"kind": "pathological", "num_clients": 4, "classes_per_client": 5}, "partition.classes_per_client: 5 "),
    ],
)
def test_a_refused_partition_is_not_kept(tmp_path, monkeypatch, section, message):
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path))
    labels = experience_labels(small_scenario())
    for _ in range(2):
        with pytest.raises(ScenarioError) as refused:
            partition.partition_experiences(labels, PartitionConfig(**section), seed=0)
        assert str(refused.value).startswith(message)
    assert not list(tmp_path.glob("partitions-*"))
