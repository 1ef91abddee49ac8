"""summary.json: what a finished run measured (`RunSummary`) and its sections.

Privacy sections name their unit: each ε is a `PrivacyGuarantee` about one sample or
one client, never a unit-less number.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtide.records.record import Record, set_field, typed, typed_list

# The false-positive rate at which a summary's audit reports the attack's true-positive rate.
LOW_FPR = 0.01


@dataclass(frozen=True, kw_only=True)
class PrivacySummary(Record):
    """Sample-level DP-SGD of a run: each client's noise and cumulative ε, by its own accountant."""

    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: dict[str, float]  # per client (calibrated per client under target_epsilon)
    target_epsilon: float | None
    epsilon_max: float
    epsilon_per_client: dict[str, float]
    budget_exhausted_clients: list[int]


@dataclass(frozen=True, kw_only=True)
class ClientLevelSummary(Record):
    """Client-level DP of a run: the mechanism as it ran, what its ε is recomputed from, and ε.

    Each of the `rounds` rounds released the sum of the sampled clients' clipped updates
    over the fixed denominator `expected_clients`, with Gaussian noise of σ·C over it
    (σ = `noise_multiplier`, of both queries under adaptive clipping). Recomputing ε: the
    subsampled Gaussian at rate `sample_rate` and multiplier `accounted_noise_multiplier`
    (σ over the sensitivity the `sampling` and `adjacency` give, `fedtide.privacy.client_level`),
    composed `rounds` times, by Opacus's `accountant` at `delta`; under replace-one, by
    dp-accounting's RDP for sampling without replacement of `expected_clients` of `num_clients`.
    `aggregated_per_round` (the updates each round summed) does not enter ε: the fixed
    denominator makes one client's effect the same however many replied. `clipping_norm`
    is the last round's (adaptive clipping moves it from `initial_clipping_norm`).
    """

    _OPTIONAL = ("clipped_count_stddev", "update_noise_multiplier")

    sampling: str = "fixed"  # poisson | fixed (runs from before the field: Flower's fixed-size sample)
    adjacency: str = "zero_out"  # add_remove | replace_one | zero_out (before the field: what was accounted)
    num_clients: int = 0
    noise_multiplier: float
    accounted_noise_multiplier: float | None = None
    sample_rate: float  # q
    expected_clients: float | None = None  # the fixed denominator: qN, or m under fixed sampling
    rounds: int  # noisy aggregates released
    aggregated_per_round: list[int]
    delta: float
    accountant: str
    clipping: str  # fixed | adaptive
    clip_on: str  # server | client
    initial_clipping_norm: float
    clipping_norm: float
    clipped_count_stddev: float | None = None  # adaptive: σ_b, the noise on the count of unclipped updates
    update_noise_multiplier: float | None = None  # adaptive: z_Δ, the sum's share of σ
    target_epsilon: float | None
    epsilon: float
    secure_rng: bool = False


SAMPLE, CLIENT = "sample", "client"
PRIVACY_UNITS = (SAMPLE, CLIENT)  # what one neighbouring dataset differs by
# How a guarantee's neighbouring datasets differ, and how its unit is drawn into each step.
_ADJACENCY = {
    "add_remove": "add or remove one {unit}",
    "replace_one": "replace one {unit}",
    "zero_out": "zero out one {unit}'s contribution",
}
_UNIT_WORDS = {SAMPLE: "sample of a client's dataset", CLIENT: "client's data"}
_SAMPLING = {
    (SAMPLE, "poisson"): "Poisson sampling of batches",
    (CLIENT, "poisson"): "Poisson sampling of clients",
    (CLIENT, "fixed"): "a fixed number of clients per round, drawn without replacement",
}


@dataclass(frozen=True, kw_only=True)
class PrivacyGuarantee(Record):
    """One (ε, δ) of a run and what it is a guarantee about.

    `unit` is what two neighbouring inputs differ by: one sample of a client's dataset
    (sample-level DP-SGD, each client by its own accountant: ε is the largest client's)
    or one client's data (client-level DP). `adjacency` is how they differ (add_remove,
    replace_one, zero_out) and `sampling` how the unit is drawn into each step, as the
    accountant took it. A run with both levels holds two guarantees; neither bounds the
    other (a sample-level ε says nothing of a whole client, and a client-level ε under
    add/remove bounds a change of one sample only through group privacy), so no ε of a
    run is ever the smaller of the two.
    """

    unit: str  # sample | client
    epsilon: float
    delta: float
    adjacency: str
    sampling: str

    @property
    def neighbouring(self) -> str:
        """The neighbouring relation in words: "add or remove one sample of a client's dataset"."""
        unit = _UNIT_WORDS.get(self.unit, self.unit)
        return _ADJACENCY.get(self.adjacency, self.adjacency + " of one {unit}").format(unit=unit)

    @property
    def sampled_by(self) -> str:
        return _SAMPLING.get((self.unit, self.sampling), f"{self.sampling} sampling")

    def describe(self) -> str:
        """`ε 2.000 (δ 1.0e-04): add or remove one sample of a client's dataset, Poisson sampling of batches`."""
        return f"ε {self.epsilon:.3f} (δ {self.delta:.1e}): {self.neighbouring}, {self.sampled_by}"


def privacy_guarantees(
    privacy: PrivacySummary | None, client_level: ClientLevelSummary | None
) -> list[PrivacyGuarantee]:
    """The run's guarantees, sample-level first: one per level it ran, each with its own unit."""
    guarantees = []
    if privacy is not None:
        # Opacus's accountants: the subsampled Gaussian under add/remove, batches Poisson-sampled
        sample = {"adjacency": "add_remove", "sampling": "poisson"}
        guarantees.append(PrivacyGuarantee(unit=SAMPLE, epsilon=privacy.epsilon_max, delta=privacy.delta, **sample))
    if client_level is not None:
        guarantees.append(
            PrivacyGuarantee(
                unit=CLIENT,
                epsilon=client_level.epsilon,
                delta=client_level.delta,
                adjacency=client_level.adjacency,
                sampling=client_level.sampling,
            )
        )
    return guarantees


@dataclass(frozen=True, kw_only=True)
class ClientStreamSummary(Record):
    """One client's own stream: its experiences in its order, and the global model measured on them."""

    experiences: list[int]  # the stream's experiences, in the order it met them
    rounds: list[list[int]]  # [first, last] global round of each
    # A[i][j]: the global model's accuracy on its experience j's test data after the round that ended its
    # experience i (j <= i); a client that holds one experience has one row and nothing to forget
    accuracy_matrix: list[list[float]]
    final_average_accuracy: float  # the last row's mean
    average_forgetting: float | None  # None with a single experience
    bwt: float | None


@dataclass(frozen=True, kw_only=True)
class PerClientSummary(Record):
    """Each client's stream and its forgetting (a stream whose clients are not in lockstep), and the means."""

    clients: dict[str, ClientStreamSummary]
    mean_final_average_accuracy: float
    mean_average_forgetting: float | None  # over the clients that held more than one experience
    mean_bwt: float | None

    def __post_init__(self) -> None:
        set_field(self, "clients", {k: typed(v, ClientStreamSummary) for k, v in self.clients.items()})

    def forgetting(self) -> list[float]:
        """Each client's average forgetting, for those that have one: the distribution the report draws."""
        return [c.average_forgetting for c in self.clients.values() if c.average_forgetting is not None]


@dataclass(frozen=True, kw_only=True)
class FaultSummary(Record):
    """The simulated faults' toll on a run: how many (client, round) trainings they cancelled, and whose."""

    clients_dropped: int  # summed over rounds: a client dropped in 3 rounds counts 3
    dropped_per_client: dict[str, int]  # every client, 0 included

    def describe(self) -> str:
        """`10 (per client 0..3: 0, 5, 0, 5)`, as the console and the report print it."""
        counts = list(self.dropped_per_client.values())
        return f"{self.clients_dropped} (per client 0..{len(counts) - 1}: {', '.join(map(str, counts))})"


@dataclass(frozen=True, kw_only=True)
class ClientAudit(Record):
    """The attack's success on one client's members against as many class-matched non-members."""

    auc: float
    tpr_at_1pct_fpr: float
    members: int
    nonmembers: int


@dataclass(frozen=True, kw_only=True)
class CanaryAudit(Record):
    """The canary audit (`fedtide.audit.canaries`): ε_lower, and the guesses it rests on.

    Of `canaries` canaries, `included` were trained on (coin flips); the auditor guessed on
    `guesses` = `guesses_in` ("in") + `guesses_out` ("out") of them and was right `correct`
    times. `plans` guess plans were tried, each at (1 − confidence) / plans; this is the best.
    `epsilon_ceiling` is the largest ε_lower these canaries could show (every guess right,
    the best plan, at this δ and confidence); None in summaries written before it existed.
    `epsilon_audited` is the ε that protects one canary at `delta` (`canary_guarantee`: the
    sample-level ε, or the client-level one through group privacy): what ε_lower must stay
    under; None for a non-private run, and in summaries written before it existed.
    """

    _OPTIONAL = ("epsilon_ceiling", "epsilon_audited")

    canaries: int
    included: int
    guesses: int
    correct: int
    guesses_in: int
    guesses_out: int
    plans: int
    confidence: float
    delta: float
    epsilon_lower: float
    epsilon_ceiling: float | None = None
    epsilon_audited: float | None = None
    score: str

    def blind_at(self, epsilon: float | None) -> bool:
        """True when the audit could not have shown a violation of `epsilon`: its ceiling is not above it.

        False without an ε (a non-private run) or without a recorded ceiling (an older summary).
        """
        return epsilon is not None and self.epsilon_ceiling is not None and self.epsilon_ceiling <= epsilon


@dataclass(frozen=True, kw_only=True)
class AuditSummary(Record):
    """The membership-inference attack on the final model: per client, with mean and worst case.

    The aggregates are None when no client held training data to attack. `canaries` is the
    canary audit's result, only when the scenario has canaries (`audit.canaries`).
    """

    _OPTIONAL = ("canaries",)

    attack: str
    auc_mean: float | None
    auc_max: float | None
    tpr_at_1pct_fpr_mean: float | None
    tpr_at_1pct_fpr_max: float | None
    per_client: dict[str, ClientAudit]
    canaries: CanaryAudit | None = None

    def __post_init__(self) -> None:
        set_field(self, "per_client", {k: typed(v, ClientAudit) for k, v in self.per_client.items()})
        set_field(self, "canaries", typed(self.canaries, CanaryAudit))


@dataclass(frozen=True, kw_only=True)
class RunSummary(Record):
    """summary.json: what a finished run measured."""

    _OPTIONAL = (
        "privacy", "client_level", "epsilons", "audit", "faults", "strategy_metrics", "method_metrics",
        "startup_s", "rounds_s", "end_s", "per_client",
    )  # fmt: skip

    name: str
    seed: int
    strategy: str
    method: str
    num_clients: int
    n_experiences: int
    rounds: int
    classes_per_experience: list[list[int]]
    # A[e][j]: accuracy on experience j after training experience e. When clients are not in lockstep, a row
    # per stage (rounds_per_experience rounds) on every experience, and forgetting and BWT are `per_client`'s means
    accuracy_matrix: list[list[float]]
    final_average_accuracy: float
    average_forgetting: float
    bwt: float
    clients_failed: int
    # The server's clock from building its model and test data through the rounds, the final
    # model's save and the canary audit (a resumed run: up to its checkpoint plus the resumed
    # part); not the imports, nor Ray's start. The whole command is `startup_s + rounds_s + end_s`.
    wall_time_s: float
    ray_nodes: list[str]
    privacy: PrivacySummary | None = None  # only under sample-level DP
    client_level: ClientLevelSummary | None = None  # only under client-level DP
    # each ε with its unit and neighbouring relation, side by side (`privacy_guarantees`);
    # absent from non-private runs and from runs written before it existed
    epsilons: list[PrivacyGuarantee] | None = None
    audit: AuditSummary | None = None  # absent from runs written before the audit existed
    faults: FaultSummary | None = None  # only when the scenario simulates faults
    strategy_metrics: dict[str, float | list[float]] | None = None  # the last round's, if the strategy had any
    method_metrics: dict[str, float] | None = None  # the last round's aggregate, if the method had any
    # The session that finished the run (`RunTimes`), absent from runs written before they existed:
    startup_s: float | None = None  # from the command's start (imports, Ray, data, model) to the first round
    rounds_s: float | None = None  # the rounds this session ran, evaluations and checkpoints included
    end_s: float | None = None  # after the last round: final model, audits, summary.json
    per_client: PerClientSummary | None = None  # only when clients are not in lockstep

    def __post_init__(self) -> None:
        set_field(self, "privacy", typed(self.privacy, PrivacySummary))
        set_field(self, "client_level", typed(self.client_level, ClientLevelSummary))
        set_field(self, "epsilons", typed_list(self.epsilons, PrivacyGuarantee))
        set_field(self, "audit", typed(self.audit, AuditSummary))
        set_field(self, "faults", typed(self.faults, FaultSummary))
        set_field(self, "per_client", typed(self.per_client, PerClientSummary))

    @property
    def private(self) -> bool:
        """A run is private when it has sample-level DP (noise 0 writes none) or client-level DP."""
        return self.privacy is not None or self.client_level is not None

    @property
    def privacy_level(self) -> str | None:
        """sample, client or both; None for a non-private run."""
        if self.privacy and self.client_level:
            return "both"
        if self.privacy:
            return "sample"
        return "client" if self.client_level else None

    @property
    def guarantees(self) -> list[PrivacyGuarantee]:
        """Each ε of the run with its unit, read from the privacy sections (runs of any version)."""
        return privacy_guarantees(self.privacy, self.client_level)

    @property
    def units(self) -> list[str]:
        """The units the run has an ε of: [], [sample], [client] or [sample, client]."""
        return [guarantee.unit for guarantee in self.guarantees]

    def guarantee(self, unit: str) -> PrivacyGuarantee | None:
        """The run's guarantee of `unit`, None when it ran no DP of that unit."""
        return next((g for g in self.guarantees if g.unit == unit), None)

    def epsilon_of(self, unit: str) -> float | None:
        """ε of `unit` (sample: the largest client's), None when the run has no ε of that unit.

        There is deliberately no unit-less `epsilon`: under both levels the two ε's are
        two guarantees about different neighbouring datasets, and neither is the run's.
        """
        guarantee = self.guarantee(unit)
        return guarantee.epsilon if guarantee else None
