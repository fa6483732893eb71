"""Building blocks shared by the change networks, the input check every network runs and the padding it needs."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pipeline.errors import ModelError

#: Every network downsamples four times, so height and width must be multiples of this.
STRIDE = 16


def padded_size(n: int, multiple: int = STRIDE) -> int:
    """``n`` rounded up to a multiple of ``multiple``.

    >>> padded_size(500)
    512
    """
    return math.ceil(n / multiple) * multiple


def unchanged_where_invalid(images: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``images`` (2, c, h, w) [prev, curr] with ``prev`` set to ``curr`` wherever ``valid`` (h, w) is False.

    The network then sees no change at the pixels it is not asked about, so their content (an epoch's
    empty value where it has no data, a strip the co-registration shift left empty, a cloud) cannot
    spill change into the valid pixels beside them through the receptive field. Detect, calibrate and
    evaluate all prepare their inputs this way (on the full demo town's border strips: models/scarnet.md,
    "Flags"). Modifies ``images`` in place and returns it.
    """
    invalid = ~np.asarray(valid, dtype=bool)
    if invalid.any():
        images[0][:, invalid] = images[1][:, invalid]
    return images


def pad_to_multiple(images: np.ndarray, multiple: int = STRIDE, *, min_size: int = 0) -> np.ndarray:
    """Reflection-pad the last two axes (bottom and right) up to multiples of ``multiple``.

    Args:
        images: ``(..., h, w)``, e.g. a pair ``(2, c, h, w)`` or a batch.
        multiple: the side lengths are rounded up to multiples of this (:data:`STRIDE` for the networks).
        min_size: pad each side to at least this many pixels first (detect pads every tile of a batch
            to the nominal tile size, so the batch has one shape).

    Returns:
        The padded array (the input itself when no padding is needed); crop ``[..., :h, :w]`` to undo it.

    >>> pad_to_multiple(np.zeros((2, 3, 20, 33))).shape
    (2, 3, 32, 48)
    """
    h, w = images.shape[-2:]
    ph = padded_size(max(h, min_size), multiple) - h
    pw = padded_size(max(w, min_size), multiple) - w
    if not (ph or pw):
        return images
    return np.pad(images, [(0, 0)] * (images.ndim - 2) + [(0, ph), (0, pw)], mode="reflect")


def conv_bn_relu(in_ch: int, out_ch: int, *, stride: int = 1) -> nn.Module:
    """A 3×3 convolution (no bias), batch norm and ReLU.

    The layout and parameter names (``0``, ``1``) of torchvision's ``Conv2dNormActivation``, which the
    checkpoints were saved with, built from torch alone: importing torchvision costs about 1.5 s of CPU
    before a run's first batch and nothing else of it is used.
    """
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


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
