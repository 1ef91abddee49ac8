"""The strategy's draws from `random` (Flower's node sampling) come from a generator of the run's own.

Flower's strategies sample nodes with the module-level `random` (`sample_nodes` calls
`random.sample`), and a user strategy may draw from it too. Seeding that generator would
reseed it for everything else in the process (Flower's heartbeats draw from it in another
thread), and their draws would move the samples. Instead the run keeps a `random.Random`
of its own, seeded at each experience's start from (seed, experience), and swaps its state
into `random` only while one of the strategy's hooks runs, taking it back out afterwards
and putting the process's own state back. The strategy draws exactly what it drew when
fedtide called `random.seed(seed * 1000 + experience)` at the experience's start, and
nothing outside its hooks sees a difference.

The swap is not guarded against another thread drawing from `random` while a hook runs:
such a draw takes a number from the strategy's stream (as it did from the seeded global one).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StrategyRandom:
    """The strategy's own `random` stream: one per experience, from (seed, experience)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed  # None: the OS's entropy (`privacy.secure_rng`)
        self._stream = random.Random()

    def begin_experience(self, experience: int) -> None:
        """Start the experience's stream (a run resumed inside an experience restores it instead)."""
        self._stream.seed(None if self.seed is None else self.seed * 1000 + experience)

    @contextmanager
    def drawing(self) -> Iterator[None]:
        """Within: `random` is the strategy's stream. After: the stream has moved on, and `random` is as it was."""
        outside = random.getstate()
        random.setstate(self._stream.getstate())
        try:
            yield
        finally:
            self._stream.setstate(random.getstate())
            random.setstate(outside)

    def getstate(self) -> Any:
        """Where the stream stands, for a checkpoint."""
        return self._stream.getstate()

    def setstate(self, state: Any) -> None:
        self._stream.setstate(state)
