"""Small image classifiers that Opacus can privatise as they are.

All of them use GroupNorm rather than BatchNorm (per-sample gradients need it),
no in-place activations, and a fixed-size head over every class of the dataset:
Avalanche's IncrementalClassifier swaps layers as classes arrive, which breaks the
hooks Opacus attaches, so the head is sized once from the dataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fedtide.scenario.schema import Scenario

MODELS = {
    "mlp": "two hidden layers of 128 units (digits, MNIST-family)",
    "cnn": "two conv blocks + GroupNorm + linear head",
    "resnet": "a small ResNet with GroupNorm (CIFAR-sized inputs)",
}


def build_scenario_model(scenario: Scenario, *, seed: int | None = None) -> nn.Module:
    """The scenario's model, as server and clients must both build it (Opacus-fixed under DP).

    Its input layer and head are sized from the dataset's registry entry
    (`fedtide.data.datasets.DATASETS`), so no data is loaded to build it.
    """
    model = build_model(scenario.model.name, scenario.input_shape, scenario.num_classes, seed)
    if scenario.privacy.private:
        from fedtide.privacy.opacus_model import opacus_ready

        model = opacus_ready(model)
    return model


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int | None = None) -> nn.Module:
    """Build a model by scenario name for inputs of shape (C, H, W).

    With a `seed`, the initial weights depend on it alone, not on what else has drawn
    from torch's global generator in this process.
    """
    if seed is None:
        return _build(name, input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, input_shape, num_classes)


def _build(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    if name == "cnn":
        return nn.Sequential(
            _conv_block(channels, 32),
            _conv_block(32, 64),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4, num_classes),
        )
    if name == "resnet":
        return nn.Sequential(
            _conv_block(channels, 32, pool=False),
            _Residual(32),
            _conv_block(32, 64),
            _Residual(64),
            _conv_block(64, 128),
            _Residual(128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, num_classes),
        )
    raise ValueError(f"unknown model '{name}'")


def _conv_block(c_in: int, c_out: int, pool: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    """Two conv+GroupNorm layers with an identity skip connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
        )
        self.out = nn.ReLU()

    def forward(self, x):
        return self.out(x + self.body(x))
