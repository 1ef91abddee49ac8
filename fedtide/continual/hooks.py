"""A plugin's hooks are Avalanche's names: a misspelt one would never be called, so it is refused.

Avalanche calls a plugin's `before_*` / `after_*` methods by name (those of
`SupervisedPlugin`). A method named `before_backwards` or `after_trainig_exp` is an
ordinary method nobody calls, and the run would go on without it, silently. So a
plugin's public callables that look like hooks are compared with Avalanche's hook names
(`difflib.get_close_matches`): a name starting with `before_` / `after_` within
`PREFIXED_CUTOFF` of a hook, or any other public name within `OTHER_CUTOFF` of one
(`aftertraining_exp`), that is not itself a hook, is a near-miss. Helpers with other
names (`update_memory`, `penalty`) are left alone.
"""

from __future__ import annotations

import difflib
import inspect
from typing import TYPE_CHECKING

from fedtide.errors import ScenarioError

if TYPE_CHECKING:
    from fedtide.continual.base import ContinualMethod

HOOK_PREFIXES = ("before_", "after_")
PREFIXED_CUTOFF = 0.75
OTHER_CUTOFF = 0.85


class MisspeltHook(ScenarioError):
    """A plugin method whose name is close to an Avalanche hook's but is not one."""


def avalanche_hooks() -> list[str]:
    """The hook names Avalanche's supervised templates call on a plugin."""
    from avalanche.training.plugins import SupervisedPlugin

    return sorted(name for name, _ in inspect.getmembers(SupervisedPlugin, callable) if name.startswith(HOOK_PREFIXES))


def misspelt_hooks(plugin_class: type) -> list[tuple[str, str]]:
    """(name, the hook it is closest to) for each of the class's public callables that misses a hook."""
    hooks = avalanche_hooks()
    misses = []
    for name, _ in inspect.getmembers(plugin_class, callable):
        if name.startswith("_") or name in hooks:
            continue
        cutoff = PREFIXED_CUTOFF if name.startswith(HOOK_PREFIXES) else OTHER_CUTOFF
        close = difflib.get_close_matches(name, hooks, n=1, cutoff=cutoff)
        if close:
            misses.append((name, close[0]))
    return misses


def user_plugin_classes(method: ContinualMethod) -> list[type]:
    """The plugin classes a method brings that neither Avalanche nor fedtide wrote (theirs are right)."""
    if type(method).__module__.startswith("fedtide.") and not hasattr(method, "plugin_class"):
        return []  # a built-in method: its plugins are Avalanche's and fedtide's
    classes = dict.fromkeys(type(plugin) for plugin in method.plugins())
    return [cls for cls in classes if not cls.__module__.startswith(("avalanche.", "fedtide."))]


def check_hooks(method: ContinualMethod, method_name: str) -> None:
    """Refuse, before anything trains, a method whose Avalanche plugins misspell a hook (one line).

    The plugins are those the built method returns from `plugins()`: a `SupervisedPlugin`
    given as the method, or those a user's `ContinualMethod` brings.
    """
    from fedtide.continual.methods import FIELD

    misses = [(cls, name, hook) for cls in user_plugin_classes(method) for name, hook in misspelt_hooks(cls)]
    if misses:
        names = ", ".join(f"{cls.__name__}.{name}" for cls, name, _ in misses)
        which = "is not an Avalanche hook" if len(misses) == 1 else "are not Avalanche hooks"
        raise MisspeltHook(
            FIELD,
            f"'{method_name}' defines {names}, which {which} and would never be called",
            f"did you mean {', '.join(hook for _, _, hook in misses)}?",
        )
