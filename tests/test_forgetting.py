"""Forgetting and BWT agree with a hand computation from the accuracy matrix."""

import pytest

from fedtide.metrics.forgetting import average_accuracy, average_forgetting, backward_transfer

MATRIX = [
    [0.90],
    [0.50, 0.80],
    [0.30, 0.60, 0.70],
]


def test_matches_hand_computation():
    # forgetting_j = A[j][j] - A[last][j], averaged over j < last (Avalanche's StreamForgetting)
    hand_forgetting = ((0.90 - 0.30) + (0.80 - 0.60)) / 2
    assert average_forgetting(MATRIX) == pytest.approx(hand_forgetting)
    assert backward_transfer(MATRIX) == pytest.approx(-hand_forgetting)
    assert average_accuracy(MATRIX) == pytest.approx((0.30 + 0.60 + 0.70) / 3)


def test_improvement_is_negative_forgetting_and_single_experience_is_zero():
    assert average_forgetting([[0.2], [0.5, 0.9]]) == pytest.approx(-0.3)
    assert average_forgetting([[0.7]]) == 0.0
