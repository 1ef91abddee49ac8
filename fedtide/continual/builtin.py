"""fedtide's own continual methods: naive, replay, EWC and LwF, each Avalanche's plugin consolidated once.

Avalanche consolidates in `after_training_exp`, which its templates call at the end
of every `train()`. A federated client calls `train()` once per *round*, many times
per experience, so each method here separates the two parts of an Avalanche plugin:

- `plugins()`: the plugins active while a round trains (their per-minibatch hooks:
  EWC's penalty, LwF's distillation, Replay's mixed dataloader);
- `consolidate(learner)`: the plugin's end-of-experience step, which the client
  calls exactly once per past experience, at the global weights that ended it.

Their state goes to `Context.state` through `state_dict()` / `load_state_dict()`
(`fedtide.continual.state_codec`); a replay buffer is kept as sample ids.
"""

from __future__ import annotations

import torch
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin, SupervisedPlugin
from avalanche.training.storage_policy import (
    ClassBalancedBuffer,
    ExperienceBalancedBuffer,
    ReservoirSamplingBuffer,
)
from avalanche.training.templates import SupervisedTemplate

from fedtide.continual.base import ContinualMethod, StateDict
from fedtide.data.stream import Dataset
from fedtide.errors import ScenarioError
from fedtide.privacy.accounting import PrivateFootprint
from fedtide.privacy.dp_sgd import ClientPrivacy


class Naive(ContinualMethod):
    name = "naive"
    dp_compatible = True
    description = "fine-tuning, no protection against forgetting (lower bound)"

    def plugins(self) -> list[SupervisedPlugin]:
        return []

    def consolidate(self, learner: SupervisedTemplate) -> None:
        """Nothing to remember."""


class Replay(ContinualMethod):
    name = "replay"
    dp_compatible = True
    description = "experience replay: Avalanche ReplayPlugin, buffer balanced by experience or class"

    def __init__(self, mem_size: int = 200, storage: str = "experience") -> None:
        if mem_size < 1:
            raise ScenarioError("continual.mem_size", f"must be >= 1, got {mem_size}")
        policies = {"experience": ExperienceBalancedBuffer, "class": ClassBalancedBuffer}
        if storage not in policies:
            raise ScenarioError("continual.storage", f"unknown storage '{storage}'", "experience or class")
        self.storage = policies[storage](max_size=mem_size, adaptive_size=True)
        self.plugin = ReplayPlugin(mem_size=mem_size, storage_policy=self.storage)
        self.private = False

    def plugins(self) -> list[SupervisedPlugin]:
        """Avalanche's replay dataloader, except under DP where the buffer joins the sampled dataset."""
        return [] if self.private else [self.plugin]

    def use_privacy(self, privacy: ClientPrivacy) -> None:
        self.private = True

    def private_training_data(self) -> Dataset | None:
        return self.storage.buffer if len(self.storage.buffer) else None

    def private_footprint(self) -> PrivateFootprint:
        return PrivateFootprint(replay_capacity=self.plugin.mem_size)

    def consolidate(self, learner: SupervisedTemplate) -> None:
        self.plugin.after_training_exp(learner)

    def state_dict(self) -> StateDict:
        """The buffer as sample ids per group (never tensors: Ray copies the Context each call)."""
        groups = {
            key: {
                "ids": [int(i) for i in group.buffer.sample_id],
                "weights": group._buffer_weights,
                "size": group.max_size,
            }
            for key, group in self.storage.buffer_groups.items()
        }
        if isinstance(self.storage, ExperienceBalancedBuffer):
            return {"groups": groups, "num_exps": self.storage._num_exps}
        return {"groups": groups, "seen_classes": sorted(self.storage.seen_classes)}

    def load_state_dict(self, state: StateDict) -> None:
        for key, stored in state["groups"].items():
            group = ReservoirSamplingBuffer(stored["size"])
            group.buffer = self.full_train.subset(stored["ids"])
            group._buffer_weights = stored["weights"]
            self.storage.buffer_groups[key] = group
        if isinstance(self.storage, ExperienceBalancedBuffer):
            self.storage._num_exps = state["num_exps"]
        else:
            self.storage.seen_classes = set(state["seen_classes"])


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


class EWC(ContinualMethod):
    name = "ewc"
    dp_compatible = True
    description = "elastic weight consolidation: Avalanche EWCPlugin (separate or online); DP Fisher under DP"

    def __init__(self, ewc_lambda: float = 10.0, mode: str = "separate", decay_factor: float | None = None) -> None:
        if mode not in ("separate", "online") or (mode == "online") != (decay_factor is not None):
            raise ScenarioError("continual.mode", "use mode: separate, or mode: online with a decay_factor")
        self.plugin = FederatedEWCPlugin(ewc_lambda=ewc_lambda, mode=mode, decay_factor=decay_factor)

    def plugins(self) -> list[SupervisedPlugin]:
        return [self.plugin]

    def consolidate(self, learner: SupervisedTemplate) -> None:
        self.plugin.after_training_exp(learner)

    def use_privacy(self, privacy: ClientPrivacy) -> None:
        self.plugin.fisher_pass = privacy.fisher_importances

    def private_footprint(self) -> PrivateFootprint:
        return PrivateFootprint(passes_per_consolidation=1)

    def state_dict(self) -> StateDict:
        """Anchor and importances of each consolidated experience."""
        kept = self.plugin.consolidated()
        return {
            "anchor": {e: self.plugin.saved_params[e] for e in kept},
            "importance": {e: self.plugin.importances[e] for e in kept if self.plugin.importances[e]},
        }

    def load_state_dict(self, state: StateDict) -> None:
        self.plugin.saved_params.update(state["anchor"])
        self.plugin.importances.update(state["importance"])


class LwF(ContinualMethod):
    name = "lwf"
    dp_compatible = True
    description = "learning without forgetting: Avalanche LwFPlugin, teacher = global model"

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        self.plugin = LwFPlugin(alpha=alpha, temperature=temperature)

    def plugins(self) -> list[SupervisedPlugin]:
        return [self.plugin]

    def consolidate(self, learner: SupervisedTemplate) -> None:
        self.plugin.after_training_exp(learner)

    def state_dict(self) -> StateDict:
        """The teacher (the global model that ended the last consolidated experience) and its classes."""
        lwf = self.plugin.lwf
        if lwf.prev_model is None:
            return {}
        return {"teacher": lwf.prev_model, "expcount": lwf.expcount, "classes": sorted(lwf.prev_classes_by_task[0])}

    def load_state_dict(self, state: StateDict) -> None:
        if not state:
            return
        lwf = self.plugin.lwf
        lwf.prev_model = state["teacher"]
        lwf.expcount = state["expcount"]
        lwf.prev_classes_by_task[0] = set(state["classes"])


BUILT_INS: dict[str, type[ContinualMethod]] = {m.name: m for m in (Naive, Replay, EWC, LwF)}
