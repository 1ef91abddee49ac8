"""Any Avalanche `SupervisedPlugin` as a federated continual method: consolidated once, state in the Context.

`plugin_method(PluginClass)` makes a `ContinualMethod` whose round hooks are the
plugin's own (its `before_backward`, `after_backward`, ... run while a round trains)
and whose `consolidate` is the plugin's `after_training_exp`, called once per past
experience at the global weights that ended it (never at the end of a round).

Clients are rebuilt on every call, so the plugin's state must live in `Context.state`.
The contract (docs/extending.md):

- a plugin with `state_dict()` and `load_state_dict(state)` gives its state itself, as a
  dict of tensors / numpy arrays / JSON values;
- otherwise its instance attributes are stored generically: tensors, numpy arrays,
  `ParamData`, `nn.Module`s (as state dicts, restored into a frozen copy of the model),
  dicts of those, and JSON values (None, numbers, strings, lists, dicts of them).
  Anything else (datasets, loaders, iterators) cannot be stored; `unsaved_attributes`
  names it and `fedtide check-plugin` fails on it.

A plugin runs under DP-SGD only if its class says `dp_compatible = True`: it may add
parameter-only penalties or per-sample losses, and must read no private data outside
the DP-SGD step (no importance pass, no reference gradients).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from typing import Any, ClassVar

import numpy as np
import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import ParamData

from fedtide.continual.base import Arrays, ContinualMethod, Values
from fedtide.data.stream import Dataset

STATE_KEY = "plugin_state"
Tensorish = (torch.Tensor, np.ndarray, ParamData)


class PluginMethod(ContinualMethod):
    """A `SupervisedPlugin` subclass adapted to fedtide's round/experience split."""

    plugin_class: ClassVar[type[SupervisedPlugin]]

    def __init__(self, **params: Any) -> None:
        self.plugin = self.plugin_class(**params)

    def plugins(self) -> list[SupervisedPlugin]:
        """The plugin, after a helper that moves its restored (CPU) tensors to the learner's device."""
        return [_StateToDevice(self.plugin), self.plugin]

    def consolidate(self, learner: SupervisedTemplate) -> None:
        self.plugin.after_training_exp(learner)

    def save(self) -> tuple[Arrays, Values]:
        arrays, meta = capture_state(self.plugin)
        return arrays, {STATE_KEY: json.dumps(meta)}

    def load(self, arrays: Arrays, values: Values, full_train: Dataset, model: torch.nn.Module) -> None:
        if STATE_KEY in values:
            restore_state(self.plugin, arrays, json.loads(values[STATE_KEY]), model)

    def unsaved_attributes(self) -> dict[str, str]:
        """Attributes that cannot go to `Context.state`, with a fingerprint of their content.

        `fedtide check-plugin` compares the fingerprints of a fresh plugin with those
        stored after consolidation: an unstorable attribute that changed is state lost
        between rounds.
        """
        return capture_state(self.plugin)[1]["unsaved"]


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


def _plain(value: Any) -> bool:
    """Whether JSON keeps `value` exactly (tuples and int dict keys would come back changed)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _array(value: torch.Tensor | np.ndarray | ParamData) -> np.ndarray:
    if isinstance(value, ParamData):
        value = value.data
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _kind(value: Any) -> str:
    return "param" if isinstance(value, ParamData) else "tensor" if isinstance(value, torch.Tensor) else "ndarray"


def capture_state(plugin: SupervisedPlugin) -> tuple[Arrays, dict]:
    """The plugin's state as arrays plus a JSON description (kinds, plain values, unsaved names)."""
    if callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None)):
        items, custom = dict(plugin.state_dict()), True
    else:
        items, custom = dict(vars(plugin)), False
    arrays: Arrays = {}
    meta: dict[str, Any] = {"custom": custom, "kinds": {}, "plain": {}, "unsaved": {}}
    for attr, value in items.items():
        if isinstance(value, Tensorish):
            arrays[attr] = _array(value)
            meta["kinds"][attr] = _kind(value)
        elif isinstance(value, torch.nn.Module):
            for key, tensor in value.state_dict().items():
                arrays[f"{attr}.{key}"] = _array(tensor)
            meta["kinds"][attr] = "module"
        elif isinstance(value, dict) and value and all(isinstance(v, Tensorish) for v in value.values()):
            if not all(isinstance(k, str | int) for k in value):
                meta["unsaved"][attr] = fingerprint(value)
                continue
            for index, item in enumerate(value.values()):
                arrays[f"{attr}.{index}"] = _array(item)
            meta["kinds"][attr] = {"dict": [[key, _kind(item)] for key, item in value.items()]}
        elif _plain(value):
            meta["plain"][attr] = value
        else:
            meta["unsaved"][attr] = fingerprint(value)
    if custom and meta["unsaved"]:
        unsaved = ", ".join(meta["unsaved"])
        raise TypeError(f"{type(plugin).__name__}.state_dict() returned values that cannot be stored: {unsaved}")
    return arrays, meta


def _summary(value: Any, depth: int) -> Any:
    """A small structural summary of `value` (shapes, sums, lengths, nested attributes)."""
    if isinstance(value, Tensorish):
        array = _array(value)
        total = float(array.sum()) if np.issubdtype(array.dtype, np.number) else 0.0
        return ["array", list(array.shape), round(total, 6)]
    if isinstance(value, torch.nn.Module):
        return ["module", _summary(value.state_dict(), depth)]
    if _plain(value) or depth > 3:
        return value if _plain(value) else type(value).__name__
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


def _rebuild(kind: str, array: np.ndarray, name: str) -> Any:
    tensor = torch.from_numpy(array.copy())
    if kind == "param":
        return ParamData(str(name), init_tensor=tensor)
    return tensor if kind == "tensor" else array.copy()


def restore_state(plugin: SupervisedPlugin, arrays: Arrays, meta: dict, model: torch.nn.Module) -> None:
    """Put back what `capture_state` stored; a stored module becomes a frozen copy of `model`."""
    restored: dict[str, Any] = dict(meta["plain"])
    for attr, kind in meta["kinds"].items():
        if kind == "module":
            module = copy.deepcopy(model)
            prefix = f"{attr}."
            module.load_state_dict(
                {k.removeprefix(prefix): torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith(prefix)}
            )
            for param in module.parameters():
                param.requires_grad = False
            restored[attr] = module.eval()
        elif isinstance(kind, dict):
            restored[attr] = {
                key: _rebuild(item_kind, arrays[f"{attr}.{i}"], key) for i, (key, item_kind) in enumerate(kind["dict"])
            }
        else:
            restored[attr] = _rebuild(kind, arrays[attr], attr)
    if meta["custom"]:
        plugin.load_state_dict(restored)
    else:
        for attr, value in restored.items():
            setattr(plugin, attr, value)
