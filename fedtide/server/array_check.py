"""Checking arrays against the model's before they are used.

A client or a user strategy that hands back malformed arrays (a missing or extra
key, a wrong shape, NaN or inf) would otherwise fail deep inside `load_state_dict`
or silently evaluate garbage; the caller turns the problem into a message naming
whoever produced them.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord


def array_problem(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """What is wrong with `arrays` as weights shaped like `reference` (the model's), or None when they fit."""
    expected = {key: tuple(array.shape) for key, array in reference.items()}
    try:
        got = {key: array.numpy() for key, array in arrays.items()}
    except Exception as error:  # an Array that does not decode
        return f"arrays cannot be read ({type(error).__name__}: {error})"
    missing = [key for key in expected if key not in got]
    extra = [key for key in got if key not in expected]
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
