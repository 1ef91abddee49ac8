"""Avalanche plugins whose memory a federated client would lose between rounds, and one it keeps.

Each changes an attribute while a round trains (not at consolidation), as Dark Experience
Replay fills its buffer from the minibatches it sees.
"""

import torch
from avalanche.training.plugins import SupervisedPlugin


class ListBuffer(SupervisedPlugin):
    """Its own state_dict() leaves out the buffer, a list filled every iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer: list[torch.Tensor] = []
        self.consolidations = 0

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.buffer.append(strategy.mb_x[:1].detach().clone())

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.consolidations += 1

    def state_dict(self) -> dict:
        return {"consolidations": self.consolidations}

    def load_state_dict(self, state: dict) -> None:
        self.consolidations = state["consolidations"]


class _Reservoir:
    """A buffer in a plain Python object: no state codec can store it."""

    def __init__(self) -> None:
        self.items: list[int] = []


class ObjectBuffer(SupervisedPlugin):
    """Its attributes are its state; the buffer is a plain object."""

    def __init__(self) -> None:
        super().__init__()
        self.reservoir = _Reservoir()

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.reservoir.items.append(int(strategy.mb_y[0]))


class GeneratorDraws(SupervisedPlugin):
    """Draws from its own torch.Generator every iteration; its attributes are its state."""

    def __init__(self) -> None:
        super().__init__()
        self.rng = torch.Generator().manual_seed(7)
        self.draws: list[float] = []

    def before_training_iteration(self, strategy, **kwargs) -> None:
        self.draws.append(float(torch.rand(1, generator=self.rng)))


class GeneratorOutsideState(GeneratorDraws):
    """The same draws, with a state_dict() that keeps the draws but not the generator."""

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = state["draws"]


class DeclaredScratch(SupervisedPlugin):
    """Keeps the last minibatch's labels, which every iteration recomputes: declared, not state."""

    rebuilt_each_round = ("last_labels",)

    def __init__(self) -> None:
        super().__init__()
        self.last_labels = None

    def before_training_iteration(self, strategy, **kwargs) -> None:
        self.last_labels = strategy.mb_y.detach().clone()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class UndeclaredScratch(DeclaredScratch):
    """The same scratch, not declared: it looks like memory the next round loses."""

    rebuilt_each_round = ()
