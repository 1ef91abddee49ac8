"""The scenario's `stream:` section: what the experiences hold, and when each client meets them.

By default every client walks one class-incremental stream in lockstep (every client in
experience e over the same rounds, the same classes in the same order). The other fields
describe federated continual learning as the literature runs it: each client its own task
order (FedWeIT, Yoon et al. 2021), clients that start late, stay for their own number of
rounds, leave, or join mid-run with classes no one else holds (GLFC, Dong et al. 2022;
asynchronous FCL, Shenaj et al. 2023), and domain-incremental experiences (every class under a
new input distribution, van de Ven et al. 2022). `fedtide.scenario.schedule` turns these
fields into each client's rounds; `fedtide.data.stream_plan` into its data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fedtide.scenario.section import Section


class DomainConfig(Section):
    """Domain-incremental experiences: every class in each, under one transform per experience.

    The transforms are Avalanche's own: `rotation` is RotatedMNIST's (a fixed
    `RandomRotation(degrees=(a, a))`), `permutation` PermutedMNIST's (`PixelsPermutation`);
    without `angles`, each experience's angle or permutation is drawn from the scenario's
    seed as those benchmarks draw it (`numpy.random.RandomState(seed)`).
    """

    transform: Literal["rotation", "permutation"] = "rotation"
    angles: list[float] | None = None  # rotation only: degrees (-180..180), one per experience

    @field_validator("angles")
    @classmethod
    def _angles_in_range(cls, angles: list[float] | None) -> list[float] | None:
        if angles is not None and any(not -180 <= a <= 180 for a in angles):
            raise ValueError(f"angles must lie in -180..180 degrees; got {angles}")
        return angles


class ArrivalsConfig(Section):
    """When clients start, how long they stay in each experience, and who leaves or joins: by rule or seeded."""

    start: Literal["together", "staggered", "random"] = "together"
    every: int = Field(1, ge=0, description="staggered: client k starts its first experience at round 1 + k·every")
    max_delay: int = Field(0, ge=0, description="random: each client starts after a seeded 0..max_delay rounds")
    rounds: tuple[int, int] | None = Field(
        None, description="[fewest, most] rounds a client stays in each experience, seeded; default: the federation's"
    )
    leaving: int = Field(0, ge=0, description="clients (a seeded choice) that leave after `leave_after` experiences")
    leave_after: int = Field(1, ge=1)
    joining: int = Field(0, ge=0, description="the last `joining` partitions join at `join_round`...")
    join_round: int | None = Field(None, ge=2, description="default: halfway through the others' rounds")
    new_experiences: int = Field(1, ge=1, description="...holding alone the stream's last this-many experiences")

    @field_validator("rounds")
    @classmethod
    def _rounds_range(cls, rounds: tuple[int, int] | None) -> tuple[int, int] | None:
        if rounds is not None and not 1 <= rounds[0] <= rounds[1]:
            raise ValueError(f"rounds is [fewest, most] with 1 <= fewest <= most; got {list(rounds)}")
        return rounds


class ClientStream(Section):
    """One client's own stream, listed under `stream.clients`; a field left out follows the rules above."""

    order: list[int] | None = None  # the experiences it meets, in its order (it may hold fewer than all)
    start_round: int | None = Field(None, ge=1)
    rounds: int | None = Field(None, ge=1)  # in each of its experiences
    leave_after: int | None = Field(None, ge=1)  # experiences it trains in before it leaves


class StreamConfig(Section):
    kind: Literal["class", "domain"] = "class"
    n_experiences: int = Field(5, ge=1)
    class_order: list[int] | None = None  # class kind: the classes in stream order
    domain: DomainConfig | None = None  # domain kind: the transform (default: rotation)
    client_order: Literal["shared", "per_client"] = "shared"
    arrivals: ArrivalsConfig = ArrivalsConfig()
    clients: dict[int, ClientStream] = Field(default_factory=dict)  # partition id -> its own stream

    @field_validator("class_order")
    @classmethod
    def _class_order_unique(cls, order: list[int] | None) -> list[int] | None:
        if order is not None and len(set(order)) != len(order):
            raise ValueError("class_order repeats a class; list each class once")
        return order

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> StreamConfig:
        if self.kind == "domain":
            if self.class_order is not None:
                raise ValueError(
                    "class_order orders the classes of a class-incremental stream; "
                    "a domain stream holds every class in each experience: remove it"
                )
            angles = self.domain.angles if self.domain else None
            if angles is not None and len(angles) != self.n_experiences:
                raise ValueError(
                    f"domain.angles gives {len(angles)} angles for n_experiences={self.n_experiences}: "
                    "give one per experience"
                )
            if self.domain and self.domain.transform == "permutation" and self.domain.angles is not None:
                raise ValueError("domain.angles are for the rotation transform: remove them, or use rotation")
        elif self.domain is not None:
            raise ValueError("domain describes a domain-incremental stream: set kind: domain, or remove it")
        return self

    @property
    def transform(self) -> DomainConfig:
        """The domain stream's transform (rotation when none is named)."""
        return self.domain or DomainConfig()

    def describe(self) -> str:
        """`5 domain-incremental experiences (permutation), each client its own order, staggered starts, ...`"""
        kind = f"domain-incremental (by {self.transform.transform})" if self.kind == "domain" else "class-incremental"
        parts = [f"{self.n_experiences} {kind} experiences"]
        if self.client_order == "per_client":
            parts.append("each client its own order")
        arrivals = self.arrivals
        if arrivals.start != "together":
            parts.append(f"{arrivals.start} starts")
        if arrivals.rounds:
            parts.append(f"{arrivals.rounds[0]}-{arrivals.rounds[1]} rounds per experience")
        if arrivals.leaving:
            parts.append(f"{arrivals.leaving} leaving after {arrivals.leave_after}")
        if arrivals.joining:
            parts.append(f"{arrivals.joining} joining with {arrivals.new_experiences} new")
        if self.clients:
            parts.append(f"{len(self.clients)} listed")
        return ", ".join(parts)

    @property
    def lockstep(self) -> bool:
        """Every client in the same experience over the same rounds: the stream before any of the fields above."""
        return self.client_order == "shared" and self.arrivals == ArrivalsConfig() and not self.clients
