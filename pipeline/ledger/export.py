"""Exports of the live ledger for Excel, scripts, phone apps and QGIS/ArcGIS (``scarwatch ledger export``).

One field list per table (:data:`CASE_FIELDS`, :data:`EVENT_FIELDS`, :data:`ALERT_FIELDS`: English name,
Chinese name, type) drives every format, so the headers agree:

- ``xlsx`` (openpyxl): sheets ``案件 cases`` (one row per case), ``事件 events`` (every event, log order)
  and ``提醒 alerts``; headers ``中文 english`` (the form the field-update reader accepts), states and
  kinds in Chinese and English, dates as Excel dates, frozen header row and case-id column, widths, filters.
- ``csv``: the cases, the same headers, UTF-8 with a BOM (Excel opens it as UTF-8).
- ``geojson``: the cases in WGS84 (RFC 7946: lon/lat, no ``crs`` member), English field names.
- ``gpkg``: layers ``cases``, ``events``, ``alerts`` in the ledger's CRS, each of one geometry type
  (MultiPolygon), dates as ``DATE`` fields, the 网格 cell, unit and WGS84 lon/lat on each case; Chinese
  field aliases in the GeoPackage schema extension (``gpkg_data_columns.title``, which GDAL and QGIS read
  as the alias); a default style per layer in the ``layer_styles`` table QGIS reads (QML with a
  categorised renderer, cases coloured by state, events by kind, and the aliases; SLD too).

Every export is written through :func:`pipeline.fileio.atomic_path`: a failure leaves no half file and
any previous export at the path whole. Colours are the caller's (:class:`Palette`; the CLI passes the
inspector map's), so the map, QGIS and the legend agree.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import geopandas as gpd
import pandas as pd

from pipeline.errors import InputError, ScarWatchError
from pipeline.fileio import atomic_path
from pipeline.ledger.labels import STATE_ZH
from pipeline.ledger.lifecycle import STATES
from pipeline.ledger.query import Ledger, alert_table, case_table, kind_zh
from pipeline.ledger.store import typed_dates, write_polygon_layer

log = logging.getLogger(__name__)

FORMATS: Final[tuple[str, ...]] = ("xlsx", "csv", "geojson", "gpkg")
SUFFIX: Final[dict[str, str]] = {"xlsx": ".xlsx", "csv": ".csv", "geojson": ".geojson", "gpkg": ".gpkg"}


@dataclass(frozen=True)
class Field:
    """One exported column: its English name, Chinese name, type and spreadsheet width."""

    name: str
    zh: str
    kind: str = "text"  # text | date | real | int | bool
    width: int = 12
    number_format: str = ""

    @property
    def header(self) -> str:
        """The bilingual header, ``中文 english``."""
        return f"{self.zh} {self.name}"


CASE_FIELDS: Final[tuple[Field, ...]] = (
    Field("case_id", "案件编号", width=17),
    Field("state_zh", "状态", width=8),
    Field("state", "状态代码", width=11),
    Field("category_zh", "类别", width=10),
    Field("category", "类别代码", width=19),
    Field("area_m2", "面积(平方米)", "real", 11, "0.00"),
    Field("area_mu", "面积(亩)", "real", 9, "0.000"),
    Field("district", "区", width=10),
    Field("street", "街道", width=12),
    Field("cell_id", "网格", width=10),
    Field("unit", "责任单位", width=16),
    Field("unit_source", "单位来源", width=9),
    Field("opened_at", "立案日期", "date", 12),
    Field("last_event_at", "最近事件日期", "date", 12),
    Field("due", "到期日", "date", 12),
    Field("due_for", "到期事项", width=9),
    Field("overdue", "是否逾期", "bool", 9),
    Field("deadline", "限期", "date", 12),
    Field("n_events", "事件数", "int", 8),
    Field("first_month", "首次月份", width=10),
    Field("permit_id", "许可证编号", width=13),
    Field("lon_wgs84", "经度WGS84", "real", 12, "0.000000"),
    Field("lat_wgs84", "纬度WGS84", "real", 12, "0.000000"),
)
EVENT_FIELDS: Final[tuple[Field, ...]] = (
    Field("event_id", "事件编号", width=18),
    Field("seq", "序号", "int", 7),
    Field("case_id", "案件编号", width=17),
    Field("at", "日期", "date", 12),
    Field("kind_zh", "事件", width=10),
    Field("kind", "事件代码", width=17),
    Field("source", "来源", width=9),
    Field("actor", "执行人", width=12),
    Field("evidence", "依据", width=30),
    Field("month", "月份", width=9),
    Field("deadline", "限期", "date", 12),
    Field("category", "类别代码", width=19),
    Field("note", "备注", width=30),
)
ALERT_FIELDS: Final[tuple[Field, ...]] = (
    Field("month", "月份", width=9),
    Field("case_id", "案件编号", width=17),
    Field("kind_zh", "提醒", width=16),
    Field("kind", "提醒代码", width=22),
    Field("state", "当前状态代码", width=11),
    Field("message_zh", "说明", width=40),
    Field("message_en", "说明(英文)", width=50),
)
TITLES: Final[dict[str, str]] = {"cases": "案件 cases", "events": "事件 events", "alerts": "提醒 alerts"}
"""Each table's bilingual title: its sheet name in the workbook and its layer description in the GeoPackage."""

KIND_STATE: Final[dict[str, str]] = {"flagged": "warning"} | {s: s for s in STATES}
"""A lifecycle event kind -> the state it leads to (its colour in the events layer's style)."""


@dataclass(frozen=True)
class Palette:
    """Colours (``#rrggbb``) of the exported styles: by state, for alerts, for everything else."""

    states: Mapping[str, str]
    alert: str
    other: str = "#737373"


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_ledger` wrote."""

    out_path: Path
    fmt: str
    n_cases: int
    n_events: int
    n_alerts: int


def check_out_path(out: Path, fmt: str) -> Path:
    """Check an export target before anything is made: an existing, writable folder; the format's suffix.

    Raises:
        InputError: the folder is missing or not writable, the path is a folder, or its suffix is another
            format's.
    """
    out = Path(out)
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: not an export format; use one of {', '.join(FORMATS)}")
    folder = out.parent
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name, e.g. {out / ('ledger' + SUFFIX[fmt])}")
    if not folder.is_dir():
        raise InputError(f"{folder}: the folder of -o {out} does not exist; create it or choose another -o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: the folder of -o {out} is not writable; choose another -o")
    if out.suffix.lower() != SUFFIX[fmt]:
        raise InputError(f"-o {out}: a {fmt} export must end in {SUFFIX[fmt]}; name it {out.with_suffix(SUFFIX[fmt])}")
    return out


def tables(
    ledger: Ledger, layers_dir: Path | None, *, as_of: dt.date
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """The cases, events and alerts as exported (columns of the field lists, the footprints)."""
    cases = case_table(ledger, layers_dir, as_of=as_of)
    events = ledger.events.assign(kind_zh=ledger.events["kind"].map(kind_zh))
    alerts = alert_table(ledger)
    return (
        _select(cases, CASE_FIELDS),
        _select(events, EVENT_FIELDS),
        _select(alerts, ALERT_FIELDS),
    )


def _select(frame: gpd.GeoDataFrame, fields: Sequence[Field]) -> gpd.GeoDataFrame:
    out = pd.DataFrame({f.name: frame[f.name].to_numpy() for f in fields}, index=frame.index)
    return gpd.GeoDataFrame(out, geometry=frame.geometry.to_numpy(), crs=frame.crs).reset_index(drop=True)


def export_ledger(
    ledger: Ledger,
    out: Path,
    fmt: str,
    *,
    layers_dir: Path | None,
    as_of: dt.date,
    palette: Palette,
) -> ExportSummary:
    """Write ``ledger`` to ``out`` as ``fmt`` (one of :data:`FORMATS`), atomically.

    Raises:
        InputError: a bad target (:func:`check_out_path`), or the live ledger itself.
        ScarWatchError: the file cannot be written (nothing is left at ``out`` but what was there).
    """
    out = check_out_path(out, fmt)
    if out.resolve() == ledger.path.resolve():  # the record itself is never an export target
        raise InputError(f"-o {out}: is the live ledger; export to another file")
    cases, events, alerts = tables(ledger, layers_dir, as_of=as_of)
    try:
        with atomic_path(out) as tmp:
            if fmt == "xlsx":
                write_xlsx(tmp, cases, events, alerts)
            elif fmt == "csv":
                _csv_frame(cases, CASE_FIELDS).to_csv(tmp, index=False, encoding="utf-8-sig")
            elif fmt == "geojson":
                write_geojson(tmp, cases)
            else:
                write_gpkg(tmp, {"cases": cases, "events": events, "alerts": alerts}, palette)
    except (OSError, RuntimeError, sqlite3.Error) as exc:  # pyogrio raises RuntimeErrors
        raise ScarWatchError(f"{out}: cannot write the {fmt} export ({exc}); check free space and permissions") from exc
    log.info("exported %d cases, %d events, %d alerts -> %s", len(cases), len(events), len(alerts), out)
    return ExportSummary(out, fmt, len(cases), len(events), len(alerts))


def _csv_frame(frame: pd.DataFrame, fields: Sequence[Field]) -> pd.DataFrame:
    return pd.DataFrame({f.header: frame[f.name] for f in fields})


def _cell(value: object, kind: str) -> object:
    """A value as an Excel cell: dates as ``datetime.date``, "" and NaN as empty."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    if kind == "date":
        return dt.date.fromisoformat(str(value)[:10]) if str(value).strip() else None
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return int(value)  # type: ignore[call-overload]
    if kind == "real":
        return float(value)  # type: ignore[arg-type]
    return str(value) if value != "" else None


def write_xlsx(path: Path, cases: pd.DataFrame, events: pd.DataFrame, alerts: pd.DataFrame) -> None:
    """The workbook: one sheet per table (:data:`TITLES`), bilingual headers, typed cells."""
    from openpyxl import Workbook
    from openpyxl.styles import Font, PatternFill
    from openpyxl.utils import get_column_letter

    book = Workbook()
    book.remove(book.active)
    bold, fill = Font(bold=True), PatternFill("solid", fgColor="DDE5F0")
    for key, frame, fields in (
        ("cases", cases, CASE_FIELDS),
        ("events", events, EVENT_FIELDS),
        ("alerts", alerts, ALERT_FIELDS),
    ):
        sheet = book.create_sheet(TITLES[key])
        sheet.append([f.header for f in fields])
        for cell in sheet[1]:
            cell.font, cell.fill = bold, fill
        columns = [frame[f.name].tolist() for f in fields]
        for row in zip(*columns, strict=True):
            sheet.append([_cell(v, f.kind) for v, f in zip(row, fields, strict=True)])
        for j, f in enumerate(fields, start=1):
            letter = get_column_letter(j)
            sheet.column_dimensions[letter].width = max(f.width, len(f.header) + 2)
            fmt = "yyyy-mm-dd" if f.kind == "date" else f.number_format
            if fmt:
                for (cell,) in sheet.iter_rows(min_row=2, min_col=j, max_col=j):
                    cell.number_format = fmt
        sheet.freeze_panes = "B2" if fields[0].name == "case_id" or key == "events" else "A2"
        sheet.auto_filter.ref = f"A1:{get_column_letter(len(fields))}{max(len(frame) + 1, 1)}"
    book.save(path)


def write_geojson(path: Path, cases: gpd.GeoDataFrame) -> None:
    """The cases as RFC 7946 GeoJSON (WGS84 lon/lat, dates as ISO text, English field names)."""
    wgs84 = cases.to_crs("EPSG:4326")
    for f in CASE_FIELDS:
        if f.kind == "date":  # no date: null, not ""
            wgs84[f.name] = wgs84[f.name].astype(object).where(wgs84[f.name] != "", None)
    wgs84.to_file(path, driver="GeoJSON", engine="pyogrio", layer_options={"RFC7946": "YES", "WRITE_NAME": "NO"})


def _typed(frame: gpd.GeoDataFrame, fields: Sequence[Field]) -> gpd.GeoDataFrame:
    out = frame.copy()
    for f in fields:
        if f.kind == "date":
            out[f.name] = typed_dates(out[f.name])
        elif f.kind == "bool":
            out[f.name] = out[f.name].astype(bool)
    return out


LAYER_FIELDS: Final[dict[str, tuple[Field, ...]]] = {
    "cases": CASE_FIELDS,
    "events": EVENT_FIELDS,
    "alerts": ALERT_FIELDS,
}


def write_gpkg(path: Path, layers: Mapping[str, gpd.GeoDataFrame], palette: Palette) -> None:
    """The GeoPackage: one MultiPolygon layer per table, DATE fields, aliases and default styles."""
    for name, frame in layers.items():
        write_polygon_layer(path, name, _typed(frame, LAYER_FIELDS[name]), description=TITLES[name])
    styles = {name: layer_style(name, frame, palette) for name, frame in layers.items()}
    with sqlite3.connect(path) as db:
        geometry_columns = dict(db.execute("SELECT table_name, column_name FROM gpkg_geometry_columns").fetchall())
        _write_aliases(db, {name: LAYER_FIELDS[name] for name in layers})
        _write_styles(db, styles, geometry_columns)
    db.close()


# -- GeoPackage schema extension: field aliases ------------------------------------------------------
# Written with sqlite3 because neither pyogrio nor geopandas writes field aliases; the tables follow the
# GeoPackage 1.3 schema extension (http://www.geopackage.org/spec/#extension_schema). The alias goes in
# ``title`` (``name`` is UNIQUE across the whole file, and the same field recurs in several layers).
_DATA_COLUMNS_SQL = """CREATE TABLE IF NOT EXISTS gpkg_data_columns (
  table_name TEXT NOT NULL, column_name TEXT NOT NULL, name TEXT, title TEXT, description TEXT,
  mime_type TEXT, constraint_name TEXT,
  CONSTRAINT pk_gdc PRIMARY KEY (table_name, column_name),
  CONSTRAINT gdc_tn UNIQUE (table_name, name))"""
_CONSTRAINTS_SQL = """CREATE TABLE IF NOT EXISTS gpkg_data_column_constraints (
  constraint_name TEXT NOT NULL, constraint_type TEXT NOT NULL, value TEXT, min NUMERIC,
  min_is_inclusive BOOLEAN, max NUMERIC, max_is_inclusive BOOLEAN, description TEXT,
  CONSTRAINT gdcc_ntv UNIQUE (constraint_name, constraint_type, value))"""
SCHEMA_EXTENSION = "http://www.geopackage.org/spec/#extension_schema"


def _write_aliases(db: sqlite3.Connection, layers: Mapping[str, Sequence[Field]]) -> None:
    db.execute(_DATA_COLUMNS_SQL)
    db.execute(_CONSTRAINTS_SQL)
    for table in ("gpkg_data_columns", "gpkg_data_column_constraints"):
        db.execute(
            "INSERT OR IGNORE INTO gpkg_extensions (table_name, column_name, extension_name, definition, scope) "
            "VALUES (?, NULL, 'gpkg_schema', ?, 'read-write')",
            (table, SCHEMA_EXTENSION),
        )
    rows = [(layer, f.name, f.zh, f.header) for layer, fields in layers.items() for f in fields]
    db.executemany(
        "INSERT OR REPLACE INTO gpkg_data_columns (table_name, column_name, title, description) VALUES (?, ?, ?, ?)",
        rows,
    )


# -- QGIS default styles (layer_styles) -----------------------------------------------------------------
# The table as QGIS creates it when it saves a style into a GeoPackage, registered as an attributes table.
_LAYER_STYLES_SQL = """CREATE TABLE IF NOT EXISTS "layer_styles" (
  "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
  "f_table_catalog" TEXT(256), "f_table_schema" TEXT(256), "f_table_name" TEXT(256),
  "f_geometry_column" TEXT(256), "styleName" TEXT(30), "styleQML" TEXT, "styleSLD" TEXT,
  "useAsDefault" BOOLEAN, "description" TEXT, "owner" TEXT(30), "ui" TEXT(30),
  "update_time" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"""


@dataclass(frozen=True)
class LayerStyle:
    """A layer's default style: the attribute it is categorised by, its categories, and both encodings."""

    attribute: str
    categories: tuple[tuple[str, str, str], ...]  # (value, label, #rrggbb)
    qml: str
    sld: str


def _write_styles(
    db: sqlite3.Connection, styles: Mapping[str, LayerStyle], geometry_columns: Mapping[str, str]
) -> None:
    db.execute(_LAYER_STYLES_SQL)
    db.execute(
        "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description, last_change) "
        "VALUES ('layer_styles', 'attributes', 'layer_styles', '', strftime('%Y-%m-%dT%H:%M:%fZ','now'))"
    )
    db.executemany(
        'INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "styleName", '
        '"styleQML", "styleSLD", "useAsDefault", description, owner, ui) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)',
        [
            (
                "",
                "",
                name,
                geometry_columns.get(name, "geom"),
                f"scarwatch {name}",
                s.qml,
                s.sld,
                f"ScarWatch default: {TITLES[name]} by {s.attribute}",
                "scarwatch",
                "",
            )
            for name, s in styles.items()
        ],
    )


def layer_style(name: str, frame: pd.DataFrame, palette: Palette) -> LayerStyle:
    """The default style of an exported layer: cases by state, events by kind, alerts one colour."""
    if name == "cases":
        cats = tuple((s, f"{STATE_ZH[s]} {s}", palette.states.get(s, palette.other)) for s in STATES)
        attribute = "state"
    elif name == "events":
        kinds = sorted(set(frame["kind"].astype(str)) | set(KIND_STATE))
        cats = tuple((k, f"{kind_zh(k)} {k}", palette.states.get(KIND_STATE.get(k, ""), palette.other)) for k in kinds)
        attribute = "kind"
    else:
        kinds = sorted(set(frame["kind"].astype(str)))
        cats = tuple((k, k, palette.alert) for k in kinds)
        attribute = "kind"
    fields = LAYER_FIELDS[name]
    return LayerStyle(attribute, cats, _qml(attribute, cats, fields), _sld(name, attribute, cats))


def _rgb(color: str, alpha: int = 255) -> str:
    c = color.lstrip("#")
    return ",".join(str(int(c[i : i + 2], 16)) for i in (0, 2, 4)) + f",{alpha}"


def _fill_symbol(parent: ET.Element, name: str, color: str) -> None:
    symbol = ET.SubElement(
        parent, "symbol", {"type": "fill", "name": name, "alpha": "1", "clip_to_extent": "1", "force_rhr": "0"}
    )
    layer = ET.SubElement(symbol, "layer", {"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
    props = {
        "color": _rgb(color, 150),
        "outline_color": _rgb(color),
        "outline_style": "solid",
        "outline_width": "0.5",
        "outline_width_unit": "MM",
        "style": "solid",
    }
    options = ET.SubElement(layer, "Option", {"type": "Map"})  # QGIS >= 3.26 reads these, older the props
    for k, v in props.items():
        ET.SubElement(options, "Option", {"type": "QString", "name": k, "value": v})
    for k, v in props.items():
        ET.SubElement(layer, "prop", {"k": k, "v": v})


def _qml(attribute: str, categories: Sequence[tuple[str, str, str]], fields: Sequence[Field]) -> str:
    """A QGIS layer style (QML): a categorised fill renderer on ``attribute`` and the Chinese aliases."""
    root = ET.Element("qgis", {"version": "3.28.0", "styleCategories": "Symbology|Fields|Forms"})
    renderer = ET.SubElement(
        root,
        "renderer-v2",
        {"type": "categorizedSymbol", "attr": attribute, "symbollevels": "0", "enableorderby": "0", "forceraster": "0"},
    )
    cats = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    for i, (value, label, color) in enumerate(categories):
        ET.SubElement(cats, "category", {"value": value, "symbol": str(i), "label": label, "render": "true"})
        _fill_symbol(symbols, str(i), color)
    aliases = ET.SubElement(root, "aliases")
    for i, f in enumerate(fields):
        ET.SubElement(aliases, "alias", {"field": f.name, "index": str(i), "name": f.zh})
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode")


_SLD = "http://www.opengis.net/sld"
_OGC = "http://www.opengis.net/ogc"
_SE = "http://www.opengis.net/se"


def _sld(layer: str, attribute: str, categories: Sequence[tuple[str, str, str]]) -> str:
    """The same categories as an SLD 1.1 (for GIS that read SLD rather than QML)."""
    ET.register_namespace("", _SLD)
    ET.register_namespace("ogc", _OGC)
    ET.register_namespace("se", _SE)
    root = ET.Element(f"{{{_SLD}}}StyledLayerDescriptor", {"version": "1.1.0"})
    named = ET.SubElement(root, f"{{{_SLD}}}NamedLayer")
    ET.SubElement(named, f"{{{_SE}}}Name").text = layer
    style = ET.SubElement(ET.SubElement(named, f"{{{_SLD}}}UserStyle"), f"{{{_SE}}}FeatureTypeStyle")
    for value, label, color in categories:
        rule = ET.SubElement(style, f"{{{_SE}}}Rule")
        ET.SubElement(rule, f"{{{_SE}}}Name").text = value
        ET.SubElement(ET.SubElement(rule, f"{{{_SE}}}Description"), f"{{{_SE}}}Title").text = label
        equal = ET.SubElement(ET.SubElement(rule, f"{{{_OGC}}}Filter"), f"{{{_OGC}}}PropertyIsEqualTo")
        ET.SubElement(equal, f"{{{_OGC}}}PropertyName").text = attribute
        ET.SubElement(equal, f"{{{_OGC}}}Literal").text = value
        polygon = ET.SubElement(rule, f"{{{_SE}}}PolygonSymbolizer")
        fill = ET.SubElement(polygon, f"{{{_SE}}}Fill")
        ET.SubElement(fill, f"{{{_SE}}}SvgParameter", {"name": "fill"}).text = color
        ET.SubElement(fill, f"{{{_SE}}}SvgParameter", {"name": "fill-opacity"}).text = "0.6"
        stroke = ET.SubElement(polygon, f"{{{_SE}}}Stroke")
        ET.SubElement(stroke, f"{{{_SE}}}SvgParameter", {"name": "stroke"}).text = color
    return ET.tostring(root, encoding="unicode", xml_declaration=False)
