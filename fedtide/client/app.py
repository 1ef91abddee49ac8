"""fedtide's Flower ClientApp: answers the server's partition query and its train messages."""

from __future__ import annotations

import json

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtide.client.training import RoundTask, run_training_round
from fedtide.scenarios.loading import parse_scenario

app = ClientApp()


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds, so it can order nodes stably."""
    partition = MetricRecord({"partition_id": int(context.node_config["partition-id"])})
    return Message(RecordDict({"node": partition}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local continual learning on the experience the server names."""
    config = msg.content["config"]
    task = RoundTask(
        scenario=parse_scenario(json.loads(config["scenario"])),
        partition_id=int(context.node_config["partition-id"]),
        experience=int(config["experience"]),
        global_round=int(config["round-offset"]) + int(config["server-round"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    return Message(run_training_round(task, msg.content["arrays"], context.state), reply_to=msg)
