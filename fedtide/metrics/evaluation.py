"""Server-side evaluation of the global model on each experience's test data."""

from __future__ import annotations

import torch
from avalanche.evaluation.metrics import Accuracy
from flwr.app import ArrayRecord

# Samples per forward pass: evaluation needs no gradients, so memory allows large batches.
BATCH = 512


@torch.no_grad()
def experience_accuracies(
    model: torch.nn.Module, arrays: ArrayRecord, test_sets: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[float]:
    """Accuracy of `model` loaded with `arrays` on each (images, labels) test set, in order."""
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    accuracies = []
    for x, y in test_sets:
        accuracy = Accuracy()
        for start in range(0, len(y), BATCH):
            accuracy.update(model(x[start : start + BATCH]), y[start : start + BATCH])
        accuracies.append(float(accuracy.result()))
    return accuracies
