"""Imagery for the inspector map: the downsampled image overlay and the before/after flag chips.

Both read an open aligned pair (``pipeline.imagery.AlignedPair``) window by window and return JPEG data
URLs, so the page needs no tile server: :func:`make_overlay` warps a block-mean of both epochs to Web
Mercator, :func:`make_chips` cuts a chip around each of the largest flags with its outline drawn.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np

from pipeline.config import MapSettings
from pipeline.errors import InputError
from pipeline.publish.maplayers import FLAG_COLORS

log = logging.getLogger(__name__)


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """(c, h, w) float in [0, 1] -> (h, w, 3) uint8; one band is shown grey, extra bands (NIR) dropped."""
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    return (np.clip(np.nan_to_num(rgb), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def _jpeg_data_url(rgb: np.ndarray, quality: int = 82) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _chip_window(bounds: tuple[float, float, float, float], pair: Any, margin: float) -> Any:
    """The pixel window around ``bounds`` (grid CRS) plus ``margin`` on each side, clipped to the grid."""
    from rasterio.windows import Window, from_bounds

    minx, miny, maxx, maxy = bounds
    pad = max(margin, 0.5 * max(maxx - minx, maxy - miny))
    win = from_bounds(minx - pad, miny - pad, maxx + pad, maxy + pad, transform=pair.transform)
    win = win.round_offsets().round_lengths()
    full = Window(0, 0, pair.width, pair.height)
    try:
        return win.intersection(full)
    except Exception:  # rasterio raises WindowError when they do not overlap
        return None


def _resize_nearest(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    rows = np.minimum((np.arange(max(1, round(h * scale))) / scale).astype(int), h - 1)
    cols = np.minimum((np.arange(max(1, round(w * scale))) / scale).astype(int), w - 1)
    return rgb[rows][:, cols]


def _draw_outline(chip: np.ndarray, geom: Any, win: Any, transform: Any, color: str) -> np.ndarray:
    """Draw the flag's rings onto a chip of ``win`` (grid pixels) resized to ``chip``'s shape."""
    from PIL import Image, ImageDraw

    sx, sy = chip.shape[1] / win.width, chip.shape[0] / win.height
    inverse = ~transform
    image = Image.fromarray(chip)
    draw = ImageDraw.Draw(image)
    for part in getattr(geom, "geoms", [geom]):
        for ring in (part.exterior, *part.interiors):
            points = []
            for x, y in ring.coords:
                col, row = inverse * (x, y)
                points.append(((col - win.col_off) * sx, (row - win.row_off) * sy))
            draw.line(points, fill=color, width=max(1, chip.shape[1] // 96))
    return np.asarray(image)


def make_chips(
    pair: Any,
    flags: gpd.GeoDataFrame,
    settings: MapSettings,
    *,
    id_column: str = "flag_id",
    colors: dict[str, str] | None = None,
) -> dict[str, tuple[str, str]]:
    """Before/after JPEG chips (data URLs) of the largest flags (or cases), keyed by their id.

    Args:
        pair: an open aligned pair (``crs``, ``transform``, ``width``, ``height``, ``read(window)``).
        flags: flags (or cases, with ``id_column="case_id"``) in the pair's CRS, with ``area_m2``.
        settings: chip size and count.
        id_column: the id column.
        colors: outline colour per id (default: the flag kind's colour).

    Returns:
        ``{id: (prev_url, curr_url)}`` for at most ``settings.max_chips`` rows.
    """
    chips: dict[str, tuple[str, str]] = {}
    order = flags.sort_values("area_m2", ascending=False).head(settings.max_chips)
    kinds = order["kind"] if "kind" in order.columns else [""] * len(order)
    for flag_id, kind, geom in zip(order[id_column].astype(str), kinds, order.geometry, strict=True):
        if geom is None or geom.is_empty:
            continue
        color = (colors or {}).get(flag_id) or FLAG_COLORS.get(str(kind), "#000000")
        win = _chip_window(geom.bounds, pair, settings.chip_margin_m)
        if win is None or win.width < 2 or win.height < 2:
            continue
        images, valid = pair.read(win)
        urls = []
        for epoch in (0, 1):
            rgb = _to_uint8_rgb(np.asarray(images[epoch]))
            rgb[~np.asarray(valid, dtype=bool)] = 200
            chip = _resize_nearest(rgb, settings.chip_px)
            urls.append(_jpeg_data_url(_draw_outline(chip, geom, win, pair.transform, color)))
        chips[flag_id] = (urls[0], urls[1])
    log.info("made before/after chips for %d of %d flags", len(chips), len(flags))
    return chips


def _iter_strips(height: int, rows: int) -> Iterator[tuple[int, int]]:
    for top in range(0, height, rows):
        yield top, min(rows, height - top)


def _downsample(pair: Any, max_px: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Block-mean both epochs to at most ``max_px`` on the long side, reading strip by strip.

    Returns:
        (images uint8 (2, h, w, 3), valid bool (h, w), factor).
    """
    from rasterio.windows import Window

    factor = max(1, math.ceil(max(pair.width, pair.height) / max_px))
    out_w, out_h = pair.width // factor, pair.height // factor
    if out_w < 1 or out_h < 1:
        raise InputError(f"aligned pair of {pair.width}x{pair.height} px is too small for an overlay")
    bands = max(1, int(getattr(pair, "count", 3)))
    rows = max(factor, (int(8e6 // (2 * bands * pair.width)) // factor) * factor)
    acc = np.zeros((2, out_h, out_w, 3), dtype=np.float32)
    ok = np.zeros((out_h, out_w), dtype=np.float32)
    for top, n in _iter_strips(out_h * factor, rows):
        images, valid = pair.read(Window(0, top, out_w * factor, n))
        images = np.asarray(images, dtype=np.float32)
        if images.shape[1] < 3:
            images = np.repeat(images[:, :1], 3, axis=1)
        v = np.asarray(valid, dtype=np.float32).reshape(n // factor, factor, out_w, factor).mean(axis=(1, 3))
        blocks = images[:, :3] * np.asarray(valid, dtype=np.float32)
        blocks = blocks.reshape(2, 3, n // factor, factor, out_w, factor).mean(axis=(3, 5))
        r0 = top // factor
        acc[:, r0 : r0 + n // factor] = blocks.transpose(0, 2, 3, 1)
        ok[r0 : r0 + n // factor] = v
    good = ok > 0.5
    acc = np.where(ok[None, ..., None] > 0, acc / np.maximum(ok, 1e-6)[None, ..., None], 0.0)
    return (np.clip(acc, 0, 1) * 255 + 0.5).astype(np.uint8), good, factor


@dataclass(frozen=True)
class Overlay:
    """A downsampled image of both epochs warped to Web Mercator, with its EPSG:4326 bounds."""

    prev_url: str
    curr_url: str
    bounds: tuple[tuple[float, float], tuple[float, float]]


def make_overlay(pair: Any, settings: MapSettings) -> Overlay:
    """Downsample the pair and warp it to EPSG:3857, the grid Leaflet draws images on.

    Args:
        pair: an open aligned pair.
        settings: ``overlay_max_px``.

    Returns:
        The overlay (JPEG data URLs, invalid areas in the background colour).
    """
    from pyproj import Transformer
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.transform import array_bounds
    from rasterio.warp import calculate_default_transform, reproject

    images, valid, factor = _downsample(pair, settings.overlay_max_px)
    h, w = valid.shape
    src_crs = CRS.from_user_input(pair.crs)
    src_transform = pair.transform * pair.transform.scale(factor, factor)
    left, bottom, right, top = array_bounds(h, w, src_transform)
    dst_crs = CRS.from_epsg(3857)
    dst_transform, dw, dh = calculate_default_transform(src_crs, dst_crs, w, h, left, bottom, right, top)
    log.info("image overlay: %dx%d px (1/%d), warped to EPSG:3857 as %dx%d", w, h, factor, dw, dh)
    mask = np.zeros((dh, dw), dtype=np.uint8)
    reproject(
        valid.astype(np.uint8),
        mask,
        src_transform=src_transform,
        src_crs=src_crs,
        dst_transform=dst_transform,
        dst_crs=dst_crs,
        resampling=Resampling.nearest,
    )
    urls = []
    for epoch in (0, 1):
        src = images[epoch].transpose(2, 0, 1)
        dst = np.zeros((3, dh, dw), dtype=np.uint8)
        reproject(
            src,
            dst,
            src_transform=src_transform,
            src_crs=src_crs,
            dst_transform=dst_transform,
            dst_crs=dst_crs,
            resampling=Resampling.bilinear,
        )
        rgb = dst.transpose(1, 2, 0).copy()
        rgb[mask == 0] = (217, 217, 212)
        urls.append(_jpeg_data_url(rgb, quality=settings.overlay_quality))
    w3857, s3857, e3857, n3857 = array_bounds(dh, dw, dst_transform)
    to_ll = Transformer.from_crs(3857, 4326, always_xy=True)
    west, south = to_ll.transform(w3857, s3857)
    east, north = to_ll.transform(e3857, n3857)
    return Overlay(urls[0], urls[1], ((south, west), (north, east)))
