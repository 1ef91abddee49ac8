"""Average accuracy, forgetting and BWT from an accuracy matrix, by Avalanche's definitions.

`matrix[e][j]` is the accuracy on experience j's test data after training experience
e (j <= e). The matrix is replayed into Avalanche's standalone `Forgetting` and `BWT`
metrics the way its StreamForgetting plugin feeds them during a run: the value at
j == e is the "initial" one, later rows update the "last" one. Forgetting is thus
the mean over j < E-1 of matrix[j][j] - matrix[E-1][j], and BWT is its negative.
"""

from __future__ import annotations

from avalanche.evaluation.metrics import BWT, Forgetting


def average_accuracy(matrix: list[list[float]]) -> float:
    """Mean accuracy over all experiences after the last one was trained."""
    final = matrix[-1]
    return sum(final) / len(final)


def average_forgetting(matrix: list[list[float]]) -> float:
    return _stream_average(Forgetting(), matrix)


def backward_transfer(matrix: list[list[float]]) -> float:
    return _stream_average(BWT(), matrix)


def _stream_average(metric: Forgetting, matrix: list[list[float]]) -> float:
    for trained, row in enumerate(matrix):
        for evaluated, accuracy in enumerate(row[: trained + 1]):
            metric.update(evaluated, accuracy, initial=evaluated == trained)
    per_experience = metric.result()
    return sum(per_experience.values()) / len(per_experience) if per_experience else 0.0
