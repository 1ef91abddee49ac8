"""The scenario file's schema: every field, its default, and what makes it invalid.

Field names here are the public contract of a scenario YAML file. Every section has
defaults so a file only states what it changes; unknown keys are refused so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DatasetName = Literal["digits", "fashion_mnist", "mnist", "cifar10", "cifar100"]
ModelName = Literal["mlp", "cnn", "resnet"]
PartitionKind = Literal["iid", "dirichlet", "pathological", "shard"]

# Known without loading any data, so a scenario can be checked before a run starts.
NUM_CLASSES: dict[str, int] = {
    "digits": 10,
    "fashion_mnist": 10,
    "mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
}


class Section(BaseModel):
    """A scenario section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NamedWithParams(BaseModel):
    """A section naming a pluggable component; any other key is that component's parameter."""

    model_config = ConfigDict(extra="allow")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetConfig(Section):
    name: DatasetName = "digits"
    root: Path | None = None


class ModelConfig(Section):
    name: ModelName = "mlp"


class StreamConfig(Section):
    n_experiences: int = Field(5, ge=1)
    class_order: list[int] | None = None


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


class ClientConfig(Section):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)


class ContinualConfig(NamedWithParams):
    method: str = "naive"


class PrivacyConfig(Section):
    """Client-side DP-SGD. `noise_multiplier: 0` (or `enabled: false`) is the non-private point.

    `target_epsilon` alone calibrates the noise so each client's planned run spends at
    most that; with `noise_multiplier` too, the noise is fixed and the target is only a
    budget at which clients stop training.
    """

    enabled: bool = False
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float | None = Field(None, gt=0, lt=1, description="default: 1 / (10 * largest client dataset)")
    accountant: Literal["rdp", "prv"] = "rdp"

    @property
    def private(self) -> bool:
        """Whether clients train with DP-SGD at all (noise 0 means plain training)."""
        return self.enabled and self.noise_multiplier != 0


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


class CheckpointConfig(Section):
    """How often a run saves what it needs to continue after an interruption (`fedtide resume`).

    `every: k` writes `checkpoint/round-NNNN.pkl` in the run folder after every k-th
    global round and after the last one, replacing the previous checkpoint; 0 turns
    checkpoints off (clients then stop sending their state with their replies).
    """

    every: int = Field(1, ge=0)


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
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: Path = Path("runs")

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset.name]

    @property
    def total_rounds(self) -> int:
        return self.stream.n_experiences * self.federation.rounds_per_experience

    @field_validator("stream")
    @classmethod
    def _class_order_unique(cls, stream: StreamConfig) -> StreamConfig:
        order = stream.class_order
        if order is not None and len(set(order)) != len(order):
            raise ValueError("class_order repeats a class; list each class once")
        return stream

    @model_validator(mode="after")
    def _stream_fits_dataset(self) -> Scenario:
        classes = self.num_classes
        if self.stream.n_experiences > classes:
            raise ValueError(
                f"stream.n_experiences={self.stream.n_experiences} exceeds the "
                f"{classes} classes of {self.dataset.name}; use at most {classes}"
            )
        order = self.stream.class_order
        if order is not None and sorted(order) != list(range(classes)):
            raise ValueError(f"stream.class_order must list each of the {classes} classes 0..{classes - 1} once")
        return self
