"""The scenario's strategy, wrapped with what a federated continual-learning run adds around it.

Flower adds behaviour around any strategy by wrapping it (its
`DifferentialPrivacyServerSideFixedClipping(strategy)` does); fedtide does the same,
so the user's strategy sees plain Flower calls and nothing else has to know about it:

- `configure_train` adds the experience's config to the strategy's messages, and the
  global weights that ended past experiences to clients that still have to
  consolidate them (a client first sampled late consolidates at the right weights);
  under simulated faults it withholds the messages of the sampled clients that fail
  this round (`FaultPlan`), as if they had gone offline: they train nothing, their
  state and privacy budget stay as they were, and the strategy aggregates the other
  replies exactly as it does when a real client does not answer (Flower's FedAvg
  averages whatever replies it gets, fewer than `min_train_nodes` included, and keeps
  the current weights when there are none);
- `aggregate_train` seeds numpy's global RNG from (seed, round) first (from the OS's
  entropy when the seed is None: `privacy.secure_rng`), so a strategy that draws from
  it draws the same numbers wherever and in whatever order the clients ran; it records every
  client's reply, drops the replies of clients that trained on nothing or failed (a
  failure is counted and its reason kept; a round in which every client that was sent
  a message failed stops the run), checks the clients' and the strategy's arrays
  against the model, and names the strategy when it raises; under checkpoints it
  takes each client's `Context.state` out of its reply and keeps it. Of the MetricRecord
  the strategy returns it records the strategy's own keys: a key the clients' replies
  carried (`num-examples`, `train_loss`, `method.*`, the client-level weight) comes back
  only averaged, and the run files have each client's value and fedtide's aggregate.

Round numbers in every message are global (experience × rounds + round). A run resumed
inside an experience calls `start()` for its remaining rounds only; the wrapper maps
`start()`'s rounds back to the experience's, so the strategy and the clients see the
round numbers of an uninterrupted run.
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

from fedtide.errors import FederationError, raised_at
from fedtide.privacy.dp_fedavg import current_clipping_norm, unwrapped
from fedtide.protocol import CONTRACT_BROKEN, client_round, experience_end_key, take_client_state
from fedtide.records.metrics import ClientDrop, ClientFailure, ClientRoundRecord
from fedtide.registry import defined_at
from fedtide.server.array_check import array_problem
from fedtide.server.checkpoint import restore_strategy, strategy_state
from fedtide.server.faults import FaultPlan

Result = TypeVar("Result")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
    clipping_norm: float | None = None  # client-level DP: the norm the round's updates were clipped to
    aggregated: int = 0  # the replies handed to the strategy's aggregate_train

    @property
    def sent(self) -> int:
        """The clients that were sent a train message: the sampled ones that did not drop."""
        return self.sampled - len(self.dropped)


class ContinualStrategy(Strategy):
    """Delegates aggregation to `strategy`; adds the experience loop's messages and checks."""

    def __init__(
        self,
        strategy: Strategy,
        reference: ArrayRecord,
        partition_of: dict[int, int],
        faults: FaultPlan | None = None,
        seed: int | None = 0,
    ) -> None:
        self.strategy = strategy
        self.seed = seed
        self.reference = reference  # arrays whose keys, shapes and dtypes every model must have
        self.partition_of = partition_of  # node id -> partition id
        self.faults = faults  # None: no simulated faults
        self.experience = 0
        self.round_offset = 0
        self.first_round = 1  # the experience's round that start()'s round 1 is (later when resumed inside it)
        self.experience_config = ConfigRecord()
        self.experience_ends: dict[int, ArrayRecord] = {}
        self.settled_through: dict[int, int] = {}  # node id -> experience of its last successful reply
        self.client_states: dict[int, RecordDict] = {}  # partition id -> Context.state its last reply carried
        self.last_round = RoundOutcome(0)

    @property
    def name(self) -> str:
        """The wrapped strategy's class as a user finds it in their code: `my_pkg.agg.TrimmedMomentum`.

        Under client-level DP that is the strategy inside the DP-FedAvg wrapper."""
        strategy = type(unwrapped(self.strategy))
        return f"{strategy.__module__}.{strategy.__qualname__}"

    def begin_experience(
        self, experience: int, arrays: ArrayRecord, config: ConfigRecord, rounds: int, done: int = 0
    ) -> None:
        """Enter `experience` with `done` of its rounds already run (a resumed run), starting from `arrays`.

        With none done, `arrays` are the weights that ended the previous experience.
        """
        if experience > 0 and done == 0:
            self.experience_ends[experience - 1] = arrays
        self.experience = experience
        self.round_offset = experience * rounds
        self.first_round = done + 1
        self.experience_config = config

    def round_in_experience(self, server_round: int) -> int:
        """The experience's round that `start()` calls `server_round` (the same, unless resumed inside it)."""
        return server_round + self.first_round - 1

    def global_round(self, server_round: int) -> int:
        """The global round of the experience's round `server_round`."""
        return self.round_offset + server_round

    def checkpoint_state(self) -> dict[str, Any]:
        """What the rounds to come depend on: the strategy's attributes and the experience loop's bookkeeping.

        Node ids are the simulation's (random per run), so who settled what is kept by partition.
        """
        return {
            "strategy": strategy_state(self.strategy),
            "experience_ends": dict(self.experience_ends),
            "settled_through": {self.partition_of[node]: e for node, e in self.settled_through.items()},
            "client_states": dict(self.client_states),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take back a `checkpoint_state()`, with `partition_of` already learned from this run's nodes."""
        restore_strategy(self.strategy, state["strategy"])
        self.experience_ends = dict(state["experience_ends"])
        node_of = {partition: node for node, partition in self.partition_of.items()}
        self.settled_through = {node_of[p]: e for p, e in state["settled_through"].items()}
        self.client_states = dict(state["client_states"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round = self.round_in_experience(server_round)
        config = ConfigRecord({**dict(config), **dict(self.experience_config)})
        messages = list(self._call(self.strategy.configure_train, server_round, arrays, config, grid))
        outcome = RoundOutcome(
            self.global_round(server_round), sampled=len(messages), clipping_norm=current_clipping_norm(self.strategy)
        )
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
        self.last_round = outcome
        return delivered

    def _partition(self, node_id: int) -> int:
        return self.partition_of.get(node_id, node_id)

    def _add_experience_ends(self, message: Message, server_round: int) -> None:
        """Give the node the weights that ended each past experience it has not been seen to settle.

        In round 1 of an experience the message's own arrays ended the previous one, so
        with every client sampled every round nothing extra is ever sent.
        """
        node = message.metadata.dst_node_id
        owed = range(self.settled_through.get(node, 0), self.experience)
        extra = {experience_end_key(e): self.experience_ends[e] for e in owed}
        if server_round == 1:
            extra.pop(experience_end_key(self.experience - 1), None)
        if extra:
            message.content = RecordDict({**dict(message.content.items()), **extra})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.round_in_experience(server_round)
        outcome = self.last_round
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
                self.client_states[partition] = state
            problem = array_problem(reply.content["arrays"], self.reference)
            if problem:
                reason = f"client {partition} returned unusable weights in round {outcome.global_round}: {problem}"
                outcome.failures.append(ClientFailure(partition_id=partition, reason=reason))
                continue
            report = client_round(reply.content)
            outcome.reports.append(report)
            self.settled_through[reply.metadata.src_node_id] = self.experience
            if report.num_examples > 0:  # a client with no data, or out of budget, replied the global model
                trained.append(reply)
        if outcome.sent and not outcome.reports:
            raise FederationError(
                f"every sampled client{' that did not drop' if outcome.dropped else ''} failed in round "
                f"{outcome.global_round}; "
                f"client {outcome.failures[0].partition_id} said: {outcome.failures[0].reason}"
            )
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
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._call(
            self.strategy.configure_evaluate, self.round_in_experience(server_round), arrays, config, grid
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self._call(self.strategy.aggregate_evaluate, self.round_in_experience(server_round), replies)

    def summary(self) -> None:
        self._call(self.strategy.summary)

    def _call(self, hook: Callable[..., Result], *args: Any) -> Result:
        """Run one of the strategy's hooks; its exception becomes one line naming it, the round and where."""
        try:
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
