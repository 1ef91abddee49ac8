"""The running totals a run's summary is made of, kept by the recorder round by round.

The object itself is what a checkpoint stores and a resumed run takes back, so a total
added here is checkpointed with no other change.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunTotals:
    """The running totals the summary is made of: a checkpoint stores this object, and a resumed run takes it back."""

    dropped: dict[int, int]  # per client, over rounds: how often a simulated fault kept it out
    matrix: list[list[float]] = field(default_factory=list)  # A[e][j], a row per finished experience
    failures: int = 0
    epsilon: dict[int, float] = field(default_factory=dict)  # latest cumulative sample-level ε per client
    stopped: set[int] = field(default_factory=set)  # clients that hit their privacy budget
    ray_nodes: set[str] = field(default_factory=set)  # Ray nodes that ran a client
    strategy_metrics: dict[str, float | list[float]] | None = None  # the last round's that had any
    method_metrics: dict[str, float] | None = None  # the last round's aggregate that had any
    aggregated: list[int] = field(default_factory=list)  # client-level DP: the clipped updates each round summed
    # the accuracy on every experience after each round in which some client's experience ended: its matrix's rows
    end_accuracies: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def start(cls, num_clients: int) -> RunTotals:
        return cls(dropped=dict.fromkeys(range(num_clients), 0))
