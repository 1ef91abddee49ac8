"""A Grid wrapper that makes a federation's order of nodes and replies reproducible.

Flower's simulation gives nodes random ids and returns replies as they arrive, so
both sampling (`random.sample` over node ids) and aggregation (a floating-point
sum over replies) would depend on the run and on Ray's scheduling. This wrapper
asks every node for its data partition once, then lists nodes and replies in
partition order; it does nothing else (what a round's replies mean is
`ContinualStrategy`'s business), except give up waiting for replies when the run is
asked to stop (`fedtide.stopping`): Flower's own wait would go on until its timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtide.errors import ScenarioError
from fedtide.stopping import raise_if_stopped

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

    def discover(self, num_clients: int, timeout: float = 600.0, batch: int = DISCOVERY_BATCH) -> None:
        """Wait for `num_clients` nodes and learn which partition each one holds, asking `batch` nodes at a time."""
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
                self.partition_of[reply.metadata.src_node_id] = int(reply.content["node"]["partition_id"])
        partitions = sorted(self.partition_of.values())
        if partitions != list(range(num_clients)):
            raise ScenarioError(
                "partition.num_clients",
                f"nodes hold partitions {partitions}, expected 0..{num_clients - 1}",
                "set each SuperNode's partition-id and num-partitions to match the scenario",
            )

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self._grid.get_node_ids(), key=lambda n: self.partition_of.get(n, n))

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
