"""What a continual method adds to a client's private data use, told to the accountant.

Its own module, free of Opacus, so a method can declare it without loading the DP stack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrivateFootprint:
    """What a continual method adds to a client's DP passes beyond its own experience's data.

    Privacy is the lower layer: it never builds a method, it is told this much
    (as Opacus's accountants are told steps and rates, never handed the engine).
    """

    replay_capacity: int = 0  # at most this many past samples join the sampled training set (replay)
    passes_per_consolidation: int = 0  # DP passes over a past experience's data when it is consolidated (EWC)

    def extra_samples(self, past_sizes: list[int]) -> int:
        """Past samples inside the training set, given the past experiences' sizes."""
        return min(self.replay_capacity, sum(past_sizes))
