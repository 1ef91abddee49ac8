"""The helper plugin that puts an adapted plugin's restored state on the learner's device.

Stored state comes back from `Context.state` on the CPU (`fedtide.continual.state_codec`);
a plugin written for one device would then mix CPU tensors into a GPU round. A
`PluginMethod` runs this plugin before its own, so the plugin finds its tensors where the
model is. It lives apart from the adapter so that naming a method imports no Avalanche.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.utils import ParamData

from fedtide.continual.state_codec import Tensorish


class StateToDevice(SupervisedPlugin):
    """Moves a plugin's tensors, `ParamData` and modules to the learner's device when a round starts."""

    def __init__(self, target: SupervisedPlugin) -> None:
        super().__init__()
        self.target = target

    def before_training(self, strategy, **kwargs) -> None:
        device = torch.device(strategy.device)
        for attr, value in vars(self.target).items():
            if isinstance(value, dict) and value and all(isinstance(v, Tensorish) for v in value.values()):
                setattr(self.target, attr, {k: _to_device(v, device) for k, v in value.items()})
            elif isinstance(value, torch.Tensor | ParamData | torch.nn.Module):
                setattr(self.target, attr, _to_device(value, device))


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, ParamData):
        return (
            value
            if value.data.device == device
            else ParamData(value.name, init_tensor=value.data.to(device), device=device)
        )
    if isinstance(value, torch.Tensor | torch.nn.Module):
        return value.to(device)
    return value
