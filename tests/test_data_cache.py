"""What fedtide keeps on disk (`fedtide.data.cache`) is the library's own output, and a damaged copy is made again."""

import subprocess
import sys

import torch

from fedtide.data import datasets


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
