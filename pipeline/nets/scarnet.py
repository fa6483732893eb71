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
        self.widths = tuple(int(c) for c in widths)
        w = list(widths)
        stages: list[nn.Module] = [nn.Sequential(conv_bn_relu(in_channels, w[0]), conv_bn_relu(w[0], w[0]))]
        for i in range(1, 5):
            stages.append(nn.Sequential(conv_bn_relu(w[i - 1], w[i], stride=2), conv_bn_relu(w[i], w[i])))
        self.encoder = nn.ModuleList(stages)
        self.fuse = nn.ModuleList(_Fuse(c) for c in w)
        self.up = nn.ModuleList(_Up(w[i + 1] if i == 3 else w[i + 1], w[i], w[i]) for i in reversed(range(4)))
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(w[0], 1, 1)

    def _conv_inputs(self) -> dict[str, list[int]]:
        """Each convolution's input as the channel groups it concatenates, in order (by module name)."""
        w = self.widths
        groups = {"encoder.0.0.0": [self.in_channels], "encoder.0.1.0": [w[0]]}
        for i in range(1, 5):
            groups[f"encoder.{i}.0.0"], groups[f"encoder.{i}.1.0"] = [w[i - 1]], [w[i]]
        for i in range(5):
            groups[f"fuse.{i}.proj.0"] = [w[i]] * 3  # a, b, |a - b|
        for j, i in enumerate(reversed(range(4))):
            groups[f"up.{j}.conv.0"] = [w[i + 1], w[i]]  # upsampled, skip
        groups["head"] = [w[0]]
        return groups

    @torch.no_grad()
    def grow_from(self, smaller: ScarNet) -> None:
        """Load a narrower ScarNet's weights so that this network computes what the narrower one does.

        Growing a trained network keeps what it has learned, where training a wider one from scratch
        would start over (the shipped checkpoint holds hundreds of CPU-minutes). Every old channel keeps
        its weights and BatchNorm; the new channels start from this network's random initialisation, and
        every old channel reads zero weight from every new one, so in eval mode the output is the smaller
        network's (to float rounding: other convolution shapes sum in another order); training then grows
        the zero weights. (The zero-initialised expansion of Net2Net, Chen et al. 2016; written here
        because it depends on how each layer concatenates its inputs, which only this class knows.)

        Raises:
            ValueError: ``smaller`` has other bands or is wider somewhere.
        """
        if smaller.in_channels != self.in_channels or any(
            a > b for a, b in zip(smaller.widths, self.widths, strict=True)
        ):
            raise ValueError(
                f"cannot grow widths {list(self.widths)} ({self.in_channels} bands) from "
                f"{list(smaller.widths)} ({smaller.in_channels} bands): every width must be at least the old one"
            )
        old_groups, new_groups = smaller._conv_inputs(), self._conv_inputs()
        state = self.state_dict()
        for name, old in smaller.state_dict().items():
            new = state[name]
            if new.ndim == 4:  # a convolution (out, in, k, k): place each input group at its new offset
                conv = name.rsplit(".", 1)[0]
                n_out = old.shape[0]
                new[:n_out] = 0
                src = dst = 0
                for a, b in zip(old_groups[conv], new_groups[conv], strict=True):
                    new[:n_out, dst : dst + a] = old[:, src : src + a]
                    src, dst = src + a, dst + b
            elif new.ndim == 0:  # BatchNorm's batch counter
                new.copy_(old)
            else:  # BatchNorm weights and statistics, the head's bias
                new[: old.shape[0]] = old
        self.load_state_dict(state)

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
