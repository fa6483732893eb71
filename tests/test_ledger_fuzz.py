"""Fuzzing the ledger's readers (issue 11): whatever a field-update CSV or a seed ledger holds, the ledger
answers with its own clear error (a ScarWatchError naming the file and row) or accepts it, never with
another exception. About 3,000 cases, bounded to a few seconds each group."""

from __future__ import annotations

import tempfile
from pathlib import Path

import geopandas as gpd
import pandas as pd
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import LedgerSettings
from pipeline.errors import ScarWatchError
from pipeline.ledger.builder import LedgerBuilder
from pipeline.ledger.events import FIELD_KINDS
from pipeline.ledger.lifecycle import STATES
from pipeline.ledger.store import read_field_updates, read_seed_cases
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


def _read_and_apply() -> None:
    try:
        updates = read_field_updates(CSV, "2026-03", "field_updates/2026-03.csv")
        _apply(updates)
    except ScarWatchError as exc:
        assert str(CSV) in str(exc), exc  # the message names the file (and the row where there is one)


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
