"""Aggregation strategies that return malformed arrays, as buggy user strategies would."""

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg


class NaNStrategy(FedAvg):
    """FedAvg whose aggregate holds a NaN in every tensor."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        poisoned = {k: Array.from_numpy_ndarray(np.full_like(a.numpy(), np.nan)) for k, a in arrays.items()}
        return ArrayRecord(poisoned), metrics


class DropsKeyStrategy(FedAvg):
    """FedAvg whose aggregate lacks the model's last tensor."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        kept = dict(list(arrays.items())[:-1])
        return ArrayRecord(kept), metrics


class RaisesInRoundTwo(FedAvg):
    """FedAvg whose aggregation raises from its second round on."""

    def aggregate_train(self, server_round, replies):
        if server_round >= 2:
            raise ValueError("aggregation broke on purpose")
        return super().aggregate_train(server_round, replies)


class NotAStrategy:
    """Not a subclass of Flower's Strategy."""


class RaisesInExperienceOne(FedAvg):
    """FedAvg whose aggregation raises in the first round of experience 1."""

    def configure_train(self, server_round, arrays, config, grid):
        self.experience = int(config["experience"])
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        if self.experience == 1:
            raise ValueError("aggregation broke on purpose in experience 1")
        return super().aggregate_train(server_round, replies)


class ReturnsArraysOnly(FedAvg):
    """FedAvg whose aggregate_train forgets the MetricRecord of its (arrays, metrics) tuple."""

    def aggregate_train(self, server_round, replies):
        arrays, _ = super().aggregate_train(server_round, replies)
        return arrays


class ForgetsServerRound(FedAvg):
    """FedAvg whose aggregate_train has no server_round parameter."""

    def aggregate_train(self, replies):
        return super().aggregate_train(0, replies)


class ReturnsNumpyDict(FedAvg):
    """FedAvg whose aggregate_train returns a dict of numpy arrays instead of an ArrayRecord."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        return {key: array.numpy() for key, array in arrays.items()}, metrics


class ReadsLoss(FedAvg):
    """Inverse-loss weighting that reads a metric the clients do not reply ('loss'; theirs is 'train_loss')."""

    def aggregate_train(self, server_round, replies):
        inverse_losses = []
        for reply in replies:
            inverse_losses.append(1.0 / reply.content["metrics"]["loss"])
        return super().aggregate_train(server_round, replies)


class ReadsConfigLr(FedAvg):
    """FedAvg that reads a server learning rate from a train config that holds none."""

    def configure_train(self, server_round, arrays, config, grid):
        self.lr = float(config["lr"])
        return super().configure_train(server_round, arrays, config, grid)
