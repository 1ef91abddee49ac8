"""Which sampled clients fail a training round in a run with simulated faults (`faults:` in the scenario).

A client's fate in a round is a function of (seed, its partition id, the global round)
alone: it reads no shared random state, so it does not move Flower's node sampling
(which uses `random`), does not depend on which other clients were sampled or on the
order in which Ray runs them, and is the same on every backend. Each (client, round)
gets one uniform number u; the client drops when u < dropout, so a client that drops at
20% also drops at 50% (the runs of a dropout sweep differ only by the added drops).
"""

from __future__ import annotations

import random

from fedtide.scenario.schema import FaultsConfig

DROPOUT = "dropout"  # the reasons a `ClientDrop` records
UNAVAILABLE = "unavailable"


class FaultPlan:
    """The scenario's faults, asked per sampled client and global round."""

    def __init__(self, faults: FaultsConfig, seed: int) -> None:
        self.faults = faults
        self.seed = seed

    def fault(self, partition_id: int, global_round: int) -> str | None:
        """Why client `partition_id` fails `global_round` (`UNAVAILABLE` or `DROPOUT`), or None if it does not."""
        for stretch in self.faults.unavailable:
            first, last = stretch.rounds
            if partition_id in stretch.clients and first <= global_round <= last:
                return UNAVAILABLE
        if self.faults.dropout and self._draw(partition_id, global_round) < self.faults.dropout:
            return DROPOUT
        return None

    def _draw(self, partition_id: int, global_round: int) -> float:
        """The client's uniform number for the round (a string seed is hashed by SHA-512: the same in every process)."""
        return random.Random(f"fedtide-dropout/{self.seed}/{partition_id}/{global_round}").random()
