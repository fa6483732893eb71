"""Change vector analysis (CVA) with Otsu thresholding: the training-free baseline, in one implementation.

The change magnitude is the Euclidean distance between the two epochs' band vectors, each band first
lightly smoothed (Gaussian of ``sigma`` px) and divided by its standard deviation over both epochs (so a
band's spread, not its units, sets its weight). Otsu's threshold ``t`` on the magnitude separates change
from no change; the magnitude ``m`` is mapped to a pseudo-probability ``p = sigmoid((m - t) / (softness t))``,
so ``p >= 0.5`` is exactly the Otsu decision.

Direction heuristic (new vs removed): at 0.5 m, roofs in Chinese and US towns are mostly brighter and
less green than the soil, grass or rubble they replace, and demolition leaves darker, greener or earthier
ground. A changed pixel whose brightness rises (``mean(curr) - mean(prev) > 0``) is called *new*, one
whose brightness falls is called *removed*. Dark roofs and bright bare soil break this rule; that is
one reason CVA is only the baseline.

Statistics (decision). The band deviations and ``t`` are *global*: :func:`fit_cva` fits them once on the
valid pixels of samples and :func:`apply_cva` applies them to any pair or batch. ``scarwatch detect
--method cva`` (:class:`pipeline.predictors.CvaPredictor`) fits them once per month on tiles sampled over
the whole grid, so the whole month shares one threshold: a tile without change is not cut in two by its
own Otsu split (Otsu always finds one), and neighbouring tiles agree and blend without seams.
:func:`cva_probabilities` (one pair; the model card's CVA row in :mod:`pipeline.evaluate`) is the same
maths with the statistics fitted on that pair: the pair plays the month. Fitting on fewer pixels (detect
subsamples each tile) changes the statistics, not the recipe.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FALLBACK_THRESHOLD = 1.0
"""Magnitude threshold when the samples cannot be split (fewer than 2 valid pixels, or a constant magnitude)."""


@dataclass(frozen=True)
class CvaStats:
    """What :func:`fit_cva` learns: per-band deviations ``std`` (c,) and the magnitude threshold."""

    std: np.ndarray
    threshold: float
    n_pixels: int
    """Valid pixels the statistics were fitted on (0: the fallback, no data)."""


def _unit(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images, dtype=np.float32)
    return arr / np.float32(255.0) if np.asarray(images).dtype == np.uint8 else arr


def smooth(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of the last two axes (reflected at the edges), float32; ``sigma`` <= 0 is none."""
    arr = np.asarray(images, dtype=np.float32)
    if sigma <= 0:
        return arr
    sigmas = (0,) * (arr.ndim - 2) + (sigma, sigma)
    return np.asarray(ndimage.gaussian_filter(arr, sigma=sigmas, mode="reflect"), dtype=np.float32)


def magnitude(smoothed: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Change magnitude ``(..., h, w)`` of smoothed images ``(..., 2, c, h, w)`` with band deviations ``std``."""
    diff = (smoothed[..., 1, :, :, :] - smoothed[..., 0, :, :, :]) / std[:, None, None]
    return np.asarray(np.sqrt((diff * diff).sum(axis=-3)))


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size < 2 or float(values.max()) <= float(values.min()):
        return FALLBACK_THRESHOLD
    return float(threshold_otsu(values))


def _fit_smoothed(samples: Iterable[tuple[np.ndarray, np.ndarray]], max_pixels: int | None) -> CvaStats:
    pooled_parts = []
    count = 0
    for smoothed, valid in samples:
        count = smoothed.shape[-3]
        values = smoothed[:, :, valid]  # (2, c, n)
        step = max(1, values.shape[-1] // max_pixels) if max_pixels else 1
        pooled_parts.append(values[:, :, ::step])
    if not pooled_parts:
        raise ValueError("fit_cva needs at least one sample")
    pooled = np.concatenate(pooled_parts, axis=-1)
    if pooled.shape[-1] < 2:
        return CvaStats(np.ones(count, np.float32), FALLBACK_THRESHOLD, 0)
    std = pooled.std(axis=(0, 2)) + np.float32(1e-6)
    mag = magnitude(pooled[..., None], std)[:, 0]
    return CvaStats(std, _otsu(mag), int(pooled.shape[-1]))


def fit_cva(
    samples: Iterable[tuple[np.ndarray, np.ndarray | None]], *, sigma: float = 1.0, max_pixels: int | None = None
) -> CvaStats:
    """Fit the band deviations and the Otsu magnitude threshold on the valid pixels of ``samples``.

    Args:
        samples: ``(images, valid)`` pairs: images ``(2, c, h, w)`` float in [0, 1] (or uint8) as
            [prev, curr], valid bool ``(h, w)`` or None (all valid).
        sigma: Gaussian smoothing of each band, in pixels (as in :func:`apply_cva`).
        max_pixels: per sample, keep every k-th valid pixel so that about ``max_pixels`` (fewer than twice
            as many) remain; None keeps them all.

    Returns:
        The statistics; with fewer than 2 valid pixels, unit deviations and :data:`FALLBACK_THRESHOLD`.

    Raises:
        ValueError: no samples.
    """

    def smoothed() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for images, valid in samples:
            arr = smooth(_unit(images), sigma)
            yield arr, np.ones(arr.shape[-2:], bool) if valid is None else np.asarray(valid, bool)

    return _fit_smoothed(smoothed(), max_pixels)


def _apply_smoothed(
    smoothed: np.ndarray, stats: CvaStats, softness: float, valid: np.ndarray | None = None
) -> np.ndarray:
    t = max(stats.threshold, 1e-6)
    z = np.clip((magnitude(smoothed, stats.std) - t) / max(softness * t, 1e-6), -30, 30)
    p = 1.0 / (1.0 + np.exp(-z))
    if valid is not None:
        p = np.where(valid, p, 0.0)
    brighter = smoothed[..., 1, :, :, :].mean(axis=-3) > smoothed[..., 0, :, :, :].mean(axis=-3)
    return np.stack([np.where(brighter, p, 0.0), np.where(brighter, 0.0, p)], axis=-3).astype(np.float32)


def apply_cva(
    images: np.ndarray,
    stats: CvaStats,
    *,
    sigma: float = 1.0,
    softness: float = 0.1,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Change probabilities of a pair ``(2, c, h, w)`` or a batch ``(b, 2, c, h, w)`` with fitted ``stats``.

    Args:
        images: float in [0, 1] (or uint8) as [prev, curr].
        stats: from :func:`fit_cva`.
        sigma: Gaussian smoothing of each band before differencing, in pixels.
        softness: width of the logistic ramp around the threshold, as a fraction of the threshold.
        valid: optional bool ``(h, w)`` (or ``(b, h, w)``); invalid pixels get 0.

    Returns:
        float32 ``(2, h, w)`` (or ``(b, 2, h, w)``) as [p_new, p_removed] in [0, 1].
    """
    return _apply_smoothed(smooth(_unit(images), sigma), stats, softness, valid)


def cva_probabilities(
    images: np.ndarray, valid: np.ndarray | None = None, *, sigma: float = 1.0, softness: float = 0.1
) -> np.ndarray:
    """Change probabilities of one pair by CVA + Otsu, with the statistics fitted on that pair.

    The same maths as ``detect --method cva`` (module docstring): :func:`fit_cva` on this pair's valid
    pixels, then :func:`apply_cva`.

    Args:
        images: ``(2, c, h, w)`` float in [0, 1] (or uint8) as [prev, curr].
        valid: optional bool ``(h, w)``; statistics use only valid pixels and invalid ones get 0.
        sigma: Gaussian smoothing of each band before differencing, in pixels.
        softness: width of the logistic ramp around the Otsu threshold, as a fraction of the threshold.

    Returns:
        float32 ``(2, h, w)`` as [p_new, p_removed] in [0, 1].

    Raises:
        ValueError: ``images`` is not ``(2, c, h, w)``.
    """
    arr = _unit(images)
    if arr.ndim != 4 or arr.shape[0] != 2:
        raise ValueError(f"images must be (2, c, h, w) as [prev, curr], got {arr.shape!r}")
    h, w = arr.shape[-2:]
    v = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)
    if not v.any():
        return np.zeros((2, h, w), np.float32)
    smoothed = smooth(arr, sigma)
    stats = _fit_smoothed([(smoothed, v)], max_pixels=None)
    return _apply_smoothed(smoothed, stats, softness, v)
