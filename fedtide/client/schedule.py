"""Clients trained round by round in this process, as Flower's simulation would call them.

Tests and `fedtide check-plugin` drive a client through a schedule of (experience,
global round) pairs without a federation around it. Each call goes through
`run_training_round`, the function the ClientApp calls, on a copy of the client's
stored state that replaces it only once the call has returned, as Ray does
(`fedtide.client.context_copy`).
"""

from __future__ import annotations

from typing import NamedTuple

from flwr.app import ArrayRecord, RecordDict

from fedtide.client.context_copy import call_on_a_copy
from fedtide.client.training import RoundTask, run_training_round
from fedtide.scenario.schema import Scenario


class ClientRound(NamedTuple):
    """One call: the global arrays it was sent, its reply, and the client's stored state after it."""

    sent: ArrayRecord
    reply: RecordDict
    state: RecordDict


class ScheduledClient:
    """One client of `scenario` and the `Context.state` it keeps between rounds."""

    def __init__(
        self, scenario: Scenario, partition_id: int, state: RecordDict | None = None, proximal_mu: float = 0.0
    ) -> None:
        self.scenario = scenario
        self.partition_id = partition_id
        self.proximal_mu = proximal_mu
        self.state = RecordDict() if state is None else state

    def train(self, experience: int, global_round: int, arrays: ArrayRecord) -> ClientRound:
        """Train one round from `arrays`; an exception leaves the stored state as it was."""
        task = RoundTask(self.scenario, self.partition_id, experience, global_round, self.proximal_mu)
        reply, self.state = call_on_a_copy(self.state, lambda state: run_training_round(task, arrays, state))
        return ClientRound(arrays, reply, self.state)


def train_schedule(
    scenario: Scenario,
    partition_id: int,
    schedule: list[tuple[int, int]],
    arrays: ArrayRecord,
    state: RecordDict | None = None,
    proximal_mu: float = 0.0,
) -> list[ClientRound]:
    """One client alone through `schedule`, each round starting from the weights the last one returned."""
    client = ScheduledClient(scenario, partition_id, state, proximal_mu)
    rounds = []
    for experience, global_round in schedule:
        rounds.append(client.train(experience, global_round, arrays))
        arrays = rounds[-1].reply["arrays"]
    return rounds
