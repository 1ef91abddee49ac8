"""What Ray does with a node's Context around a call, for the callers that run clients in this process.

Flower's Ray backend hands each ClientApp call a copy of the node's Context (it is
serialised to the worker) and stores the copy back only once the call has returned. A
client that raised leaves the stored Context as it was; one that returned has its
changes kept, and nothing it holds on to afterwards reaches the next call. The
in-process grid and the scheduled clients of the tests and `check-plugin` emulate this
in one place, so that a method whose state survives them survives the round trip
through Ray.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

Stored = TypeVar("Stored")
Result = TypeVar("Result")


def call_on_a_copy(stored: Stored, call: Callable[[Stored], Result]) -> tuple[Result, Stored]:
    """`call` on a deep copy of `stored`: (its result, the copy to store in place of `stored`).

    When `call` raises, the exception propagates and the caller keeps `stored` unchanged.
    """
    working = copy.deepcopy(stored)
    return call(working), working
