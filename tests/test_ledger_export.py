"""`scarwatch ledger export` and the live ledger's GeoPackage types: every export reads back with the ledger's content.

The project and ledger are those of :mod:`tests.test_ledger_commands` (built by ``scarwatch ledger build``).
XLSX is read with openpyxl (sheets, headers, typed cells), CSV with pandas (BOM), GeoJSON and GeoPackage
with pyogrio/geopandas and sqlite3 (geometry types, DATE fields, ``layer_styles``, ``gpkg_data_columns``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import openpyxl
import pandas as pd
import pyogrio
import pytest

from pipeline.ledger import export as ledger_export
from pipeline.ledger import read_ledger
from pipeline.ledger.export import CASE_FIELDS, EVENT_FIELDS
from pipeline.ledger.labels import STATE_ZH
from pipeline.ledger.lifecycle import STATES
from pipeline.publish.maplayers import STATE_COLORS
from tests.ledger_project import cli
from tests.test_ledger_commands import make_ledger_project, run, unit_at

AS_OF = "2026-03-31"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ledger_project(tmp_path_factory.mktemp("ledgerexport"))


@pytest.fixture(scope="module")
def ledger(project: Path) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, gpd.GeoDataFrame]:
    return read_ledger(project / "processed" / "ledger.gpkg")


def export(project: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, out: str | None = None) -> Path:
    args = ["ledger", "export", "--format", fmt, "--as-of", AS_OF] + (["-o", out] if out else [])
    result = run(project, *args, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.stderr
    path = project / (out or f"reports/ledger/ledger.{fmt}")
    assert result.stdout.startswith("7 cases, ") and str(path.relative_to(project)) in result.stdout
    return path


def test_xlsx_has_bilingual_sheets_typed_dates_and_every_event(
    project: Path, ledger: tuple[gpd.GeoDataFrame, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    events, cases, _ = ledger
    book = openpyxl.load_workbook(export(project, monkeypatch, "xlsx"))
    assert book.sheetnames == ["案件 cases", "事件 events", "提醒 alerts"]
    sheet = book["案件 cases"]
    header = [c.value for c in sheet[1]]
    assert header == [f.header for f in CASE_FIELDS]
    assert header[:3] == ["案件编号 case_id", "状态 state_zh", "状态代码 state"]
    assert sheet.freeze_panes == "B2" and sheet.column_dimensions["A"].width >= 17
    rows = {r[0].value: {h: c for h, c in zip(header, r, strict=True)} for r in sheet.iter_rows(min_row=2)}
    assert set(rows) == set(cases["case_id"])
    for case in cases.itertuples():
        row = rows[case.case_id]
        assert (row["状态 state_zh"].value, row["状态代码 state"].value) == (STATE_ZH[case.state], case.state)
        opened = row["立案日期 opened_at"]
        assert opened.is_date and opened.value.date() == dt.date.fromisoformat(case.opened_at)
        assert row["面积(平方米) area_m2"].value == pytest.approx(case.area_m2)
    s2 = rows["S-2"]
    assert s2["到期日 due"].is_date and s2["到期日 due"].value.date() == dt.date(2026, 2, 20)
    assert s2["是否逾期 overdue"].value is True and s2["责任单位 unit"].value == "网格一组"
    ev = book["事件 events"]
    ev_header = [c.value for c in ev[1]]
    assert ev_header == [f.header for f in EVENT_FIELDS]
    got = [(r[0].value, r[1].value, r[3].value.date().isoformat(), r[5].value) for r in ev.iter_rows(min_row=2)]
    assert got == list(zip(events["event_id"], events["seq"], events["at"], events["kind"], strict=True))
    assert all(r[3].is_date for r in ev.iter_rows(min_row=2))


def test_csv_is_utf8_with_bom_and_the_same_headers(
    project: Path, ledger: tuple[gpd.GeoDataFrame, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = export(project, monkeypatch, "csv", "cases.csv")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    table = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    assert list(table.columns) == [f.header for f in CASE_FIELDS]
    _, cases, _ = ledger
    got = dict(zip(table["案件编号 case_id"], table["状态 state_zh"], strict=True))
    assert got == {c: STATE_ZH[s] for c, s in zip(cases["case_id"], cases["state"], strict=True)}


def test_geojson_is_wgs84_rfc7946(
    project: Path, ledger: tuple[gpd.GeoDataFrame, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = export(project, monkeypatch, "geojson")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert "crs" not in doc and len(doc["features"]) == 7
    frame = gpd.read_file(path)
    assert frame.crs.to_epsg() == 4326
    _, cases, _ = ledger
    footprints = cases.set_index("case_id").geometry
    points = footprints.representative_point().to_crs("EPSG:4326")  # the point inside, in the ledger CRS
    expected = footprints.to_crs("EPSG:4326")
    for feat in frame.itertuples():
        point = points[feat.case_id]
        assert (feat.lon_wgs84, feat.lat_wgs84) == pytest.approx((point.x, point.y), abs=1e-6)
        off = feat.geometry.symmetric_difference(expected[feat.case_id]).area
        assert off < 0.01 * feat.geometry.area  # RFC 7946's 7 decimals: about 1 cm
    props = next(f["properties"] for f in doc["features"] if f["properties"]["case_id"] == "S-1")
    assert props["due"] is None and props["state"] == "stopped" and props["state_zh"] == "已制止"


def test_gpkg_for_qgis(project: Path, ledger: tuple[gpd.GeoDataFrame, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    events, cases, alerts = ledger
    path = export(project, monkeypatch, "gpkg", "qgis.gpkg")
    layers = {str(n): t for n, t in pyogrio.list_layers(path)}
    assert layers == {"cases": "MultiPolygon", "events": "MultiPolygon", "alerts": "MultiPolygon", "layer_styles": None}
    for name, frame, dates in (
        ("cases", cases, ("opened_at", "last_event_at", "due", "deadline")),
        ("events", events, ("at", "deadline")),
        ("alerts", alerts, ()),
    ):
        info = pyogrio.read_info(path, layer=name)
        types = dict(zip(info["fields"], info["ogr_types"], strict=True))
        assert {c for c, t in types.items() if t == "OFTDate"} == set(dates)
        back = gpd.read_file(path, layer=name)
        assert len(back) == len(frame) and set(back.geom_type) == {"MultiPolygon"}
    back = gpd.read_file(path, layer="cases").set_index("case_id")
    assert back.loc["S-2", "due"] == pd.Timestamp("2026-02-20") and bool(back.loc["S-2", "overdue"])
    for case in cases.itertuples():
        assert back.loc[case.case_id, "unit"] == unit_at(case.geometry)
        assert back.loc[case.case_id, "geometry"].symmetric_difference(case.geometry).area < 1e-6
    point = cases.set_index("case_id").geometry.representative_point().to_crs(4326)["S-1"]
    assert back.loc["S-1", "cell_id"] == "G0"
    assert (back.loc["S-1", "lon_wgs84"], back.loc["S-1", "lat_wgs84"]) == pytest.approx((point.x, point.y), abs=1e-6)
    with sqlite3.connect(path) as db:
        styles = db.execute(
            'SELECT f_table_name, f_geometry_column, "useAsDefault", "styleQML", "styleSLD" FROM layer_styles'
        ).fetchall()
        contents = db.execute("SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone()
        aliases = dict(
            ((t, c), title)
            for t, c, title in db.execute("SELECT table_name, column_name, title FROM gpkg_data_columns")
        )
        ext = db.execute("SELECT table_name FROM gpkg_extensions WHERE extension_name = 'gpkg_schema'").fetchall()
        ddl = db.execute("SELECT sql FROM sqlite_master WHERE name = 'layer_styles'").fetchone()[0]
    assert contents == ("attributes",)
    assert '"styleQML" TEXT' in ddl and '"useAsDefault" BOOLEAN' in ddl and '"f_table_name" TEXT(256)' in ddl
    assert sorted(s[0] for s in styles) == ["alerts", "cases", "events"]
    assert all(s[1] == "geom" and s[2] == 1 for s in styles)
    qml = ET.fromstring(next(s[3] for s in styles if s[0] == "cases").split("\n", 1)[1])
    renderer = qml.find("renderer-v2")
    assert renderer is not None and renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "state"
    cats = [(c.get("value"), c.get("label"), c.get("symbol")) for c in renderer.iter("category")]
    assert [c[:2] for c in cats] == [(s, f"{STATE_ZH[s]} {s}") for s in STATES]
    colours = {
        sym.get("name"): opt.get("value")
        for sym in renderer.iter("symbol")
        for opt in sym.iter("Option")
        if opt.get("name") == "outline_color"
    }
    for state, _, symbol in cats:
        hexa = STATE_COLORS[str(state)].lstrip("#")
        assert colours[symbol] == ",".join(str(int(hexa[i : i + 2], 16)) for i in (0, 2, 4)) + ",255"
    qml_aliases = {a.get("field"): a.get("name") for a in qml.iter("alias")}
    assert qml_aliases["case_id"] == "案件编号" and qml_aliases["unit"] == "责任单位"
    sld = ET.fromstring(next(s[4] for s in styles if s[0] == "cases"))
    assert [e.text for e in sld.iter("{http://www.opengis.net/ogc}Literal")] == list(STATES)
    assert aliases[("cases", "case_id")] == "案件编号" and aliases[("events", "at")] == "日期"
    assert aliases[("cases", "area_mu")] == "面积(亩)" and aliases[("alerts", "message_zh")] == "说明"
    assert sorted(e[0] for e in ext) == ["gpkg_data_column_constraints", "gpkg_data_columns"]


def test_the_live_ledger_is_one_geometry_type_per_layer_with_dates_and_rebuilds_equal(project: Path) -> None:
    live = project / "processed" / "ledger.gpkg"
    layers = {str(n): t for n, t in pyogrio.list_layers(live)}
    assert {k: layers[k] for k in ("events", "cases", "alerts")} == dict.fromkeys(
        ("events", "cases", "alerts"), "MultiPolygon"
    )
    for name, dates in (("events", {"at", "deadline"}), ("cases", {"opened_at", "last_event_at", "deadline"})):
        info = pyogrio.read_info(live, layer=name)
        assert {f for f, t in zip(info["fields"], info["ogr_types"], strict=True) if t == "OFTDate"} == dates
    events, cases, _ = read_ledger(live)  # as the ledger built them: ISO text and Polygons
    assert set(events.geom_type) == {"Polygon"} and events.loc[events["kind"] == "ordered", "deadline"].tolist() == [
        "2026-02-20"
    ]
    assert (cases["deadline"] == "").sum() == len(cases) - 1
    again = cli(project, "ledger", "build")
    assert again.returncode == 0 and "(0 new)" in again.stdout, again.stderr
    done = cli(project, "ledger", "rebuild")
    assert done.returncode == 0 and "rebuild equals the live ledger" in done.stdout, done.stderr


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("nowhere/ledger.xlsx", r"nowhere: the folder of -o nowhere/ledger.xlsx does not exist; create it"),
        ("raw/ledger/cases.gpkg/x.xlsx", r"the folder of -o raw/ledger/cases.gpkg/x.xlsx does not exist"),
        ("raw", r"raw: is a folder; give a file name"),
        ("out.csv", r"-o out.csv: a xlsx export must end in .xlsx; name it out.xlsx"),
        ("processed/ledger.gpkg", r"-o processed/ledger.gpkg: is the live ledger; export to another file"),
    ],
)
def test_bad_targets_are_one_line_and_exit_2(
    out: str, message: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    live = (project / "processed" / "ledger.gpkg").read_bytes()
    fmt = "gpkg" if out == "processed/ledger.gpkg" else "xlsx"
    result = run(project, "ledger", "export", "--format", fmt, "-o", out, monkeypatch=monkeypatch)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
    assert not (project / "nowhere").exists() and not (project / "out.csv").exists()
    assert (project / "processed" / "ledger.gpkg").read_bytes() == live


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_is_refused(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run(project, "ledger", "export", "-o", str(locked / "l.gpkg"), monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "is not writable; choose another -o" in result.stderr


def test_an_export_that_fails_leaves_the_previous_one_whole(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = export(project, monkeypatch, "xlsx", "keep.xlsx")
    before = path.read_bytes()

    def broken(tmp: Path, *args: object) -> None:
        tmp.write_bytes(b"half a workbook")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ledger_export, "write_xlsx", broken)
    result = run(project, "ledger", "export", "-o", "keep.xlsx", monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "keep.xlsx: cannot write the xlsx export" in result.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(("keep", ".keep"))) == ["keep.xlsx"]


def test_the_format_comes_from_the_suffix_or_must_be_given(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(project, "ledger", "export", "-o", "by_suffix.geojson", monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.stderr
    assert json.loads((project / "by_suffix.geojson").read_text(encoding="utf-8"))["type"] == "FeatureCollection"
    result = run(project, "ledger", "export", "-o", "ledger.txt", monkeypatch=monkeypatch)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "scarwatch ledger export: error: give --format (xlsx, csv, geojson, gpkg) or an -o ending in one of "
        ".xlsx, .csv, .geojson, .gpkg"
    )
