"""Replay's buffer under DP-SGD: Avalanche's experience-balanced buffer, membership by independent coins.

Avalanche's `ExperienceBalancedBuffer` keeps, per experience, a `ReservoirSamplingBuffer`:
the `k` samples with the largest random keys. Under DP-SGD that turns adding one sample
into a substitution: a newcomer whose key ranks in the top `k` takes the place of the
sample it outranks, so the replayed sets of D and D ∪ {x} differ in two samples (x and
the one it evicted), while the accountant charges add/remove of one. And since the keys
are drawn in data order, a newcomer that is not last shifts the keys of the samples after
it: many memberships change (docs/results.md measures both).

`CoinBuffer` keeps the same groups (one per consolidated experience, each with an equal
share `mem_size / g` of the g groups, unrounded where Avalanche rounds), but a sample of
experience j is kept iff its coin (`fedtide.privacy.coins.SampleCoins`: a hash of seed,
client and sample id) is below p_j = min(1, (mem_size / g) / n_j), with n_j experience
j's *planned* size: the one the client's DP passes are planned from, public as it is for
Opacus's sample rate. So the buffer is a Poisson subsample of each past experience, and one sample's presence never
changes another's membership. Its size is random (a sum of independent coins): its
expectation is sum_j min(mem_size / g, n_j), which is mem_size when every past experience
has its share; `PrivateFootprint.extra_samples` plans the DP passes with that expectation.
As g grows the rates only fall, so a later buffer is a subset of an earlier one and the
sample ids in client state are enough to rebuild it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from avalanche.training.storage_policy import BalancedExemplarsBuffer, ExemplarsBuffer

from fedtide.privacy.coins import SampleCoins


class CoinGroup(ExemplarsBuffer):
    """One experience's samples whose coin is below `rate` = min(1, share / planned size)."""

    def __init__(self, share: float, planned_size: int, coins: SampleCoins) -> None:
        super().__init__(max_size=share)
        self.planned_size = planned_size
        self.coins = coins
        self.rate = 1.0

    def update_from_dataset(self, data) -> None:
        """The experience's samples kept at the current share's rate."""
        self.buffer = data
        self.resize(None, self.max_size)

    def resize(self, strategy, new_size: float) -> None:
        """Lower the share: keep the samples whose coin is below the new rate (a rate never rises)."""
        self.max_size = new_size
        self.rate = min(self.rate, rate(new_size, self.planned_size))
        self.keep_below(self.rate)

    def keep_below(self, threshold: float) -> None:
        if not len(self.buffer):
            return
        kept = np.flatnonzero(self.coins(np.asarray(self.buffer.sample_id)) < threshold)
        if len(kept) < len(self.buffer):
            self.buffer = self.buffer.subset(kept.tolist())


def rate(share: float, planned_size: int) -> float:
    """The probability that one sample of an experience of `planned_size` samples is kept for `share`."""
    return min(1.0, share / planned_size) if planned_size > 0 else 1.0


class CoinBuffer(BalancedExemplarsBuffer[CoinGroup]):
    """Experience-balanced replay buffer, each sample kept by its own coin (see the module docstring).

    `planned_sizes[j]` is the client's planned size of experience j; groups are keyed by
    the experience's index.
    """

    def __init__(self, max_size: int, coins: SampleCoins, planned_sizes: Sequence[int]) -> None:
        super().__init__(max_size, adaptive_size=True)
        self.coins = coins
        self.planned_sizes = list(planned_sizes)

    def post_adapt(self, agent, exp) -> None:
        experience = exp.current_experience
        group = CoinGroup(self.max_size, self.planned_sizes[experience], self.coins)
        self.buffer_groups[experience] = group
        group.update_from_dataset(exp.dataset)
        self.resize(agent, self.max_size)

    def resize(self, strategy, new_size: int) -> None:
        self.max_size = new_size
        share = self.share
        for group in self.buffer_groups.values():
            group.resize(strategy, share)

    @property
    def share(self) -> float:
        """Each group's expected size before it is capped by the experience's own size."""
        return self.max_size / max(1, len(self.buffer_groups))

    def add_group(self, experience: int, data, group_rate: float) -> None:
        """A group restored from client state: its kept samples and the rate they were kept at."""
        group = CoinGroup(0.0, self.planned_sizes[experience], self.coins)
        group.buffer, group.rate = data, group_rate
        self.buffer_groups[experience] = group
        for each in self.buffer_groups.values():
            each.max_size = self.share
