"""What the server and a client tell each other in a training round, in Flower records.

The train message carries Flower's `arrays` and `config` (the experience, its rounds,
the scenario) and, for a client that must consolidate experiences it was not sampled
at the end of, the global weights that ended each of them. The reply carries:

- `arrays`: the client's model;
- `metrics` (MetricRecord): only what a strategy may average — `num-examples` (the
  weight), `train_loss`, `epsilon`;
- `client` (ConfigRecord): bookkeeping, never averaged — partition id, consolidations,
  whether it trained, its noise multiplier and budget state;
- `privacy` (ConfigRecord, under DP): the client's whole accountant history;
- `host` (ConfigRecord): the Ray node and machine that computed it.

Flower's strategies validate only the replies' ArrayRecord and MetricRecord, so the
config records pass through them untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtide.privacy.accounting import History, history_from_record, history_record
from fedtide.run_files import ClientRoundRecord

EXPERIENCE_END_PREFIX = "experience-end."


def experience_end_key(experience: int) -> str:
    """The train message's record holding the global weights that ended `experience`."""
    return f"{EXPERIENCE_END_PREFIX}{experience}"


def experience_ends(content: RecordDict) -> dict[int, ArrayRecord]:
    return {
        int(key.removeprefix(EXPERIENCE_END_PREFIX)): record
        for key, record in content.items()
        if key.startswith(EXPERIENCE_END_PREFIX)
    }


@dataclass(frozen=True)
class ClientRoundReport:
    """One client's account of one round: what it trained, consolidated and spent."""

    partition_id: int
    num_examples: int = 0
    train_loss: float = 0.0
    empty: bool = False  # it holds no data in this experience
    consolidated: int = 0  # past experiences consolidated in this call
    consolidation_counts: list[int] = field(default_factory=list)
    epsilon: float = 0.0
    noise_multiplier: float = 0.0
    budget_exhausted: bool = False
    dp_history: History | None = None
    host: dict[str, str] = field(default_factory=dict)

    def to_content(self, arrays: ArrayRecord) -> RecordDict:
        """The reply's records (see the module docstring)."""
        content = RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord(
                    {"num-examples": self.num_examples, "train_loss": self.train_loss, "epsilon": self.epsilon}
                ),
                "client": ConfigRecord(
                    {
                        "partition_id": self.partition_id,
                        "empty": self.empty,
                        "consolidated": self.consolidated,
                        "consolidation_counts": list(self.consolidation_counts),
                        "noise_multiplier": self.noise_multiplier,
                        "budget_exhausted": self.budget_exhausted,
                    }
                ),
            }
        )
        if self.dp_history is not None:
            content["privacy"] = history_record(self.dp_history)
        if self.host:
            content["host"] = ConfigRecord(dict(self.host))
        return content

    @classmethod
    def from_reply(cls, reply: Message) -> ClientRoundReport:
        return cls.from_content(reply.content)

    @classmethod
    def from_content(cls, content: RecordDict) -> ClientRoundReport:
        metrics, client = content["metrics"], content["client"]
        return cls(
            partition_id=int(client["partition_id"]),
            num_examples=int(metrics["num-examples"]),
            train_loss=float(metrics["train_loss"]),
            empty=bool(client["empty"]),
            consolidated=int(client["consolidated"]),
            consolidation_counts=[int(c) for c in client["consolidation_counts"]],
            epsilon=float(metrics["epsilon"]),
            noise_multiplier=float(client["noise_multiplier"]),
            budget_exhausted=bool(client["budget_exhausted"]),
            dp_history=history_from_record(content["privacy"]) if "privacy" in content else None,
            host={k: str(v) for k, v in content["host"].items()} if "host" in content else {},
        )

    def as_record(self) -> ClientRoundRecord:
        """The client's entry in a metrics.jsonl round record."""
        return ClientRoundRecord(
            partition_id=self.partition_id,
            num_examples=self.num_examples,
            train_loss=self.train_loss,
            empty=int(self.empty),
            consolidated=self.consolidated,
            consolidation_counts=list(self.consolidation_counts),
            epsilon=self.epsilon,
            noise_multiplier=self.noise_multiplier,
            budget_exhausted=int(self.budget_exhausted),
            ray_node_id=self.host.get("ray_node_id"),
            hostname=self.host.get("hostname"),
            dp_history=[list(row) for row in self.dp_history] if self.dp_history is not None else None,
        )
