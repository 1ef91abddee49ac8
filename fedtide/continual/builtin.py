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

from functools import cached_property
from typing import TYPE_CHECKING

from fedtide.continual.base import ContinualMethod, StateDict
from fedtide.errors import ScenarioError
from fedtide.privacy.footprint import PrivateFootprint

# Avalanche's parts are built on first use, not with the method: naming and checking a
# method (`fedtide validate`, the server) then loads no Avalanche.
if TYPE_CHECKING:
    from avalanche.training.plugins import LwFPlugin, ReplayPlugin, SupervisedPlugin
    from avalanche.training.storage_policy import ExemplarsBuffer
    from avalanche.training.templates import SupervisedTemplate

    from fedtide.continual.ewc_plugin import FederatedEWCPlugin
    from fedtide.data.stream import Dataset
    from fedtide.privacy.dp_sgd import ClientPrivacy

STORAGES = ("experience", "class")


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
        if storage not in STORAGES:
            raise ScenarioError("continual.storage", f"unknown storage '{storage}'", " or ".join(STORAGES))
        self.mem_size, self.storage_kind = mem_size, storage
        self.private = False

    @cached_property
    def storage(self) -> ExemplarsBuffer:
        from avalanche.training.storage_policy import ClassBalancedBuffer, ExperienceBalancedBuffer

        policy = ExperienceBalancedBuffer if self.storage_kind == "experience" else ClassBalancedBuffer
        return policy(max_size=self.mem_size, adaptive_size=True)

    @cached_property
    def plugin(self) -> ReplayPlugin:
        from avalanche.training.plugins import ReplayPlugin

        return ReplayPlugin(mem_size=self.mem_size, storage_policy=self.storage)

    def plugins(self) -> list[SupervisedPlugin]:
        """Avalanche's replay dataloader, except under DP where the buffer joins the sampled dataset."""
        return [] if self.private else [self.plugin]

    def use_privacy(self, privacy: ClientPrivacy) -> None:
        self.private = True

    def private_training_data(self) -> Dataset | None:
        return self.storage.buffer if len(self.storage.buffer) else None

    def private_footprint(self) -> PrivateFootprint:
        return PrivateFootprint(replay_capacity=self.mem_size)

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
        if self.storage_kind == "experience":
            return {"groups": groups, "num_exps": self.storage._num_exps}
        return {"groups": groups, "seen_classes": sorted(self.storage.seen_classes)}

    def load_state_dict(self, state: StateDict) -> None:
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        for key, stored in state["groups"].items():
            group = ReservoirSamplingBuffer(stored["size"])
            group.buffer = self.full_train.subset(stored["ids"])
            group._buffer_weights = stored["weights"]
            self.storage.buffer_groups[key] = group
        if self.storage_kind == "experience":
            self.storage._num_exps = state["num_exps"]
        else:
            self.storage.seen_classes = set(state["seen_classes"])


class EWC(ContinualMethod):
    name = "ewc"
    dp_compatible = True
    description = "elastic weight consolidation: Avalanche EWCPlugin (separate or online); DP Fisher under DP"

    def __init__(self, ewc_lambda: float = 10.0, mode: str = "separate", decay_factor: float | None = None) -> None:
        if mode not in ("separate", "online") or (mode == "online") != (decay_factor is not None):
            raise ScenarioError("continual.mode", "use mode: separate, or mode: online with a decay_factor")
        self.ewc_lambda, self.mode, self.decay_factor = ewc_lambda, mode, decay_factor

    @cached_property
    def plugin(self) -> FederatedEWCPlugin:
        from fedtide.continual.ewc_plugin import FederatedEWCPlugin

        return FederatedEWCPlugin(ewc_lambda=self.ewc_lambda, mode=self.mode, decay_factor=self.decay_factor)

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
        self.alpha, self.temperature = alpha, temperature

    @cached_property
    def plugin(self) -> LwFPlugin:
        from avalanche.training.plugins import LwFPlugin

        return LwFPlugin(alpha=self.alpha, temperature=self.temperature)

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
