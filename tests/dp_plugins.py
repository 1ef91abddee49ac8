"""User plugins that claim `dp_compatible = True`, honestly or not, for the DP-claim checks.

Each stores a few inputs of the experience it consolidates (as Dark Experience Replay
does), so that from experience 1 on it has something other than the DP batch to read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.training.plugins import SupervisedPlugin


class _StoresInputs(SupervisedPlugin):
    """Keeps the first `size` inputs of each consolidated experience and the model's logits on them."""

    dp_compatible = True

    def __init__(self, alpha: float = 0.5, size: int = 8) -> None:
        super().__init__()
        self.alpha = alpha
        self.size = size
        self.inputs = torch.zeros(0)
        self.logits = torch.zeros(0)

    def after_training_exp(self, strategy, **kwargs) -> None:
        dataset = strategy.experience.dataset
        self.inputs = torch.stack([dataset[i][0] for i in range(self.size)])
        with torch.no_grad():
            self.logits = strategy.model(self.inputs.to(strategy.device)).cpu()

    def stored(self, strategy) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs.to(strategy.device), self.logits.to(strategy.device)


class DarkReplay(_StoresInputs):
    """DER (Buzzega et al. 2020): the logits of stored inputs, matched by a forward with grad, join the loss."""

    def before_backward(self, strategy, **kwargs) -> None:
        if len(self.inputs):
            inputs, logits = self.stored(strategy)
            strategy.loss += self.alpha * F.mse_loss(strategy.model(inputs), logits)


class StoredGradient(_StoresInputs):
    """A reference gradient on stored samples (as A-GEM's), added to the batch's gradient before the step."""

    def after_backward(self, strategy, **kwargs) -> None:
        if not len(self.inputs):
            return
        inputs, logits = self.stored(strategy)
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        reference = torch.autograd.grad(F.mse_loss(strategy.model(inputs), logits), params)
        for param, grad in zip(params, reference):
            param.grad += self.alpha * grad


class StoredTargets(_StoresInputs):
    """The model's outputs on stored inputs, computed without grad, as a target for the DP batch's outputs."""

    def before_backward(self, strategy, **kwargs) -> None:
        if len(self.inputs):
            inputs, _ = self.stored(strategy)
            with torch.no_grad():
                target = strategy.model(inputs).mean(dim=0)
            strategy.loss += self.alpha * ((strategy.mb_output - target) ** 2).sum(dim=1).mean()


class BatchConsistency(_StoresInputs):
    """Per-sample: the DP batch's outputs pulled towards the model's own outputs on it, computed without grad."""

    def before_backward(self, strategy, **kwargs) -> None:
        with torch.no_grad():
            target = strategy.model(strategy.mb_x)
        strategy.loss += self.alpha * ((strategy.mb_output - target) ** 2).sum(dim=1).mean()


class ReferenceGradient(_StoresInputs):
    """A-GEM-like, without a forward while training: a gradient on stored samples, computed when
    consolidating, added to `p.grad` after each backward."""

    def __init__(self, alpha: float = 0.5, size: int = 8) -> None:
        super().__init__(alpha, size)
        self.reference: list[torch.Tensor] = []

    def after_training_exp(self, strategy, **kwargs) -> None:
        super().after_training_exp(strategy)
        inputs, logits = self.stored(strategy)
        loss = F.mse_loss(strategy.model(inputs), logits + 1.0)
        self.reference = [g.cpu() for g in torch.autograd.grad(loss, list(strategy.model.parameters()))]

    def after_backward(self, strategy, **kwargs) -> None:
        for param, grad in zip(strategy.model.parameters(), self.reference):
            param.grad += self.alpha * grad.to(param.device)
