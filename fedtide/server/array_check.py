"""Checking a strategy's aggregated arrays against the model before they are used.

A user strategy that returns malformed arrays (a missing or extra key, a wrong shape,
NaN or inf) would otherwise fail deep inside `load_state_dict` or silently evaluate
garbage; this turns it into a `FederationError` naming the strategy class.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedtide.errors import FederationError


def array_problem(arrays: ArrayRecord, model: torch.nn.Module) -> str | None:
    """What is wrong with `arrays` as weights of `model`, or None when they fit."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        got = {k: a.numpy() for k, a in arrays.items()}
    except Exception as error:  # an Array that does not decode
        return f"arrays cannot be read ({type(error).__name__}: {error})"
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if missing or extra:
        return f"keys differ from the model's: missing {missing}, unexpected {extra}"
    for key, shape in expected.items():
        if tuple(got[key].shape) != shape:
            return f"'{key}' has shape {tuple(got[key].shape)}, the model's is {shape}"
        if not np.issubdtype(got[key].dtype, np.number) and got[key].dtype != np.bool_:
            return f"'{key}' has non-numeric dtype {got[key].dtype}"
        if np.issubdtype(got[key].dtype, np.floating) and not np.isfinite(got[key]).all():
            return f"'{key}' holds non-finite values (NaN or inf)"
    return None


def check_strategy_arrays(arrays: ArrayRecord, model: torch.nn.Module, strategy: object, server_round: int) -> None:
    """Raise `FederationError` naming the strategy's class when its arrays do not fit the model."""
    problem = array_problem(arrays, model)
    if problem:
        raise FederationError(
            f"strategy {strategy_name(strategy)} returned malformed arrays in round {server_round}: {problem}"
        )


def strategy_name(strategy: object) -> str:
    """The strategy's class as a user finds it in their code: `my_pkg.agg.TrimmedMomentum`."""
    return f"{type(strategy).__module__}.{type(strategy).__qualname__}"
