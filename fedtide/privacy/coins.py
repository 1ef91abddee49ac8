"""Independent seeded coins, one per sample: Poisson subsampling that a method can do on private data.

Free of Opacus and torch, so a continual method can use it without loading the DP stack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

_SCALE = float(2**53)  # the top 53 bits of the hash: exact in a float64, and below 1


@dataclass(frozen=True)
class SampleCoins:
    """u(id) = blake2b(seed, client, sample id) scaled, uniform on [0, 1), for one client of one run.

    A sample's coin depends on its own id and nothing else: keeping the samples with
    `u < p` at a fixed rate p decides each one's membership alone, so adding a sample to
    the data never changes whether another is kept (the add/remove relation the
    accountant charges). Ranking samples by a random key and keeping the top k (a
    reservoir) does not have this property: a newcomer that ranks in takes another's place.
    """

    seed: int
    partition_id: int

    def __call__(self, sample_ids: Iterable[int]) -> np.ndarray:
        key = f"fedtide.coin/{self.seed}/{self.partition_id}/".encode()
        return np.array([_coin(key, i) for i in sample_ids], dtype=np.float64)


def _coin(key: bytes, sample_id: int) -> float:
    digest = hashlib.blake2b(key + str(int(sample_id)).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / _SCALE
