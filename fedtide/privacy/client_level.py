"""Client-level DP's ε: the mechanism a scenario runs, stated once, and its accounting.

Sample-level DP-SGD protects each sample of a client's data; client-level DP protects a
client's whole contribution, the unit federated learning usually publishes (DP-FedAvg,
McMahan et al. 2018). Each round releases one noisy aggregate: the sum of the sampled
clients' clipped updates divided by a fixed denominator D (the expected number of
sampled clients), plus Gaussian noise of standard deviation σ·C/D
(`fedtide.privacy.dp_fedavg`). What one client can change in that release, and so ε,
depends on how clients are really sampled and which datasets are neighbours:

- `poisson` sampling, add/remove one client (McMahan et al. 2018): one client's presence
  moves the sum by at most C, so each round is the Poisson-subsampled Gaussian mechanism
  at rate q and multiplier σ, accounted by Opacus (RDP or PRV);
- `fixed` sampling (exactly m of N, as Flower's `random.sample`), add/remove: adding a
  client can displace another from the sample, moving the sum by up to 2C; the release
  is bounded by the subsampled Gaussian at rate m/N and multiplier σ/2 (Balle et al.
  2018's coupling argument), accounted by Opacus;
- `fixed`, replace-one: one client's data replaced moves the sum by up to 2C; accounted
  with dp-accounting's sampling-without-replacement RDP (Wang, Balle and Kasiviswanathan
  2019, Theorem 27), whose multiplier is relative to that sensitivity: σ/2;
- `fixed`, zero-out (Kairouz et al. 2021: one client's update replaced by zero): the sum
  moves by at most C, rate m/N and multiplier σ. The weakest relation; used only by name.

With adaptive clipping (Andrew et al. 2021) a round releases two Gaussian queries, the
noisy sum and the noisy count of unclipped updates; σ is their combined multiplier, so the
same accounting holds (`dp_fedavg` splits σ between them).

The fixed denominator makes the sensitivity independent of how many sampled clients
replied: a dropped, failed or data-less client adds a zero update, and a round that
sampled nobody still releases noise and is accounted like any other. Every ε is
recomputable from summary.json's `client_level` section alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from fedtide.errors import ScenarioError
from fedtide.privacy.accounting import DEFAULT_NOISE_MULTIPLIER, epsilon_spent, smallest_noise
from fedtide.scenario.schema import Scenario

FIELD = "privacy.client_level"


@dataclass(frozen=True)
class ClientLevelMechanism:
    """The client-level release of one round, as the accountant needs it."""

    sampling: str  # poisson | fixed
    adjacency: str  # add_remove | replace_one | zero_out
    num_clients: int  # N
    sample_rate: float  # q: each client's probability of taking part in a round
    expected_clients: float  # D = qN, the fixed denominator of the average (m under fixed sampling)
    noise_multiplier: float  # σ: the noise's standard deviation over C / D
    delta: float
    accountant: str  # rdp | prv (Opacus); replace-one is always dp-accounting's RDP

    @property
    def sensitivity(self) -> int:
        """One client's largest effect on the sum, in units of C."""
        return 2 if self.sampling == "fixed" and self.adjacency != "zero_out" else 1

    @property
    def accounted_noise_multiplier(self) -> float:
        """The multiplier relative to the sensitivity: what the accountant is given."""
        return self.noise_multiplier / self.sensitivity

    def epsilon(self, rounds: int) -> float:
        """ε after `rounds` releases (0 when none)."""
        if rounds <= 0:
            return 0.0
        sigma = self.accounted_noise_multiplier
        if self.adjacency == "replace_one":
            return _replace_one_epsilon(self.num_clients, round(self.expected_clients), sigma, rounds, self.delta)
        return epsilon_spent([(sigma, self.sample_rate, rounds)], self.delta, self.accountant)


@lru_cache(maxsize=1024)
def _replace_one_epsilon(clients: int, sampled: int, sigma: float, rounds: int, delta: float) -> float:
    import dp_accounting  # loaded only by the runs that need it

    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.privacy_accountant.NeighboringRelation.REPLACE_ONE
    )
    release = dp_accounting.SampledWithoutReplacementDpEvent(clients, sampled, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(release, rounds))
    return max(0.0, float(accountant.get_epsilon(delta)))


def fixed_sample_size(scenario: Scenario) -> int:
    """m: the clients a fixed-size round samples, as Flower's FedAvg computes it from the scenario's fractions."""
    federation, clients = scenario.federation, scenario.partition.num_clients
    return max(int(clients * federation.fraction_train), min(federation.min_train_nodes, clients))


def client_sample_rate(scenario: Scenario) -> float:
    """q: `fraction_train` under Poisson sampling, m / N under fixed-size sampling."""
    if scenario.privacy.client_level.sampling == "poisson":
        return scenario.federation.fraction_train
    return fixed_sample_size(scenario) / scenario.partition.num_clients


def client_level_delta(scenario: Scenario) -> float:
    """δ: the scenario's, or 1 / (10 · N), N being the clients protected."""
    return scenario.privacy.client_level.delta or 1.0 / (10 * scenario.partition.num_clients)


def client_level_mechanism(scenario: Scenario, sigma: float) -> ClientLevelMechanism:
    """The scenario's client-level release at noise multiplier `sigma`."""
    config, clients = scenario.privacy.client_level, scenario.partition.num_clients
    rate = client_sample_rate(scenario)
    return ClientLevelMechanism(
        sampling=config.sampling,
        adjacency=config.adjacency,
        num_clients=clients,
        sample_rate=rate,
        expected_clients=rate * clients if config.sampling == "poisson" else fixed_sample_size(scenario),
        noise_multiplier=sigma,
        delta=client_level_delta(scenario),
        accountant=scenario.privacy.accountant,
    )


def client_noise_multiplier(scenario: Scenario) -> float:
    """σ: the configured one, or the smallest that keeps every round of the run within `target_epsilon`."""
    config = scenario.privacy.client_level
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    if config.target_epsilon is None:
        return DEFAULT_NOISE_MULTIPLIER
    rounds = scenario.total_rounds
    return smallest_noise(
        config.target_epsilon,
        lambda sigma: client_level_mechanism(scenario, sigma).epsilon(rounds),
        f"{FIELD}.target_epsilon",
    )


def check_client_level(scenario: Scenario) -> None:
    """Refuse client-level settings that cannot hold: δ too large, an accountant without the
    relation's event, a target out of reach, a count noise too small for adaptive clipping."""
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
    config = scenario.privacy.client_level
    if config.adjacency == "replace_one" and scenario.privacy.accountant != "rdp":
        raise ScenarioError(
            "privacy.accountant",
            f"{scenario.privacy.accountant} has no sampling-without-replacement event for replace-one adjacency",
            "use accountant: rdp (dp-accounting's RDP accounts replace-one)",
        )
    sigma = client_noise_multiplier(scenario)
    count_stddev = adaptive_count_stddev(scenario)
    if config.clipping == "adaptive" and sigma >= 2 * count_stddev:
        default = " (the default: expected clients a round / 20)" if config.clipped_count_stddev is None else ""
        raise ScenarioError(
            f"{FIELD}.clipped_count_stddev",
            f"adaptive clipping at noise multiplier {sigma:.3g} needs the count of unclipped updates noised "
            f"by more than σ/2 = {sigma / 2:.3g}, and it is {count_stddev:.3g}{default}",
            f"set clipped_count_stddev above {sigma / 2:.3g}, or use clipping: fixed",
        )


def adaptive_count_stddev(scenario: Scenario) -> float:
    """σ_b: the noise on the count of unclipped updates; by default expected clients / 20 (Andrew et al. 2021)."""
    config = scenario.privacy.client_level
    if config.clipped_count_stddev is not None:
        return config.clipped_count_stddev
    return client_level_mechanism(scenario, 1.0).expected_clients / 20
