"""The inspector map's imagery as a local XYZ tile pyramid (WebP or JPEG, 256 px, both epochs).

:func:`build_pyramid` writes ``<out>/{prev,curr}/{z}/{x}/{y}.<ext>`` plus ``tiles.json`` (the contract the
map reads, :func:`read_pyramid`) from an aligned pair: the deepest zoom is the first whose Web-Mercator
pixel on the ground is at most the pair's own pixel (native), lower zooms down to one or two tiles over
the extent. Only the deepest zoom reads the pair, in metatiles of ``tile_meta`` × ``tile_meta`` tiles
(one window read and one warp per metatile, never the full raster); every lower zoom is built from its four
children (a 2×2 box filter, the pyramid's own overviews). Metatiles and parent tiles are made by a thread
pool (rasterio, the warp and the encoders release the GIL). The folder is written beside itself and swapped
in whole (:func:`pipeline.fileio.replace_dir`), so a failed run leaves the last pyramid. It is its own
DVC stage (``map_tiles@month``): a ledger change rebuilds the map page only, never the tiles.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import MapSettings
from pipeline.errors import CorruptFileError, InputError, MissingInputError
from pipeline.fileio import replace_dir

log = logging.getLogger(__name__)

TILES_JSON = "tiles.json"
"""The pyramid's description, in the pyramid's folder."""
TILES_FORMAT = "scarwatch-xyz/1"
TILE_PX = 256
EPOCHS = ("prev", "curr")
BACKGROUND = (217, 217, 212)
"""Pixels outside the valid area (the map's background colour)."""
_HALF = 20037508.342789244  # half the Web Mercator world, metres
_C = 2 * _HALF / TILE_PX  # metres per pixel at zoom 0 on the equator


@dataclass(frozen=True)
class Pyramid:
    """A written tile pyramid, as the map reads it (``tiles.json``)."""

    path: Path
    month: str
    prev: str
    minzoom: int
    maxzoom: int
    bounds: tuple[float, float, float, float]  # west, south, east, north (EPSG:4326)
    ext: str
    n_tiles: int
    n_bytes: int

    def url(self, epoch: str, base: Path) -> str:
        """The Leaflet URL template of ``epoch`` relative to the folder ``base`` (where the page lies)."""
        rel = os.path.relpath(Path(self.path).resolve(), Path(base).resolve()).replace(os.sep, "/")
        return f"{rel}/{epoch}/{{z}}/{{x}}/{{y}}.{self.ext}"


@dataclass(frozen=True)
class PyramidSummary:
    """What :func:`build_pyramid` wrote."""

    pyramid: Pyramid
    seconds: float
    workers: int


# --------------------------------------------------------------------------------------------- tile maths


def _tile_range(bounds: tuple[float, float, float, float], z: int) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 (inclusive) of the XYZ tiles at zoom ``z`` that touch ``bounds`` (EPSG:4326)."""
    west, south, east, north = bounds
    n = 2**z

    def tx(lon: float) -> int:
        return min(n - 1, max(0, math.floor((lon + 180.0) / 360.0 * n)))

    def ty(lat: float) -> int:
        rad = math.radians(max(-85.05112878, min(85.05112878, lat)))
        return min(n - 1, max(0, math.floor((1.0 - math.asinh(math.tan(rad)) / math.pi) / 2.0 * n)))

    return tx(west), ty(north), tx(east), ty(south)


def _tile_origin(x: int, y: int, z: int) -> tuple[float, float, float]:
    """Upper-left corner (EPSG:3857 metres) and pixel size of tile ``x, y`` at zoom ``z``."""
    size = 2 * _HALF / 2**z
    return -_HALF + x * size, _HALF - y * size, size / TILE_PX


def native_zoom(res_m: float, lat: float) -> int:
    """The first zoom whose pixel on the ground (at ``lat``) is no larger than ``res_m``."""
    if res_m <= 0:
        raise ValueError(f"pixel size must be positive, got {res_m!r}")
    return max(0, math.ceil(math.log2(_C * math.cos(math.radians(lat)) / res_m) - 1e-9))


def zoom_range(pair: Any, bounds: tuple[float, float, float, float], settings: MapSettings) -> tuple[int, int]:
    """(minzoom, maxzoom) of the pyramid of ``pair`` over ``bounds``: native at the deepest (or the cap)."""
    lat = (bounds[1] + bounds[3]) / 2
    zmax = native_zoom(float(pair.transform.a), lat)
    if settings.tiles_max_zoom is not None:
        zmax = min(zmax, settings.tiles_max_zoom)
    zmin = zmax
    while zmin > 0:
        x0, y0, x1, y1 = _tile_range(bounds, zmin)
        if max(x1 - x0, y1 - y0) < 2:
            break
        zmin -= 1
    return zmin, zmax


# --------------------------------------------------------------------------------------------- writing


def _encode(rgb: np.ndarray, ext: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if ext == "webp":
        Image.fromarray(rgb).save(buf, format="WEBP", quality=quality, method=2)
    else:
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write(root: Path, epoch: str, z: int, x: int, y: int, ext: str, data: bytes) -> int:
    folder = root / epoch / str(z) / str(x)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{y}.{ext}").write_bytes(data)
    return len(data)


class _Meta:
    """Warps one metatile of the deepest zoom from the pair and writes its tiles."""

    def __init__(self, pair: Any, root: Path, z: int, rng: tuple[int, int, int, int], settings: MapSettings) -> None:
        from pyproj import Transformer
        from rasterio.crs import CRS

        self.pair, self.root, self.z, self.rng = pair, root, z, rng
        self.ext, self.quality, self.meta = settings.tiles_format, settings.tiles_quality, settings.tiles_meta
        self.src_crs = CRS.from_user_input(pair.crs)
        self.to_grid = Transformer.from_crs(3857, self.src_crs, always_xy=True)
        blank = np.empty((TILE_PX, TILE_PX, 3), np.uint8)
        blank[:] = BACKGROUND
        self.blank = _encode(blank, self.ext, self.quality)

    def _window(self, left: float, top: float, size: float) -> Any:
        """The grid window (clipped, padded by 2 px) that covers a square of EPSG:3857, or None."""
        from rasterio.windows import Window

        xs = np.linspace(left, left + size, 9)
        ys = np.linspace(top - size, top, 9)
        gx, gy = np.meshgrid(xs, ys)
        px, py = self.to_grid.transform(gx.ravel(), gy.ravel())
        cols, rows = ~self.pair.transform * (np.asarray(px), np.asarray(py))
        c0, r0 = max(0, math.floor(np.min(cols)) - 2), max(0, math.floor(np.min(rows)) - 2)
        c1, r1 = min(self.pair.width, math.ceil(np.max(cols)) + 2), min(self.pair.height, math.ceil(np.max(rows)) + 2)
        if c1 - c0 < 1 or r1 - r0 < 1:
            return None
        return Window(c0, r0, c1 - c0, r1 - r0)

    def __call__(self, mx: int, my: int) -> tuple[int, int]:
        from affine import Affine
        from rasterio.crs import CRS
        from rasterio.enums import Resampling
        from rasterio.warp import reproject

        x0, y0, x1, y1 = self.rng
        tx0, ty0 = x0 + mx * self.meta, y0 + my * self.meta
        nx, ny = min(self.meta, x1 - tx0 + 1), min(self.meta, y1 - ty0 + 1)
        left, top, px = _tile_origin(tx0, ty0, self.z)
        win = self._window(left, top, px * TILE_PX * max(nx, ny))
        n = b = 0
        tiles: list[np.ndarray] | None = None
        if win is not None:
            images, valid = self.pair.read(win)
            src_transform = self.pair.transform * Affine.translation(win.col_off, win.row_off)
            dst_transform = Affine(px, 0, left, 0, -px, top)
            shape = (ny * TILE_PX, nx * TILE_PX)
            warp = {
                "src_transform": src_transform,
                "src_crs": self.src_crs,
                "dst_transform": dst_transform,
                "dst_crs": CRS.from_epsg(3857),
            }
            mask = np.zeros(shape, np.uint8)
            reproject(np.asarray(valid, np.uint8), mask, resampling=Resampling.nearest, **warp)
            tiles = []
            for k in (0, 1):
                src = np.asarray(images[k], np.float32)
                src = src[:3] if src.shape[0] >= 3 else np.repeat(src[:1], 3, axis=0)
                src8 = (np.clip(np.nan_to_num(src), 0, 1) * 255 + 0.5).astype(np.uint8)
                dst = np.zeros((3, *shape), np.uint8)
                reproject(src8, dst, resampling=Resampling.bilinear, **warp)
                rgb = dst.transpose(1, 2, 0).copy()
                rgb[mask == 0] = BACKGROUND
                tiles.append(rgb)
            if not mask.any():
                tiles = None
        for j in range(ny):
            for i in range(nx):
                for e, epoch in enumerate(EPOCHS):
                    if tiles is None:
                        data = self.blank
                    else:
                        data = _encode(
                            tiles[e][j * TILE_PX : (j + 1) * TILE_PX, i * TILE_PX : (i + 1) * TILE_PX],
                            self.ext,
                            self.quality,
                        )
                    b += _write(self.root, epoch, self.z, tx0 + i, ty0 + j, self.ext, data)
                    n += 1
        return n, b


def _parent(root: Path, z: int, x: int, y: int, ext: str, quality: int, blank: bytes) -> tuple[int, int]:
    """Tile ``x, y`` at zoom ``z`` from its four children at ``z + 1`` (missing children: background)."""
    from PIL import Image

    n = b = 0
    for epoch in EPOCHS:
        canvas = np.empty((2 * TILE_PX, 2 * TILE_PX, 3), np.uint8)
        canvas[:] = BACKGROUND
        any_child = False
        for dy in (0, 1):
            for dx in (0, 1):
                child = root / epoch / str(z + 1) / str(2 * x + dx) / f"{2 * y + dy}.{ext}"
                raw = child.read_bytes() if child.is_file() else blank
                if raw != blank:  # a blank child stays background without decoding it
                    with Image.open(io.BytesIO(raw)) as im:
                        canvas[dy * TILE_PX : (dy + 1) * TILE_PX, dx * TILE_PX : (dx + 1) * TILE_PX] = np.asarray(
                            im.convert("RGB")
                        )
                    any_child = True
        if any_child:
            small = np.asarray(Image.fromarray(canvas).reduce(2))
            data = _encode(small, ext, quality)
        else:
            data = blank
        b += _write(root, epoch, z, x, y, ext, data)
        n += 1
    return n, b


def _run(
    pool: ThreadPoolExecutor | None, fn: Callable[..., tuple[int, int]], jobs: Iterable[tuple[Any, ...]]
) -> tuple[int, int]:
    results = pool.map(lambda a: fn(*a), jobs) if pool is not None else (fn(*a) for a in jobs)
    n = b = 0
    for dn, db in results:
        n, b = n + dn, b + db
    return n, b


def build_pyramid(pair: Any, out_dir: Path, settings: MapSettings, *, month: str | None = None) -> PyramidSummary:
    """Write the tile pyramid of an open aligned pair to ``out_dir`` (replaced whole on success).

    Args:
        pair: an open aligned pair (``crs``, ``transform``, ``width``, ``height``, ``read(window)``,
            ``month``, ``prev``).
        out_dir: the pyramid's folder (beside the map page: ``<reports>/maps/<month>_tiles``).
        settings: ``tiles_format``, ``tiles_quality``, ``tiles_meta``, ``tiles_max_zoom``, ``tiles_workers``.
        month: the month (default ``pair.month``).

    Returns:
        The pyramid written, its build time and worker count.

    Raises:
        InputError: the pair has no pixels.
    """
    from rasterio.crs import CRS
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    start = time.perf_counter()
    if pair.width < 1 or pair.height < 1:
        raise InputError(f"aligned pair of {pair.width}x{pair.height} px has no pixels to tile")
    month = str(month or getattr(pair, "month", ""))
    left, bottom, right, top = array_bounds(pair.height, pair.width, pair.transform)
    bounds = transform_bounds(CRS.from_user_input(pair.crs), "EPSG:4326", left, bottom, right, top, densify_pts=21)
    zmin, zmax = zoom_range(pair, bounds, settings)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = settings.tiles_workers or os.cpu_count() or 1
    meta = _Meta(pair, tmp, zmax, _tile_range(bounds, zmax), settings)
    try:
        with ThreadPoolExecutor(workers) if workers > 1 else _nullpool() as pool:
            x0, y0, x1, y1 = meta.rng
            jobs = [
                (mx, my)
                for my in range(math.ceil((y1 - y0 + 1) / meta.meta))
                for mx in range(math.ceil((x1 - x0 + 1) / meta.meta))
            ]
            n, b = _run(pool, meta, jobs)
            log.info("tiles: zoom %d, %d metatiles, %d tiles", zmax, len(jobs), n)
            for z in range(zmax - 1, zmin - 1, -1):
                x0, y0, x1, y1 = _tile_range(bounds, z)
                parents = [
                    (tmp, z, x, y, meta.ext, meta.quality, meta.blank)
                    for y in range(y0, y1 + 1)
                    for x in range(x0, x1 + 1)
                ]
                dn, db = _run(pool, _parent, parents)
                n, b = n + dn, b + db
        pyramid = Pyramid(out_dir, month, str(getattr(pair, "prev", "")), zmin, zmax, tuple(bounds), meta.ext, n, b)
        _write_json(tmp, pyramid)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    log.info("tile pyramid %s: zoom %d-%d, %d tiles, %.1f MB in %.1f s", str(out_dir), zmin, zmax, n, b / 1e6, seconds)
    return PyramidSummary(pyramid, seconds, workers)


class _nullpool:  # noqa: N801 - a stand-in for the executor's context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _write_json(folder: Path, p: Pyramid) -> None:
    doc = {
        "format": TILES_FORMAT,
        "month": p.month,
        "prev": p.prev,
        "minzoom": p.minzoom,
        "maxzoom": p.maxzoom,
        "bounds": list(p.bounds),
        "ext": p.ext,
        "tile_px": TILE_PX,
        "epochs": list(EPOCHS),
        "n_tiles": p.n_tiles,
        "n_bytes": p.n_bytes,
    }
    (folder / TILES_JSON).write_text(json.dumps(doc, indent=1), encoding="utf-8")


def read_pyramid(path: Path) -> Pyramid:
    """The pyramid :func:`build_pyramid` wrote to ``path``.

    Raises:
        MissingInputError: no ``tiles.json`` there.
        CorruptFileError: ``tiles.json`` is not a pyramid description.
    """
    path = Path(path)
    doc_path = path / TILES_JSON
    if not doc_path.is_file():
        raise MissingInputError(f"{path}: no tile pyramid ({TILES_JSON}); run 'scarwatch map-tiles' first")
    try:
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
        if doc.get("format") != TILES_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {TILES_FORMAT!r}")
        return Pyramid(
            path,
            str(doc["month"]),
            str(doc["prev"]),
            int(doc["minzoom"]),
            int(doc["maxzoom"]),
            tuple(float(v) for v in doc["bounds"]),  # type: ignore[arg-type]
            str(doc["ext"]),
            int(doc["n_tiles"]),
            int(doc["n_bytes"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{doc_path}: not a tile pyramid ({exc}); rerun 'scarwatch map-tiles'") from exc
