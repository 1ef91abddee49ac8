"""The StreamPlan: who trains on which samples of which classes, and from which round, decided once.

The scenario is turned into a plan before anything runs, and every consumer reads it:
the clients' datasets (`fedtide.data.stream`), DP planned steps and δ
(`fedtide.privacy.accounting`), consolidation on both sides (the client's `ConsolidationProgress`,
the server's experience ends), the server's evaluation and the report's classes, and
both audits. Nothing else derives a client's data.

A plan holds plain index arrays (numpy; no Avalanche), so checking a scenario and the
server's bookkeeping read it without the training stack. A client's training samples
are *sample ids* into the training pool: the training set (ids 0..N-1), then under a
canary audit one row per canary (id N + j for canary j, `fedtide.data.canaries`).

When each client meets which experience is the scenario's schedule
(`fedtide.scenario.schedule`), which the plan keeps and follows one for one; by default one
class-incremental stream in lockstep, experience e from global round e·R + 1 for every
client. Class-incremental experiences hold disjoint classes (the given order, else the
permutation Avalanche's `class_incremental_benchmark` draws from the seed); each
experience's training data is partitioned on its own among the clients that hold it. An experience's
samples are listed class by class, its last class first, each class in dataset order:
the order Avalanche's benchmark gave them, which the partitions (and so every number of
a run) were computed over. Under a canary audit an experience's included canaries follow
its client's regular samples, which stay exactly as without canaries, and canary images
leave the test data accuracy is measured on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedtide.data.canaries import Canaries, draw_canaries
from fedtide.data.datasets import load_dataset
from fedtide.data.partition import check_num_clients, partition_experiences
from fedtide.scenario.schedule import ClientSchedule, Schedule, Step, schedule
from fedtide.scenario.schema import PartitionConfig, Scenario
from fedtide.scenario.stream import StreamConfig


@dataclass(frozen=True, eq=False)
class ClientExperience:
    """One experience of one client: the samples it trains on, their classes, and its step in time."""

    step: Step  # which of the stream's experiences (whose test data measures it), from which round, how long
    classes: tuple[int, ...]  # the experience's classes; the client's own samples may hold fewer
    train: np.ndarray  # sample ids into the training pool, in training order (canaries last)

    @property
    def experience(self) -> int:
        return self.step.experience

    @property
    def start_round(self) -> int:
        return self.step.start_round

    @property
    def rounds(self) -> int:
        return self.step.rounds

    @property
    def end_round(self) -> int:
        return self.step.end_round

    @property
    def size(self) -> int:
        return len(self.train)


@dataclass(frozen=True, eq=False)
class ClientPlan:
    """Everything one client will train on, experience by experience."""

    client: int
    experiences: tuple[ClientExperience, ...]
    first_canary: int  # sample ids from here on are canaries, not training-set samples
    schedule: ClientSchedule  # its experiences in time, which `experiences` follow one for one

    @property
    def sizes(self) -> list[int]:
        """Its number of samples in each experience (0 where it holds none), canaries included."""
        return [exp.size for exp in self.experiences]

    @property
    def total(self) -> int:
        """Its whole dataset over the run: what sample-level DP protects."""
        return sum(self.sizes)

    def step_at(self, global_round: int) -> int | None:
        """Which of its own experiences (an index into `experiences`) it trains in at `global_round`;
        None before it joins or after it leaves."""
        return self.schedule.step_at(global_round)

    def at_round(self, global_round: int) -> ClientExperience | None:
        """The experience it trains in at `global_round`; None outside its rounds."""
        step = self.step_at(global_round)
        return None if step is None else self.experiences[step]

    def to_consolidate(self, settled_through: int, step: int) -> list[int]:
        """Its own past experiences (indices into `experiences`) to consolidate before training its
        experience `step`, those below `settled_through` being settled: each one it holds data in, in
        order (one without data has nothing to consolidate)."""
        return [i for i in range(settled_through, step) if self.experiences[i].size]

    def training_set_ids(self) -> np.ndarray:
        """Its samples of the training set over every experience, in order, canaries left out."""
        ids = np.concatenate([exp.train for exp in self.experiences])
        return ids[ids < self.first_canary]


@dataclass(frozen=True, eq=False)
class StreamPlan:
    """The run's data over time: each client's experiences, and each experience's test data."""

    classes: tuple[tuple[int, ...], ...]  # each experience's classes, sorted
    test: tuple[np.ndarray, ...]  # each experience's test indices that measure accuracy (no canary image)
    clients: tuple[ClientPlan, ...]
    held_out: np.ndarray  # test indices that no client trains on: all but canary images
    canaries: Canaries | None  # the canary audit's draws; None without one
    schedule: Schedule  # who is in which experience when: `lockstep`, `present`, `seen`, `end_rounds`
    kind: str = "class"  # the stream's kind: "domain" experiences hold every class, each under its transform

    def client(self, client: int) -> ClientPlan:
        return self.clients[client]

    def largest_client_dataset(self) -> int:
        return max(plan.total for plan in self.clients)


@dataclass(frozen=True)
class PlanInputs:
    """The scenario fields a plan depends on, and nothing else: its cache key."""

    dataset: str
    root: str | None
    stream: str  # the stream section as JSON
    partition: str  # the partition section as JSON
    canaries: int
    rounds_per_experience: int
    seed: int

    @classmethod
    def of(cls, scenario: Scenario) -> PlanInputs:
        return cls(
            dataset=scenario.dataset.name,
            root=str(scenario.dataset.root) if scenario.dataset.root else None,
            stream=scenario.stream.model_dump_json(),
            partition=scenario.partition.model_dump_json(),
            canaries=scenario.audit.canaries,
            rounds_per_experience=scenario.federation.rounds_per_experience,
            seed=scenario.seed,
        )

    @property
    def stream_config(self) -> StreamConfig:
        return StreamConfig.model_validate_json(self.stream)


def stream_plan(scenario: Scenario) -> StreamPlan:
    """The scenario's plan, built once per process (a Ray worker rebuilds clients every round, not plans).

    A scenario the data cannot serve (more clients than an experience has samples, more
    canaries than the test data can give) is a `ScenarioError` naming the field.
    """
    return build_plan(PlanInputs.of(scenario))


@lru_cache(maxsize=4)
def build_plan(inputs: PlanInputs) -> StreamPlan:
    """The plan of `inputs` (`stream_plan` for a scenario); cached, as every consumer asks for it."""
    data = load_dataset(inputs.dataset, inputs.root)
    train_labels, test_labels = data.train_y.numpy(), data.test_y.numpy()
    stream = inputs.stream_config
    config = PartitionConfig.model_validate_json(inputs.partition)
    timing = schedule(stream, config.num_clients, inputs.rounds_per_experience, inputs.seed)
    classes, train, test = _experiences(stream, train_labels, test_labels, inputs.seed)
    holders = [timing.holders(e) for e in range(len(classes))]
    counts = None if stream.lockstep else [len(each) for each in holders]
    check_num_clients([len(samples) for samples in train], config, counts)
    shares = partition_experiences(
        [train_labels[samples % len(train_labels)] for samples in train], config, seed=inputs.seed, holders=counts
    )
    share_of = {(e, client): shares[e][j] for e, each in enumerate(holders) for j, client in enumerate(each)}
    canaries = None
    if inputs.canaries:
        canaries = draw_canaries(inputs.canaries, test_labels, classes, config.num_clients, seed=inputs.seed)
    first_canary = len(train_labels) * (len(classes) if stream.kind == "domain" else 1)
    clients = []
    for client in timing.clients:
        experiences = [
            ClientExperience(
                step=step,
                classes=tuple(sorted(classes[step.experience])),
                train=_client_samples(
                    train[step.experience][share_of[step.experience, client.client]],
                    canaries,
                    step.experience,
                    client.client,
                    first_canary,
                ),
            )
            for step in client.steps
        ]
        clients.append(ClientPlan(client.client, tuple(experiences), first_canary, client))
    held_out = np.arange(len(test_labels))
    if canaries is not None:
        test = [ids[~np.isin(ids, canaries.image)] for ids in test]
        held_out = np.setdiff1d(held_out, canaries.image)
    return StreamPlan(
        classes=tuple(tuple(sorted(group)) for group in classes),
        test=tuple(test),
        clients=tuple(clients),
        held_out=held_out,
        canaries=canaries,
        schedule=timing,
        kind=stream.kind,
    )


def _experiences(
    stream: StreamConfig, train_labels: np.ndarray, test_labels: np.ndarray, seed: int
) -> tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]:
    """Each experience's classes, training sample ids and test indices, in stream order.

    Class-incremental: disjoint classes, samples listed as Avalanche's benchmark gave them.
    Domain-incremental: every class in every experience; experience d's sample ids are
    d·N + i for training sample i (its image under d's transform, `fedtide.data.stream`), and
    its test indices the whole test data (the transform is applied where it is measured).
    """
    num_classes = int(train_labels.max()) + 1
    if stream.kind == "domain":
        every = list(range(num_classes))
        n, test = len(train_labels), np.arange(len(test_labels))
        return (
            [every] * stream.n_experiences,
            [d * n + np.arange(n) for d in range(stream.n_experiences)],
            [test] * stream.n_experiences,
        )
    order = tuple(stream.class_order) if stream.class_order else None
    classes = experience_classes(num_classes, stream.n_experiences, order, seed)
    return classes, [stream_order(train_labels, g) for g in classes], [stream_order(test_labels, g) for g in classes]


def _client_samples(
    regular: np.ndarray, canaries: Canaries | None, experience: int, client: int, first_canary: int
) -> np.ndarray:
    """The client's regular samples of `experience`, then the canaries its coins put there."""
    if canaries is None:
        return regular
    joining = canaries.joining(experience)
    return np.concatenate([regular, first_canary + joining[canaries.client[joining] == client]])


def classes_per_experience(num_classes: int, n_experiences: int) -> list[int]:
    """How many classes each experience gets: as equal as possible, earlier ones take the rest.

    Every class is used: 10 classes in 3 experiences give 4, 3, 3 (Avalanche's
    `nc_benchmark` would refuse or drop classes instead).
    """
    base, extra = divmod(num_classes, n_experiences)
    return [base + (1 if e < extra else 0) for e in range(n_experiences)]


def experience_classes(
    num_classes: int, n_experiences: int, order: tuple[int, ...] | None, seed: int
) -> list[list[int]]:
    """The classes of each experience, in stream order: the given order, else Avalanche's seeded permutation.

    Avalanche's `class_incremental_benchmark` draws `torch.randperm` after seeding; the same
    draw comes here from a generator of its own, so no global RNG moves.
    """
    if order is None:
        order = tuple(torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist())
    starts = np.cumsum([0, *classes_per_experience(num_classes, n_experiences)])
    return [list(order[starts[e] : starts[e + 1]]) for e in range(n_experiences)]


def stream_order(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Indices of the samples of `classes`, class by class from the last, each in dataset order."""
    return np.concatenate([np.flatnonzero(labels == c) for c in reversed(classes)])
