"""An L2 pull towards the global model that ended the previous experience, as an Avalanche plugin.

The simplest regulariser against forgetting: loss += lambda/2 * ||w - w*||^2, where
w* is the global model at the end of the last experience (the weights the client
receives in the first round of the next one). Written as a plain `SupervisedPlugin`:
fedtide calls `after_training_exp` once per experience (never at the end of a
round), and stores the `anchor` attribute (a dict of tensors) in `Context.state`.
"""

from __future__ import annotations

import torch
from avalanche.training.plugins import SupervisedPlugin


class L2Anchor(SupervisedPlugin):
    """L2 pull (`strength`) towards the global weights at the end of the previous experience."""

    # The penalty depends on parameters only and consolidation reads no data, so
    # fedtide may run it under DP-SGD (its gradient is added back after clip+noise).
    dp_compatible = True

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength = strength
        self.anchor: dict[str, torch.Tensor] = {}
        self.consolidations = 0

    def before_backward(self, strategy, **kwargs) -> None:
        if not self.anchor:
            return
        distance = sum(((p - self.anchor[n].to(p.device)) ** 2).sum() for n, p in strategy.model.named_parameters())
        strategy.loss += 0.5 * self.strength * distance

    def after_training_exp(self, strategy, **kwargs) -> None:
        """Consolidation: anchor at the current (global) weights."""
        self.anchor = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}
        self.consolidations += 1
