"""Reading dataset files, and one line (exit code 2, nothing written) for damaged ones and impossible partitions."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedtide.data.datasets import DEBIAN_FASHION_MNIST, load_dataset
from tests.conftest import write_fashion_mnist, write_idx


def run_refused(run_cli, tmp_path: Path, scenario: str, *overrides: str) -> str:
    """`fedtide run` a scenario that must be refused before starting; return its one error line."""
    out_dir = tmp_path / "runs"
    args = [a for override in overrides for a in ("--set", override)]
    code, out, err = run_cli("run", scenario, *args, "--output", str(out_dir))
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()  # no run folder was made
    return " ".join(err.split())


def test_fashion_mnist_reads_generated_idx_files_under_root(fashion_mnist_root):
    """The generated files the shipped-scenario test relies on are read as a real dataset, root first."""
    data = load_dataset("fashion_mnist", str(fashion_mnist_root))
    assert tuple(data.train_x.shape) == (1000, 1, 28, 28) and tuple(data.test_x.shape) == (200, 1, 28, 28)
    assert sorted(data.train_y.unique().tolist()) == list(range(10))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed (.ci/run does)")
def test_fashion_mnist_reads_the_debian_package():
    """The real files pass the same reader, so the generated ones do not hide a format mistake."""
    data = load_dataset("fashion_mnist")
    assert tuple(data.train_x.shape) == (60000, 1, 28, 28) and tuple(data.test_x.shape) == (10000, 1, 28, 28)
    assert sorted(data.train_y.unique().tolist()) == list(range(10))


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"<html>404 Not Found</html>")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _short_idx(path: Path) -> None:
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))


def _wrong_magic(path: Path) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[3] = 1  # a label file's magic number on an image file
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize(
    ("damage", "file", "expected"),
    [
        (_not_gzip, "train-images-idx3-ubyte.gz", "cannot be read: Not a gzipped file"),
        (_truncated, "train-images-idx3-ubyte.gz", "cannot be read: Compressed file ended"),
        (_short_idx, "t10k-labels-idx1-ubyte.gz", "header declares shape [200] (200 bytes) but it holds 199"),
        (_wrong_magic, "train-images-idx3-ubyte.gz", "magic number 0x00000801, expected 0x00000803"),
        (Path.unlink, "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte(.gz)' is missing"),
    ],
)
def test_damaged_fashion_mnist_file_is_one_line_naming_it(tmp_path, run_cli, damage, file, expected):
    root = write_fashion_mnist(tmp_path / "fmnist")
    damage(root / file)
    err = run_refused(run_cli, tmp_path, "scenarios/fmnist_class_il.yaml", f"dataset.root={root}")
    assert f"dataset.root: '{root / file.removesuffix('.gz')}" in err
    assert expected in err
    assert "replace it with an intact copy" in err


def test_fashion_mnist_images_and_labels_must_pair_up(tmp_path, run_cli):
    root = write_fashion_mnist(tmp_path / "fmnist", suffix="")  # uncompressed idx files are read too
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(999))
    err = run_refused(run_cli, tmp_path, "scenarios/fmnist_class_il.yaml", f"dataset.root={root}")
    assert f"dataset.root: '{root}' holds 1000 train images but 999 train labels" in err


def _write_torchvision_mnist(root: Path) -> Path:
    """torchvision's MNIST layout: the four uncompressed idx files under MNIST/raw."""
    raw = root / "MNIST" / "raw"
    write_fashion_mnist(raw, suffix="", train_per_class=30)
    return raw


def test_torchvision_mnist_copy_is_read(tmp_path, run_cli):
    """The damage below is what makes the next test fail, not the generated layout."""
    _write_torchvision_mnist(tmp_path / "data")
    root = f"dataset.root={tmp_path / 'data'}"
    code, out, err = run_cli("validate", "scenarios/quickstart.yaml", "--set", "dataset.name=mnist", "--set", root)
    assert code == 0, err
    assert "ok" in out


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_truncated, "invalid for input of size"),  # a truncated idx file: torchvision cannot reshape it
        (lambda path: path.write_bytes(b"\xff" * 100), "AssertionError"),  # its header check fails
    ],
)
def test_damaged_torchvision_copy_is_one_line_naming_the_root(tmp_path, run_cli, damage, expected):
    root = tmp_path / "data"
    damage(_write_torchvision_mnist(root) / "train-images-idx3-ubyte")
    err = run_refused(run_cli, tmp_path, "scenarios/quickstart.yaml", "dataset.name=mnist", f"dataset.root={root}")
    assert f"dataset.root: MNIST not found or unreadable under '{root}'" in err
    assert expected in err
    assert "delete a damaged copy to download it again" in err


@pytest.mark.parametrize(
    ("overrides", "expected", "fix"),
    [
        # digits: 1,347 training images over 5 experiences of 264-272; each is partitioned on its own
        (
            ["partition.num_clients=5000"],
            "5000 clients, but experience 3 has only 264 training samples",
            "(use at most 264 clients, or fewer experiences (stream.n_experiences)",
        ),
        (
            ["partition.num_clients=265", "partition.kind=iid"],  # flwr-datasets: an IndexError
            "265 clients, but experience 3 has only 264",
            "(use at most 264 clients,",
        ),
        (
            ["partition.num_clients=133", "partition.kind=shard"],  # flwr-datasets: a ZeroDivisionError
            "133 clients x 2 shards each, but experience 3 has only 264",
            "(use at most 132 clients,",
        ),
        (
            ["partition.num_clients=5000", "stream.n_experiences=1"],
            "5000 clients, but experience 0 has only 1347 training samples",
            "(use at most 1347 clients)",  # one experience: fewer is no way out
        ),
    ],
)
def test_more_clients_than_an_experience_has_samples(tmp_path, run_cli, overrides, expected, fix):
    """flwr-datasets would say only "number of partitions ... smaller than the number of samples" (or crash)."""
    err = run_refused(run_cli, tmp_path, "scenarios/quickstart.yaml", *overrides)
    assert f"partition.num_clients: {expected}" in err
    assert fix in err


def test_as_many_clients_as_the_smallest_experience_has_samples_is_fine(run_cli):
    code, out, err = run_cli(
        "validate", "scenarios/quickstart.yaml", "--set", "partition.num_clients=264", "--set", "partition.kind=iid"
    )
    assert code == 0, err
    assert "264 clients" in " ".join(out.split())


def test_a_dataset_is_added_in_one_place_and_a_copy_unlike_its_entry_is_refused(monkeypatch):
    """The registry entry alone makes a name valid, sizes the model and is checked against what loads."""
    from fedtide.data import datasets
    from fedtide.errors import ScenarioError
    from fedtide.models import build_scenario_model
    from fedtide.scenario.loading import parse_scenario

    digits = datasets.DATASETS["digits"]
    monkeypatch.setitem(datasets.DATASETS, "tiny", datasets.DatasetSpec(digits.loader, (1, 8, 8), 12, "digits again"))
    scenario = parse_scenario({"dataset": {"name": "tiny"}, "stream": {"n_experiences": 12}})
    assert build_scenario_model(scenario)[-1].out_features == 12  # the head: every class of the entry
    assert load_dataset("tiny").input_shape == (1, 8, 8)
    monkeypatch.setitem(datasets.DATASETS, "wrong", datasets.DatasetSpec(digits.loader, (1, 28, 28), 10, "not so"))
    with pytest.raises(ScenarioError, match=r"dataset.root: the wrong found holds images of shape \(1, 8, 8\)"):
        load_dataset("wrong")
    with pytest.raises(ScenarioError, match="unknown dataset 'imagenet'; use one of digits, fashion_mnist"):
        parse_scenario({"dataset": {"name": "imagenet"}})
