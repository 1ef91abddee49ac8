"""Finding a user's class: a "pkg.module:Name" path or a short name from an entry point.

Both registries (aggregation strategies and continual methods) accept either form
wherever they accept a built-in name, so users extend fedtide without forking it.
Short names are looked up after the built-ins: a plugin cannot shadow a built-in
name (the built-in wins, and `fedtide list` says that the entry point is shadowed).
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from fedtide.errors import ScenarioError

STRATEGY_GROUP = "fedtide.strategies"
CONTINUAL_GROUP = "fedtide.continual"


def is_plugin_path(name: str) -> bool:
    return ":" in name


def _describe(base: type | tuple[type, ...]) -> str:
    bases = base if isinstance(base, tuple) else (base,)
    return " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)


def load_plugin(path: str, field: str, base: type | tuple[type, ...]) -> type:
    """Import `pkg.module:Name` and check that it is a subclass of `base` (or one of several bases)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ScenarioError(field, f"cannot import '{module_name}' ({error})", "is the package installed?") from None
    if not hasattr(module, attr):
        raise ScenarioError(field, f"'{module_name}' has no attribute '{attr}'")
    obj = getattr(module, attr)
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise ScenarioError(field, f"'{path}' is not a subclass of {_describe(base)}")
    return obj


def plugin_entry_points(group: str) -> dict[str, EntryPoint]:
    """The installed entry points of `group`, by lower-case name (the first one wins on a duplicate)."""
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=group):
        found.setdefault(point.name.lower(), point)
    return found


def load_entry_point(point: EntryPoint, field: str, base: type | tuple[type, ...]) -> type:
    """Load an entry point's class; a broken one is a one-line error naming it and its package."""
    package = point.dist.name if point.dist else "unknown package"
    where = f"entry point '{point.name}' = '{point.value}' of package '{package}' (group {point.group})"
    try:
        obj = point.load()
    except Exception as error:  # an import error, or any exception the plugin's module raises
        raise ScenarioError(field, f"{where} cannot be loaded: {type(error).__name__}: {error}") from None
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise ScenarioError(field, f"{where} is not a subclass of {_describe(base)}")
    return obj


def check_parameters(cls: type, params: dict[str, Any], field: str) -> None:
    """Refuse parameters the class's constructor does not take, before anything runs."""
    if cls.__init__ is object.__init__:
        signature = inspect.Signature()
    else:
        signature = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    known = [n for n, p in signature.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
    unknown = [name for name in params if name not in known]
    if unknown and not accepts_any:
        raise ScenarioError(
            f"{field}.{unknown[0]}",
            f"{cls.__name__} takes no parameter '{unknown[0]}'",
            f"accepted: {', '.join(known) or 'none'}",
        )
