"""Align two epochs of map sheets onto one grid: the ``align`` stage.

An epoch is a folder of GeoTIFF sheets (or one mosaic). :func:`align_pair` opens and validates both
epochs, lays the target grid over their common area, measures the co-registration shift of prev onto
curr and fits the histogram tables on sample blocks, and writes the description of the pair
(``pair.json``), the mask of pixels valid in both epochs (``valid.tif``) and the QA of the shift
(``qa.json``). Nothing is resampled to disk: :class:`pipeline.pair.AlignedPair` reads any window of the
aligned pair from the original sheets, and this module reads the sample blocks through it too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import CRSError as RioCRSError
from rasterio.errors import RasterioError
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window

from pipeline import coregister
from pipeline.config import AlignSettings, DetectSettings, check_month
from pipeline.errors import (
    BandMismatchError,
    ConfigError,
    CorruptFileError,
    CRSError,
    CRSMismatchError,
    InputError,
    MissingInputError,
    NoOverlapError,
    first_line,
)
from pipeline.fileio import block_windows, gdal_env, replace_dir, temp_dir
from pipeline.formats import PAIR_JSON, PAIR_VERSION, QA_USABLE, VALID_TIF, checkpoint_native_gsd, encode_valid
from pipeline.pair import AlignedPair

log = logging.getLogger(__name__)

SHEET_SUFFIXES = (".tif", ".tiff")
PASS_BLOCK = 1024
"""Side of the windows the valid-mask pass reads (a multiple of the 512 px blocks of valid.tif)."""
SAMPLE_BLOCKS = 8
"""At most SAMPLE_BLOCKS x SAMPLE_BLOCKS sample blocks for co-registration and histogram matching."""
HIST_SAMPLE = 400_000
"""At most this many pixels per band feed the histogram tables."""


@dataclass(frozen=True, slots=True)
class AlignSummary:
    """What :func:`align_pair` wrote: the grid, the shift applied to prev, and the QA numbers."""

    out_dir: Path
    width: int
    height: int
    crs: str
    res: float
    shift_px: tuple[float, float]
    residual_px: float
    valid_fraction: float


@dataclass(frozen=True, slots=True)
class _Sheet:
    path: Path
    crs: CRS
    bounds: tuple[float, float, float, float]
    res: float
    count: int
    dtype: str
    alpha: int | None
    transform: Affine


@dataclass(frozen=True, slots=True)
class _Epoch:
    folder: Path
    role: str
    sheets: tuple[_Sheet, ...]
    count: int
    dtype: str


# ---------------------------------------------------------------------------------------------------
# Opening and validating epochs


def _list_sheets(folder: Path, role: str) -> list[Path]:
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: {role} epoch folder not found; put its map sheets (*.tif) there")
    paths = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in SHEET_SUFFIXES or p.name.startswith("."):
            continue
        if not p.is_file():  # a dangling or looping link, or a folder: never skipped quietly
            what = "a link to nothing (or a loop of links)" if p.is_symlink() else "not a file"
            raise CorruptFileError(f"{p}: {role} epoch sheet is {what}; replace it with the map sheet or remove it")
        if not os.access(p, os.R_OK):
            raise CorruptFileError(f"{p}: {role} epoch sheet is not readable (permissions); fix them (chmod a+r)")
        paths.append(p)
    if not paths:
        raise MissingInputError(f"{folder}: {role} epoch folder holds no *.tif sheets; add the month's imagery")
    return paths


def _inspect_sheet(path: Path, bands: tuple[int, ...]) -> _Sheet:
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise CRSError(f"{path}: sheet has no CRS; set it (gdal_edit.py -a_srs EPSG:xxxx) and rerun")
            alpha = next((i + 1 for i, ci in enumerate(src.colorinterp) if ci == ColorInterp.alpha), None)
            count = src.count - (1 if alpha else 0)
            if src.dtypes[0] not in ("uint8", "uint16") or len(set(src.dtypes)) != 1:
                raise BandMismatchError(
                    f"{path}: data type {src.dtypes[0]!r} is not supported; deliver uint8 or uint16 sheets"
                )
            bad = [b for b in bands if b > count or b == alpha]
            if bad:
                note = f" (band {alpha} is marked alpha)" if alpha else ""
                raise BandMismatchError(
                    f"{path}: align.bands {bands!r} names band(s) {bad!r} but the sheet has {count} image "
                    f"band(s){note}; fix align.bands in params.yaml"
                )
            # Decode the first and last block: a truncated file opens but fails here.
            src.read(1, window=Window(0, 0, 1, 1))
            src.read(src.count, window=Window(src.width - 1, src.height - 1, 1, 1))
            res = float(min(abs(src.transform.a), abs(src.transform.e)))
            bounds = tuple(src.bounds)
            return _Sheet(path, src.crs, bounds, res, count, src.dtypes[0], alpha, src.transform)  # type: ignore[arg-type]
    except RasterioError as exc:
        raise CorruptFileError(
            f"{path}: not a readable GeoTIFF ({first_line(exc)}); re-export or re-download it"
        ) from exc


def _open_epoch(folder: Path, role: str, settings: AlignSettings) -> _Epoch:
    sheets = tuple(_inspect_sheet(p, settings.bands) for p in _list_sheets(folder, role))
    first = sheets[0]
    for s in sheets[1:]:
        if (s.count, s.dtype) != (first.count, first.dtype):
            raise BandMismatchError(
                f"{s.path}: {s.count} band(s) {s.dtype} but {first.path.name} has {first.count} {first.dtype}; "
                f"all sheets of the {role} epoch must share band count and data type"
            )
    if first.dtype == "uint16" and settings.scale16 is None:
        raise ConfigError(
            f"{first.path}: 16-bit imagery needs a scaling rule; set align.scale16: [low, high] in params.yaml"
        )
    return _Epoch(folder, role, sheets, first.count, first.dtype)


def _check_compatible(prev: _Epoch, curr: _Epoch) -> None:
    if (prev.count, prev.dtype) != (curr.count, curr.dtype):
        raise BandMismatchError(
            f"{prev.sheets[0].path}: {prev.count} band(s) {prev.dtype} but the current epoch "
            f"({curr.sheets[0].path}) has {curr.count} {curr.dtype}; deliver both epochs with the same bands"
        )


def _epoch_crs(epoch: _Epoch) -> CRS:
    counts = Counter(s.crs.to_wkt() for s in epoch.sheets)
    return CRS.from_wkt(counts.most_common(1)[0][0])


def _target_bounds(sheet: _Sheet, dst_crs: CRS, folder: Path) -> tuple[float, float, float, float]:
    if sheet.crs == dst_crs:
        return sheet.bounds
    try:
        out = transform_bounds(sheet.crs, dst_crs, *sheet.bounds, densify_pts=21)
    except (RasterioError, RioCRSError, ValueError) as exc:
        raise CRSMismatchError(
            f"{sheet.path}: bounds {sheet.bounds!r} cannot be placed in {dst_crs.to_string()} under the declared "
            f"CRS {sheet.crs.to_string()} ({exc}); fix the sheet's CRS (gdal_edit.py -a_srs)"
        ) from exc
    if not all(math.isfinite(v) for v in out):
        raise CRSMismatchError(
            f"{sheet.path}: declared CRS {sheet.crs.to_string()} puts the sheet outside {dst_crs.to_string()}; "
            f"fix the sheet's CRS (gdal_edit.py -a_srs) in {folder}"
        )
    log.info("%s: reprojecting %s -> %s on the fly", sheet.path.name, sheet.crs.to_string(), dst_crs.to_string())
    return tuple(out)  # type: ignore[return-value]


def _target_res(sheet: _Sheet, dst_crs: CRS) -> float:
    if sheet.crs == dst_crs:
        return sheet.res
    width = max(1, round((sheet.bounds[2] - sheet.bounds[0]) / sheet.res))
    height = max(1, round((sheet.bounds[3] - sheet.bounds[1]) / sheet.res))
    tr, _, _ = calculate_default_transform(sheet.crs, dst_crs, width, height, *sheet.bounds)
    return float(min(abs(tr.a), abs(tr.e)))


def _check_adjacent(epoch: _Epoch, boxes: list[tuple[float, float, float, float]], tol: float) -> None:
    """Raise CRSMismatchError for a sheet that lies apart from the other sheets of its epoch.

    Sheets are neighbours when their bounds (in the target CRS) come within ``tol`` of each other; a sheet
    (or group of sheets) cut off from the largest group is what a wrong declared CRS looks like.
    """
    n = len(boxes)
    if n < 2:
        return

    def touch(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return a[0] - tol <= b[2] and b[0] - tol <= a[2] and a[1] - tol <= b[3] and b[1] - tol <= a[3]

    group = [-1] * n
    for start in range(n):
        if group[start] >= 0:
            continue
        group[start], todo = start, [start]
        while todo:
            i = todo.pop()
            for j in range(n):
                if group[j] < 0 and touch(boxes[i], boxes[j]):
                    group[j] = start
                    todo.append(j)
    sizes = Counter(group)
    if len(sizes) == 1:
        return
    main = max(sizes, key=lambda g: (sizes[g], -g))
    major = _epoch_crs(epoch)
    strays = [i for i in range(n) if group[i] != main]
    stray = next((i for i in strays if epoch.sheets[i].crs != major), strays[0])
    others = [boxes[i] for i in range(n) if group[i] == main]
    ox = (min(b[0] for b in others), min(b[1] for b in others), max(b[2] for b in others), max(b[3] for b in others))
    b = boxes[stray]
    gap = math.hypot(max(0.0, ox[0] - b[2], b[0] - ox[2]), max(0.0, ox[1] - b[3], b[1] - ox[3]))
    sheet = epoch.sheets[stray]
    raise CRSMismatchError(
        f"{sheet.path}: declared CRS {sheet.crs.to_string()} places this sheet {gap:.0f} map units away from the "
        f"other sheets of {epoch.folder}; fix its CRS (gdal_edit.py -a_srs) or remove it from the folder"
    )


def _union(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _snap(value: float, anchor: float, res: float, up: bool) -> float:
    steps = (value - anchor) / res
    k = math.ceil(steps - 1e-6) if up else math.floor(steps + 1e-6)
    return anchor + k * res


# ---------------------------------------------------------------------------------------------------
# Aligning


def _grid(
    prev: _Epoch, curr: _Epoch, settings: AlignSettings, model_res: float | None
) -> tuple[CRS, Affine, int, int, dict[str, list], dict[str, float]]:
    dst_crs = CRS.from_user_input(settings.target_crs) if settings.target_crs else _epoch_crs(curr)
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    res_by: dict[str, float] = {}
    for ep in (prev, curr):
        boxes[ep.role] = [_target_bounds(s, dst_crs, ep.folder) for s in ep.sheets]
        sheet_res = [_target_res(s, dst_crs) for s in ep.sheets]
        res_by[ep.role] = float(np.median(sheet_res))
        # A missing sheet leaves a gap of one sheet; a wrong CRS moves a sheet by tens of kilometres.
        sheet_size = max(max(b[2] - b[0], b[3] - b[1]) for b in boxes[ep.role])
        _check_adjacent(ep, boxes[ep.role], tol=max(2.0 * max(sheet_res), sheet_size))
    delivery = float(f"{min(res_by.values()):.6g}")
    if isinstance(settings.resolution, float):
        res = settings.resolution
    elif settings.resolution == "model" and model_res is not None:
        res = model_res
    else:
        res = delivery
    pu, cu = _union(boxes[prev.role]), _union(boxes[curr.role])
    x0, y0, x1, y1 = max(pu[0], cu[0]), max(pu[1], cu[1]), min(pu[2], cu[2]), min(pu[3], cu[3])
    if x1 - x0 < res or y1 - y0 < res:
        raise NoOverlapError(
            f"{prev.folder}: previous epoch {tuple(round(v, 2) for v in pu)} and current epoch {curr.folder} "
            f"{tuple(round(v, 2) for v in cu)} do not overlap in {dst_crs.to_string()}; check the folders and CRSs"
        )
    ref = curr.sheets[0]
    on_lattice = ref.crs == dst_crs and math.isclose(ref.res, res, rel_tol=1e-9)
    ax, ay = (ref.bounds[0] % res, ref.bounds[3] % res) if on_lattice else (0.0, 0.0)
    gx0, gx1 = _snap(x0, ax, res, up=False), _snap(x1, ax, res, up=True)
    gy0, gy1 = _snap(y0, ay, res, up=False), _snap(y1, ay, res, up=True)
    width, height = round((gx1 - gx0) / res), round((gy1 - gy0) / res)
    log.info("target grid %s res %r: %d x %d px at (%r, %r)", dst_crs.to_string(), res, width, height, gx0, gy1)
    return dst_crs, Affine(res, 0.0, gx0, 0.0, -res, gy1), width, height, boxes, res_by


def _valid_pass(pair: AlignedPair, tmp: Path) -> tuple[int, int, int]:
    """Write valid.tif (COG) window by window; return the prev, curr and both-valid pixel counts."""
    raw = tmp / "valid.raw.tif"
    profile = {
        "driver": "GTiff",
        "width": pair.width,
        "height": pair.height,
        "count": 1,
        "dtype": "uint8",
        "crs": pair.crs,
        "transform": pair.transform,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    counts = [0, 0, 0]
    with rasterio.open(raw, "w", **profile) as dst:
        for window in block_windows(pair.width, pair.height, PASS_BLOCK):
            pm, cm = pair.read_epoch_masks(window)
            both = pm & cm
            counts[0] += int(pm.sum())
            counts[1] += int(cm.sum())
            counts[2] += int(both.sum())
            dst.write(encode_valid(both)[None], window=window)
    rasterio.shutil.copy(
        raw, tmp / VALID_TIF, driver="COG", compress="DEFLATE", blocksize=512, overview_resampling="nearest"
    )
    raw.unlink()
    return counts[0], counts[1], counts[2]


def _sheet_meta(epoch: _Epoch, boxes: list[tuple[float, float, float, float]], base: Path) -> dict[str, Any]:
    # Paths relative to the pair's folder: a checkout moved or cloned elsewhere (or a DVC cache restored
    # into it) still finds its sheets.
    base = base.resolve()
    return {
        "folder": os.path.relpath(epoch.folder.resolve(), base),
        "sheets": [
            {
                "path": os.path.relpath(s.path.resolve(), base),
                "crs": s.crs.to_wkt(),
                "transform": list(s.transform)[:6],
                "bounds": list(b),
                "alpha": s.alpha,
            }
            for s, b in zip(epoch.sheets, boxes, strict=True)
        ],
    }


def align_pair(
    prev_dir: Path,
    curr_dir: Path,
    out_dir: Path,
    settings: AlignSettings,
    *,
    month: str,
    prev: str,
    model_res: float | None = None,
) -> AlignSummary:
    """Align the previous epoch onto the current one's grid and write the pair description.

    The grid's pixel size is ``settings.resolution``: with ``"model"`` it is ``model_res`` (the change
    network's native pixel, :func:`pipeline.formats.checkpoint_native_gsd`), so a 2 m satellite scene or a
    0.3 m aerial delivery is resampled to the pixel the network was trained at; without ``model_res`` (CVA,
    an old checkpoint) and with ``"delivery"`` it is the finer epoch's. Grids more than 1.25 times coarser
    than the delivery are resampled by area averaging, not by ``settings.resampling``, so fine detail is
    integrated rather than aliased (recorded as ``resampling`` in pair.json).

    Writes ``out_dir/pair.json`` (grid, sheets, bands, shift, histogram tables), ``out_dir/valid.tif``
    (uint8 COG, 255 where both epochs have data) and ``out_dir/qa.json`` (per-block residual shifts).
    Everything is written to a temporary folder first and renamed, so an error leaves nothing behind.

    Raises:
        MissingInputError: an epoch folder is missing or holds no sheets.
        CorruptFileError: a sheet cannot be read.
        CRSError: a sheet has no CRS. CRSMismatchError: a sheet's CRS puts it apart from its neighbours.
        BandMismatchError: band counts or data types differ, or ``settings.bands`` does not fit.
        ConfigError: 16-bit imagery without ``settings.scale16``, or a malformed month.
        NoOverlapError: the epochs do not overlap. InputError: an epoch is entirely nodata.
    """
    with gdal_env():
        return _align(
            Path(prev_dir), Path(curr_dir), Path(out_dir), settings, month=month, prev=prev, model_res=model_res
        )


def model_resolution(settings: AlignSettings, detect: DetectSettings) -> float | None:
    """``model_res`` for :func:`align_pair`: the change network's native pixel when the grid follows it.

    None when ``settings.resolution`` is not ``"model"``, for the CVA method, or for a checkpoint that
    does not record its pixel size (the grid then follows the delivery).
    """
    if settings.resolution != "model" or detect.method != "cnn":
        return None
    return checkpoint_native_gsd(Path(detect.model))


#: A grid this many times coarser than the delivery is resampled by area averaging.
AVERAGE_ABOVE = 1.25


def _warn_outside(
    boxes: dict[str, list[tuple[float, float, float, float]]],
    epochs: dict[str, _Epoch],
    transform: Affine,
    width: int,
    height: int,
) -> None:
    """Name on stderr the sheets that lie (mostly) outside the grid: the other epoch lacks them."""
    import shapely

    left, top = transform.c, transform.f
    right, bottom = left + transform.a * width, top + transform.e * height
    grid = shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    for role, epoch in epochs.items():
        other = "current" if role == "prev" else "previous"
        outside = []
        for sheet, box in zip(epoch.sheets, boxes[role], strict=True):
            area = shapely.box(*box)
            if area.area > 0 and area.intersection(grid).area < 0.5 * area.area:
                outside.append(sheet.path.name)
        if outside:
            log.warning(
                "%s: sheet(s) %s lie outside the %s epoch's coverage, so the grid leaves them out; deliver the "
                "%s epoch's missing sheets (or check the folder)",
                epoch.folder,
                ", ".join(outside),
                other,
                other,
            )


MAX_CLOUD_FRACTION = 0.5
"""More of the sampled valid pixels than this bright and grey (cloud, haze, snow) in either epoch: unfit."""
MIN_TEXTURED_FRACTION = 0.25
"""Fewer of the sampled blocks than this textured enough to correlate: unfit (blank, blurred, washed out)."""
CLOUD_LEVEL, CLOUD_CHROMA = 0.8, 0.08


def usability(blocks: list[coregister.BlockShift], samples: list[coregister.Sample]) -> dict[str, Any]:
    """qa.json ``usable``: whether the pair is fit for change detection, and why not.

    ``cloud_fraction`` is the larger of the two epochs' share of sampled valid pixels that are bright
    (grey level >= 0.8) and colourless (band range < 0.08): cloud, haze or snow. ``textured_fraction`` is
    the share of sampled blocks (at least half valid) whose grey-level spread in both epochs reaches
    :data:`pipeline.coregister.MIN_TEXTURE`.
    """
    cloud = 0.0
    for epoch in (0, 1):
        pixels = [s[epoch] for s in samples if s[epoch].shape[1]]
        if pixels:
            px = np.concatenate(pixels, axis=1)[:3]
            bright = px.mean(axis=0) >= CLOUD_LEVEL
            grey = (px.max(axis=0) - px.min(axis=0)) < CLOUD_CHROMA
            cloud = max(cloud, float((bright & grey).mean()))
    measured = [b for b in blocks if b.valid_fraction >= 0.5]
    textured = sum(b.texture >= coregister.MIN_TEXTURE for b in measured) / len(measured) if measured else 0.0
    reasons = []
    if cloud > MAX_CLOUD_FRACTION:
        reasons.append(f"{cloud:.0%} of the sampled pixels look like cloud or haze (limit {MAX_CLOUD_FRACTION:.0%})")
    if textured < MIN_TEXTURED_FRACTION:
        reasons.append(
            f"only {textured:.0%} of the sampled blocks have texture (at least {MIN_TEXTURED_FRACTION:.0%} needed)"
        )
    return {
        "ok": not reasons,
        "reasons": reasons,
        "cloud_fraction": round(cloud, 4),
        "textured_fraction": round(float(textured), 4),
    }


def _align(
    prev_dir: Path,
    curr_dir: Path,
    out_dir: Path,
    settings: AlignSettings,
    *,
    month: str,
    prev: str,
    model_res: float | None,
) -> AlignSummary:
    try:
        check_month(month)
        check_month(prev)
    except ValueError as exc:
        raise ConfigError(f"{out_dir}: {exc}") from exc
    prev_ep = _open_epoch(prev_dir, "previous", settings)
    curr_ep = _open_epoch(curr_dir, "current", settings)
    prev_ep = _Epoch(prev_ep.folder, "prev", prev_ep.sheets, prev_ep.count, prev_ep.dtype)
    curr_ep = _Epoch(curr_ep.folder, "curr", curr_ep.sheets, curr_ep.count, curr_ep.dtype)
    _check_compatible(prev_ep, curr_ep)
    dst_crs, transform, width, height, boxes, delivery = _grid(prev_ep, curr_ep, settings, model_res)
    _warn_outside(boxes, {"prev": prev_ep, "curr": curr_ep}, transform, width, height)
    resampling = settings.resampling
    if transform.a > AVERAGE_ABOVE * min(delivery.values()) and resampling in ("bilinear", "cubic", "lanczos"):
        resampling = "average"
    if not math.isclose(transform.a, min(delivery.values()), rel_tol=0.05):
        log.info(
            "resampling %s (%s m) and %s (%s m) to a %s m grid (%s)",
            prev_dir,
            f"{delivery['prev']:g}",
            curr_dir,
            f"{delivery['curr']:g}",
            f"{transform.a:g}",
            resampling,
        )
    meta: dict[str, Any] = {
        "version": PAIR_VERSION,
        "month": month,
        "prev": prev,
        "crs": dst_crs.to_wkt(),
        "crs_string": dst_crs.to_string(),
        "transform": list(transform)[:6],
        "width": width,
        "height": height,
        "res": transform.a,
        "delivery_res": {k: round(v, 6) for k, v in delivery.items()},
        "bands": list(settings.bands),
        "dtype": curr_ep.dtype,
        "scale16": list(settings.scale16) if settings.scale16 else None,
        "resampling": resampling,
        "shift_px": [0.0, 0.0],
        "luts": None,
        "epochs": {
            "prev": _sheet_meta(prev_ep, boxes["prev"], out_dir),
            "curr": _sheet_meta(curr_ep, boxes["curr"], out_dir),
        },
    }
    windows = coregister.sample_windows(width, height, per_axis=SAMPLE_BLOCKS)
    with AlignedPair.from_meta(meta, out_dir) as raw_pair:
        before, samples = coregister.measure_blocks(raw_pair.read, windows, max_shift_px=settings.max_shift_px)
    shift = coregister.robust_shift(before) if settings.coregister else None
    if settings.coregister and shift is None:
        log.warning("too few textured blocks to co-register %s onto %s; no shift applied", prev_dir, curr_dir)
    after = before
    if shift is not None:
        meta["shift_px"] = [round(shift[0], 4), round(shift[1], 4)]
        with AlignedPair.from_meta(meta, out_dir) as shifted:
            after, samples = coregister.measure_blocks(shifted.read, windows, max_shift_px=settings.max_shift_px)
        log.info("co-registration shift applied to prev: dx=%.3f dy=%.3f px", *meta["shift_px"])
    if settings.normalize and samples:
        levels = 256 if curr_ep.dtype == "uint8" else 1024
        luts = coregister.luts_from_samples(samples, levels=levels, max_pixels=HIST_SAMPLE)
        meta["luts"] = {"levels": levels, "prev": np.round(luts, 6).tolist()}

    usable = usability(before, samples)
    if not usable["ok"]:
        log.warning(
            "%s: imagery of %s -> %s unfit for analysis (%s); flags of this month may miss construction "
            "(qa.json 'usable'); ask for a new delivery",
            out_dir,
            prev,
            month,
            "; ".join(usable["reasons"]),
        )

    tmp = temp_dir(out_dir)  # a killed run's folder is removed first
    try:
        with AlignedPair.from_meta(meta, out_dir) as pair:
            n_prev, n_curr, n_both = _valid_pass(pair, tmp)
        for n, ep in ((n_prev, prev_ep), (n_curr, curr_ep)):
            if n == 0:
                raise InputError(
                    f"{ep.folder}: every pixel of this epoch is nodata over the common area; "
                    "check its nodata value / mask or deliver valid imagery"
                )
        if n_both == 0:
            raise NoOverlapError(
                f"{prev_dir}: no pixel has data in both this epoch and {curr_dir}; check the folders and masks"
            )
        valid_fraction = n_both / float(width * height)
        qa = coregister.qa_report(before, after, coregister=settings.coregister)
        qa = {
            "month": month,
            "prev": prev,
            "max_shift_px": settings.max_shift_px,
            "shift_applied_px": meta["shift_px"],
            "histogram_matching": meta["luts"] is not None,
            "valid_fraction": round(valid_fraction, 6),
            "res": transform.a,
            "delivery_res": meta["delivery_res"],
            QA_USABLE: usable,
            **qa,
        }
        residual = qa["residual_after_median_px"] if settings.coregister else qa["residual_before_median_px"]
        (tmp / PAIR_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (tmp / "qa.json").write_text(json.dumps(qa, indent=1), encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = AlignSummary(
        out_dir=out_dir,
        width=width,
        height=height,
        crs=dst_crs.to_string(),
        res=float(transform.a),
        shift_px=(float(meta["shift_px"][0]), float(meta["shift_px"][1])),
        residual_px=float(residual or 0.0),
        valid_fraction=float(valid_fraction),
    )
    log.info("aligned %s onto %s: %r", prev_dir, curr_dir, summary)
    return summary
