"""Arrays fedtide derived once and keeps on disk, so that checking a scenario imports less.

What is kept is a library's own output (scikit-learn's digits split, flwr-datasets'
partitions), saved as it came and named by everything it was computed from, versions
of the libraries that computed it included: a file either holds exactly what the
library would return now or is never looked up. A missing, damaged or unwritable
cache only means the library computes it again; a failure is never kept.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np


def cache_folder() -> Path:
    """$FEDTIDE_CACHE_DIR, else $XDG_CACHE_HOME/fedtide, else ~/.cache/fedtide."""
    if folder := os.environ.get("FEDTIDE_CACHE_DIR"):
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtide"


def cache_file(kind: str, packages: tuple[str, ...], *inputs: str | bytes) -> Path | None:
    """The file for `kind` computed by `packages` from `inputs`; None if one of them is not installed.

    The name is a digest of `kind`, the versions of `packages` and numpy, and every input.
    """
    try:
        versions = [f"{package}=={version(package)}" for package in (*packages, "numpy")]
    except PackageNotFoundError:  # importing it says what is missing
        return None
    digest = hashlib.sha256()
    for part in (kind, *versions, *inputs):
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return cache_folder() / f"{kind}-{digest.hexdigest()[:32]}.npz"


def read_arrays(path: Path, names: list[str]) -> list[np.ndarray] | None:
    """The arrays called `names` in `path`, or None when it is missing, damaged (zip CRCs are checked) or other."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if sorted(saved.files) != sorted(names):
                return None
            return [saved[name] for name in names]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        return None


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save `arrays` to `path` whole or not at all (other processes may be reading or writing it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
