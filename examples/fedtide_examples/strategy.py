"""Server momentum that restarts at every experience: a FedAvg subclass as a user would write it.

FedAvgM (Hsu et al. 2019) keeps a velocity of past global updates. In class-incremental
FL the direction of progress changes when a new experience starts: momentum built on
experience e's classes keeps pushing towards them in experience e+1. This strategy
resets the velocity whenever the `experience` in fedtide's train config changes.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class ExperienceMomentum(FedAvg):
    """FedAvg with server momentum (`server_lr`, `momentum`), reset at experience boundaries."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.server_lr = server_lr
        self.momentum = momentum
        self.velocity: dict | None = None
        self.experience: int | None = None
        self.resets = 0  # how many times the velocity was reset (checked by the tests)
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global weights of this round; reset the velocity when the experience changes."""
        experience = int(config["experience"])
        if experience != self.experience:
            self.experience, self.velocity = experience, None
            self.resets += 1
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """w <- w + server_lr * v, with v <- momentum * v + (FedAvg(w_i) - w)."""
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self._global is None:
            return averaged, metrics
        current = self._global.to_numpy_ndarrays()
        update = [a - w for a, w in zip(averaged.to_numpy_ndarrays(), current)]
        if self.velocity is None:
            self.velocity = dict(enumerate(update))
        else:
            self.velocity = {i: self.momentum * self.velocity[i] + u for i, u in enumerate(update)}
        new = [w + self.server_lr * self.velocity[i] for i, w in enumerate(current)]
        keys = list(self._global.keys())
        return ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in zip(keys, new)}), metrics
