"""A continual method's metrics over a round's clients, aggregated as the method declares.

Flower's strategies average whatever a reply's MetricRecord holds by its examples, which
suits a loss and nothing else: a buffer's size summed over clients or a largest weight
would come out as a mean. The server has every client's round (`ClientRoundRecord`), so
it aggregates the method's metrics itself, per metric as `metric_aggregation` says
(`fedtide.continual.base.METRIC_AGGREGATIONS`).
"""

from __future__ import annotations

from collections.abc import Callable

from fedtide.records.metrics import ClientRoundRecord

Weighted = list[tuple[float, float]]  # (value, weight) of each client, by partition id

_AGGREGATE: dict[str, Callable[[Weighted], float]] = {
    "mean": lambda pairs: sum(v * w for v, w in pairs) / sum(w for _, w in pairs),
    "sum": lambda pairs: sum(v for v, _ in pairs),
    "max": lambda pairs: max(v for v, _ in pairs),
    "min": lambda pairs: min(v for v, _ in pairs),
    "last": lambda pairs: pairs[-1][0],
}


def aggregate_method_metrics(
    reports: list[ClientRoundRecord], declared: dict[str, str], equal_weights: bool = False
) -> dict[str, float] | None:
    """Each metric the clients reported, over the clients that reported it; None when none did.

    A mean weighs clients by their examples, or equally when `equal_weights` (client-level
    DP, where the model's aggregate weighs them equally too); a client reports only for a
    round it trained, so no weight is zero.
    """
    ordered = sorted((r for r in reports if r.method_metrics), key=lambda r: r.partition_id)
    names = dict.fromkeys(name for r in ordered for name in r.method_metrics)
    aggregated = {}
    for name in names:
        pairs = [
            (r.method_metrics[name], 1.0 if equal_weights else float(r.num_examples))
            for r in ordered
            if name in r.method_metrics
        ]
        aggregated[name] = float(_AGGREGATE[declared.get(name, "mean")](pairs))
    return aggregated or None
