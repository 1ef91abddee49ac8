"""DP-SGD for one client's round with Opacus, fitted into Avalanche's training loop.

Four things here are easy to get wrong, and are the reason this module exists:

- The accountant is resumed from the client's history, so ε accumulates over the run.
- Parameter-only penalties (FedProx's proximal term, EWC's penalty) have no per-sample
  gradient, so Opacus's DPOptimizer, which rebuilds `p.grad` from clipped per-sample
  gradients plus noise, drops them (opacus issues 249, 259). They are recovered as
  `p.grad - mean_i grad_sample_i` before the step and added back after clip+noise.
  They depend on parameters and on already-privatised quantities only, so adding them
  costs no privacy.
- Every other pass over private data is DP too: replay samples sit inside the
  Poisson-sampled dataset, and EWC's Fisher is estimated from clipped, noised
  gradients whose steps are charged to the same accountant.
- That route trusts that the remainder reads parameters only. A plugin may claim
  `dp_compatible` and still compute on other data (Dark Experience Replay's forward on
  stored inputs, A-GEM's gradient on stored samples): its remainder would be carried
  unclipped, unnoised and uncharged. So while a round trains, the model may compute on
  the DP batch only (`DPBatchOnly`), and `p.grad` at the step must be what backward left
  (`BackwardOnly`); the first step that breaks either stops the round.
- Opacus's ghost clipping (`privacy.grad_sample_mode: ghost`) forms no per-sample
  gradients, so there is no remainder to recover: it clips the whole loss per sample,
  and a term added to the loss would be scaled by the samples' clipping factors, not
  added. Only the data loss may reach it: methods and strategies that add terms are
  refused before training (`check_grad_sample_mode`), and a plugin that adds one anyway
  stops the round at its first backward pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.utils import ParamData
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from torch.utils.data import DataLoader, Sampler

from fedtide.data.stream import Dataset
from fedtide.errors import ScenarioError
from fedtide.privacy.accounting import MODE_FIELD
from fedtide.privacy.coins import SampleCoins
from fedtide.privacy.dp_guards import BackwardOnly, DPBatchOnly
from fedtide.privacy.history import History
from fedtide.scenario.schema import PrivacyConfig


class PrivateTraining(NamedTuple):
    """What Opacus's make_private hands a client: the DP optimizer, the Poisson loader and,
    for ghost clipping, the loss whose backward clips (None in the per-sample modes)."""

    optimizer: DPOptimizer
    loader: DataLoader
    criterion: DPLossFastGradientClipping | None


class ClientPrivacy:
    """One client's DP-SGD for one round: an Opacus engine resuming the client's account.

    `planned_sizes` are the client's experience sizes its DP passes are planned from
    (`fedtide.privacy.accounting.planned_steps`), and `coins` its seeded per-sample coins:
    what a method needs to subsample private data by fixed, public rates (replay's buffer).
    """

    def __init__(
        self,
        config: PrivacyConfig,
        noise_multiplier: float,
        history: History,
        coins: SampleCoins | None = None,
        planned_sizes: Sequence[int] = (),
    ) -> None:
        self.config = config
        self.noise_multiplier = noise_multiplier
        self.engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_rng)
        self.engine.accountant.history = [tuple(entry) for entry in history]
        self.coins = coins or SampleCoins(0, 0)
        self.planned_sizes = tuple(planned_sizes)

    @property
    def history(self) -> History:
        return [(float(s), float(q), int(n)) for s, q, n in self.engine.accountant.history]

    def training_plugin(
        self,
        extra_samples: Callable[[], Dataset | None],
        planned_samples: int | None = None,
        method_name: str = "the continual method",
    ) -> SupervisedPlugin:
        """The plugin that privatises the learner's round.

        `extra_samples` is asked when the round starts (after consolidation has filled
        it): samples that join the Poisson-sampled set, e.g. a replay buffer.
        `planned_samples` is the training set's planned size, which the round's sample
        rate and steps are derived from (see `make_private`). `method_name` is what a
        refusal of the method's DP claim names (`UnaccountedData`).
        """
        return _DPSGDPlugin(self, extra_samples, planned_samples, method_name)

    def make_private(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset,
        batch_size: int,
        criterion,
        planned_samples: int | None = None,
    ) -> PrivateTraining:
        """Opacus's make_private with Poisson sampling over `dataset`, in the scenario's grad sample mode.

        The hooks go on `model` itself (`wrap_model=False`), so it keeps its own parameter
        names, which the client's state and EWC look parameters up by.

        Opacus derives the sample rate q = 1/ceil(n/B) and the steps per epoch from the
        dataset's size n. With `planned_samples` they come from the planned size instead
        (and so does the mean's denominator, q times it): a replay buffer kept by coins has
        a random size, and the accountant must charge what `planned_steps` planned, with
        parameters that do not depend on which samples the coins kept. Every sample of
        `dataset` is still drawn with probability q at every step.
        """
        planned = len(dataset) if planned_samples is None else planned_samples
        loader = DataLoader(dataset, batch_size=batch_size)
        if planned != len(dataset):
            loader = DataLoader(dataset, batch_size=batch_size, sampler=_PlannedLength(planned))
        made = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=self.config.grad_sample_mode,
            wrap_model=False,
        )
        if self.config.grad_sample_mode == "ghost":
            _, dp_optimizer, dp_criterion, loader = made
        else:
            (_, dp_optimizer, loader), dp_criterion = made, None
        if planned != len(dataset):
            dp_optimizer.expected_batch_size = int(planned * loader.sample_rate)
        return PrivateTraining(dp_optimizer, loader, dp_criterion)

    def fisher_importances(self, model, criterion, dataset, batch_size: int, device) -> dict[str, ParamData]:
        """EWC importances from one DP pass: the mean squared privatised batch gradient.

        It mirrors Avalanche's `EWCPlugin.compute_importances` (squared minibatch
        gradients, averaged over batches) with each gradient clipped and noised; the
        pass's steps are charged to this client's accountant. Only EWC makes this pass, and
        it never runs with ghost clipping (`check_grad_sample_mode`).
        """
        probe = copy.deepcopy(model).to(device).train()  # Opacus requires training mode; no dropout here
        optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
        dp_optimizer, loader, _ = self.make_private(probe, optimizer, dataset, batch_size, criterion)
        names = [name for name, _ in model.named_parameters()]
        totals = [torch.zeros_like(p) for p in probe.parameters()]
        batches = 0
        for x, y, *_ in loader:
            if len(x) == 0:
                continue
            dp_optimizer.zero_grad()
            criterion(probe(x.to(device)), y.to(device)).backward()
            dp_optimizer.pre_step()
            for total, param in zip(totals, probe.parameters()):
                total += param.grad.detach() ** 2
            batches += 1
        return {
            name: ParamData(name, init_tensor=(total / max(batches, 1)).cpu()) for name, total in zip(names, totals)
        }


class _DPSGDPlugin(SupervisedPlugin):
    """Makes an Avalanche learner's round DP-SGD; runs after the learner built its optimizer."""

    def __init__(
        self,
        privacy: ClientPrivacy,
        extra_samples: Callable[[], Dataset | None],
        planned_samples: int | None,
        method_name: str,
    ) -> None:
        super().__init__()
        self.privacy = privacy
        self.extra_samples = extra_samples
        self.planned_samples = planned_samples
        self.method_name = method_name
        self.parameter_only: list[torch.Tensor] = []
        self.ghost_loss: DPLossFastGradientClipping | None = None
        self.dp_batch_only: DPBatchOnly | None = None
        self.backward_only: BackwardOnly | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        dataset = strategy.adapted_dataset
        extra = self.extra_samples()
        if extra is not None:
            dataset = dataset.concat(extra)
        optimizer, loader, self.ghost_loss = self.privacy.make_private(
            strategy.model,
            strategy.optimizer,
            dataset,
            strategy.train_mb_size,
            strategy._criterion,
            self.planned_samples,
        )
        if self.ghost_loss is not None:
            strategy._criterion = self.ghost_loss
        accountant_hook = optimizer.step_hook

        def after_noise(dp_optimizer) -> None:
            accountant_hook(dp_optimizer)
            for param, extra in zip(dp_optimizer.params, self.parameter_only):
                param.grad += extra

        optimizer.step_hook = after_noise
        strategy.optimizer = optimizer
        strategy.dataloader = loader
        self.dp_batch_only = DPBatchOnly(strategy, self.method_name)
        self.backward_only = BackwardOnly(optimizer.params, self.method_name)

    def after_training_exp(self, strategy, **kwargs) -> None:
        """The round has trained: the model may compute on anything again (evaluation, consolidation)."""
        for rule in (self.dp_batch_only, self.backward_only):
            if rule is not None:
                rule.remove()
        self.dp_batch_only = self.backward_only = None

    def before_backward(self, strategy, **kwargs) -> None:
        """Ghost clipping: refuse a loss that is more than the data loss, then let Avalanche run its passes."""
        if self.ghost_loss is None:
            return
        loss = strategy.loss
        with torch.no_grad():
            data_loss = self.ghost_loss(strategy.mb_output, strategy.mb_y).loss_per_sample
        if not (
            isinstance(loss, DPTensorFastGradientClipping) and torch.equal(loss.loss_per_sample.detach(), data_loss)
        ):
            raise ScenarioError(
                MODE_FIELD,
                "ghost clipping clips the data loss alone, and a plugin added a term to the loss",
                "use grad_sample_mode: hooks",
            )
        strategy.loss = _TwoPassBackward(loss)

    def after_backward(self, strategy, **kwargs) -> None:
        """Ghost clipping: the minibatch's mean loss again, for Avalanche's loss metric (0 for an
        empty Poisson batch, whose mean Opacus computes as NaN; see `CrossEntropy`)."""
        if self.ghost_loss is not None:
            loss = strategy.loss.loss
            strategy.loss = loss.detach() if len(loss.loss_per_sample) else torch.zeros(())

    def before_update(self, strategy, **kwargs) -> None:
        """Keep the gradient that autograd put in p.grad beyond the per-sample gradients.

        Ghost clipping has none: its p.grad is the clipped sum alone (`before_backward`).
        Either way p.grad must be backward's own (`BackwardOnly`).
        """
        self.parameter_only = []
        self.backward_only.check()
        if self.ghost_loss is not None:
            return
        for param in strategy.optimizer.params:
            per_sample = param.grad_sample
            mean = per_sample.mean(dim=0) if per_sample.shape[0] else torch.zeros_like(param)
            self.parameter_only.append((param.grad - mean).detach())


class _PlannedLength(Sampler):
    """A sampler of the planned length, so that Opacus, which takes Poisson sampling's rate from
    the loader's length (1 / batches per epoch), takes it from the planned size. Opacus replaces
    it with its own Poisson sampler over the whole dataset: it is never iterated."""

    def __init__(self, planned: int) -> None:
        self.planned = planned

    def __len__(self) -> int:
        return self.planned

    def __iter__(self):
        raise RuntimeError("a planned-length sampler is only measured; Opacus's Poisson sampler draws the batches")


class _TwoPassBackward:
    """Avalanche calls `loss.backward(retain_graph=...)`; Opacus's ghost-clipping loss takes no
    argument and runs its own two passes (per-sample norms, then the clipped loss)."""

    def __init__(self, loss: DPTensorFastGradientClipping) -> None:
        self.loss = loss

    def backward(self, retain_graph: bool = False) -> None:
        self.loss.backward()
