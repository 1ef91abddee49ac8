"""Reading dataset files: the generated Fashion-MNIST the tests validate against, and the real one."""

import pytest

from fedtide.data.datasets import DEBIAN_FASHION_MNIST, load_dataset


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
