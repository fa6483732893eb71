"""Change vector analysis (CVA) with Otsu thresholding: the training-free baseline.

The change magnitude is the Euclidean distance between the two epochs' band vectors, each band first
standardised over both epochs (so a global brightness difference between months matters less) and
lightly smoothed. Otsu's threshold on the magnitude separates change from no change; the magnitude is
mapped to a pseudo-probability by a logistic curve centred on that threshold, so ``p >= 0.5`` is exactly
the Otsu decision.

Direction heuristic (new vs removed): at 0.5 m, roofs in Chinese and US towns are mostly brighter and
less green than the soil, grass or rubble they replace, and demolition leaves darker, greener or earthier
ground. A changed pixel whose brightness rises (``mean(curr) - mean(prev) > 0``) is called *new*, one
whose brightness falls is called *removed*. Dark roofs and bright bare soil break this rule; that is
one reason CVA is only the baseline.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centers)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def cva_probabilities(
    images: np.ndarray, valid: np.ndarray | None = None, *, sigma: float = 1.0, softness: float = 0.1
) -> np.ndarray:
    """Change probabilities by CVA + Otsu, split into new and removed by the brightness heuristic.

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
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[0] != 2:
        raise ValueError(f"images must be (2, c, h, w) as [prev, curr], got {arr.shape!r}")
    if images.dtype == np.uint8:
        arr = arr / 255.0
    h, w = arr.shape[-2:]
    v = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)
    if not v.any():
        return np.zeros((2, h, w), np.float32)
    if sigma > 0:
        arr = ndimage.gaussian_filter(arr, sigma=(0, 0, sigma, sigma))
    both = arr[:, :, v]  # (2, c, n)
    mean = both.mean(axis=(0, 2))[None, :, None, None]
    std = both.std(axis=(0, 2))[None, :, None, None] + 1e-6
    z = (arr - mean) / std
    mag = np.sqrt(((z[1] - z[0]) ** 2).sum(axis=0))
    thr = _otsu(mag[v])
    p = 1.0 / (1.0 + np.exp(-(mag - thr) / max(softness * thr, 1e-6)))
    p = np.where(v, p, 0.0)
    brighter = arr[1].mean(axis=0) > arr[0].mean(axis=0)
    out = np.stack([np.where(brighter, p, 0.0), np.where(brighter, 0.0, p)]).astype(np.float32)
    return out
