"""A Flower Grid whose nodes are a ClientApp called in this process: a federation without Ray.

Flower's Ray backend costs seconds to start and a worker process per client, so
tests and `fedtide check-plugin` run real Flower strategies and the real ClientApp
through this Grid instead (`fedtide.runner.simulation.simulate_in_process`); the numbers
are those of a Ray run (tests/test_simulation.py compares them).

It does what Flower's SuperLink and simulation runtime do wherever a strategy or a
ClientApp could tell: messages pass the SuperLink's checks and get its metadata
(message ids, replies addressed back to the SuperLink node); the ClientApp gets a
copy of the message and of the node's `Context` (Ray serialises both), and the copy
of the Context is stored back only when the ClientApp returned; the ClientApp's use of
the process-wide RNGs (`random`, numpy's, torch's) does not reach the server, whose
`random` samples the nodes, as it cannot from a Ray worker's own process; an exception
in the ClientApp becomes an error reply with the code and reason Flower's simulation gives
(`ClientAppException` wrapped as in `server.superlink.fleet.vce.vce_api.worker`),
never an exception in the server. Clients run one after another, when pushed.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import ERROR
from uuid import uuid4

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.logger import log
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedtide.client.app import app as fedtide_client_app
from fedtide.client.context_copy import call_on_a_copy

RUN_ID = 1  # every InProcessGrid serves this run, so any number of them can be used in one process


class InProcessGrid(Grid):
    """`num_nodes` nodes holding partitions 0..num_nodes-1, each served by `client_app` in this process.

    `contexts` maps node id to the node's stored `Context` (partition in its node_config).
    """

    def __init__(
        self, num_nodes: int, run_config: UserConfig | None = None, *, client_app: ClientApp | None = None
    ) -> None:
        self.client_app = client_app or fedtide_client_app
        self._run = Run.create_empty(run_id=RUN_ID)
        # What Flower's Message constructor reads for run id and sender; run_simulation sets it likewise.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
        # Node ids in no particular order, as the simulation's random ones: nothing may read a partition from them.
        node_ids = random.Random(num_nodes).sample(range(1000, 1000 + 100 * num_nodes), num_nodes)
        self.contexts = {
            node_id: Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config={"partition-id": partition, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for partition, node_id in enumerate(node_ids)
        }
        self._replies: dict[str, Message] = {}  # by the id of the message they answer

    def set_run(self, run: Run) -> None:
        if run.run_id != RUN_ID:
            raise RuntimeError(f"Cannot find the run with ID: {run.run_id}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)  # by node id, so not by partition

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Give each message an id, check it as the SuperLink would, and run the ClientApp on it now.

        A message the SuperLink would refuse raises `ValueError` (the SuperLink drops it
        with a log line, and the server would wait for its reply until the timeout).
        """
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as InMemoryGrid does
            problems = validate_message(message, is_reply_message=False)
            if message.metadata.run_id != RUN_ID:
                problems.append(f"run id {message.metadata.run_id} is not this grid's {RUN_ID}")
            if message.metadata.dst_node_id not in self.contexts:
                problems.append(f"no node {message.metadata.dst_node_id}")
            if problems:
                raise ValueError(f"invalid message to node {message.metadata.dst_node_id}: {'; '.join(problems)}")
            reply = self._call(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these messages, each delivered once (stamped `delivered_at`, as the SuperLink does)."""
        replies = [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]
        for reply in replies:
            reply.metadata.delivered_at = now().isoformat()
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every reply at once: clients answered when pushed, so there is nothing to wait for."""
        return self.pull_messages(self.push_messages(messages))

    def _call(self, message: Message) -> Message | None:
        """The node's reply to `message`, or None where the SuperLink would drop a malformed one."""
        node_id = message.metadata.dst_node_id
        try:
            with _rngs_of_own_process():
                reply, self.contexts[node_id] = call_on_a_copy(
                    self.contexts[node_id], lambda context: self.client_app(copy.deepcopy(message), context)
                )
        except Exception as error:  # what ClientAppActor.run and the simulation's worker make of it
            wrapped = ClientAppException(str(error))
            reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        if not isinstance(reply, Message):
            log(ERROR, "node %s: the ClientApp returned %s, not a Message; no reply", node_id, type(reply).__name__)
            return None
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        problems = validate_message(reply, is_reply_message=True)
        if reply.metadata.reply_to_message_id != message.metadata.message_id:
            problems.append("it does not reply to the message the node was sent")
        if reply.metadata.src_node_id != node_id:
            problems.append(f"its src_node_id is {reply.metadata.src_node_id}, not {node_id}")
        if problems:
            log(ERROR, "node %s: reply dropped, as the SuperLink would: %s", node_id, "; ".join(problems))
            return None
        return reply


@contextmanager
def _rngs_of_own_process() -> Iterator[None]:
    """Put the process-wide RNGs back as they were: clients seed them each round, the server samples with `random`.

    Without it, which clients a round samples would depend on which client trained last
    in this process, unlike on Ray, and a client that drops would change later samples.
    """
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
