"""Flags against field truth, through the whole monthly pipeline.

:func:`santa_rosa_flags` runs the real align → tile → detect → vectorize chain on the held-out Santa
Rosa tiles (pre → post, so destroyed buildings are ``removed`` flags) and scores the flags against the
xBD footprints of destroyed and major-damage buildings, at IoU >= 0.5 and by centroid hit;
``scarwatch evaluate`` stores it under ``flags`` in ``models/metrics.json``. :func:`demo_accuracy` pools
the demo town's monthly flag accuracy (``scarwatch demo-accuracy``, printed by ``make demo``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.metrics import Scores, pool

if TYPE_CHECKING:
    import geopandas as gpd

    from pipeline.config import Settings

log = logging.getLogger(__name__)


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
    against :func:`santa_rosa_truth` at IoU >= 0.5 and by centroid hit (:func:`pipeline.metrics.flag_scores`)
    and pooled over tiles by adding counts.

    Args:
        settings: all settings (``paths.shared``, the held-out split of ``train``, and the align, tile,
            detect and vectorize sections exactly as the monthly pipeline uses them).
        work_dir: scratch folder for the pairs, tile indexes, probability rasters and flags.
        tile_ids: tiles to run (default: the held-out clusters of ``train.split_seed``).
        predictor: a detect predictor (default: from ``settings.detect``).

    Returns:
        ``{"tiles": [...], "truth": n, "flags": {kind: n}, "scores": {kind: {"iou50", "centroid"}},
        "per_tile": {id: {"truth": n, "removed_iou50": {...}}}}``.

    Raises:
        MissingInputError: the Santa Rosa data is not at ``paths.shared``.
    """
    from pipeline.detect import detect_pair
    from pipeline.formats import FLAG_KINDS as KINDS
    from pipeline.imagery import align_pair, model_resolution
    from pipeline.metrics import flag_scores
    from pipeline.model.data import split_clusters
    from pipeline.tiling import tile_pair
    from pipeline.vectorize import vectorize_month

    root = Path(settings.paths.shared) / "xbd-santa-rosa"
    if tile_ids is None:
        _, tile_ids = split_clusters(root, settings.train.val_fraction, settings.train.split_seed)
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
        model_res = model_resolution(settings.align, settings.detect)
        align_pair(prev, curr, pair_dir, settings.align, month=month, prev="2017-06", model_res=model_res)
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


def santa_rosa_flag_check(settings: Settings, checkpoint: Path) -> dict[str, Any]:
    """:func:`santa_rosa_flags` with ``checkpoint`` as ``detect.model``, in a temporary folder.

    The pipeline settings are the monthly run's (params.yaml); pairs, rasters and flags go to a temporary
    folder that is removed afterwards.
    """
    import tempfile

    settings = settings.model_copy(update={"detect": settings.detect.model_copy(update={"model": Path(checkpoint)})})
    with tempfile.TemporaryDirectory(prefix="scarwatch-flagcheck-") as work:
        return santa_rosa_flags(settings, Path(work))


# --------------------------------------------------------------------------- the demo town, pooled


def demo_accuracy(metrics_dir: Path) -> dict[str, dict[str, Any]]:
    """Pool the demo's monthly flag accuracy (the report's figures, ``reports/monthly/<month>.json``) over months.

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
