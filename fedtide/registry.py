"""Naming a component: one resolver (`resolve`) for every kind a scenario names by string.

A kind (an aggregation strategy, a continual method) is a `Kind`: its built-ins, its
entry-point group, the base classes a user's class must subclass. A name resolves in
one documented order (docs/extending.md), the same for every kind:

1. a name with a colon is a "pkg.module:Name" path, imported as it says;
2. otherwise fedtide's built-ins (for methods, the stock Avalanche plugins after them),
   case-insensitively;
3. then the installed entry points of the kind's group.

So a plugin cannot shadow a built-in name (the built-in wins, and `fedtide list` says
that the entry point is shadowed), and users extend fedtide without forking it.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from fedtide.errors import ScenarioError, SignatureError

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class Kind:
    """One kind of component a scenario names, and where its names come from.

    Built-ins and bases are given as functions, so that defining a kind imports nothing:
    `built_ins` is searched tier by tier, and a later tier (the stock Avalanche plugins)
    is loaded only for a name the earlier ones do not hold.
    """

    noun: str  # how errors call one: "unknown method 'x'"
    field: str  # the scenario field errors name
    group: str  # the entry-point group
    built_ins: tuple[Callable[[], Mapping[str, type]], ...]
    bases: Callable[[], tuple[type, ...]]  # what a path or an entry point must subclass
    # What a class found by path or entry point becomes (an Avalanche plugin: a method)
    adapt: Callable[[type, str], type] = lambda found, name: found

    def built_in_names(self) -> dict[str, type]:
        """Every built-in, all tiers loaded (for listings and error messages)."""
        return {name: cls for tier in self.built_ins for name, cls in tier().items()}


def resolve(kind: Kind, name: str) -> type:
    """The class `name` stands for, in the module docstring's order; an unknown name lists the known ones."""
    if is_plugin_path(name):
        return kind.adapt(load_plugin(name, kind.field, kind.bases()), name)
    lower = name.lower()
    for tier in kind.built_ins:
        if lower in (found := tier()):
            return found[lower]
    installed = plugin_entry_points(kind.group)
    if lower in installed:
        return kind.adapt(load_entry_point(installed[lower], kind.field, kind.bases()), name)
    known = ", ".join([*kind.built_in_names(), *installed])
    raise ScenarioError(kind.field, f"unknown {kind.noun} '{name}'", f"one of {known}, or a 'pkg.module:Name'")


def kind_of(name: str, kinds: Iterable[Kind]) -> Kind:
    """Which of `kinds` a name or path belongs to, in the order given (the first that knows the name)."""
    kinds = list(kinds)
    if is_plugin_path(name):
        found = load_plugin(name, "plugin", tuple(base for kind in kinds for base in kind.bases()))
        return next(kind for kind in kinds if issubclass(found, kind.bases()))
    for kind in kinds:
        if name.lower() in kind.built_in_names() or name.lower() in plugin_entry_points(kind.group):
            return kind
    nouns = " and no ".join(kind.noun for kind in kinds)
    raise ScenarioError("plugin", f"'{name}' is no {nouns} fedtide knows", "or give a 'pkg.module:Name'")


class PluginNotFound(ScenarioError):
    """A "module:Class" plugin whose module cannot be imported (`fedtide resume` says where the run found it)."""


def is_plugin_path(name: str) -> bool:
    return ":" in name


def plugin_folders(scenario_file: Path) -> list[Path]:
    """The folders a scenario's "module:Class" plugins are looked for in: the working folder, the file's own.

    Absolute, so that a run folder can record them and a resume from elsewhere finds the same modules.
    """
    return list(dict.fromkeys(folder.resolve() for folder in (Path.cwd(), scenario_file.parent)))


def make_importable(*folders: Path) -> None:
    """Let "module:Class" paths resolve in these folders (the current one, a scenario's own).

    A plugin written beside its scenario then needs no install and no PYTHONPATH. Ray
    workers inherit the driver's `sys.path` (Flower's Ray backend, and fedtide's sweep
    tasks, pass it as their PYTHONPATH), as do spawned sweep workers.
    """
    for folder in folders:
        if str(folder.resolve()) not in sys.path:
            sys.path.append(str(folder.resolve()))


def _describe(base: type | tuple[type, ...]) -> str:
    bases = base if isinstance(base, tuple) else (base,)
    return " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)


def load_plugin(path: str, field: str, base: type | tuple[type, ...]) -> type:
    """Import `pkg.module:Name` and check that it is a subclass of `base` (or one of several bases)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PluginNotFound(field, f"cannot import '{module_name}' ({error})", "is the package installed?") from None
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


def constructor_parameters(cls: type) -> tuple[list[str], bool]:
    """The keyword parameters `cls(...)` takes, and whether it takes any keyword at all.

    A constructor with `**kwargs` is taken to forward them to its base class (the usual
    `super().__init__(**kwargs)` of a FedAvg subclass), so the bases' parameters count
    too; only a `**kwargs` that reaches `object` accepts anything.
    """
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return names, False
        params = inspect.signature(init).parameters
        names += [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return list(dict.fromkeys(names)), False
    return list(dict.fromkeys(names)), True


def check_parameters(cls: type, params: dict[str, Any], field: str) -> None:
    """Refuse parameters the class's constructor does not take, before anything runs."""
    known, accepts_any = constructor_parameters(cls)
    unknown = [name for name in params if name not in known]
    if unknown and not accepts_any:
        raise ScenarioError(
            f"{field}.{unknown[0]}",
            f"{cls.__name__} takes no parameter '{unknown[0]}'",
            f"accepted: {', '.join(known) or 'none'}",
        )


def installed_plugins(kind: Kind) -> dict[str, str]:
    """The kind's entry points for `fedtide list`: name -> target and package (or why unused)."""
    listed = {}
    built_ins = kind.built_in_names()
    for name, point in plugin_entry_points(kind.group).items():
        package = point.dist.name if point.dist else "unknown package"
        note = " [shadowed by the built-in name]" if name in built_ins else ""
        listed[name] = f"{point.value} (entry point of {package}){note}"
    return listed


def defined_at(function: Callable) -> str:
    """Where a function's def is: "file.py:12, in name" (as `fedtide.errors.raised_at` names a frame)."""
    code = inspect.unwrap(getattr(function, "__func__", function)).__code__
    return f"{Path(code.co_filename).name}:{code.co_firstlineno}, in {code.co_name}"


def check_hook_signatures(obj: object, base: type, hooks: Iterable[str], field: str) -> None:
    """Refuse a hook that `obj` defines whose def cannot take the arguments `base`'s hook is called with.

    Callers (fedtide's client and server, Avalanche's templates) pass a hook the positional
    parameters that `base`'s def requires (Avalanche's plugin hooks: the strategy). A def
    that cannot bind them fails in the caller's frame, whose traceback names fedtide's or
    Avalanche's file, so it is refused here naming the user's def.
    """
    for name in hooks:
        hook, expected = getattr(obj, name, None), getattr(base, name)
        if not inspect.ismethod(hook) or hook.__func__ is expected:
            continue
        params = list(inspect.signature(expected).parameters.values())[1:]
        passed = [p.name for p in params if p.kind in _POSITIONAL and p.default is p.empty]
        try:
            inspect.signature(hook).bind(*passed)
        except TypeError:
            where = defined_at(hook)
            wanted = ", ".join(["self", *(str(p.replace(annotation=p.empty)) for p in params)])
            raise SignatureError(
                field,
                f"{type(obj).__name__}.{name} ({where}) cannot take the arguments it is called with: "
                f"({', '.join(passed)})",
                f"define it as def {name}({wanted})",
                where,
            ) from None
