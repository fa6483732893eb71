"""The inspector map: one self-contained, offline folium page per month.

Inspectors open the page on office networks without internet, so nothing is fetched at view time:
Leaflet's JS and CSS come from the ``xstatic-leaflet`` package at build time and are inlined, folium's
CDN lists (jQuery, Bootstrap, awesome-markers) are dropped, and the ground is shown by a downsampled
image overlay of the month's aligned imagery instead of web tiles. Layers (toggled by a LayerControl):
imagery (after, before), the month's flags (new red, removed blue), cases coloured by their lifecycle
state as of the month, the month's alerts, and district/street/grid outlines.

Geometries stay in the grid CRS until the folium boundary, where they are reprojected to EPSG:4326.
The month's view of the ledger is :func:`pipeline.ledger.view.load_month_view`, the imagery overlay and
chips are in :mod:`pipeline.publish.mapimagery`, the GeoJSON layers, legend and colours in
:mod:`pipeline.publish.maplayers`, the Chinese names in :mod:`pipeline.ledger.labels`.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from contextlib import AbstractContextManager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd

from pipeline.config import MapSettings
from pipeline.errors import CRSMismatchError, InputError, MissingInputError
from pipeline.fileio import atomic_path, read_layer
from pipeline.ledger.view import load_month_view
from pipeline.publish.mapimagery import Overlay, make_chips, make_overlay
from pipeline.publish.maplayers import (
    ALERT_COLOR,
    alert_features,
    case_features,
    flag_features,
    legend_html,
    outline_features,
)

log = logging.getLogger(__name__)

_LEAFLET_PACKAGE = "xstatic.pkg.leaflet"


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
    return resources.files("pipeline.publish").joinpath("assets", "map.css").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- imagery


def _open_pair(pair_dir: Path) -> AbstractContextManager[Any]:
    """Open the aligned pair (``pipeline.imagery.AlignedPair``); a seam that tests replace."""
    from pipeline.pair import AlignedPair

    return AlignedPair.open(pair_dir)


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
        fix = f"fix or remove it (the map leaves a missing outline out); it needs polygons with {', '.join(columns)}"
        frame = read_layer(path, what=f"{name} outlines", fix=fix, columns=columns)
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
        folium.GeoJson(
            outline_features(frame, labels[key]),
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

    legend = legend_html(f"ScarWatch {month}")
    header = (
        f'<div class="sw-header">{month} 违法建设变化图斑 Change flags: '
        f"{int((flags['kind'] == 'new').sum())} 新增 new, {int((flags['kind'] == 'removed').sum())} 消失 removed</div>"
    )
    root: Any = fmap.get_root()
    root.html.add_child(_raw(legend + header), name="scarwatch_legend")
    folium.LayerControl(collapsed=False).add_to(fmap)

    out_html = Path(out_html)
    with atomic_path(out_html) as tmp:
        tmp.write_text(fmap.get_root().render(), encoding="utf-8")
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
