"""Node discovery: every node's partition is learned, a bounded number of queries in flight at a time.

Flower's simulation scans every message it holds once per node on every pass
(`fedtide.server.grid.DISCOVERY_BATCH`), so discovery asks a few nodes at a time.
"""

from fedtide.server.grid import DISCOVERY_BATCH, PartitionOrderedGrid
from tests.conftest import RecordingGrid


def test_discovery_asks_a_batch_at_a_time_and_learns_every_partition():
    inner = RecordingGrid(7)
    grid = PartitionOrderedGrid(inner)
    grid.discover(7, batch=3)
    assert inner.pushes == [3, 3, 1]
    assert sorted(grid.partition_of.values()) == list(range(7))
    assert all(grid.partition_of[node] == inner.contexts[node].node_config["partition-id"] for node in inner.contexts)
    assert [grid.partition_of[node] for node in grid.get_node_ids()] == list(range(7))


def test_default_batch_keeps_a_large_federation_in_bounded_pushes():
    inner = RecordingGrid(2 * DISCOVERY_BATCH + 1)
    grid = PartitionOrderedGrid(inner)
    grid.discover(2 * DISCOVERY_BATCH + 1)
    assert inner.pushes == [DISCOVERY_BATCH, DISCOVERY_BATCH, 1]
    assert len(grid.partition_of) == 2 * DISCOVERY_BATCH + 1
