"""Dispatch (派单, issue 12): units from the grid, the ``dispatched`` event, the overdue check, the lists.

The demo project: a small demo town (``scarwatch demo``'s generator), flags made from its truth (a perfect
detector, so the ledger's new warnings are the truth's new structures), one aligned pair for the chips, then
``scarwatch ledger build`` and ``scarwatch dispatch --month M`` as DVC runs them.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import geopandas as gpd
import openpyxl
import pandas as pd
import pytest
import shapely
import yaml
from pyproj import Geod
from shapely.geometry import Point, box

from pipeline.config import AlignSettings, DemoSettings, DispatchSettings, LedgerSettings
from pipeline.errors import CRSMismatchError
from pipeline.formats import flag_id
from pipeline.ledger import read_ledger, rebuild_ledger
from pipeline.ledger.events import working_days_after
from pipeline.ledger.grid import assign_units
from pipeline.ledger.store import write_ledger
from pipeline.publish import dispatch as dispatch_mod
from pipeline.publish.dispatch import COLUMNS, CSV_COLUMNS, safe_name, wgs84_to_gcj02, write_dispatch
from tests.ledger_project import cli, make_project
from tests.maps_report_data import write_flags as write_demo_flags
from tests.test_ledger import X0, Y0, run, sq, write_flags, write_updates

MONTHS = ("2026-02", "2026-03", "2026-04")
CHIP_MONTH = "2026-04"
CRS = "EPSG:4551"
GEOD = Geod(ellps="WGS84")


def _params(months: tuple[str, ...]) -> str:
    return yaml.safe_dump(
        {
            "paths": {
                "raw": "data/demo",
                "interim": "data/interim",
                "processed": "data/processed",
                "reports": "reports",
            },
            "months": {m: {"prev": f"{m[:5]}{int(m[5:]) - 1:02d}"} for m in months},
        }
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo project after `ledger build` and `dispatch` of every month."""
    from pipeline.imagery import align_pair
    from pipeline.synth import generate_demo

    project = tmp_path_factory.mktemp("dispatch-demo")
    (project / "params.yaml").write_text(_params(MONTHS), encoding="utf-8")
    raw = project / "data" / "demo"
    generate_demo(raw, DemoSettings(size_m=800.0, n_months=4, sheets=(1, 1)))
    truth = gpd.read_file(raw / "truth" / "truth.gpkg", layer="changes")
    for month in MONTHS:
        rows = truth[truth["month"] == month]
        write_demo_flags(
            project / "data" / "processed" / "flags" / f"{month}.gpkg",
            month,
            [(k, g, "", "") for k, g in zip(rows["kind"], rows.geometry, strict=True)],
        )
    align_pair(
        raw / "imagery" / "2026-03",
        raw / "imagery" / CHIP_MONTH,
        project / "data" / "interim" / "aligned" / CHIP_MONTH,
        AlignSettings(resolution="delivery"),
        month=CHIP_MONTH,
        prev="2026-03",
    )
    proc = cli(project, "ledger", "build")
    assert proc.returncode == 0, proc.stderr
    for month in MONTHS:
        proc = cli(project, "dispatch", "--month", month)
        assert proc.returncode == 0, proc.stderr
        assert f"reports/dispatch/{month}" in proc.stdout
    return project


def _lists(project: Path, month: str) -> dict[str, pd.DataFrame]:
    """Each unit's CSV of ``month`` by the unit the index names."""
    folder = project / "reports" / "dispatch" / month
    index = json.loads((folder / "dispatch.json").read_text(encoding="utf-8"))
    return {u["unit"]: pd.read_csv(folder / u["files"]["csv"], encoding="utf-8-sig", dtype=str) for u in index["units"]}


def _expected_unit(geom: shapely.Geometry, grid: gpd.GeoDataFrame) -> tuple[str, str]:
    """The grid cell holding the geometry's representative point, by a plain loop (not the code under test)."""
    point = geom.representative_point()
    for cell_id, unit, cell in zip(grid["cell_id"], grid["unit"], grid.geometry, strict=True):
        if cell.covers(point):
            return str(cell_id), str(unit)
    raise AssertionError(f"no grid cell holds {point}")


# -- the demo -------------------------------------------------------------------------------------------


def test_every_new_warning_is_dispatched_to_its_grid_unit(demo: Path) -> None:
    raw = demo / "data" / "demo"
    truth = gpd.read_file(raw / "truth" / "truth.gpkg", layer="changes")
    grid = gpd.read_file(raw / "layers" / "grid.gpkg")
    events, cases, _ = read_ledger(demo / "data" / "processed" / "ledger.gpkg")
    opened = events[(events["kind"] == "flagged") & (events["source"] == "imagery")].set_index("evidence")["case_id"]
    permitted = set(events.loc[events["source"] == "permit", "case_id"])
    checked = 0
    for month in MONTHS:
        lists = _lists(demo, month)
        listed = {cid: unit for unit, frame in lists.items() for cid in frame["案件编号 case_id"]}
        for row in truth[(truth["month"] == month) & (truth["kind"] == "new")].itertuples():
            fid = flag_id(month, "new", row.geometry)
            if fid not in opened.index:  # an expansion or a rebuild: an observation on an existing case
                continue
            case_id = opened[fid]
            if case_id in permitted:
                assert row.legal and case_id not in listed  # built with a permit: dismissed, not dispatched
                continue
            cell_id, unit = _expected_unit(row.geometry, grid)
            assert listed.get(case_id) == unit, (month, case_id)
            line = lists[unit].set_index("案件编号 case_id").loc[case_id]
            assert (line["网格 cell_id"], line["责任单位 unit"], line["变化类型 change"]) == (cell_id, unit, "新增 new")
            case = cases.set_index("case_id").loc[case_id]
            assert float(line["面积(平方米) area_m2"]) == pytest.approx(case["area_m2"], abs=0.06)
            assert (line["区 district"], line["街道 street"]) == (case["district"], case["street"])
            checked += 1
    assert checked >= 3  # the demo's new illegal structures of 2026-02..04


def test_a_month_of_redispatches_lists_the_overdue_case_again(demo: Path) -> None:
    events, _, alerts = read_ledger(demo / "data" / "processed" / "ledger.gpkg")
    first = events[(events["kind"] == "dispatched") & (events["month"] == "2026-02")]
    # the February warning is confirmed only on 2026-03-02: at February's end its check is overdue
    overdue = alerts[(alerts["kind"] == "check_overdue") & (alerts["month"] == "2026-02")]
    assert set(overdue["case_id"]) == set(first["case_id"])
    again = first[first["at"] == "2026-02-28"]
    assert set(again["case_id"]) == set(overdue["case_id"]) and set(again["deadline"]) == {"2026-03-05"}
    assert not (
        alerts["kind"].eq("check_overdue") & alerts["month"].eq("2026-03") & alerts["case_id"].isin(again["case_id"])
    ).any()
    listed = {cid for frame in _lists(demo, "2026-02").values() for cid in frame["案件编号 case_id"]}
    assert listed == set(first["case_id"])


def test_xlsx_opens_with_the_headers_rows_dates_and_images(demo: Path) -> None:
    folder = demo / "reports" / "dispatch" / CHIP_MONTH
    index = json.loads((folder / "dispatch.json").read_text(encoding="utf-8"))
    assert index["month"] == CHIP_MONTH and index["n_cases"] == sum(u["n_cases"] for u in index["units"]) > 0
    events, _, _ = read_ledger(demo / "data" / "processed" / "ledger.gpkg")
    disp = events[(events["kind"] == "dispatched") & (events["month"] == CHIP_MONTH)].drop_duplicates(
        "case_id", keep="last"
    )
    for entry in index["units"]:
        wb = openpyxl.load_workbook(folder / entry["files"]["xlsx"])
        assert wb.sheetnames[0] == "派单"
        ws = wb["派单"]
        rows = list(ws.iter_rows(values_only=True))
        assert rows[0] == COLUMNS
        assert [r[0] for r in rows[1:]] == entry["case_ids"]
        assert ws.freeze_panes == "B2"
        assert len(ws._images) == 2 * len(entry["case_ids"])  # before and after, embedded
        for r in rows[1:]:
            line = dict(zip(COLUMNS, r, strict=True))
            e = disp.set_index("case_id").loc[line["案件编号 case_id"]]
            assert line["责任单位 unit"] == entry["unit"] == e["actor"]
            assert isinstance(line["派单日期 dispatched_at"], dt.datetime)  # a real date, not text
            assert line["派单日期 dispatched_at"].date().isoformat() == e["at"]
            assert line["核查期限 due"].date().isoformat() == e["deadline"]
            assert line["面积(亩) area_mu"] == pytest.approx(line["面积(平方米) area_m2"] / (2000 / 3), abs=1e-3)
            assert all(line[c] is None for c in COLUMNS[-5:])  # the inspector's blank columns
        rules = ws.data_validations.dataValidation
        assert any("确认" in (v.formula1 or "") and "Q2" in str(v.sqref) for v in rules)
        assert "GCJ-02" in ws["K1"].comment.text and "WGS84" in ws["I1"].comment.text


def test_csv_has_a_bom_and_opens_in_pandas(demo: Path) -> None:
    folder = demo / "reports" / "dispatch" / CHIP_MONTH
    for path in folder.glob("*.csv"):
        assert path.read_bytes().startswith(b"\xef\xbb\xbf")
        frame = pd.read_csv(path, encoding="utf-8-sig")
        assert tuple(frame.columns) == CSV_COLUMNS and len(frame) > 0
        assert "前期影像 before" not in frame.columns
        assert frame["派单日期 dispatched_at"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()


def test_geojson_is_wgs84_lon_lat_inside_the_demo(demo: Path) -> None:
    grid = gpd.read_file(demo / "data" / "demo" / "layers" / "grid.gpkg")
    west, south, east, north = grid.to_crs(4326).total_bounds
    for month in MONTHS:
        for path in (demo / "reports" / "dispatch" / month).glob("*.geojson"):
            doc = json.loads(path.read_text(encoding="utf-8"))
            assert doc["type"] == "FeatureCollection" and "crs" not in doc and doc["features"]
            for feature in doc["features"]:
                assert tuple(feature["properties"]) == CSV_COLUMNS
                shape = shapely.geometry.shape(feature["geometry"])
                assert shape.is_valid and shape.exterior.is_ccw  # RFC 7946: exterior rings counter-clockwise
                x0, y0, x1, y1 = shape.bounds
                assert west <= x0 <= x1 <= east and south <= y0 <= y1 <= north
                p = feature["properties"]
                assert shape.buffer(1e-6).contains(Point(p["经度WGS84 lon_wgs84"], p["纬度WGS84 lat_wgs84"]))


def test_a_month_without_dispatches_writes_an_index_saying_so(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "2026-01"
    summary = write_dispatch("2026-01", demo / "data/processed/ledger.gpkg", out, settings=DispatchSettings())
    assert summary.n_cases == 0 and sorted(p.name for p in out.iterdir()) == ["dispatch.json"]
    index = json.loads((out / "dispatch.json").read_text(encoding="utf-8"))
    assert index["units"] == [] and "本月无派单" in index["note"]


def test_a_failed_dispatch_leaves_the_previous_lists_whole(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / CHIP_MONTH
    ledger = demo / "data/processed/ledger.gpkg"
    write_dispatch(CHIP_MONTH, ledger, out, settings=DispatchSettings())
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(path: Path, rows: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dispatch_mod, "_write_geojson", broken)
    with pytest.raises(OSError):
        write_dispatch(CHIP_MONTH, ledger, out, settings=DispatchSettings())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == [CHIP_MONTH]  # no temporary folder left


def test_rebuild_proves_the_dispatched_ledger_equal(demo: Path) -> None:
    proc = cli(demo, "ledger", "rebuild")
    assert proc.returncode == 0 and "rebuild equals the live ledger" in proc.stdout, proc.stderr


def test_a_ledger_of_record_without_dispatches_grows_them(demo: Path, tmp_path: Path) -> None:
    """A live ledger written before dispatch existed is not refused: the dispatched events are added."""
    project = tmp_path / "p"
    shutil.copytree(demo, project, ignore=shutil.ignore_patterns("reports", "interim"))
    ledger = project / "data" / "processed" / "ledger.gpkg"
    events, cases, alerts = read_ledger(ledger)
    import pyogrio

    registry = pyogrio.read_dataframe(ledger, layer="registry")
    old = events[events["kind"] != "dispatched"].copy()
    old["seq"] = range(1, len(old) + 1)
    write_ledger(ledger, old, cases, alerts[alerts["kind"] != "check_overdue"], registry)
    proc = cli(project, "ledger", "build")
    assert proc.returncode == 0, proc.stderr
    n_dispatched = int((events["kind"] == "dispatched").sum())
    assert f"({n_dispatched} new)" in proc.stdout
    assert read_ledger(ledger)[0]["event_id"].tolist() == events["event_id"].tolist()


# -- the dispatched event and the overdue check (a tiny ledger) ----------------------------------------


def _grid(raw: Path, cells: list[tuple[str, str, shapely.Geometry]], crs: str = CRS) -> None:
    (raw / "layers").mkdir(parents=True, exist_ok=True)
    frame = gpd.GeoDataFrame(
        {"cell_id": [c for c, _, _ in cells], "unit": [u for _, u, _ in cells]},
        geometry=[g for _, _, g in cells],
        crs=crs,
    )
    frame.to_file(raw / "layers" / "grid.gpkg", driver="GPKG")


def test_due_date_counts_working_days_across_the_weekend() -> None:
    assert working_days_after("2026-03-05", 3) == "2026-03-10"  # Thursday -> Tuesday
    assert working_days_after("2026-03-06", 3) == "2026-03-11"  # Friday -> Wednesday
    assert working_days_after("2026-03-07", 3) == "2026-03-12"  # Saturday counts from Monday
    assert working_days_after("2026-03-06", 3, ["2026-03-10"]) == "2026-03-12"  # a holiday is skipped


def test_dispatched_event_names_the_unit_cell_and_due_date(tmp_path: Path) -> None:
    _grid(tmp_path / "raw", [("G1", "第1网格 南关区城管中队", box(X0 - 50, Y0 - 50, X0 + 50, Y0 + 50))])
    write_flags(tmp_path / "flags", "2026-05", [("f1", "new", sq(0, 0)), ("f2", "new", sq(300, 0))])
    events, _, alerts = read_ledger(run(tmp_path, ["2026-05"], dispatch_due_days=2))
    disp = events[events["kind"] == "dispatched"].set_index("case_id")
    first = disp[disp["at"] == "2026-05-01"]  # a Friday: due two working days on, Tuesday
    assert first.loc["SW-202605-0001", ["actor", "note", "evidence", "deadline", "source"]].tolist() == [
        "第1网格 南关区城管中队",
        "G1",
        "layers/grid.gpkg:G1",
        "2026-05-05",
        "dispatch",
    ]
    assert first.loc["SW-202605-0002", ["actor", "note", "evidence"]].tolist() == ["", "", ""]  # outside any layer
    overdue = alerts[alerts["kind"] == "check_overdue"].set_index("case_id")
    assert "第1网格 南关区城管中队" in overdue.loc["SW-202605-0001", "message_zh"]
    assert "未分配单位" in overdue.loc["SW-202605-0002", "message_zh"]


def test_overdue_alert_only_without_a_field_event_by_the_due_date(tmp_path: Path) -> None:
    write_flags(tmp_path / "flags", "2026-02", [("f1", "new", sq(0, 0)), ("f2", "new", sq(300, 0))])
    write_flags(tmp_path / "flags", "2026-03", [])
    write_updates(tmp_path / "raw", "2026-02", [{"at": "2026-02-04", "kind": "confirmed", "case_id": "SW-202602-0001"}])
    out = run(tmp_path, ["2026-02", "2026-03"])
    events, cases, alerts = read_ledger(out)
    overdue = alerts[alerts["kind"] == "check_overdue"]
    assert overdue[["case_id", "month"]].values.tolist() == [
        ["SW-202602-0002", "2026-02"],
        ["SW-202602-0002", "2026-03"],
    ]
    assert "2026-02-05" in overdue.iloc[0]["message_zh"]  # the first dispatch's due date (Sunday 1st + 3)
    again = events[(events["kind"] == "dispatched") & (events["case_id"] == "SW-202602-0002")]
    assert again[["at", "deadline"]].values.tolist() == [
        ["2026-02-01", "2026-02-05"],
        ["2026-02-28", "2026-03-05"],
        ["2026-03-31", "2026-04-03"],
    ]
    assert cases.set_index("case_id").loc["SW-202602-0002", "deadline"] == ""  # a due date is no case deadline
    # the inspector's late report for February: the re-dispatches already made stay on record, the alert goes
    write_updates(tmp_path / "raw", "2026-02", [
        {"at": "2026-02-04", "kind": "confirmed", "case_id": "SW-202602-0001"},
        {"at": "2026-02-20", "kind": "dismissed", "case_id": "SW-202602-0002"},
    ])  # fmt: skip
    events2, _, alerts2 = read_ledger(run(tmp_path, ["2026-02", "2026-03"]))
    assert set(events["event_id"]) <= set(events2["event_id"])
    assert "check_overdue" not in set(alerts2.loc[alerts2["month"] == "2026-03", "kind"])
    flags = sorted((tmp_path / "flags").glob("*.gpkg"))
    result = rebuild_ledger(flags, tmp_path / "raw", out, LedgerSettings(), months=["2026-02", "2026-03"])
    assert result.equal, result.differences


def test_a_redrawn_grid_never_rewrites_a_dispatch_made(tmp_path: Path) -> None:
    _grid(tmp_path / "raw", [("G1", "甲单位", box(X0 - 50, Y0 - 50, X0 + 50, Y0 + 50))])
    write_flags(tmp_path / "flags", "2026-02", [("f1", "new", sq(0, 0))])
    run(tmp_path, ["2026-02"])
    _grid(tmp_path / "raw", [("G9", "乙单位", box(X0 - 50, Y0 - 50, X0 + 50, Y0 + 50))])
    write_flags(tmp_path / "flags", "2026-03", [])
    events, _, _ = read_ledger(run(tmp_path, ["2026-02", "2026-03"]))
    disp = events[events["kind"] == "dispatched"]
    assert disp[["at", "actor"]].values.tolist() == [
        ["2026-02-01", "甲单位"],
        ["2026-02-28", "甲单位"],
        ["2026-03-31", "乙单位"],
    ]


# -- units, fallbacks and bad layers ---------------------------------------------------------------------


def test_units_fall_back_to_the_street_office_and_the_district_squad(tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    _grid(tmp_path, [("G001", "第1网格 甲区城管中队", box(0, 0, 100, 100))])
    gpd.GeoDataFrame({"street": ["东风街道"], "district": ["甲区"]}, geometry=[box(0, 0, 200, 100)], crs=CRS).to_file(
        layers / "streets.gpkg"
    )
    gpd.GeoDataFrame({"district": ["甲区"]}, geometry=[box(0, 0, 300, 100)], crs=CRS).to_file(layers / "districts.gpkg")
    geoms = gpd.GeoSeries(
        [Point(x, 50).buffer(5) for x in (50, 150, 250, 350)] + [None], index=[7, 7, 3, 2, 9], crs=CRS
    )
    units = assign_units(geoms, layers)
    assert units.index.tolist() == [7, 7, 3, 2, 9]
    assert units.values.tolist() == [
        ["G001", "第1网格 甲区城管中队", "东风街道", "甲区", "grid"],
        ["", "东风街道办", "东风街道", "甲区", "street"],
        ["", "甲区城管中队", "", "甲区", "district"],
        ["", "", "", "", "none"],
        ["", "", "", "", "none"],
    ]


def test_a_missing_layer_is_one_warning_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _grid(tmp_path, [("G001", "第1网格", box(0, 0, 100, 100))])
    units = assign_units(gpd.GeoSeries([Point(50, 50)], crs=CRS), tmp_path / "layers")
    assert units["unit"].tolist() == ["第1网格"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "streets.gpkg" in warned[0] and "districts.gpkg" in warned[0]


def test_a_grid_in_another_crs_is_refused(tmp_path: Path) -> None:
    _grid(tmp_path, [("G001", "第1网格", box(0, 0, 1, 1))], crs="EPSG:4326")
    with pytest.raises(CRSMismatchError, match=r"grid\.gpkg: CRS .* differs"):
        assign_units(gpd.GeoSeries([Point(50, 50)], crs=CRS), tmp_path / "layers")


def test_a_bad_grid_layer_is_one_line_and_exit_2(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    frame = gpd.GeoDataFrame({"cell_id": ["G1"]}, geometry=[box(X0, Y0, X0 + 99, Y0 + 99)], crs=CRS)
    frame.to_file(project / "raw" / "layers" / "grid.gpkg", driver="GPKG")
    proc = cli(project, "ledger", "build")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "grid.gpkg" in line and "lacks columns ['unit']" in line and "fix layers/grid.gpkg" in line
    assert not (project / "processed" / "ledger.gpkg").exists()


def test_file_names_are_safe_and_keep_chinese() -> None:
    assert safe_name("第3网格 南关区/城管:中队") == "第3网格_南关区_城管_中队"
    assert safe_name("../..\\x") == "x"
    assert safe_name("") == safe_name("  ") == "未分配单位"


# -- GCJ-02 ------------------------------------------------------------------------------------------------


def test_gcj02_offset_has_the_known_magnitude_in_china_and_is_zero_outside() -> None:
    lon, lat = [125.32, 116.39, 113.26, -0.12, 151.2], [43.88, 39.91, 23.13, 51.5, -33.87]
    glon, glat = wgs84_to_gcj02(lon, lat)
    _, _, metres = GEOD.inv(lon, lat, glon, glat)
    assert all(100 < m < 800 for m in metres[:3])  # Changchun, Beijing, Guangzhou: a few hundred metres
    assert list(metres[3:]) == [0.0, 0.0]  # London, Sydney: GCJ-02 equals WGS84
    assert glon[1] > lon[1] and glat[1] > lat[1]  # the offset points north-east in Beijing


def test_the_lists_gcj02_columns_are_offset_from_the_wgs84_ones(demo: Path) -> None:
    for frame in _lists(demo, CHIP_MONTH).values():
        cols = ["经度WGS84 lon_wgs84", "纬度WGS84 lat_wgs84", "经度GCJ02 lon_gcj02", "纬度GCJ02 lat_gcj02"]
        lon, lat, glon, glat = (frame[c].astype(float).to_numpy() for c in cols)
        _, _, metres = GEOD.inv(lon, lat, glon, glat)
        assert ((metres > 100) & (metres < 800)).all()


# -- the returned sheet (the inspector's filled dispatch list) -----------------------------------------------


def fill_returned_sheet(path: Path, out: Path, findings: Mapping[str, tuple[str, dt.date, str]]) -> Path:
    """The inspector's returned dispatch list: ``path`` with finding, date and inspector filled per case.

    ``findings`` maps a case id to (核查结果 finding, 核查日期 checked_at, 核查人 inspector); other rows stay
    blank ("not yet checked"). Written with openpyxl, as Excel would keep the workbook (images included).
    """
    wb = openpyxl.load_workbook(path)
    ws = wb["派单"]
    col = {str(c.value): c.column for c in ws[1]}
    for row in range(2, ws.max_row + 1):
        case_id = ws.cell(row=row, column=col["案件编号 case_id"]).value
        if case_id in findings:
            finding, day, inspector = findings[str(case_id)]
            ws.cell(row=row, column=col["核查结果 finding"], value=finding)
            ws.cell(row=row, column=col["核查日期 checked_at"], value=day).number_format = "yyyy-mm-dd"
            ws.cell(row=row, column=col["核查人 inspector"], value=inspector)
    wb.save(out)
    return out


def test_the_returned_sheet_fixture_fills_only_the_inspector_columns(demo: Path, tmp_path: Path) -> None:
    folder = demo / "reports" / "dispatch" / CHIP_MONTH
    entry = json.loads((folder / "dispatch.json").read_text(encoding="utf-8"))["units"][0]
    case_id = entry["case_ids"][0]
    filled = fill_returned_sheet(
        folder / entry["files"]["xlsx"], tmp_path / "returned.xlsx", {case_id: ("确认", dt.date(2026, 4, 20), "赵敏")}
    )
    rows = list(openpyxl.load_workbook(filled)["派单"].iter_rows(values_only=True))
    line = dict(zip(rows[0], rows[1], strict=True))
    assert (line["核查结果 finding"], line["核查日期 checked_at"].date(), line["核查人 inspector"]) == (
        "确认",
        dt.date(2026, 4, 20),
        "赵敏",
    )
    assert line["案件编号 case_id"] == case_id and line["核查期限 due"] is not None


def test_a_returned_sheet_moves_its_cases_through_the_lifecycle(demo: Path, tmp_path: Path) -> None:
    if cli(demo, "ledger", "import", "--help").returncode != 0:
        pytest.skip("no `scarwatch ledger import` (the XLSX field-update reader of issue 12) in this checkout")
    project = tmp_path / "p"
    shutil.copytree(demo, project)
    folder = project / "reports" / "dispatch" / CHIP_MONTH
    entry = json.loads((folder / "dispatch.json").read_text(encoding="utf-8"))["units"][0]
    case_id = entry["case_ids"][0]
    returned = fill_returned_sheet(
        folder / entry["files"]["xlsx"], tmp_path / "returned.xlsx", {case_id: ("确认", dt.date(2026, 4, 20), "赵敏")}
    )
    proc = cli(project, "ledger", "import", str(returned))
    assert proc.returncode == 0, proc.stderr
    ledger = project / "data" / "processed" / "ledger.gpkg"
    if read_ledger(ledger)[1].set_index("case_id").loc[case_id, "state"] == "warning":
        assert cli(project, "ledger", "build").returncode == 0
    events, cases, _ = read_ledger(ledger)
    assert cases.set_index("case_id").loc[case_id, "state"] == "confirmed"
    assert cli(project, "ledger", "import", str(returned)).returncode == 0  # twice adds nothing
    assert len(read_ledger(ledger)[0]) == len(events)
