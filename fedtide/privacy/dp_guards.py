"""The rule that keeps a DP-SGD round's uses of private data accounted: the model computes on the DP batch
only, and each `p.grad` at the step is what backward left.

`fedtide.privacy.dp_sgd` carries a loss's parameter-only terms past Opacus's clipping;
that route trusts that the remainder reads parameters only. A plugin may claim
`dp_compatible` and still compute on other data (Dark Experience Replay's forward on
stored inputs, A-GEM's gradient on stored samples): its remainder would be carried
unclipped, unnoised and uncharged. These guards stop the round at the first step that
breaks the rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtide.errors import RoundFailed


class UnaccountedData(RoundFailed):
    """A method that claims `dp_compatible` computed on data outside the DP batch while a round trained,
    or changed `p.grad` after backward (`DPBatchOnly`, `BackwardOnly`)."""


class DPBatchOnly:
    """While a DP-SGD round trains, the model computes on the DP batch only; anything else stops the round.

    Why this rule: the gradient Opacus clips and noises is the per-sample gradient of what
    the model computed on the Poisson-sampled batch; whatever else reaches `p.grad` is
    carried as a parameter-only penalty (`before_update`), unclipped, unnoised and
    uncharged. A term that depends on other data reaches the update only through the
    model computing on that data. Its forward with grad puts that data's gradient in the
    remainder (DER's loss on stored inputs, A-GEM's reference gradient); its forward
    without grad still lets that data shape every sample's gradient, by more than one
    sample's clipped share (outputs on stored inputs used as targets). Neither is
    accounted, so any forward of the model, or of one of its modules on its own, on an
    input other than `strategy.mb_x`, from the DP set-up to the end of the round, is
    refused at once: on the first step that makes one. Parameter-only penalties (FedProx,
    EWC, SI) run no forward and pass; LwF's teacher is another module, run on the DP batch
    itself; a second forward on `mb_x` (with or without grad) is per-sample and passes.
    A term computed from parameters and stored tensors without calling the model is not
    seen: the remainder route trusts such tensors to be public or already privatised
    (EWC's importances are).
    """

    def __init__(self, strategy, method_name: str) -> None:
        self.strategy = strategy
        self.method_name = method_name
        self.active = True
        self.inside = 0  # depth of the model's forwards on the DP batch now running
        model = strategy.model
        self.handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._leave, always_call=True),
            *(module.register_forward_pre_hook(self._part) for module in model.modules() if module is not model),
        ]

    def remove(self) -> None:
        """Off for good: copies of the model made during the round keep these hooks, now inert."""
        self.active = False
        for handle in self.handles:
            handle.remove()

    def __deepcopy__(self, memo: dict) -> DPBatchOnly:
        """A copy of the model made while the round trains (a teacher) shares the rule, not a copy of
        the learner: its forwards on the DP batch pass, on anything else they are refused."""
        return self

    def _enter(self, model: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        """Count first: `_leave` runs after every call, even one refused here or raising in the forward."""
        self.inside += 1
        batch = self.strategy.mbatch[0] if self.strategy.mbatch is not None else None
        if self.active and self.inside == 1 and (batch is None or not inputs or inputs[0] is not batch):
            self._refuse("ran the model on inputs other than the DP batch")

    def _leave(self, model: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.inside -= 1

    def _part(self, module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        if self.active and self.inside == 0:
            self._refuse(f"ran the model's {type(module).__name__} on its own, outside its forward on the DP batch")

    def _refuse(self, what: str) -> None:
        raise refusal(self.method_name, what)


class BackwardOnly:
    """At the step, each `p.grad` must be the tensor backward left, unchanged since.

    Why: the remainder carried past clipping (`_DPSGDPlugin.before_update`) is meant to be
    autograd's gradient of the loss's parameter-only terms. A gradient written into `p.grad`
    after backward (A-GEM's projection, a reference gradient computed on stored samples or
    on a copy of the model) is no gradient of the loss, needs no forward of the model (so
    `DPBatchOnly` cannot see it) and would be carried unclipped; in ghost clipping, where
    `p.grad` is the clipped sum, it would be added unclipped. A tensor's version counter
    moves with every in-place change, so an edit is seen without copying any gradient.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], method_name: str) -> None:
        self.method_name = method_name
        self.params = list(params)
        self.left: dict[torch.nn.Parameter, tuple[torch.Tensor, int]] = {}  # since the last check
        self.handles = [param.register_post_accumulate_grad_hook(self._record) for param in self.params]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _record(self, param: torch.nn.Parameter) -> None:
        self.left[param] = (param.grad, param.grad._version)

    def check(self) -> None:
        """Refuse a `p.grad` that backward did not leave, or that changed since; then forget this step."""
        left, self.left = self.left, {}
        for param in self.params:
            grad, version = left.get(param, (None, 0))
            if param.grad is not None and (param.grad is not grad or grad._version != version):
                raise refusal(
                    self.method_name,
                    "changed p.grad after backward (a parameter-only term belongs in the loss)",
                )


def refusal(method_name: str, what: str) -> UnaccountedData:
    return UnaccountedData(
        f"continual method '{method_name}' claims dp_compatible but, while DP-SGD trained, {what}: "
        "a data-dependent term that Opacus never clips, noises or charges (put those samples in the DP batch, "
        "e.g. through private_training_data(), or set dp_compatible = False)"
    )
