"""The map's tile pyramid: zoom range, coverage, windowed reads, the tiles.json contract, and the page using it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from maps_report_data import MONTH, XSS_PAYLOADS, FakePair, build_fixture_map
from PIL import Image

from pipeline.config import MapSettings
from pipeline.errors import CorruptFileError, MissingInputError
from pipeline.publish import maps
from pipeline.publish.tiles import TILES_JSON, _tile_range, build_pyramid, native_zoom, read_pyramid


def test_native_zoom_reaches_the_pixel() -> None:
    # Web Mercator pixel on the ground at zoom z: 156543 m * cos(lat) / 2**z
    assert native_zoom(0.5, 43.9) == 18  # Jilin at 0.5 m: 0.43 m at z18, 0.86 m at z17
    assert native_zoom(0.5, 0.0) == 19
    for res, lat in ((0.5, 43.9), (4.0, 43.9), (0.1, 30.0)):
        z = native_zoom(res, lat)
        ground = 156543.03392804097 * math.cos(math.radians(lat)) / 2**z
        assert ground <= res < 2 * ground
    with pytest.raises(ValueError, match="positive"):
        native_zoom(0.0, 10.0)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[FakePair, Path, object]:
    pair = FakePair()
    out = tmp_path_factory.mktemp("tiles") / f"{MONTH}_tiles"
    summary = build_pyramid(pair, out, MapSettings(tiles_workers=2, tiles_meta=2), month=MONTH)
    return pair, out, summary


def test_pyramid_covers_both_epochs_at_every_zoom(pyramid: tuple[FakePair, Path, object]) -> None:
    pair, out, summary = pyramid
    p = read_pyramid(out)
    assert p == summary.pyramid  # type: ignore[attr-defined]
    assert p.maxzoom == native_zoom(pair.res, 43.88) == 15 and p.minzoom < p.maxzoom
    assert p.prev == pair.prev and p.month == MONTH and p.ext == "webp"
    n = 0
    for z in range(p.minzoom, p.maxzoom + 1):
        x0, y0, x1, y1 = _tile_range(p.bounds, z)
        for epoch in ("prev", "curr"):
            files = sorted((out / epoch / str(z)).glob("*/*.webp"))
            assert len(files) == (x1 - x0 + 1) * (y1 - y0 + 1)  # no hole Leaflet would ask for
            n += len(files)
    assert n == p.n_tiles
    assert p.n_bytes == sum(f.stat().st_size for f in out.rglob("*.webp"))
    doc = json.loads((out / TILES_JSON).read_text())
    assert doc["format"] == "scarwatch-xyz/1" and doc["tile_px"] == 256


def test_tiles_show_the_change_and_the_background(pyramid: tuple[FakePair, Path, object]) -> None:
    _, out, _ = pyramid
    p = read_pyramid(out)
    z = p.maxzoom
    diffs, grey = [], 0
    for f in (out / "curr" / str(z)).glob("*/*.webp"):
        curr = np.asarray(Image.open(f).convert("RGB"), float)
        prev = np.asarray(Image.open(out / "prev" / f.relative_to(out / "curr")).convert("RGB"), float)
        assert curr.shape == (256, 256, 3)
        diffs.append(np.abs(curr - prev).max())
        grey += int((np.abs(curr - (217, 217, 212)).max(axis=2) < 6).sum())
    assert max(diffs) > 100  # a new roof is bright in the current epoch only
    assert grey > 0  # outside the grid and the invalid strip: the background colour


def test_only_windows_inside_the_grid_are_read_never_the_whole_raster(pyramid: tuple[FakePair, Path, object]) -> None:
    pair, _, _ = pyramid
    assert pair.reads
    for win in pair.reads:
        assert win.col_off >= 0 and win.row_off >= 0
        assert win.col_off + win.width <= pair.width and win.row_off + win.height <= pair.height
        assert win.width * win.height < pair.width * pair.height  # metatiles, not the full raster


def test_a_failed_build_keeps_the_last_pyramid(pyramid: tuple[FakePair, Path, object]) -> None:
    _, out, _ = pyramid
    before = read_pyramid(out)

    class Broken(FakePair):
        def read(self, window: object) -> tuple[np.ndarray, np.ndarray]:
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        build_pyramid(Broken(), out, MapSettings(tiles_workers=1), month=MONTH)
    assert read_pyramid(out) == before
    assert not list(out.parent.glob(".*tmp"))


def test_read_pyramid_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="run 'scarwatch map-tiles' first"):
        read_pyramid(tmp_path)
    (tmp_path / TILES_JSON).write_text('{"format": "other"}')
    with pytest.raises(CorruptFileError, match="not a tile pyramid"):
        read_pyramid(tmp_path)


def test_max_zoom_cap_and_jpeg(tmp_path: Path) -> None:
    summary = build_pyramid(FakePair(), tmp_path / "t", MapSettings(tiles_max_zoom=14, tiles_format="jpeg"))
    assert summary.pyramid.maxzoom == 14 and summary.pyramid.ext == "jpeg"
    assert list((tmp_path / "t" / "curr" / "14").glob("*/*.jpeg"))


def _page(root: Path, settings: MapSettings, *, tiles: bool, xss: bool = False) -> str:
    return build_fixture_map(root, settings, tiles=tiles, xss=xss).read_text(encoding="utf-8")


def test_the_page_links_its_pyramid_by_a_relative_path(tmp_path: Path) -> None:
    html = _page(tmp_path, MapSettings(), tiles=True)
    assert f'"{MONTH}_tiles/curr/{{z}}/{{x}}/{{y}}.webp"' in html
    assert f'"{MONTH}_tiles/prev/{{z}}/{{x}}/{{y}}.webp"' in html
    assert "image_overlay_" not in html  # no embedded overlay: the page stays small
    assert "<title>ScarWatch 2026-03" in html
    assert "L.Control.SideBySide" in html and "MiniMap" in html and "SW.init(" in html
    assert len(html) < 1_500_000


def test_single_file_mode_embeds_the_overlay(tmp_path: Path) -> None:
    html = _page(tmp_path, MapSettings(imagery="inline", overlay_max_px=128), tiles=False)
    assert "image_overlay_" in html and "_tiles/" not in html


def test_english_labels(tmp_path: Path) -> None:
    html = _page(tmp_path, MapSettings(language="en"), tiles=False)
    layers = maps.embedded_geojson(html)
    assert any(n.startswith("Flags 2026-03") for n in layers) and not any("本月" in n for n in layers)
    assert "<title>ScarWatch 2026-03 inspector map</title>" in html


def test_payloads_are_escaped_in_the_page(tmp_path: Path) -> None:
    html = _page(tmp_path, MapSettings(), tiles=False, xss=True)
    for payload in XSS_PAYLOADS[:3]:
        assert payload not in html  # never raw: not in popups (HTML-escaped), not in the scripts (\u003c)
    layers = maps.embedded_geojson(html)
    popups = " ".join(f["properties"].get("popup", "") for layer in layers.values() for f in layer["features"])
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in popups
    assert "&lt;img src=x onerror=alert(2)&gt;" in popups
    assert "javascript:alert(4)" in popups and 'href="javascript' not in popups
    names = [f["properties"]["name"] for f in layers["网格 Grid cells"]["features"]]
    assert any(XSS_PAYLOADS[0] in n for n in names)  # kept as data; the page's tooltip sets it as text
