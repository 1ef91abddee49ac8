"""Contract checks for a user's strategy or continual method: `fedtide check-plugin NAME`.

The same checks are a function for a user's own tests:

    from fedtide.cli.check_plugin import check_plugin
    report = check_plugin("my_pkg.mod:MyMethod", {"strength": 0.5})
    assert report.ok, report.message

Both kinds run on a tiny digits scenario: 2 IID clients (`clients`; a robust
aggregator such as a trimmed mean or Krum needs more), 2 class-incremental experiences,
so a method consolidates once; `overrides` (`field.path=value`) change the rest. A continual method's two clients are
driven in-process by `fedtide.client.schedule` (the ClientApp's own training call on a
copy of the client state, as Ray makes), with FedAvg between them. A strategy runs a
real Flower federation (2 rounds) over the in-process grid (no Ray start-up).

A method's hook names are checked first (`fedtide.continual.hooks`), and every one of
its rounds runs the client's lost-state check (`fedtide.continual.state_check`), so
state changed while a round trains, not only at consolidation, must reach the next round.

A failed check names the plugin's file and line, as `fedtide run` does, and points to
a log holding the failure's traceback: the check's run folder in the system's temporary
folder, kept when a check fails and removed when every check passes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedtide.continual.hooks import MisspeltHook
from fedtide.errors import FederationError, ScenarioError, failure_line, failure_report
from fedtide.scenario.schema import Scenario

STRATEGY, METHOD = "strategy", "continual method"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class PluginReport:
    """What `check_plugin` found: one entry per check, in the order they ran."""

    plugin: str
    kind: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def message(self) -> str:
        """One line: which plugin failed which check, and why (or that all passed)."""
        if self.failure is None:
            return f"{self.kind} '{self.plugin}' passed {len(self.checks)} checks"
        what = self.kind or "plugin"
        return f"{what} '{self.plugin}' failed check '{self.failure.name}': {self.failure.detail}"

    def add(self, name: str, ok: bool, failed: str = "", passed: str = "") -> bool:
        """Record a check; `failed` explains a failure, `passed` what a success found."""
        self.checks.append(Check(name, ok, passed if ok else failed))
        return ok


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (`--set strength=0.5`), read as `fedtide run --set` reads a scenario's."""
    from fedtide.scenario.loading import apply_overrides

    params: dict[str, Any] = {}
    apply_overrides(params, pairs)
    return params


def plugin_kind(name: str) -> str:
    """Whether `name` is an aggregation strategy or a continual method (by its base class, or where it is known)."""
    from fedtide.continual import methods
    from fedtide.registry import kind_of
    from fedtide.server import strategies

    return STRATEGY if kind_of(name, (strategies.STRATEGY, methods.METHOD)) is strategies.STRATEGY else METHOD


def check_scenario(
    name: str, kind: str, params: dict[str, Any], clients: int = 2, overrides: list[str] | tuple[str, ...] = ()
) -> Scenario:
    """The tiny scenario the checks run: 2 experiences x 1 round, `clients` IID digits clients, batches of 128."""
    from fedtide.scenario.loading import apply_overrides, parse_scenario

    raw: dict[str, Any] = {
        "name": "check-plugin",
        "seed": 0,
        "stream": {"n_experiences": 2},
        "partition": {"kind": "iid", "num_clients": clients},
        "federation": {"rounds_per_experience": 1},
        # 3 steps a round rather than 12: the checks need rounds, not training, and a step's
        # cost is mostly fixed on so small a model (docs/benchmarks.md: check-plugin's time)
        "client": {"batch_size": 128},
        "continual": {"method": "naive"},
        "resources": {"device": "cpu"},
    }
    if kind == STRATEGY:
        raw["federation"]["strategy"] = {"name": name, **params}
    else:
        raw["continual"] = {"method": name, **params}
    apply_overrides(raw, overrides)
    return parse_scenario(raw)


def check_plugin(
    name: str, params: dict[str, Any] | None = None, clients: int = 2, overrides: list[str] | tuple[str, ...] = ()
) -> PluginReport:
    """Run every contract check on the strategy or continual method `name` with `params`."""
    params = params or {}
    report = PluginReport(name, None)
    try:
        report.kind = plugin_kind(name)
        scenario = check_scenario(name, report.kind, params, clients, overrides)
        from fedtide.runner.validation import check_runnable

        check_runnable(scenario)
    except MisspeltHook as error:
        report.add("loads", True, passed="importable, right base class")
        report.add("hook names", False, " ".join(str(error).split()))
        return report
    except (ScenarioError, ValueError) as error:
        report.add("loads", False, " ".join(str(error).split()))
        return report
    except Exception as error:  # the plugin's constructor or module raised
        report.add("loads", False, f"{type(error).__name__}: {' '.join(str(error).split())}")
        return report
    report.add("loads", True, passed="importable, right base class, parameters accepted")
    folder = Path(tempfile.mkdtemp(prefix="fedtide-check-"))
    if report.kind == METHOD:
        report.add("hook names", True, passed="no public method is a near-miss of an Avalanche hook name")
        _check_method(scenario, report, folder)
    else:
        _check_strategy(scenario, report, folder)
    if report.ok:
        shutil.rmtree(folder, ignore_errors=True)
    return report


def _failed(error: BaseException, folder: Path) -> str:
    """The failure's line, naming the plugin's file:line as `fedtide run` does, and the log that keeps its traceback."""
    from fedtide.records.run_folder import append_log

    return f"{failure_line(error)}; full log: {append_log(folder, failure_report(error))}"


# --- continual methods, in-process ---------------------------------------------------------

# (experience, global round) of the three calls: round 2 consolidates experience 0,
# round 3 is a second round of the same experience (no consolidation, state reused).
SCHEDULE = [(0, 1), (1, 2), (1, 3)]


def _check_method(scenario: Scenario, report: PluginReport, folder: Path) -> None:
    from fedtide.client.schedule import ScheduledClient
    from fedtide.continual.state_check import LostState
    from fedtide.models import build_scenario_model
    from fedtide.server.array_check import array_problem

    model = build_scenario_model(scenario, seed=scenario.seed)
    global_arrays = ArrayRecord(model.state_dict())
    clients = [ScheduledClient(scenario, partition) for partition in range(scenario.partition.num_clients)]
    after_consolidation: list[RecordDict] = []
    for experience, global_round in SCHEDULE:
        label = f"round {global_round} (experience {experience})"
        replies = []
        for client in clients:
            try:
                reply = client.train(experience, global_round, global_arrays).reply
            except Exception as error:  # the plugin's own exception, named by method_phase
                lost = isinstance(error, LostState)
                check = f"{label} keeps what it changed" if lost else f"{label} trains"
                report.add(check, False, f"client {client.partition_id}: {_failed(error, folder)}")
                return
            problem = array_problem(reply["arrays"], ArrayRecord(model.state_dict()))
            if problem:
                report.add(f"{label} returns valid arrays", False, f"client {client.partition_id}: {problem}")
                return
            replies.append(reply)
        report.add(f"{label} trains", True, passed="finite arrays with the model's keys and shapes")
        counts = [list(r["client"]["consolidation_counts"]) for r in replies]
        if not report.add(
            f"{label} consolidation counts",
            all(c == [1 if global_round > 1 else 0] + [0] * (scenario.stream.n_experiences - 1) for c in counts),
            f"per client {counts}, expected experience 0 consolidated once from round 2 on",
            f"per client {counts}",
        ):
            return
        if global_round == 2:
            after_consolidation = [client.state for client in clients]  # no later call changes these
        global_arrays = _fedavg(replies)

    report.add(
        "state changed in rounds kept",
        True,
        passed="each round's changes, in training or consolidation, are restored by state_dict() in the next",
    )
    _check_state(scenario, [client.state for client in clients], after_consolidation, report)
    _check_private(scenario, report, folder)


def _check_private(scenario: Scenario, report: PluginReport, folder: Path) -> None:
    """A method that claims `dp_compatible` must train and consolidate under DP-SGD (noise 1.0),
    its model computing on the DP batches alone (`fedtide.privacy.dp_guards.UnaccountedData`)."""
    from fedtide.client.schedule import train_schedule
    from fedtide.continual.methods import method_class
    from fedtide.models import build_scenario_model
    from fedtide.privacy.dp_guards import UnaccountedData
    from fedtide.server.array_check import array_problem

    if not method_class(scenario.continual.method).dp_compatible:
        report.add("DP-SGD", True, passed="not DP-compatible: refused when privacy is on")
        return
    private = scenario.model_copy(update={"privacy": scenario.privacy.model_copy(update={"enabled": True})})
    private.privacy.noise_multiplier = 1.0
    model = build_scenario_model(private, seed=private.seed)
    try:
        reply = train_schedule(private, 0, SCHEDULE[:2], ArrayRecord(model.state_dict()))[-1].reply
    except UnaccountedData as error:  # the claim is false: the message says why and the fix
        report.add("DP-SGD", False, str(error))
        return
    except Exception as error:
        report.add("DP-SGD", False, f"dp_compatible, but a DP round failed: {_failed(error, folder)}")
        return
    problem = array_problem(reply["arrays"], ArrayRecord(model.state_dict()))
    epsilon = float(reply["client"]["epsilon"])
    report.add(
        "DP-SGD",
        problem is None and epsilon > 0,
        f"under DP: {problem or f'epsilon {epsilon}'}",
        f"trains and consolidates under DP-SGD on DP batches only (epsilon {epsilon:.2f} after 2 rounds)",
    )


def _check_state(
    scenario: Scenario, states: list[RecordDict], after_consolidation: list[RecordDict], report: PluginReport
) -> None:
    """The state stored after consolidation loads back unchanged and is still there a round later."""
    from fedtide.client.state import METHOD_ARRAYS_KEY, METHOD_LAYOUT_KEY, ClientState
    from fedtide.continual.methods import build_method
    from fedtide.continual.state_codec import encode
    from fedtide.data.stream import training_pool
    from fedtide.models import build_scenario_model

    stored = after_consolidation[0]
    arrays = {k: v.numpy() for k, v in stored[METHOD_ARRAYS_KEY].items()}
    layout = json.loads(str(stored[METHOD_LAYOUT_KEY]["layout"]))
    model = build_scenario_model(scenario)
    method = build_method(scenario.continual)
    method.bind(model, training_pool(scenario))
    try:
        ClientState(stored, scenario.stream.n_experiences).restore_method(method, model)
        again_arrays, again_layout = encode(method.state_dict())
    except Exception as error:
        report.add("state_dict() round-trip", False, f"{type(error).__name__}: {error}")
        return
    report.add(
        "state_dict() round-trip",
        _same(arrays, {k: v.numpy() for k, v in again_arrays.items()})
        and json.loads(str(again_layout["layout"])) == layout,
        "loading the stored state and storing it again gives different state",
        f"load_state_dict() then state_dict() gives back the same {len(arrays)} arrays and values",
    )
    later = json.loads(str(states[0][METHOD_LAYOUT_KEY]["layout"]))
    report.add(
        "state kept across rounds",
        _entries(later) >= _entries(layout),
        f"state after round 3 {sorted(_entries(later))} lost some of round 2's {sorted(_entries(layout))}",
        "round 3 restored and kept the state of round 2's consolidation",
    )


def _entries(layout: dict, path: str = "") -> set[str]:
    """The paths of a state layout's entries (`anchor/0/1.weight`), to compare two states' shapes."""
    if "dict" in layout:
        return {p for key, item in layout["dict"] for p in _entries(item, f"{path}/{key}")}
    if "list" in layout:
        return {p for i, item in enumerate(layout["list"]) for p in _entries(item, f"{path}/{i}")}
    return {path}


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _fedavg(replies: list[RecordDict]) -> ArrayRecord:
    """Flower's FedAvg of the replies' arrays, weighted by their examples (what `FedAvg.aggregate_train` does)."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    own = [RecordDict({"arrays": r["arrays"], "metrics": r["metrics"]}) for r in replies]
    return aggregate_arrayrecords(own, "num-examples")


# --- strategies, in-process ---------------------------------------------------------------


def _check_strategy(scenario: Scenario, report: PluginReport, folder: Path) -> None:
    from fedtide.records.run_folder import create_run_folder, read_metrics
    from fedtide.runner.simulation import simulate_in_process

    run_dir = create_run_folder(scenario, folder)
    try:
        simulate_in_process(scenario, run_dir)
    except FederationError as error:  # one line naming the strategy's file:line, and the run's errors.log
        report.add("federation completes", False, " ".join(str(error).split()))
        return
    except Exception as error:  # the strategy's own exception, raised in the ServerApp
        report.add("federation completes", False, _failed(error, run_dir))
        return
    if not (run_dir / "summary.json").exists():
        report.add("federation completes", False, f"the run ended without a summary (its folder: {run_dir})")
        return
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [r for r in read_metrics(run_dir) if r["type"] == "round"]
    replying = max(r["clients"]["replied"] for r in rounds)
    report.add(
        "federation completes",
        True,
        passed=f"{len(rounds)} rounds, {replying} clients replying, one start() per experience",
    )
    report.add(
        "aggregated arrays fit the model every round",
        len(rounds) == scenario.total_rounds,
        f"{len(rounds)} rounds recorded, expected {scenario.total_rounds}",
        "keys, shapes and finiteness checked after each round",
    )
    matrix = summary["accuracy_matrix"]
    report.add(
        "global model evaluates",
        len(matrix) == scenario.stream.n_experiences and all(0.0 <= a <= 1.0 for row in matrix for a in row),
        f"accuracy matrix {matrix}",
        f"accuracy matrix {[[round(a, 3) for a in row] for row in matrix]}",
    )
