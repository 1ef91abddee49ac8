"""Server-side evaluation of the global model on each experience's test data."""

from __future__ import annotations

import torch
from avalanche.evaluation.metrics import Accuracy
from flwr.app import ArrayRecord
from torch.utils.data import DataLoader

from fedtide.data.stream import Dataset


@torch.no_grad()
def experience_accuracies(model: torch.nn.Module, arrays: ArrayRecord, test_sets: list[Dataset]) -> list[float]:
    """Accuracy of `model` loaded with `arrays` on each test set, in order."""
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    accuracies = []
    for dataset in test_sets:
        accuracy = Accuracy()
        for x, y, *_ in DataLoader(dataset, batch_size=512):
            accuracy.update(model(x), y)
        accuracies.append(float(accuracy.result()))
    return accuracies
