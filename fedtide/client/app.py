"""fedtide's Flower ClientApp: answers the server's partition query and its train messages.

The training stack (Avalanche, Opacus) is imported by the first train message, not with
this module: the driver holds the ClientApp only to hand it to Flower's simulation, and
a Ray run starts sooner when the driver does not load what only clients use.
"""

from __future__ import annotations

import json
import socket

import ray
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedtide.errors import ContractBroken, failure_report
from fedtide.records.wire import CONTRACT_BROKEN, RESTORE_STATE, attach_client_state, experience_ends
from fedtide.scenario.loading import parse_scenario
from fedtide.scenario.schema import Scenario

app = ClientApp()


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds, so it can order nodes stably."""
    partition = MetricRecord({"partition_id": int(context.node_config["partition-id"])})
    return Message(RecordDict({"node": partition}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local continual learning on the experience the server names.

    A failure is replied, not raised: one line naming the method, the phase, the
    exception and the user's file:line, then the traceback, which the server keeps in
    the run's log. Raised, it would reach the server wrapped in Flower's and Ray's
    tracebacks, with the useful sentence at the end of fifty lines.
    """
    try:
        return _train(msg, context)
    except Exception as error:  # any failure of this round, the user's or not: the server decides
        code = CONTRACT_BROKEN if isinstance(error, ContractBroken) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        return Message(Error(code, failure_report(error)), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    from fedtide.client.training import RoundTask, run_training_round, torch_threads

    config = msg.content["config"]
    scenario = parse_scenario(json.loads(config["scenario"]))
    partition_id = int(context.node_config["partition-id"])
    global_round = int(config["round-offset"]) + int(config["server-round"])
    task = RoundTask(
        scenario=scenario,
        partition_id=partition_id,
        experience=own_experience(scenario, partition_id, global_round),
        global_round=global_round,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        experience_ends=experience_ends(msg.content),
    )
    with torch_threads(max(1, int(task.scenario.resources.num_cpus_per_client))):
        content = run_training_round(task, msg.content["arrays"], context.state)
    if task.scenario.privacy.client_private:
        from fedtide.privacy.client_clipping import prepare_reply

        prepare_reply(task.scenario, config, msg.content["arrays"], content)
    content["host"] = host_record()
    if config.get("checkpoint", False):
        attach_client_state(content, context.state)
    return Message(content, reply_to=msg)


def own_experience(scenario: Scenario, partition_id: int, global_round: int) -> int:
    """Which of its own experiences the client trains in at `global_round`, as its schedule says.

    The server samples only the clients in the stream (`ContinualStrategy`), so a message
    to one outside it is a broken contract, not a client's failure.
    """
    step = scenario.schedule.clients[partition_id].step_at(global_round)
    if step is None:
        raise ContractBroken(
            f"client {partition_id} was sent a train message in round {global_round}, when its schedule "
            "(stream.arrivals, stream.clients) has it out of the stream"
        )
    return step


@app.query(RESTORE_STATE)
def restore_state(msg: Message, context: Context) -> Message:
    """Take back the state this node had at a checkpoint (sent by a resumed run before its first round)."""
    from fedtide.client.state import replace_state

    replace_state(context.state, msg.content)
    return Message(RecordDict(), reply_to=msg)


def host_record() -> ConfigRecord:
    """Where this reply was computed: the Ray node ("" outside Ray) and the machine's name.

    A ConfigRecord, not a MetricRecord (which holds numbers only); Flower's strategies
    check only the replies' ArrayRecord and MetricRecord, so an extra record is safe.
    """
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return ConfigRecord({"ray_node_id": node_id, "hostname": socket.gethostname()})
