"""The parts a run is made of, set up before its first round: grid, strategy, faults, recorder, restored state.

`set_up` learns the nodes, builds the scenario's strategy inside its ordered wrappers
(`fedtide.server.strategies.strategy_wrappers`, then `ContinualStrategy` around them all) and
the fault plan, and when the run folder holds a checkpoint (an interrupted run:
`fedtide resume`) takes back what it holds: the global model, the strategy and its
`random` stream, the recorder's totals, every client's `Context.state`, the server's
numpy and torch RNG states, and metrics.jsonl cut back to it. The loop then runs the
remaining rounds only, and the result is the uninterrupted run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtide.errors import FederationError
from fedtide.privacy.client_level import client_level_mechanism, client_noise_multiplier
from fedtide.privacy.dp_fedavg import DPFedAvg
from fedtide.records.metrics import RoundRecord
from fedtide.records.wire import RESTORE_STATE
from fedtide.scenario.schema import Scenario
from fedtide.server.checkpoint import read_checkpoint, restore_rng
from fedtide.server.continual_strategy import ContinualStrategy
from fedtide.server.faults import FaultPlan
from fedtide.server.grid import PartitionOrderedGrid
from fedtide.server.recorder import Evaluation, RunRecorder
from fedtide.server.strategies import federation_strategy, layer_of
from fedtide.stop_signals import reclaim_signals

RoundObserver = Callable[[RoundRecord], None]


@dataclass
class RunParts:
    """Everything the experience loop works with; `arrays` and `done` are where it starts (0: a fresh run)."""

    scenario: Scenario
    run_dir: Path
    grid: PartitionOrderedGrid
    federation: ContinualStrategy  # the scenario's strategy inside its wrappers
    recorder: RunRecorder
    arrays: ArrayRecord  # the global model after `done` rounds
    done: int  # global rounds already run (by the checkpoint's run)
    observer: RoundObserver | None = None


def set_up(grid: Grid, scenario: Scenario, run_dir: Path, observer: RoundObserver | None = None) -> RunParts:
    """The run's parts, and its state: fresh, or restored from the folder's checkpoint."""
    started = time.monotonic()
    evaluation = Evaluation(scenario)
    arrays = ArrayRecord(evaluation.model.state_dict())
    ordered = PartitionOrderedGrid(grid)
    ordered.discover(scenario.partition.num_clients)
    reclaim_signals()  # the nodes answered, so a Ray backend is up, and ray.init took SIGTERM
    sigma = client_noise_multiplier(scenario) if scenario.privacy.client_private else None
    strategy = federation_strategy(scenario, sigma)
    mechanism = client_level_mechanism(scenario, sigma) if sigma is not None else None
    recorder = RunRecorder(scenario, run_dir, evaluation, started, mechanism, layer_of(strategy, DPFedAvg))
    secure = scenario.privacy.enabled and scenario.privacy.secure_rng
    federation = ContinualStrategy(
        strategy,
        reference=arrays,
        partition_of=ordered.partition_of,
        plan=evaluation.plan,
        faults=FaultPlan(scenario.faults, scenario.seed) if scenario.faults.active else None,
        seed=None if secure else scenario.seed,
    )
    parts = RunParts(scenario, run_dir, ordered, federation, recorder, arrays, 0, observer)
    _restore(parts)
    return parts


def _restore(parts: RunParts) -> None:
    """Go on from the run folder's checkpoint, if it has one."""
    checkpoint = read_checkpoint(parts.run_dir, parts.scenario)
    if checkpoint is None:
        return
    parts.arrays, parts.done = checkpoint.arrays, checkpoint.round
    parts.federation.restore(checkpoint.federation)
    parts.recorder.restore(checkpoint.totals, checkpoint.wall_time_s, checkpoint.metrics_length)
    _give_back_client_states(parts.grid, parts.federation.client_states)
    restore_rng(checkpoint.rng)  # last: building the model and the data above draws from them


def _give_back_client_states(grid: PartitionOrderedGrid, states: dict[int, RecordDict]) -> None:
    """Send every checkpointed client its `Context.state` before the first resumed round."""
    node_of = {partition: node for node, partition in grid.partition_of.items()}
    messages = [
        Message(state, dst_node_id=node_of[partition], message_type=f"query.{RESTORE_STATE}")
        for partition, state in states.items()
    ]
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            partition = grid.partition_of[reply.metadata.src_node_id]
            reason = reply.error.reason
            raise FederationError(f"client {partition} could not take back its checkpointed state: {reason}")
