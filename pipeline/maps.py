"""The inspector map: one self-contained, offline folium page per month.

Inspectors open the page on office networks without internet, so nothing is fetched at view time:
Leaflet's JS and CSS come from the ``xstatic-leaflet`` package at build time and are inlined, folium's
CDN lists (jQuery, Bootstrap, awesome-markers) are dropped, and the ground is shown by a downsampled
image overlay of the month's aligned imagery instead of web tiles. Layers (toggled by a LayerControl):
imagery (after, before), the month's flags (new red, removed blue), cases coloured by their lifecycle
state as of the month, the month's alerts, and district/street/grid outlines.

Geometries stay in the grid CRS until the folium boundary, where they are reprojected to EPSG:4326.
This module also holds :func:`load_month_view`, the month's slice of the ledger that the report reads.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from pipeline.config import MapSettings, check_month
from pipeline.errors import CorruptFileError, CRSError, CRSMismatchError, InputError, MissingInputError

log = logging.getLogger(__name__)

SQM_PER_MU = 10000.0 / 15.0
"""Square metres in one 亩 (mu)."""

STATES: tuple[str, ...] = (
    "warning",
    "confirmed",
    "stopped",
    "ordered",
    "demolished",
    "repaired",
    "closed",
    "dismissed",
)
STATE_ZH: dict[str, str] = {
    "warning": "预警",
    "confirmed": "已发现",
    "stopped": "已制止",
    "ordered": "处置中",
    "demolished": "已拆除",
    "repaired": "已修复",
    "closed": "已销号",
    "dismissed": "已排除",
}
STATE_COLORS: dict[str, str] = {
    "warning": "#e31a1c",
    "confirmed": "#fd8d3c",
    "stopped": "#fecc5c",
    "ordered": "#c51b8a",
    "demolished": "#6a51a3",
    "repaired": "#41ab5d",
    "closed": "#1a9850",
    "dismissed": "#969696",
}
KIND_ZH: dict[str, str] = {
    "flagged": "预警",
    "confirmed": "确认",
    "dismissed": "排除",
    "stopped": "制止",
    "ordered": "限期处置",
    "demolished": "拆除",
    "repaired": "修复",
    "closed": "销号",
    "observed_present": "影像可见",
    "observed_removed": "影像已拆除",
    "expanded": "扩建",
    "rebuilt": "反弹重建",
}
EVENT_TO_STATE: dict[str, str] = {
    "flagged": "warning",
    "confirmed": "confirmed",
    "dismissed": "dismissed",
    "stopped": "stopped",
    "ordered": "ordered",
    "demolished": "demolished",
    "repaired": "repaired",
    "closed": "closed",
}
"""Event kinds that move a case to a state; imagery observations leave the state as it is."""
FLAG_ZH: dict[str, str] = {"new": "新增", "removed": "消失"}
FLAG_COLORS: dict[str, str] = {"new": "#d7191c", "removed": "#2c7bb6"}
CATEGORY_ZH: dict[str, str] = {"illegal_construction": "违法建设", "scar": "城市疮疤"}
ALERT_ZH: dict[str, str] = {
    "overdue": "逾期未拆除",
    "rebuild": "反弹",
    "expansion_after_stop": "制止后扩建",
    "unrepaired_scar": "疮疤未修复",
    "demolition_unverified": "拆除未经影像核实",
    "removal_unrecorded": "影像已拆除但未登记",
}
"""Short Chinese names of the ledger's alert kinds (``pipeline.ledger.ALERT_TEXT`` holds the messages)."""
ALERT_COLOR = "#ff7f00"

_FLAG_COLUMNS = ("flag_id", "kind", "area_m2")
_CASE_COLUMNS = ("case_id", "state")
_EVENT_COLUMNS = ("case_id", "at", "kind")
_ALERT_COLUMNS = ("case_id", "kind")
_LEAFLET_PACKAGE = "xstatic.pkg.leaflet"


@dataclass(frozen=True)
class MonthView:
    """The ledger and flags as they stood at the end of one month, all in the grid CRS.

    Attributes:
        month: the month, ``YYYY-MM``.
        flags: this month's flags (layer ``flags`` rows whose ``month`` is the month).
        cases: cases opened by the month, with ``state_at`` (the state as of the month's end).
        events: events up to and including the month, sorted by ``at``.
        alerts: this month's alerts.
    """

    month: str
    flags: gpd.GeoDataFrame
    cases: gpd.GeoDataFrame
    events: gpd.GeoDataFrame
    alerts: gpd.GeoDataFrame


def _layers(path: Path) -> list[str]:
    import pyogrio

    try:
        return [str(name) for name in pyogrio.list_layers(path)[:, 0]]
    except Exception as exc:  # pyogrio raises several DataSourceError flavours
        raise CorruptFileError(f"{path}: cannot be read as a GeoPackage ({exc}); rebuild it") from exc


def read_layer(
    path: Path, layer: str, columns: tuple[str, ...], *, optional: bool = False, stage: str = "ledger"
) -> gpd.GeoDataFrame:
    """Read one layer of a GeoPackage and check its CRS and columns.

    Args:
        path: the GeoPackage.
        layer: the layer name.
        columns: columns that must be present.
        optional: return an empty frame (no CRS) when the layer is absent instead of raising.
        stage: the pipeline stage that writes the file, named in error messages.

    Returns:
        The layer, in its stored CRS.

    Raises:
        MissingInputError: the file does not exist.
        InputError: the layer or a required column is missing.
        CRSError: the layer has no CRS.
    """
    if not path.exists():
        raise MissingInputError(f"{path}: not found; run the {stage!r} stage first")
    if layer not in _layers(path):
        if optional:
            log.info("%s has no layer %r; treating it as empty", str(path), layer)
            return gpd.GeoDataFrame({c: [] for c in columns}, geometry=gpd.GeoSeries([]))
        raise InputError(f"{path}: layer {layer!r} is missing; rebuild the file with the {stage!r} stage")
    frame = gpd.read_file(path, layer=layer)
    if frame.crs is None:
        raise CRSError(f"{path}: layer {layer!r} has no CRS; write it with the grid CRS ({stage!r} stage)")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: layer {layer!r} lacks columns {missing!r}; rebuild it with the {stage!r} stage")
    return frame


def _month_of(frame: pd.DataFrame, date_column: str) -> pd.Series:
    """The ``month`` column when present, else the first 7 characters of ``date_column``."""
    if "month" in frame.columns:
        return frame["month"].astype(str)
    return frame[date_column].astype(str).str.slice(0, 7)


def state_as_of(cases: pd.DataFrame, events: pd.DataFrame) -> pd.Series:
    """Each case's state after its last state-changing event in ``events`` (else its ledger state).

    Args:
        cases: cases with ``case_id`` and ``state``.
        events: events already cut at the month, sorted by ``at``.

    Returns:
        States indexed like ``cases``.
    """
    moving = events[events["kind"].isin(list(EVENT_TO_STATE))]
    last = moving.groupby("case_id")["kind"].last().map(EVENT_TO_STATE)
    return cases["case_id"].map(last).fillna(cases["state"]).astype(str)


def load_month_view(month: str, ledger_path: Path, flags_path: Path) -> MonthView:
    """Read the ledger and the flags and cut them at ``month``.

    Args:
        month: ``YYYY-MM``.
        ledger_path: the ledger GeoPackage (layers ``events``, ``cases``, ``alerts``).
        flags_path: the month's flags GeoPackage (layer ``flags``).

    Returns:
        The month's view, every frame in the flags' CRS.

    Raises:
        CRSMismatchError: the ledger and the flags are in different CRSs.
    """
    check_month(month)
    flags = read_layer(Path(flags_path), "flags", _FLAG_COLUMNS, stage="vectorize")
    cases = read_layer(Path(ledger_path), "cases", _CASE_COLUMNS)
    events = read_layer(Path(ledger_path), "events", _EVENT_COLUMNS)
    alerts = read_layer(Path(ledger_path), "alerts", _ALERT_COLUMNS, optional=True)
    if not flags.crs.equals(cases.crs):
        raise CRSMismatchError(
            f"{flags_path} is in {flags.crs.to_string()!r} but {ledger_path} in {cases.crs.to_string()!r}; "
            "rebuild the ledger from these flags so both share the grid CRS"
        )
    if "month" in flags.columns:
        flags = flags[flags["month"].astype(str) == month]
    for col, default in (("district", ""), ("street", ""), ("p_mean", np.nan), ("p_max", np.nan)):
        if col not in flags.columns:
            flags[col] = default
    if "area_mu" not in flags.columns:
        flags["area_mu"] = flags["area_m2"] / SQM_PER_MU

    events = events.assign(month=_month_of(events, "at"), at=events["at"].astype(str))
    if "first_month" not in cases.columns:  # derive it from the whole log, before the cut
        first = events.groupby("case_id")["month"].min()
        opened = cases["opened_at"].astype(str).str.slice(0, 7) if "opened_at" in cases else ""
        cases = cases.assign(first_month=cases["case_id"].map(first).fillna(opened))
    order = [c for c in ("seq",) if c in events.columns] or [c for c in ("at", "event_id") if c in events.columns]
    events = events[events["month"] <= month].sort_values(order, kind="stable")  # `seq` is the log order
    cases = cases[cases["first_month"].astype(str) <= month]
    cases = cases.assign(state_at=state_as_of(cases, events))
    for col in ("district", "street", "category", "opened_at", "deadline"):
        if col not in cases.columns:
            cases[col] = ""
    if "area_m2" not in cases.columns:
        cases["area_m2"] = cases.geometry.area
    if len(alerts):
        alerts = alerts.set_crs(cases.crs, allow_override=False) if alerts.crs is None else alerts
        if not alerts.crs.equals(cases.crs):
            raise CRSMismatchError(f"{ledger_path}: layer 'alerts' CRS differs from 'cases'; rebuild the ledger")
        if "month" in alerts.columns:
            alerts = alerts[alerts["month"].astype(str) == month]
    for col in ("message_zh", "message_en"):
        if col not in alerts.columns:
            alerts[col] = ""
    return MonthView(
        month,
        flags.reset_index(drop=True),
        cases.reset_index(drop=True),
        events.reset_index(drop=True),
        alerts.reset_index(drop=True),
    )


# --------------------------------------------------------------------------------------------- assets


@lru_cache(maxsize=1)
def _leaflet_assets() -> tuple[str, str]:
    """Leaflet's JS and CSS (images inlined as data URIs), read from the xstatic-leaflet package."""
    try:
        data = resources.files(_LEAFLET_PACKAGE).joinpath("data")
        js = data.joinpath("leaflet.js").read_text(encoding="utf-8")
        css = data.joinpath("leaflet.css").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise MissingInputError(
            "leaflet.js/leaflet.css not found in package 'xstatic-leaflet'; install it (pip install -e .)"
        ) from exc

    def inline(match: re.Match[str]) -> str:
        png = data.joinpath("images", match.group(1)).read_bytes()
        return "url(data:image/png;base64," + base64.b64encode(png).decode("ascii") + ")"

    css = re.sub(r"url\(images/([\w.-]+\.png)\)", inline, css)
    js = re.sub(r"//# sourceMappingURL=\S+\s*$", "", js)
    return js, css


def _own_css() -> str:
    return resources.files("pipeline").joinpath("assets", "map.css").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _templates() -> Environment:
    return Environment(
        loader=PackageLoader("pipeline", "templates"),
        autoescape=select_autoescape(["html", "html.j2"]),
        trim_blocks=False,
    )


def _macro(name: str) -> Any:
    return getattr(_templates().get_template("map_popup.html.j2").module, name)


# --------------------------------------------------------------------------------------------- imagery


def _open_pair(pair_dir: Path) -> AbstractContextManager[Any]:
    """Open the aligned pair (``pipeline.imagery.AlignedPair``); a seam that tests replace."""
    from pipeline.imagery import AlignedPair

    return AlignedPair.open(pair_dir)


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


def make_chips(pair: Any, flags: gpd.GeoDataFrame, settings: MapSettings) -> dict[str, tuple[str, str]]:
    """Before/after JPEG chips (data URLs) of the largest flags, keyed by flag id.

    Args:
        pair: an open aligned pair (``crs``, ``transform``, ``width``, ``height``, ``read(window)``).
        flags: flags in the pair's CRS.
        settings: chip size and count.

    Returns:
        ``{flag_id: (prev_url, curr_url)}`` for at most ``settings.max_chips`` flags.
    """
    chips: dict[str, tuple[str, str]] = {}
    order = flags.sort_values("area_m2", ascending=False).head(settings.max_chips)
    for flag_id, kind, geom in zip(order["flag_id"].astype(str), order["kind"], order.geometry, strict=True):
        if geom is None or geom.is_empty:
            continue
        color = FLAG_COLORS.get(str(kind), "#000000")
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


# --------------------------------------------------------------------------------------------- features


def _fmt(value: Any, digits: int) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    return "" if math.isnan(number) else f"{number:,.{digits}f}"


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _history(events: pd.DataFrame) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for row in events.itertuples(index=False):
        rec = {
            "at": _text(row.at)[:10],
            "kind": _text(row.kind),
            "kind_zh": KIND_ZH.get(_text(row.kind), ""),
            "source": _text(getattr(row, "source", "")),
            "actor": _text(getattr(row, "actor", "")),
        }
        out.setdefault(_text(row.case_id), []).append(rec)
    return out


def _grid_units(frame: gpd.GeoDataFrame, grid: gpd.GeoDataFrame | None) -> list[str]:
    """The 网格 cell and responsible unit under each feature's representative point."""
    if grid is None or not len(grid) or not len(frame):
        return [""] * len(frame)
    points = gpd.GeoDataFrame(geometry=frame.geometry.representative_point(), crs=frame.crs)
    joined = gpd.sjoin(points, grid[["cell_id", "unit", "geometry"]], how="left", predicate="within")
    joined = joined[~joined.index.duplicated(keep="first")]
    labels = [
        " / ".join(p for p in (_text(c), _text(u)) if p) for c, u in zip(joined["cell_id"], joined["unit"], strict=True)
    ]
    return labels


def match_flags_to_cases(flags: gpd.GeoDataFrame, view: MonthView) -> list[str]:
    """The case each flag belongs to: named in an event's ``evidence``, else the most overlapped case."""
    by_evidence: dict[str, str] = {}
    if "evidence" in view.events.columns:
        wanted = set(flags["flag_id"].astype(str))
        for text, case_id in zip(view.events["evidence"].astype(str), view.events["case_id"], strict=True):
            for token in re.findall(r"[\w.:-]+", text):
                if token in wanted:
                    by_evidence[token] = str(case_id)  # events are sorted: the latest wins
    out = []
    cases = view.cases
    sindex = cases.sindex if len(cases) else None
    for flag_id, geom in zip(flags["flag_id"].astype(str), flags.geometry, strict=True):
        if flag_id in by_evidence:
            out.append(by_evidence[flag_id])
            continue
        best, best_area = "", 0.0
        if sindex is not None and geom is not None:
            for i in sindex.query(geom, predicate="intersects"):
                area = geom.intersection(cases.geometry.iloc[i]).area
                if area > best_area:
                    best, best_area = str(cases["case_id"].iloc[i]), area
        out.append(best)
    return out


def _feature_collection(frame: gpd.GeoDataFrame, props: list[dict[str, Any]]) -> dict[str, Any]:
    """GeoJSON in EPSG:4326 (the folium boundary) with only the given properties."""
    geo = frame.geometry.to_crs(4326)
    features = []
    for i, (geom, p) in enumerate(zip(geo, props, strict=True)):
        if geom is None or geom.is_empty:
            continue
        features.append({"type": "Feature", "id": str(i), "properties": p, "geometry": geom.__geo_interface__})
    return {"type": "FeatureCollection", "features": features}


def flag_features(
    view: MonthView,
    flags: gpd.GeoDataFrame,
    grid: gpd.GeoDataFrame | None,
    chips: Mapping[str, tuple[str, str]],
    prev_label: str = "",
) -> dict[str, Any]:
    """The flags as GeoJSON with a bilingual popup per feature."""
    case_of = match_flags_to_cases(flags, view)
    states = dict(zip(view.cases["case_id"].astype(str), view.cases["state_at"], strict=True))
    history = _history(view.events)
    units = _grid_units(flags, grid)
    macro = _macro("flag_popup")
    props = []
    for row, case_id, unit in zip(flags.itertuples(index=False), case_of, units, strict=True):
        kind = _text(row.kind)
        flag_id = _text(row.flag_id)
        state = states.get(case_id, "")
        prev_chip, curr_chip = chips.get(flag_id, ("", ""))
        popup = macro(
            {
                "flag_id": flag_id,
                "kind": kind,
                "kind_zh": FLAG_ZH.get(kind, ""),
                "color": FLAG_COLORS.get(kind, "#000"),
                "area_m2": _fmt(row.area_m2, 1),
                "area_mu": _fmt(row.area_mu, 3),
                "p_mean": _fmt(row.p_mean, 2),
                "p_max": _fmt(row.p_max, 2),
                "district": _text(row.district),
                "street": _text(row.street),
                "grid": unit,
                "case_id": case_id,
                "state": state,
                "state_zh": STATE_ZH.get(state, ""),
                "chip_prev": prev_chip,
                "chip_curr": curr_chip,
                "prev_label": prev_label,
                "month": view.month,
                "events": history.get(case_id, []),
            }
        )
        props.append(
            {
                "flag_id": flag_id,
                "kind": kind,
                "case_id": case_id,
                "color": FLAG_COLORS.get(kind, "#000"),
                "popup": str(popup),
            }
        )
    return _feature_collection(flags, props)


def case_features(view: MonthView, grid: gpd.GeoDataFrame | None) -> dict[str, Any]:
    """The cases as GeoJSON, coloured by their state as of the month, with event history popups."""
    history = _history(view.events)
    units = _grid_units(view.cases, grid)
    macro = _macro("case_popup")
    props = []
    for row, unit in zip(view.cases.itertuples(index=False), units, strict=True):
        case_id, state, category = _text(row.case_id), _text(row.state_at), _text(row.category)
        popup = macro(
            {
                "case_id": case_id,
                "state": state,
                "state_zh": STATE_ZH.get(state, ""),
                "color": STATE_COLORS.get(state, "#000"),
                "category": category,
                "category_zh": CATEGORY_ZH.get(category, ""),
                "area_m2": _fmt(row.area_m2, 1),
                "area_mu": _fmt(float(row.area_m2) / SQM_PER_MU, 3),
                "district": _text(row.district),
                "street": _text(row.street),
                "grid": unit,
                "opened_at": _text(row.opened_at)[:10],
                "deadline": _text(row.deadline)[:10],
                "events": history.get(case_id, []),
            }
        )
        props.append(
            {"case_id": case_id, "state": state, "color": STATE_COLORS.get(state, "#000"), "popup": str(popup)}
        )
    return _feature_collection(view.cases, props)


def alert_features(view: MonthView) -> dict[str, Any]:
    """The month's alerts as points (representative point of each alert's geometry)."""
    macro = _macro("alert_popup")
    props = []
    for row in view.alerts.itertuples(index=False):
        kind = _text(row.kind)
        props.append(
            {
                "case_id": _text(row.case_id),
                "kind": kind,
                "popup": str(
                    macro(
                        {
                            "case_id": _text(row.case_id),
                            "kind": kind,
                            "kind_zh": ALERT_ZH.get(kind, ""),
                            "message_zh": _text(row.message_zh),
                            "message_en": _text(row.message_en),
                        }
                    )
                ),
            }
        )
    points = view.alerts.set_geometry(view.alerts.geometry.representative_point())
    return _feature_collection(points, props)


# --------------------------------------------------------------------------------------------- page


def _read_outlines(layers_dir: Path, crs: Any) -> dict[str, gpd.GeoDataFrame]:
    """districts/streets/grid GeoPackages found in ``layers_dir``, in ``crs`` (reprojection is logged)."""
    out: dict[str, gpd.GeoDataFrame] = {}
    for name, label in (("districts", "district"), ("streets", "street"), ("grid", "cell_id")):
        path = layers_dir / f"{name}.gpkg"
        if not path.exists():
            log.info("no %s layer at %s; the map leaves it out", name, str(path))
            continue
        columns = (label, "unit") if name == "grid" else (label,)
        frame = read_layer(path, _layers(path)[0], columns, stage="demo")
        if not frame.crs.equals(crs):
            log.warning("reprojecting %s from %s to the grid CRS %s", str(path), frame.crs.to_string(), crs.to_string())
            frame = frame.to_crs(crs)
        out[name] = frame
    return out


def _raw(text: str) -> Any:
    """A branca element that renders ``text`` verbatim (no Jinja pass over inlined JS/CSS/HTML)."""
    from branca.element import Element

    class Raw(Element):  # type: ignore[misc]
        def render(self, **kwargs: Any) -> str:
            return text

    return Raw()


def _new_map(bounds: tuple[float, float, float, float], settings: MapSettings) -> Any:
    """A folium map with no CDN links, Leaflet and our CSS inlined in the head."""
    import folium

    class OfflineMap(folium.Map):  # type: ignore[misc]
        default_js: list[tuple[str, str]] = []
        default_css: list[tuple[str, str]] = []

    west, south, east, north = bounds
    fmap = OfflineMap(
        location=[(south + north) / 2, (west + east) / 2], tiles=None, zoom_start=15, control_scale=True, max_zoom=22
    )
    js, css = _leaflet_assets()
    root: Any = fmap.get_root()
    root.header.add_child(_raw(f"<style>{css}</style>"), name="leaflet_css_inline")
    root.header.add_child(_raw(f"<script>{js}</script>"), name="leaflet_js_inline")
    root.header.add_child(_raw(f"<style>{_own_css()}</style>"), name="scarwatch_css")
    if settings.tiles:
        folium.TileLayer(
            settings.tiles, attr=settings.tiles_attribution or settings.tiles, name="在线底图 Online tiles", max_zoom=22
        ).add_to(fmap)
    fmap.fit_bounds([[south, west], [north, east]])
    return fmap


def _popup_js() -> Any:
    from folium.utilities import JsCode

    return JsCode(
        "function(feature, layer) { layer.bindPopup(feature.properties.popup, "
        "{maxWidth: 420, autoPanPaddingTopLeft: [60, 10], autoPanPaddingBottomRight: [330, 10]}); }"
    )


def _outline_style(color: str, weight: float) -> Any:
    return lambda _f: {"color": color, "weight": weight, "fill": False, "opacity": 0.9}


def build_map(
    month: str,
    ledger_path: Path,
    flags_path: Path,
    out_html: Path,
    *,
    settings: MapSettings,
    layers_dir: Path | None = None,
    pair_dir: Path | None = None,
) -> Path:
    """Write the month's self-contained inspector map.

    Args:
        month: ``YYYY-MM``.
        ledger_path: the ledger GeoPackage.
        flags_path: the month's flags GeoPackage.
        out_html: the page to write (parent folders are created).
        settings: the ``map`` section of params.yaml.
        layers_dir: folder with ``districts.gpkg``, ``streets.gpkg``, ``grid.gpkg`` (outlines, 网格 units).
        pair_dir: the month's aligned pair folder, for the image overlay and before/after chips.

    Returns:
        ``out_html``.

    Raises:
        MissingInputError: an input file (or the xstatic-leaflet package) is missing.
        InputError: a layer or column is missing.
        CRSMismatchError: the flags and the ledger are in different CRSs.
    """
    import folium

    view = load_month_view(month, Path(ledger_path), Path(flags_path))
    crs = view.cases.crs
    flags = view.flags
    if len(flags) > settings.max_flags:
        log.warning(
            "%d flags in %s; the map keeps the %d largest (map.max_flags)", len(flags), month, settings.max_flags
        )
        flags = flags.sort_values("area_m2", ascending=False).head(settings.max_flags)
    outlines = _read_outlines(Path(layers_dir), crs) if layers_dir is not None else {}
    grid = outlines.get("grid")

    chips: dict[str, tuple[str, str]] = {}
    overlay: Overlay | None = None
    prev_label = ""
    if pair_dir is not None:
        with _open_pair(Path(pair_dir)) as pair:
            if not crs.equals(pair.crs):
                raise CRSMismatchError(
                    f"{pair_dir} is not in the flags' CRS {crs.to_string()!r}; "
                    "vectorize the flags from this aligned pair"
                )
            prev_label = str(getattr(pair, "prev", "") or "")
            chips = make_chips(pair, flags, settings)
            overlay = make_overlay(pair, settings)

    extent = pd.concat([g.geometry for g in (flags, view.cases, *outlines.values()) if len(g)])
    if not len(extent):
        raise InputError(f"{flags_path} and {ledger_path} hold nothing for {month}; nothing to map")
    minx, miny, maxx, maxy = gpd.GeoSeries(extent, crs=crs).to_crs(4326).total_bounds
    fmap = _new_map((minx, miny, maxx, maxy), settings)

    if overlay is not None:
        folium.raster_layers.ImageOverlay(
            overlay.curr_url, bounds=overlay.bounds, name=f"影像 Imagery {month}", opacity=1.0
        ).add_to(fmap)
        folium.raster_layers.ImageOverlay(
            overlay.prev_url, bounds=overlay.bounds, show=False, name=f"前期影像 Previous imagery {prev_label}".strip()
        ).add_to(fmap)
    styles = {"districts": ("#333333", 2.5), "streets": ("#555555", 1.5), "grid": ("#7f7f7f", 0.8)}
    names = {"districts": "区界 Districts", "streets": "街道 Streets", "grid": "网格 Grid cells"}
    labels = {"districts": "district", "streets": "street", "grid": "cell_id"}
    for key, frame in outlines.items():
        fc = _feature_collection(frame, [{"name": _text(v)} for v in frame[labels[key]]])
        folium.GeoJson(
            fc,
            name=names[key],
            style_function=_outline_style(*styles[key]),
            show=key != "grid",
            tooltip=folium.GeoJsonTooltip(fields=["name"], labels=False),
        ).add_to(fmap)

    folium.GeoJson(
        case_features(view, grid),
        name=f"案件 Cases ({len(view.cases)})",
        on_each_feature=_popup_js(),
        style_function=lambda f: {"color": f["properties"]["color"], "weight": 2, "fillOpacity": 0.25},
    ).add_to(fmap)
    folium.GeoJson(
        flag_features(view, flags, grid, chips, prev_label),
        name=f"本月图斑 Flags {month} ({len(flags)})",
        on_each_feature=_popup_js(),
        style_function=lambda f: {"color": f["properties"]["color"], "weight": 3, "fillOpacity": 0.15},
    ).add_to(fmap)
    folium.GeoJson(
        alert_features(view),
        name=f"告警 Alerts ({len(view.alerts)})",
        on_each_feature=_popup_js(),
        marker=folium.CircleMarker(radius=9, color=ALERT_COLOR, weight=3, fill=False),
    ).add_to(fmap)

    legend = _macro("legend")(
        f"ScarWatch {month}",
        [(s, STATE_ZH[s], STATE_COLORS[s]) for s in STATES],
        [(k, FLAG_ZH[k], FLAG_COLORS[k]) for k in ("new", "removed")],
    )
    header = (
        f'<div class="sw-header">{month} 违法建设变化图斑 Change flags: '
        f"{int((flags['kind'] == 'new').sum())} 新增 new, {int((flags['kind'] == 'removed').sum())} 消失 removed</div>"
    )
    root: Any = fmap.get_root()
    root.html.add_child(_raw(str(legend) + header), name="scarwatch_legend")
    folium.LayerControl(collapsed=False).add_to(fmap)

    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_html.with_name(out_html.name + ".tmp")
    tmp.write_text(fmap.get_root().render(), encoding="utf-8")
    os.replace(tmp, out_html)
    log.info("wrote %s: %d flags, %d cases, %d alerts", str(out_html), len(flags), len(view.cases), len(view.alerts))
    return out_html


def embedded_geojson(html: str) -> dict[str, dict[str, Any]]:
    """The GeoJSON FeatureCollections embedded in a map page, keyed by their LayerControl name.

    Args:
        html: a page written by :func:`build_map`.

    Returns:
        ``{layer name: FeatureCollection}`` in layer order (for tests and checks of a written map).
    """
    decoder = json.JSONDecoder()
    data: dict[str, dict[str, Any]] = {}
    for match in re.finditer(r"(geo_json_\w+)_add\(\{", html):
        data[match.group(1)], _ = decoder.raw_decode(html, match.end() - 1)
    block = re.search(r"overlays\s*:\s*\{(.*?)\}", html, flags=re.S)
    names = re.findall(r'("(?:[^"\\]|\\.)*")\s*:\s*(\w+)', block.group(1)) if block else []
    return {json.loads(name): data[var] for name, var in names if var in data}
