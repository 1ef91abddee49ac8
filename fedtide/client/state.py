"""Everything a client keeps between rounds, in one place over Flower's `Context.state`.

Clients are rebuilt on every call (Ray hands each call a copy of the Context), so what
outlives a round — consolidation progress, the continual method's state, the DP
accountant's history — is read from and written to `Context.state` here and nowhere
else. Checkpoints, resume and simulated faults have this one place to work on: a run
that takes checkpoints has each client send its whole `Context.state` with its reply
(`fedtide.records.wire`), and a resumed run puts it back with `replace_state`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, RecordDict

from fedtide.continual.base import ContinualMethod
from fedtide.continual.state_codec import decode, encode
from fedtide.privacy.history import History, history_from_record, history_record

PROGRESS_KEY = "fedtide.cli.progress"
METHOD_ARRAYS_KEY = "fedtide.method.arrays"
METHOD_LAYOUT_KEY = "fedtide.method.layout"
PRIVACY_KEY = "fedtide.privacy.history"


@dataclass
class ConsolidationProgress:
    """Which past experiences the client has consolidated.

    `done_through` = e means experiences below e are settled: consolidated, or held no
    data for this client. `counts[e]` is how often e was consolidated (tests hold it to 1).
    Which experiences are still to consolidate is the plan's answer
    (`fedtide.data.stream_plan.ClientPlan.to_consolidate`).
    """

    done_through: int
    counts: list[int]


class ClientState:
    """Typed access to the records a client keeps in `Context.state`."""

    def __init__(self, records: RecordDict, n_experiences: int) -> None:
        self.records = records
        self.n_experiences = n_experiences

    @property
    def progress(self) -> ConsolidationProgress:
        if PROGRESS_KEY not in self.records:
            return ConsolidationProgress(0, [0] * self.n_experiences)
        record = self.records[PROGRESS_KEY]
        return ConsolidationProgress(int(record["done_through"]), [int(c) for c in record["counts"]])

    @progress.setter
    def progress(self, progress: ConsolidationProgress) -> None:
        self.records[PROGRESS_KEY] = ConfigRecord({"done_through": progress.done_through, "counts": progress.counts})

    def restore_method(self, method: ContinualMethod, model: torch.nn.Module) -> None:
        """Load the method's stored state, if a previous call stored one (modules rebuilt from `model`)."""
        if METHOD_LAYOUT_KEY in self.records:
            method.load_state_dict(decode(self.records[METHOD_ARRAYS_KEY], self.records[METHOD_LAYOUT_KEY], model))

    def store_method(self, method: ContinualMethod) -> None:
        arrays, layout = encode(method.state_dict())
        self.records[METHOD_ARRAYS_KEY] = arrays
        self.records[METHOD_LAYOUT_KEY] = layout

    @property
    def privacy_history(self) -> History:
        return history_from_record(self.records[PRIVACY_KEY]) if PRIVACY_KEY in self.records else []

    @privacy_history.setter
    def privacy_history(self, history: History) -> None:
        self.records[PRIVACY_KEY] = history_record(history)


def replace_state(records: RecordDict, saved: RecordDict) -> None:
    """Make `records` (a node's `Context.state`) hold exactly `saved`, a state checkpointed from a reply."""
    records.clear()
    records.update(saved)
