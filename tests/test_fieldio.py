"""Field-update files as inspectors write them (issue 12): encodings, XLSX, headers, kinds, dates, positions,
every problem collected, the folder's naming rule, and the dispatch list returned with findings."""

from __future__ import annotations

import codecs
import datetime as dt
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import openpyxl
import pytest
from openpyxl.drawing.image import Image as XLImage
from PIL import Image
from pyproj import CRS, Transformer

from pipeline.errors import CorruptFileError, LedgerError
from pipeline.ledger.fieldio import (
    FieldUpdateProblems,
    field_update_files,
    header_field,
    parse_field_date,
    parse_kind,
    read_field_file,
    read_field_updates,
)
from tests.test_ledger import X0, Y0

LEDGER_CRS = CRS.from_epsg(4551)
TO_WGS84 = Transformer.from_crs(LEDGER_CRS, CRS.from_epsg(4326), always_xy=True)

#: Contract C3: the dispatch list's headers, in order (the inspector fills the last five).
DISPATCH_HEADERS: tuple[str, ...] = (
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


def _thumbnail() -> io.BytesIO:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (120, 90, 60)).save(buf, format="PNG")
    buf.seek(0)
    return buf


def write_dispatch_list(path: Path, cases: Sequence[dict[str, object]], *, extra_sheet: bool = True) -> Path:
    """A dispatch list as the dispatch stage writes it (sheet 派单, C3 headers, thumbnails, frozen header),
    with the inspector's columns filled from each dict's finding/checked_at/inspector/deadline/note."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "派单"
    sheet.append(list(DISPATCH_HEADERS))
    for i, case in enumerate(cases, start=2):
        x, y = float(case.get("x", X0 + 5)), float(case.get("y", Y0 + 5))  # type: ignore[arg-type]
        lon, lat = TO_WGS84.transform(x, y)
        sheet.append(
            [
                case["case_id"],
                "新增 new",
                123.4,
                0.185,
                "南关区",
                "自强街道",
                "G-001",
                "自强街道城管中队",
                round(lon, 6),
                round(lat, 6),
                round(lon + 0.0062, 6),  # GCJ-02 is offset: never a position
                round(lat + 0.0011, 6),
                dt.date(2026, 3, 2),
                dt.date(2026, 3, 5),
                None,
                None,
                case.get("finding"),
                case.get("checked_at"),
                case.get("inspector"),
                case.get("deadline"),
                case.get("note"),
            ]
        )
        for col in ("O", "P"):
            img = XLImage(_thumbnail())
            sheet.add_image(img, f"{col}{i}")
        sheet.row_dimensions[i].height = 40
    sheet.freeze_panes = "B2"
    if extra_sheet:
        book.create_sheet("说明").append(["核查结果填写: 确认/排除/制止/限期处置/拆除/修复/销号"])
    book.save(path)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]], encoding: str = "utf-8") -> Path:
    lines = [",".join(header), *(",".join("" if v is None else str(v) for v in r) for r in rows)]
    data = ("\r\n".join(lines) + "\r\n").encode("utf-8" if encoding == "utf-8-sig" else encoding)
    path.write_bytes((codecs.BOM_UTF8 if encoding == "utf-8-sig" else b"") + data)
    return path


def read(path: Path, month: str | None = "2026-03"):  # type: ignore[no-untyped-def]
    return read_field_file(path, source=f"field_updates/{path.name}", month=month, crs=LEDGER_CRS)


# -- encodings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk", "gb18030"])
def test_csv_in_every_encoding_excel_writes(tmp_path: Path, encoding: str, caplog: pytest.LogCaptureFixture) -> None:
    path = write_csv(
        tmp_path / "2026-03.csv",
        ["案件编号", "核查结果", "核查日期", "核查人", "备注"],
        [["SW-202602-0001", "确认", "2026/3/2", "张三", "违建,已拍照".replace(",", "，")]],
        encoding,
    )
    with caplog.at_level(logging.INFO, logger="pipeline.ledger.fieldio"):
        ff = read(path)
    assert ff.problems == []
    (u,) = ff.updates
    assert (u.case_id, u.kind, u.at, u.actor, u.note) == (
        "SW-202602-0001",
        "confirmed",
        "2026-03-02",
        "张三",
        "违建，已拍照",
    )
    expected = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8 with BOM", "gbk": "GB18030", "gb18030": "GB18030"}[encoding]
    assert f"read as {expected}" in caplog.text  # never guessed silently


def test_an_undecodable_csv_is_one_error_with_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "2026-03.csv"
    path.write_bytes(b"case_id,kind,at\nS-1,confirmed,2026-03-02\n\xff\xfe\x80\x80")
    with pytest.raises(CorruptFileError, match=r"2026-03\.csv: is neither UTF-8 \(bad byte at offset 41\) nor GBK"):
        read(path)


# -- headers, kinds, dates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ("case_id", "case_id"),
        (" 案件编号  CASE_ID ", "case_id"),
        ("核查日期 checked_at", "at"),
        ("date", "at"),
        ("核查结果 finding", "kind"),
        ("结果", "kind"),
        ("核查人 inspector", "actor"),
        ("限期 deadline", "deadline"),
        ("备注 note", "note"),
        ("经度WGS84 lon_wgs84", "lon"),
        ("纬度 latitude", "lat"),
        ("lng", "lon"),
        ("经度GCJ02 lon_gcj02", None),
        ("核查期限 due", None),
        ("案件编号 finding", None),  # two fields' aliases: neither
    ],
)
def test_headers_follow_contract_c4(header: str, field: str | None) -> None:
    assert header_field(header) == field


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("确认", "confirmed"),
        ("发现", "confirmed"),
        ("排除", "dismissed"),
        ("制止", "stopped"),
        ("限期处置", "ordered"),
        ("立案", "ordered"),
        ("限期拆除", "ordered"),
        ("拆除", "demolished"),
        ("修复", "repaired"),
        ("销号", "closed"),
        ("Confirmed", "confirmed"),
        (" stopped ", "stopped"),
        ("确认 confirmed", "confirmed"),
        ("确认 stopped", None),
        ("flagged", None),
        ("好", None),
    ],
)
def test_kinds_in_english_or_chinese(text: str, kind: str | None) -> None:
    assert parse_kind(text) == kind


@pytest.mark.parametrize(
    ("value", "iso"),
    [
        ("2026-03-02", "2026-03-02"),
        ("2026/3/2", "2026-03-02"),
        ("2026-3-2", "2026-03-02"),
        ("2026.3.2", "2026-03-02"),
        ("2026年3月2日", "2026-03-02"),
        ("2026-03-02 14:30", "2026-03-02"),
        ("2026-03-02T14:30:00", "2026-03-02"),
        ("46083", "2026-03-02"),  # an Excel serial written into a CSV
        (46083, "2026-03-02"),
        (46083.6, "2026-03-02"),  # a serial with a time of day
        (dt.datetime(2026, 3, 2, 9, 15), "2026-03-02"),
        (dt.date(2026, 3, 2), "2026-03-02"),
        ("", ""),
        (None, ""),
        ("3/2/2026", None),
        ("2026-02-30", None),
        ("soon", None),
        ("12", None),  # a small number is no date
        (True, None),
    ],
)
def test_dates_in_every_form_inspectors_write(value: object, iso: str | None) -> None:
    assert parse_field_date(value) == iso


# -- positions -----------------------------------------------------------------------------------------------


def test_lon_lat_are_transformed_to_the_ledger_crs(tmp_path: Path) -> None:
    lon, lat = TO_WGS84.transform(X0 + 103, Y0 + 12)
    path = write_csv(tmp_path / "2026-03.csv", ["at", "kind", "lon", "lat"], [["2026-03-10", "确认", lon, lat]])
    (u,) = read(path).updates
    assert u.case_id == ""
    assert u.x == pytest.approx(X0 + 103, abs=0.01) and u.y == pytest.approx(Y0 + 12, abs=0.01)


def test_positions_that_cannot_be_right_are_problems(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "2026-03.csv",
        ["at", "kind", "x", "y", "lon", "lat"],
        [
            ["2026-03-10", "确认", 125.3, 43.8, "", ""],  # degrees in the x/y columns
            ["2026-03-10", "确认", "", "", 116.4, 39.9],  # Beijing: outside EPSG:4551's zone
            ["2026-03-10", "确认", "", "", 43.8, 125.3],  # swapped
            ["2026-03-10", "确认", "", "", "", ""],
        ],
    )
    lines = [p.line() for p in read(path).problems]
    assert len(lines) == 4
    assert "row 2: x 125.3, y 43.8 look like longitude/latitude" in lines[0] and "'lon' and 'lat'" in lines[0]
    assert "row 3: lon 116.4, lat 39.9 lie outside the ledger CRS's area of use (lon 124.5..127.5" in lines[1]
    assert "row 4: lon '43.8', lat '125.3' are not WGS84 degrees" in lines[2]
    assert "row 5: neither case_id nor x,y nor lon,lat is given" in lines[3]


# -- whole-file checking ---------------------------------------------------------------------------------------


def test_every_problem_is_collected_one_line_each(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "2026-03.csv",
        ["case_id", "kind", "at", "deadline"],
        [
            ["S-1", "confirmed", "2026-03-02", ""],  # good
            ["S-1", "maybe", "2026-03-02", ""],
            ["S-1", "confirmed", "02.03.2026", ""],
            ["S-1", "confirmed", "2026-04-02", ""],
            ["S-1", "ordered", "2026-03-02", ""],
            ["S-1", "ordered", "2026-03-10", "2026-03-01"],
            ["S-1", "", "2026-03-10", ""],
            ["S-1", "stopped", "", ""],
            ["S-1", "", "", ""],  # not yet checked
        ],
    )
    ff = read(path)
    assert [u.row for u in ff.updates] == [2]
    assert ff.not_checked == 1
    got = [(p.row, p.text.split(";")[0]) for p in ff.problems]
    assert got == [
        (3, "kind 'maybe' is not a field update kind"),
        (4, "at '02.03.2026' is not a date"),
        (5, "at 2026-04-02 is outside 2026-03"),
        (6, "column 'deadline' is empty: 'ordered' (限期处置) sets a deadline"),
        (7, "deadline 2026-03-01 is before at 2026-03-10"),
        (8, "kind is empty but the row has a date"),
        (9, "column 'at' is empty but the row has a finding"),
    ]
    with pytest.raises(FieldUpdateProblems) as err:
        read_field_updates(path, "2026-03", "field_updates/2026-03.csv", crs=LEDGER_CRS)
    assert len(err.value.problems) == 7 and "and 6 more problems" in str(err.value)
    assert str(path) in err.value.lines()[0]


def test_a_file_without_month_takes_it_from_its_rows(tmp_path: Path) -> None:
    one = write_csv(tmp_path / "a.csv", ["case_id", "kind", "at"], [["S-1", "确认", "2026/4/2"]])
    assert read(one, None).month == "2026-04"
    two = write_csv(
        tmp_path / "b.csv", ["case_id", "kind", "at"], [["S-1", "确认", "2026/3/30"], ["S-1", "制止", "2026/4/2"]]
    )
    (p,) = read(two, None).problems
    assert "rows are dated in 2 months (2026-03: rows 2; 2026-04: rows 3)" in p.line() and "--month" in p.line()


def test_a_header_without_kind_or_position_is_one_problem(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "2026-03.csv", ["foo", "date", "date"], [["x", "2026-03-02", "2026-03-02"]])
    lines = [p.line() for p in read(path).problems]
    assert any("columns 'date' and 'date' both give 'at'" in line for line in lines)
    assert any("no column for kind" in line for line in lines)
    assert any("need a 'case_id' column" in line for line in lines)


# -- XLSX and the dispatch list ------------------------------------------------------------------------------


def test_a_returned_dispatch_list_reads_as_is(tmp_path: Path) -> None:
    path = write_dispatch_list(
        tmp_path / "南关区-自强街道城管中队.xlsx",
        [
            {
                "case_id": "SW-202602-0001",
                "finding": "确认",
                "checked_at": dt.datetime(2026, 3, 4, 10, 30),
                "inspector": "王五",
            },
            {"case_id": "SW-202602-0002"},  # not yet checked
            {"case_id": "S-1", "finding": "限期拆除", "checked_at": "2026/3/6", "deadline": 46112, "note": "责令"},
            {"case_id": "SW-202603-0001", "finding": "排除", "checked_at": 46090, "inspector": "赵六"},
        ],
    )
    ff = read(path)
    assert ff.problems == [] and ff.sheet == "派单" and ff.encoding == "xlsx"
    assert ff.not_checked == 1
    got = [(u.row, u.case_id, u.kind, u.at, u.actor, u.deadline, u.note) for u in ff.updates]
    assert got == [
        (2, "SW-202602-0001", "confirmed", "2026-03-04", "王五", "", ""),
        (4, "S-1", "ordered", "2026-03-06", "", "2026-03-31", "责令"),
        (5, "SW-202603-0001", "dismissed", "2026-03-09", "赵六", "", ""),
    ]
    assert all(u.x is None for u in ff.updates)  # the case id is the position; GCJ-02 never is


def test_an_xlsx_with_several_sheets_and_no_paidan_says_which_it_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book = openpyxl.Workbook()
    first = book.active
    assert first is not None
    first.title = "三月"
    first.append(["case_id", "kind", "at"])
    first.append(["S-1", "制止", dt.date(2026, 3, 2)])
    book.create_sheet("notes").append(["nothing"])
    book.save(tmp_path / "2026-03.xlsx")
    with caplog.at_level(logging.WARNING):
        ff = read(tmp_path / "2026-03.xlsx")
    assert [(u.kind, u.at) for u in ff.updates] == [("stopped", "2026-03-02")]
    assert "2 sheets, none named 派单: reading the first, '三月'" in caplog.text


def test_a_broken_xlsx_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "2026-03.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(CorruptFileError, match=r"2026-03\.xlsx: cannot be read as an Excel workbook"):
        read(tmp_path / "2026-03.xlsx")


# -- the folder ----------------------------------------------------------------------------------------------


def test_the_folder_takes_several_files_a_month_and_xlsx(tmp_path: Path) -> None:
    folder = tmp_path / "field_updates"
    folder.mkdir()
    for name in ("2026-03.csv", "2026-03_unit-a.xlsx", "2026-03_20261201T120000Z_0a1b2c3d.csv", "2026-04.xlsx"):
        (folder / name).write_bytes(b"")
    (folder / "~$2026-03_unit-a.xlsx").write_bytes(b"")  # Excel's lock file
    (folder / ".2026-03_x.123-abcd.tmp.csv").write_bytes(b"")  # a temporary copy
    got = {m: [p.name for p in ps] for m, ps in field_update_files(folder).items()}
    assert got == {
        "2026-03": ["2026-03.csv", "2026-03_20261201T120000Z_0a1b2c3d.csv", "2026-03_unit-a.xlsx"],
        "2026-04": ["2026-04.xlsx"],
    }


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("2026-03.CSV", "rename it 2026-03.csv"),
        ("2026-03.XLSX", "rename it 2026-03.xlsx"),
        ("2026-03.xls", "save the sheet as Excel Workbook (.xlsx)"),
        ("2026-13_a.csv", "'2026-13' is not a month"),
        ("2026-03-unit-a.csv", "field updates must be named <YYYY-MM>.csv, <YYYY-MM>.xlsx or <YYYY-MM>_<tag>"),
        ("march.xlsx", "'march' is not a month"),
    ],
)
def test_misnamed_files_stay_clear_errors(tmp_path: Path, name: str, needle: str) -> None:
    folder = tmp_path / "field_updates"
    folder.mkdir()
    (folder / name).write_bytes(b"")
    with pytest.raises(LedgerError, match=None) as err:
        field_update_files(folder)
    assert name in str(err.value) and needle in str(err.value)
