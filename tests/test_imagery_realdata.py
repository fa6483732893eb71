"""Aligning real imagery from ../shared/data: xBD Santa Rosa sheets and a NAIP 4-band series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window, from_bounds
from scipy.ndimage import map_coordinates

from pipeline.config import AlignSettings
from pipeline.imagery import align_pair
from pipeline.pair import AlignedPair
from pipeline.tiling import build_tiles

pytestmark = pytest.mark.realdata

XBD_CLUSTER = 4  # tiles 00000021 (SW), 00000028 (SE) and 00000099 (NW): an L of three 459 m sheets
XBD_IDS = ["00000021", "00000028", "00000099"]
NAIP = "naip-timeseries/m_4709963_se_14_1_{}.tif"


def _link_epochs(root: Path, sources: dict[str, list[Path]]) -> None:
    """Epoch folders of symlinks to the shared files (the data is never copied)."""
    for epoch, paths in sources.items():
        (root / epoch).mkdir(parents=True)
        for src in paths:
            (root / epoch / src.name).symlink_to(src.resolve())


def _xbd_tiles(shared: Path) -> pd.DataFrame:
    table = pd.read_csv(shared / "xbd-santa-rosa" / "tiles.csv", dtype={"id": str})
    tiles = table[table["id"].isin(XBD_IDS)].set_index("id").loc[XBD_IDS]
    assert (tiles["cluster_id"] == XBD_CLUSTER).all()
    return tiles


def _on_grid(pair: AlignedPair, bounds: tuple[float, float, float, float]) -> Window:
    win = from_bounds(*bounds, transform=pair.transform)
    return Window(round(win.col_off), round(win.row_off), round(win.width), round(win.height))


def test_xbd_cluster_grid_masks_labels_and_tiles(shared_data: Path, tmp_path: Path) -> None:
    xbd = shared_data / "xbd-santa-rosa"
    tiles = _xbd_tiles(shared_data)
    _link_epochs(tmp_path, {e: [xbd / e / f"{i}.tif" for i in XBD_IDS] for e in ("pre", "post")})
    settings = AlignSettings(coregister=False)  # type: ignore[call-arg]
    s = align_pair(tmp_path / "pre", tmp_path / "post", tmp_path / "out", settings, month="2017-10", prev="2017-06")

    # Grid: the union of the three tiles on the 0.5 m lattice.
    minx, miny, maxx, maxy = tiles["minx"].min(), tiles["miny"].min(), tiles["maxx"].max(), tiles["maxy"].max()
    assert (minx, miny, maxx, maxy) == (523033.5, 4259527.5, 523951.5, 4260445.5)
    assert (s.width, s.height, s.res, s.crs) == (1836, 1836, 0.5, "EPSG:32610")
    pair = AlignedPair.open(tmp_path / "out")
    assert pair.transform == Affine(0.5, 0.0, minx, 0.0, -0.5, maxy)

    # Valid mask: exactly where some pre tile and some post tile has data (their internal masks).
    expected = {e: np.zeros((s.height, s.width), bool) for e in ("pre", "post")}
    for tid in XBD_IDS:
        for e in ("pre", "post"):
            with rasterio.open(xbd / e / f"{tid}.tif") as src:
                win = _on_grid(pair, tuple(src.bounds))
                rows = slice(win.row_off, win.row_off + win.height)
                cols = slice(win.col_off, win.col_off + win.width)
                expected[e][rows, cols] |= src.dataset_mask() > 0
    both = expected["pre"] & expected["post"]
    valid = pair.read_valid(Window(0, 0, s.width, s.height))
    assert int((valid != both).sum()) == 0
    assert s.valid_fraction == pytest.approx(both.mean(), abs=1e-9)
    assert 0.74 < s.valid_fraction < 0.76  # three of four quadrants, less the xBD fill

    # Labels read through the same grid: every destroyed pixel of each tile lands in that tile's window.
    images, valid = pair.read(Window(0, 0, s.width, s.height))
    destroyed = np.zeros((s.height, s.width), bool)
    for tid, row in tiles.iterrows():
        win = _on_grid(pair, (row["minx"], row["miny"], row["maxx"], row["maxy"]))
        with (
            rasterio.open(xbd / "labels" / f"{tid}_destroyed.tif") as lab,
            WarpedVRT(
                lab,
                crs=pair.crs,
                transform=pair.transform,
                width=pair.width,
                height=pair.height,
                resampling=Resampling.nearest,
            ) as vrt,
        ):
            assert int((vrt.read(1, window=win) == 1).sum()) == row["changed_pixels"]
            destroyed |= vrt.read(1) == 1
    assert 0.99 < destroyed.sum() / tiles["changed_pixels"].sum() <= 1.0  # tiles share one-pixel seams
    assert valid[destroyed].mean() > 0.99
    # Burnt-out buildings changed much more than the rest of the valid scene.
    change = np.abs(images[0] - images[1]).mean(axis=0)
    assert change[destroyed & valid].mean() > 1.5 * change[~destroyed & valid].mean()

    # Tiles: 512 px with 64 px overlap -> offsets 0, 448, 896, 1344 on each axis; the two tiles of the
    # empty NE quadrant's top row fall under min_valid.
    tile_list = build_tiles(pair, size=512, overlap=64, min_valid=0.05)
    ids = {t.tile_id for t in tile_list}
    assert len(tile_list) == 14 and {"r0000_c0002", "r0000_c0003"}.isdisjoint(ids)
    first = tile_list[0]
    assert (first.tile_id, first.bounds) == ("r0000_c0000", (minx, maxy - 256.0, minx + 256.0, maxy))
    last = tile_list[-1]
    assert (last.row_off, last.col_off, last.height, last.width) == (1344, 1344, 492, 492)
    for t in tile_list:
        sub = both[t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width]
        assert t.valid_fraction == pytest.approx(sub.mean(), abs=1e-6)
    pair.close()


def test_xbd_coregistration_reduces_residuals(shared_data: Path, tmp_path: Path) -> None:
    xbd = shared_data / "xbd-santa-rosa"
    _link_epochs(tmp_path, {e: [xbd / e / f"{i}.tif" for i in XBD_IDS] for e in ("pre", "post")})
    settings = AlignSettings()  # type: ignore[call-arg]
    s = align_pair(tmp_path / "pre", tmp_path / "post", tmp_path / "out", settings, month="2017-10", prev="2017-06")
    qa = json.loads((tmp_path / "out" / "qa.json").read_text())
    # xBD pre/post are off by about 1 m, at most about 3 m (README): at most 6 px at 0.5 m.
    assert 0.5 < np.hypot(*s.shift_px) <= 6.0
    assert qa["blocks_measured"] >= 10
    assert qa["residual_after_median_px"] < qa["residual_before_median_px"]
    assert qa["histogram_matching"] is True
    lut = np.array(json.loads((tmp_path / "out" / "pair.json").read_text())["luts"]["prev"])
    assert lut.shape == (3, 256) and (np.diff(lut, axis=1) >= 0).all()


def test_naip_reprojected_pixels_land_within_half_a_pixel(shared_data: Path, tmp_path: Path) -> None:
    prev_src, curr_src = shared_data / NAIP.format("20090818"), shared_data / NAIP.format("20100629")
    _link_epochs(tmp_path, {"prev": [prev_src], "curr": [curr_src]})
    settings = AlignSettings(target_crs="EPSG:32614", bands=(1, 2, 3, 4), normalize=False)  # type: ignore[call-arg]
    s = align_pair(tmp_path / "prev", tmp_path / "curr", tmp_path / "out", settings, month="2010-06", prev="2009-08")
    assert s.crs == "EPSG:32614" and s.res == 5.0
    assert abs(s.shift_px[0]) < 1.0 and abs(s.shift_px[1]) < 1.0  # the dates are georeferenced alike
    assert s.valid_fraction > 0.99

    with AlignedPair.open(tmp_path / "out") as pair, rasterio.open(curr_src) as src:
        assert pair.count == 4 and pair.crs.to_epsg() == 32614
        images, valid = pair.read(Window(0, 0, pair.width, pair.height))
        source = src.read().astype(np.float64)
        src_inv = ~src.transform
    rng = np.random.default_rng(0)
    rows = rng.integers(20, s.height - 20, 400)
    cols = rng.integers(20, s.width - 20, 400)
    keep = valid[rows, cols]
    rows, cols = rows[keep], cols[keep]
    xs, ys = pair.transform * (cols + 0.5, rows + 0.5)  # pixel centres in EPSG:32614
    to_src = Transformer.from_crs("EPSG:32614", "EPSG:26914", always_xy=True)
    sx, sy = to_src.transform(xs, ys)
    scol, srow = src_inv * (np.asarray(sx), np.asarray(sy))
    got = images[1][:, rows, cols] * 255  # current epoch: no shift, no histogram matching

    def error(dcol: float, drow: float) -> float:
        coords = np.stack([srow - 0.5 + drow, scol - 0.5 + dcol])
        want = np.stack([map_coordinates(band, coords, order=1) for band in source])
        return float(np.median(np.abs(got - want)))

    placed = error(0.0, 0.0)
    assert placed < 0.25  # DN: the same bilinear sample (a half-pixel error costs about 1.5 DN)
    assert placed < 0.5 * min(error(0.5, 0.0), error(0.0, 0.5), error(-0.5, 0.0), error(0.0, -0.5))
