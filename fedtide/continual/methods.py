"""Continual methods by name: built-ins, stock Avalanche plugins, entry points, "pkg.module:Name" paths.

Names resolve as every kind does (`fedtide.registry.resolve`), so a plugin can never
shadow a built-in. A path or an entry point may name a `ContinualMethod` or an
Avalanche `SupervisedPlugin`; the latter is adapted by `plugin_method` (consolidated
once per experience). Only a built-in is resolved without importing Avalanche (which
`fedtide validate` and the server then never load for one): the stock plugins are the
second tier of built-ins, loaded only for a name the first does not hold.
"""

from __future__ import annotations

from fedtide.continual.base import ContinualMethod, check_metric_aggregation
from fedtide.continual.builtin import BUILT_INS
from fedtide.errors import ScenarioError
from fedtide.registry import Kind, check_hook_signatures, check_parameters, resolve
from fedtide.scenario.schema import ContinualConfig

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


def _stock_plugins() -> dict[str, type[ContinualMethod]]:
    from fedtide.continual.stock_plugins import STOCK_PLUGINS

    return STOCK_PLUGINS


def _bases() -> tuple[type, ...]:
    from avalanche.training.plugins import SupervisedPlugin

    return ContinualMethod, SupervisedPlugin


def _adapt(found: type, name: str) -> type[ContinualMethod]:
    """A user's class as a method: an Avalanche plugin adapted to rounds, its metric aggregation checked."""
    from fedtide.continual.plugin_adapter import plugin_method

    method = found if issubclass(found, ContinualMethod) else plugin_method(found, name=name)
    check_metric_aggregation(method, FIELD)
    return method


METHOD = Kind("method", FIELD, "fedtide.continual", (lambda: BUILT_INS, _stock_plugins), _bases, _adapt)


def all_methods() -> dict[str, type[ContinualMethod]]:
    """Built-ins and the stock Avalanche plugins adapted to rounds, by name."""
    return METHOD.built_in_names()


def method_class(name: str) -> type[ContinualMethod]:
    """A built-in or stock Avalanche plugin, an entry point or a path, as `resolve` orders them."""
    return resolve(METHOD, name)


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
