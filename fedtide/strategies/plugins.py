"""Loading a user's class from a "pkg.module:Name" string, and checking its parameters.

Both registries (aggregation strategies and continual methods) accept such a string
wherever they accept a built-in name, so users extend fedtide without forking it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from fedtide.errors import ScenarioError


def is_plugin_path(name: str) -> bool:
    return ":" in name


def load_plugin(path: str, field: str, base: type) -> type:
    """Import `pkg.module:Name` and check that it is a subclass of `base`."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ScenarioError(field, f"cannot import '{module_name}' ({error})", "is the package installed?") from None
    if not hasattr(module, attr):
        raise ScenarioError(field, f"'{module_name}' has no attribute '{attr}'")
    obj = getattr(module, attr)
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise ScenarioError(field, f"'{path}' is not a subclass of {base.__module__}.{base.__qualname__}")
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
