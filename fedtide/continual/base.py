"""The contract between a federated client and a continual-learning method (see docs/extending.md).

Avalanche consolidates in `after_training_exp`, which its templates call at the end
of every `train()`. A federated client calls `train()` once per *round*, many times
per experience, so a method separates the two parts of an Avalanche plugin:

- `plugins()`: the plugins active while a round trains (their per-minibatch hooks);
- `consolidate(learner)`: the end-of-experience step, which the client calls exactly
  once per past experience, at the global weights that ended it.

Clients are rebuilt on every call (Ray copies the Context), so everything a method
remembers goes through `state_dict()` / `load_state_dict()` — PyTorch's convention,
and Opacus's accountants' — into Flower's `Context.state` (`fedtide.client.state`);
after every round the client checks that nothing else the method changed would be lost
(`fedtide.continual.state_check`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from fedtide.errors import ScenarioError
from fedtide.privacy.footprint import PrivateFootprint

if TYPE_CHECKING:  # a method's types; naming a method (validation) loads none of Avalanche, torch or Opacus
    import torch
    from avalanche.training.plugins import SupervisedPlugin
    from avalanche.training.templates import SupervisedTemplate

    from fedtide.data.stream import Dataset
    from fedtide.privacy.dp_sgd import ClientPrivacy

StateDict = dict[str, Any]
# How a metric of `metrics()` combines over a round's clients: `mean` weighs each client by its
# examples (equally under client-level DP, as the model's aggregate does); `last` is the value of
# the replying client with the highest partition id, the same wherever clients ran.
METRIC_AGGREGATIONS = ("mean", "sum", "max", "min", "last")


class ContinualMethod(ABC):
    """What a federated client needs from a continual-learning method.

    Subclass it (or name an existing subclass) to add a method; `name` is how
    scenarios refer to it and `description` is what `fedtide list` shows.
    `dp_compatible` says the method may run under DP-SGD: every pass it makes over
    private data goes through `use_privacy`'s engine or is per-sample inside the
    DP-SGD step. It defaults to False, so a method must claim it explicitly, and the
    claim is checked: a round whose model computes on anything but the DP batch, or whose
    `p.grad` changes after backward, stops (`fedtide.privacy.dp_guards.UnaccountedData`).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    dp_compatible: ClassVar[bool] = False
    # Whether the method may add its own term to the training loss (a penalty, a distillation
    # loss). Opacus's ghost clipping clips the data loss alone, so it is refused for one that does;
    # True unless a method says otherwise, since a term it adds silently would be scaled as data.
    adds_loss_term: ClassVar[bool] = True
    # Attributes every round recomputes before reading them: scratch, not memory (never checked).
    rebuilt_each_round: ClassVar[tuple[str, ...]] = ()
    # How each metric of `metrics()` aggregates over a round's clients (`METRIC_AGGREGATIONS`),
    # by name: {"buffer_size": "sum"}. A metric not named is a mean weighted by examples.
    metric_aggregation: ClassVar[dict[str, str]] = {}

    # Set by `bind` before `load_state_dict`: what stored state refers to.
    model: torch.nn.Module
    full_train: Dataset

    @abstractmethod
    def plugins(self) -> list[SupervisedPlugin]:
        """Avalanche plugins active while a round trains."""

    @abstractmethod
    def consolidate(self, learner: SupervisedTemplate) -> None:
        """Absorb `learner.experience` at the model's current weights (those that ended it)."""

    def bind(self, model: torch.nn.Module, full_train: Dataset) -> None:
        """The client's model (holding the received global weights) and the dataset sample ids index.

        Called once per client call, before `load_state_dict`, so stored sample ids can be
        resolved (`self.full_train.subset(ids)`) and stored weights loaded into a model.
        """
        self.model = model
        self.full_train = full_train

    def state_dict(self) -> StateDict:
        """What to keep in `Context.state` between rounds: tensors, numpy arrays, modules,
        Avalanche `ParamData`, `torch.Generator`s, JSON values, and dicts or lists of those."""
        return {}

    def load_state_dict(self, state: StateDict) -> None:  # noqa: B027 - stateless methods keep nothing
        """Restore what `state_dict` returned (tensors on the CPU; modules as frozen copies of the model)."""

    def state_holder(self) -> Any:
        """The object whose instance attributes are this method's memory (`fedtide.continual.state_check`).

        After every round the client checks that none of them changed without `state_dict()`
        carrying the change to the next round; name per-round scratch in `rebuilt_each_round`.
        """
        return self

    def attributes_are_state(self) -> bool:
        """Whether `state_dict()` is the holder's storable attributes themselves (an adapted plugin's default)."""
        return False

    def check_dp(self) -> None:  # noqa: B027 - optional hook
        """Raise `ScenarioError` for parameters this method cannot run with under DP-SGD (before any run)."""

    def use_privacy(self, privacy: ClientPrivacy) -> None:  # noqa: B027 - optional hook
        """Called before a DP round, after `bind` and before `load_state_dict`: route every pass
        over private data through `privacy` (its seeded per-sample coins and planned sizes included)."""

    def private_training_data(self) -> Dataset | None:
        """Extra samples to put inside the Poisson-sampled training set under DP (replay's buffer)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Numbers of the round just trained (e.g. a distillation loss): they go to metrics.jsonl
        per client, and the server aggregates them per round as `metric_aggregation` says."""
        return {}

    def private_footprint(self) -> PrivateFootprint:
        """The DP passes this method adds beyond training, for noise calibration and the budget."""
        return PrivateFootprint()


def check_metric_aggregation(method: type[ContinualMethod], field: str) -> None:
    """Refuse, before anything runs, an aggregation the server could not apply to a metric."""
    declared = method.metric_aggregation
    owner = getattr(method, "plugin_class", method).__name__  # the user's class, an adapted plugin's too
    if not isinstance(declared, dict):
        raise ScenarioError(
            field,
            f"{owner}.metric_aggregation is a {type(declared).__name__}",
            'give a dict: {"metric": "sum"}',
        )
    for metric, how in declared.items():
        if how not in METRIC_AGGREGATIONS:
            raise ScenarioError(
                field,
                f"{owner}.metric_aggregation gives metric '{metric}' the aggregation {how!r}",
                f"use one of: {', '.join(METRIC_AGGREGATIONS)}",
            )
