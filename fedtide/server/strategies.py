"""Names of Flower Message-API aggregation strategies, and building one for a scenario.

Every built-in is Flower's own class from `flwr.serverapp.strategy`; fedtide adds
nothing to aggregation. A user strategy is any subclass of `Strategy`, named as
"pkg.module:Name" or by a short name registered under the entry-point group
`fedtide.strategies`, resolved as every kind is (`fedtide.registry.resolve`: built-in
names win over entry points). See docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from fedtide.errors import ScenarioError
from fedtide.privacy.client_clipping import CLIENT_WEIGHT_KEY
from fedtide.registry import Kind, check_hook_signatures, check_parameters, constructor_parameters, resolve
from fedtide.scenario.schema import FederationConfig, Scenario

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "qfedavg": QFedAvg,
}

FIELD = "federation.strategy"
STRATEGY = Kind("strategy", f"{FIELD}.name", "fedtide.strategies", (lambda: STRATEGIES,), lambda: (Strategy,))
# What fedtide's `ContinualStrategy` calls on a strategy, with the positional arguments of Flower's defs.
STRATEGY_HOOKS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate", "summary")


def strategy_class(name: str) -> type[Strategy]:
    """A built-in name, an installed entry point's name or a "pkg.module:Name" path, as `resolve` orders them."""
    return resolve(STRATEGY, name)


def build_strategy(
    federation: FederationConfig, num_clients: int, weighted_by: str | None = None, everyone_every_round: bool = True
) -> Strategy:
    """Instantiate the scenario's strategy with its parameters and fedtide's sampling settings.

    Sampling fields (fraction_train, ...) are passed only to strategies whose
    constructor takes them; the scenario's own strategy parameters win. `weighted_by`
    names the reply metric that weights clients in the aggregate (client-level DP gives
    every client the same), for strategies that take Flower's `weighted_by_key`. Flower's
    sampling waits for `min_available_nodes`: every client, unless the stream keeps some
    out of some rounds (`everyone_every_round` false), when the strategy sees only those in it.
    """
    cls = strategy_class(federation.strategy.name)
    params = federation.strategy.params
    check_parameters(cls, params, FIELD)
    sampling = {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": federation.fraction_evaluate,
        "min_train_nodes": min(federation.min_train_nodes, num_clients),
        "min_evaluate_nodes": 0 if federation.fraction_evaluate == 0 else 1,
        "min_available_nodes": num_clients if everyone_every_round else 1,
    }
    if weighted_by:
        sampling["weighted_by_key"] = weighted_by
    accepted, _ = constructor_parameters(cls)
    kwargs = {k: v for k, v in sampling.items() if k in accepted} | params
    try:
        strategy = cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ScenarioError(FIELD, f"{cls.__name__} cannot be built: {error}") from None
    check_hook_signatures(strategy, Strategy, STRATEGY_HOOKS, f"{FIELD}.name")
    return strategy


# One layer fedtide puts around the scenario's strategy, as Flower's DP wrappers do: strategy in, strategy out.
Wrapper = Callable[[Strategy], Strategy]
Layer = TypeVar("Layer", bound=Strategy)


def strategy_wrappers(scenario: Scenario, client_sigma: float | None) -> list[Wrapper]:
    """The layers around the scenario's strategy, innermost first: a new one is added here, nowhere else.

    Client-level DP (`DPFedAvg` at noise `client_sigma`) is the only one today.
    """
    wrappers: list[Wrapper] = []
    if client_sigma is not None:
        from fedtide.privacy.dp_fedavg import wrap_strategy  # Opacus's accountant: only for a client-level DP run

        wrappers.append(partial(wrap_strategy, scenario=scenario, sigma=client_sigma))
    return wrappers


def federation_strategy(scenario: Scenario, client_sigma: float | None) -> Strategy:
    """The scenario's strategy inside `strategy_wrappers` (DP-FedAvg at noise `client_sigma` under client-level DP).

    Under client-level DP every client weighs the same (`CLIENT_WEIGHT_KEY`), and under
    Poisson sampling the strategy is asked for every client: `DPFedAvg` keeps each by its own coin.
    """
    num_clients = scenario.partition.num_clients
    federation, weighted_by = scenario.federation, None
    if client_sigma is not None:
        weighted_by = CLIENT_WEIGHT_KEY
        if scenario.privacy.client_level.sampling == "poisson":
            federation = federation.model_copy(update={"fraction_train": 1.0, "min_train_nodes": num_clients})
    strategy = build_strategy(federation, num_clients, weighted_by, scenario.stream.lockstep)
    for wrap in strategy_wrappers(scenario, client_sigma):
        strategy = wrap(strategy)
    return strategy


def layer_of(strategy: Strategy, kind: type[Layer]) -> Layer | None:
    """The layer of `kind` around the scenario's strategy (each wrapper holds the next one as `.strategy`)."""
    while not isinstance(strategy, kind):
        strategy = getattr(strategy, "strategy", None)
        if not isinstance(strategy, Strategy):
            return None
    return strategy


def innermost(strategy: Strategy) -> Strategy:
    """The strategy inside every wrapper (fedtide's and Flower's hold it as `.strategy`): the one a user names."""
    while isinstance(inner := getattr(strategy, "strategy", None), Strategy):
        strategy = inner
    return strategy
