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
  A `torch.Generator` is stored as its state (`get_state`/`set_state`). Anything else
  (datasets, loaders, iterators, plain objects) cannot be stored: if it changes during a
  round the client stops the run naming it (`fedtide.continual.state_check`). Scratch a
  round recomputes is named in the plugin's `rebuilt_each_round` and neither stored nor checked.

A plugin's `metrics()` aggregate over clients as its class's `metric_aggregation` says
(`ContinualMethod.metric_aggregation`).

A plugin runs under DP-SGD only if its class says `dp_compatible = True`: it may add
parameter-only penalties or per-sample losses, and must read no private data outside
the DP-SGD step (no importance pass, no reference gradients). While it trains, a
model run on anything but the DP batch, or a `p.grad` changed after backward, stops
the round (`fedtide.privacy.dp_sgd`).

fedtide's built-ins (`fedtide.continual.builtin`) are `PluginMethod`s too, over Avalanche's
plugins, each with its own parameters and state: so this module imports no Avalanche
until a plugin is built, and naming or checking a built-in loads none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from fedtide.continual.base import ContinualMethod, StateDict
from fedtide.continual.hooks import avalanche_hooks
from fedtide.registry import check_hook_signatures

if TYPE_CHECKING:
    from avalanche.training.plugins import SupervisedPlugin
    from avalanche.training.templates import SupervisedTemplate

FIELD = "continual.method"


class PluginMethod(ContinualMethod):
    """A `SupervisedPlugin` subclass adapted to fedtide's round/experience split."""

    plugin_class: ClassVar[type[SupervisedPlugin]]

    def __init__(self, **params: Any) -> None:
        self.plugin = self.plugin_class(**params)
        check_plugin_signatures(self.plugin)

    def plugins(self) -> list[SupervisedPlugin]:
        """The plugin, after a helper that moves its restored (CPU) tensors to the learner's device."""
        from fedtide.continual.device_plugin import StateToDevice

        return [StateToDevice(self.plugin), self.plugin]

    def consolidate(self, learner: SupervisedTemplate) -> None:
        self.plugin.after_training_exp(learner)

    def state_dict(self) -> StateDict:
        """The plugin's own `state_dict()` if it has one, else its storable attributes."""
        from fedtide.continual.state_check import rebuilt_each_round
        from fedtide.continual.state_codec import is_storable

        if _has_own_state(self.plugin):
            return dict(self.plugin.state_dict())
        skipped = rebuilt_each_round(self.plugin)
        return {a: v for a, v in vars(self.plugin).items() if a not in skipped and is_storable(v)}

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

    def state_holder(self) -> SupervisedPlugin:
        return self.plugin

    def attributes_are_state(self) -> bool:
        return not _has_own_state(self.plugin) and type(self).state_dict is PluginMethod.state_dict


def check_plugin_signatures(plugin: SupervisedPlugin) -> None:
    """Refuse a hook def that Avalanche's call `hook(strategy)` would fail on, naming the def (file:line)."""
    from avalanche.training.plugins import SupervisedPlugin

    check_hook_signatures(plugin, SupervisedPlugin, avalanche_hooks(), FIELD)


def _has_own_state(plugin: SupervisedPlugin) -> bool:
    return callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None))


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
        "adds_loss_term": getattr(plugin_class, "adds_loss_term", True),
        "metric_aggregation": getattr(plugin_class, "metric_aggregation", {}),
        "__module__": __name__,
    }
    return type(f"{plugin_class.__name__}Method", (PluginMethod,), attributes)
