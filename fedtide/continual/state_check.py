"""Nothing a continual method remembers is lost silently between rounds.

A client rebuilds its method on every call and restores it from what `state_dict()`
stored, so anything else the live method held at the end of a round is gone by the next.
The rule, checked after every round (`refuse_lost_state`):

- the method's own attributes are the instance attributes of `method.state_holder()`
  (an adapted Avalanche plugin's plugin, otherwise the method itself), fingerprinted
  deeply (`fingerprint`);
- they are fingerprinted right after the method was restored (constructed, bound,
  `load_state_dict`, `plugins()`: the state a round starts from) and again after the
  round (consolidation and training);
- an attribute that is new or changed is then compared with the same attribute of a
  method rebuilt the way the next round will rebuild it, from what was just stored
  (a `cached_property` the round built is built on it too): if they differ, the change
  is lost and the round fails naming the attribute.

What the client rebuilds itself is never compared: the bound model and dataset, the
learner and its optimizer. Scratch a round recomputes before reading it (a per-step
gradient, a round's penalty terms) is declared by the class that owns it in
`rebuilt_each_round`, a tuple of attribute names, and skipped wherever an instance of
that class is found.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Collection
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtide.continual.state_codec import Tensorish, as_array, is_plain, is_storable
from fedtide.errors import ContractBroken

if TYPE_CHECKING:
    from fedtide.continual.base import ContinualMethod

REBUILT = "rebuilt by the client"


class LostState(ContractBroken):
    """A method attribute changed during a round that the next round would not get back: the run stops."""


def rebuilt_each_round(holder: Any) -> tuple[str, ...]:
    """The attributes `holder`'s class declares as per-round scratch (not state)."""
    return tuple(getattr(type(holder), "rebuilt_each_round", ()))


def state_fingerprints(method: ContinualMethod) -> dict[str, str]:
    """A fingerprint of each of the method's own attributes (the module docstring's rule)."""
    holder = method.state_holder()
    rebuilt = {id(getattr(method, "model", None)), id(getattr(method, "full_train", None))}
    skipped = rebuilt_each_round(holder)
    return {
        attr: fingerprint(value, rebuilt) for attr, value in vars(holder).items() if attr not in skipped
    }


def refuse_lost_state(
    name: str, method: ContinualMethod, start: dict[str, str], rebuild: Callable[[], ContinualMethod]
) -> None:
    """Raise `LostState` when an attribute changed during the round and `rebuild()` does not restore it.

    `start` holds the fingerprints taken when the round started; `rebuild` makes the
    method the next round would make from the stored state (called only if something changed).
    """
    end = state_fingerprints(method)
    changed = sorted(attr for attr in end.keys() | start.keys() if end.get(attr) != start.get(attr))
    if not changed:
        return
    again = state_fingerprints(_with_cached(rebuild(), changed))
    lost = [attr for attr in changed if again.get(attr) != end.get(attr)]
    if lost:
        raise LostState(f"continual method '{name}' would lose state: {_lost_message(method, lost)}")


def _with_cached(method: ContinualMethod, attributes: list[str]) -> ContinualMethod:
    """`method` with those of `attributes` that are cached properties of its holder built, as the round built them."""
    holder = method.state_holder()
    for attr in attributes:
        if attr not in vars(holder) and isinstance(inspect.getattr_static(type(holder), attr, None), cached_property):
            getattr(holder, attr)
    return method


def _lost_message(method: ContinualMethod, lost: list[str]) -> str:
    holder = method.state_holder()
    owner = type(holder).__name__
    values = vars(holder)
    unstorable = [a for a in lost if method.attributes_are_state() and a in values and not is_storable(values[a])]
    if unstorable:
        kinds = ", ".join(f"{owner}.{a} (a {type(values[a]).__name__})" for a in unstorable)
        return (
            f"{kinds} changed during the round but Context.state cannot hold it, so the next round would lose it: "
            "keep it as tensors, numpy arrays or JSON values, or define state_dict()/load_state_dict() "
            "(docs/extending.md)"
        )
    names = ", ".join(f"{owner}.{a}" for a in lost)
    return (
        f"{names} changed during the round but is not restored from state_dict(), so the next round would lose "
        "it: return it from state_dict() and set it back in load_state_dict(), or name it in "
        "rebuilt_each_round if every round recomputes it before use (docs/extending.md)"
    )


def fingerprint(value: Any, rebuilt: Collection[int] = ()) -> str:
    """A digest of `value`'s whole content, to tell whether it changed; objects in `rebuilt` (by id) are skipped."""
    summary = _summary(value, set(rebuilt), set())
    return hashlib.sha1(json.dumps(summary, default=str).encode()).hexdigest()[:16]


def _summary(value: Any, rebuilt: set[int], path: set[int]) -> Any:
    """A JSON-able summary of `value`: arrays by their bytes, objects by their attributes, cycles cut."""
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.training.templates import BaseTemplate

    if id(value) in rebuilt or isinstance(value, BaseTemplate | torch.optim.Optimizer):
        return REBUILT
    if isinstance(value, Tensorish):
        array = np.ascontiguousarray(as_array(value))
        return ["array", str(array.dtype), list(array.shape), hashlib.sha1(array.tobytes()).hexdigest()]
    if isinstance(value, torch.Generator):
        return ["generator", str(value.device), hashlib.sha1(value.get_state().numpy().tobytes()).hexdigest()]
    if is_plain(value):
        return value
    if id(value) in path:
        return "cycle"
    inner = path | {id(value)}
    if isinstance(value, torch.nn.Module):
        return ["module", _summary(dict(value.state_dict()), rebuilt, inner)]
    if isinstance(value, dict):
        return ["dict", [[str(k), _summary(v, rebuilt, inner)] for k, v in value.items()]]
    if isinstance(value, list | tuple):
        return ["seq", [_summary(v, rebuilt, inner) for v in value]]
    if isinstance(value, set | frozenset):
        return ["set", sorted(json.dumps(_summary(v, rebuilt, inner), default=str) for v in value)]
    if isinstance(value, torch.utils.data.Dataset | AvalancheDataset):
        return _dataset_summary(value)
    if hasattr(value, "__next__") or inspect.isroutine(value) or isinstance(value, torch.utils.data.DataLoader):
        return type(value).__name__  # iterators, loaders, functions: no comparable content
    if hasattr(value, "__dict__"):
        skipped = rebuilt_each_round(value)
        attributes = {k: v for k, v in vars(value).items() if k not in skipped}
        return [type(value).__name__, _summary(attributes, rebuilt, inner)]
    return type(value).__name__


def _dataset_summary(dataset: Any) -> list[Any]:
    """A dataset by its samples' ids (fedtide's datasets carry them), else by its size."""
    try:
        ids = [int(i) for i in dataset.sample_id]
    except (AttributeError, TypeError, ValueError):
        return ["dataset", type(dataset).__name__, len(dataset) if hasattr(dataset, "__len__") else None]
    return ["dataset", hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()]
