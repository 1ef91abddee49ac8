"""Node discovery: which partition each node holds, read from the runtime where it knows, else asked.

Asking costs one message per node before round 1, so only a grid whose runtime cannot
tell (a deployment's SuperNodes) is asked, a few nodes at a time: Flower's simulation
scans every message it holds once per node on every pass
(`fedtide.server.grid.DISCOVERY_BATCH`). Flower's simulation and the in-process grid
are read (`registered_partitions`); the tests below hold Flower's simulation to the two
things that reading relies on, and show that a wrong reading stops the run at the first
reply instead of silently sampling other clients.
"""

from dataclasses import replace

import pytest
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce.vce_api import _register_node_info_stores, _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.serverapp import Grid
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

import fedtide.server.grid
from fedtide.errors import FederationError
from fedtide.records.run_folder import create_run_folder
from fedtide.runner.in_process_grid import InProcessGrid
from fedtide.server.federation import run_federation
from fedtide.server.grid import DISCOVERY_BATCH, PartitionOrderedGrid, registered_partitions
from tests.conftest import RecordingGrid, small_scenario


def remote(inner: Grid) -> Grid:
    """`inner` seen as a deployment's grid, of which fedtide knows Flower's Grid interface only, so it must ask."""
    return PartitionOrderedGrid(inner)  # it only delegates, and is neither grid whose runtime can be read


def test_a_deployments_nodes_are_asked_a_batch_at_a_time():
    inner = RecordingGrid(7)
    grid = PartitionOrderedGrid(remote(inner))
    grid.discover(7, batch=3)
    assert inner.pushes == [3, 3, 1]
    assert grid.partition_of == {node: context.node_config["partition-id"] for node, context in inner.contexts.items()}
    assert [grid.partition_of[node] for node in grid.get_node_ids()] == list(range(7))


def test_default_batch_keeps_a_large_federation_in_bounded_pushes():
    inner = RecordingGrid(2 * DISCOVERY_BATCH + 1)
    grid = PartitionOrderedGrid(remote(inner))
    grid.discover(2 * DISCOVERY_BATCH + 1)
    assert inner.pushes == [DISCOVERY_BATCH, DISCOVERY_BATCH, 1]
    assert len(grid.partition_of) == 2 * DISCOVERY_BATCH + 1


def test_the_in_process_grid_is_read_and_one_node_asked():
    inner = RecordingGrid(1000)
    grid = PartitionOrderedGrid(inner)
    grid.discover(1000)
    assert inner.pushes == [1]  # one message before round 1 (the backend is up), however many clients exist
    assert grid.partition_of == {node: context.node_config["partition-id"] for node, context in inner.contexts.items()}
    assert [grid.partition_of[node] for node in grid.get_node_ids()] == list(range(1000))


def test_flowers_simulation_gives_the_ith_registered_node_partition_i_and_lists_nodes_in_that_order():
    """What `registered_partitions` reads of Flower's simulation: a Flower upgrade that changes it fails here."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = replace(Run.create_empty(run_id=7), primary_task_id=1, federation_id=NOOP_FEDERATION_ID)  # as Flower's
    factory.state().run_ids[run.run_id] = RunRecord(run=run)
    factory.state().task_store[1] = Task(task_id=1, run_id=run.run_id)
    stores = _register_node_info_stores(_register_nodes(num_nodes=300, state_factory=factory), run)  # as start_vce
    given = {node: int(store.node_config["partition-id"]) for node, store in stores.items()}  # what each node holds
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    assert registered_partitions(grid) == given


def misread(monkeypatch, grid: InProcessGrid, first: int, second: int) -> None:
    """Make `registered_partitions` swap the partitions of two of the grid's nodes."""
    truth = registered_partitions(grid)
    nodes = sorted(truth, key=truth.get)
    swapped = {**truth, nodes[first]: second, nodes[second]: first}
    monkeypatch.setattr(fedtide.server.grid, "registered_partitions", lambda inner: swapped)


def test_a_node_that_answers_for_another_partition_before_round_1_stops_the_run(tmp_path, monkeypatch):
    scenario = small_scenario()
    grid = InProcessGrid(scenario.partition.num_clients)
    misread(monkeypatch, grid, 0, 1)
    with pytest.raises(FederationError, match="holds partition 1, not the 0 its runtime registered it with"):
        run_federation(grid, scenario, create_run_folder(scenario, tmp_path))


def test_a_node_that_replies_for_another_partition_stops_the_run(tmp_path, monkeypatch):
    scenario = small_scenario()
    grid = InProcessGrid(scenario.partition.num_clients)
    misread(monkeypatch, grid, 2, 3)  # node 0, the one asked before round 1, is read right
    with pytest.raises(FederationError, match="holds partition 3, not the 2 the server took it to hold"):
        run_federation(grid, scenario, create_run_folder(scenario, tmp_path))
