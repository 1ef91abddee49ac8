"""What a continual method adds to a client's private data use, told to the accountant.

Its own module, free of Opacus, so a method can declare it without loading the DP stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivateFootprint:
    """What a continual method adds to a client's DP passes beyond its own experience's data.

    Privacy is the lower layer: it never builds a method, it is told this much
    (as Opacus's accountants are told steps and rates, never handed the engine).
    """

    replay_capacity: int = 0  # replay's mem_size: past samples that join the sampled training set, in expectation
    passes_per_consolidation: int = 0  # DP passes over a past experience's data when it is consolidated (EWC)

    def extra_samples(self, past_sizes: list[int]) -> int:
        """Past samples inside the training set, given the past experiences' sizes: the expected size
        (rounded) of replay's DP buffer (`fedtide.continual.coin_buffer`).

        Each of the g past experiences holding data gets a share capacity / g, and keeps each of its
        n samples with probability min(1, share / n): min(share, n) samples in expectation. The DP
        passes use exactly the sample rate and steps planned from this number, whatever the
        buffer's random size turns out to be (`ClientPrivacy.make_private`).
        """
        held = [n for n in past_sizes if n > 0]
        if not self.replay_capacity or not held:
            return 0
        share = self.replay_capacity / len(held)
        return math.floor(sum(min(share, n) for n in held) + 0.5)
