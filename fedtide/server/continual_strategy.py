"""The scenario's strategy, driven round by round with what a federated continual-learning run adds around it.

Flower adds behaviour around any strategy by wrapping it (its
`DifferentialPrivacyServerSideFixedClipping(strategy)` does); fedtide does the same,
so the user's strategy sees plain Flower calls and nothing else has to know about it.
`ContinualStrategy` holds the strategy (already inside any wrappers of fedtide's own,
`fedtide.server.strategies.federation_strategy`) and runs one round at a time, as Flower's
`Strategy.start` loop does (`configure_train`, the replies, `aggregate_train`, then
`configure_evaluate` and `aggregate_evaluate`; `summary` as each experience begins), and
returns what happened in the round (`RoundOutcome`) with its arrays:

- before `configure_train` it adds the experience's config, and after it the global
  weights that ended past experiences to clients that still have to consolidate them (as the run's
  `StreamPlan` says: a client first sampled late consolidates at the right weights); under simulated faults it
  withholds the messages of the sampled clients that fail this round (`FaultPlan`), as if
  they had gone offline: they train nothing, their state and privacy budget stay as they
  were, and the strategy aggregates the other replies exactly as it does when a real
  client does not answer (Flower's FedAvg averages whatever replies it gets, fewer than
  `min_train_nodes` included, and keeps the current weights when there are none);
- before `aggregate_train` it seeds numpy's global RNG from (seed, round) (from the OS's
  entropy when the seed is None: `privacy.secure_rng`), so a strategy that draws from
  it draws the same numbers wherever and in whatever order the clients ran; it records every
  client's reply, drops the replies of clients that trained on nothing or failed (a
  failure is counted and its reason kept; a round in which every client that was sent
  a message failed stops the run), checks that each reply comes from the partition its
  node was taken to hold (the order nodes are sampled in rests on it), checks the clients'
  and the strategy's arrays against the model, and names the strategy when it raises;
  under checkpoints it takes each client's `Context.state` out of its reply and keeps
  it. Of the MetricRecord the strategy returns it records the strategy's own keys: a key
  the clients' replies carried (`num-examples`, `train_loss`, `method.*`, the
  client-level weight) comes back only averaged, and the run files have each client's
  value and fedtide's aggregate;
- every hook draws from `random` through the strategy's own stream (`StrategyRandom`):
  Flower's node sampling is the same in every run of a seed, and seeds nobody else's.

The strategy is asked for the experience's rounds 1..R (`server-round`, restarting every
experience; the global round is `round-offset` + that); a run resumed inside an
experience runs its remaining rounds only, with the round numbers of an uninterrupted run.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtide.data.stream_plan import StreamPlan
from fedtide.errors import FederationError, raised_at
from fedtide.records.metrics import ClientDrop, ClientFailure, ClientRoundRecord
from fedtide.records.wire import CONTRACT_BROKEN, client_round, experience_end_key, take_client_state
from fedtide.registry import defined_at
from fedtide.server.array_check import array_problem
from fedtide.server.checkpoint import ClientStates, restore_strategy, strategy_state
from fedtide.server.faults import FaultPlan
from fedtide.server.grid import PartitionOrderedGrid
from fedtide.server.sampling import StrategyRandom
from fedtide.server.strategies import innermost

Result = TypeVar("Result")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPLY_TIMEOUT = 3600.0  # seconds a round waits for its replies: Flower's `Strategy.start` default


@dataclass
class RoundOutcome:
    """What happened in one training round, as the recorder writes it."""

    global_round: int
    sampled: int = 0
    dropped: list[ClientDrop] = field(default_factory=list)  # sampled, but kept out by a simulated fault
    reports: list[ClientRoundRecord] = field(default_factory=list)
    failures: list[ClientFailure] = field(default_factory=list)  # one line each
    failure_logs: list[str] = field(default_factory=list)  # each failure in full, for the run's log
    # what aggregate_train returned beyond the clients' own MetricRecord keys, which it only averaged
    strategy_metrics: dict[str, float | list[float]] | None = None
    aggregated: int = 0  # the replies handed to the strategy's aggregate_train

    @property
    def sent(self) -> int:
        """The clients that were sent a train message: the sampled ones that did not drop."""
        return self.sampled - len(self.dropped)


class RoundAborted(FederationError):
    """A round that stops the run; `failure_logs` are its clients' failures in full, for the run's log."""

    def __init__(self, message: str, failure_logs: list[str]) -> None:
        super().__init__(message)
        self.failure_logs = failure_logs


class ContinualStrategy:
    """Runs `strategy`'s rounds, adding the experience loop's messages and checks."""

    def __init__(
        self,
        strategy: Strategy,
        reference: ArrayRecord,
        partition_of: dict[int, int],
        plan: StreamPlan,
        faults: FaultPlan | None = None,
        seed: int | None = 0,
    ) -> None:
        self.strategy = strategy
        self.seed = seed
        self.reference = reference  # arrays whose keys, shapes and dtypes every model must have
        self.partition_of = partition_of  # node id -> partition id
        self.plan = plan  # which past experiences each client holds data in, and so consolidates
        self.faults = faults  # None: no simulated faults
        self.random = StrategyRandom(seed)  # what the strategy's hooks draw from `random`
        self.experience = 0
        self.round_offset = 0
        self.experience_config = ConfigRecord()
        self.round_ends: dict[int, ArrayRecord] = {}  # global round -> the weights after it, where a step ended
        self.settled_through: dict[int, int] = {}  # node id -> its own experience at its last successful reply
        self.client_states = ClientStates()  # partition id -> Context.state its last reply carried

    @property
    def name(self) -> str:
        """The wrapped strategy's class as a user finds it in their code: `my_pkg.agg.TrimmedMomentum`.

        Under fedtide's own wrappers (client-level DP) that is the strategy inside them."""
        strategy = type(innermost(self.strategy))
        return f"{strategy.__module__}.{strategy.__qualname__}"

    def begin_experience(
        self, experience: int, arrays: ArrayRecord, config: ConfigRecord, rounds: int, done: int = 0
    ) -> None:
        """Enter stage `experience` (in lockstep, the experience) with `done` of its rounds already run
        (a resumed run), starting from `arrays`.

        With none done, the strategy's `random` stream starts afresh (resumed, it goes on
        from the checkpoint's).
        """
        if done == 0:
            self.random.begin_experience(experience)
        self.experience = experience
        self.round_offset = experience * rounds
        self.experience_config = config
        self._call(self.strategy.summary)  # as Flower's `start()` does when it begins

    def global_round(self, server_round: int) -> int:
        """The global round of the experience's round `server_round`."""
        return self.round_offset + server_round

    def checkpoint_state(self) -> dict[str, Any]:
        """What the rounds to come depend on: the strategy's attributes and the experience loop's bookkeeping.

        Node ids are the simulation's (random per run), so who settled what is kept by partition.
        """
        return {
            "strategy": strategy_state(self.strategy),
            "random": self.random.getstate(),
            "round_ends": dict(self.round_ends),
            "settled_through": {self.partition_of[node]: e for node, e in self.settled_through.items()},
            "client_states": self.client_states,  # a checkpoint writes those that changed since the last
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take back a `checkpoint_state()`, with `partition_of` already learned from this run's nodes."""
        restore_strategy(self.strategy, state["strategy"])
        self.random.setstate(state["random"])
        self.round_ends = dict(state["round_ends"])
        node_of = {partition: node for node, partition in self.partition_of.items()}
        self.settled_through = {node_of[p]: e for p, e in state["settled_through"].items()}
        self.client_states = state["client_states"]

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, RoundOutcome]:
        """The experience's round `server_round` from `arrays`: the new global arrays, and what happened."""
        outcome = RoundOutcome(self.global_round(server_round))
        if outcome.global_round - 1 in self.plan.schedule.end_rounds:  # `arrays` ended some client's experience
            self.round_ends[outcome.global_round - 1] = arrays
        messages = self._configure_train(server_round, arrays, grid, outcome)
        replies = grid.send_and_receive(messages, timeout=REPLY_TIMEOUT)
        try:
            aggregated = self._aggregate_train(server_round, replies, outcome)
        except FederationError as error:
            raise RoundAborted(str(error), outcome.failure_logs) from error
        return (arrays if aggregated is None else aggregated), outcome

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The strategy's federated evaluation of the round, as Flower's `start()` runs it (none by default)."""
        present = self._in_stream(grid, self.global_round(server_round))
        messages = self._call(self.strategy.configure_evaluate, server_round, arrays, ConfigRecord(), present)
        replies = grid.send_and_receive(messages, timeout=REPLY_TIMEOUT)
        return self._call(self.strategy.aggregate_evaluate, server_round, replies)

    def _configure_train(
        self, server_round: int, arrays: ArrayRecord, grid: Grid, outcome: RoundOutcome
    ) -> list[Message]:
        config = ConfigRecord(dict(self.experience_config))
        grid = self._in_stream(grid, outcome.global_round)
        messages = list(self._call(self.strategy.configure_train, server_round, arrays, config, grid))
        outcome.sampled = len(messages)
        delivered = []
        for message in messages:
            partition = self._partition(message.metadata.dst_node_id)
            fault = self.faults.fault(partition, outcome.global_round) if self.faults else None
            if fault:
                outcome.dropped.append(ClientDrop(partition_id=partition, fault=fault))
                continue
            self._add_experience_ends(message, server_round)
            delivered.append(message)
        outcome.dropped.sort(key=lambda drop: drop.partition_id)
        return delivered

    def _partition(self, node_id: int) -> int:
        return self.partition_of.get(node_id, node_id)

    def _in_stream(self, grid: Grid, global_round: int) -> Grid:
        """The grid as the strategy sees it this round: only the nodes of clients in the stream
        (all of them in lockstep), so that it samples among those, as a server samples connected clients."""
        if self.plan.schedule.lockstep:
            return grid
        if not isinstance(grid, PartitionOrderedGrid):
            raise FederationError("a stream whose clients join or leave needs fedtide's PartitionOrderedGrid")
        return grid.restricted_to(set(self.plan.schedule.present(global_round)))

    def _add_experience_ends(self, message: Message, server_round: int) -> None:
        """Give the node the weights that ended each of its past experiences it has not been seen to
        settle and will consolidate: those its plan gives it data in.

        The weights that ended an experience in the previous round are the message's own,
        so with every client sampled every round nothing extra is ever sent.
        """
        node = message.metadata.dst_node_id
        client = self.plan.client(self._partition(node))
        global_round = self.global_round(server_round)
        owed = client.to_consolidate(self.settled_through.get(node, 0), client.step_at(global_round))
        ends = {step: client.experiences[step].end_round for step in owed}
        extra = {experience_end_key(s): self.round_ends[end] for s, end in ends.items() if end != global_round - 1}
        if extra:
            message.content = RecordDict({**dict(message.content.items()), **extra})

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message], outcome: RoundOutcome
    ) -> ArrayRecord | None:
        trained = self._take_replies(replies, outcome)
        outcome.aggregated = len(trained)
        round_key = f"{self.seed}/aggregate/{outcome.global_round}".encode()
        np.random.seed(None if self.seed is None else zlib.crc32(round_key))
        clients_keys = {key for reply in trained for key in reply.content["metrics"]}
        result = self._call(self.strategy.aggregate_train, server_round, trained)
        if problem := _result_problem(result):
            got, fix = problem
            raise FederationError(
                f"strategy {self.name}.aggregate_train returned {got} in round {outcome.global_round}, expected "
                f"(ArrayRecord | None, MetricRecord | None) ({defined_at(self.strategy.aggregate_train)}): {fix}"
            )
        arrays, metrics = result
        if metrics:  # the strategy's own: its aggregate of the clients' keys is theirs (num-examples, method.*)
            own = {key: _number(value) for key, value in metrics.items() if key not in clients_keys}
            outcome.strategy_metrics = own or None
        problem = None if arrays is None else array_problem(arrays, self.reference)
        if problem:
            raise FederationError(
                f"strategy {self.name} returned malformed arrays in round {outcome.global_round}: {problem}"
            )
        return arrays

    def _take_replies(self, replies: Iterable[Message], outcome: RoundOutcome) -> list[Message]:
        """Record every reply in `outcome`; the ones the strategy aggregates: usable, from clients that trained."""
        trained: list[Message] = []
        for reply in replies:
            partition = self._partition(reply.metadata.src_node_id)
            if reply.has_error():
                reason = _ANSI.sub("", reply.error.reason)  # Ray colours its tracebacks
                outcome.failures.append(ClientFailure(partition_id=partition, reason=_one_line(reason)))
                outcome.failure_logs.append(f"client {partition}, round {outcome.global_round}: {reason}")
                if reply.error.code == CONTRACT_BROKEN:  # every round would fail alike: stop now
                    raise FederationError(f"client {partition} in round {outcome.global_round}: {_one_line(reason)}")
                continue
            state = take_client_state(reply.content)  # the client kept it even if its arrays are unusable
            if state is not None:
                self.client_states.put(partition, state)
            problem = array_problem(reply.content["arrays"], self.reference)
            if problem:
                reason = f"client {partition} returned unusable weights in round {outcome.global_round}: {problem}"
                outcome.failures.append(ClientFailure(partition_id=partition, reason=reason))
                continue
            report = client_round(reply.content)
            if report.partition_id != partition:  # the node order, hence sampling, rested on a wrong partition
                raise FederationError(
                    f"node {reply.metadata.src_node_id} holds partition {report.partition_id}, not the "
                    f"{partition} the server took it to hold (`fedtide.server.grid.registered_partitions`)"
                )
            outcome.reports.append(report)
            self._settle(reply.metadata.src_node_id, partition, report, outcome.global_round)
            if report.num_examples > 0:  # a client with no data, or out of budget, replied the global model
                trained.append(reply)
        if outcome.sent and not outcome.reports:
            raise FederationError(
                f"every sampled client{' that did not drop' if outcome.dropped else ''} failed in round "
                f"{outcome.global_round}; "
                f"client {outcome.failures[0].partition_id} said: {outcome.failures[0].reason}"
            )
        return trained

    def _settle(self, node: int, partition: int, report: ClientRoundRecord, global_round: int) -> None:
        """Mark the node's past experiences settled, once its counts show each one it owed consolidated:
        a client out of privacy budget replies before consolidating, and must be sent their weights again."""
        own = self.plan.client(partition)
        step = own.step_at(global_round)
        owed = own.to_consolidate(self.settled_through.get(node, 0), step)
        if all(report.consolidation_counts[past] for past in owed):
            self.settled_through[node] = step

    def _call(self, hook: Callable[..., Result], *args: Any) -> Result:
        """Run one of the strategy's hooks, drawing from the strategy's own `random` stream; its exception
        becomes one line naming it, the round and where."""
        try:
            with self.random.drawing():
                return hook(*args)
        except FederationError:
            raise
        except Exception as error:
            server_round = self.global_round(args[0]) if args else self.round_offset
            raise FederationError(
                f"strategy {self.name} raised in round {server_round}: {type(error).__name__}: {error} "
                f"({raised_at(error)}){_keys_held(error, args)}"
            ) from error


def _result_problem(result: Any) -> tuple[str, str] | None:
    """What `aggregate_train` returned (its types) and the fix; None for (ArrayRecord | None, MetricRecord | None)."""
    if not (isinstance(result, tuple) and len(result) == 2):
        return type(result).__name__, "return the pair (arrays, metrics)"
    arrays, metrics = result
    if isinstance(arrays, ArrayRecord | None) and isinstance(metrics, MetricRecord | None):
        return None
    got = f"({type(arrays).__name__}, {type(metrics).__name__})"
    return got, (
        "wrap them, from flwr.app: ArrayRecord({name: Array.from_numpy_ndarray(a), ...}), MetricRecord({name: number})"
    )


def _keys_held(error: Exception, args: tuple[Any, ...]) -> str:
    """For a KeyError in a hook: the keys its records hold, so the message says what could have been read.

    A hook reads replies' records (`reply.content["metrics"]["loss"]`) or the config it was
    given; Flower's own aggregation reads `weighted_by_key`. Neither KeyError nor Flower's
    `InconsistentMessageReplies` says which keys there were.
    """
    if not isinstance(error, KeyError) and "Missing required key" not in str(error):
        return ""
    held: list[str] = []
    for arg in args:
        if isinstance(arg, ConfigRecord | MetricRecord):
            held.append(f"the {'config' if isinstance(arg, ConfigRecord) else 'metrics'} holds {', '.join(arg)}")
        elif isinstance(arg, list) and arg and isinstance(arg[0], Message):
            content = arg[0].content
            held.append(f"a reply holds the records {', '.join(content)}")
            held += [
                f"its {name} holds {', '.join(record)}"
                for name, record in content.items()
                if isinstance(record, ConfigRecord | MetricRecord)
            ]
    return f"; {'; '.join(held)}: read one of these keys" if held else ""


def _number(value: Any) -> float | list[float]:
    """A MetricRecord value (a number or a list of them) as JSON writes it."""
    return [float(v) for v in value] if isinstance(value, list) else float(value)


def _one_line(reason: str) -> str:
    """The sentence of a client's error that says what happened.

    fedtide's ClientApp puts it first, its traceback after (`fedtide.errors.failure_report`);
    an error raised through Flower (a ClientApp that is not fedtide's, a worker that died)
    ends with it, after Flower's and Ray's wrapping.
    """
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Traceback"):
        return lines[0]
    return lines[-1].removesuffix("'>") if lines else ""
