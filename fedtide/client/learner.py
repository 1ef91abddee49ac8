"""One client's local learner: Avalanche's supervised template, driven round by round.

`RoundLearner.train_round` is one federated round of local training; consolidation
is not part of it (see `fedtide.continual.builtin`) and happens only through
`RoundLearner.consolidate`.
"""

from __future__ import annotations

import torch
from avalanche.evaluation.metrics import loss_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate

from fedtide.continual.base import ContinualMethod
from fedtide.continual.plugin_adapter import check_plugin_signatures
from fedtide.scenario.schema import ClientConfig

TRAIN_LOSS_KEY = "Loss_Epoch/train_phase/train_stream"


class CrossEntropy(torch.nn.CrossEntropyLoss):
    """Cross-entropy whose mean over an empty minibatch is 0, not NaN.

    Opacus's Poisson sampling draws empty minibatches (often, when a client's expected
    batch is a few samples); the step still counts and adds noise (ghost clipping's
    loss is handled in `fedtide.privacy.dp_sgd`). Torch's mean over no
    samples is NaN, which would make the round's mean loss NaN and the client look
    diverged. An empty batch has no data gradient either way.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.numel() == 0 and self.reduction == "mean":
            return input.sum() * 0.0
        return super().forward(input, target)


class ProximalTerm(SupervisedPlugin):
    """FedProx's (mu/2)·||w - w_global||², added to each minibatch loss (Li et al. 2020, eq. 2).

    Flower's FedProx strategy only sends `proximal-mu`; the client owns the term.
    """

    def __init__(self, mu: float, model: torch.nn.Module) -> None:
        super().__init__()
        self.mu = mu
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def before_backward(self, strategy, **kwargs) -> None:
        distance = sum(((p - a) ** 2).sum() for p, a in zip(strategy.model.parameters(), self.anchor))
        strategy.loss += 0.5 * self.mu * distance


class RoundLearner(SupervisedTemplate):
    """Avalanche's supervised learner whose `train()` is a round, not a whole experience."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: ContinualMethod,
        client: ClientConfig,
        device: str,
        extra_plugins: list[SupervisedPlugin] = (),
    ) -> None:
        self.method = method
        self._method_plugins = method.plugins()
        for plugin in self._method_plugins:  # Avalanche would call a wrong def from its own frame
            check_plugin_signatures(plugin)
        super().__init__(
            model=model,
            optimizer=_optimizer(model, client),
            criterion=CrossEntropy(),
            train_mb_size=client.batch_size,
            train_epochs=client.epochs,
            eval_mb_size=256,
            device=device,
            plugins=[*self._method_plugins, *extra_plugins],
            evaluator=EvaluationPlugin(loss_metrics(epoch=True), loggers=[]),
            eval_every=-1,
        )

    def train_round(self, experience, index: int) -> float:
        """Train on the client's data of experience `index`; return the last epoch's mean loss."""
        self.clock.train_exp_counter = index
        self.train(experience, eval_streams=[])
        return float(self.evaluator.get_last_metrics()[TRAIN_LOSS_KEY])

    def consolidate(self, experience, index: int) -> None:
        """Let the method absorb experience `index` at the current weights (the received global model)."""
        self.experience = experience
        self.clock.train_exp_counter = index
        self.model.eval()
        self.method.consolidate(self)
        self.model.train()

    def _after_training_exp(self, **kwargs) -> None:
        """Skip the method's end-of-experience hooks: here `train()` ends a round."""
        for plugin in self.plugins:
            if plugin not in self._method_plugins and hasattr(plugin, "after_training_exp"):
                plugin.after_training_exp(self, **kwargs)


def _optimizer(model: torch.nn.Module, client: ClientConfig) -> torch.optim.Optimizer:
    if client.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=client.lr)
    return torch.optim.SGD(model.parameters(), lr=client.lr, momentum=client.momentum)
