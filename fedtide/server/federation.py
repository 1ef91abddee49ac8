"""A federated continual-learning run: set up its parts, walk its experiences and rounds, summarize.

`set_up` (`fedtide.server.run_parts`) returns the run's parts: the partition-ordered
grid, the scenario's strategy inside its wrappers, the fault plan, the recorder, and the
state to start from (a fresh model, or a checkpoint's). `run_experiences` only walks the
experiences and their rounds: each round's outcome comes back from
`ContinualStrategy.train_round`, goes to the recorder, and the run is checkpointed after
every `checkpoint.every`-th round (and the last). `summarize` (`fedtide.server.summarize`)
turns the totals and the final model into summary.json.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedtide.errors import FederationError
from fedtide.records.run_folder import MODEL_FILE, append_log, metrics_length, write_summary
from fedtide.records.summary import RunSummary
from fedtide.scenario.schema import Scenario
from fedtide.server.checkpoint import Checkpoint, remove_checkpoints, rng_state, write_checkpoint
from fedtide.server.continual_strategy import RoundAborted
from fedtide.server.run_parts import RoundObserver, RunParts, set_up
from fedtide.server.summarize import summarize


def run_federation(
    grid: Grid,
    scenario: Scenario,
    run_dir: Path,
    observer: RoundObserver | None = None,
    started_at: float | None = None,
) -> RunSummary:
    """Run every experience and round of `scenario`, writing metrics, checkpoints and the summary to `run_dir`.

    When `run_dir` holds a checkpoint (an interrupted run: `fedtide resume`), go on from it.
    `started_at` (a `time.time()`) is when the command began, the origin of the summary's
    `startup_s`; default: now.
    """
    started_at = time.time() if started_at is None else started_at
    parts = set_up(grid, scenario, run_dir, observer)
    rounds_began = time.time()
    try:
        arrays = run_experiences(parts)
    except FederationError as error:
        _fail(run_dir, error)
    rounds_ended = time.time()
    model = parts.recorder.evaluation.model
    model.load_state_dict(arrays.to_torch_state_dict())
    torch.save(model.state_dict(), run_dir / MODEL_FILE)  # to evaluate or audit the run again later
    summary = replace(
        summarize(scenario, parts.recorder, faults=parts.federation.faults is not None),
        startup_s=round(rounds_began - started_at, 3),
        rounds_s=round(rounds_ended - rounds_began, 3),
        end_s=round(time.time() - rounds_ended, 3),
    )
    write_summary(run_dir, summary)
    remove_checkpoints(run_dir)
    return summary


def run_experiences(parts: RunParts) -> ArrayRecord:
    """Run the stages' remaining rounds from `parts.arrays`, recording each; the final global model.

    A stage is `federation.rounds_per_experience` global rounds (the last one may be
    shorter): in lockstep, one experience of every client. The strategy's rounds restart
    with each stage; which experience each client is in is its own schedule's business.
    """
    scenario, federation, arrays = parts.scenario, parts.federation, parts.arrays
    rounds = scenario.federation.rounds_per_experience
    first, ran = divmod(parts.done, rounds)
    for stage in range(first, stage_count(scenario)):
        done = ran if stage == first else 0
        in_stage = stage_rounds(scenario, stage)
        federation.begin_experience(stage, arrays, train_config(scenario, stage), rounds, done)
        for server_round in range(done + 1, in_stage + 1):
            arrays, outcome = federation.train_round(parts.grid, server_round, arrays)
            federation.evaluate_round(parts.grid, server_round, arrays)
            record = parts.recorder.record(stage, server_round, arrays, outcome, stage_end=server_round == in_stage)
            if _checkpoint_due(scenario, record.round):
                _checkpoint(parts, record.round, arrays)
            if parts.observer:
                parts.observer(record)
    return arrays


def stage_count(scenario: Scenario) -> int:
    """How many stages the run has: `stream.n_experiences` in lockstep."""
    return -(-scenario.total_rounds // scenario.federation.rounds_per_experience)


def stage_rounds(scenario: Scenario, stage: int) -> int:
    """The rounds of `stage`: R, except a last stage cut short where the clients' schedules end."""
    rounds = scenario.federation.rounds_per_experience
    return min(rounds, scenario.total_rounds - stage * rounds)


def _checkpoint_due(scenario: Scenario, global_round: int) -> bool:
    """Every `checkpoint.every` rounds, and after the last."""
    every = scenario.checkpoint.every
    return bool(every) and (global_round % every == 0 or global_round == scenario.total_rounds)


def _checkpoint(parts: RunParts, global_round: int, arrays: ArrayRecord) -> None:
    recorder = parts.recorder
    checkpoint = Checkpoint(
        round=global_round,
        arrays=arrays,
        federation=parts.federation.checkpoint_state(),
        totals=recorder.totals,
        wall_time_s=recorder.elapsed(),
        rng=rng_state(),
        metrics_length=metrics_length(parts.run_dir),
        scenario=parts.scenario.model_dump_json(),
    )
    write_checkpoint(parts.run_dir, checkpoint)


def _fail(run_dir: Path, error: FederationError) -> NoReturn:
    """One line for the console; the round's client failures and the traceback go to the run's log."""
    for failure in error.failure_logs if isinstance(error, RoundAborted) else ():
        append_log(run_dir, failure)
    log = append_log(run_dir, "".join(traceback.format_exception(error)))
    raise FederationError(f"{error}; full log: {log}") from error


def train_config(scenario: Scenario, stage: int) -> ConfigRecord:
    """What every train message of `stage` tells clients (and the strategy): docs/extending.md.

    `experience` is the stage (in lockstep, every client's experience); a client reads its
    own experience from its schedule at the global round `round-offset` + `server-round`.
    """
    rounds = scenario.federation.rounds_per_experience
    return ConfigRecord(
        {
            "experience": stage,
            "n-experiences": stage_count(scenario),
            "rounds-per-experience": rounds,
            "round-offset": stage * rounds,
            "scenario": scenario.model_dump_json(),
            "checkpoint": scenario.checkpoint.every > 0,  # clients then send their Context.state with replies
        }
    )
