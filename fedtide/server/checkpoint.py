"""A run's checkpoint: everything its remaining rounds depend on, in one file written atomically.

After a global round the server holds all of it: the global model, the wrapped
strategy's own attributes (FedAdam's moments, FedAvgM's momentum, a user strategy's
fields), `ContinualStrategy`'s bookkeeping (the weights that ended each experience,
who has settled them), every client's `Context.state` as its last reply carried it
(replay buffer ids, EWC anchors and importances, LwF teacher, DP accountant history,
consolidation counts: everything in `ClientState`), the strategy's own `random` stream
(Flower's node sampling, `fedtide.server.sampling`), the recorder's running totals (the
`RunTotals` object itself), the server process's numpy and torch RNG states, and how
long metrics.jsonl was. Clients seed themselves from (seed, client, round), so nothing
of theirs beyond `Context.state` is needed.

Clients' state comes with their replies rather than from files they write: it then
reaches the server wherever clients run (Ray workers, another machine, `flwr run`
SuperNodes), a client that failed a round keeps the state it had (as Flower keeps its
Context), and one checkpoint taken at a round boundary holds a consistent whole.

Clients' states are kept apart from the rest (`ClientStates`): a checkpoint writes only
those that changed since the one before, into a file of their own, and names the files
that together hold every client's state. Its cost then follows the clients that trained,
not the clients that exist (a federation of 10,000 that samples 10 a round writes 10).

The files are pickles (the Flower records and numpy arrays as they are): a checkpoint is
read back by the same fedtide that wrote it, from the user's own run folder. Each is
written to a temporary file in the same folder, fsynced and renamed over, so a reader
(or a run killed mid-write) finds the previous checkpoint or the new one, never half of
one; files of the previous one are deleted only once the new one is in place.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedtide.errors import FederationError, ScenarioError
from fedtide.records.checkpoint_files import CHECKPOINT_DIR, checkpoint_file, checkpoint_round
from fedtide.scenario.loading import parse_scenario
from fedtide.scenario.schema import Scenario
from fedtide.server.run_totals import RunTotals

# Attributes of these kinds are a strategy's configuration (an aggregation function, a
# lambda), rebuilt by constructing the strategy again; an unpicklable one is left out.
_CONFIGURATION = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, partial)


@dataclass(frozen=True)
class Checkpoint:
    """A run after `round` global rounds, as `run_federation` needs it to go on."""

    round: int
    arrays: ArrayRecord  # the global model after `round`
    federation: dict[str, Any]  # ContinualStrategy.checkpoint_state(): strategy, its random, clients' states...
    totals: RunTotals  # the recorder's running totals (accuracy matrix rows, ε per client, failures...)
    wall_time_s: float  # the run's wall time up to here; a resumed run goes on counting from it
    rng: dict[str, Any]  # the server process's numpy and torch RNG states (`rng_state`)
    metrics_length: int  # bytes of metrics.jsonl that hold rounds 1..round
    scenario: str  # the scenario as JSON: a checkpoint is only ever resumed with its own


class ClientStates(Mapping[int, RecordDict]):
    """Every client's `Context.state` as its last reply carried it, by partition, and which changed since a checkpoint.

    On disk a checkpoint's client states are a chain of files, each holding the states
    that changed between two checkpoints; read in order, a later file's state of a client
    over an earlier one's, they give every client's state. When the chain would hold more
    than twice as many states as there are clients, the checkpoint writes every state into
    one file that replaces the chain: the chain never holds more than twice the clients'
    states, and the rewriting costs each checkpoint, on average, a constant per state that
    changed.
    """

    def __init__(self, states: Mapping[int, RecordDict] | None = None, chain: Iterable[tuple[str, int]] = ()) -> None:
        self._states = dict(states or {})
        self.chain = list(chain)  # (file name, states it holds), oldest first, as the last checkpoint wrote it
        self._changed = set() if self.chain else set(self._states)  # partitions whose state no file holds yet

    def __getitem__(self, partition: int) -> RecordDict:
        return self._states[partition]

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def put(self, partition: int, state: RecordDict) -> None:
        """Keep the state a client's reply carried; the next checkpoint writes it."""
        self._states[partition] = state
        self._changed.add(partition)

    def next_file(self, global_round: int) -> tuple[str, dict[int, RecordDict], list[tuple[str, int]]]:
        """The file the checkpoint after `global_round` adds (name, states: none if none changed), and its chain."""
        name = f"clients-{global_round:04d}-{uuid4().hex[:8]}.pkl"  # never the name of a file in the chain
        held = sum(count for _, count in self.chain) + len(self._changed)
        if held > 2 * len(self._states):
            return name, dict(self._states), [(name, len(self._states))]
        if not self._changed:
            return name, {}, list(self.chain)
        return name, {p: self._states[p] for p in self._changed}, [*self.chain, (name, len(self._changed))]

    def written(self, chain: list[tuple[str, int]]) -> None:
        """A checkpoint with `chain` is in place: the states changed so far are on disk."""
        self.chain = list(chain)
        self._changed.clear()


@dataclass(frozen=True)
class _ClientStateFiles:
    """What a checkpoint file holds in place of the clients' states: the chain of files that hold them."""

    chain: list[tuple[str, int]]


def write_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Atomically write `checkpoint` as the run's latest, then delete the files it does not need.

    Where `checkpoint.federation["client_states"]` is a `ClientStates`, only the states
    that changed since the last checkpoint are written, into a file of their own.
    """
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    target = checkpoint_file(run_dir, checkpoint.round)
    states = checkpoint.federation.get("client_states")
    chain: list[tuple[str, int]] = []
    written: Path | None = None
    if isinstance(states, ClientStates):
        name, changed, chain = states.next_file(checkpoint.round)
        if changed:
            written = _write_atomically(folder / name, changed)
        checkpoint = replace(
            checkpoint, federation={**checkpoint.federation, "client_states": _ClientStateFiles(chain)}
        )
    try:
        _write_atomically(target, checkpoint)
    except BaseException:  # the previous checkpoint stays whole; the states written for this one are not needed
        if written is not None:
            written.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    needed = {target.name, *(name for name, _ in chain)}
    for older in folder.iterdir():
        if older.name not in needed:
            older.unlink()
    if isinstance(states, ClientStates):
        states.written(chain)
    return target


def _write_atomically(target: Path, value: Any) -> Path:
    """Pickle `value` to `target` through a temporary file in its folder, fsynced, then renamed over."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            pickle.dump(value, stream, protocol=pickle.HIGHEST_PROTOCOL)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:  # a pickling error or a stop signal: no partial file is left behind
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def read_checkpoint(run_dir: Path, scenario: Scenario) -> Checkpoint | None:
    """The run's latest checkpoint, None when it has none; refuses one taken for another scenario.

    Its `federation["client_states"]` is a `ClientStates` holding every client's state.
    """
    done = checkpoint_round(run_dir)
    if done is None:
        return None
    path = checkpoint_file(run_dir, done)
    checkpoint = _read_pickle(path)
    if not isinstance(checkpoint, Checkpoint) or checkpoint.round != done:
        raise ScenarioError(str(path), "is not a fedtide checkpoint of this round")
    if not isinstance(checkpoint.totals, RunTotals):
        raise ScenarioError(str(path), "was written by an earlier fedtide", "start the run afresh")
    if parse_scenario(json.loads(checkpoint.scenario)) != scenario:
        raise ScenarioError(
            str(path), "was taken for another scenario than the folder's scenario.yaml", "start the run afresh"
        )
    files = checkpoint.federation.get("client_states")
    if isinstance(files, _ClientStateFiles):
        states: dict[int, RecordDict] = {}
        for name, _ in files.chain:
            states.update(_read_pickle(path.parent / name))
        federation = {**checkpoint.federation, "client_states": ClientStates(states, files.chain)}
        checkpoint = replace(checkpoint, federation=federation)
    return checkpoint


def _read_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as stream:
            return pickle.load(stream)
    except Exception as error:
        raise ScenarioError(str(path), f"is not a readable checkpoint ({type(error).__name__}: {error})") from None


def remove_checkpoints(run_dir: Path) -> None:
    """Delete a finished run's checkpoint: its files hold all it measured, and clients' states can be large."""
    folder = run_dir / CHECKPOINT_DIR
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable too (POSIX: the directory entry lives in the folder)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def strategy_state(strategy: Strategy) -> dict[str, bytes]:
    """The strategy object's attributes, each pickled: its state, whatever the class calls it.

    Flower's Message-API strategies keep their state as plain attributes (FedAdam's
    `m_t`/`v_t`, FedAvgM's `momentum_vector`, `current_arrays`); so do user strategies
    (docs/extending.md). Unpicklable functions are configuration and are left out; any
    other attribute that cannot be pickled would be lost on resume, so it is an error.
    """
    state = {}
    for name, value in vars(strategy).items():
        try:
            state[name] = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            if isinstance(value, _CONFIGURATION):
                continue
            raise FederationError(
                f"strategy {type(strategy).__qualname__}'s attribute {name!r} cannot be checkpointed "
                f"({type(error).__name__}: {error}); make it picklable, or set checkpoint.every: 0"
            ) from error
    return state


def restore_strategy(strategy: Strategy, state: dict[str, bytes]) -> None:
    """Put checkpointed attributes back on a strategy freshly built from the same scenario."""
    for name, pickled in state.items():
        setattr(strategy, name, pickle.loads(pickled))


def rng_state() -> dict[str, Any]:
    """This process's numpy and torch RNGs, for user code; `random` is the strategy's own stream's business."""
    return {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
