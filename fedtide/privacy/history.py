"""A client's Opacus accountant history, and its form in Flower records.

Free of Opacus: the protocol and the client state carry histories without loading it.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

History = list[tuple[float, float, int]]  # Opacus accountant rows: (noise multiplier, sample rate, steps)


def history_record(history: History) -> ConfigRecord:
    """An accountant's history as a record (one list per column): kept in the client's state and
    sent with every DP reply, so anyone can recompute the client's ε with Opacus."""
    return ConfigRecord(
        {"sigmas": [h[0] for h in history], "rates": [h[1] for h in history], "steps": [h[2] for h in history]}
    )


def history_from_record(record: ConfigRecord) -> History:
    return list(zip(map(float, record["sigmas"]), map(float, record["rates"]), map(int, record["steps"])))
