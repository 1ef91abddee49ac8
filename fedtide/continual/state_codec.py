"""The one adapter between a method's `state_dict()` and the Flower records `Context.state` can hold.

`Context.state` holds records only (arrays, configs), and Ray copies the whole Context
on every call, so a method's state — tensors, numpy arrays, Avalanche `ParamData`,
`nn.Module`s, `torch.Generator`s (as their `get_state()`), JSON values, nested in dicts
and lists — is split here into one
`ArrayRecord` of arrays and one `ConfigRecord` holding the JSON layout that puts them
back. Every method, built-in, stock or a user's, is stored this way.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch
from avalanche.training.utils import ParamData
from flwr.app import Array, ArrayRecord, ConfigRecord

StateDict = dict[str, Any]
Tensorish = (torch.Tensor, np.ndarray, ParamData)
LAYOUT_KEY = "layout"


class UnstorableState(TypeError):
    """A value in a state dict that no record can hold (a dataset, a loader, an iterator...)."""


def is_plain(value: Any) -> bool:
    """Whether JSON keeps `value` exactly (tuples and int dict keys would come back changed)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def is_storable(value: Any) -> bool:
    try:
        _encode(value, {}, "")
    except UnstorableState:
        return False
    return True


def encode(state: StateDict) -> tuple[ArrayRecord, ConfigRecord]:
    """`state` as (arrays, layout) records; raises `UnstorableState` naming the first bad entry."""
    arrays: dict[str, np.ndarray] = {}
    layout = _encode(state, arrays, "state")
    record = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})
    return record, ConfigRecord({LAYOUT_KEY: json.dumps(layout)})


def decode(arrays: ArrayRecord, layout: ConfigRecord, model: torch.nn.Module) -> StateDict:
    """What `encode` stored; tensors on the CPU, modules as frozen eval-mode copies of `model`."""
    stored = {key: array.numpy() for key, array in arrays.items()}
    return _decode(json.loads(str(layout[LAYOUT_KEY])), stored, model)


def _encode(value: Any, arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    if isinstance(value, Tensorish):
        key = str(len(arrays))
        arrays[key] = as_array(value)
        entry: dict[str, Any] = {"array": key, "kind": _kind(value)}
        if isinstance(value, ParamData):
            entry["name"] = value.name
        return entry
    if isinstance(value, torch.nn.Module):
        return {"module": _encode(dict(value.state_dict()), arrays, where)}
    if isinstance(value, torch.Generator):  # torch's own get_state/set_state: the draws continue where they were
        key = str(len(arrays))
        arrays[key] = value.get_state().numpy()
        return {"generator": key, "device": str(value.device)}
    if is_plain(value):
        return {"plain": value}
    if isinstance(value, dict) and all(isinstance(k, str | int) for k in value):
        return {"dict": [[k, _encode(v, arrays, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {"list": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    raise UnstorableState(f"{where} is a {type(value).__name__}, which Context.state cannot hold")


def _decode(entry: dict[str, Any], arrays: dict[str, np.ndarray], model: torch.nn.Module) -> Any:
    if "array" in entry:
        array = arrays[entry["array"]].copy()
        if entry["kind"] == "ndarray":
            return array
        tensor = torch.from_numpy(array)
        return ParamData(entry["name"], init_tensor=tensor) if entry["kind"] == "param" else tensor
    if "generator" in entry:
        generator = torch.Generator(device=entry["device"])
        generator.set_state(torch.from_numpy(arrays[entry["generator"]].copy()))
        return generator
    if "module" in entry:
        module = copy.deepcopy(model)
        module.load_state_dict(_decode(entry["module"], arrays, model))
        for param in module.parameters():
            param.requires_grad = False
        return module.eval()
    if "plain" in entry:
        return entry["plain"]
    if "dict" in entry:
        return {key: _decode(item, arrays, model) for key, item in entry["dict"]}
    return [_decode(item, arrays, model) for item in entry["list"]]


def as_array(value: torch.Tensor | np.ndarray | ParamData) -> np.ndarray:
    if isinstance(value, ParamData):
        value = value.data
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _kind(value: Any) -> str:
    return "param" if isinstance(value, ParamData) else "tensor" if isinstance(value, torch.Tensor) else "ndarray"
