"""Continual methods by name: built-ins, stock Avalanche plugins, entry points, "pkg.module:Name" paths.

Names resolve in that order, so a plugin can never shadow a built-in. A path or an
entry point may name a `ContinualMethod` or an Avalanche `SupervisedPlugin`; the
latter is adapted by `plugin_method` (consolidated once per experience). Only a
built-in is resolved without importing Avalanche (which `fedtide validate` and the
server then never load for one).
"""

from __future__ import annotations

from fedtide.continual.base import ContinualMethod, check_metric_aggregation
from fedtide.continual.builtin import BUILT_INS
from fedtide.data.schema import ContinualConfig
from fedtide.errors import ScenarioError
from fedtide.registry import (
    CONTINUAL_GROUP,
    check_hook_signatures,
    check_parameters,
    is_plugin_path,
    load_entry_point,
    load_plugin,
    plugin_entry_points,
)

FIELD = "continual.method"
# What fedtide's client calls on a method, each with the positional arguments of `ContinualMethod`'s def.
METHOD_HOOKS = (
    "plugins",
    "consolidate",
    "bind",
    "state_dict",
    "load_state_dict",
    "state_holder",
    "attributes_are_state",
    "check_dp",
    "use_privacy",
    "private_training_data",
    "metrics",
    "private_footprint",
)


def all_methods() -> dict[str, type[ContinualMethod]]:
    """Built-ins and the stock Avalanche plugins adapted to rounds, by name."""
    from fedtide.continual.stock_plugins import STOCK_PLUGINS

    return BUILT_INS | STOCK_PLUGINS


def method_class(name: str) -> type[ContinualMethod]:
    """Resolve a method name: built-in or stock Avalanche plugin, then entry point, or a path.

    A path or entry point may name a `ContinualMethod` or an Avalanche `SupervisedPlugin`
    subclass; the latter is wrapped by `plugin_method` (consolidated once per experience).
    """
    if name.lower() in BUILT_INS:
        return BUILT_INS[name.lower()]
    from avalanche.training.plugins import SupervisedPlugin

    from fedtide.continual.plugin_adapter import plugin_method

    bases = (ContinualMethod, SupervisedPlugin)
    methods = all_methods()
    if is_plugin_path(name):
        found = load_plugin(name, FIELD, bases)
    elif name.lower() in methods:
        return methods[name.lower()]
    elif name.lower() in (installed := plugin_entry_points(CONTINUAL_GROUP)):
        found = load_entry_point(installed[name.lower()], FIELD, bases)
    else:
        known = ", ".join([*methods, *installed])
        raise ScenarioError(FIELD, f"unknown method '{name}'", f"one of {known}, or a 'pkg.module:Name'")
    method = found if issubclass(found, ContinualMethod) else plugin_method(found, name=name)
    check_metric_aggregation(method, FIELD)
    return method


def build_method(config: ContinualConfig) -> ContinualMethod:
    """Instantiate the scenario's continual method with its parameters."""
    cls = method_class(config.method)
    check_parameters(getattr(cls, "plugin_class", cls), config.params, "continual")
    try:
        method = cls(**config.params)
    except (TypeError, ValueError) as error:  # a user plugin refusing its parameters' values
        built = getattr(cls, "plugin_class", cls).__name__
        raise ScenarioError("continual", f"{built} cannot be built: {error}") from None
    check_hook_signatures(method, ContinualMethod, METHOD_HOOKS, FIELD)
    return method


def require_dp_compatible(method: ContinualMethod, method_name: str) -> None:
    """Refuse, before anything trains, a method that would use private data outside DP-SGD's account,
    or parameters it cannot keep within it (`ContinualMethod.check_dp`)."""
    if not method.dp_compatible:
        safe = ", ".join(n for n, m in all_methods().items() if m.dp_compatible)
        raise ScenarioError(
            FIELD,
            f"'{method_name}' is not DP-compatible (it uses private data outside the DP-SGD step, unaccounted)",
            f"use one of {safe}, or set privacy.enabled: false",
        )
    method.check_dp()
