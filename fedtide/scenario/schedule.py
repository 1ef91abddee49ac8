"""Each client's experiences in time: which of the stream's experiences, from which global round, for how long.

Made from the scenario alone (no data), so that checking a scenario, the run's length and
the server's loop know it before anything loads. The rules of `stream.arrivals` and the
per-client order are drawn from the scenario's seed, each from a stream of its own
(`_rng`), so changing one rule never moves another's draws; a client listed under
`stream.clients` takes what it lists over the rules. A client's experiences follow each
other without a gap: its experience i + 1 starts the round after its experience i ends.

In lockstep (the default) client k's experience e is the stream's experience e, from
round e·R + 1 for R = `federation.rounds_per_experience` rounds, for every k.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from fedtide.scenario.stream import StreamConfig


@dataclass(frozen=True)
class Step:
    """One experience of one client in time."""

    experience: int  # the stream's experience: whose classes (or domain) and test data
    start_round: int  # global round, from 1
    rounds: int

    @property
    def end_round(self) -> int:
        return self.start_round + self.rounds - 1


@dataclass(frozen=True)
class ClientSchedule:
    client: int
    steps: tuple[Step, ...]  # in the order the client meets them

    def step_at(self, global_round: int) -> int | None:
        """The index of the step it is in at `global_round`; None before it joins or after it leaves."""
        return next((i for i, s in enumerate(self.steps) if s.start_round <= global_round <= s.end_round), None)


@dataclass(frozen=True)
class Schedule:
    clients: tuple[ClientSchedule, ...]

    @property
    def last_round(self) -> int:
        return max(step.end_round for client in self.clients for step in client.steps)

    @cached_property
    def lockstep(self) -> bool:
        """Every client in the same experiences over the same rounds (the default stream's schedule)."""
        return all(client.steps == self.clients[0].steps for client in self.clients)

    @cached_property
    def end_rounds(self) -> frozenset[int]:
        """The global rounds after which some client's experience ends."""
        return frozenset(step.end_round for client in self.clients for step in client.steps)

    def present(self, global_round: int) -> list[int]:
        """The clients in the stream at `global_round`: those the server may sample."""
        return [c.client for c in self.clients if c.step_at(global_round) is not None]

    @cached_property
    def first_rounds(self) -> dict[int, int]:
        """Each experience's earliest round in any client's schedule (asked every round: made once)."""
        first: dict[int, int] = {}
        for client in self.clients:
            for step in client.steps:
                first[step.experience] = min(first.get(step.experience, step.start_round), step.start_round)
        return dict(sorted(first.items()))

    def seen(self, global_round: int) -> list[int]:
        """The experiences some client has begun by `global_round` (in lockstep, 0 up to the current one)."""
        return [experience for experience, first in self.first_rounds.items() if first <= global_round]

    def holders(self, experience: int) -> list[int]:
        """The clients that hold data of `experience`: its training data is partitioned among them."""
        return [c.client for c in self.clients if any(s.experience == experience for s in c.steps)]


def schedule(stream: StreamConfig, num_clients: int, rounds_per_experience: int, seed: int) -> Schedule:
    """The clients' schedule; an impossible one is a ValueError naming the field (`schedule_problem` first)."""
    return _schedule(stream.model_dump_json(), num_clients, rounds_per_experience, seed)


@lru_cache(maxsize=16)
def _schedule(stream_json: str, num_clients: int, rounds_per_experience: int, seed: int) -> Schedule:
    stream = StreamConfig.model_validate_json(stream_json)
    problem = _rules_problem(stream, num_clients)
    if problem:
        raise ValueError(problem)
    arrivals, n = stream.arrivals, stream.n_experiences
    joiners = set(range(num_clients - arrivals.joining, num_clients))
    new = list(range(n - arrivals.new_experiences, n)) if joiners else []
    regular = [e for e in range(n) if e not in new]
    leavers = _leavers(stream, num_clients - len(joiners), seed)
    starts = _starts(stream, num_clients - len(joiners), seed)
    clients = []
    for client in range(num_clients):
        listed = stream.clients.get(client)
        order = new if client in joiners else regular
        if stream.client_order == "per_client":
            order = [int(e) for e in _rng(seed, "order", client).permutation(order)]
        if listed and listed.order is not None:
            order = list(listed.order)
        keep = (
            listed.leave_after
            if listed and listed.leave_after
            else (arrivals.leave_after if client in leavers else len(order))
        )
        order = order[:keep]
        rounds = _rounds(stream, rounds_per_experience, client, len(order), seed)
        if listed and listed.rounds:
            rounds = [listed.rounds] * len(order)
        start = starts[client] if client not in joiners else None
        if listed and listed.start_round:
            start = listed.start_round
        clients.append((client, order, rounds, start))
    regular_end = max(s + sum(r) - 1 for _, _, r, s in clients if s is not None)
    join_round = arrivals.join_round or max(2, regular_end // 2 + 1)
    return Schedule(tuple(_client(c, order, rounds, join_round if s is None else s) for c, order, rounds, s in clients))


def _client(client: int, order: list[int], rounds: list[int], start: int) -> ClientSchedule:
    starts = start + np.cumsum([0, *rounds[:-1]])
    return ClientSchedule(client, tuple(Step(e, int(s), r) for e, s, r in zip(order, starts, rounds)))


def _rng(seed: int, rule: str, client: int = 0) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{seed}/stream/{rule}/{client}".encode()))


def _leavers(stream: StreamConfig, present_from_start: int, seed: int) -> set[int]:
    chosen = _rng(seed, "leaving").choice(present_from_start, size=stream.arrivals.leaving, replace=False)
    return {int(c) for c in chosen}


def _starts(stream: StreamConfig, present_from_start: int, seed: int) -> list[int]:
    """Each client's first round (those present from the start): the earliest is round 1."""
    arrivals = stream.arrivals
    if arrivals.start == "staggered":
        return [1 + k * arrivals.every for k in range(present_from_start)]
    if arrivals.start == "random":
        delays = _rng(seed, "start").integers(0, arrivals.max_delay + 1, size=present_from_start)
        return [1 + int(d - delays.min()) for d in delays]
    return [1] * present_from_start


def _rounds(stream: StreamConfig, rounds_per_experience: int, client: int, steps: int, seed: int) -> list[int]:
    if stream.arrivals.rounds is None:
        return [rounds_per_experience] * steps
    fewest, most = stream.arrivals.rounds
    return [int(r) for r in _rng(seed, "rounds", client).integers(fewest, most + 1, size=steps)]


def _rules_problem(stream: StreamConfig, num_clients: int) -> str | None:
    """What makes the rules impossible before any client is placed in time, naming the field; None if nothing."""
    arrivals, n = stream.arrivals, stream.n_experiences
    for client, listed in stream.clients.items():
        if not 0 <= client < num_clients:
            return f"stream.clients: no client {client} (partition.num_clients={num_clients}: ids 0..{num_clients - 1})"
        order = listed.order
        if order is not None and (not order or len(set(order)) != len(order) or not set(order) <= set(range(n))):
            return (
                f"stream.clients.{client}.order: {order} must list some of the experiences 0..{n - 1}, "
                "each at most once"
            )
    if arrivals.joining >= num_clients:
        return (
            f"stream.arrivals.joining={arrivals.joining}: at least one of the {num_clients} clients must be "
            "there from the start; join fewer"
        )
    if arrivals.joining and arrivals.new_experiences >= n:
        return (
            f"stream.arrivals.new_experiences={arrivals.new_experiences}: the clients there from the start need "
            f"at least one of the {n} experiences; use at most {n - 1}"
        )
    if arrivals.leaving > num_clients - arrivals.joining:
        return (
            f"stream.arrivals.leaving={arrivals.leaving}: only {num_clients - arrivals.joining} clients are there "
            "from the start"
        )
    held = n - (arrivals.new_experiences if arrivals.joining else 0)
    if arrivals.leaving and arrivals.leave_after >= held:
        return (
            f"stream.arrivals.leave_after={arrivals.leave_after}: a client there from the start holds {held} "
            f"experiences, so leaving after {arrivals.leave_after} is not leaving; use at most {held - 1}"
        )
    return None


def schedule_problem(stream: StreamConfig, num_clients: int, rounds_per_experience: int, seed: int) -> str | None:
    """Why the clients' schedule is impossible, naming the field; None if it is not."""
    problem = _rules_problem(stream, num_clients)
    if problem:
        return problem
    plan = schedule(stream, num_clients, rounds_per_experience, seed)
    orphans = [e for e in range(stream.n_experiences) if not plan.holders(e)]
    if orphans:
        return f"stream.clients: no client holds experience {orphans[0]}; list it in some client's order"
    empty = next((r for r in range(1, plan.last_round + 1) if not plan.present(r)), None)
    if empty is not None:
        return (
            f"stream.arrivals: no client is in the stream at round {empty}: "
            "start, join or keep clients so that every round has one"
        )
    return None
