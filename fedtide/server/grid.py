"""A Grid wrapper that makes a federation's order of nodes and replies reproducible.

Flower's simulation gives nodes random ids and returns replies as they arrive, so
both sampling (`random.sample` over node ids) and aggregation (a floating-point
sum over replies) would depend on the run and on Ray's scheduling. This wrapper
lists nodes and replies in the order of the data partition each node holds; it does
nothing else (what a round's replies mean is `ContinualStrategy`'s business), except
give up waiting for replies when the run is asked to stop (`fedtide.stop_signals`): Flower's
own wait would go on until its timeout.

Which partition a node holds is read from the runtime wherever it already knows
(`registered_partitions`: Flower's simulation and fedtide's in-process grid), so that
start-up does not grow with the clients that exist: asking each node costs one message
per node before round 1 (4 minutes for 10,000 nodes on Ray, docs/benchmarks.md). Only a
deployment's SuperNodes, each configured on its own machine, are all asked; elsewhere one
node is, to know that the backend is up. Every train reply names its partition, and
`ContinualStrategy` checks it against the one read here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.server.superlink.linkstate import InMemoryLinkState
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedtide.errors import FederationError, ScenarioError
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.stop_signals import raise_if_stopped

# Seconds between looks for replies: those of Flower's in-memory grid, the simulation's (under `flwr run`
# Flower's own grid looks every 3 s; a quicker look costs the SuperLink one more small request).
PULL_INTERVAL = 0.1
# Partition queries in flight at once during discovery. Flower's simulation hands messages to its workers by
# asking its LinkState, node by node every 0.1 s, for that node's undelivered messages, and each ask scans every
# message held (`vce_api.add_messages_to_queue`, `InMemoryLinkState.get_message_ins`): with all N queries in
# flight a pass costs N x N checks, which dominates discovery at a thousand nodes (docs/benchmarks.md, "node
# discovery"). A few at a time keeps a pass at N x DISCOVERY_BATCH and the workers busy.
DISCOVERY_BATCH = 50


class PartitionOrderedGrid(Grid):
    """Delegates to Flower's grid; orders node ids and replies by partition id."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.partition_of: dict[int, int] = {}
        self.present: set[int] | None = None  # the partitions whose nodes it lists; None: all

    def restricted_to(self, partitions: set[int]) -> PartitionOrderedGrid:
        """The same grid listing only the nodes of `partitions`: the clients in the stream this round."""
        view = copy.copy(self)
        view.present = partitions
        return view

    def discover(self, num_clients: int, timeout: float = 600.0, batch: int = DISCOVERY_BATCH) -> None:
        """Wait for `num_clients` nodes, learn which partition each one holds, and for a node's reply.

        From the runtime where it knows (`registered_partitions`), else by asking the
        nodes, `batch` at a time. Where the runtime knows, one node is asked all the
        same: its reply says that the backend is up (Ray's start-up draws from Python's
        `random`, with which Flower samples nodes, so no round may start before it ends)
        and checks the reading.
        """
        deadline = time.monotonic() + timeout
        while len(node_ids := list(self._grid.get_node_ids())) < num_clients:
            raise_if_stopped()
            if time.monotonic() > deadline:
                raise ScenarioError(
                    "partition.num_clients",
                    f"only {len(node_ids)} of {num_clients} nodes connected",
                    "start as many SuperNodes as partition.num_clients",
                )
            time.sleep(1)
        known = registered_partitions(self._grid)
        if known is None:
            self.partition_of = self._ask_partitions(node_ids, batch, deadline)
        else:
            self.partition_of = known
            first = min(known, key=known.__getitem__)
            answer = self._ask_partitions([first], batch, deadline).get(first)
            if answer is None:
                raise FederationError(f"node {first} did not answer within the {timeout:g} s that nodes have to start")
            if answer != known[first]:
                raise FederationError(
                    f"node {first} holds partition {answer}, not the {known[first]} its runtime registered it with "
                    "(`fedtide.server.grid.registered_partitions`)"
                )
        partitions = sorted(self.partition_of.values())
        if partitions != list(range(num_clients)):
            raise ScenarioError(
                "partition.num_clients",
                f"nodes hold partitions {partitions}, expected 0..{num_clients - 1}",
                "set each SuperNode's partition-id and num-partitions to match the scenario",
            )

    def _ask_partitions(self, node_ids: list[int], batch: int, deadline: float) -> dict[int, int]:
        """Ask these nodes which partition each holds (the ClientApp's `describe` query)."""
        answers = {}
        for start in range(0, len(node_ids), batch):
            queries = [
                Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                for n in node_ids[start : start + batch]
            ]
            for reply in self.send_and_receive(queries, timeout=max(0.0, deadline - time.monotonic())):
                if reply.has_error():
                    raise RuntimeError(
                        f"node {reply.metadata.src_node_id} failed to describe itself: {reply.error.reason}"
                    )
                answers[reply.metadata.src_node_id] = int(reply.content["node"]["partition_id"])
        return answers

    def get_node_ids(self) -> Iterable[int]:
        nodes = sorted(self._grid.get_node_ids(), key=lambda n: self.partition_of.get(n, n))
        if self.present is None:
            return nodes
        return [node for node in nodes if self.partition_of.get(node) in self.present]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's push-then-pull loop (`InMemoryGrid.send_and_receive`), stopping when the run is stopped."""
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            raise_if_stopped()
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(PULL_INTERVAL)
        return sorted(replies, key=lambda m: self.partition_of.get(m.metadata.src_node_id, m.metadata.src_node_id))

    # Plain delegation of the rest of Grid's interface.
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)


def registered_partitions(grid: Grid) -> dict[int, int] | None:
    """Node id -> partition id as the runtime behind `grid` assigned them; None where only the nodes can tell.

    - fedtide's `InProcessGrid` holds every node's `Context`, partition-id in its node_config;
    - Flower's simulation (`run_simulation`, and `flwr run` on the simulation runtime)
      registers its nodes one after another in its in-memory LinkState, the i-th with
      partition-id i (`vce_api._register_nodes`), and the LinkState lists its nodes in the
      order they registered. tests/test_discovery.py holds Flower to both;
    - a deployment's SuperNodes are each given a partition on their own machine.
    """
    if isinstance(grid, InProcessGrid):
        return {node: int(context.node_config["partition-id"]) for node, context in grid.contexts.items()}
    if isinstance(grid, InMemoryGrid) and isinstance(grid.state, InMemoryLinkState):
        return {node.node_id: partition for partition, node in enumerate(grid.state.get_node_info())}
    return None
