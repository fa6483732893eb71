"""Co-registration and radiometric normalisation of two epochs, as pure array functions.

The aligner (:mod:`pipeline.imagery`) reads a lattice of sample blocks of both epochs on the target grid
and hands them here. This module estimates the residual shift of each block by phase correlation, folds
the blocks into one robust global shift, and builds per-band histogram-matching lookup tables that map
the previous epoch's values onto the current epoch's distribution.

Shift convention: ``(dx, dy)`` in target-grid pixels is where the previous epoch shows a feature relative
to the current one (a feature at column ``c`` in the current epoch sits at ``c + dx`` in the previous).
The aligner corrects it by reading the previous epoch through ``transform * Affine.translation(dx, dy)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.windows import Window

log = logging.getLogger(__name__)

MIN_BLOCK_VALID = 0.9
"""Fraction of a block that must be valid in both epochs before it is correlated."""
MIN_TEXTURE = 0.01
"""Standard deviation (of [0, 1] grey values) below which a block is too flat to correlate."""
UPSAMPLE = 10
"""Phase-correlation upsampling: shifts are resolved to 1/UPSAMPLE px (0.1 px)."""


@dataclass(frozen=True, slots=True)
class BlockShift:
    """The residual shift measured on one sample block (``None`` where it could not be measured)."""

    col_off: int
    row_off: int
    width: int
    height: int
    valid_fraction: float
    texture: float
    shift: tuple[float, float] | None


def gray(image: np.ndarray) -> np.ndarray:
    """Mean of the first three bands of a (c, h, w) float image: the grey level that gets correlated."""
    return np.asarray(image[:3].mean(axis=0), dtype=np.float64)


def block_shift(
    curr: np.ndarray, prev: np.ndarray, valid: np.ndarray, *, max_shift_px: float
) -> tuple[tuple[float, float] | None, float]:
    """Measure the shift of ``prev`` relative to ``curr`` on one block.

    Args:
        curr: (h, w) grey block of the current epoch.
        prev: (h, w) grey block of the previous epoch on the same grid.
        valid: (h, w) bool, pixels valid in both epochs.
        max_shift_px: shifts longer than this are rejected as mismatches.

    Returns:
        ``((dx, dy), texture)``; the shift is ``None`` when the block is too empty or flat, or the match
        is further than ``max_shift_px``.
    """
    frac = float(valid.mean()) if valid.size else 0.0
    if frac < MIN_BLOCK_VALID:
        return None, 0.0
    texture = float(min(curr[valid].std(), prev[valid].std()))
    if texture < MIN_TEXTURE:
        return None, texture
    # scikit-image (and the SciPy signal stack under it) is imported here, not at module load: reading an
    # aligned pair only needs apply_luts, and every CLI stage imports this module.
    from skimage.filters import window as make_window
    from skimage.registration import phase_cross_correlation

    taper = make_window("hann", curr.shape)
    ref = np.where(valid, curr - curr[valid].mean(), 0.0) * taper
    mov = np.where(valid, prev - prev[valid].mean(), 0.0) * taper
    # Plain cross-correlation: phase normalisation whitens the spectrum and then locks onto the pixel
    # lattice of resampling artefacts, which biases sub-pixel shifts towards whole pixels.
    found, _, _ = phase_cross_correlation(ref, mov, upsample_factor=UPSAMPLE, normalization=None)
    dy, dx = -float(found[0]), -float(found[1])
    if np.hypot(dx, dy) > max_shift_px:
        log.debug("block shift (%.2f, %.2f) beyond max_shift_px=%r; ignored", dx, dy, max_shift_px)
        return None, texture
    return (dx, dy), texture


def robust_shift(blocks: list[BlockShift], *, min_blocks: int = 3) -> tuple[float, float] | None:
    """Median shift over the blocks that produced one, or ``None`` when fewer than ``min_blocks`` did.

    Blocks whose shift lies more than 3 median absolute deviations (at least 0.5 px) from the median are
    dropped before the final median, so a few blocks of moving cars or new buildings cannot pull it.
    """
    shifts = np.array([b.shift for b in blocks if b.shift is not None], dtype=np.float64).reshape(-1, 2)
    if len(shifts) < min_blocks:
        return None
    med = np.median(shifts, axis=0)
    dist = np.hypot(*(shifts - med).T)
    mad = max(float(np.median(dist)) * 3.0, 0.5)
    keep = shifts[dist <= mad]
    dx, dy = np.median(keep, axis=0)
    return float(dx), float(dy)


def histogram_luts(prev: np.ndarray, curr: np.ndarray, *, levels: int) -> np.ndarray:
    """Per-band lookup tables that map ``prev`` values onto the distribution of ``curr``.

    Args:
        prev: (c, n) sample of previous-epoch values in [0, 1] (valid overlap only).
        curr: (c, m) sample of current-epoch values in [0, 1].
        levels: number of table entries; entry ``i`` is the output for input ``i / (levels - 1)``.

    Returns:
        (c, levels) float64 monotonic tables in [0, 1].
    """
    if prev.ndim != 2 or curr.ndim != 2 or prev.shape[0] != curr.shape[0]:
        raise ValueError(f"expected (c, n) samples with equal c, got {prev.shape!r} and {curr.shape!r}")
    if prev.shape[1] == 0 or curr.shape[1] == 0:
        raise ValueError("cannot match histograms of an empty sample")
    grid = np.linspace(0.0, 1.0, levels)
    half = 0.5 / (levels - 1)
    luts = np.empty((prev.shape[0], levels), dtype=np.float64)
    for b in range(prev.shape[0]):
        p, c = np.sort(prev[b]), np.sort(curr[b])
        lo = np.searchsorted(p, grid - half, side="left")
        hi = np.searchsorted(p, grid + half, side="left")
        seen = hi > lo
        # Mid-rank of each level's pixels on both sides, so identical samples give the identity table.
        cdf = (lo[seen] + hi[seen]) / (2.0 * len(p))
        out = np.interp(cdf * len(c) - 0.5, np.arange(len(c)), c)
        # Levels the sample lacks: interpolate between seen levels, keep the end offsets beyond them.
        lut = np.interp(grid, grid[seen], out)
        first, last = np.flatnonzero(seen)[[0, -1]]
        lut[:first] = grid[:first] + (out[0] - grid[first])
        lut[last + 1 :] = grid[last + 1 :] + (out[-1] - grid[last])
        luts[b] = np.clip(np.maximum.accumulate(lut), 0.0, 1.0)
    return luts


def apply_luts(image: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """Apply per-band tables from :func:`histogram_luts` to a (c, h, w) float image in [0, 1]."""
    grid = np.linspace(0.0, 1.0, luts.shape[1])
    out = np.empty_like(image)
    for b in range(image.shape[0]):
        out[b] = np.interp(image[b], grid, luts[b])
    return out


Sample = tuple[np.ndarray, np.ndarray]
"""(prev, curr) values of one block's valid pixels, each (c, n) in [0, 1]."""


def sample_windows(width: int, height: int, *, per_axis: int) -> list[tuple[int, int, int, int]]:
    """A regular lattice of at most ``per_axis`` x ``per_axis`` square blocks ``(col, row, size, size)``.

    Blocks are 256 px on grids of at least 1024 px, else a quarter of the shorter side (at least 32 px).
    """
    size = 256 if min(width, height) >= 1024 else max(32, min(width, height) // 4)
    size = min(size, width, height)

    def offsets(extent: int) -> list[int]:
        n = max(1, min(per_axis, extent // size))
        return sorted({round(v) for v in np.linspace(0, extent - size, n)})

    return [(c, r, size, size) for r in offsets(height) for c in offsets(width)]


def measure_blocks(
    read: Callable[[Window], tuple[np.ndarray, np.ndarray]],
    windows: list[tuple[int, int, int, int]],
    *,
    max_shift_px: float,
) -> tuple[list[BlockShift], list[Sample]]:
    """Shift of prev against curr on each block, and a decimated sample of each block's valid pixels.

    Args:
        read: returns ((2, c, h, w) images as [prev, curr], (h, w) valid) for a window, like
            :meth:`pipeline.pair.AlignedPair.read`.
        windows: the blocks, from :func:`sample_windows`.
        max_shift_px: longer block shifts are rejected.
    """
    blocks, samples = [], []
    for win in windows:
        images, valid = read(Window(*win))
        frac = float(valid.mean())
        shift, texture = block_shift(gray(images[1]), gray(images[0]), valid, max_shift_px=max_shift_px)
        blocks.append(BlockShift(*win, valid_fraction=round(frac, 4), texture=texture, shift=shift))
        if frac > 0:
            samples.append((images[0][:, valid][:, ::3], images[1][:, valid][:, ::3]))
    return blocks, samples


def luts_from_samples(samples: list[Sample], *, levels: int, max_pixels: int, seed: int = 0) -> np.ndarray:
    """Histogram-matching tables from block samples, thinned to ``max_pixels`` pixels (seeded)."""
    prev = np.concatenate([s[0] for s in samples], axis=1)
    curr = np.concatenate([s[1] for s in samples], axis=1)
    if prev.shape[1] > max_pixels:
        pick = np.random.default_rng(seed).choice(prev.shape[1], max_pixels, replace=False)
        prev, curr = prev[:, pick], curr[:, pick]
    return histogram_luts(prev, curr, levels=levels)


def _median_length(blocks: list[BlockShift]) -> float | None:
    lengths = [math.hypot(*b.shift) for b in blocks if b.shift is not None]
    return round(float(np.median(lengths)), 4) if lengths else None


def qa_report(before: list[BlockShift], after: list[BlockShift], *, coregister: bool) -> dict[str, Any]:
    """The co-registration part of qa.json: per-block shifts before/after correction and their medians."""
    return {
        "coregister": coregister,
        "residual_before_median_px": _median_length(before),
        "residual_after_median_px": _median_length(after),
        "blocks_measured": sum(b.shift is not None for b in before),
        "blocks": [
            {
                "col_off": b.col_off,
                "row_off": b.row_off,
                "width": b.width,
                "height": b.height,
                "valid_fraction": b.valid_fraction,
                "texture": round(b.texture, 4),
                "before_px": [round(v, 3) for v in b.shift] if b.shift else None,
                "after_px": [round(v, 3) for v in a.shift] if a.shift else None,
            }
            for b, a in zip(before, after, strict=True)
        ],
    }
