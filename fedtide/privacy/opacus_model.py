"""A model Opacus can privatise: checked, and fixed where Opacus knows how.

Its own module, so building a private scenario's model (validation, the server) loads
Opacus's validators but none of the training stack (Avalanche).
"""

from __future__ import annotations

import logging

import torch
from opacus.validators import ModuleValidator

from fedtide.errors import ScenarioError

log = logging.getLogger(__name__)


def opacus_ready(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself if Opacus supports it, else Opacus's fixed copy (said in the log)."""
    if not ModuleValidator.validate(model, strict=False):
        return model
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise ScenarioError("model.name", f"not supported by Opacus: {remaining[0]}", "choose another model")
    log.warning("model adapted for Opacus by ModuleValidator.fix (e.g. BatchNorm -> GroupNorm)")
    return fixed
