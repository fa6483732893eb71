"""Open two epochs of map sheets, validate them and align them onto one grid, window by window.

An epoch is a folder of GeoTIFF sheets (or one mosaic). Its sheets are mosaicked virtually: each sheet is
seen through a :class:`rasterio.vrt.WarpedVRT` on the target grid, and a window of the mosaic is the
first valid pixel of the sheets that cover it. Nothing is resampled to disk; :func:`align_pair` only
writes the grid, the co-registration shift and histogram tables (``pair.json``), the mask of pixels valid
in both epochs (``valid.tif``) and the QA of the shift (``qa.json``). :class:`AlignedPair` reads any
window of the aligned pair from the original sheets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import CRSError as RioCRSError
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window

from pipeline import coregister
from pipeline.config import AlignSettings, check_month
from pipeline.errors import (
    BandMismatchError,
    ConfigError,
    CorruptFileError,
    CRSError,
    CRSMismatchError,
    InputError,
    MissingInputError,
    NoOverlapError,
)
from pipeline.fileio import gdal_env, replace_dir

log = logging.getLogger(__name__)

PAIR_VERSION = 1
SHEET_SUFFIXES = (".tif", ".tiff")
PASS_BLOCK = 1024
"""Side of the windows the valid-mask pass reads (a multiple of the 512 px blocks of valid.tif)."""
SAMPLE_BLOCKS = 8
"""At most SAMPLE_BLOCKS x SAMPLE_BLOCKS sample blocks for co-registration and histogram matching."""
HIST_SAMPLE = 400_000
"""At most this many pixels per band feed the histogram tables."""

Win = tuple[int, int, int, int]  # col_off, row_off, width, height


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _list_sheets(folder: Path, role: str) -> list[Path]:
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: {role} epoch folder not found; put its map sheets (*.tif) there")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SHEET_SUFFIXES)
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
            f"{path}: not a readable GeoTIFF ({_first_line(exc)}); re-export or re-download it"
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
# Reading an epoch on the grid


def _to_unit(arr: np.ndarray, dtype: str, scale16: tuple[float, float] | None) -> np.ndarray:
    if dtype == "uint8":
        return arr.astype(np.float32) / np.float32(255.0)
    low, high = scale16 if scale16 is not None else (0.0, 65535.0)
    out = (arr.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _intersect(a: Win, b: Win) -> Win | None:
    c0, r0 = max(a[0], b[0]), max(a[1], b[1])
    c1, r1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return (c0, r0, c1 - c0, r1 - r0) if c1 > c0 and r1 > r0 else None


def _as_win(window: Window) -> Win:
    return (
        int(round(window.col_off)),
        int(round(window.row_off)),
        int(round(window.width)),
        int(round(window.height)),
    )


def _lattice_offset(sheet: dict[str, Any], crs: CRS, transform: Affine) -> tuple[int, int] | None:
    """Whole-pixel offset of a sheet that already lies on the grid's lattice, else None (it is warped)."""
    st = Affine(*sheet["transform"][:6])
    same_res = math.isclose(st.a, transform.a, rel_tol=1e-9) and math.isclose(st.e, transform.e, rel_tol=1e-9)
    if not same_res or st.b != 0.0 or st.d != 0.0 or CRS.from_user_input(sheet["crs"]) != crs:
        return None
    col, row = ~transform * (st.c, st.f)
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(col), round(row)


class _Mosaic:
    """One epoch's sheets seen on a grid; not shared between threads.

    A sheet on the grid's lattice (same CRS and pixel size, whole-pixel offset) is read directly; any
    other sheet through a WarpedVRT onto the grid. The first sheet (by name) with data wins a pixel.
    """

    def __init__(self, meta: dict[str, Any], role: str, transform: Affine) -> None:
        self._crs = CRS.from_wkt(meta["crs"])
        self._bands = list(meta["bands"])
        self._dtype = meta["dtype"]
        self._scale16 = tuple(meta["scale16"]) if meta["scale16"] else None
        self._resampling = Resampling[meta["resampling"]]
        self._transform = transform
        self._sheets = meta["epochs"][role]["sheets"]
        inv = ~transform
        grid = (0, 0, int(meta["width"]), int(meta["height"]))
        self._footprints: list[Win | None] = []
        self._direct: list[tuple[int, int] | None] = []
        for s in self._sheets:
            direct = _lattice_offset(s, self._crs, transform)
            self._direct.append(direct)
            x0, y0, x1, y1 = s["bounds"]
            if direct is not None:  # same CRS: bounds are the sheet's own, whole pixels on the grid
                size = (round((x1 - x0) / transform.a), round((y1 - y0) / -transform.e))
                self._footprints.append(_intersect((*direct, *size), grid))
                continue
            cols, rows = zip(*(inv * (x, y) for x, y in ((x0, y0), (x0, y1), (x1, y0), (x1, y1))), strict=True)
            c0, r0 = math.floor(min(cols)) - 1, math.floor(min(rows)) - 1
            fp = (c0, r0, math.ceil(max(cols)) + 1 - c0, math.ceil(max(rows)) + 1 - r0)
            self._footprints.append(_intersect(fp, grid))
        self._stack = ExitStack()
        self._vrts: dict[int, tuple[Any, int | None]] = {}

    def _vrt(self, i: int) -> tuple[Any, int | None]:
        """The sheet's reader on the grid: the sheet itself (on the lattice) or a WarpedVRT, and its alpha."""
        if i not in self._vrts:
            sheet, fp = self._sheets[i], self._footprints[i]
            assert fp is not None  # noqa: S101 - only called for sheets that cover the grid
            # close() rather than the datasets' context managers: those push a GDAL environment on the
            # opening thread, and close() may run on another thread.
            src = rasterio.open(sheet["path"])
            self._stack.callback(src.close)
            if self._direct[i] is not None:
                self._vrts[i] = (src, None)
                return self._vrts[i]
            alpha = sheet["alpha"]
            vrt = WarpedVRT(
                src,
                crs=self._crs,
                transform=self._transform * Affine.translation(fp[0], fp[1]),
                width=fp[2],
                height=fp[3],
                resampling=self._resampling,
                add_alpha=alpha is None,
            )
            self._stack.callback(vrt.close)
            self._vrts[i] = (vrt, alpha if alpha is not None else vrt.count)
        return self._vrts[i]

    def read(self, win: Win, *, data: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """Return ((c, h, w) float32 in [0, 1] or None, (h, w) bool mask) for ``win`` on the grid."""
        _, _, w, h = win
        out = np.zeros((len(self._bands), h, w), np.float32) if data else None
        mask = np.zeros((h, w), bool)
        for i, fp in enumerate(self._footprints):
            inter = _intersect(win, fp) if fp is not None else None
            if inter is None:
                continue
            origin = self._direct[i] or fp
            sub = Window(inter[0] - origin[0], inter[1] - origin[1], inter[2], inter[3])  # type: ignore[index]
            try:
                reader, alpha = self._vrt(i)
                if alpha is None:  # on the lattice: read the sheet and its GDAL mask directly
                    ok = reader.dataset_mask(window=sub) > 127
                    pix = reader.read(self._bands, window=sub) if data else None
                else:
                    arr = reader.read([*self._bands, alpha] if data else [alpha], window=sub)
                    ok, pix = arr[-1] > 127, arr[:-1]
            except RasterioError as exc:
                raise CorruptFileError(
                    f"{self._sheets[i]['path']}: read failed at grid window {inter!r} ({_first_line(exc)}); "
                    "re-export the sheet or rerun 'scarwatch align'"
                ) from exc
            ys = slice(inter[1] - win[1], inter[1] - win[1] + inter[3])
            xs = slice(inter[0] - win[0], inter[0] - win[0] + inter[2])
            new = ok & ~mask[ys, xs]
            if out is not None and pix is not None and new.any():
                np.copyto(out[:, ys, xs], _to_unit(pix, self._dtype, self._scale16), where=new)
            mask[ys, xs] |= ok
        return out, mask

    def close(self) -> None:
        self._stack.close()
        self._vrts.clear()


# ---------------------------------------------------------------------------------------------------
# The aligned pair


class AlignedPair:
    """Read windows of an aligned pair: [prev, curr] on one grid, prev shifted and histogram-matched.

    Open with :meth:`open` (a context manager). Datasets are opened lazily, one set per thread, so a
    reader thread pool may share one instance; pickling keeps only the folder and the parsed
    ``pair.json``, so a dask worker reopens the sheets itself.
    """

    def __init__(self, meta: dict[str, Any], out_dir: Path | None = None) -> None:
        self._meta = _absolute_sheet_paths(meta, out_dir)
        self.out_dir = out_dir
        self.crs = CRS.from_wkt(meta["crs"])
        self.transform = Affine(*meta["transform"][:6])
        self.width = int(meta["width"])
        self.height = int(meta["height"])
        self.count = len(meta["bands"])
        self.res = float(meta["res"])
        self.month = str(meta["month"])
        self.prev = str(meta["prev"])
        self.shift_px = (float(meta["shift_px"][0]), float(meta["shift_px"][1]))
        luts = meta.get("luts")
        self._luts = np.asarray(luts["prev"], dtype=np.float64) if luts else None
        self._init_handles()

    def _init_handles(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[ExitStack] = []

    @classmethod
    def open(cls, out_dir: str | Path) -> AlignedPair:
        """Open the aligned pair that :func:`align_pair` wrote to ``out_dir``."""
        out_dir = Path(out_dir)
        path = out_dir / "pair.json"
        if not path.is_file() or not (out_dir / "valid.tif").is_file():
            raise MissingInputError(f"{out_dir}: no aligned pair (pair.json, valid.tif); run 'scarwatch align' first")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            return cls(meta, out_dir)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{path}: not a readable aligned pair ({exc!r}); rerun 'scarwatch align'") from exc

    def __enter__(self) -> AlignedPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every dataset any thread opened (they reopen lazily on the next read)."""
        with self._lock:
            stacks, self._opened = self._opened, []
            self._local = threading.local()
        for stack in stacks:
            stack.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"meta": self._meta, "out_dir": self.out_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["meta"], state["out_dir"])  # type: ignore[misc]

    def _handles(self) -> tuple[_Mosaic, _Mosaic, Any]:
        h = getattr(self._local, "h", None)
        if h is None:
            stack = ExitStack()
            prev = _Mosaic(self._meta, "prev", self.transform * Affine.translation(*self.shift_px))
            curr = _Mosaic(self._meta, "curr", self.transform)
            stack.callback(prev.close)
            stack.callback(curr.close)
            valid = None
            if self.out_dir is not None:
                valid = rasterio.open(self.out_dir / "valid.tif")
                stack.callback(valid.close)
            h = (prev, curr, valid)
            self._local.h = h
            with self._lock:
                self._opened.append(stack)
        return h  # type: ignore[no-any-return]

    def _grid_part(self, window: Window) -> tuple[Win, Win | None]:
        win = _as_win(window)
        if win[2] <= 0 or win[3] <= 0:
            raise ValueError(f"window {window!r} is empty")
        return win, _intersect(win, (0, 0, self.width, self.height))

    def read_valid(self, window: Window) -> np.ndarray:
        """(h, w) bool: valid in both epochs, from valid.tif (False outside the grid)."""
        win, inner = self._grid_part(window)
        out = np.zeros((win[3], win[2]), bool)
        valid = self._handles()[2]
        if inner is None or valid is None:
            return out
        arr = valid.read(1, window=Window(*inner))
        out[inner[1] - win[1] : inner[1] - win[1] + inner[3], inner[0] - win[0] : inner[0] - win[0] + inner[2]] = (
            arr > 127
        )
        return out

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Images float32 (2, count, h, w) in [0, 1] as [prev, curr] and valid bool (h, w) for ``window``."""
        win, _ = self._grid_part(window)
        prev_m, curr_m, valid_ds = self._handles()
        prev, pmask = prev_m.read(win)
        curr, cmask = curr_m.read(win)
        assert prev is not None and curr is not None  # noqa: S101 - data=True always returns arrays
        if self._luts is not None:
            prev = coregister.apply_luts(prev, self._luts).astype(np.float32)
        valid = pmask & cmask
        if valid_ds is not None:
            valid &= self.read_valid(window)
        return np.stack([prev, curr]), valid

    def _read_masks(self, win: Win) -> tuple[np.ndarray, np.ndarray]:
        prev_m, curr_m, _ = self._handles()
        return prev_m.read(win, data=False)[1], curr_m.read(win, data=False)[1]


# ---------------------------------------------------------------------------------------------------
# Aligning


def _grid(prev: _Epoch, curr: _Epoch, settings: AlignSettings) -> tuple[CRS, Affine, int, int, dict[str, list]]:
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
    res = settings.resolution or float(f"{min(res_by.values()):.6g}")
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
    return dst_crs, Affine(res, 0.0, gx0, 0.0, -res, gy1), width, height, boxes


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
        for r in range(0, pair.height, PASS_BLOCK):
            for c in range(0, pair.width, PASS_BLOCK):
                win = (c, r, min(PASS_BLOCK, pair.width - c), min(PASS_BLOCK, pair.height - r))
                pm, cm = pair._read_masks(win)
                both = pm & cm
                counts[0] += int(pm.sum())
                counts[1] += int(cm.sum())
                counts[2] += int(both.sum())
                dst.write((both * np.uint8(255))[None], window=Window(*win))
    rasterio.shutil.copy(
        raw, tmp / "valid.tif", driver="COG", compress="DEFLATE", blocksize=512, overview_resampling="nearest"
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


def _absolute_sheet_paths(meta: dict[str, Any], out_dir: Path | None) -> dict[str, Any]:
    """A copy of ``meta`` whose sheet paths (stored relative to the pair's folder) are absolute."""
    if out_dir is None:
        return meta
    base = Path(out_dir).resolve()
    epochs = {
        role: {**ep, "sheets": [{**sh, "path": os.path.normpath(base / sh["path"])} for sh in ep["sheets"]]}
        for role, ep in meta["epochs"].items()
    }
    return {**meta, "epochs": epochs}


def align_pair(
    prev_dir: Path,
    curr_dir: Path,
    out_dir: Path,
    settings: AlignSettings,
    *,
    month: str,
    prev: str,
) -> AlignSummary:
    """Align the previous epoch onto the current one's grid and write the pair description.

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
        return _align(Path(prev_dir), Path(curr_dir), Path(out_dir), settings, month=month, prev=prev)


def _align(
    prev_dir: Path, curr_dir: Path, out_dir: Path, settings: AlignSettings, *, month: str, prev: str
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
    dst_crs, transform, width, height, boxes = _grid(prev_ep, curr_ep, settings)
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
        "bands": list(settings.bands),
        "dtype": curr_ep.dtype,
        "scale16": list(settings.scale16) if settings.scale16 else None,
        "resampling": settings.resampling,
        "shift_px": [0.0, 0.0],
        "luts": None,
        "epochs": {
            "prev": _sheet_meta(prev_ep, boxes["prev"], out_dir),
            "curr": _sheet_meta(curr_ep, boxes["curr"], out_dir),
        },
    }
    windows = coregister.sample_windows(width, height, per_axis=SAMPLE_BLOCKS)
    with AlignedPair(_absolute_sheet_paths(meta, out_dir)) as raw_pair:
        before, samples = coregister.measure_blocks(raw_pair.read, windows, max_shift_px=settings.max_shift_px)
    shift = coregister.robust_shift(before) if settings.coregister else None
    if settings.coregister and shift is None:
        log.warning("too few textured blocks to co-register %s onto %s; no shift applied", prev_dir, curr_dir)
    after = before
    if shift is not None:
        meta["shift_px"] = [round(shift[0], 4), round(shift[1], 4)]
        with AlignedPair(_absolute_sheet_paths(meta, out_dir)) as shifted:
            after, samples = coregister.measure_blocks(shifted.read, windows, max_shift_px=settings.max_shift_px)
        log.info("co-registration shift applied to prev: dx=%.3f dy=%.3f px", *meta["shift_px"])
    if settings.normalize and samples:
        levels = 256 if curr_ep.dtype == "uint8" else 1024
        luts = coregister.luts_from_samples(samples, levels=levels, max_pixels=HIST_SAMPLE)
        meta["luts"] = {"levels": levels, "prev": np.round(luts, 6).tolist()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with AlignedPair(_absolute_sheet_paths(meta, out_dir)) as pair:
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
            **qa,
        }
        residual = qa["residual_after_median_px"] if settings.coregister else qa["residual_before_median_px"]
        (tmp / "pair.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
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
