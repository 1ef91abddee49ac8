"""Any Avalanche `SupervisedPlugin` as a federated continual method: consolidated once, state in the Context.

`plugin_method(PluginClass)` makes a `ContinualMethod` whose round hooks are the
plugin's own (its `before_backward`, `after_backward`, ... run while a round trains)
and whose `consolidate` is the plugin's `after_training_exp`, called once per past
experience at the global weights that ended it (never at the end of a round).

Clients are rebuilt on every call, so the plugin's state must live in `Context.state`.
The contract (docs/extending.md):

- a plugin with `state_dict()` and `load_state_dict(state)` gives its state itself;
- otherwise its instance attributes that can be stored are: tensors, numpy arrays,
  `ParamData`, `nn.Module`s (restored into a frozen copy of the model), JSON values,
  and dicts or lists of those (`fedtide.continual.state_codec`).
  Anything else (datasets, loaders, iterators) cannot be stored; `unsaved_attributes`
  names it and `fedtide check-plugin` fails on it.

A plugin runs under DP-SGD only if its class says `dp_compatible = True`: it may add
parameter-only penalties or per-sample losses, and must read no private data outside
the DP-SGD step (no importance pass, no reference gradients).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, ClassVar

import numpy as np
import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import ParamData

from fedtide.continual.base import ContinualMethod, StateDict
from fedtide.continual.state_codec import Tensorish, as_array, is_plain, is_storable
from fedtide.registry import check_hook_signatures

FIELD = "continual.method"
# The hooks Avalanche's templates call on a plugin, as `hook(strategy, **kwargs)`.
PLUGIN_HOOKS = tuple(name for name in dir(SupervisedPlugin) if name.startswith(("before_", "after_")))


class PluginMethod(ContinualMethod):
    """A `SupervisedPlugin` subclass adapted to fedtide's round/experience split."""

    plugin_class: ClassVar[type[SupervisedPlugin]]

    def __init__(self, **params: Any) -> None:
        self.plugin = self.plugin_class(**params)
        check_plugin_signatures(self.plugin)

    def plugins(self) -> list[SupervisedPlugin]:
        """The plugin, after a helper that moves its restored (CPU) tensors to the learner's device."""
        return [_StateToDevice(self.plugin), self.plugin]

    def consolidate(self, learner: SupervisedTemplate) -> None:
        self.plugin.after_training_exp(learner)

    def state_dict(self) -> StateDict:
        """The plugin's own `state_dict()` if it has one, else its storable attributes."""
        if _has_own_state(self.plugin):
            return dict(self.plugin.state_dict())
        return {attr: value for attr, value in vars(self.plugin).items() if is_storable(value)}

    def load_state_dict(self, state: StateDict) -> None:
        if _has_own_state(self.plugin):
            self.plugin.load_state_dict(state)
            return
        for attr, value in state.items():
            setattr(self.plugin, attr, value)

    def metrics(self) -> dict[str, float]:
        """The plugin's own `metrics()`, if it defines one (Avalanche plugins have no such hook)."""
        report = getattr(self.plugin, "metrics", None)
        return dict(report()) if callable(report) else {}

    def unsaved_attributes(self) -> dict[str, str]:
        """The plugin's attributes that cannot go to `Context.state` (when its attributes are the state)."""
        if _has_own_state(self.plugin) or type(self).state_dict is not PluginMethod.state_dict:
            return {}
        return {attr: fingerprint(value) for attr, value in vars(self.plugin).items() if not is_storable(value)}


def check_plugin_signatures(plugin: SupervisedPlugin) -> None:
    """Refuse a hook def that Avalanche's call `hook(strategy)` would fail on, naming the def (file:line)."""
    check_hook_signatures(plugin, SupervisedPlugin, PLUGIN_HOOKS, FIELD)


def _has_own_state(plugin: SupervisedPlugin) -> bool:
    return callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None))


class _StateToDevice(SupervisedPlugin):
    """Moves a plugin's tensors, `ParamData` and modules to the learner's device when a round starts."""

    def __init__(self, target: SupervisedPlugin) -> None:
        super().__init__()
        self.target = target

    def before_training(self, strategy, **kwargs) -> None:
        device = torch.device(strategy.device)
        for attr, value in vars(self.target).items():
            if isinstance(value, dict) and value and all(isinstance(v, Tensorish) for v in value.values()):
                setattr(self.target, attr, {k: _to_device(v, device) for k, v in value.items()})
            elif isinstance(value, torch.Tensor | ParamData | torch.nn.Module):
                setattr(self.target, attr, _to_device(value, device))


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, ParamData):
        return (
            value
            if value.data.device == device
            else ParamData(value.name, init_tensor=value.data.to(device), device=device)
        )
    if isinstance(value, torch.Tensor | torch.nn.Module):
        return value.to(device)
    return value


def plugin_method(
    plugin_class: type[SupervisedPlugin],
    name: str,
    description: str | None = None,
    dp_compatible: bool | None = None,
) -> type[PluginMethod]:
    """A `PluginMethod` class for `plugin_class`; its constructor takes the plugin's parameters."""
    doc = (plugin_class.__doc__ or "").strip().splitlines()
    attributes = {
        "plugin_class": plugin_class,
        "name": name,
        "description": description or (doc[0] if doc else plugin_class.__name__),
        "dp_compatible": getattr(plugin_class, "dp_compatible", False) if dp_compatible is None else dp_compatible,
        "__module__": __name__,
    }
    return type(f"{plugin_class.__name__}Method", (PluginMethod,), attributes)


def _summary(value: Any, depth: int) -> Any:
    """A small structural summary of `value` (shapes, sums, lengths, nested attributes)."""
    if isinstance(value, Tensorish):
        array = as_array(value)
        total = float(array.sum()) if np.issubdtype(array.dtype, np.number) else 0.0
        return ["array", list(array.shape), round(total, 6)]
    if isinstance(value, torch.nn.Module):
        return ["module", _summary(value.state_dict(), depth)]
    if is_plain(value) or depth > 3:
        return value if is_plain(value) else type(value).__name__
    if isinstance(value, dict):
        return ["dict", len(value), [[str(k), _summary(v, depth + 1)] for k, v in list(value.items())[:8]]]
    if isinstance(value, list | tuple | set):
        return ["seq", len(value), [_summary(v, depth + 1) for v in list(value)[:8]]]
    if hasattr(value, "__next__") or inspect.isroutine(value):
        return type(value).__name__  # iterators and functions: no comparable content
    if hasattr(value, "__dict__"):
        return [type(value).__name__, _summary(dict(vars(value)), depth + 1)]
    return type(value).__name__


def fingerprint(value: Any) -> str:
    """A short digest of `value`'s structure and content, to tell whether it changed."""
    return hashlib.sha1(json.dumps(_summary(value, 0), default=str).encode()).hexdigest()[:12]


