"""The scenario file's schema: every field, its default, and what makes it invalid.

Field names here are the public contract of a scenario YAML file. Every section has
defaults so a file only states what it changes; unknown keys are refused so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedtide.data.datasets import DATASETS
from fedtide.scenario.schedule import Schedule, schedule
from fedtide.scenario.section import Section
from fedtide.scenario.stream import StreamConfig
from fedtide.scenario.stream_checks import stream_problem

ModelName = Literal["mlp", "cnn", "resnet"]
PartitionKind = Literal["iid", "dirichlet", "pathological", "shard"]

class NamedWithParams(BaseModel):
    """A section naming a pluggable component; any other key is that component's parameter."""

    model_config = ConfigDict(extra="allow")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetConfig(Section):
    name: str = "digits"  # a name of `fedtide.data.datasets.DATASETS`
    root: Path | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset '{name}'; use one of {', '.join(DATASETS)}")
        return name


class ModelConfig(Section):
    name: ModelName = "mlp"


class PartitionConfig(Section):
    kind: PartitionKind = "iid"
    num_clients: int = Field(10, ge=1)
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration")
    classes_per_client: int = Field(2, ge=1, description="pathological: classes a client holds")
    shards_per_client: int = Field(2, ge=1, description="shard: shards a client holds")
    min_size: int = Field(0, ge=0, description="dirichlet: resample until every client has this many")


class StrategyConfig(NamedWithParams):
    name: str = "fedavg"


class FederationConfig(Section):
    strategy: StrategyConfig = StrategyConfig()
    rounds_per_experience: int = Field(3, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(0.0, ge=0, le=1)
    min_train_nodes: int = Field(1, ge=1)


# Local training that learns when a scenario names none: the quickstart's (docs/results.md,
# "Client defaults"). Adam's state starts afresh every round, so it needs more than torch's 1e-3.
DEFAULT_LR = {"sgd": 0.1, "adam": 3e-3}


class ClientConfig(Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(DEFAULT_LR["sgd"], gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _lr_for_the_optimizer(cls, data: Any) -> Any:
        """An unset lr follows the optimizer: SGD's default would make Adam diverge."""
        if isinstance(data, dict) and "lr" not in data and data.get("optimizer") in DEFAULT_LR:
            return {**data, "lr": DEFAULT_LR[data["optimizer"]]}
        return data


class ContinualConfig(NamedWithParams):
    method: str = "naive"


PrivacyLevel = Literal["sample", "client", "both"]


class ClientLevelConfig(Section):
    """Client-level DP: DP-FedAvg (McMahan et al. 2018), or DP-FedOpt with a server optimizer.

    `sampling: poisson` (the default) takes each client into a round independently with
    probability q = `federation.fraction_train`; `fixed` samples exactly m of the N
    clients as Flower's strategies do (m from `fraction_train` and `min_train_nodes`).
    Each sampled client's update (its weights minus the round's global weights) is
    clipped to `clipping_norm` in L2 norm, on the server (`clip_on: server`) or by the
    client before it replies (`clip_on: client`); the clipped updates are summed and
    divided by the fixed expected count (qN, or m), never by the replies that came back,
    and Gaussian noise of standard deviation σ·C/(qN) is added. `clipping: adaptive`
    moves C each round towards the `target_clipped_quantile` of the update norms
    (Andrew et al. 2021), from `clipping_norm`; σ is then the multiplier of the whole
    release (the noisy average and the noisy count of unclipped updates together).

    ε is accounted for `adjacency` (which client datasets are neighbours):
    `add_remove` (the default; one client's data added or removed) or, with fixed
    sampling only, `replace_one` (one client's data replaced: dp-accounting's sampling
    without replacement event) or `zero_out` (one client's update replaced by zero, the
    weakest; only when asked by name). σ is `noise_multiplier`, or calibrated so that
    the whole run (every round of every experience) spends at most `target_epsilon`.
    δ defaults to 1 / (10 · number of clients).
    """

    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1, description="default: 1 / (10 * partition.num_clients)")
    clipping: Literal["fixed", "adaptive"] = "fixed"
    clip_on: Literal["server", "client"] = "server"
    clipping_norm: float = Field(1.0, gt=0, description="fixed: the norm; adaptive: the initial norm")
    target_clipped_quantile: float = Field(0.5, ge=0, le=1, description="adaptive only")
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive only")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="adaptive only; default: expected clients a round / 20 (Andrew et al.)"
    )
    sampling: Literal["poisson", "fixed"] = "poisson"
    adjacency: Literal["add_remove", "replace_one", "zero_out"] = "add_remove"

    @model_validator(mode="after")
    def _one_noise_setting(self) -> ClientLevelConfig:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError(
                "give noise_multiplier or target_epsilon, not both (the target calibrates the noise)"
            )
        return self

    @model_validator(mode="after")
    def _adjacency_for_sampling(self) -> ClientLevelConfig:
        if self.sampling == "poisson" and self.adjacency != "add_remove":
            raise ValueError(
                f"adjacency {self.adjacency} is accounted for fixed-size sampling only; "
                "use adjacency: add_remove with sampling: poisson, or sampling: fixed"
            )
        return self


class PrivacyConfig(Section):
    """Differential privacy: sample-level DP-SGD on clients, client-level DP-FedAvg on the server, or both.

    `level: sample` (the default) is Opacus DP-SGD on every client, configured by the
    fields below; `level: client` is client-level DP configured by `client_level`;
    `level: both` runs both, and the run reports both ε's. `enabled: false` turns off both.

    Sample-level: `noise_multiplier: 0` is the non-private point.

    `target_epsilon` alone calibrates the noise so each client's planned run spends at
    most that; with `noise_multiplier` too, the noise is fixed and the target is only a
    budget at which clients stop training.

    `grad_sample_mode` is how Opacus clips each sample's gradient; it changes speed, never
    ε (the same steps and sample rates are accounted). "hooks" (default) materialises every
    per-sample gradient and works with every model and method. "functorch" computes the
    same gradients with torch.func (slower on fedtide's models). "ghost" (ghost clipping)
    computes per-sample gradient norms without the gradients and backpropagates the clipped
    loss a second time: faster on the MLP, slower on the CNN, and only for methods that add
    nothing to the loss (naive, replay) without FedProx. docs/benchmarks.md has the timings.

    All DP noise and client sampling are drawn from RNGs seeded by the scenario's seed, so
    a run is reproducible and its ε is that of the idealised mechanism (anyone who knows
    the seed can regenerate the noise). `secure_rng: true` draws client sampling and the
    server's noise from the operating system's entropy and runs Opacus in `secure_mode`.
    """

    enabled: bool = False
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float | None = Field(None, gt=0, lt=1, description="default: 1 / (10 * largest client dataset)")
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks"
    level: PrivacyLevel = "sample"
    client_level: ClientLevelConfig = ClientLevelConfig()
    secure_rng: bool = False

    @field_validator("grad_sample_mode", mode="before")
    @classmethod
    def _mode_fedtide_can_use(cls, mode: Any) -> Any:
        if mode == "ew":
            raise ValueError(
                "'ew' (expanded weights) computes per-sample gradients only when Opacus's wrapper is "
                "the model, which renames every parameter that clients' state and EWC look up by name, "
                "and it fails on the empty batches Poisson sampling can draw; use hooks, functorch or ghost"
            )
        return mode

    @property
    def private(self) -> bool:
        """Whether clients train with (sample-level) DP-SGD at all (noise 0 means plain training)."""
        return self.enabled and self.level != "client" and self.noise_multiplier != 0

    @property
    def client_private(self) -> bool:
        """Whether the server aggregates with client-level DP."""
        return self.enabled and self.level != "sample"


class ResourcesConfig(Section):
    """Where the clients run: Ray resources per client and which Ray instance, or this process.

    `backend`: "ray" runs each client in a Ray worker, as Flower's simulation does (clients
    in parallel, a cluster possible); "in_process" calls every client in the driver's own
    process, one after another, through the same Flower strategy and ClientApp: no Ray
    start-up (seconds on a small run), the same numbers (tests/test_simulation.py), no
    parallelism between clients and no cluster. `flwr run` ignores it.

    `ray_address`: None starts a private local Ray instance for the run (never joins a
    cluster left running on the machine); "auto" joins the cluster Ray finds
    (`RAY_ADDRESS`, else the last `ray start` on this machine); "host:port" joins the
    cluster whose head (GCS) listens there, as printed by `ray start --head`.
    `num_gpus_per_client` may be fractional: 0.25 packs four clients on one GPU.
    """

    backend: Literal["ray", "in_process"] = "ray"
    num_cpus_per_client: float = Field(1.0, gt=0)
    num_gpus_per_client: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: str | None = None

    @field_validator("ray_address")
    @classmethod
    def _ray_address_form(cls, address: str | None) -> str | None:
        if address is None or address == "auto":
            return address
        host, sep, port = address.rpartition(":")
        if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{address!r} is not a Ray cluster address (give 'auto', or the head's GCS "
                "address as host:port, e.g. 10.0.0.5:6379 as printed by `ray start --head`; "
                "leave it unset for a private local Ray)"
            )
        return address


class Unavailability(Section):
    """Clients that fail every round from `rounds[0]` to `rounds[1]`, global rounds counted from 1, inclusive."""

    clients: list[int] = Field(min_length=1)
    rounds: tuple[int, int]

    @field_validator("clients")
    @classmethod
    def _clients_are_ids(cls, clients: list[int]) -> list[int]:
        if any(c < 0 for c in clients):
            raise ValueError(f"client ids are partition ids 0, 1, ...; got {clients}")
        return clients

    @field_validator("rounds")
    @classmethod
    def _rounds_in_order(cls, rounds: tuple[int, int]) -> tuple[int, int]:
        first, last = rounds
        if not 1 <= first <= last:
            raise ValueError(f"[{first}, {last}] is not [first, last] global rounds with 1 <= first <= last")
        return rounds


class FaultsConfig(Section):
    """Simulated client faults: which sampled clients fail a training round (`fedtide.server.faults`).

    `dropout`: the probability that a sampled client fails a round, drawn per (seed,
    client, global round) so the same clients drop whatever else is sampled and whatever
    the backend. `unavailable`: stretches of global rounds in which listed clients always fail.
    """

    dropout: float = Field(0.0, ge=0, lt=1)
    unavailable: list[Unavailability] = []

    @property
    def active(self) -> bool:
        return self.dropout > 0 or bool(self.unavailable)


class CheckpointConfig(Section):
    """How often a run saves what it needs to continue after an interruption (`fedtide resume`).

    `every: k` writes `checkpoint/round-NNNN.pkl` in the run folder after every k-th
    global round and after the last one, replacing the previous checkpoint (with the
    client states that changed since, in a file of their own); 0 turns
    checkpoints off (clients then stop sending their state with their replies).
    """

    every: int = Field(1, ge=0)


class AuditConfig(Section):
    """The canary audit: an empirical lower bound on ε from this one run (Steinke, Nasr & Jagielski 2023).

    `canaries: m` draws m held-out test images of an experience's classes, each labelled as
    another class of that experience and given a client (`fedtide.data.canaries`); a fair
    coin, seeded by the scenario seed, decides for each whether it joins that client's
    training data of that experience, as a real sample: trained on by every method, stored
    in replay buffers, counted in the DP sample rate, the planned steps and δ. After the run
    the final model scores every canary, guesses "in" for the highest scores and "out" for
    the lowest, and the right guesses give the largest ε whose (ε, δ)-DP the observation
    rejects at `confidence` (`fedtide.audit.canaries`): `epsilon_lower` in summary.json's
    audit, beside the accountant's ε. Canary images leave the test data that accuracy and the
    membership-inference audit use; every class keeps at least half of its test images, so m
    is at most half the test set (222 on digits), an error naming this field beyond. 0 (the
    default) turns the audit off and leaves every number of a run as without it.
    """

    canaries: int = Field(0, ge=0, description="canaries drawn from the test data; 0 = no canary audit")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the lower bound on ε")


class Scenario(Section):
    name: str = Field("scenario", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    stream: StreamConfig = StreamConfig()
    partition: PartitionConfig = PartitionConfig()
    federation: FederationConfig = FederationConfig()
    client: ClientConfig = ClientConfig()
    continual: ContinualConfig = ContinualConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    resources: ResourcesConfig = ResourcesConfig()
    faults: FaultsConfig = FaultsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    audit: AuditConfig = AuditConfig()
    output: Path = Path("runs")

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset.name].num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the dataset's images, known without loading them."""
        return DATASETS[self.dataset.name].input_shape

    @property
    def schedule(self) -> Schedule:
        """Each client's experiences in time (`fedtide.scenario.schedule`)."""
        return schedule(self.stream, self.partition.num_clients, self.federation.rounds_per_experience, self.seed)

    @property
    def total_rounds(self) -> int:
        """The run's last global round: n_experiences × rounds_per_experience in lockstep."""
        if self.stream.lockstep:
            return self.stream.n_experiences * self.federation.rounds_per_experience
        return self.schedule.last_round

    @model_validator(mode="after")
    def _stream_fits_dataset(self) -> Scenario:
        classes = self.num_classes
        if self.stream.kind == "class" and self.stream.n_experiences > classes:
            raise ValueError(
                f"stream.n_experiences={self.stream.n_experiences} exceeds the "
                f"{classes} classes of {self.dataset.name}; use at most {classes}"
            )
        order = self.stream.class_order
        if order is not None and sorted(order) != list(range(classes)):
            raise ValueError(f"stream.class_order must list each of the {classes} classes 0..{classes - 1} once")
        return self

    @model_validator(mode="after")
    def _stream_possible(self) -> Scenario:
        problem = stream_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _faults_fit_run(self) -> Scenario:
        clients, rounds = self.partition.num_clients, self.total_rounds
        for i, stretch in enumerate(self.faults.unavailable):
            strangers = [c for c in stretch.clients if c >= clients]
            if strangers:
                raise ValueError(
                    f"faults.unavailable.{i}.clients: no client {strangers[0]} "
                    f"(partition.num_clients={clients}: ids 0..{clients - 1})"
                )
            if stretch.rounds[1] > rounds:
                raise ValueError(
                    f"faults.unavailable.{i}.rounds: {list(stretch.rounds)} ends after the run's last global round "
                    f"{rounds}; end it by round {rounds}"
                )
        return self
