"""Client-level DP (DP-FedAvg): Flower's DP strategy wrappers around the scenario's strategy, and their ε.

Sample-level DP-SGD protects each sample of a client's data; client-level DP protects a
client's whole contribution, the unit federated learning usually publishes (McMahan et
al. 2018). Flower implements it as strategy wrappers: each sampled client's update is
clipped (on the server, or by the client before it replies), the wrapped strategy
aggregates, and Gaussian noise of standard deviation σ·C/m is added to the aggregate.
fedtide wraps the scenario's strategy in the wrapper the scenario names and does two
things Flower leaves to the user:

- the accounting: the server releases one noisy aggregate per round, so after r rounds
  (over every experience) ε is that of r compositions of the subsampled Gaussian
  mechanism with noise σ at the client sampling rate q = m/N, by Opacus's accountant
  (amplification by sampling assumes Poisson sampling of clients; Flower samples m
  clients without replacement, the usual approximation of DP-FedAvg). With every
  client sampled (q = 1) there is no amplification and the bound is exact. A round that
  averages fewer than m updates spends more (`client_level_epsilon`). Anyone can
  recompute ε from summary.json: σ, q, m, the updates averaged each round, δ;
- equal weights: the noise is calibrated to the sensitivity C/m of an unweighted mean of
  clipped updates, so clients send an equal weight (`CLIENT_WEIGHT_KEY`) and the
  strategy averages by it, not by example counts (which would let one client's update
  weigh more than C/m).

Client-side clipping is done by fedtide's ClientApp with Flower's own clipping functions
(`compute_clip_model_update`, `compute_adaptive_clip_model_update`), not by Flower's
`fixedclipping_mod`: a fedtide train message may carry more than one ArrayRecord (the
weights that ended past experiences), which the mods refuse.
"""

from __future__ import annotations

import warnings

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
    compute_adaptive_noise_params,
    compute_clip_model_update,
)

from fedtide.data.schema import Scenario
from fedtide.errors import ScenarioError
from fedtide.privacy.accounting import DEFAULT_NOISE_MULTIPLIER, calibrate_noise, epsilon_spent

CLIENT_WEIGHT_KEY = "client-level-weight"  # every client's equal weight in the aggregate
FIELD = "privacy.client_level"

WRAPPERS: dict[tuple[str, str], type[Strategy]] = {
    ("fixed", "server"): DifferentialPrivacyServerSideFixedClipping,
    ("fixed", "client"): DifferentialPrivacyClientSideFixedClipping,
    ("adaptive", "server"): DifferentialPrivacyServerSideAdaptiveClipping,
    ("adaptive", "client"): DifferentialPrivacyClientSideAdaptiveClipping,
}


def sampled_per_round(scenario: Scenario) -> int:
    """m: the clients a round samples, as Flower's FedAvg computes it from the scenario's fractions."""
    federation, clients = scenario.federation, scenario.partition.num_clients
    return max(int(clients * federation.fraction_train), min(federation.min_train_nodes, clients))


def client_sample_rate(scenario: Scenario) -> float:
    """q = m / N, the probability that a given client takes part in a round."""
    return sampled_per_round(scenario) / scenario.partition.num_clients


def client_level_delta(scenario: Scenario) -> float:
    """δ: the scenario's, or 1 / (10 · N), N being the clients protected."""
    return scenario.privacy.client_level.delta or 1.0 / (10 * scenario.partition.num_clients)


def client_noise_multiplier(scenario: Scenario) -> float:
    """σ: the configured one, or the smallest that keeps the whole run within `target_epsilon`."""
    config = scenario.privacy.client_level
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    if config.target_epsilon is None:
        return DEFAULT_NOISE_MULTIPLIER
    plan = [(client_sample_rate(scenario), scenario.total_rounds)]  # m updates every round
    return calibrate_noise(
        config.target_epsilon, scenario.privacy.accountant, client_level_delta(scenario), plan,
        f"{FIELD}.target_epsilon",
    )


def client_level_epsilon(scenario: Scenario, sigma: float, aggregated: list[int]) -> float:
    """ε after the noisy aggregates of rounds that averaged `aggregated[r]` clipped updates each.

    The noise (σ·C/m) is calibrated to a mean of the m sampled updates. A round whose mean
    has fewer terms m' (a sampled client dropped, failed, or had no data to train on: its
    reply is left out of the aggregate) has sensitivity C/m', so it is accounted at the
    effective noise multiplier σ·m'/m; a round with none releases nothing.
    """
    sampled, rate = sampled_per_round(scenario), client_sample_rate(scenario)
    history = [(sigma * count / sampled, rate, 1) for count in aggregated if count > 0]
    return epsilon_spent(history, client_level_delta(scenario), scenario.privacy.accountant)


def check_client_level(scenario: Scenario) -> None:
    """Refuse client-level settings that cannot hold: δ too large, target out of reach, Flower's adaptive limits."""
    if not scenario.privacy.client_private:
        return
    clients = scenario.partition.num_clients
    delta = client_level_delta(scenario)
    if delta >= 1.0 / clients:
        raise ScenarioError(
            f"{FIELD}.delta",
            f"{delta} is not below 1/N = {1.0 / clients:.2e} for N={clients} clients",
            f"use a delta below {1.0 / clients:.1e}, e.g. {1.0 / (10 * clients):.1e}, or leave it unset",
        )
    sigma = client_noise_multiplier(scenario)
    config = scenario.privacy.client_level
    if config.clipping == "adaptive":
        try:
            compute_adaptive_noise_params(sigma, sampled_per_round(scenario), config.clipped_count_stddev)
        except ValueError as error:
            raise ScenarioError(
                f"{FIELD}.clipped_count_stddev",
                f"adaptive clipping with noise multiplier {sigma:.3g} and {sampled_per_round(scenario)} clients a "
                f"round: {error}",
                f"set clipped_count_stddev above {sigma / 2:.3g}, or use clipping: fixed",
            ) from None


def wrap_strategy(strategy: Strategy, scenario: Scenario, sigma: float) -> Strategy:
    """The scenario's strategy inside the Flower DP wrapper its `client_level` names, at noise `sigma`
    (`client_noise_multiplier`)."""
    config = scenario.privacy.client_level
    wrapper = WRAPPERS[(config.clipping, config.clip_on)]
    sampled = sampled_per_round(scenario)
    if config.clipping == "fixed":
        return wrapper(strategy, sigma, config.clipping_norm, sampled)
    return wrapper(
        strategy,
        sigma,
        sampled,
        initial_clipping_norm=config.clipping_norm,
        target_clipped_quantile=config.target_clipped_quantile,
        clip_norm_lr=config.clip_norm_lr,
        clipped_count_stddev=config.clipped_count_stddev,
    )


def unwrapped(strategy: Strategy) -> Strategy:
    """The strategy inside a Flower DP wrapper (itself when not wrapped): the one a user names."""
    return strategy.strategy if isinstance(strategy, tuple(WRAPPERS.values())) else strategy


def current_clipping_norm(strategy: Strategy) -> float | None:
    """The wrapper's clipping norm now (adaptive clipping moves it every round); None when not wrapped."""
    return float(strategy.clipping_norm) if isinstance(strategy, tuple(WRAPPERS.values())) else None


def prepare_reply(scenario: Scenario, config: ConfigRecord, sent: ArrayRecord, content: RecordDict) -> None:
    """Make a client's reply what the client-level wrapper expects: an equal weight and, when the
    clients clip, its update clipped to the norm the server sent (and, adaptive, whether it was)."""
    metrics = content["metrics"]
    metrics[CLIENT_WEIGHT_KEY] = 1.0
    if KEY_CLIPPING_NORM not in config:
        return
    norm = float(config[KEY_CLIPPING_NORM])
    if metrics["num-examples"] == 0:  # the global model back: a zero update, clipped or not
        if scenario.privacy.client_level.clipping == "adaptive":
            metrics[KEY_NORM_BIT] = 0
        return
    reply = content["arrays"]
    arrays = reply.to_numpy_ndarrays()
    if scenario.privacy.client_level.clipping == "adaptive":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a zero update divides by its zero norm
            metrics[KEY_NORM_BIT] = int(compute_adaptive_clip_model_update(arrays, sent.to_numpy_ndarrays(), norm))
    else:
        compute_clip_model_update(arrays, sent.to_numpy_ndarrays(), norm)
    content["arrays"] = ArrayRecord({key: Array(array) for key, array in zip(reply.keys(), arrays, strict=True)})
