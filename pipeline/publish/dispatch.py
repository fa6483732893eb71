"""The month's dispatch lists (派单): one XLSX, CSV and GeoJSON per responsible unit, and an index.

:func:`write_dispatch` reads the ledger's ``dispatched`` events of a month (the ledger build makes them:
:mod:`pipeline.ledger.build`) and writes, per unit, into ``<reports>/dispatch/<month>/``:

- ``<unit>.xlsx``: sheet ``派单`` with the headers of :data:`COLUMNS` (contract C3 of issue 12), one row per
  case, dates as dates, the before/after chips of the aligned pair embedded (the map's chips:
  :func:`pipeline.publish.mapimagery.make_chips`), the inspector's blank columns (a dropdown of the Chinese
  findings), a frozen header; a second sheet ``说明 notes`` says which datum each coordinate column is in.
  The returned sheet, filled in, is a field-update file (the field-update reader accepts these headers).
- ``<unit>.csv``: the same columns but the images, UTF-8 with a BOM (Excel opens it as UTF-8).
- ``<unit>.geojson``: RFC 7946 (WGS84 lon/lat), one feature per case, its footprint, the CSV's fields.
- ``dispatch.json``: the index: month, units, their files and case counts (``units`` empty when the month
  dispatched nothing, and ``note`` says so).

A unit with nothing dispatched in the month gets no files. The folder is written beside its destination and
swapped in whole (:func:`pipeline.fileio.replace_dir`): a failure leaves the previous lists as they were.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from pipeline.config import DispatchSettings, MapSettings
from pipeline.errors import MissingInputError
from pipeline.fileio import replace_dir, temp_dir
from pipeline.formats import MU_M2
from pipeline.ledger import read_ledger

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "案件编号 case_id",
    "变化类型 change",
    "面积(平方米) area_m2",
    "面积(亩) area_mu",
    "区 district",
    "街道 street",
    "网格 cell_id",
    "责任单位 unit",
    "经度WGS84 lon_wgs84",
    "纬度WGS84 lat_wgs84",
    "经度GCJ02 lon_gcj02",
    "纬度GCJ02 lat_gcj02",
    "派单日期 dispatched_at",
    "核查期限 due",
    "前期影像 before",
    "后期影像 after",
    "核查结果 finding",
    "核查日期 checked_at",
    "核查人 inspector",
    "限期 deadline",
    "备注 note",
)
"""The dispatch list's headers, in order (contract C3)."""
IMAGE_COLUMNS: tuple[str, str] = ("前期影像 before", "后期影像 after")
INSPECTOR_COLUMNS: tuple[str, ...] = COLUMNS[-5:]
CSV_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in IMAGE_COLUMNS)
SHEET = "派单"
INDEX = "dispatch.json"
FINDINGS_ZH: tuple[str, ...] = ("确认", "排除", "制止", "限期处置", "拆除", "修复", "销号")
"""The inspector's findings offered in the XLSX dropdown (the field-update reader's Chinese kinds)."""
CHANGE_TEXT: dict[str, str] = {
    "flagged": "新增 new",
    "observed_removed": "拆除 removed",
    "rebuilt": "反弹 rebuilt",
    "expanded": "扩建 expanded",
}
"""The imagery event behind a dispatch → the list's ``变化类型 change``."""
UNASSIGNED = "未分配单位"
"""File name (and index entry) of the cases that no layer gave a unit."""
DATUM_NOTES: dict[str, str] = {
    "经度WGS84 lon_wgs84": "WGS84 (EPSG:4326) 经度, GPS 坐标 / WGS84 longitude (GPS); 导入现场核查时可用",
    "纬度WGS84 lat_wgs84": "WGS84 (EPSG:4326) 纬度, GPS 坐标 / WGS84 latitude (GPS)",
    "经度GCJ02 lon_gcj02": "GCJ-02 火星坐标 经度, 高德等地图用 / GCJ-02 longitude for Amap-style apps (no import)",
    "纬度GCJ02 lat_gcj02": "GCJ-02 火星坐标 纬度 / GCJ-02 latitude (outside China equal to WGS84)",
}


# -- GCJ-02 -------------------------------------------------------------------------------------------
# The WGS84 -> GCJ-02 transform is written here: the PyPI packages for it (eviltransform 2018, coord-convert
# 2019, prcoords 2019 and a few recent single-author forks) are unmaintained or little used, and the
# transform is one public closed formula (the Krasovsky-ellipsoid offset polynomial) best kept in view.
_GCJ_A = 6378245.0  # semi-major axis (m) of the Krasovsky 1940 ellipsoid the transform uses
_GCJ_EE = 0.00669342162296594323  # its first eccentricity squared
CHINA_BOUNDS = (72.004, 0.8293, 137.8347, 55.8271)
"""(west, south, east, north): where GCJ-02 applies; outside it GCJ-02 equals WGS84."""


def _offset_poly(x: np.ndarray, y: np.ndarray, *, lat: bool) -> np.ndarray:
    """The transform's offset polynomial in (x, y) = (lon - 105, lat - 35), for latitude or longitude."""
    pi = math.pi
    wave = (20.0 * np.sin(6.0 * x * pi) + 20.0 * np.sin(2.0 * x * pi)) * 2.0 / 3.0
    if lat:
        base = -100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y + 0.2 * np.sqrt(np.abs(x))
        wave += (20.0 * np.sin(y * pi) + 40.0 * np.sin(y / 3.0 * pi)) * 2.0 / 3.0
        wave += (160.0 * np.sin(y / 12.0 * pi) + 320.0 * np.sin(y * pi / 30.0)) * 2.0 / 3.0
    else:
        base = 300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y + 0.1 * np.sqrt(np.abs(x))
        wave += (20.0 * np.sin(x * pi) + 40.0 * np.sin(x / 3.0 * pi)) * 2.0 / 3.0
        wave += (150.0 * np.sin(x / 12.0 * pi) + 300.0 * np.sin(x / 30.0 * pi)) * 2.0 / 3.0
    return np.asarray(base + wave)


def wgs84_to_gcj02(
    lon: Sequence[float] | np.ndarray, lat: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 lon/lat (degrees) → GCJ-02 lon/lat; points outside :data:`CHINA_BOUNDS` are returned unchanged."""
    lon, lat = np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)
    west, south, east, north = CHINA_BOUNDS
    inside = (lon >= west) & (lon <= east) & (lat >= south) & (lat <= north)
    x, y = lon - 105.0, lat - 35.0
    rad = np.radians(lat)
    magic = 1.0 - _GCJ_EE * np.sin(rad) ** 2
    dlat = np.degrees(_offset_poly(x, y, lat=True) * np.sqrt(magic) * magic / (_GCJ_A * (1.0 - _GCJ_EE)))
    dlon = np.degrees(_offset_poly(x, y, lat=False) * np.sqrt(magic) / (_GCJ_A * np.cos(rad)))
    return np.where(inside, lon + dlon, lon), np.where(inside, lat + dlat, lat)


# -- the lists ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DispatchSummary:
    """What :func:`write_dispatch` wrote."""

    out_dir: Path
    month: str
    n_cases: int
    units: dict[str, int] = field(default_factory=dict)  # unit -> cases dispatched to it in the month
    files: dict[str, str] = field(default_factory=dict)  # unit -> the stem of its files


_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|\s]+')


def safe_name(unit: str) -> str:
    """A file stem for ``unit``: Chinese characters kept, anything unsafe in a file name replaced.

    Path separators, control and Windows-reserved characters and blanks become ``_``; at most 80 characters;
    an empty unit is :data:`UNASSIGNED`.
    """
    stem = _UNSAFE.sub("_", unit).strip("._ ")[:80].rstrip("._ ")
    return stem or UNASSIGNED


def _stems(units: Sequence[str]) -> dict[str, str]:
    """Each unit's file stem, made unique (``-2``, ``-3`` …) where two units sanitise alike."""
    out: dict[str, str] = {}
    taken: set[str] = {Path(INDEX).stem}
    for unit in units:
        stem, n = safe_name(unit), 1
        while stem.lower() in taken:
            n += 1
            stem = f"{safe_name(unit)}-{n}"
        taken.add(stem.lower())
        out[unit] = stem
    return out


def dispatch_rows(month: str, events: pd.DataFrame, cases: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """One row per case dispatched in ``month`` (its latest dispatch that month), in the columns of the CSV.

    The geometry is the case's footprint (ledger CRS); ``_unit`` holds the unit ("" when none).
    """
    disp = events[(events["kind"] == "dispatched") & (events["month"] == month)].sort_values("seq")
    disp = disp.drop_duplicates("case_id", keep="last")
    by_case = cases.set_index("case_id")
    disp = disp[disp["case_id"].isin(by_case.index)]
    imagery = events[events["kind"].isin(list(CHANGE_TEXT)) & events["case_id"].isin(disp["case_id"])]
    seen_by_case = {str(c): g.sort_values("seq") for c, g in imagery.groupby("case_id")}
    rows: list[dict[str, Any]] = []
    geoms = []
    for e in disp.itertuples(index=False):
        case = by_case.loc[e.case_id]
        seen = seen_by_case.get(str(e.case_id), imagery.iloc[:0])
        seen = seen[seen["seq"] < e.seq]  # the latest imagery change before this dispatch
        change = CHANGE_TEXT[str(seen["kind"].iloc[-1])] if len(seen) else CHANGE_TEXT["flagged"]
        area = float(case["area_m2"])
        cell = str(e.note) if str(e.evidence).startswith("layers/grid.gpkg:") else ""
        rows.append(
            {
                "案件编号 case_id": str(e.case_id),
                "变化类型 change": change,
                "面积(平方米) area_m2": round(area, 1),
                "面积(亩) area_mu": round(area / MU_M2, 3),
                "区 district": str(case["district"]),
                "街道 street": str(case["street"]),
                "网格 cell_id": cell,
                "责任单位 unit": str(e.actor),
                "派单日期 dispatched_at": dt.date.fromisoformat(str(e.at)[:10]),
                "核查期限 due": dt.date.fromisoformat(str(e.deadline)[:10]) if e.deadline else None,
                "_unit": str(e.actor),
            }
        )
        geoms.append(case.geometry)
    frame = gpd.GeoDataFrame(pd.DataFrame(rows), geometry=gpd.GeoSeries(geoms, crs=cases.crs), crs=cases.crs)
    if frame.empty:
        return frame
    points = frame.geometry.representative_point().to_crs(4326)
    lon, lat = points.x.to_numpy(), points.y.to_numpy()
    glon, glat = wgs84_to_gcj02(lon, lat)
    frame["经度WGS84 lon_wgs84"], frame["纬度WGS84 lat_wgs84"] = lon.round(7), lat.round(7)
    frame["经度GCJ02 lon_gcj02"], frame["纬度GCJ02 lat_gcj02"] = glon.round(7), glat.round(7)
    for col in INSPECTOR_COLUMNS:
        frame[col] = ""
    return frame.sort_values(["_unit", "案件编号 case_id"]).reset_index(drop=True)


def _chips(pair_dir: Path | None, rows: gpd.GeoDataFrame, settings: DispatchSettings) -> dict[str, tuple[bytes, bytes]]:
    """Before/after JPEG chips of each case from the month's aligned pair (the map's chips), by case id."""
    if pair_dir is None or rows.empty:
        return {}
    if not (Path(pair_dir) / "pair.json").is_file():
        log.warning("%s: no aligned pair; the dispatch lists carry no before/after images", pair_dir)
        return {}
    from pipeline.pair import AlignedPair
    from pipeline.publish.mapimagery import make_chips

    frame = gpd.GeoDataFrame(
        {"case_id": rows["案件编号 case_id"], "area_m2": rows["面积(平方米) area_m2"], "kind": "new"},
        geometry=rows.geometry.values,
        crs=rows.crs,
    )
    chip_settings = MapSettings.model_validate(
        {"max_chips": len(frame), "chip_px": settings.thumbnail_px, "chip_margin_m": settings.chip_margin_m}
    )
    with AlignedPair.open(Path(pair_dir)) as pair:
        urls = make_chips(pair, frame, chip_settings, id_column="case_id")

    def data(url: str) -> bytes:
        return base64.b64decode(url.split(",", 1)[1])

    return {case_id: (data(a), data(b)) for case_id, (a, b) in urls.items()}


def _write_xlsx(path: Path, rows: gpd.GeoDataFrame, chips: dict[str, tuple[bytes, bytes]], px: int) -> None:
    from openpyxl import Workbook
    from openpyxl.comments import Comment
    from openpyxl.drawing.image import Image
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet.datavalidation import DataValidation

    wb = Workbook()
    ws = wb.active
    assert ws is not None
    ws.title = SHEET
    ws.append(list(COLUMNS))
    letter = {c: get_column_letter(i + 1) for i, c in enumerate(COLUMNS)}
    bold, fill = Font(bold=True), PatternFill("solid", fgColor="DDEBF7")
    for i, name in enumerate(COLUMNS, start=1):
        cell = ws.cell(row=1, column=i)
        cell.font, cell.alignment = bold, Alignment(wrap_text=True, vertical="center")
        if name in INSPECTOR_COLUMNS:
            cell.fill = PatternFill("solid", fgColor="FFF2CC")  # the inspector fills these
        else:
            cell.fill = fill
        if name in DATUM_NOTES:
            cell.comment = Comment(DATUM_NOTES[name], "ScarWatch")
    formats = {
        "面积(平方米) area_m2": "0.0",
        "面积(亩) area_mu": "0.000",
        "经度WGS84 lon_wgs84": "0.000000",
        "纬度WGS84 lat_wgs84": "0.000000",
        "经度GCJ02 lon_gcj02": "0.000000",
        "纬度GCJ02 lat_gcj02": "0.000000",
        "派单日期 dispatched_at": "yyyy-mm-dd",
        "核查期限 due": "yyyy-mm-dd",
        "核查日期 checked_at": "yyyy-mm-dd",
        "限期 deadline": "yyyy-mm-dd",
    }
    row_height = px * 0.75 + 6  # points; the chip is px pixels (96 dpi)
    for r, rec in enumerate(rows.to_dict("records"), start=2):
        for i, name in enumerate(COLUMNS, start=1):
            value = None if name in IMAGE_COLUMNS else rec.get(name)
            cell = ws.cell(row=r, column=i, value=None if value == "" else value)
            if name in formats:
                cell.number_format = formats[name]
            cell.alignment = Alignment(vertical="center")
        case_id = str(rec["案件编号 case_id"])
        if case_id in chips:
            for name, jpeg in zip(IMAGE_COLUMNS, chips[case_id], strict=True):
                image = Image(io.BytesIO(jpeg))
                image.width = image.height = px
                ws.add_image(image, f"{letter[name]}{r}")
            ws.row_dimensions[r].height = row_height
    last = max(2, len(rows) + 1)
    finding = DataValidation(
        type="list",
        formula1='"' + ",".join(FINDINGS_ZH) + '"',
        allow_blank=True,
        showErrorMessage=False,  # English kinds are accepted too
        showInputMessage=True,
        promptTitle="核查结果 finding",
        prompt="确认/排除/制止/限期处置/拆除/修复/销号 (or the English kind)",
    )
    ws.add_data_validation(finding)
    finding.add(f"{letter['核查结果 finding']}2:{letter['核查结果 finding']}{last}")
    widths: dict[str, float] = {name: max(10, min(24, len(name) + 2)) for name in COLUMNS}
    widths.update({"责任单位 unit": 26, "变化类型 change": 14, "备注 note": 30})
    widths.update({name: px / 7 + 2 for name in IMAGE_COLUMNS})  # Excel column width ~ 7 px per unit
    for name, width in widths.items():
        ws.column_dimensions[letter[name]].width = width
    ws.row_dimensions[1].height = 32
    ws.freeze_panes = "B2"
    ws.auto_filter.ref = f"A1:{letter[COLUMNS[-1]]}{last}"
    notes = wb.create_sheet("说明 notes")
    notes.append(["列 column", "说明 meaning"])
    for name, text in DATUM_NOTES.items():
        notes.append([name, text])
    notes.append(["核查结果 finding", "填写 " + "、".join(FINDINGS_ZH) + " 之一 (or the English kind)"])
    notes.append(["核查日期 checked_at", "核查当天的日期 / the date of the check (finding and date go together)"])
    notes.append(["限期 deadline", "限期处置的期限 / the deadline of an order (限期处置)"])
    notes.column_dimensions["A"].width, notes.column_dimensions["B"].width = 24, 90
    wb.save(path)


def _csv_value(value: Any) -> Any:
    if isinstance(value, dt.date):
        return value.isoformat()
    return "" if value is None else value


def _write_csv(path: Path, rows: gpd.GeoDataFrame) -> None:
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for rec in rows.to_dict("records"):
            writer.writerow([_csv_value(rec[c]) for c in CSV_COLUMNS])


def _write_geojson(path: Path, rows: gpd.GeoDataFrame) -> None:
    """RFC 7946: WGS84 lon/lat (no ``crs`` member), exteriors counter-clockwise, about 1 cm precision."""
    geoms = shapely.set_precision(rows.geometry.to_crs(4326).values, 1e-7)
    features = []
    for rec, geom in zip(rows.to_dict("records"), geoms, strict=True):
        parts = [shapely.geometry.polygon.orient(p, 1.0) for p in shapely.get_parts(geom) if p.geom_type == "Polygon"]
        shape = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
        features.append(
            {
                "type": "Feature",
                "id": str(rec["案件编号 case_id"]),
                "properties": {c: _csv_value(rec[c]) for c in CSV_COLUMNS},
                "geometry": shapely.geometry.mapping(shape),
            }
        )
    text = json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False, indent=1)
    path.write_text(text + "\n", encoding="utf-8")


def write_dispatch(
    month: str,
    ledger_path: Path,
    out_dir: Path,
    *,
    settings: DispatchSettings,
    pair_dir: Path | None = None,
) -> DispatchSummary:
    """Write the dispatch lists of ``month`` (every case the ledger dispatched that month), one generation.

    Args:
        month: ``YYYY-MM``.
        ledger_path: the ledger GeoPackage (its ``dispatched`` events and ``cases``).
        out_dir: ``<reports>/dispatch/<month>``; replaced whole.
        settings: the ``dispatch`` section of params.yaml (chip size).
        pair_dir: the month's aligned pair, for the before/after chips (absent: lists without images).

    Returns:
        A :class:`DispatchSummary`.

    Raises:
        MissingInputError, CorruptFileError: the ledger is missing or unreadable.
    """
    ledger_path, out_dir = Path(ledger_path), Path(out_dir)
    if not ledger_path.is_file():
        raise MissingInputError(f"{ledger_path}: ledger not found; run `scarwatch ledger build` first")
    events, cases, _ = read_ledger(ledger_path)
    rows = dispatch_rows(month, events, cases)
    chips = _chips(pair_dir, rows, settings)
    units = list(dict.fromkeys(rows["_unit"])) if not rows.empty else []
    stems = _stems(units)
    counts = {u: int((rows["_unit"] == u).sum()) for u in units}
    index: dict[str, Any] = {
        "format": "scarwatch-dispatch/1",
        "month": month,
        "ledger": str(ledger_path),
        "n_cases": len(rows),
        "units": [
            {
                "unit": u or UNASSIGNED,
                "files": {ext: f"{stems[u]}.{ext}" for ext in ("xlsx", "csv", "geojson")},
                "n_cases": counts[u],
                "case_ids": rows.loc[rows["_unit"] == u, "案件编号 case_id"].tolist(),
            }
            for u in units
        ],
    }
    if rows.empty:
        index["note"] = f"{month}: 本月无派单 / nothing was dispatched this month"
        log.warning("%s: the ledger dispatched no case this month; the index says so and no list is written", month)
    tmp = temp_dir(out_dir)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the lists are for sharing
        for u in units:
            part = rows[rows["_unit"] == u].reset_index(drop=True)
            _write_xlsx(tmp / f"{stems[u]}.xlsx", part, chips, settings.thumbnail_px)
            _write_csv(tmp / f"{stems[u]}.csv", part)
            _write_geojson(tmp / f"{stems[u]}.geojson", part)
        (tmp / INDEX).write_text(json.dumps(index, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: %d cases dispatched to %d units -> %s", month, len(rows), len(units), out_dir)
    return DispatchSummary(out_dir, month, len(rows), counts, {u: stems[u] for u in units})
