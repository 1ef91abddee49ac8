"""The in-process Grid: Flower's own strategies run on it unchanged, and it answers as Flower's simulation does.

That fedtide's federations give the same numbers on it as on Flower's Ray
simulation is tests/test_simulation.py's worker-layout test.
"""

import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.strategy import FedAvg

from fedtide.runner.in_process_grid import InProcessGrid

toy = ClientApp()


@toy.train()
def train(msg: Message, context) -> Message:
    """Count calls in the node's state, then fail if asked to; else send the arrays plus the partition id."""
    calls = int(context.state["calls"]["n"]) + 1 if "calls" in context.state else 1
    context.state["calls"] = MetricRecord({"n": calls})
    if msg.content["config"].get("fail", False):
        raise ValueError("client broke on purpose")
    partition = int(context.node_config["partition-id"])
    arrays = ArrayRecord([a + partition for a in msg.content["arrays"].to_numpy_ndarrays()])
    msg.content["arrays"] = ArrayRecord([np.full(2, -1.0)])  # changes the client's copy only
    metrics = MetricRecord({"num-examples": partition + 1})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def train_message(node_id: int, fail: bool = False) -> Message:
    content = RecordDict({"arrays": ArrayRecord([np.zeros(2)]), "config": ConfigRecord({"fail": fail})})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def calls(grid: InProcessGrid, node_id: int) -> int:
    state = grid.contexts[node_id].state
    return int(state["calls"]["n"]) if "calls" in state else 0


def test_flowers_fedavg_runs_on_it_unchanged():
    grid = InProcessGrid(3, client_app=toy)
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=3)
    result = strategy.start(grid, ArrayRecord([np.zeros(2)]), num_rounds=2)
    # each round adds partition p, weighted by p + 1: (0·1 + 1·2 + 2·3) / 6 per round
    assert np.allclose(result.arrays.to_numpy_ndarrays()[0], 2 * 8 / 6)
    assert sorted(grid.contexts[n].node_config["partition-id"] for n in grid.get_node_ids()) == [0, 1, 2]
    assert all(calls(grid, n) == 2 for n in grid.get_node_ids())


seeds_everything = ClientApp()


@seeds_everything.train()
def train_seeded(msg: Message, context) -> Message:
    """What fedtide's client does each round: seed the process-wide RNGs, and draw from them."""
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    random.random(), np.random.rand(), torch.rand(1)
    return train(msg, context)


def test_a_clients_seeding_does_not_reach_the_servers_rngs():
    """As from a Ray worker's own process: the server's `random` samples nodes, whatever the clients seeded."""
    grid = InProcessGrid(2, client_app=seeds_everything)

    def draws_after_seed_1(between=lambda: None) -> tuple[float, float, float]:
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        between()
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    clients_ran = draws_after_seed_1(lambda: grid.send_and_receive([train_message(n) for n in grid.get_node_ids()]))
    assert all(calls(grid, n) == 1 for n in grid.get_node_ids())
    assert clients_ran == draws_after_seed_1()


def test_replies_carry_the_metadata_of_flowers_superlink():
    grid = InProcessGrid(2, client_app=toy)
    node = list(grid.get_node_ids())[1]
    message = train_message(node)
    [message_id] = grid.push_messages([message])
    [reply] = grid.pull_messages([message_id])
    sent, got = message.metadata, reply.metadata
    assert message_id == sent.message_id != "" and got.message_id not in ("", message_id)
    assert (sent.run_id, sent.src_node_id) == (grid.run.run_id, SUPERLINK_NODE_ID)
    assert (got.run_id, got.src_node_id, got.dst_node_id) == (grid.run.run_id, node, SUPERLINK_NODE_ID)
    assert (got.reply_to_message_id, got.message_type, got.group_id) == (message_id, MessageType.TRAIN, "")
    assert got.created_at >= sent.created_at and 0 < got.ttl <= sent.ttl and got.delivered_at != ""
    assert grid.pull_messages([message_id]) == []  # delivered once
    assert message.content["arrays"].to_numpy_ndarrays()[0].tolist() == [0.0, 0.0]  # the client had a copy


def test_a_raising_client_is_an_error_reply_as_in_flowers_simulation_and_keeps_its_old_state():
    grid = InProcessGrid(2, client_app=toy)
    node = list(grid.get_node_ids())[0]
    [ok] = grid.send_and_receive([train_message(node)])
    assert ok.has_content() and calls(grid, node) == 1
    [failed] = grid.send_and_receive([train_message(node, fail=True)])  # no exception here
    assert failed.has_error() and failed.metadata.src_node_id == node
    assert failed.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert failed.error.reason == (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'"
        "\nException ClientAppException occurred. Message: client broke on purpose'>"
    )
    assert calls(grid, node) == 1  # the failed call's count was not stored
    grid.send_and_receive([train_message(node)])
    assert calls(grid, node) == 2


def test_a_message_the_superlink_would_refuse_raises():
    grid = InProcessGrid(2, client_app=toy)
    with pytest.raises(ValueError, match="no node 7"):
        grid.push_messages([train_message(7)])
