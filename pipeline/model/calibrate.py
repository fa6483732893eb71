"""Calibrate a checkpoint's two thresholds on the validation sets: the one writer of thresholds.

Two numbers decide what becomes a flag, and both are chosen here and written into the checkpoint:

* ``threshold``, the pixel (seed) threshold: the value on ``evaluate.thresholds`` with the best weighted
  pixel F1 (``evaluate.calibration_weights`` over data sets, classes averaged; ties go towards 0.5).
* ``object_threshold``, the smallest mean probability an object needs to become a flag. The network is
  often sure of a few pixels of a shadow edge or a seasonal colour shift (p_max high) but not of the whole
  blob, while a real new or removed structure is confidently changed over most of its footprint. Objects
  are built as vectorize builds them (seeded at ``threshold``, grown above ``vectorize.low``, opened and
  closed; :func:`pipeline.model.evaluate.seeded_objects`) and the value on ``evaluate.object_thresholds``
  with the best weighted object F1 (IoU >= ``evaluate.iou_threshold``) wins; ties go to the smaller one.

Detect carries both into the probability COG's tags and vectorize uses them (``vectorize.high`` and
``vectorize.min_p_mean`` override). Only the native-pixel sets calibrate; the ``@2x`` and ``urban-2m``
sets are for evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.metrics import weighted_f1
from pipeline.model.evaluate import Item, flag_object_scores, net_probabilities, scores_at, validation_items

if TYPE_CHECKING:
    import numpy as np

    from pipeline.config import EvaluateSettings, Settings, VectorizeSettings

log = logging.getLogger(__name__)


def pixel_threshold(
    items: list[Item], probs: list[np.ndarray], settings: EvaluateSettings
) -> tuple[float, dict[float, float]]:
    """The pixel threshold with the best weighted pixel F1, and the whole curve."""
    curve = {
        t: weighted_f1(scores_at(items, probs, t, settings, objects=False), settings.calibration_weights)
        for t in settings.thresholds
    }
    best = max(curve, key=lambda t: (round(curve[t], 6), -abs(t - 0.5)))
    return best, curve


def calibrate_objects(
    items: Sequence[Item],
    probs: Sequence[np.ndarray],
    seed: float,
    low: float,
    settings: EvaluateSettings,
    *,
    grid: Sequence[float] | None = None,
    vectorize: VectorizeSettings | None = None,
) -> dict[str, Any]:
    """Choose the object mean-probability threshold that maximises the weighted object F1.

    Args:
        items: validation items.
        probs: each item's class probability (h, w).
        seed: the seed (pixel) threshold objects are grown from.
        low: the grow threshold (``vectorize.low``).
        settings: ``evaluate`` settings (``iou_threshold``, ``min_object_px``, ``calibration_weights``,
            ``object_thresholds``).
        grid: candidate thresholds (default ``settings.object_thresholds``).
        vectorize: the other vectorize settings (the cutting of blobs); default their defaults.

    Returns:
        ``{"object_threshold", "seed", "low", "curve": {t: weighted F1}, "scores": {ds: {cls: Scores}}}``
        with the scores of the chosen threshold; ties go to the smaller threshold (fewer flags dropped).
    """
    grid = tuple(settings.object_thresholds if grid is None else grid)
    per_t = flag_object_scores(list(items), list(probs), seed, low, grid, settings, vectorize)
    as_dicts = {
        t: {ds: {cls: {"object": s.as_dict()} for cls, s in cl.items()} for ds, cl in groups.items()}
        for t, groups in per_t.items()
    }
    curve = {t: weighted_f1(as_dicts[t], settings.calibration_weights, level="object") for t in grid}
    best = max(grid, key=lambda t: (round(curve[t], 6), -t))
    log.info("object threshold %.2f (weighted object F1 %.4f; at %s: %.4f)", best, curve[best], grid[0], curve[grid[0]])
    return {
        "object_threshold": float(best),
        "seed": float(seed),
        "low": float(min(low, seed)),
        "curve": {str(t): round(v, 4) for t, v in curve.items()},
        "scores": {ds: {cls: s.as_dict() for cls, s in cl.items()} for ds, cl in per_t[best].items()},
    }


def calibrate_model(checkpoint: str | Path, settings: Settings, *, out: str | Path | None = None) -> dict[str, Any]:
    """Calibrate ``checkpoint``'s pixel and object thresholds and write them into it (or into ``out``).

    Args:
        checkpoint: the checkpoint to calibrate.
        settings: all settings (``evaluate`` grids and weights, ``vectorize.low`` and ``split*``, ``paths.shared``).
        out: write the calibrated checkpoint here instead of over ``checkpoint``.

    Returns:
        ``{"threshold", "calibration", "object_threshold", "object_calibration", "out"}``.

    Raises:
        ModelError: the checkpoint cannot be loaded.
        MissingInputError: the shared data is not at ``paths.shared``.
    """
    import torch

    from pipeline.nets.checkpoint import ChangeModel, save_checkpoint
    from pipeline.nets.device import precision_label

    model = ChangeModel.load(checkpoint, precision=settings.detect.precision)
    items, _ = validation_items(settings, coarse=False)
    probs = net_probabilities(model, items)
    threshold, curve = pixel_threshold(items, probs, settings.evaluate)
    objects = calibrate_objects(
        items, probs, threshold, settings.vectorize.low, settings.evaluate, vectorize=settings.vectorize
    )
    result = {
        "threshold": threshold,
        "calibration": {str(t): round(v, 4) for t, v in curve.items()},
        "object_threshold": objects["object_threshold"],
        "object_calibration": objects["curve"],
        "calibrated_precision": precision_label(model.device, model.precision),
    }
    target = Path(out) if out is not None else Path(checkpoint)
    with torch.no_grad():
        save_checkpoint(
            target, model.module.cpu(), model.arch, model.in_channels, model.kwargs, {**model.meta, **result}
        )
    log.info(
        "calibrated %s: threshold %.2f, object threshold %.2f -> %s",
        checkpoint,
        threshold,
        result["object_threshold"],
        target,
    )
    return {**result, "out": str(target)}
