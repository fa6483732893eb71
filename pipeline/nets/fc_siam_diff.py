"""FC-Siam-diff, the classic baseline, written from the paper.

Daudt, Le Saux & Boulch, "Fully Convolutional Siamese Networks for Change Detection", ICIP 2018.
A four-stage encoder with shared weights reads both epochs; the decoder upsamples the pooled features of
the later epoch with transposed convolutions and concatenates, at each scale, the absolute difference
of the two epochs' features. Here the head gives two logits, [new, removed], instead of the paper's
two-class softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from pipeline.nets.blocks import check_input, conv_bn_relu


def _stack(channels: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(channels[:-1], channels[1:], strict=True):
        layers += [conv_bn_relu(a, b), nn.Dropout2d(dropout)]
    return nn.Sequential(*layers)


class FCSiamDiff(nn.Module):
    """FC-Siam-diff with batch norm and dropout as in the paper.

    Args:
        in_channels: bands per epoch.
        dropout: dropout probability after every convolution (0.2 in the paper).

    Input ``(b, 2, c, h, w)`` as [prev, curr], h and w multiples of 16; output logits ``(b, 2, h, w)``.
    """

    def __init__(self, in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.enc = nn.ModuleList(
            [
                _stack([in_channels, 16, 16], dropout),
                _stack([16, 32, 32], dropout),
                _stack([32, 64, 64, 64], dropout),
                _stack([64, 128, 128, 128], dropout),
            ]
        )
        self.upconv = nn.ModuleList(
            [
                nn.ConvTranspose2d(128, 128, 3, stride=2, padding=1, output_padding=1),
                nn.ConvTranspose2d(64, 64, 3, stride=2, padding=1, output_padding=1),
                nn.ConvTranspose2d(32, 32, 3, stride=2, padding=1, output_padding=1),
                nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, output_padding=1),
            ]
        )
        self.dec = nn.ModuleList(
            [
                _stack([256, 128, 128, 64], dropout),
                _stack([128, 64, 64, 32], dropout),
                _stack([64, 32, 16], dropout),
                _stack([32, 16], dropout),
            ]
        )
        self.head = nn.Conv2d(16, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(b, 2, h, w)`` = [new, removed] for ``x`` of shape ``(b, 2, c, h, w)``."""
        check_input(x, self.in_channels, "fc_siam_diff")
        b = x.shape[0]
        y = torch.cat([x[:, 0], x[:, 1]], dim=0)
        diffs = []
        for stage in self.enc:
            y = stage(y)
            diffs.append((y[:b] - y[b:]).abs())
            y = F.max_pool2d(y, 2)
        y = y[b:]  # the later epoch's bottleneck
        for up, dec, skip in zip(self.upconv, self.dec, reversed(diffs), strict=True):
            y = dec(torch.cat([up(y), skip], dim=1))
        return self.head(y)
