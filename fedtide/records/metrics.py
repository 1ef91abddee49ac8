"""The lines of metrics.jsonl: a `RoundRecord` per global round, an `ExperienceRecord` per experience.

A round's record holds each replying client's `ClientRoundRecord`, built by the client
and read from its reply (`fedtide.records.wire`), as the file keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtide.records.record import Record, set_field, typed, typed_list


@dataclass(frozen=True, kw_only=True)
class ClientRoundRecord(Record):
    """One replying client's round: built by the client, read from its reply (`records.wire`), written per round."""

    _OPTIONAL = ("experience", "classes", "ray_node_id", "hostname", "dp_history", "method_metrics")

    partition_id: int
    num_examples: int
    train_loss: float
    empty: int  # 1 when it held no data in this experience (0/1 in the file, not a JSON bool)
    consolidated: int  # past experiences consolidated in this call
    consolidation_counts: list[int]
    epsilon: float
    noise_multiplier: float
    budget_exhausted: int  # 0/1, as `empty`
    experience: int | None = None  # its own experience this round (an index into its stream); absent before it existed
    classes: list[int] | None = None  # the classes of the samples it trained on this round; absent when it trained none
    ray_node_id: str | None = None  # absent when the client ran outside Ray
    hostname: str | None = None
    dp_history: list[list[float]] | None = None  # under DP: (noise multiplier, sample rate, steps) rows
    method_metrics: dict[str, float] | None = None  # what the continual method reported (`metrics()`)


@dataclass(frozen=True, kw_only=True)
class ClientFailure(Record):
    """A client that failed a round, and why (the exception it raised, or what it returned wrong)."""

    partition_id: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class ClientDrop(Record):
    """A sampled client that a simulated fault kept out of a round: it was sent nothing and trained nothing.

    `fault` is "dropout" (the scenario's per-round dropout probability) or "unavailable"
    (a stretch of rounds in `faults.unavailable`). Real failures are `ClientFailure`s.
    """

    partition_id: int
    fault: str


@dataclass(frozen=True, kw_only=True)
class RoundPrivacy(Record):
    """The clients' cumulative sample-level ε after a round: a client not sampled keeps its last value.

    Each client's ε is its own guarantee, on its own dataset: the run's is the largest,
    and the smallest says how far apart they are. No mean of them is a guarantee of
    anything; `epsilon_mean` is only read from runs written before `epsilon_min` existed.
    """

    _OPTIONAL = ("epsilon_min", "epsilon_mean")

    epsilon_max: float
    epsilon_min: float | None = None  # absent from runs written before it existed
    epsilon_mean: float | None = None  # written by earlier versions only
    epsilon_per_client: dict[str, float]
    budget_exhausted_clients: list[int]


@dataclass(frozen=True, kw_only=True)
class RoundClientLevel(Record):
    """Client-level DP after a round: ε of the noisy aggregates so far, the clipping norm used,
    and the clipped updates the round averaged."""

    epsilon: float
    clipping_norm: float
    aggregated: int


@dataclass(frozen=True, kw_only=True)
class RoundRecord(Record):
    """One line of metrics.jsonl per global round: the global model's accuracy and the clients' round."""

    _TYPE = "round"
    _OPTIONAL = (
        "seen_accuracy", "failures", "dropped", "privacy", "client_level", "strategy_metrics", "method_metrics",
    )  # fmt: skip

    round: int
    experience: int
    round_in_experience: int
    accuracy: list[float]  # on each experience seen so far
    mean_accuracy: float
    # on the test data of every experience some client has begun, pooled; absent before it existed
    seen_accuracy: float | None = None
    train_loss: float | None  # None when no client trained
    clients: dict[str, int]  # sampled, dropped, replied, failed, empty (dropped: absent before faults existed)
    per_client: list[ClientRoundRecord]
    failures: list[ClientFailure] | None = None  # only when a client failed
    dropped: list[ClientDrop] | None = None  # only when a simulated fault dropped a client
    wall_time_s: float
    privacy: RoundPrivacy | None = None  # only under sample-level DP
    client_level: RoundClientLevel | None = None  # only under client-level DP
    # what aggregate_train returned of its own, if any (the clients' MetricRecord keys are theirs)
    strategy_metrics: dict[str, float | list[float]] | None = None
    # the continual method's metrics over the clients, aggregated as it declares (`metric_aggregation`)
    method_metrics: dict[str, float] | None = None

    def __post_init__(self) -> None:
        set_field(self, "per_client", typed_list(self.per_client, ClientRoundRecord))
        set_field(self, "failures", typed_list(self.failures, ClientFailure))
        set_field(self, "dropped", typed_list(self.dropped, ClientDrop))
        set_field(self, "privacy", typed(self.privacy, RoundPrivacy))
        set_field(self, "client_level", typed(self.client_level, RoundClientLevel))


@dataclass(frozen=True)
class ExperienceRecord(Record):
    """One line of metrics.jsonl per finished experience: its row of the accuracy matrix."""

    _TYPE = "experience"

    experience: int
    accuracy: list[float]
