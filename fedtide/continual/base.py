"""The contract between a federated client and a continual-learning method (see docs/extending.md).

Avalanche consolidates in `after_training_exp`, which its templates call at the end
of every `train()`. A federated client calls `train()` once per *round*, many times
per experience, so a method separates the two parts of an Avalanche plugin:

- `plugins()`: the plugins active while a round trains (their per-minibatch hooks);
- `consolidate(learner)`: the end-of-experience step, which the client calls exactly
  once per past experience, at the global weights that ended it.

Clients are rebuilt on every call (Ray copies the Context), so everything a method
remembers goes through `save()`/`load()` into Flower's `Context.state`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate

from fedtide.data.stream import Dataset

if TYPE_CHECKING:
    from fedtide.privacy.dp_sgd import ClientPrivacy

Arrays = dict[str, np.ndarray]
Values = dict[str, Any]


class ContinualMethod(ABC):
    """What a federated client needs from a continual-learning method.

    Subclass it (or name an existing subclass) to add a method; `name` is how
    scenarios refer to it and `description` is what `fedtide list` shows.
    `dp_compatible` says the method may run under DP-SGD: every pass it makes over
    private data goes through `use_privacy`'s engine or is per-sample inside the
    DP-SGD step. It defaults to False, so a method must claim it explicitly.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    dp_compatible: ClassVar[bool] = False
    # Passes over one past experience's private data that `consolidate` makes (EWC's Fisher: 1).
    private_passes_per_consolidation: ClassVar[int] = 0

    @abstractmethod
    def plugins(self) -> list[SupervisedPlugin]:
        """Avalanche plugins active while a round trains."""

    @abstractmethod
    def consolidate(self, learner: SupervisedTemplate) -> None:
        """Absorb `learner.experience` at the model's current (global) weights."""

    def use_privacy(self, privacy: ClientPrivacy) -> None:  # noqa: B027 - optional hook
        """Called before a DP round: route every pass over private data through `privacy`."""

    def private_training_data(self) -> Dataset | None:
        """Extra samples to put inside the Poisson-sampled training set under DP (replay's buffer)."""
        return None

    def planned_private_extra(self, past_sizes: list[int]) -> int:
        """How many extra samples `private_training_data` will hold, given the past experiences' sizes."""
        return 0

    def save(self) -> tuple[Arrays, Values]:
        """State to keep in `Context.state` between rounds."""
        return {}, {}

    def load(  # noqa: B027 - optional hook: stateless methods keep nothing
        self, arrays: Arrays, values: Values, full_train: Dataset, model: torch.nn.Module
    ) -> None:
        """Restore what `save` returned; `full_train` resolves stored sample ids."""
