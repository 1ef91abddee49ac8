"""Avalanche's EWC plugin, fitted to federated clients (used by `fedtide.continual.builtin.EWC`)."""

from __future__ import annotations

import torch
from avalanche.training.plugins import EWCPlugin


class FederatedEWCPlugin(EWCPlugin):
    """Avalanche's EWCPlugin for clients that consolidate only the experiences they hold data for.

    Three changes, each for a failure seen in federated runs:

    - The penalty sums over the experiences the client consolidated, not over every
      index below the current one: Avalanche reads `saved_params[e]` from a defaultdict,
      which creates an empty entry for an experience the client had no data in.
      Online mode decays from the last consolidated experience, not from e - 1.
    - Under SGD, each parameter's total importance is capped at 1 / (2·λ·lr): the
      stiffest quadratic penalty a plain SGD step can follow without overshooting its
      anchor. Avalanche's Fisher (squared minibatch-mean gradients) is inflated when an
      experience has a handful of samples — one sample gave an importance of 1.96 at
      λ=10, lr=0.1, and the client's loss went from 0.3 to 3·10⁹ in two rounds. Where
      no importance reaches the cap the penalty is Avalanche's own, to the bit.
    - The Fisher pass can be swapped for a differentially private one (`fisher_pass`).
    """

    fisher_pass = None
    rebuilt_each_round = ("_penalty_terms",)  # fixed by before_training from the stored anchors and importances

    def __init__(self, ewc_lambda: float, mode: str = "separate", decay_factor: float | None = None) -> None:
        super().__init__(ewc_lambda=ewc_lambda, mode=mode, decay_factor=decay_factor)
        self._penalty_terms: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def consolidated(self) -> list[int]:
        return sorted(e for e, params in self.saved_params.items() if params)

    def before_training(self, strategy, **kwargs) -> None:
        """Fix this round's penalty terms: (parameter, importance, anchor), capped for stability."""
        counted = self.consolidated()
        if self.mode == "online":
            counted = counted[-1:]
        names = [name for name, _ in strategy.model.named_parameters()]
        cap = _stable_importance(strategy.optimizer, self.ewc_lambda)
        self._penalty_terms = []
        for name in names:
            importances = [self.importances[e][name].data for e in counted if name in self.saved_params[e]]
            scale = None
            if cap is not None and importances:
                total = torch.stack(importances).sum(dim=0)
                if (total > cap).any():
                    scale = torch.where(total > cap, cap / total, torch.ones_like(total))
            for e, importance in zip(counted, importances):
                anchor = self.saved_params[e][name].data
                self._penalty_terms.append((e, name, importance if scale is None else importance * scale, anchor))
        self._penalty_terms.sort(key=lambda term: term[0])  # Avalanche's order: experience, then parameter

    def before_backward(self, strategy, **kwargs) -> None:
        if not self._penalty_terms:
            return
        params = dict(strategy.model.named_parameters())
        penalty = torch.tensor(0).float().to(strategy.device)
        for _, name, importance, anchor in self._penalty_terms:
            current = params[name]
            importance, anchor = importance.to(current.device), anchor.to(current.device)
            penalty += (importance.expand(current.shape) * (current - anchor.expand(current.shape)).pow(2)).sum()
        strategy.loss += self.ewc_lambda * penalty

    @torch.no_grad()
    def update_importances(self, importances, t: int) -> None:
        earlier = [e for e in self.consolidated() if e < t]
        if self.mode == "online" and earlier and earlier[-1] != t - 1:
            self.importances[t - 1] = self.importances.pop(earlier[-1])  # decay from the last one consolidated
        super().update_importances(importances, t)
        if self.mode == "online":
            for table in (self.importances, self.saved_params):
                for old in [e for e in table if e < t]:
                    del table[old]

    def after_training_exp(self, strategy, **kwargs) -> None:
        super().after_training_exp(strategy, **kwargs)
        if self.mode == "online":
            for old in [e for e in self.saved_params if e < strategy.clock.train_exp_counter]:
                del self.saved_params[old]

    def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
        if self.fisher_pass is None:
            return super().compute_importances(model, criterion, optimizer, dataset, device, batch_size, num_workers)
        return self.fisher_pass(model, criterion, dataset, batch_size, device)


def _stable_importance(optimizer: torch.optim.Optimizer, ewc_lambda: float) -> float | None:
    """1 / (2·λ·lr) for SGD (Opacus's DPOptimizer wraps it); None for adaptive optimizers."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    if not isinstance(inner, torch.optim.SGD) or ewc_lambda <= 0:
        return None
    return 1.0 / (2.0 * ewc_lambda * inner.param_groups[0]["lr"])
