"""What the server and a client tell each other in a training round, in Flower records.

The train message carries Flower's `arrays` and `config` (the experience, its rounds,
the scenario) and, for a client that must consolidate experiences it was not sampled
at the end of, the global weights that ended each of them. The reply carries:

- `arrays`: the client's model;
- `metrics` (MetricRecord): only what a strategy may average — `num-examples` (the
  weight), `train_loss`, and the continual method's own metrics;
- `client` (ConfigRecord): bookkeeping, never averaged — partition id, consolidations,
  whether it trained, its cumulative ε, its noise multiplier and budget state. ε is a
  guarantee of this client's own, not a metric: an average of the clients' ε's weighted
  by their examples (what Flower's strategies make of a MetricRecord) bounds nothing, so
  it stays out of the record they aggregate and the server reads each client's;
- `privacy` (ConfigRecord, under DP): the client's whole accountant history;
- `host` (ConfigRecord): the Ray node and machine that computed it;
- `client-state.<key>`, when the run takes checkpoints (`checkpoint` in the train
  config): every record of the client's `Context.state` after the round, so the server
  can checkpoint what clients keep wherever they run (a Ray worker, a SuperNode).

Flower's strategies validate only the replies' ArrayRecord and MetricRecord, so the
config records pass through them untouched; `ContinualStrategy` takes the client-state
records out (they hold ArrayRecords) before the strategy sees a reply.

A resumed run gives each client back its checkpointed state with a `query.restore_state`
message whose content is that state.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtide.privacy.history import history_from_record, history_record
from fedtide.records.metrics import ClientRoundRecord

EXPERIENCE_END_PREFIX = "experience-end."
METHOD_METRIC_PREFIX = "method."  # a continual method's metric `loss` is `method.loss` in the reply
CLIENT_STATE_PREFIX = "client-state."
RESTORE_STATE = "restore_state"  # the ClientApp's query action that replaces its Context.state
CONTRACT_BROKEN = 1000  # a reply's Error code (beyond Flower's) for `fedtide.errors.ContractBroken`: the run stops


def experience_end_key(experience: int) -> str:
    """The train message's record holding the global weights that ended `experience`."""
    return f"{EXPERIENCE_END_PREFIX}{experience}"


def experience_ends(content: RecordDict) -> dict[int, ArrayRecord]:
    return {
        int(key.removeprefix(EXPERIENCE_END_PREFIX)): record
        for key, record in content.items()
        if key.startswith(EXPERIENCE_END_PREFIX)
    }


def reply_content(report: ClientRoundRecord, arrays: ArrayRecord) -> RecordDict:
    """A client's reply to a train message: its model and its round (see the module docstring)."""
    metrics = {"num-examples": report.num_examples, "train_loss": report.train_loss}
    # a method's own metrics ride in the MetricRecord, so Flower's strategies aggregate them too
    metrics |= {METHOD_METRIC_PREFIX + k: v for k, v in (report.method_metrics or {}).items()}
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord(
                {
                    "partition_id": report.partition_id,
                    "empty": bool(report.empty),
                    "consolidated": report.consolidated,
                    "consolidation_counts": list(report.consolidation_counts),
                    "epsilon": report.epsilon,
                    "noise_multiplier": report.noise_multiplier,
                    "budget_exhausted": bool(report.budget_exhausted),
                    "experience": report.experience if report.experience is not None else -1,
                    **({"classes": list(report.classes)} if report.classes else {}),
                }
            ),
        }
    )
    if report.dp_history is not None:
        content["privacy"] = history_record([(s, q, int(n)) for s, q, n in report.dp_history])
    return content


def client_round(content: RecordDict) -> ClientRoundRecord:
    """The client's round as the run files record it, read back from its reply."""
    metrics, client = content["metrics"], content["client"]
    host = content["host"] if "host" in content else {}
    history = history_from_record(content["privacy"]) if "privacy" in content else None
    return ClientRoundRecord(
        partition_id=int(client["partition_id"]),
        num_examples=int(metrics["num-examples"]),
        train_loss=float(metrics["train_loss"]),
        empty=int(bool(client["empty"])),
        consolidated=int(client["consolidated"]),
        consolidation_counts=[int(c) for c in client["consolidation_counts"]],
        epsilon=float(client["epsilon"]),
        noise_multiplier=float(client["noise_multiplier"]),
        budget_exhausted=int(bool(client["budget_exhausted"])),
        experience=int(client["experience"]) if client.get("experience", -1) >= 0 else None,
        classes=[int(c) for c in client["classes"]] if "classes" in client else None,
        ray_node_id=str(host["ray_node_id"]) if "ray_node_id" in host else None,
        hostname=str(host["hostname"]) if "hostname" in host else None,
        dp_history=[list(row) for row in history] if history is not None else None,
        method_metrics={
            key.removeprefix(METHOD_METRIC_PREFIX): float(value)
            for key, value in metrics.items()
            if key.startswith(METHOD_METRIC_PREFIX)
        }
        or None,
    )


def attach_client_state(content: RecordDict, state: RecordDict) -> None:
    """Add every record of the client's `Context.state` to its reply."""
    for key, record in state.items():
        content[CLIENT_STATE_PREFIX + key] = record


def take_client_state(content: RecordDict) -> RecordDict | None:
    """Remove the client-state records from a reply and return them as the client's state (None if it sent none)."""
    keys = [key for key in content if key.startswith(CLIENT_STATE_PREFIX)]
    if not keys:
        return None
    return RecordDict({key.removeprefix(CLIENT_STATE_PREFIX): content.pop(key) for key in keys})
