"""Continual-learning methods as a federated client runs them: Avalanche plugins, consolidated once.

Avalanche consolidates in `after_training_exp`, which its templates call at the end
of every `train()`. A federated client calls `train()` once per *round*, many times
per experience, so each method here separates the two parts of an Avalanche plugin:

- `plugins()`: the plugins active while a round trains (their per-minibatch hooks:
  EWC's penalty, LwF's distillation, Replay's mixed dataloader);
- `consolidate(learner)`: the plugin's end-of-experience step, which the client
  calls exactly once per past experience, at the global weights that ended it.

Client state lives in Flower's `Context.state`, so each method also converts its
state to and from records: arrays (`dict[str, np.ndarray]`) and plain values.

The base class and its contract are in `fedtide.continual.base`; stock
Avalanche plugins and users' `SupervisedPlugin`s are adapted in
`fedtide.continual.plugin_adapter`. Names resolve as: built-in, then stock Avalanche
plugin, then an installed `fedtide.continual` entry point, or a "pkg.module:Name" path.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin, SupervisedPlugin
from avalanche.training.storage_policy import (
    ClassBalancedBuffer,
    ExperienceBalancedBuffer,
    ReservoirSamplingBuffer,
)
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import ParamData

from fedtide.continual.base import Arrays, ContinualMethod, Values
from fedtide.data.stream import Dataset
from fedtide.errors import ScenarioError

if TYPE_CHECKING:
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

    def planned_private_extra(self, past_sizes: list[int]) -> int:
        return min(self.plugin.mem_size, sum(past_sizes))

    def consolidate(self, learner: SupervisedTemplate) -> None:
        self.plugin.after_training_exp(learner)

    def save(self) -> tuple[Arrays, Values]:
        """The buffer as sample ids per group (never tensors: Ray copies the Context each call)."""
        groups = list(self.storage.buffer_groups)
        values: Values = {"groups": groups}
        arrays: Arrays = {}
        for key in groups:
            group = self.storage.buffer_groups[key]
            arrays[f"ids.{key}"] = np.asarray(list(group.buffer.sample_id), dtype=np.int64)
            arrays[f"weights.{key}"] = group._buffer_weights.numpy()
            values[f"size.{key}"] = group.max_size
        if isinstance(self.storage, ExperienceBalancedBuffer):
            values["num_exps"] = self.storage._num_exps
        else:
            values["seen_classes"] = sorted(self.storage.seen_classes)
        return arrays, values

    def load(self, arrays: Arrays, values: Values, full_train: Dataset, model: torch.nn.Module) -> None:
        for key in values.get("groups", []):
            group = ReservoirSamplingBuffer(values[f"size.{key}"])
            group.buffer = full_train.subset(arrays[f"ids.{key}"].tolist())
            group._buffer_weights = torch.from_numpy(arrays[f"weights.{key}"].copy())
            self.storage.buffer_groups[key] = group
        if isinstance(self.storage, ExperienceBalancedBuffer):
            self.storage._num_exps = values.get("num_exps", 0)
        else:
            self.storage.seen_classes = set(values.get("seen_classes", []))


class _EWCPlugin(EWCPlugin):
    """Avalanche's EWCPlugin whose Fisher pass can be swapped for a differentially private one."""

    fisher_pass = None

    def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
        if self.fisher_pass is None:
            return super().compute_importances(model, criterion, optimizer, dataset, device, batch_size, num_workers)
        return self.fisher_pass(model, criterion, dataset, batch_size, device)


class EWC(ContinualMethod):
    name = "ewc"
    dp_compatible = True
    description = "elastic weight consolidation: Avalanche EWCPlugin (separate or online); DP Fisher under DP"
    private_passes_per_consolidation = 1

    def __init__(self, ewc_lambda: float = 10.0, mode: str = "separate", decay_factor: float | None = None) -> None:
        if mode not in ("separate", "online") or (mode == "online") != (decay_factor is not None):
            raise ScenarioError("continual.mode", "use mode: separate, or mode: online with a decay_factor")
        self.plugin = _EWCPlugin(ewc_lambda=ewc_lambda, mode=mode, decay_factor=decay_factor)

    def plugins(self) -> list[SupervisedPlugin]:
        return [self.plugin]

    def consolidate(self, learner: SupervisedTemplate) -> None:
        self.plugin.after_training_exp(learner)

    def use_privacy(self, privacy: ClientPrivacy) -> None:
        self.plugin.fisher_pass = privacy.fisher_importances

    def save(self) -> tuple[Arrays, Values]:
        arrays: Arrays = {}
        for kind, table in (("anchor", self.plugin.saved_params), ("importance", self.plugin.importances)):
            for exp, params in table.items():
                for pname, param in params.items():
                    arrays[f"{kind}.{exp}.{pname}"] = param.data.cpu().numpy()
        return arrays, {"experiences": sorted(self.plugin.saved_params)}

    def load(self, arrays: Arrays, values: Values, full_train: Dataset, model: torch.nn.Module) -> None:
        names = [n for n, _ in model.named_parameters()]
        for exp in values.get("experiences", []):
            for kind, table in (("anchor", self.plugin.saved_params), ("importance", self.plugin.importances)):
                table[exp] = {
                    n: ParamData(n, init_tensor=torch.from_numpy(arrays[f"{kind}.{exp}.{n}"].copy())) for n in names
                }


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

    def save(self) -> tuple[Arrays, Values]:
        lwf = self.plugin.lwf
        if lwf.prev_model is None:
            return {}, {}
        teacher = {f"teacher.{k}": v.cpu().numpy() for k, v in lwf.prev_model.state_dict().items()}
        return teacher, {"expcount": lwf.expcount, "classes": sorted(lwf.prev_classes_by_task.get(0, set()))}

    def load(self, arrays: Arrays, values: Values, full_train: Dataset, model: torch.nn.Module) -> None:
        if "expcount" not in values:
            return
        lwf = self.plugin.lwf
        teacher = copy.deepcopy(model)
        teacher.load_state_dict({k.removeprefix("teacher."): torch.from_numpy(v.copy()) for k, v in arrays.items()})
        lwf.prev_model = teacher
        lwf.expcount = values["expcount"]
        lwf.prev_classes_by_task[0] = set(values["classes"])
