"""Client-level DP on the client's side: the reply the server's DP-FedAvg expects.

Clients clip with Flower's own clipping functions (`compute_clip_model_update`,
`compute_adaptive_clip_model_update`) rather than Flower's `fixedclipping_mod`: a fedtide
train message may carry more than one ArrayRecord (the weights that ended past
experiences), which the mods refuse. The norm bit keeps Flower's meaning (1: the update
was clipped); the server turns it into Andrew et al.'s unclipped count.
"""

from __future__ import annotations

import warnings

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
)

from fedtide.scenario.schema import Scenario

CLIENT_WEIGHT_KEY = "client-level-weight"  # every client's equal weight in the aggregate


def prepare_reply(scenario: Scenario, config: ConfigRecord, sent: ArrayRecord, content: RecordDict) -> None:
    """Make a client's reply what the client-level aggregate expects: an equal weight and, when the
    clients clip, its update clipped to the norm the server sent (and, adaptive, whether it was)."""
    metrics = content["metrics"]
    metrics[CLIENT_WEIGHT_KEY] = 1.0
    if KEY_CLIPPING_NORM not in config:
        return
    norm = float(config[KEY_CLIPPING_NORM])
    if metrics["num-examples"] == 0:  # the global model back: a zero update, clipped or not
        if scenario.privacy.client_level.clipping == "adaptive":
            metrics[KEY_NORM_BIT] = 0
        return
    reply = content["arrays"]
    arrays = reply.to_numpy_ndarrays()
    if scenario.privacy.client_level.clipping == "adaptive":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a zero update divides by its zero norm
            metrics[KEY_NORM_BIT] = int(compute_adaptive_clip_model_update(arrays, sent.to_numpy_ndarrays(), norm))
    else:
        compute_clip_model_update(arrays, sent.to_numpy_ndarrays(), norm)
    content["arrays"] = ArrayRecord({key: Array(array) for key, array in zip(reply.keys(), arrays, strict=True)})
