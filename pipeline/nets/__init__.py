"""Change networks behind a name → class registry.

Every network takes ``(b, 2, c, h, w)`` float32 in [0, 1] as [prev, curr] (c = 3 or 4, h and w
multiples of 16) and returns logits ``(b, 2, h, w)`` as [new, removed].
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.errors import ModelError
from pipeline.nets.blocks import STRIDE
from pipeline.nets.fc_siam_diff import FCSiamDiff
from pipeline.nets.scarnet import ScarNet

#: Architecture name → network class.
MODELS: dict[str, type[nn.Module]] = {"scarnet": ScarNet, "fc_siam_diff": FCSiamDiff}

__all__ = ["MODELS", "STRIDE", "create_model"]


def create_model(name: str, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a change network by name.

    Args:
        name: an architecture in :data:`MODELS`.
        in_channels: bands per epoch, 3 (RGB) or 4 (RGB+NIR).
        **kwargs: architecture options (see each class).

    Returns:
        The untrained network.

    Raises:
        ModelError: unknown name, unsupported band count or options the architecture does not take.
    """
    if name not in MODELS:
        raise ModelError(f"unknown architecture {name!r}; valid names: {sorted(MODELS)!r}")
    if in_channels not in (3, 4):
        raise ModelError(f"in_channels {in_channels!r} must be 3 (RGB) or 4 (RGB+NIR)")
    try:
        return MODELS[name](in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise ModelError(f"architecture {name!r} does not take options {sorted(kwargs)!r}: {exc}") from exc
