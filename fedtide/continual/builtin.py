"""fedtide's own continual methods: naive, replay, EWC and LwF, each Avalanche's plugin consolidated once.

Replay, EWC and LwF are `PluginMethod`s (`fedtide.continual.plugin_adapter`), as a user's
Avalanche plugin is: the plugin's per-minibatch hooks run while a round trains (EWC's
penalty, LwF's distillation, Replay's mixed dataloader), and its `after_training_exp`
is the consolidation, which the client calls exactly once per past experience, at the
global weights that ended it. What the adapter cannot guess they say themselves:

- their own parameters, checked when the method is built, and their plugin built on
  first use (a `cached_property`), so that naming and checking a built-in loads no
  Avalanche, and so that Replay can pick its buffer after `use_privacy`;
- their state, named in `state_dict()` / `load_state_dict()`
  (`fedtide.continual.state_codec`): a replay buffer as sample ids, EWC's anchors and
  importances, LwF's teacher, rather than every attribute of the plugin;
- under DP, how their private passes are routed and charged (`use_privacy`,
  `private_footprint`).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from fedtide.continual.base import ContinualMethod, StateDict
from fedtide.continual.plugin_adapter import PluginMethod
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
    from fedtide.privacy.coins import SampleCoins
    from fedtide.privacy.dp_sgd import ClientPrivacy

STORAGES = ("experience", "class")


class Naive(ContinualMethod):
    name = "naive"
    dp_compatible = True
    adds_loss_term = False
    description = "fine-tuning, no protection against forgetting (lower bound)"

    def plugins(self) -> list[SupervisedPlugin]:
        return []

    def consolidate(self, learner: SupervisedTemplate) -> None:
        """Nothing to remember."""


class Replay(PluginMethod):
    """Experience replay with Avalanche's `ReplayPlugin` and a buffer balanced by experience or class.

    Without DP the buffer is Avalanche's own (`ExperienceBalancedBuffer` or
    `ClassBalancedBuffer`: per group, a reservoir keeping the `k` samples of largest random
    key) and replay is Avalanche's mixed dataloader.

    Under DP-SGD the buffer joins the Poisson-sampled training set, and the reservoir would
    break the accountant's add/remove relation: adding one sample to the client's data can
    swap it into the buffer in place of another (a substitution; docs/results.md measures
    it). So under DP the buffer is a `CoinBuffer` (`fedtide.continual.coin_buffer`): the same
    experience-balanced groups, each sample kept by its own seeded coin with probability
    (mem_size / groups) / (its experience's planned size), so one sample never changes
    another's membership. Its size is then random, `mem_size` in expectation (less where a
    past experience holds fewer samples than its share), and the DP passes are planned with
    that expectation (`PrivateFootprint.extra_samples`). `storage: class` is refused under DP:
    its shares depend on which classes the client holds, so one sample of a new class would
    re-divide every class's share.
    """

    name = "replay"
    dp_compatible = True
    adds_loss_term = False  # replayed samples join the data loss, each clipped as a sample
    description = "experience replay: Avalanche ReplayPlugin, buffer balanced by experience or class"

    def __init__(self, mem_size: int = 200, storage: str = "experience") -> None:
        """Checks the parameters; the plugin is built on first use (`plugin`), after `use_privacy`."""
        if mem_size < 1:
            raise ScenarioError("continual.mem_size", f"must be >= 1, got {mem_size}")
        if storage not in STORAGES:
            raise ScenarioError("continual.storage", f"unknown storage '{storage}'", " or ".join(STORAGES))
        self.mem_size, self.storage_kind = mem_size, storage
        self.private = False
        self.coins: SampleCoins | None = None
        self.planned_sizes: list[int] = []

    @cached_property
    def storage(self) -> ExemplarsBuffer:
        if self.private:
            from fedtide.continual.coin_buffer import CoinBuffer

            return CoinBuffer(self.mem_size, self.coins, self.planned_sizes)
        from avalanche.training.storage_policy import ClassBalancedBuffer, ExperienceBalancedBuffer

        policy = ExperienceBalancedBuffer if self.storage_kind == "experience" else ClassBalancedBuffer
        return policy(max_size=self.mem_size, adaptive_size=True)

    @cached_property
    def plugin(self) -> ReplayPlugin:
        from avalanche.training.plugins import ReplayPlugin

        return ReplayPlugin(mem_size=self.mem_size, storage_policy=self.storage)

    def plugins(self) -> list[SupervisedPlugin]:
        """Avalanche's replay dataloader, except under DP where the buffer joins the sampled dataset."""
        return [] if self.private else super().plugins()

    def check_dp(self) -> None:
        if self.storage_kind != "experience":
            raise ScenarioError(
                "continual.storage",
                "under DP-SGD the replay buffer keeps each sample by its own coin per experience; class-balanced "
                "shares depend on which classes a client holds, so one added sample could change others' membership",
                "use storage: experience",
            )

    def use_privacy(self, privacy: ClientPrivacy) -> None:
        """Keep the buffer by independent coins (before `load_state_dict` builds it)."""
        self.check_dp()
        if "storage" in self.__dict__:
            raise RuntimeError("use_privacy must come before the replay buffer is built (before load_state_dict)")
        self.private = True
        self.coins, self.planned_sizes = privacy.coins, list(privacy.planned_sizes)

    def private_training_data(self) -> Dataset | None:
        return self.storage.buffer if len(self.storage.buffer) else None

    def private_footprint(self) -> PrivateFootprint:
        return PrivateFootprint(replay_capacity=self.mem_size)

    def state_dict(self) -> StateDict:
        """The buffer as sample ids per group (never tensors: Ray copies the Context each call)."""
        if self.private:
            groups = {
                key: {"ids": [int(i) for i in group.buffer.sample_id], "rate": group.rate, "size": group.planned_size}
                for key, group in self.storage.buffer_groups.items()
            }
            return {"policy": "coins", "groups": groups}
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
        if self.private != (state.get("policy") == "coins"):
            raise ValueError("a replay buffer stored with DP-SGD on (or off) cannot be restored with it off (or on)")
        if self.private:
            for key, stored in state["groups"].items():
                self.storage.add_group(int(key), self.full_train.subset(stored["ids"]), float(stored["rate"]))
            return
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


class EWC(PluginMethod):
    name = "ewc"
    dp_compatible = True
    description = "elastic weight consolidation: Avalanche EWCPlugin (separate or online); DP Fisher under DP"

    def __init__(self, ewc_lambda: float = 10.0, mode: str = "separate", decay_factor: float | None = None) -> None:
        """Checks the parameters; the plugin is built on first use (`plugin`)."""
        if mode not in ("separate", "online") or (mode == "online") != (decay_factor is not None):
            raise ScenarioError("continual.mode", "use mode: separate, or mode: online with a decay_factor")
        self.ewc_lambda, self.mode, self.decay_factor = ewc_lambda, mode, decay_factor

    @cached_property
    def plugin(self) -> FederatedEWCPlugin:
        from fedtide.continual.ewc_plugin import FederatedEWCPlugin

        return FederatedEWCPlugin(ewc_lambda=self.ewc_lambda, mode=self.mode, decay_factor=self.decay_factor)

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


class LwF(PluginMethod):
    name = "lwf"
    dp_compatible = True
    description = "learning without forgetting: Avalanche LwFPlugin, teacher = global model"

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        """Keeps the parameters; the plugin is built on first use (`plugin`)."""
        self.alpha, self.temperature = alpha, temperature

    @cached_property
    def plugin(self) -> LwFPlugin:
        from avalanche.training.plugins import LwFPlugin

        return LwFPlugin(alpha=self.alpha, temperature=self.temperature)

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
