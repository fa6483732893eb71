"""ScarNet: a small Siamese U-Net that predicts new structures and, on swapped inputs, removed ones.

One encoder with shared weights reads both epochs. At each of five scales the two feature maps are
fused as ``conv1x1(concat(f_a, f_b, |f_a - f_b|))``, and a U-Net decoder turns the fused pyramid into
one logit: "a structure is present in ``b`` that is absent in ``a``". The same fusion, decoder and head
run twice, on ``(prev, curr)`` for *new* and on ``(curr, prev)`` for *removed*: a removal is an
appearance read backwards. Every removal label therefore also trains the "new" direction and vice
versa, and the two outputs cannot drift apart in calibration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from pipeline.nets.blocks import check_input, conv_bn_relu


class _Fuse(nn.Module):
    """``concat(a, b, |a - b|)`` → 1×1 conv, BN, ReLU."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(3 * ch, ch, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([a, b, (a - b).abs()], dim=1))


class _Up(nn.Module):
    """Bilinear ×2 upsampling, concat with the skip, one 3×3 conv block."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class ScarNet(nn.Module):
    """Siamese U-Net with a shared encoder and a direction-symmetric head.

    Args:
        in_channels: bands per epoch (3 = RGB, 4 = RGB+NIR).
        widths: encoder channels at strides 1, 2, 4, 8 and 16.
        dropout: dropout before the head (training only).

    Input ``(b, 2, c, h, w)`` float32 in [0, 1] as [prev, curr], h and w multiples of 16; output logits
    ``(b, 2, h, w)`` as [new, removed]. ``removed(a, b) == new(b, a)`` exactly (``symmetric``).
    """

    symmetric = True

    def __init__(
        self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 96, 128), dropout: float = 0.1
    ) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"widths {widths!r} must list 5 channel counts (strides 1, 2, 4, 8, 16)")
        self.in_channels = in_channels
        w = list(widths)
        stages: list[nn.Module] = [nn.Sequential(conv_bn_relu(in_channels, w[0]), conv_bn_relu(w[0], w[0]))]
        for i in range(1, 5):
            stages.append(nn.Sequential(conv_bn_relu(w[i - 1], w[i], stride=2), conv_bn_relu(w[i], w[i])))
        self.encoder = nn.ModuleList(stages)
        self.fuse = nn.ModuleList(_Fuse(c) for c in w)
        self.up = nn.ModuleList(_Up(w[i + 1] if i == 3 else w[i + 1], w[i], w[i]) for i in reversed(range(4)))
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(w[0], 1, 1)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        return feats

    def _decode(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
        fused = [f(a, b) for f, a, b in zip(self.fuse, fa, fb, strict=True)]
        x = fused[4]
        for up, skip in zip(self.up, reversed(fused[:4]), strict=True):
            x = up(x, skip)
        return self.head(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(b, 2, h, w)`` = [new, removed] for ``x`` of shape ``(b, 2, c, h, w)``."""
        check_input(x, self.in_channels, "scarnet")
        b = x.shape[0]
        feats = self._encode(torch.cat([x[:, 0], x[:, 1]], dim=0))
        prev = [f[:b] for f in feats]
        curr = [f[b:] for f in feats]
        # both directions in one batch: (prev, curr) -> new, (curr, prev) -> removed
        both_a = [torch.cat([p, c], dim=0) for p, c in zip(prev, curr, strict=True)]
        both_b = [torch.cat([c, p], dim=0) for p, c in zip(prev, curr, strict=True)]
        logits = self._decode(both_a, both_b)
        return torch.cat([logits[:b], logits[b:]], dim=1)
