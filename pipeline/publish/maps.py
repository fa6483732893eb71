"""The inspector map: one offline folium page per month, its imagery a tile pyramid beside it.

Inspectors open the page from a USB stick or a shared folder without internet, so nothing is fetched
from the network: Leaflet's JS and CSS come from the ``xstatic-leaflet`` package, the swipe and minimap
plugins from ``assets/vendor`` (npm packages with their licences) and the page's own controls from
``assets/map_ui.js``, all inlined; folium's CDN lists are dropped. The ground is the month's tile
pyramid (:mod:`pipeline.publish.tiles`, relative URLs into ``<month>_tiles/``), or, with
``map.imagery: inline`` or without a pyramid, a downsampled overlay embedded in the page. Layers:
imagery (after, before; toggle and swipe), districts, streets, grid cells, permits, earlier months'
flags, cases coloured by their state as of the month, this month's flags and alerts. Popups are HTML
escaped at build time and kept once in a JSON data block; outline names are set as text.

Geometries stay in the grid CRS until the folium boundary, where they are reprojected to EPSG:4326.
The month's view of the ledger is :func:`pipeline.ledger.view.load_month_view`, the overlay and
embedded chips are in :mod:`pipeline.publish.mapimagery`, the GeoJSON layers, legend and colours in
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
    STATE_COLORS,
    alert_features,
    case_features,
    earlier_flag_features,
    flag_features,
    legend_html,
    outline_features,
    permit_features,
)
from pipeline.publish.tiles import Pyramid, read_pyramid

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


def _asset(*parts: str) -> Any:
    return resources.files("pipeline.publish").joinpath("assets", *parts)


def _own_css() -> str:
    return str(_asset("map.css").read_text(encoding="utf-8"))


def _data_uri(ref: Any) -> str:
    mime = "image/svg+xml" if ref.name.endswith(".svg") else "image/png"
    return f"url(data:{mime};base64," + base64.b64encode(ref.read_bytes()).decode("ascii") + ")"


@lru_cache(maxsize=1)
def _vendored() -> tuple[str, str]:
    """The vendored plugins' JS and CSS (npm packages with their licences under ``assets/vendor``).

    leaflet-side-by-side ships CommonJS only: its ``require`` lines are replaced by the global ``L``.
    """
    sbs = _asset("vendor", "leaflet-side-by-side")
    js = sbs.joinpath("index.js").read_text(encoding="utf-8")
    js = js.replace("var L = require('leaflet')", "var L = window.L")
    js = re.sub(r"^require\('\./[\w.]+\.css'\)\s*$", "", js, flags=re.M)
    js = js.replace("module.exports = L.Control.SideBySide", "")
    if "require(" in js or "module.exports" in js:
        raise MissingInputError("assets/vendor/leaflet-side-by-side/index.js changed shape; re-vendor it")
    css = sbs.joinpath("layout.css").read_text(encoding="utf-8") + sbs.joinpath("range.css").read_text(encoding="utf-8")
    css = css.replace("url(range-icon.png)", _data_uri(sbs.joinpath("range-icon.png")))
    mini = _asset("vendor", "leaflet-minimap")
    mini_css = mini.joinpath("Control.MiniMap.min.css").read_text(encoding="utf-8")
    for name in ("toggle.svg", "toggle.png"):
        mini_css = mini_css.replace(f"url(images/{name})", _data_uri(mini.joinpath("images", name)))
    mini_js = re.sub(r"//# sourceMappingURL=\S+\s*$", "", mini.joinpath("Control.MiniMap.min.js").read_text("utf-8"))
    ui = _asset("map_ui.js").read_text(encoding="utf-8")
    out = f"{js}\n;{mini_js}\n;{ui}"
    if "</script" in out.lower():
        raise MissingInputError("a vendored script holds '</script'; it cannot be inlined")
    return out, f"{css}\n{mini_css}"


def _js_json(value: Any) -> str:
    """JSON for an inline script: ``<``, ``>``, ``&`` and the JS line separators escaped."""
    text = json.dumps(value, ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


# --------------------------------------------------------------------------------------------- imagery


def _open_pair(pair_dir: Path) -> AbstractContextManager[Any]:
    """Open the aligned pair (``pipeline.imagery.AlignedPair``); a seam that tests replace."""
    from pipeline.pair import AlignedPair

    return AlignedPair.open(pair_dir)


# --------------------------------------------------------------------------------------------- page


def _read_outlines(layers_dir: Path, crs: Any) -> dict[str, gpd.GeoDataFrame]:
    """districts/streets/grid GeoPackages found in ``layers_dir``, in ``crs`` (reprojection is logged)."""
    out: dict[str, gpd.GeoDataFrame] = {}
    for name, label in (
        ("districts", "district"),
        ("streets", "street"),
        ("grid", "cell_id"),
        ("permits", "permit_id"),
    ):
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


_POPUPS_ID = "sw-popups"


class _Popups:
    """The page's popup table: every feature's popup HTML once, in a JSON data block, not in the GeoJSON.

    Inside the GeoJSON (a script), folium's ``tojson`` writes each ``<``, ``>`` and Chinese character as a
    6-byte unicode escape; in a ``<script type="application/json">`` block only ``</`` and ``<!--`` need one,
    so popups cost about half. Features keep the index ``pi``; ``map_ui.js`` binds the text lazily.
    """

    def __init__(self) -> None:
        self.table: list[str] = []

    def take(self, collection: dict[str, Any]) -> dict[str, Any]:
        for feature in collection["features"]:
            props = feature["properties"]
            if "popup" in props:
                props["pi"] = len(self.table)
                self.table.append(props.pop("popup"))
        return collection

    def script(self) -> str:
        text = json.dumps(self.table, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\u0021--")
        return f'<script type="application/json" id="{_POPUPS_ID}">{text}</script>'


def _late_script(text: str) -> Any:
    """A map child that appends ``text`` to the page's script when rendered, after the children before it."""
    from branca.element import Element

    class Late(Element):  # type: ignore[misc]
        def render(self, **kwargs: Any) -> str:
            root: Any = self.get_root()
            root.script.add_child(_raw(text), name=f"{self.get_name()}_script")
            return ""

    return Late()


def _new_map(bounds: tuple[float, float, float, float], settings: MapSettings, title: str) -> Any:
    """A folium map with no CDN links, Leaflet and our CSS inlined in the head."""
    import folium

    class OfflineMap(folium.Map):  # type: ignore[misc]
        default_js: list[tuple[str, str]] = []
        default_css: list[tuple[str, str]] = []

    west, south, east, north = bounds
    fmap = OfflineMap(
        location=[(south + north) / 2, (west + east) / 2],
        tiles=None,
        zoom_start=15,
        control_scale=True,
        max_zoom=22,
        prefer_canvas=True,  # one canvas for thousands of polygons, not one SVG node each
    )
    js, css = _leaflet_assets()
    plugins_js, plugins_css = _vendored()
    root: Any = fmap.get_root()
    root.title = title
    root.header.add_child(
        _raw('<meta name="viewport" content="width=device-width, initial-scale=1.0, maximum-scale=1.0">'),
        name="viewport_meta",
    )
    root.header.add_child(_raw(f"<style>{css}</style>"), name="leaflet_css_inline")
    root.header.add_child(_raw(f"<script>{js}</script>"), name="leaflet_js_inline")
    root.header.add_child(_raw(f"<style>{plugins_css}</style>"), name="plugins_css_inline")
    root.header.add_child(_raw(f"<script>{plugins_js}</script>"), name="plugins_js_inline")
    root.header.add_child(_raw(f"<style>{_own_css()}</style>"), name="scarwatch_css")
    if settings.tiles:
        folium.TileLayer(
            settings.tiles, attr=settings.tiles_attribution or settings.tiles, name="在线底图 Online tiles", max_zoom=22
        ).add_to(fmap)
    fmap.fit_bounds([[south, west], [north, east]])
    return fmap


def _popup_js() -> Any:
    from folium.utilities import JsCode

    return JsCode("function(feature, layer) { SW.popup(feature, layer); }")  # map_ui.js: popups fit the screen


def _tooltip_js() -> Any:
    from folium.utilities import JsCode

    return JsCode("function(feature, layer) { SW.tooltip(feature, layer); }")  # names as text, never HTML


_TEXT: dict[str, tuple[str, str]] = {
    "search": ("搜索 案件/图斑/街道/网格", "Search case, flag, street, unit"),
    "none": ("无结果", "no match"),
    "fullscreen": ("全屏", "Fullscreen"),
    "fullscreenShort": ("全屏", "Full"),
    "locateShort": ("定位", "GPS"),
    "measureShort": ("测量", "Measure"),
    "copyShort": ("复制", "Copy"),
    "locate": ("定位", "Locate me"),
    "measure": ("测量 距离/面积", "Measure distance / area"),
    "measureHint": ("点击地图添加点", "tap the map to add points"),
    "distance": ("距离", "distance"),
    "area": ("面积", "area"),
    "copy": ("复制坐标", "Copy coordinates"),
    "copied": ("已复制", "copied"),
    "noLocation": ("无法定位", "no location"),
    "before": ("前期", "Before"),
    "after": ("本期", "After"),
    "swipe": ("卷帘", "Swipe"),
    "earlier": ("往月图斑", "Earlier flags"),
    "allMonths": ("全部月份", "all months"),
    "flags": ("本月图斑", "Flags"),
    "cases": ("案件", "Cases"),
    "alerts": ("告警", "Alerts"),
    "permits": ("许可", "Permits"),
    "districts": ("区界", "Districts"),
    "streets": ("街道", "Streets"),
    "grid": ("网格", "Grid cells"),
    "imagery": ("影像", "Imagery"),
    "prev_imagery": ("前期影像", "Previous imagery"),
}


def _label(key: str, language: str) -> str:
    """The bilingual (or one-language) label of ``key``: Chinese first."""
    zh, en = _TEXT[key]
    return {"zh": zh, "en": en}.get(language, f"{zh} {en}")


def _outline_style(color: str, weight: float) -> Any:
    return lambda _f: {"color": color, "weight": weight, "fill": False, "opacity": 0.9}


def _embedded_imagery(
    pair_dir: Path | None, view: Any, flags: gpd.GeoDataFrame, settings: MapSettings
) -> tuple[dict[str, tuple[str, str]], dict[str, str], dict[str, str], Overlay | None, str]:
    """Chips (and the overlay) embedded in the page, for a map without a tile pyramid.

    Returns:
        (chip table key -> (before, after) data URLs, flag id -> key, case id -> key, overlay, prev month).
    """
    if pair_dir is None:
        return {}, {}, {}, None, ""
    crs = view.cases.crs
    with _open_pair(Path(pair_dir)) as pair:
        if not crs.equals(pair.crs):
            raise CRSMismatchError(
                f"{pair_dir} is not in the flags' CRS {crs.to_string()!r}; vectorize the flags from this aligned pair"
            )
        prev_label = str(getattr(pair, "prev", "") or "")
        chips = make_chips(pair, flags, settings)
        colors = {
            str(c): STATE_COLORS.get(str(s), "#000")
            for c, s in zip(view.cases["case_id"], view.cases["state_at"], strict=True)
        }
        # a case whose flag is on the map shows that flag's chips; chips are made for the others
        seen = set(flags["case_id"].astype(str))
        others = view.cases[~view.cases["case_id"].astype(str).isin(seen)]
        case_chips = make_chips(pair, others, settings, id_column="case_id", colors=colors)
        overlay = make_overlay(pair, settings)
    flag_keys = {k: k for k in chips}
    case_keys = {str(c): str(f) for f, c in zip(flags["flag_id"], flags["case_id"], strict=True) if c and f in chips}
    case_keys |= {k: k for k in case_chips}
    return chips | case_chips, flag_keys, case_keys, overlay, prev_label


def build_map(
    month: str,
    ledger_path: Path,
    flags_path: Path,
    out_html: Path,
    *,
    settings: MapSettings,
    layers_dir: Path | None = None,
    pair_dir: Path | None = None,
    tiles_dir: Path | None = None,
) -> Path:
    """Write the month's offline inspector map.

    Args:
        month: ``YYYY-MM``.
        ledger_path: the ledger GeoPackage.
        flags_path: the month's flags GeoPackage.
        out_html: the page to write (parent folders are created).
        settings: the ``map`` section of params.yaml.
        layers_dir: folder with ``districts.gpkg``, ``streets.gpkg``, ``grid.gpkg`` (outlines, 网格 units)
            and ``permits.gpkg``.
        pair_dir: the month's aligned pair folder, for the embedded chips and overlay of a page without
            a pyramid (with one, the page cuts every popup's chips from the pyramid's tiles).
        tiles_dir: the month's tile pyramid (:func:`pipeline.publish.tiles.build_pyramid`), used when
            ``settings.imagery`` is ``"pyramid"``; the page links to it by a relative path.

    Returns:
        ``out_html``.

    Raises:
        MissingInputError: an input file (or the xstatic-leaflet package) is missing.
        InputError: a layer or column is missing.
        CRSMismatchError: the flags and the ledger are in different CRSs.
    """
    import folium

    lang = settings.language
    view = load_month_view(month, Path(ledger_path), Path(flags_path))
    crs = view.cases.crs
    flags = view.flags
    if len(flags) > settings.max_flags:
        log.warning(
            "%d flags in %s; the map keeps the %d largest (map.max_flags)", len(flags), month, settings.max_flags
        )
        flags = flags.sort_values("area_m2", ascending=False).head(settings.max_flags)
    outlines = _read_outlines(Path(layers_dir), crs) if layers_dir is not None else {}
    permits = outlines.pop("permits", None)
    grid = outlines.get("grid")
    pyramid: Pyramid | None = None
    if settings.imagery == "pyramid" and tiles_dir is not None:
        pyramid = read_pyramid(Path(tiles_dir))

    if pyramid is not None:  # every popup's chips are cut from the pyramid in the browser ("@")
        chips: dict[str, tuple[str, str]] = {}
        flag_keys = dict.fromkeys(flags["flag_id"].astype(str), "@")
        case_keys = dict.fromkeys(view.cases["case_id"].astype(str), "@")
        overlay: Overlay | None = None
        prev_label = pyramid.prev
    else:
        chips, flag_keys, case_keys, overlay, prev_label = _embedded_imagery(pair_dir, view, flags, settings)

    extent = pd.concat([g.geometry for g in (flags, view.cases, *outlines.values()) if len(g)])
    if not len(extent):
        raise InputError(f"{flags_path} and {ledger_path} hold nothing for {month}; nothing to map")
    minx, miny, maxx, maxy = gpd.GeoSeries(extent, crs=crs).to_crs(4326).total_bounds
    title = f"ScarWatch {month} " + {"zh": "巡查图", "en": "inspector map"}.get(lang, "巡查图 inspector map")
    fmap = _new_map((minx, miny, maxx, maxy), settings, title)

    prev_layer: Any = None
    curr_layer: Any = None
    minimap: tuple[str, int, int, Any] | None = None
    chip_tiles: dict[str, Any] | None = None
    if pyramid is not None:
        base = Path(out_html).resolve().parent
        bounds = [[pyramid.bounds[1], pyramid.bounds[0]], [pyramid.bounds[3], pyramid.bounds[2]]]
        layers = []
        for epoch, name, show in (
            ("curr", f"{_label('imagery', lang)} {month}", True),
            ("prev", f"{_label('prev_imagery', lang)} {prev_label}".strip(), False),
        ):
            layer = folium.TileLayer(
                pyramid.url(epoch, base),
                attr="ScarWatch",
                name=name,
                overlay=True,
                show=show,
                max_zoom=22,
                max_native_zoom=pyramid.maxzoom,
                min_native_zoom=pyramid.minzoom,
                bounds=bounds,
            )
            layer.add_to(fmap)
            layers.append(layer)
        curr_layer, prev_layer = layers
        minimap = (pyramid.url("curr", base), pyramid.minzoom, pyramid.maxzoom, bounds)
        chip_tiles = {
            "urls": [pyramid.url("prev", base), pyramid.url("curr", base)],
            "minzoom": pyramid.minzoom,
            "maxzoom": pyramid.maxzoom,
            "bounds": bounds,
        }
    elif overlay is not None:
        curr = folium.raster_layers.ImageOverlay(
            overlay.curr_url, bounds=overlay.bounds, name=f"{_label('imagery', lang)} {month}", opacity=1.0
        )
        curr.add_to(fmap)
        prev = folium.raster_layers.ImageOverlay(
            overlay.prev_url,
            bounds=overlay.bounds,
            show=False,
            name=f"{_label('prev_imagery', lang)} {prev_label}".strip(),
        )
        prev.add_to(fmap)
        curr_layer, prev_layer = curr, prev  # before/after toggle (the swipe needs tile layers)
    if settings.tiles:
        folium.TileLayer(
            settings.tiles, attr=settings.tiles_attribution or settings.tiles, name="在线底图 Online tiles", max_zoom=22
        ).add_to(fmap)

    popups = _Popups()
    styles = {"districts": ("#333333", 2.5), "streets": ("#555555", 1.5), "grid": ("#7f7f7f", 0.8)}
    labels = {"districts": "district", "streets": "street", "grid": "cell_id"}
    js_layers: dict[str, Any] = {}
    for key, frame in outlines.items():
        js_layers[key] = folium.GeoJson(
            outline_features(frame, labels[key]),
            name=_label(key, lang),
            style_function=_outline_style(*styles[key]),
            show=key != "grid",
            on_each_feature=_tooltip_js(),
        ).add_to(fmap)
    if permits is not None:
        js_layers["permits"] = folium.GeoJson(
            popups.take(permit_features(permits, month)),
            name=f"{_label('permits', lang)} ({len(permits)})",
            on_each_feature=_popup_js(),
            show=False,
            style_function=lambda f: {"color": "#00a6a6", "weight": 2, "dashArray": "6 4", "fillOpacity": 0.05},
        ).add_to(fmap)
    earlier = popups.take(earlier_flag_features(view))
    if earlier["features"]:
        js_layers["earlier"] = folium.GeoJson(
            earlier,
            name=f"{_label('earlier', lang)} ({len(earlier['features'])})",
            on_each_feature=_popup_js(),
            show=False,
            style_function=lambda f: {"color": "#8c6d31", "weight": 1.5, "dashArray": "3 3", "fillOpacity": 0.05},
        ).add_to(fmap)
    js_layers["cases"] = folium.GeoJson(
        popups.take(case_features(view, grid, case_keys, prev_label)),
        name=f"{_label('cases', lang)} ({len(view.cases)})",
        on_each_feature=_popup_js(),
        style_function=lambda f: {"color": f["properties"]["color"], "weight": 2, "fillOpacity": 0.25},
    ).add_to(fmap)
    js_layers["flags"] = folium.GeoJson(
        popups.take(flag_features(view, flags, grid, flag_keys, prev_label)),
        name=f"{_label('flags', lang)} {month} ({len(flags)})",
        on_each_feature=_popup_js(),
        style_function=lambda f: {"color": f["properties"]["color"], "weight": 3, "fillOpacity": 0.15},
    ).add_to(fmap)
    js_layers["alerts"] = folium.GeoJson(
        popups.take(alert_features(view, case_keys)),
        name=f"{_label('alerts', lang)} ({len(view.alerts)})",
        on_each_feature=_popup_js(),
        marker=folium.CircleMarker(radius=9, color=ALERT_COLOR, weight=3, fill=False),
    ).add_to(fmap)

    legend = legend_html(title)
    header = (
        f'<div class="sw-header">{month} 违法建设变化图斑 Change flags: '
        f"{int((flags['kind'] == 'new').sum())} 新增 new, {int((flags['kind'] == 'removed').sum())} 消失 removed</div>"
    )
    root: Any = fmap.get_root()
    root.html.add_child(_raw(legend + header + popups.script()), name="scarwatch_legend")
    control = folium.LayerControl(collapsed=True)
    control.add_to(fmap)
    months = sorted({f["properties"]["month"] for f in earlier["features"]}, reverse=True)
    fmap.add_child(
        _late_script(
            _init_js(fmap, control, js_layers, prev_layer, curr_layer, minimap, months, lang, chips, chip_tiles)
        )
    )

    out_html = Path(out_html)
    with atomic_path(out_html) as tmp:
        tmp.write_text(fmap.get_root().render(), encoding="utf-8")
    log.info("wrote %s: %d flags, %d cases, %d alerts", str(out_html), len(flags), len(view.cases), len(view.alerts))
    return out_html


def _init_js(
    fmap: Any,
    control: Any,
    layers: dict[str, Any],
    prev: Any,
    curr: Any,
    minimap: tuple[str, int, int, Any] | None,
    months: list[str],
    lang: str,
    chips: dict[str, tuple[str, str]],
    chip_tiles: dict[str, Any] | None,
) -> str:
    """The call that starts ``map_ui.js`` with the page's Leaflet objects (by their folium names)."""

    def name(obj: Any) -> str:
        value = str(obj.get_name())
        if not re.fullmatch(r"\w+", value):
            raise ValueError(f"unexpected folium name {value!r}")
        return value

    text = {k: _label(k, lang) for k in _TEXT}
    text["layer"] = {k: _label(k, lang) for k in ("flags", "cases", "alerts", "permits", "streets", "grid", "earlier")}  # type: ignore[assignment]
    layer_js = ", ".join(f"{_js_json(k)}: {name(v)}" for k, v in layers.items())
    mini = "null"
    if minimap is not None:
        url, zmin, zmax, bounds = minimap
        opts = {"minNativeZoom": zmin, "maxNativeZoom": zmax, "bounds": bounds, "attribution": ""}
        mini = f"L.tileLayer({_js_json(url)}, {_js_json(opts)})"
    search = [k for k in ("cases", "flags", "alerts", "earlier", "permits", "streets", "grid") if k in layers]
    return (
        "SW.init({"
        f"map: {name(fmap)}, control: {name(control)}, layers: {{{layer_js}}}, "
        f"prev: {name(prev) if prev is not None else 'null'}, curr: {name(curr) if curr is not None else 'null'}, "
        f"minimap: {mini}, months: {_js_json(months)}, search: {_js_json(search)}, maxZoom: 22, "
        f"text: {_js_json(text)}, chips: {_js_json(chips)}, chipTiles: {_js_json(chip_tiles)}"
        "});"
    )


def embedded_geojson(html: str) -> dict[str, dict[str, Any]]:
    """The GeoJSON FeatureCollections embedded in a map page, keyed by their LayerControl name.

    Args:
        html: a page written by :func:`build_map`.

    Returns:
        ``{layer name: FeatureCollection}`` in layer order (for tests and checks of a written map), each
        feature's popup HTML back in its ``popup`` property.
    """
    decoder = json.JSONDecoder()
    data: dict[str, dict[str, Any]] = {}
    for match in re.finditer(r"(geo_json_\w+)_add\(\{", html):
        data[match.group(1)], _ = decoder.raw_decode(html, match.end() - 1)
    block = re.search(r"overlays\s*:\s*\{(.*?)\}", html, flags=re.S)
    names = re.findall(r'("(?:[^"\\]|\\.)*")\s*:\s*(\w+)', block.group(1)) if block else []
    table = re.search(rf'<script type="application/json" id="{_POPUPS_ID}">(.*?)</script>', html, flags=re.S)
    popups = json.loads(table.group(1)) if table else []
    for collection in data.values():
        for feature in collection["features"]:
            if "pi" in feature["properties"]:
                feature["properties"]["popup"] = popups[feature["properties"]["pi"]]
    return {json.loads(name): data[var] for name, var in names if var in data}
