"""Flag-level (object) checks: the object-confidence calibration and the Santa Rosa flag check.

Pixel calibration (:mod:`pipeline.evaluate`) picks the threshold that seeds objects. Whether a seeded
object becomes a flag is decided here, per object, by its mean probability: the network is often sure of
a few pixels of a shadow edge or a seasonal colour shift (p_max high) but not of the whole blob, while a
real new or removed structure is confidently changed over most of its footprint. :func:`calibrate_objects`
builds objects exactly as :func:`pipeline.vectorize.clean_mask` does (hysteresis, opening, closing) on
the validation pairs and picks the smallest object mean probability maximising the weighted object F1;
``scarwatch evaluate`` writes it into the checkpoint as ``object_threshold``, detect carries it into the
probability COG and vectorize drops flags below it (``vectorize.min_p_mean`` overrides).

:func:`santa_rosa_flags` runs the real align → tile → detect → vectorize chain on the held-out Santa
Rosa tiles (pre → post, so destroyed buildings are ``removed`` flags) and scores the flags against the
xBD footprints of destroyed and major-damage buildings, at IoU >= 0.5 and by centroid hit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import VectorizeSettings
from pipeline.evaluate import Scores, component_scores, pool, weighted_f1

if TYPE_CHECKING:
    import geopandas as gpd

    from pipeline.config import EvaluateSettings, Settings

log = logging.getLogger(__name__)


@dataclass
class Objects:
    """Seeded objects of one probability map: 4-connected labels (h, w) and each label's mean p."""

    labels: np.ndarray
    means: np.ndarray  # index 0 (background) unused

    def mask(self, min_mean: float) -> np.ndarray:
        """The pixels of the objects whose mean probability is at least ``min_mean``."""
        keep = self.means >= min_mean
        keep[0] = False
        return np.asarray(keep[self.labels])


def seeded_objects(p: np.ndarray, seed: float, low: float, valid: np.ndarray | None = None) -> Objects:
    """Objects as vectorize builds them: hysteresis at (``low``, ``seed``), 3x3 opening and closing.

    Args:
        p: probabilities (h, w) in [0, 1].
        seed: seed threshold (the calibrated pixel threshold).
        low: grow threshold (capped at ``seed``).
        valid: pixels outside it count as p = 0.

    Returns:
        The labelled objects with their mean probabilities.
    """
    from pipeline.vectorize import clean_mask, label_objects

    p = np.asarray(p, dtype=np.float32)
    if valid is not None:
        p = np.where(valid, p, 0.0).astype(np.float32)
    settings = VectorizeSettings.model_validate({"high": seed, "low": min(low, seed)})
    labels, sums, counts = label_objects(clean_mask(p, settings), p)
    return Objects(labels, sums / np.maximum(counts, 1))


def calibrate_objects(
    items: Sequence[Any],
    probs: Sequence[np.ndarray],
    seed: float,
    settings: EvaluateSettings,
    *,
    low: float | None = None,
    grid: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Choose the object mean-probability threshold that maximises the weighted object F1.

    Args:
        items: validation items (``dataset``, ``cls``, ``truth``, ``valid``) as from
            :func:`pipeline.evaluate.validation_items`.
        probs: each item's class probability (h, w).
        seed: the seed (pixel) threshold objects are grown from.
        settings: ``evaluate`` settings (``iou_threshold``, ``min_object_px``, ``calibration_weights``,
            ``grow``, ``object_thresholds``).
        low: the grow threshold (default ``settings.grow``, which mirrors ``vectorize.low``).
        grid: candidate thresholds (default ``settings.object_thresholds``).

    Returns:
        ``{"object_threshold", "seed", "low", "curve": {t: weighted F1}, "scores": {ds: {cls: Scores}}}``
        with the scores of the chosen threshold; ties go to the smaller threshold (fewer flags dropped).
    """
    low = settings.grow if low is None else low
    grid = tuple(settings.object_thresholds if grid is None else grid)
    per_t: dict[float, dict[str, dict[str, list[Scores]]]] = {t: {} for t in grid}
    for item, p in zip(items, probs, strict=True):
        objs = seeded_objects(p, seed, low, item.valid)
        for t in grid:
            s = component_scores(
                objs.mask(t),
                item.truth,
                item.valid,
                iou_threshold=settings.iou_threshold,
                min_pixels=settings.min_object_px,
            )
            per_t[t].setdefault(item.dataset, {}).setdefault(item.cls, []).append(s)
    pooled = {
        t: {
            ds: {cls: {"object": pool(v).as_dict()} for cls, v in sorted(classes.items())}
            for ds, classes in groups.items()
        }
        for t, groups in per_t.items()
    }
    curve = {t: weighted_f1(pooled[t], settings.calibration_weights, level="object") for t in grid}
    best = max(grid, key=lambda t: (round(curve[t], 6), -t))
    scores = {ds: {cls: s["object"] for cls, s in classes.items()} for ds, classes in sorted(pooled[best].items())}
    log.info("object threshold %.2f (weighted object F1 %.4f; at 0: %.4f)", best, curve[best], curve[grid[0]])
    return {
        "object_threshold": float(best),
        "seed": float(seed),
        "low": float(min(low, seed)),
        "curve": {str(t): round(v, 4) for t, v in curve.items()},
        "scores": scores,
    }


# --------------------------------------------------------------------------- Santa Rosa, end to end

#: xBD damage classes whose footprints count as removed structures (as in the change masks)
REMOVED_SUBTYPES = ("destroyed", "major-damage")
#: the month the Santa Rosa flags are dated (post imagery: 2017-10-11)
SANTA_ROSA_MONTH = "2017-10"


def santa_rosa_truth(root: Path, tile_id: str, valid_path: Path | None = None) -> gpd.GeoDataFrame:
    """Footprints of the tile's destroyed and major-damage buildings as ``removed`` truth (EPSG:32610).

    With ``valid_path`` (the aligned pair's ``valid.tif``) footprints whose centroid is not valid in both
    epochs are left out: no detector can see them.
    """
    import geopandas as gpd
    import rasterio

    from pipeline.errors import MissingInputError

    path = root / "buildings" / f"{tile_id}.geojson"
    if not path.is_file():
        raise MissingInputError(f"{path}: footprints not found; point evaluate.data at the shared data folder")
    gdf = gpd.read_file(path)
    gdf = gdf[gdf["subtype"].isin(REMOVED_SUBTYPES)].to_crs("EPSG:32610")
    if valid_path is not None and len(gdf):
        with rasterio.open(valid_path) as ds:
            if ds.crs is not None and gdf.crs != ds.crs:
                gdf = gdf.to_crs(ds.crs)
            cents = gdf.geometry.centroid
            vals = np.array([v[0] for v in ds.sample(list(zip(cents.x, cents.y, strict=True)))])
        gdf = gdf[vals > 0]
    return gpd.GeoDataFrame(
        {"month": [SANTA_ROSA_MONTH] * len(gdf), "kind": ["removed"] * len(gdf)},
        geometry=gdf.geometry.to_numpy(),
        crs=gdf.crs,
    )


def _epoch(folder: Path, sheet: Path) -> Path:
    """An epoch folder holding one sheet (a symbolic link; a copy where links are not allowed)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / sheet.name
    try:
        target.symlink_to(sheet.resolve())
    except OSError:
        shutil.copyfile(sheet, target)
    return folder


def santa_rosa_flags(
    settings: Settings,
    work_dir: Path,
    *,
    tile_ids: Sequence[str] | None = None,
    predictor: Any = None,
) -> dict[str, Any]:
    """Run align → tile → detect → vectorize on held-out Santa Rosa tiles and score the flags.

    Each tile's pre image is the previous epoch and its post image the current one, so destroyed
    buildings should come out as ``removed`` flags; any ``new`` flag is a false alarm. Flags are scored
    against :func:`santa_rosa_truth` at IoU >= 0.5 and by centroid hit (:func:`pipeline.vectorize.flag_scores`)
    and pooled over tiles by adding counts.

    Args:
        settings: all settings (``evaluate.data``, the held-out split, and the align, tile, detect and
            vectorize sections exactly as the monthly pipeline uses them).
        work_dir: scratch folder for the pairs, tile indexes, probability rasters and flags.
        tile_ids: tiles to run (default: the held-out clusters of ``evaluate.split_seed``).
        predictor: a detect predictor (default: from ``settings.detect``).

    Returns:
        ``{"tiles": [...], "truth": n, "flags": {kind: n}, "scores": {kind: {"iou50", "centroid"}},
        "per_tile": {id: {"truth": n, "removed_iou50": {...}}}}``.

    Raises:
        MissingInputError: the Santa Rosa data is not at ``evaluate.data``.
    """
    from pipeline.datasets import split_clusters
    from pipeline.detect import detect_pair
    from pipeline.formats import FLAG_KINDS as KINDS
    from pipeline.imagery import align_pair
    from pipeline.tiling import tile_pair
    from pipeline.vectorize import flag_scores, vectorize_month

    root = Path(settings.evaluate.data) / "xbd-santa-rosa"
    if tile_ids is None:
        _, tile_ids = split_clusters(root, settings.evaluate.val_fraction, settings.evaluate.split_seed)
    found: dict[tuple[str, str], list[Scores]] = {}
    per_tile: dict[str, Any] = {}
    n_truth = 0
    n_flags = dict.fromkeys(KINDS, 0)
    month = SANTA_ROSA_MONTH
    for tile_id in tile_ids:
        base = Path(work_dir) / tile_id
        prev = _epoch(base / "imagery" / "pre", root / "pre" / f"{tile_id}.tif")
        curr = _epoch(base / "imagery" / "post", root / "post" / f"{tile_id}.tif")
        pair_dir = base / "pair"
        align_pair(prev, curr, pair_dir, settings.align, month=month, prev="2017-06")
        tile_pair(pair_dir, base / "tiles.parquet", settings.tile)
        detect_pair(
            pair_dir,
            base / "tiles.parquet",
            base / "prob.tif",
            settings.detect,
            overlap=settings.tile.overlap,
            predictor=predictor,
        )
        flags = vectorize_month(base / "prob.tif", base / "flags.gpkg", settings.vectorize, month=month)
        truth = santa_rosa_truth(root, tile_id, pair_dir / "valid.tif")
        scores = flag_scores(flags, truth, month)
        for kind, modes in scores.items():
            for mode, d in modes.items():
                found.setdefault((kind, mode), []).append(Scores.from_dict(d))
        per_tile[tile_id] = {"truth": len(truth), "removed_iou50": scores["removed"]["iou50"]}
        n_truth += len(truth)
        counts = {kind: int((flags["kind"] == kind).sum()) for kind in KINDS}
        for kind in KINDS:
            n_flags[kind] += counts[kind]
        log.info(
            "santa rosa %s: %d destroyed footprints, %d removed / %d new flags, removed P %.2f R %.2f",
            tile_id,
            len(truth),
            counts["removed"],
            counts["new"],
            scores["removed"]["iou50"]["precision"],
            scores["removed"]["iou50"]["recall"],
        )
    totals: dict[str, dict[str, Any]] = {}
    for (kind, mode), tiles in found.items():
        totals.setdefault(kind, {})[mode] = pool(tiles).as_dict()
    return {
        "tiles": list(tile_ids),
        "month": month,
        "truth": n_truth,
        "flags": n_flags,
        "scores": totals,
        "per_tile": per_tile,
    }


def add_flag_check(settings: Settings, checkpoint: Path, metrics_path: Path) -> dict[str, Any]:
    """Run :func:`santa_rosa_flags` with ``checkpoint`` and store it under ``flags`` in the metrics file.

    The pipeline settings are the monthly run's (params.yaml), with ``detect.model`` set to
    ``checkpoint``; pairs, rasters and flags go to a temporary folder that is removed afterwards.

    Returns:
        The flag check's result (as stored under ``flags.santa-rosa``).

    Raises:
        MissingInputError: the metrics file or the Santa Rosa data is missing.
    """
    import json
    import tempfile

    from pipeline.errors import MissingInputError
    from pipeline.fileio import atomic_path

    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        raise MissingInputError(f"{metrics_path}: metrics file not found; run 'scarwatch evaluate' first")
    settings = settings.model_copy(update={"detect": settings.detect.model_copy(update={"model": Path(checkpoint)})})
    with tempfile.TemporaryDirectory(prefix="scarwatch-flagcheck-") as work:
        result = santa_rosa_flags(settings, Path(work))
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics.setdefault("flags", {})["santa-rosa"] = result
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return result


# --------------------------------------------------------------------------- the demo town, pooled


def demo_accuracy(metrics_dir: Path) -> dict[str, dict[str, Any]]:
    """Pool the demo's monthly flag accuracy (``reports/metrics/<month>.json``) over every month.

    The monthly report scores each month's flags against the demo truth (``accuracy``: IoU >= 0.5;
    ``accuracy_centroid``: centroid hit); this adds the counts of all months.

    Returns:
        ``{"iou50" | "centroid": {"new" | "removed" | "all": Scores.as_dict(), "months": [...]}}``.

    Raises:
        MissingInputError: no monthly metrics file with an accuracy section is in ``metrics_dir``.
    """
    import json

    from pipeline.errors import MissingInputError

    found: dict[str, dict[str, list[Scores]]] = {}
    months = []
    for path in sorted(Path(metrics_dir).glob("*.json")):
        figures = json.loads(path.read_text(encoding="utf-8"))
        if not figures.get("accuracy"):
            continue
        months.append(path.stem)
        for mode, key in (("iou50", "accuracy"), ("centroid", "accuracy_centroid")):
            for kind, s in (figures.get(key) or {}).items():
                found.setdefault(mode, {}).setdefault(kind, []).append(Scores.from_dict(s))
    if not months:
        raise MissingInputError(
            f"{metrics_dir}: no monthly metrics with a demo accuracy section; run 'make demo' (or dvc repro) first"
        )
    return {
        mode: {**{kind: pool(scores).as_dict() for kind, scores in kinds.items()}, "months": months}
        for mode, kinds in found.items()
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.flagcheck [reports/metrics]``: the demo's flag accuracy pooled over months."""
    import argparse

    from pipeline.errors import ScarWatchError

    parser = argparse.ArgumentParser(description="Pool the demo town's monthly flag accuracy over all months.")
    parser.add_argument("metrics_dir", nargs="?", default="reports/metrics", help="folder of <month>.json")
    args = parser.parse_args(argv)
    try:
        result = demo_accuracy(Path(args.metrics_dir))
    except ScarWatchError as exc:
        raise SystemExit(f"python -m pipeline.flagcheck: error: {exc}") from None
    for mode, kinds in result.items():
        print(f"{mode} ({', '.join(kinds['months'])}):")
        for kind in ("all", "new", "removed"):
            s = kinds.get(kind)
            if s:
                print(
                    f"  {kind:8s} TP {s['tp']:4d}  FP {s['fp']:4d}  FN {s['fn']:4d}  "
                    f"P {s['precision']:.3f}  R {s['recall']:.3f}  F1 {s['f1']:.3f}"
                )


if __name__ == "__main__":  # pragma: no cover
    main()
