"""The tile grid laid over an aligned pair, and its GeoParquet index.

A :class:`Tile` is a small frozen value: its id, grid position, pixel window, map bounds and the fraction
of its pixels valid in both epochs. The grid covers the whole raster, edges included: tiles step by
``size - overlap``; the last row and column are clipped at the raster edge (the detector pads them by
reflection). Ids are ``r<row>_c<col>`` of the grid position, so the same grid always gives the same ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import geopandas as gpd
import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from shapely.geometry import box

from pipeline.config import TileSettings
from pipeline.errors import CorruptFileError, InputError, MissingInputError
from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile of the grid: pixel window on the aligned grid plus its map bounds."""

    tile_id: str
    row: int
    col: int
    row_off: int
    col_off: int
    height: int
    width: int
    bounds: tuple[float, float, float, float]
    valid_fraction: float = 1.0

    @property
    def window(self) -> Window:
        """The tile's rasterio window on the aligned grid."""
        return Window(self.col_off, self.row_off, self.width, self.height)


class GridSource(Protocol):
    """What the tiler needs of an aligned pair: its grid and its valid mask."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    def read_valid(self, window: Window) -> np.ndarray:
        """Return the (h, w) bool mask of pixels valid in both epochs."""
        ...


def grid_offsets(extent: int, size: int, overlap: int) -> list[int]:
    """Offsets along one axis so that tiles of ``size`` with ``overlap`` cover ``[0, extent)``.

    >>> grid_offsets(1000, 512, 64)
    [0, 448, 896]
    """
    if extent <= 0:
        raise ValueError(f"extent must be positive, got {extent!r}")
    if not 0 <= 2 * overlap < size:
        raise ValueError(f"overlap {overlap!r} must be >= 0 and less than half of size {size!r}")
    stride = size - overlap
    n = max(1, math.ceil((extent - overlap) / stride)) if extent > size else 1
    return [i * stride for i in range(n)]


def make_grid(
    width: int,
    height: int,
    transform: Affine,
    *,
    size: int,
    overlap: int,
) -> list[Tile]:
    """Every tile of the grid over a ``width`` x ``height`` raster (valid fraction not yet known)."""
    tiles = []
    for r, row_off in enumerate(grid_offsets(height, size, overlap)):
        for c, col_off in enumerate(grid_offsets(width, size, overlap)):
            h = min(size, height - row_off)
            w = min(size, width - col_off)
            win = Window(col_off, row_off, w, h)
            tiles.append(
                Tile(
                    tile_id=f"r{r:04d}_c{c:04d}",
                    row=r,
                    col=c,
                    row_off=row_off,
                    col_off=col_off,
                    height=h,
                    width=w,
                    bounds=tuple(window_bounds(win, transform)),  # type: ignore[arg-type]
                )
            )
    return tiles


def build_tiles(source: GridSource, *, size: int, overlap: int, min_valid: float) -> list[Tile]:
    """Lay the grid over ``source`` and keep the tiles with at least ``min_valid`` valid pixels.

    Reads the valid mask one tile at a time, so memory is bounded by the tile size.
    """
    kept = []
    grid = make_grid(source.width, source.height, source.transform, size=size, overlap=overlap)
    for tile in grid:
        valid = source.read_valid(tile.window)
        frac = float(np.count_nonzero(valid)) / valid.size
        if frac >= min_valid and frac > 0:
            kept.append(_with_fraction(tile, frac))
    log.info("kept %d of %d tiles (min_valid=%r)", len(kept), len(grid), min_valid)
    return kept


def _with_fraction(tile: Tile, frac: float) -> Tile:
    return replace(tile, valid_fraction=round(frac, 6))


def tiles_to_frame(tiles: Iterable[Tile], crs: CRS | str) -> gpd.GeoDataFrame:
    """Tiles as a GeoDataFrame (one row a tile, geometry its bounds)."""
    rows = list(tiles)
    data = {
        "tile_id": [t.tile_id for t in rows],
        "row": np.array([t.row for t in rows], dtype="int32"),
        "col": np.array([t.col for t in rows], dtype="int32"),
        "row_off": np.array([t.row_off for t in rows], dtype="int64"),
        "col_off": np.array([t.col_off for t in rows], dtype="int64"),
        "height": np.array([t.height for t in rows], dtype="int32"),
        "width": np.array([t.width for t in rows], dtype="int32"),
        "valid_fraction": np.array([t.valid_fraction for t in rows], dtype="float64"),
    }
    geoms = [box(*t.bounds) for t in rows]
    return gpd.GeoDataFrame(data, geometry=geoms, crs=crs)


def write_tile_index(tiles: Iterable[Tile], crs: CRS | str, path: str | Path) -> Path:
    """Write the tile index as GeoParquet (with CRS), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tiles_to_frame(tiles, crs).to_parquet(tmp, index=False)
    return path


def read_tile_index(path: str | Path) -> tuple[list[Tile], CRS]:
    """Read a tile index written by :func:`write_tile_index`."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: tile index not found; run 'scarwatch tile' for this month first")
    try:
        frame = gpd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise CorruptFileError(f"{path}: not a readable GeoParquet tile index ({exc}); rerun 'scarwatch tile'") from exc
    if frame.crs is None:
        raise InputError(f"{path}: tile index has no CRS; rerun 'scarwatch tile'")
    tiles = [
        Tile(
            tile_id=str(r.tile_id),
            row=int(r.row),
            col=int(r.col),
            row_off=int(r.row_off),
            col_off=int(r.col_off),
            height=int(r.height),
            width=int(r.width),
            bounds=tuple(float(v) for v in r.geometry.bounds),  # type: ignore[arg-type]
            valid_fraction=float(r.valid_fraction),
        )
        for r in frame.itertuples(index=False)
    ]
    return tiles, CRS.from_user_input(frame.crs)


def iter_batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    """Consecutive batches of tiles, in grid order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    for i in range(0, len(tiles), batch_size):
        yield tiles[i : i + batch_size]


def tile_pair(pair_dir: str | Path, out_path: str | Path, settings: TileSettings) -> list[Tile]:
    """The ``tile`` stage: lay the grid over an aligned pair and write its GeoParquet index."""
    from pipeline.pair import AlignedPair  # the pair pulls in the warping stack; keep tiling light

    with AlignedPair.open(Path(pair_dir)) as pair:
        tiles = build_tiles(pair, size=settings.size, overlap=settings.overlap, min_valid=settings.min_valid)
        if not tiles:
            raise InputError(
                f"{pair_dir}: no tile has {settings.min_valid:.0%} valid pixels in both epochs; "
                "check the imagery's nodata or lower tile.min_valid"
            )
        write_tile_index(tiles, pair.crs, out_path)
    return tiles
