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
from avalanche.training.plugins import AGEMPlugin, GEMPlugin, MASPlugin, SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import ParamData

from fedtide.errors import ScenarioError
from fedtide.scenarios.stream import Dataset
from fedtide.strategies.method_base import Arrays, ContinualMethod, Values

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


class GEM(GEMPlugin):
    """Avalanche's GEMPlugin that remembers which samples it keeps, refused without its QP solver."""

    def __init__(self, patterns_per_experience: int = 64, memory_strength: float = 0.5) -> None:
        import qpsolvers

        if "quadprog" not in qpsolvers.available_solvers:
            raise ScenarioError("continual.method", "gem needs the quadprog solver", "pip install quadprog")
        super().__init__(patterns_per_experience=patterns_per_experience, memory_strength=memory_strength)
        self.memory_ids: dict[int, np.ndarray] = {}

    @torch.no_grad()
    def update_memory(self, dataset, t, batch_size):
        """Draw the experience's patterns as a subset first, so their sample ids can be stored."""
        if len(dataset) > self.patterns_per_experience:
            chosen = torch.randperm(len(dataset))[: self.patterns_per_experience].tolist()
            dataset = dataset.subset(chosen)
        self.memory_ids[t] = np.asarray(list(dataset.sample_id), dtype=np.int64)
        super().update_memory(dataset, t, batch_size)


class GEMMethod(PluginMethod):
    """GEM whose memory is stored as sample ids (not raw samples) in `Context.state`."""

    plugin_class = GEM
    name = "gem"
    description = "gradient episodic memory: Avalanche GEMPlugin (patterns_per_experience, memory_strength)"
    dp_compatible = False

    def save(self) -> tuple[Arrays, Values]:
        ids = self.plugin.memory_ids
        return {f"ids.{t}": ids[t] for t in ids}, {"experiences": sorted(ids)}

    def load(self, arrays: Arrays, values: Values, full_train: Dataset, model: torch.nn.Module) -> None:
        for t in values.get("experiences", []):
            subset = full_train.subset(arrays[f"ids.{t}"].tolist())
            self.plugin.update_memory(subset, t, batch_size=len(subset))


class MAS(MASPlugin):
    """Avalanche's MASPlugin with defaults for every parameter."""

    def __init__(self, lambda_reg: float = 1.0, alpha: float = 0.5) -> None:
        super().__init__(lambda_reg=lambda_reg, alpha=alpha)


class AGEM(AGEMPlugin):
    """Avalanche's AGEMPlugin with defaults for every parameter."""

    def __init__(self, patterns_per_experience: int = 64, sample_size: int = 64) -> None:
        super().__init__(patterns_per_experience=patterns_per_experience, sample_size=sample_size)


class AGEMMethod(PluginMethod):
    """A-GEM whose memory (a list of datasets) is stored as sample ids, like fedtide's replay buffer."""

    plugin_class = AGEM
    name = "agem"
    description = "averaged GEM: Avalanche AGEMPlugin (patterns_per_experience, sample_size), memory as sample ids"
    dp_compatible = False

    def save(self) -> tuple[Arrays, Values]:
        buffers = self.plugin.buffers
        arrays = {f"ids.{i}": np.asarray(list(b.sample_id), dtype=np.int64) for i, b in enumerate(buffers)}
        return arrays, {"buffers": len(buffers)}

    def load(self, arrays: Arrays, values: Values, full_train: Dataset, model: torch.nn.Module) -> None:
        for i in range(int(values.get("buffers", 0))):
            # update_memory appends the group and rebuilds A-GEM's balanced loader over all groups
            self.plugin.update_memory(full_train.subset(arrays[f"ids.{i}"].tolist()))


# Stock Avalanche plugins that fit the FL loop, each tested in tests/test_plugins.py.
# Not DP-compatible: MAS's importance pass and (A-)GEM's memory gradients read private data
# outside the DP-SGD step. (A-)GEM memories are stored as sample ids, like the replay buffer.
STOCK_PLUGINS: dict[str, type[PluginMethod]] = {
    "mas": plugin_method(
        MAS,
        "mas",
        "memory aware synapses: Avalanche MASPlugin (lambda_reg, alpha)",
        dp_compatible=False,
    ),
    "gem": GEMMethod,
    "agem": AGEMMethod,
}

# Stock plugins that do not fit, and why (README and docs/extending.md say the same).
UNSUPPORTED_STOCK = {
    "si / rwalk": "path integrals re-initialised at every train() call, i.e. every round",
    "lfl": "needs an avalanche BaseModel with get_features() and freezes the live head (lost each round)",
    "gdumb": "retrains from the initial model at every experience: not a federated update",
}
