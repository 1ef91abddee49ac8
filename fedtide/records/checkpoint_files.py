"""Where a run folder keeps its checkpoint: checkpoint/round-NNNN.pkl, the name alone telling the round.

Only the latest checkpoint of an unfinished run is kept, with the clients-*.pkl files of
client states it names, and they are deleted when the run finishes
(`fedtide.server.checkpoint` writes and reads the files itself).
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_DIR = "checkpoint"  # the latest checkpoint of an unfinished run, deleted when it finishes
_CHECKPOINT_NAME = re.compile(r"round-(\d+)\.pkl")


def checkpoint_file(folder: Path, global_round: int) -> Path:
    """Where the checkpoint taken after `global_round` lives (the name alone tells the round)."""
    return folder / CHECKPOINT_DIR / f"round-{global_round:04d}.pkl"


def checkpoint_round(folder: Path) -> int | None:
    """The global round of the folder's latest checkpoint, None without one; read from the file names only."""
    rounds = [
        int(match.group(1))
        for path in (folder / CHECKPOINT_DIR).glob("round-*.pkl")
        if (match := _CHECKPOINT_NAME.fullmatch(path.name))
    ]
    return max(rounds, default=None)
