"""DP-FedAvg and DP-FedOpt around an averaging strategy, as McMahan et al. 2018 and Andrew et al. 2021 publish them.

Flower's client-level DP wrappers (`DifferentialPrivacyServerSideFixedClipping` and its
three siblings) run a mechanism that no accountant's assumptions fit; `DPFedAvg` wraps
the scenario's strategy the same way and closes the gaps, with Flower's own clipping
and noise-splitting functions:

- sampling: Flower's strategies sample exactly m of N clients. Under `poisson` the
  wrapped strategy is asked for every client and each is kept by a coin of its own, as
  amplification by subsampling assumes; under `fixed` Flower's m-of-N sample is kept and
  accounted as such (`fedtide.privacy.client_level`).
- the denominator: Flower divides by the replies that came back, so a dropped client
  raises the sensitivity. Here the clipped updates are summed and divided by the fixed
  expected count D (qN, or m); a round that sampled nobody still releases noise.
- the server optimizer: Flower adds its noise to what the wrapped strategy returns, so
  FedAdam's step, FedAvgM's momentum see un-noised averages. Here the noisy average is
  handed to the wrapped strategy as its one reply, so a server optimizer only
  post-processes it (DP-FedOpt).
- adaptive clipping: Flower counts *clipped* updates where Andrew et al. count unclipped
  ones (its norm moves away from the target quantile), releases the count uncentred
  (sensitivity 1 where its split of σ assumes ½), and moves the norm before noising the
  aggregate (noise sized for a norm the updates were not clipped at). Here the count is
  of unclipped updates, centred, over D; the noise is sized for the norm the round
  clipped at, and the norm moves afterwards.

Its randomness (the coins, the noise) comes from a generator seeded by (seed, release),
so a run is reproducible whatever order clients ran in, and a resumed run draws what the
uninterrupted one drew (the release count is checkpointed with the strategy's
attributes); with `secure_rng` it comes from the operating system's entropy instead.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    adaptive_clip_inputs_inplace,
    compute_adaptive_noise_params,
    compute_stdv,
    get_norm,
)

from fedtide.errors import ScenarioError
from fedtide.privacy.client_level import adaptive_count_stddev, client_level_mechanism
from fedtide.scenario.schema import Scenario

# What the noise covers: an average (FedAvg's, inherited by FedProx), and server optimizers
# that only post-process the average they are handed.
ACCOUNTABLE_AGGREGATES = {
    cls.aggregate_train: cls.__name__ for cls in (FedAvg, FedAdam, FedYogi, FedAdagrad, FedAvgM)
}
# Strategy parameters that would sample or weigh clients other than as the accountant assumes.
SAMPLING_PARAMETERS = ("fraction_train", "min_train_nodes", "min_available_nodes", "weighted_by_key")


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. 2021's clipping-norm update: C ← C·exp(−lr·(unclipped fraction − target))."""

    target_quantile: float  # γ: the fraction of updates meant to be left unclipped
    learning_rate: float  # η_C
    count_stddev: float  # σ_b: noise on the centred count of unclipped updates


class DPFedAvg(Strategy):
    """Clips each sampled client's update, averages over a fixed denominator, adds noise, then lets
    the wrapped strategy take that one noisy average as its only reply."""

    def __init__(
        self,
        strategy: FedAvg,
        noise_multiplier: float,
        clipping_norm: float,
        num_clients: int,
        sample_rate: float,
        *,
        sampling: str = "poisson",
        clip_on: str = "server",
        adaptive: AdaptiveClipping | None = None,
        seed: int = 0,
        secure_rng: bool = False,
    ) -> None:
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier  # σ of the whole release (both queries under adaptive)
        self.clipping_norm = clipping_norm
        self.num_clients = num_clients
        self.sample_rate = sample_rate
        self.sampling = sampling
        self.denominator = sample_rate * num_clients if sampling == "poisson" else round(sample_rate * num_clients)
        self.clip_on = clip_on
        self.adaptive = adaptive
        self.update_noise_multiplier = noise_multiplier
        if adaptive:  # σ split between the sum and the count: σ^-2 = z_Δ^-2 + (2σ_b)^-2
            _, self.update_noise_multiplier = compute_adaptive_noise_params(
                noise_multiplier, self.denominator, adaptive.count_stddev
            )
        self.seed = seed
        self.secure_rng = secure_rng
        self.releases = 0  # noisy aggregates released so far: the round's RNG stream
        self.current_arrays = ArrayRecord()
        self.round_clipping_norm = clipping_norm  # the norm the last configured round clips at

    def _rng(self, purpose: int) -> np.random.Generator:
        if self.secure_rng:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng((self.seed, self.releases, purpose))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        self.round_clipping_norm = self.clipping_norm
        if self.clip_on == "client":
            config[KEY_CLIPPING_NORM] = self.clipping_norm
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        expected = self.num_clients if self.sampling == "poisson" else self.denominator
        if len(messages) != expected:
            raise ValueError(
                f"configure_train sent {len(messages)} train messages where client-level DP expects {expected} "
                f"({'every client, to sample by its own coin' if self.sampling == 'poisson' else 'the fixed sample'}); "
                "client-level DP needs the strategy's own sampling"
            )
        if self.sampling == "fixed":
            return messages
        if self.secure_rng:
            coins = [random.SystemRandom().random() for _ in messages]
        else:
            coins = list(self._rng(0).random(len(messages)))
        return [message for message, coin in zip(messages, coins, strict=True) if coin < self.sample_rate]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if not reply.has_error()]
        current = self.current_arrays.to_numpy_ndarrays()
        total = [np.zeros(array.shape, dtype=np.float64) for array in current]
        unclipped = 0
        for reply in replies:
            arrays = reply.content["arrays"].to_numpy_ndarrays()
            update = [np.subtract(x, y, dtype=np.float64) for x, y in zip(arrays, current, strict=True)]
            # a no-op on an update its client clipped already; a zero update is left as it is
            clipped = get_norm(update) > 0 and adaptive_clip_inputs_inplace(update, self.clipping_norm)
            if self.clip_on == "client" and self.adaptive:
                clipped = bool(reply.content["metrics"][KEY_NORM_BIT])
            unclipped += not clipped
            for accumulated, part in zip(total, update, strict=True):
                accumulated += part
        rng = self._rng(1)
        stdv = compute_stdv(self.update_noise_multiplier, self.clipping_norm, self.denominator)
        average = {
            key: Array(np.asarray(base + part / self.denominator + rng.normal(0.0, stdv, base.shape), dtype=base.dtype))
            for key, base, part in zip(self.current_arrays.keys(), current, total, strict=True)
        }  # noise sized for the norm these updates were clipped at; the norm moves only after
        if self.adaptive:
            self._move_clipping_norm(unclipped, len(replies), rng)
        self.releases += 1
        weight = self.strategy.weighted_by_key
        noisy = Message(
            RecordDict({"arrays": ArrayRecord(average), "metrics": MetricRecord({weight: 1.0})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        arrays, _ = self.strategy.aggregate_train(server_round, [noisy])
        metrics = self.strategy.train_metrics_aggr_fn([r.content for r in replies], weight) if replies else None
        return arrays, metrics

    def _move_clipping_norm(self, unclipped: int, replied: int, rng: np.random.Generator) -> None:
        """Andrew et al.'s geometric update from the noisy fraction of unclipped updates, centred so one
        client moves the count by ½ (a client that did not reply counts as ½ too: no signal)."""
        centred = unclipped - replied / 2 + rng.normal(0.0, self.adaptive.count_stddev)
        fraction = centred / self.denominator + 0.5
        self.clipping_norm *= math.exp(-self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


def require_accountable(strategy: Strategy, scenario: Scenario) -> None:
    """Refuse, before anything runs, a strategy whose aggregate the client-level noise does not cover."""
    field = "federation.strategy"
    name = type(strategy).__name__
    if type(strategy).aggregate_train not in ACCOUNTABLE_AGGREGATES:
        raise ScenarioError(
            f"{field}.name",
            f"client-level DP accounts a noisy average of clipped updates, and {name}'s aggregate_train "
            "is not one (a robust or loss-weighted aggregate, or a strategy's own aggregate_train)",
            f"use one of {', '.join(sorted(set(ACCOUNTABLE_AGGREGATES.values())))} or FedProx, "
            "or a FedAvg subclass that keeps its aggregate_train",
        )
    overridden = [key for key in SAMPLING_PARAMETERS if key in scenario.federation.strategy.params]
    if overridden:
        raise ScenarioError(
            f"{field}.{overridden[0]}",
            "client-level DP samples and weighs clients as its accountant assumes, and this strategy "
            "parameter would change that",
            "remove it; set federation.fraction_train (and privacy.client_level.sampling) instead",
        )


def wrap_strategy(strategy: Strategy, scenario: Scenario, sigma: float) -> DPFedAvg:
    """The scenario's strategy inside `DPFedAvg` at noise multiplier `sigma` (`client_noise_multiplier`)."""
    require_accountable(strategy, scenario)
    config = scenario.privacy.client_level
    mechanism = client_level_mechanism(scenario, sigma)
    adaptive = None
    if config.clipping == "adaptive":
        adaptive = AdaptiveClipping(
            config.target_clipped_quantile, config.clip_norm_lr, adaptive_count_stddev(scenario)
        )
    return DPFedAvg(
        strategy,
        sigma,
        config.clipping_norm,
        mechanism.num_clients,
        mechanism.sample_rate,
        sampling=config.sampling,
        clip_on=config.clip_on,
        adaptive=adaptive,
        seed=scenario.seed,
        secure_rng=scenario.privacy.secure_rng,
    )

