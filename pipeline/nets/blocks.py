"""Building blocks shared by the change networks, and the input check every network runs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from pipeline.errors import ModelError

#: Every network downsamples four times, so height and width must be multiples of this.
STRIDE = 16


def conv_bn_relu(in_ch: int, out_ch: int, *, stride: int = 1) -> nn.Module:
    """A 3×3 convolution, batch norm and ReLU (torchvision's ``Conv2dNormActivation``)."""
    return Conv2dNormActivation(in_ch, out_ch, kernel_size=3, stride=stride, inplace=True)


def check_input(x: torch.Tensor, in_channels: int, name: str) -> None:
    """Check a network input of shape ``(b, 2, c, h, w)``.

    Args:
        x: the input batch.
        in_channels: the bands the network was built for.
        name: the network name, for messages.

    Raises:
        ModelError: the band count differs from ``in_channels``.
        ValueError: the tensor is not ``(b, 2, c, h, w)`` or h, w are not multiples of 16.
    """
    if x.ndim != 5 or x.shape[1] != 2:
        raise ValueError(
            f"{name}: expected input (b, 2, c, h, w) as [prev, curr], got {tuple(x.shape)!r}; stack the two epochs"
        )
    if x.shape[2] != in_channels:
        raise ModelError(
            f"{name}: input has {x.shape[2]} bands but the network expects {in_channels}; "
            f"select {in_channels} bands (align.bands) or use a {x.shape[2]}-band model"
        )
    h, w = x.shape[-2:]
    if h % STRIDE or w % STRIDE:
        raise ValueError(
            f"{name}: height and width must be multiples of {STRIDE}, got {h}x{w}; pad the tile (detect pads)"
        )


def pad_to_multiple(images: np.ndarray, multiple: int = STRIDE) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflection-pad the last two axes of ``images`` up to multiples of ``multiple``.

    Returns:
        The padded array and the original ``(h, w)``, to crop the prediction back with ``[..., :h, :w]``.
    """
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        images = np.pad(images, [(0, 0)] * (images.ndim - 2) + [(0, ph), (0, pw)], mode="reflect")
    return images, (h, w)
