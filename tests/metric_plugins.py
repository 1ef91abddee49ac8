"""Plugins that report numbers of their own, as a user's strategy and continual method would."""

from avalanche.training.plugins import SupervisedPlugin
from flwr.serverapp.strategy import FedAvg


class ReportsReplies(FedAvg):
    """FedAvg that also reports how many replies it averaged (its own MetricRecord entry)."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics["replies"] = len(replies)
        return arrays, metrics


class ReportsSquaredNorm(SupervisedPlugin):
    """Adds nothing to training; reports the model's squared weight norm after each round."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = 0.0

    def after_training_epoch(self, strategy, **kwargs) -> None:
        self.norm = float(sum((p.detach() ** 2).sum() for p in strategy.model.parameters()))

    def metrics(self) -> dict[str, float]:
        return {"squared_norm": self.norm}


class CountsBatchesAndLargestWeight(SupervisedPlugin):
    """Adds nothing to training; reports minibatches trained (summed over clients) and the largest |weight| (max)."""

    metric_aggregation = {"batches": "sum", "largest_weight": "max"}

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.largest = 0.0

    def before_training(self, strategy, **kwargs) -> None:
        self.batches = 0

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.batches += 1
        self.largest = max(float(p.detach().abs().max()) for p in strategy.model.parameters())

    def metrics(self) -> dict[str, float]:
        return {"batches": self.batches, "largest_weight": self.largest}


class MedianMetric(CountsBatchesAndLargestWeight):
    """Declares an aggregation fedtide does not know."""

    metric_aggregation = {"batches": "median"}
