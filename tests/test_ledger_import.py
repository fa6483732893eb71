"""`scarwatch ledger import FILE [--dry-run] [--month M]` through the real CLI (issue 12): checked whole against
the live ledger, every problem one line, nothing written on a problem or a dry run, idempotent, and the
returned dispatch list moves its cases through the lifecycle."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from pyproj import Transformer

from pipeline.ledger import read_ledger
from tests.ledger_project import cli, make_project
from tests.test_fieldio import write_csv, write_dispatch_list

LEDGER = Path("processed") / "ledger.gpkg"
FOLDER = Path("raw") / "field_updates"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = make_project(tmp_path_factory.mktemp("built"))
    proc = cli(p, "ledger", "build")
    assert proc.returncode == 0, proc.stderr
    return p


@pytest.fixture
def project(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of a built project: cases S-1 stopped, SW-202602-0001 confirmed, SW-202602-0002 warning,
    SW-202602-0003 dismissed (permit), SW-202603-0001 warning, SW-202603-F001 confirmed (found in the field)."""
    return Path(shutil.copytree(built, tmp_path / "p"))


def states(p: Path) -> dict[str, str]:
    _, cases, _ = read_ledger(p / LEDGER)
    return dict(zip(cases["case_id"], cases["state"], strict=True))


def folder(p: Path) -> list[str]:
    return sorted(f.name for f in (p / FOLDER).iterdir())


def error_lines(proc) -> list[str]:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return [line for line in proc.stderr.splitlines() if not line.startswith(("INFO", "WARNING", "DEBUG"))]


GBK_ROWS = [
    ["SW-202602-0002", "确认", "2026/3/12", "张三", ""],
    ["SW-202602-0001", "制止", "2026年3月15日", "李四", ""],
    ["SW-202603-0001", "", "", "", ""],  # not yet checked
]
HEADER = ["案件编号 case_id", "核查结果 finding", "核查日期 checked_at", "核查人 inspector", "限期 deadline"]


def test_dry_run_checks_and_writes_nothing(project: Path, tmp_path: Path) -> None:
    f = write_csv(tmp_path / "returned.csv", HEADER, GBK_ROWS, "gbk")
    before, listing = (project / LEDGER).read_bytes(), folder(project)
    proc = cli(project, "ledger", "import", str(f), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "(gb18030, month 2026-03): would add 2 events (confirmed 1, stopped 1)" in proc.stdout
    assert "1 rows not yet checked skipped, 0 already in the ledger; nothing written" in proc.stdout
    assert (project / LEDGER).read_bytes() == before and folder(project) == listing


def test_import_appends_once_whatever_the_name_or_encoding(project: Path, tmp_path: Path) -> None:
    f = write_csv(tmp_path / "returned.csv", HEADER, GBK_ROWS, "gbk")
    before = set(read_ledger(project / LEDGER)[0]["event_id"])
    proc = cli(project, "ledger", "import", str(f))
    assert proc.returncode == 0, proc.stderr
    assert "2 events added (confirmed 1, stopped 1)" in proc.stdout
    (copy,) = [n for n in folder(project) if n != "2026-03.csv"]
    assert copy.startswith("2026-03_") and copy.endswith(".csv")
    assert (project / FOLDER / copy).read_bytes() == f.read_bytes()  # the input of record, byte for byte
    s = states(project)
    assert (s["SW-202602-0002"], s["SW-202602-0001"]) == ("confirmed", "stopped")
    events = read_ledger(project / LEDGER)[0]
    added = events[~events["event_id"].isin(before)]
    assert sorted(added["evidence"]) == [f"field_updates/{copy}:2", f"field_updates/{copy}:3"]
    assert sorted(added["actor"]) == ["张三", "李四"]
    after = (project / LEDGER).read_bytes()

    again = cli(project, "ledger", "import", str(f))  # the same file again
    assert again.returncode == 0 and "already imported, nothing added" in again.stdout
    renamed = shutil.copy(f, tmp_path / "另一个名字.csv")  # the same bytes under another name
    assert "already imported, nothing added" in cli(project, "ledger", "import", str(renamed)).stdout
    utf8 = write_csv(tmp_path / "utf8.csv", HEADER, GBK_ROWS, "utf-8-sig")  # the same rows, another encoding
    assert "2 already in the ledger" in cli(project, "ledger", "import", str(utf8)).stdout
    sheet = write_dispatch_list(  # and as an XLSX
        tmp_path / "returned.xlsx",
        [
            {"case_id": "SW-202602-0002", "finding": "确认", "checked_at": dt.date(2026, 3, 12), "inspector": "张三"},
            {"case_id": "SW-202602-0001", "finding": "制止", "checked_at": "2026-03-15", "inspector": "李四"},
        ],
    )
    assert "already imported, nothing added" in cli(project, "ledger", "import", str(sheet)).stdout
    assert (project / LEDGER).read_bytes() == after
    assert folder(project) == sorted(["2026-03.csv", copy])
    assert cli(project, "ledger", "rebuild").returncode == 0  # the copy replays to the live ledger


def test_a_returned_dispatch_list_moves_its_cases(project: Path, tmp_path: Path) -> None:
    sheet = write_dispatch_list(
        tmp_path / "自强街道城管中队.xlsx",
        [
            {
                "case_id": "SW-202602-0002",
                "finding": "确认",
                "checked_at": dt.datetime(2026, 3, 4, 9, 0),
                "inspector": "王五",
            },
            {
                "case_id": "SW-202603-0001",
                "finding": "排除",
                "checked_at": "2026/3/5",
                "inspector": "王五",
                "note": "已审批",
            },
            {"case_id": "S-1", "finding": "拆除", "checked_at": 46091, "inspector": "赵六"},
            {"case_id": "SW-202603-F001"},  # not yet checked
        ],
    )
    proc = cli(project, "ledger", "import", str(sheet))
    assert proc.returncode == 0, proc.stderr
    assert "(xlsx, sheet 派单, month 2026-03): 3 events added (confirmed 1, demolished 1, dismissed 1)" in proc.stdout
    assert "1 rows not yet checked skipped" in proc.stdout
    s = states(project)
    assert (s["SW-202602-0002"], s["SW-202603-0001"], s["S-1"], s["SW-202603-F001"]) == (
        "confirmed",
        "dismissed",
        "demolished",
        "confirmed",
    )
    events = read_ledger(project / LEDGER)[0]
    s1 = events[(events["case_id"] == "S-1") & (events["kind"] == "demolished")]
    assert s1["at"].tolist() == ["2026-03-10"] and s1["evidence"].str.endswith(".xlsx:4").all()
    assert cli(project, "ledger", "rebuild").returncode == 0


def test_lon_lat_find_the_case(project: Path, tmp_path: Path) -> None:
    _, cases, _ = read_ledger(project / LEDGER)
    point = cases.set_index("case_id").geometry["SW-202602-0002"].representative_point()
    lon, lat = Transformer.from_crs(cases.crs, 4326, always_xy=True).transform(point.x, point.y)
    f = write_csv(tmp_path / "gps.csv", ["日期", "结果", "经度", "纬度"], [["2026-03-20", "确认", lon, lat]])
    proc = cli(project, "ledger", "import", str(f))
    assert proc.returncode == 0, proc.stderr
    assert states(project)["SW-202602-0002"] == "confirmed"


def test_every_problem_is_one_line_and_nothing_is_written(project: Path, tmp_path: Path) -> None:
    f = write_csv(
        tmp_path / "bad.csv",
        ["case_id", "kind", "at", "deadline", "lon", "lat"],
        [
            ["SW-202602-0002", "确认", "2026-03-10", "", "", ""],  # fine on its own
            ["SW-202602-0002", "确认", "2026-03-12", "", "", ""],  # confirmed twice: refused by the fold
            ["NOPE-1", "制止", "2026-03-12", "", "", ""],
            ["SW-202603-F001", "销号", "2026-03-12", "", "", ""],  # closed from confirmed: forbidden
            ["S-1", "wat", "2026-03-12", "", "", ""],
            ["S-1", "限期处置", "2026-03-12", "", "", ""],
            ["", "确认", "2026-03-12", "", 116.4, 39.9],
            ["S-1", "拆除", "2026-04-01", "", "", ""],
        ],
    )
    before, listing = (project / LEDGER).read_bytes(), folder(project)
    lines = error_lines(cli(project, "ledger", "import", str(f), "--month", "2026-03"))
    assert len(lines) == 8, lines
    expect = [
        "row 3: case SW-202602-0002 is in state 'confirmed' at 2026-03-12; 'confirmed' is not allowed",
        "row 4: case 'NOPE-1' is not in the live ledger",
        "row 5: case SW-202603-F001 is in state 'confirmed' at 2026-03-12; 'closed' is not allowed",
        "row 6: kind 'wat' is not a field update kind",
        "row 7: column 'deadline' is empty",
        "row 8: lon 116.4, lat 39.9 lie outside the ledger CRS's area of use",
        "row 9: at 2026-04-01 is outside 2026-03",
    ]
    for line, needle in zip(lines, expect, strict=False):
        assert line.startswith(str(f)) and needle in line, (line, needle)
    assert lines[-1].startswith("scarwatch ledger import: error: ") and "7 problems (listed above)" in lines[-1]
    assert (project / LEDGER).read_bytes() == before and folder(project) == listing


def test_problems_are_capped_at_fifty_lines(project: Path, tmp_path: Path) -> None:
    f = write_csv(
        tmp_path / "2026-03_many.csv", ["case_id", "kind", "at"], [["S-1", f"k{i}", "2026-03-02"] for i in range(60)]
    )
    lines = error_lines(cli(project, "ledger", "import", str(f)))
    assert len(lines) == 52 and lines[50] == "... and 10 more problems" and "60 problems" in lines[51]


def test_a_file_spanning_months_needs_a_month(project: Path, tmp_path: Path) -> None:
    f = write_csv(
        tmp_path / "mixed.csv",
        ["case_id", "kind", "at"],
        [["S-1", "拆除", "2026-03-30"], ["S-1", "修复", "2026-04-02"]],
    )
    (line, last) = error_lines(cli(project, "ledger", "import", str(f)))
    assert "rows are dated in 2 months (2026-03: rows 2; 2026-04: rows 3)" in line and "--month" in line
    assert "1 problem (listed above)" in last


def test_a_month_ahead_of_the_imagery_is_applied_not_dropped(project: Path, tmp_path: Path) -> None:
    f = write_csv(tmp_path / "may.csv", ["case_id", "kind", "at"], [["S-1", "拆除", "2026-05-06"]])
    proc = cli(project, "ledger", "import", str(f))
    assert proc.returncode == 0, proc.stderr
    assert "its month 2026-05 is after the last imagery month 2026-03" in proc.stderr
    events = read_ledger(project / LEDGER)[0]
    row = events[(events["case_id"] == "S-1") & (events["kind"] == "demolished")]
    assert row[["at", "month"]].values.tolist() == [["2026-05-06", "2026-05"]]
    assert [n for n in folder(project) if n.startswith("2026-05_")]
    assert cli(project, "ledger", "rebuild").returncode == 0


def test_a_late_update_must_keep_later_events_legal(project: Path, tmp_path: Path) -> None:
    # SW-202602-0001 was confirmed on 2026-03-05 (the March file); dismissing it in February would make
    # that later 'confirmed' a reopening, fine; but confirming it in February makes March's illegal.
    f = write_csv(tmp_path / "feb.csv", ["case_id", "kind", "at"], [["SW-202602-0001", "确认", "2026-02-20"]])
    (line, _) = error_lines(cli(project, "ledger", "import", str(f)))
    assert "row 2: after this row case SW-202602-0001 is in state 'confirmed'" in line
    assert "later event 'confirmed' of 2026-03 (field_updates/2026-03.csv:2) illegal" in line


def test_a_build_that_fails_takes_the_copy_back(project: Path, tmp_path: Path) -> None:
    (project / FOLDER / "notes.txt").write_text("not an update")  # breaks every build, not the import's check
    listing = folder(project)
    f = write_csv(tmp_path / "ok.csv", ["case_id", "kind", "at"], [["S-1", "拆除", "2026-03-06"]])
    (last,) = [line for line in error_lines(cli(project, "ledger", "import", str(f))) if ": error: " in line]
    assert "notes.txt" in last
    assert folder(project) == listing  # no copy of a file the ledger did not take


def test_missing_and_wrong_files_are_one_line(project: Path, tmp_path: Path) -> None:
    (last,) = error_lines(cli(project, "ledger", "import", str(tmp_path / "nope.csv")))
    assert "nope.csv: not found" in last
    (tmp_path / "u.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    (last,) = error_lines(cli(project, "ledger", "import", str(tmp_path / "u.xls")))
    assert "u.xls: a field-update file is .csv or .xlsx" in last
    (tmp_path / "empty.csv").write_text("case_id,kind,at\n")
    (last,) = error_lines(cli(project, "ledger", "import", str(tmp_path / "empty.csv")))
    assert "holds no rows" in last
    (last,) = error_lines(cli(project, "ledger", "import", str(tmp_path / "empty.csv"), "--month", "March"))
    assert "--month 'March'" in last
