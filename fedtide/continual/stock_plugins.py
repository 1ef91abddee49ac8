"""Stock Avalanche plugins that fit the federated loop, adapted where they assume one train() per experience.

Each is tested in tests/test_plugins.py to consolidate once per experience and keep
its state in `Context.state`. SI is DP-compatible: its path integral reads the weights
and `p.grad` after the optimizer step, which under DP-SGD is the clipped, noised
gradient, so it is post-processing and its penalty is parameter-only. MAS's importance
pass, RWalk's extra backward pass and (A-)GEM's memory gradients read private data
outside the DP-SGD step, so they are not. (A-)GEM memories are stored as sample ids,
like the replay buffer.

Not supported, and why (README and docs/extending.md say the same): LFL (needs an
Avalanche BaseModel with get_features() and freezes the live head, lost each round),
GDumb (retrains from the initial model at every experience: not a federated update).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from avalanche.models import avalanche_forward
from avalanche.training.plugins import (
    AGEMPlugin,
    GEMPlugin,
    MASPlugin,
    RWalkPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.utils import ParamData, copy_params_dict, zerolike_params_dict
from torch.utils.data import DataLoader

from fedtide.continual.base import StateDict
from fedtide.continual.plugin_adapter import PluginMethod, plugin_method
from fedtide.errors import ScenarioError


class GEM(GEMPlugin):
    """Avalanche's GEMPlugin that remembers which samples it keeps, refused without its QP solver."""

    rebuilt_each_round = ("G",)  # the reference gradients, recomputed every iteration

    def __init__(self, patterns_per_experience: int = 64, memory_strength: float = 0.5) -> None:
        import qpsolvers

        if "quadprog" not in qpsolvers.available_solvers:
            raise ScenarioError("continual.method", "gem needs the quadprog solver", "pip install quadprog")
        super().__init__(patterns_per_experience=patterns_per_experience, memory_strength=memory_strength)
        self.memory_ids: dict[int, np.ndarray] = {}

    def before_training_iteration(self, strategy, **kwargs) -> None:
        """Reference gradients of the experiences this client remembers.

        Avalanche takes every index below the current experience, which fails for a
        client that held no data (and so has no memory) in some past experience.
        """
        if not self.memory_x:
            return
        device = strategy.device
        references = []
        for t in sorted(self.memory_x):
            strategy.model.train()
            strategy.optimizer.zero_grad()
            out = avalanche_forward(strategy.model, self.memory_x[t].to(device), self.memory_tid[t])
            strategy._criterion(out, self.memory_y[t].to(device)).backward()
            references.append(
                torch.cat(
                    [
                        p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=device)
                        for p in strategy.model.parameters()
                    ]
                )
            )
        self.G = torch.stack(references)

    def after_backward(self, strategy, **kwargs) -> None:
        if self.memory_x:
            super().after_backward(strategy, **kwargs)

    @torch.no_grad()
    def update_memory(self, dataset, t, batch_size):
        """Draw the experience's patterns as a subset first, so their sample ids can be stored.

        The memory holds them in the order of their ids (Avalanche's loader shuffles them), so
        the memory a later round restores from the ids is this one, not a permutation of it.
        """
        if len(dataset) > self.patterns_per_experience:
            chosen = torch.randperm(len(dataset))[: self.patterns_per_experience].tolist()
            dataset = dataset.subset(chosen)
        self.memory_ids[t] = np.asarray(list(dataset.sample_id), dtype=np.int64)
        loader = DataLoader(dataset, batch_size=len(dataset), collate_fn=getattr(dataset, "collate_fn", None))
        batch = next(iter(loader))
        self.memory_x[t], self.memory_y[t], self.memory_tid[t] = batch[0], batch[1], batch[-1]


class GEMMethod(PluginMethod):
    """GEM whose memory is stored as sample ids (not raw samples) in `Context.state`."""

    plugin_class = GEM
    name = "gem"
    description = "gradient episodic memory: Avalanche GEMPlugin (patterns_per_experience, memory_strength)"
    dp_compatible = False

    def state_dict(self) -> StateDict:
        return {"memory_ids": dict(self.plugin.memory_ids)}

    def load_state_dict(self, state: StateDict) -> None:
        for t, ids in state["memory_ids"].items():
            subset = self.full_train.subset(ids.tolist())
            self.plugin.update_memory(subset, t, batch_size=len(subset))


class MAS(MASPlugin):
    """Avalanche's MASPlugin with defaults for every parameter, for clients that may have nothing consolidated.

    Avalanche raises "Importance is not available" in any experience after the first
    when nothing was consolidated, which is the case of a client that held no data in
    the experiences before: it trains without a penalty instead.
    """

    def __init__(self, lambda_reg: float = 1.0, alpha: float = 0.5) -> None:
        super().__init__(lambda_reg=lambda_reg, alpha=alpha)

    def before_backward(self, strategy, **kwargs) -> None:
        if self.importance:
            super().before_backward(strategy, **kwargs)

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.importance:
            super().after_training_exp(strategy, **kwargs)
            return
        # The first experience this client consolidates: Avalanche's own first step.
        self.params = dict(copy_params_dict(strategy.model))
        self.importance = self._get_importance(strategy)


class AGEM(AGEMPlugin):
    """Avalanche's AGEMPlugin with defaults for every parameter."""

    rebuilt_each_round = ("reference_gradients",)  # recomputed every iteration

    def __init__(self, patterns_per_experience: int = 64, sample_size: int = 64) -> None:
        super().__init__(patterns_per_experience=patterns_per_experience, sample_size=sample_size)


class AGEMMethod(PluginMethod):
    """A-GEM whose memory (a list of datasets) is stored as sample ids, like fedtide's replay buffer."""

    plugin_class = AGEM
    name = "agem"
    description = "averaged GEM: Avalanche AGEMPlugin (patterns_per_experience, sample_size), memory as sample ids"
    dp_compatible = False

    def state_dict(self) -> StateDict:
        return {"buffer_ids": [np.asarray(list(b.sample_id), dtype=np.int64) for b in self.plugin.buffers]}

    def load_state_dict(self, state: StateDict) -> None:
        for ids in state["buffer_ids"]:
            # update_memory appends the group and rebuilds A-GEM's balanced loader over all groups
            self.plugin.update_memory(self.full_train.subset(ids.tolist()))


class SI(SynapticIntelligencePlugin):
    """Avalanche's SynapticIntelligencePlugin with its path integral taken over a whole experience.

    Avalanche starts the integral and moves the anchor in `before_training_exp`, which
    runs at every `train()`, i.e. every round: importance would only see the last
    round, measured against the last round's global model. Here the integral starts
    when the client first trains and restarts after each consolidation, so it sums the
    client's local steps over all rounds of the experience, and the importance divides
    it by how far the global model moved over the experience (Zenke et al. 2017, eq. 5).

    It also keeps real copies of the weights it remembers: Avalanche 0.6 stores
    `param.detach().cpu().flatten()`, which on the CPU is a view of the live parameter,
    so the step's start weights and the anchor move with training and SI does nothing.
    """

    def __init__(self, si_lambda: float | Sequence[float] = 1000.0, eps: float = 1e-7) -> None:
        """`si_lambda` is large because Avalanche caps each importance at 0.001: at Avalanche's 1 the
        penalty does nothing. 1000 is where it lowers forgetting without stopping the learning of
        new experiences on the quickstart (docs/results.md, "SI's strength")."""
        super().__init__(si_lambda=si_lambda, eps=eps)

    def before_training_exp(self, strategy, **kwargs) -> None:
        SupervisedPlugin.before_training_exp(self, strategy, **kwargs)
        self._start_once(strategy.model)

    def before_training_iteration(self, strategy, **kwargs) -> None:
        super().before_training_iteration(strategy, **kwargs)
        _own_copies(self.syn_data["old_theta"])

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._start_once(strategy.model)  # a client consolidating an experience it never trained in
        super().after_training_exp(strategy, **kwargs)  # importance from the integral; anchor := these weights
        self._start_integral(strategy.model)

    def after_training(self, strategy, **kwargs) -> None:
        """Drop the per-step scratch, as the next round's restored plugin starts without it."""
        super().after_training(strategy, **kwargs)
        self._reset_step_scratch()

    def _reset_step_scratch(self) -> None:
        for key in ("old_theta", "new_theta", "grad"):
            self.syn_data[key] = {name: ParamData(name, p.shape) for name, p in self.ewc_data[0].items()}

    def _start_once(self, model: torch.nn.Module) -> None:
        fresh = not self.ewc_data[0]
        self.create_syn_data(model, self.ewc_data, self.syn_data, self.excluded_parameters)
        if fresh:
            self._start_integral(model)

    def _start_integral(self, model: torch.nn.Module) -> None:
        """Anchor at the current weights, integral at zero."""
        self.init_batch(model, self.ewc_data, self.syn_data, self.excluded_parameters)
        _own_copies(self.ewc_data[0])

    def state_dict(self) -> dict[str, Any]:
        """Anchor, importance and both integrals; the per-step scratch (old/new theta, grad) is rebuilt."""
        anchor, importance = self.ewc_data
        tables = {"anchor": anchor, "importance": importance} | {k: self.syn_data[k] for k in _SI_INTEGRALS}
        return {key: _tensors(table) for key, table in tables.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ewc_data = (_param_data(state["anchor"]), _param_data(state["importance"]))
        for key in _SI_INTEGRALS:
            self.syn_data[key] = _param_data(state[key])
        self._reset_step_scratch()


_SI_INTEGRALS = ("trajectory", "cum_trajectory")


class RWalk(RWalkPlugin):
    """Avalanche's RWalkPlugin with its path scores summed over every round of an experience.

    Avalanche zeroes the scores in `before_training`, i.e. every round, and closes a
    scoring window only every `delta_t` iterations of one `train()`: a client with a
    few minibatches a round would never score anything. Here a round keeps the scores of
    the rounds before it, and its last, partial window is closed when the round ends
    (the next round starts from the new global model, so a window never spans two
    rounds). Consolidation (`after_training_exp`) turns the scores into penalties and
    zeroes them, as in Avalanche. Not DP-compatible: it reads each minibatch's raw
    gradient in an extra backward pass.
    """

    # A round's start weights and loss window (before_training) and one step's gradient and weights.
    rebuilt_each_round = ("checkpoint_loss", "checkpoint_params", "iter_grad", "iter_params")

    def __init__(self, ewc_lambda: float = 0.1, ewc_alpha: float = 0.9, delta_t: int = 10) -> None:
        if not 0 <= ewc_alpha <= 1:
            raise ValueError(f"ewc_alpha must be in [0, 1], got {ewc_alpha}")
        if delta_t < 1:
            raise ValueError(f"delta_t must be at least 1, got {delta_t}")
        super().__init__(ewc_lambda=ewc_lambda, ewc_alpha=ewc_alpha, delta_t=delta_t)
        self._window_open = False

    def before_training(self, strategy, *args, **kwargs) -> None:
        if not self.checkpoint_scores:
            self.checkpoint_scores = zerolike_params_dict(strategy.model)
        self.checkpoint_loss = zerolike_params_dict(strategy.model)
        self.checkpoint_params = copy_params_dict(strategy.model)

    def before_backward(self, strategy, *args, **kwargs) -> None:
        if self.exp_penalties is not None:  # a client may train in experience 2 with nothing consolidated
            super().before_backward(strategy, *args, **kwargs)

    def after_training_iteration(self, strategy, *args, **kwargs) -> None:
        super().after_training_iteration(strategy, *args, **kwargs)
        self._window_open = not self._is_checkpoint_iter(strategy)

    def after_training(self, strategy, *args, **kwargs) -> None:
        if self._window_open:
            self._update_score(strategy)
            self._window_open = False

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        if self.iter_importance is not None:  # else the client never trained: nothing to turn into penalties
            super().after_training_exp(strategy, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """What outlives a round; the per-iteration and per-window scratch is rebuilt."""
        return {key: _tensors(getattr(self, key)) for key in _RWALK_KEPT}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in _RWALK_KEPT:
            setattr(self, key, _param_data(state[key]))


_RWALK_KEPT = ("checkpoint_scores", "iter_importance", "exp_scores", "exp_params", "exp_importance", "exp_penalties")


def _own_copies(table: dict[str, ParamData]) -> None:
    """Replace views of live parameters with copies of their current values."""
    for param in table.values():
        param.data = param.data.clone()


def _tensors(table: dict[str, ParamData] | None) -> dict[str, torch.Tensor] | None:
    """A table of Avalanche `ParamData` as plain tensors, the form `Context.state` stores."""
    return None if table is None else {name: param.data for name, param in table.items()}


def _param_data(table: dict[str, torch.Tensor] | None) -> dict[str, ParamData] | None:
    return None if table is None else {name: ParamData(name, init_tensor=tensor) for name, tensor in table.items()}


STOCK_PLUGINS: dict[str, type[PluginMethod]] = {
    "mas": plugin_method(MAS, "mas", "memory aware synapses: Avalanche MASPlugin (lambda_reg, alpha)"),
    "si": plugin_method(
        SI,
        "si",
        "synaptic intelligence: Avalanche SynapticIntelligencePlugin, path integral over each experience",
        dp_compatible=True,
    ),
    "rwalk": plugin_method(RWalk, "rwalk", "Riemannian walk: Avalanche RWalkPlugin, path scores over each experience"),
    "gem": GEMMethod,
    "agem": AGEMMethod,
}
