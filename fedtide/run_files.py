"""The files of one run folder, and the typed records they hold.

scenario.yaml (the resolved scenario), import_path.json (the folders the run made
importable for its "module:Class" plugins, so that a resume imports them as it did),
metrics.jsonl (a `RoundRecord` per round and an `ExperienceRecord` per experience, written
as the run goes), model.pt, summary.json (a `RunSummary`), and while the run is unfinished
checkpoint/ (its latest checkpoint, round-NNNN.pkl, and the clients-*.pkl files of client
states it names: `fedtide.server.checkpoint`). A run never writes into an existing
folder: a second run of the same name gets a numbered sibling; only `fedtide resume`
continues one. summary.json appears only, and whole, when the run has finished. Readers
(the report, the CLI) use the records, never torch: this module imports none.

A record's `to_dict()` is exactly the JSON the file holds (same keys, same order, an
optional section left out when absent), so run folders written before the records
existed read and write back byte for byte.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from fedtide.data.loading import parse_scenario, scenario_to_yaml
from fedtide.data.schema import Scenario
from fedtide.errors import ScenarioError

SCENARIO_FILE = "scenario.yaml"
IMPORT_PATH_FILE = "import_path.json"  # {"folders": [...]}: absolute folders put on sys.path for plugins
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"  # the final global weights (a torch state_dict), written by the server
LOG_FILE = "errors.log"  # every failure in full (tracebacks), where the console and metrics have one line
NOTICES_FILE = "run.log"  # the libraries' log lines and warnings, kept off the console (`fedtide.notices`)
CHECKPOINT_DIR = "checkpoint"  # the latest checkpoint of an unfinished run, deleted when it finishes
_CHECKPOINT_NAME = re.compile(r"round-(\d+)\.pkl")
SWEEP_FILE = "sweep.yaml"  # in a sweep's folder: its grid, and the report options its file gave
REPORT_KEY = "report"  # a sweep file's section of report options (`ReportOptions`)
# The false-positive rate at which a summary's audit reports the attack's true-positive rate.
LOW_FPR = 0.01

R = TypeVar("R", bound="_Record")


class _Record:
    """The file's keys are the record's fields, in order; the `_OPTIONAL` ones are left out while None.

    A nested section may be given typed or in its JSON form (a dict, or a list or map of
    them): `from_dict` hands the file's sections to the constructor as they are, and the
    record holds them typed either way.
    """

    _TYPE: ClassVar[str | None] = None  # the line's "type" in metrics.jsonl
    _OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {} if self._TYPE is None else {"type": self._TYPE}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name not in self._OPTIONAL:
                raw[f.name] = _plain(value)
        return raw

    @classmethod
    def from_dict(cls: type[R], raw: dict[str, Any]) -> R:
        """Keys this version does not know (a later version's) are ignored rather than refused."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def _plain(value: Any) -> Any:
    """JSON values, a nested record through its own `to_dict` (`asdict` would write absent optional keys as null)."""
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(value: R | dict[str, Any] | None, record: type[R]) -> R | None:
    return record.from_dict(value) if isinstance(value, dict) else value


def _typed_list(values: list[R | dict[str, Any]] | None, record: type[R]) -> list[R] | None:
    return None if values is None else [_typed(v, record) for v in values]


def _set(record: _Record, name: str, value: Any) -> None:
    """Assign in __post_init__ of a frozen record."""
    object.__setattr__(record, name, value)


@dataclass(frozen=True, kw_only=True)
class ClientRoundRecord(_Record):
    """One replying client's round: built by the client, read from its reply (`fedtide.protocol`), written per round."""

    _OPTIONAL = ("ray_node_id", "hostname", "dp_history", "method_metrics")

    partition_id: int
    num_examples: int
    train_loss: float
    empty: int  # 1 when it held no data in this experience (0/1 in the file, not a JSON bool)
    consolidated: int  # past experiences consolidated in this call
    consolidation_counts: list[int]
    epsilon: float
    noise_multiplier: float
    budget_exhausted: int  # 0/1, as `empty`
    ray_node_id: str | None = None  # absent when the client ran outside Ray
    hostname: str | None = None
    dp_history: list[list[float]] | None = None  # under DP: (noise multiplier, sample rate, steps) rows
    method_metrics: dict[str, float] | None = None  # what the continual method reported (`metrics()`)


@dataclass(frozen=True, kw_only=True)
class ClientFailure(_Record):
    """A client that failed a round, and why (the exception it raised, or what it returned wrong)."""

    partition_id: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class ClientDrop(_Record):
    """A sampled client that a simulated fault kept out of a round: it was sent nothing and trained nothing.

    `fault` is "dropout" (the scenario's per-round dropout probability) or "unavailable"
    (a stretch of rounds in `faults.unavailable`). Real failures are `ClientFailure`s.
    """

    partition_id: int
    fault: str


@dataclass(frozen=True, kw_only=True)
class RoundPrivacy(_Record):
    """The clients' cumulative sample-level ε after a round: a client not sampled keeps its last value.

    Each client's ε is its own guarantee, on its own dataset: the run's is the largest,
    and the smallest says how far apart they are. No mean of them is a guarantee of
    anything; `epsilon_mean` is only read from runs written before `epsilon_min` existed.
    """

    _OPTIONAL = ("epsilon_min", "epsilon_mean")

    epsilon_max: float
    epsilon_min: float | None = None  # absent from runs written before it existed
    epsilon_mean: float | None = None  # written by earlier versions only
    epsilon_per_client: dict[str, float]
    budget_exhausted_clients: list[int]


@dataclass(frozen=True, kw_only=True)
class RoundClientLevel(_Record):
    """Client-level DP after a round: ε of the noisy aggregates so far, the clipping norm used,
    and the clipped updates the round averaged."""

    epsilon: float
    clipping_norm: float
    aggregated: int


@dataclass(frozen=True, kw_only=True)
class RoundRecord(_Record):
    """One line of metrics.jsonl per global round: the global model's accuracy and the clients' round."""

    _TYPE = "round"
    _OPTIONAL = ("failures", "dropped", "privacy", "client_level", "strategy_metrics", "method_metrics")

    round: int
    experience: int
    round_in_experience: int
    accuracy: list[float]  # on each experience seen so far
    mean_accuracy: float
    train_loss: float | None  # None when no client trained
    clients: dict[str, int]  # sampled, dropped, replied, failed, empty (dropped: absent before faults existed)
    per_client: list[ClientRoundRecord]
    failures: list[ClientFailure] | None = None  # only when a client failed
    dropped: list[ClientDrop] | None = None  # only when a simulated fault dropped a client
    wall_time_s: float
    privacy: RoundPrivacy | None = None  # only under sample-level DP
    client_level: RoundClientLevel | None = None  # only under client-level DP
    # what aggregate_train returned of its own, if any (the clients' MetricRecord keys are theirs)
    strategy_metrics: dict[str, float | list[float]] | None = None
    # the continual method's metrics over the clients, aggregated as it declares (`metric_aggregation`)
    method_metrics: dict[str, float] | None = None

    def __post_init__(self) -> None:
        _set(self, "per_client", _typed_list(self.per_client, ClientRoundRecord))
        _set(self, "failures", _typed_list(self.failures, ClientFailure))
        _set(self, "dropped", _typed_list(self.dropped, ClientDrop))
        _set(self, "privacy", _typed(self.privacy, RoundPrivacy))
        _set(self, "client_level", _typed(self.client_level, RoundClientLevel))


@dataclass(frozen=True)
class ExperienceRecord(_Record):
    """One line of metrics.jsonl per finished experience: its row of the accuracy matrix."""

    _TYPE = "experience"

    experience: int
    accuracy: list[float]


@dataclass(frozen=True, kw_only=True)
class PrivacySummary(_Record):
    """Sample-level DP-SGD of a run: each client's noise and cumulative ε, by its own accountant."""

    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: dict[str, float]  # per client (calibrated per client under target_epsilon)
    target_epsilon: float | None
    epsilon_max: float
    epsilon_per_client: dict[str, float]
    budget_exhausted_clients: list[int]


@dataclass(frozen=True, kw_only=True)
class ClientLevelSummary(_Record):
    """Client-level DP of a run: the mechanism as it ran, what its ε is recomputed from, and ε.

    Each of the `rounds` rounds released the sum of the sampled clients' clipped updates
    over the fixed denominator `expected_clients`, with Gaussian noise of σ·C over it
    (σ = `noise_multiplier`, of both queries under adaptive clipping). Recomputing ε: the
    subsampled Gaussian at rate `sample_rate` and multiplier `accounted_noise_multiplier`
    (σ over the sensitivity the `sampling` and `adjacency` give, `fedtide.privacy.client_level`),
    composed `rounds` times, by Opacus's `accountant` at `delta`; under replace-one, by
    dp-accounting's RDP for sampling without replacement of `expected_clients` of `num_clients`.
    `aggregated_per_round` (the updates each round summed) does not enter ε: the fixed
    denominator makes one client's effect the same however many replied. `clipping_norm`
    is the last round's (adaptive clipping moves it from `initial_clipping_norm`).
    """

    _OPTIONAL = ("clipped_count_stddev", "update_noise_multiplier")

    sampling: str = "fixed"  # poisson | fixed (runs from before the field: Flower's fixed-size sample)
    adjacency: str = "zero_out"  # add_remove | replace_one | zero_out (before the field: what was accounted)
    num_clients: int = 0
    noise_multiplier: float
    accounted_noise_multiplier: float | None = None
    sample_rate: float  # q
    expected_clients: float | None = None  # the fixed denominator: qN, or m under fixed sampling
    rounds: int  # noisy aggregates released
    aggregated_per_round: list[int]
    delta: float
    accountant: str
    clipping: str  # fixed | adaptive
    clip_on: str  # server | client
    initial_clipping_norm: float
    clipping_norm: float
    clipped_count_stddev: float | None = None  # adaptive: σ_b, the noise on the count of unclipped updates
    update_noise_multiplier: float | None = None  # adaptive: z_Δ, the sum's share of σ
    target_epsilon: float | None
    epsilon: float
    secure_rng: bool = False


SAMPLE, CLIENT = "sample", "client"
PRIVACY_UNITS = (SAMPLE, CLIENT)  # what one neighbouring dataset differs by
# How a guarantee's neighbouring datasets differ, and how its unit is drawn into each step.
_ADJACENCY = {
    "add_remove": "add or remove one {unit}",
    "replace_one": "replace one {unit}",
    "zero_out": "zero out one {unit}'s contribution",
}
_UNIT_WORDS = {SAMPLE: "sample of a client's dataset", CLIENT: "client's data"}
_SAMPLING = {
    (SAMPLE, "poisson"): "Poisson sampling of batches",
    (CLIENT, "poisson"): "Poisson sampling of clients",
    (CLIENT, "fixed"): "a fixed number of clients per round, drawn without replacement",
}


@dataclass(frozen=True, kw_only=True)
class PrivacyGuarantee(_Record):
    """One (ε, δ) of a run and what it is a guarantee about.

    `unit` is what two neighbouring inputs differ by: one sample of a client's dataset
    (sample-level DP-SGD, each client by its own accountant: ε is the largest client's)
    or one client's data (client-level DP). `adjacency` is how they differ (add_remove,
    replace_one, zero_out) and `sampling` how the unit is drawn into each step, as the
    accountant took it. A run with both levels holds two guarantees; neither bounds the
    other (a sample-level ε says nothing of a whole client, and a client-level ε under
    add/remove bounds a change of one sample only through group privacy), so no ε of a
    run is ever the smaller of the two.
    """

    unit: str  # sample | client
    epsilon: float
    delta: float
    adjacency: str
    sampling: str

    @property
    def neighbouring(self) -> str:
        """The neighbouring relation in words: "add or remove one sample of a client's dataset"."""
        unit = _UNIT_WORDS.get(self.unit, self.unit)
        return _ADJACENCY.get(self.adjacency, self.adjacency + " of one {unit}").format(unit=unit)

    @property
    def sampled_by(self) -> str:
        return _SAMPLING.get((self.unit, self.sampling), f"{self.sampling} sampling")

    def describe(self) -> str:
        """`ε 2.000 (δ 1.0e-04): add or remove one sample of a client's dataset, Poisson sampling of batches`."""
        return f"ε {self.epsilon:.3f} (δ {self.delta:.1e}): {self.neighbouring}, {self.sampled_by}"


def privacy_guarantees(
    privacy: PrivacySummary | None, client_level: ClientLevelSummary | None
) -> list[PrivacyGuarantee]:
    """The run's guarantees, sample-level first: one per level it ran, each with its own unit."""
    guarantees = []
    if privacy is not None:
        # Opacus's accountants: the subsampled Gaussian under add/remove, batches Poisson-sampled
        sample = {"adjacency": "add_remove", "sampling": "poisson"}
        guarantees.append(PrivacyGuarantee(unit=SAMPLE, epsilon=privacy.epsilon_max, delta=privacy.delta, **sample))
    if client_level is not None:
        guarantees.append(
            PrivacyGuarantee(
                unit=CLIENT,
                epsilon=client_level.epsilon,
                delta=client_level.delta,
                adjacency=client_level.adjacency,
                sampling=client_level.sampling,
            )
        )
    return guarantees


@dataclass(frozen=True, kw_only=True)
class FaultSummary(_Record):
    """The simulated faults' toll on a run: how many (client, round) trainings they cancelled, and whose."""

    clients_dropped: int  # summed over rounds: a client dropped in 3 rounds counts 3
    dropped_per_client: dict[str, int]  # every client, 0 included

    def describe(self) -> str:
        """`10 (per client 0..3: 0, 5, 0, 5)`, as the console and the report print it."""
        counts = list(self.dropped_per_client.values())
        return f"{self.clients_dropped} (per client 0..{len(counts) - 1}: {', '.join(map(str, counts))})"


@dataclass(frozen=True, kw_only=True)
class ClientAudit(_Record):
    """The attack's success on one client's members against as many class-matched non-members."""

    auc: float
    tpr_at_1pct_fpr: float
    members: int
    nonmembers: int


@dataclass(frozen=True, kw_only=True)
class CanaryAudit(_Record):
    """The canary audit (`fedtide.metrics.canary_audit`): ε_lower, and the guesses it rests on.

    Of `canaries` canaries, `included` were trained on (coin flips); the auditor guessed on
    `guesses` = `guesses_in` ("in") + `guesses_out` ("out") of them and was right `correct`
    times. `plans` guess plans were tried, each at (1 − confidence) / plans; this is the best.
    `epsilon_ceiling` is the largest ε_lower these canaries could show (every guess right,
    the best plan, at this δ and confidence); None in summaries written before it existed.
    `epsilon_audited` is the ε that protects one canary at `delta` (`canary_guarantee`: the
    sample-level ε, or the client-level one through group privacy): what ε_lower must stay
    under; None for a non-private run, and in summaries written before it existed.
    """

    _OPTIONAL = ("epsilon_ceiling", "epsilon_audited")

    canaries: int
    included: int
    guesses: int
    correct: int
    guesses_in: int
    guesses_out: int
    plans: int
    confidence: float
    delta: float
    epsilon_lower: float
    epsilon_ceiling: float | None = None
    epsilon_audited: float | None = None
    score: str

    def blind_at(self, epsilon: float | None) -> bool:
        """True when the audit could not have shown a violation of `epsilon`: its ceiling is not above it.

        False without an ε (a non-private run) or without a recorded ceiling (an older summary).
        """
        return epsilon is not None and self.epsilon_ceiling is not None and self.epsilon_ceiling <= epsilon


@dataclass(frozen=True, kw_only=True)
class AuditSummary(_Record):
    """The membership-inference attack on the final model: per client, with mean and worst case.

    The aggregates are None when no client held training data to attack. `canaries` is the
    canary audit's result, only when the scenario has canaries (`audit.canaries`).
    """

    _OPTIONAL = ("canaries",)

    attack: str
    auc_mean: float | None
    auc_max: float | None
    tpr_at_1pct_fpr_mean: float | None
    tpr_at_1pct_fpr_max: float | None
    per_client: dict[str, ClientAudit]
    canaries: CanaryAudit | None = None

    def __post_init__(self) -> None:
        _set(self, "per_client", {k: _typed(v, ClientAudit) for k, v in self.per_client.items()})
        _set(self, "canaries", _typed(self.canaries, CanaryAudit))


@dataclass(frozen=True, kw_only=True)
class RunSummary(_Record):
    """summary.json: what a finished run measured."""

    _OPTIONAL = (
        "privacy", "client_level", "epsilons", "audit", "faults", "strategy_metrics", "method_metrics",
        "startup_s", "rounds_s", "end_s",
    )  # fmt: skip

    name: str
    seed: int
    strategy: str
    method: str
    num_clients: int
    n_experiences: int
    rounds: int
    classes_per_experience: list[list[int]]
    accuracy_matrix: list[list[float]]  # A[e][j]: accuracy on experience j after training experience e
    final_average_accuracy: float
    average_forgetting: float
    bwt: float
    clients_failed: int
    # The server's clock from building its model and test data through the rounds, the final
    # model's save and the canary audit (a resumed run: up to its checkpoint plus the resumed
    # part); not the imports, nor Ray's start. The whole command is `startup_s + rounds_s + end_s`.
    wall_time_s: float
    ray_nodes: list[str]
    privacy: PrivacySummary | None = None  # only under sample-level DP
    client_level: ClientLevelSummary | None = None  # only under client-level DP
    # each ε with its unit and neighbouring relation, side by side (`privacy_guarantees`);
    # absent from non-private runs and from runs written before it existed
    epsilons: list[PrivacyGuarantee] | None = None
    audit: AuditSummary | None = None  # absent from runs written before the audit existed
    faults: FaultSummary | None = None  # only when the scenario simulates faults
    strategy_metrics: dict[str, float | list[float]] | None = None  # the last round's, if the strategy had any
    method_metrics: dict[str, float] | None = None  # the last round's aggregate, if the method had any
    # The session that finished the run (`RunTimes`), absent from runs written before they existed:
    startup_s: float | None = None  # from the command's start (imports, Ray, data, model) to the first round
    rounds_s: float | None = None  # the rounds this session ran, evaluations and checkpoints included
    end_s: float | None = None  # after the last round: final model, audits, summary.json

    def __post_init__(self) -> None:
        _set(self, "privacy", _typed(self.privacy, PrivacySummary))
        _set(self, "client_level", _typed(self.client_level, ClientLevelSummary))
        _set(self, "epsilons", _typed_list(self.epsilons, PrivacyGuarantee))
        _set(self, "audit", _typed(self.audit, AuditSummary))
        _set(self, "faults", _typed(self.faults, FaultSummary))

    @property
    def private(self) -> bool:
        """A run is private when it has sample-level DP (noise 0 writes none) or client-level DP."""
        return self.privacy is not None or self.client_level is not None

    @property
    def privacy_level(self) -> str | None:
        """sample, client or both; None for a non-private run."""
        if self.privacy and self.client_level:
            return "both"
        if self.privacy:
            return "sample"
        return "client" if self.client_level else None

    @property
    def guarantees(self) -> list[PrivacyGuarantee]:
        """Each ε of the run with its unit, read from the privacy sections (runs of any version)."""
        return privacy_guarantees(self.privacy, self.client_level)

    @property
    def units(self) -> list[str]:
        """The units the run has an ε of: [], [sample], [client] or [sample, client]."""
        return [guarantee.unit for guarantee in self.guarantees]

    def guarantee(self, unit: str) -> PrivacyGuarantee | None:
        """The run's guarantee of `unit`, None when it ran no DP of that unit."""
        return next((g for g in self.guarantees if g.unit == unit), None)

    def epsilon_of(self, unit: str) -> float | None:
        """ε of `unit` (sample: the largest client's), None when the run has no ε of that unit.

        There is deliberately no unit-less `epsilon`: under both levels the two ε's are
        two guarantees about different neighbouring datasets, and neither is the run's.
        """
        guarantee = self.guarantee(unit)
        return guarantee.epsilon if guarantee else None


@dataclass(frozen=True)
class ReportOptions:
    """What a report is asked, independent of any scenario: a sweep file's `report:` section
    (kept in the sweep folder's sweep.yaml), or `fedtide report`'s flags.

    `privacy_unit` is the unit of the ε a report compares runs at (sample | client); None
    takes it from the runs (`fedtide.report.runs.place_runs`).
    """

    privacy_unit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("privacy_unit", self.privacy_unit),) if v is not None}


def parse_report_options(raw: Any, where: str = REPORT_KEY) -> ReportOptions:
    """A `report:` section (None when there is none); an unknown key or unit fails naming its field."""
    if raw is None:
        return ReportOptions()
    if not isinstance(raw, dict):
        raise ScenarioError(where, "must be a section", "e.g. report: {privacy_unit: client}")
    unknown = sorted(set(raw) - {"privacy_unit"})
    if unknown:
        raise ScenarioError(f"{where}.{unknown[0]}", "unknown key", "the report options are: privacy_unit")
    unit = raw.get("privacy_unit")
    if unit is not None and unit not in PRIVACY_UNITS:
        raise ScenarioError(f"{where}.privacy_unit", f"is {unit!r}", f"give one of: {', '.join(PRIVACY_UNITS)}")
    return ReportOptions(privacy_unit=unit)


def read_report_options(folder: Path) -> ReportOptions:
    """The report options a sweep folder's sweep.yaml holds (none for a run folder, or a sweep without any)."""
    path = folder / SWEEP_FILE
    if not path.is_file():
        return ReportOptions()
    raw = yaml.safe_load(path.read_text()) or {}
    return parse_report_options(raw.get(REPORT_KEY) if isinstance(raw, dict) else None, f"{path}: {REPORT_KEY}")


def create_run_folder(scenario: Scenario, output: Path | None = None, import_path: Sequence[Path] = ()) -> Path:
    """Make a fresh folder `output/name` (or `name-2`, `name-3`...) holding the resolved scenario.

    `import_path`: the folders this run made importable for its plugins (`fedtide.registry.plugin_folders`).
    """
    parent = Path(output if output is not None else scenario.output)
    parent.mkdir(parents=True, exist_ok=True)
    folder, suffix = parent / scenario.name, 1
    while True:
        try:
            return prepare_run_folder(folder, scenario, import_path)
        except FileExistsError:
            suffix += 1
            folder = parent / f"{scenario.name}-{suffix}"


def prepare_run_folder(folder: Path, scenario: Scenario, import_path: Sequence[Path] = ()) -> Path:
    """Create `folder` (which must not exist yet) with the resolved scenario, and where its plugins come from."""
    folder.mkdir(parents=True)
    (folder / SCENARIO_FILE).write_text(scenario_to_yaml(scenario))
    if import_path:
        folders = [str(Path(path).resolve()) for path in import_path]
        (folder / IMPORT_PATH_FILE).write_text(json.dumps({"folders": folders}, indent=1) + "\n")
    return folder


def read_import_path(folder: Path) -> list[Path]:
    """The folders a run made importable for its plugins; none for a run that recorded none (or no such folder)."""
    path = folder / IMPORT_PATH_FILE
    if not path.is_file():
        return []
    return [Path(name) for name in json.loads(path.read_text())["folders"]]


def read_run_scenario(folder: Path) -> Scenario:
    """The scenario a run folder was made for (its scenario.yaml)."""
    path = folder / SCENARIO_FILE
    if not path.is_file():
        raise ScenarioError(str(folder), "is not a run folder (no scenario.yaml in it)", "give a folder under runs/")
    return parse_scenario(yaml.safe_load(path.read_text()))


def checkpoint_file(folder: Path, global_round: int) -> Path:
    """Where the checkpoint taken after `global_round` lives (the name alone tells the round)."""
    return folder / CHECKPOINT_DIR / f"round-{global_round:04d}.pkl"


def checkpoint_round(folder: Path) -> int | None:
    """The global round of the folder's latest checkpoint, None without one; read from the file names only."""
    rounds = [
        int(match.group(1))
        for path in (folder / CHECKPOINT_DIR).glob("round-*.pkl")
        if (match := _CHECKPOINT_NAME.fullmatch(path.name))
    ]
    return max(rounds, default=None)


def unfinished_run(scenario: Scenario, output: Path | None = None) -> tuple[Path, int] | None:
    """A folder that a run of `scenario` would take or has taken, holding an unfinished run of it to resume.

    Looks where `create_run_folder` would (`name`, `name-2`, ...) for a folder with this
    very scenario, no summary.json and a checkpoint; returns it with its checkpoint's round.
    """
    parent = Path(output if output is not None else scenario.output)
    taken = re.compile(re.escape(scenario.name) + r"(?:-(\d+))?")
    numbered = {}
    for path in parent.glob(f"{scenario.name}*"):
        if match := taken.fullmatch(path.name):
            numbered[int(match.group(1) or 1)] = path
    for _, folder in sorted(numbered.items()):
        done = checkpoint_round(folder)
        if done is None or (folder / SUMMARY_FILE).exists() or not (folder / SCENARIO_FILE).is_file():
            continue
        try:
            same = read_run_scenario(folder) == scenario
        except ScenarioError:  # a scenario.yaml this version cannot read is not this scenario
            same = False
        if same:
            return folder, done
    return None


def append_metrics(folder: Path, record: RoundRecord | ExperienceRecord) -> None:
    with (folder / METRICS_FILE).open("a") as stream:
        stream.write(json.dumps(record.to_dict()) + "\n")


def append_log(folder: Path, text: str) -> Path:
    """Add a failure, in full, to the run's log; the path is what one-line messages point to."""
    path = folder / LOG_FILE
    with path.open("a") as stream:
        stream.write(text.rstrip("\n") + "\n\n")
    return path


def metrics_length(folder: Path) -> int:
    """How many bytes of metrics.jsonl are on disk, made durable first (a checkpoint records it)."""
    path = folder / METRICS_FILE
    with path.open("rb") as stream:
        os.fsync(stream.fileno())
    return path.stat().st_size


def truncate_metrics(folder: Path, length: int) -> None:
    """Cut metrics.jsonl back to its first `length` bytes: the rounds a checkpoint holds, not those run after it."""
    path = folder / METRICS_FILE
    if path.stat().st_size < length:
        raise ScenarioError(
            str(path), f"is shorter than its checkpoint records ({length} bytes)", "start the run afresh"
        )
    os.truncate(path, length)


def write_summary(folder: Path, summary: RunSummary) -> None:
    """Write summary.json atomically, so a reader never sees half of it."""
    partial = folder / (SUMMARY_FILE + ".partial")
    partial.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    os.replace(partial, folder / SUMMARY_FILE)


def read_summary(folder: Path) -> RunSummary:
    with _run_file(folder / SUMMARY_FILE) as path:
        return RunSummary.from_dict(json.loads(path.read_text()))


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as written, one dict per line (`type`: round or experience)."""
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines() if line]


def rounds_done(folder: Path) -> int:
    """How many rounds a run, perhaps still going, has written (without parsing its records)."""
    try:
        lines = (folder / METRICS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(line.startswith(f'{{"type": "{RoundRecord._TYPE}"') for line in lines)


def read_rounds(folder: Path) -> list[RoundRecord]:
    with _run_file(folder / METRICS_FILE):
        return [RoundRecord.from_dict(r) for r in read_metrics(folder) if r["type"] == RoundRecord._TYPE]


@contextmanager
def _run_file(path: Path) -> Iterator[Path]:
    """A file another program wrote, or one edited by hand, fails naming the file, not with a traceback."""
    try:
        yield path
    except (KeyError, TypeError, ValueError) as error:
        raise ScenarioError(str(path), f"is not a fedtide run file ({type(error).__name__}: {error})") from None
