"""A Flower Grid whose nodes are a ClientApp called in this process: a federation without Ray.

Flower's Ray backend costs seconds to start and a worker process per client; tests
and `fedtide check-plugin` drive real Flower strategies and the real ClientApp
through this Grid instead (`fedtide.simulation.simulate_in_process`). It behaves as the simulation does
where fedtide can tell: each call works on a copy of the node's `Context` (Ray
copies it too), and the copy is kept only when the ClientApp returns; an exception
becomes an error reply with the code and reason Flower's simulation gives, never an
exception in the server.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE_ID = 1001  # node ids are arbitrary; fedtide orders nodes by partition id


class InProcessGrid(Grid):
    """`num_nodes` nodes holding partitions 0..num_nodes-1, each served by `client_app` in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any] | None = None) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id=1)
        if TaskIdentity._run_id is None:  # outside a ServerApp: what Flower's Message constructor reads
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
        self.contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=self._run.run_id,
                node_id=FIRST_NODE_ID + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=node_id) for node_id in self.contexts]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp on each message now; its reply waits for `pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            reply = self._call(message)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _call(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        context = copy.deepcopy(self.contexts[node_id])
        try:
            reply = self.client_app(message, context)
        except Exception as error:  # as Flower's simulation reports a raising ClientApp
            wrapped = ClientAppException(str(error))
            reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        self.contexts[node_id] = context
        return reply
