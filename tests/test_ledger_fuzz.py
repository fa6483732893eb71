"""Fuzzing the ledger's readers (issue 11): whatever a field-update file (CSV in any encoding, XLSX) or a seed
ledger holds, the ledger answers with its own clear error (a ScarWatchError naming the file and row) or
accepts it, never with another exception; the import's check against a live ledger likewise. About 4,000
cases, bounded to a few seconds each group."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import geopandas as gpd
import openpyxl
import pandas as pd
import pyproj
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import LedgerSettings
from pipeline.errors import ScarWatchError
from pipeline.ledger.builder import LedgerBuilder
from pipeline.ledger.events import FIELD_KINDS
from pipeline.ledger.fieldio import ALIASES, CHINESE_KINDS, read_field_file, read_field_updates
from pipeline.ledger.importer import check_against_ledger
from pipeline.ledger.lifecycle import STATES
from pipeline.ledger.store import read_seed_cases
from tests.test_ledger import CRS, X0, Y0, sq

WORK = Path(tempfile.mkdtemp(prefix="scarwatch-fuzz-"))
CSV = WORK / "2026-03.csv"
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
COLUMNS = ["at", "kind", "actor", "note", "deadline", "case_id", "x", "y"]

cells = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["2026-03-05", "2026-03-31", "2026-02-28", "2026-13-01", "", "nan", "NaN", "inf", "-0"]),
    st.sampled_from([*FIELD_KINDS, "flagged", "observed_present", "Confirmed", " confirmed "]),
    st.sampled_from(["S-1", "SW-202603-0001", "../../etc/passwd", "=cmd|' /C calc'!A0", "<script>", "台账"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers().map(str),
)


def _apply(updates: list) -> None:  # type: ignore[type-arg]
    builder = LedgerBuilder(LedgerSettings(), None)
    builder.seed(
        gpd.GeoDataFrame(
            {
                "case_id": ["S-1"],
                "opened_at": ["2026-01-01"],
                "state": ["warning"],
                "category": ["illegal_construction"],
                "note": [""],
                "deadline": [""],
            },
            geometry=[sq(0, 0)],
            crs=CRS,
        ),
        WORK / "cases.gpkg",
    )
    builder.field(updates)


def _read_and_apply(path: Path = CSV) -> None:
    try:
        updates = read_field_updates(path, "2026-03", f"field_updates/{path.name}", crs=PCRS)
        _apply(updates)
    except ScarWatchError as exc:
        assert str(path) in str(exc), exc  # the message names the file (and the row where there is one)


PCRS = pyproj.CRS.from_user_input(CRS)
XLSX = WORK / "2026-03.xlsx"


@settings(FUZZ, max_examples=500)
@given(st.binary(max_size=300))
def test_field_updates_from_any_bytes(data: bytes) -> None:
    CSV.write_bytes(data)
    _read_and_apply()


@settings(FUZZ, max_examples=500)
@given(st.text(max_size=300))
def test_field_updates_from_any_text(text: str) -> None:
    CSV.write_bytes(text.encode("utf-8", "replace"))
    _read_and_apply()


@settings(FUZZ, max_examples=1200)
@given(
    st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=9),
    st.lists(st.lists(cells, min_size=0, max_size=10), max_size=6),
)
def test_field_updates_with_a_header_and_any_cells(header: list[str], rows: list[list[str]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    CSV.write_text(buf.getvalue(), encoding="utf-8")
    _read_and_apply()


#: Every header contract C4 accepts (aliases, bilingual pairs), a GCJ-02 column and junk.
C4_HEADERS = sorted(
    {a for aliases in ALIASES.values() for a in aliases}
    | {f"{aliases[-1]} {aliases[0]}" for aliases in ALIASES.values()}
    | {"经度GCJ02 lon_gcj02", "面积(亩) area_mu", "", " ", "核查期限 due"}
)
c4_cells = st.one_of(
    cells,
    st.sampled_from([*CHINESE_KINDS, "确认 confirmed", "拆除 stopped", "2026/3/2", "2026年3月31日", "2026.3.2"]),
    st.sampled_from(["2026-3-2 10:00", "46083", "46083.5", "1e308", "-1", "125.9", "43.9", "500010", "4860010"]),
    st.sampled_from(["SW-202602-0001", "SW-202603-F001", "S-2"]),
    st.floats(min_value=124, max_value=128).map(lambda v: f"{v:.6f}"),
)


@st.composite
def c4_tables(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    header = draw(st.lists(st.sampled_from(C4_HEADERS), min_size=1, max_size=8))
    rows = draw(st.lists(st.lists(c4_cells, min_size=0, max_size=len(header) + 1), max_size=5))
    return header, rows


def _live() -> tuple[pd.DataFrame, gpd.GeoDataFrame]:
    builder = LedgerBuilder(LedgerSettings(), None)
    builder.seed(
        gpd.GeoDataFrame(
            {
                "case_id": ["S-1", "S-2"],
                "opened_at": ["2026-01-01", "2026-01-01"],
                "state": ["warning", "closed"],
                "category": ["illegal_construction"] * 2,
                "note": ["", ""],
                "deadline": ["", ""],
            },
            geometry=[sq(0, 0), sq(40, 0)],
            crs=CRS,
        ),
        WORK / "cases.gpkg",
    )
    events, cases, _ = builder.frames(PCRS)
    return events, cases


LIVE = _live()


def _check_as_import(path: Path, month: str | None) -> None:
    """What ``ledger import`` does before writing: read, then check against a live ledger."""
    try:
        ff = read_field_file(path, source=f"field_updates/{path.name}", month=month, crs=PCRS)
        check_against_ledger(ff, *LIVE, LedgerSettings())
    except ScarWatchError as exc:
        assert str(path) in str(exc), exc


@settings(FUZZ, max_examples=400)
@given(c4_tables(), st.sampled_from(["utf-8", "utf-8-sig", "gbk", "gb18030"]), st.sampled_from(["2026-03", None]))
def test_field_updates_with_c4_headers_in_any_encoding(
    table: tuple[list[str], list[list[str]]], encoding: str, month: str | None
) -> None:
    import csv
    import io

    header, rows = table
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    CSV.write_bytes(buf.getvalue().encode(encoding, "replace"))
    _read_and_apply()
    _check_as_import(CSV, month)


xlsx_cells = st.one_of(
    c4_cells,
    st.none(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.dates(min_value=dt.date(1900, 3, 1), max_value=dt.date(2100, 1, 1)),
    st.datetimes(min_value=dt.datetime(1900, 3, 1), max_value=dt.datetime(2100, 1, 1)),
    st.booleans(),
)


@settings(FUZZ, max_examples=150)
@given(
    st.lists(st.sampled_from(C4_HEADERS), min_size=1, max_size=8),
    st.lists(st.lists(xlsx_cells, max_size=9), max_size=5),
    st.sampled_from(["派单", "Sheet1"]),
)
def test_field_updates_as_xlsx_with_any_cells(header: list[str], rows: list[list[object]], sheet: str) -> None:
    from openpyxl.utils.exceptions import IllegalCharacterError

    book = openpyxl.Workbook()
    ws = book.active
    assert ws is not None
    ws.title = sheet
    try:
        ws.append(header)
        for r in rows:
            ws.append(r)
    except IllegalCharacterError:  # a control character openpyxl refuses to write: no workbook Excel makes
        return
    book.create_sheet("other")
    book.save(XLSX)
    _read_and_apply(XLSX)
    _check_as_import(XLSX, None)


@settings(FUZZ, max_examples=100)
@given(st.binary(max_size=400))
def test_field_updates_xlsx_from_any_bytes(data: bytes) -> None:
    XLSX.write_bytes(b"PK\x03\x04" + data if data[:1] == b"\x00" else data)
    _read_and_apply(XLSX)


geometries = st.one_of(
    st.just(sq(0, 0)),
    st.just(None),
    st.just(shapely.Polygon()),
    st.just(shapely.Point(X0, Y0)),
    st.just(shapely.Polygon([(X0, Y0), (X0 + 10, Y0 + 10), (X0 + 10, Y0), (X0, Y0 + 10)])),  # a bow tie
    st.just(shapely.LineString([(X0, Y0), (X0 + 5, Y0)])),
    st.just(shapely.MultiPolygon([sq(0, 0), sq(50, 50)])),
)
values = st.one_of(st.none(), st.text(max_size=10), st.floats(), st.integers(), st.sampled_from(["", "2026-01-05"]))


@st.composite
def seed_frames(draw: st.DrawFn) -> gpd.GeoDataFrame:
    n = draw(st.integers(min_value=1, max_value=4))
    rows = []
    for _ in range(n):
        rows.append(
            {
                "case_id": draw(st.one_of(values, st.sampled_from(["S-1", "S-2", "SW-202603-0001"]))),
                "opened_at": draw(st.one_of(values, st.sampled_from(["2026-01-01", "2025-13-40", "2026-02-03T10:00"]))),
                "state": draw(st.one_of(values, st.sampled_from(STATES))),
                "category": draw(st.one_of(values, st.sampled_from(["illegal_construction", "scar"]))),
                "note": draw(values),
                "deadline": draw(st.one_of(values, st.sampled_from(["2026-06-30", "soon"]))),
            }
        )
    geoms = [draw(geometries) for _ in range(n)]
    return gpd.GeoDataFrame(pd.DataFrame(rows), geometry=gpd.GeoSeries(geoms, crs=CRS), crs=CRS)


@settings(FUZZ, max_examples=800)
@given(seed_frames())
def test_seed_cases_with_any_values(frame: gpd.GeoDataFrame) -> None:
    try:
        LedgerBuilder(LedgerSettings(), None).seed(frame, WORK / "cases.gpkg")
    except ScarWatchError as exc:
        assert "cases.gpkg feature" in str(exc), exc


@settings(FUZZ, max_examples=60)
@given(seed_frames())
def test_seed_ledger_files_with_any_values(frame: gpd.GeoDataFrame) -> None:
    path = WORK / "seed" / "cases.gpkg"
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    try:
        frame.to_file(path, layer="cases", driver="GPKG", engine="pyogrio")
    except Exception:  # noqa: BLE001 - a frame GDAL cannot store is no input a city can deliver
        return
    try:
        seeds = read_seed_cases(path)
        assert seeds is not None
        LedgerBuilder(LedgerSettings(), None).seed(seeds, path)
    except ScarWatchError as exc:
        assert str(path) in str(exc), exc


@settings(FUZZ, max_examples=40)
@given(st.binary(min_size=0, max_size=2000))
def test_a_seed_ledger_of_garbage_bytes(data: bytes) -> None:
    path = WORK / "garbage" / "cases.gpkg"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    try:
        read_seed_cases(path)
    except ScarWatchError as exc:
        assert str(path) in str(exc), exc
