"""`scarwatch ledger list / show / alerts` on a built ledger: the rows they print are the ledger's.

The project is :func:`tests.ledger_project.make_project` (seed, imagery, permit and field events, a field-
opened case) plus an ``ordered`` seed case with a passed deadline, street outlines and a 网格 grid; its
ledger is built by the real ``scarwatch ledger build``. Expected rows are computed from the ledger's events
(the fold of each case's log) and from the layers' polygons, not from the code under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
from click.testing import CliRunner, Result
from shapely.geometry import box

from pipeline.cli import cli as scarwatch
from pipeline.ledger import fold_state, read_ledger
from pipeline.ledger.query import Ledger, case_table
from tests.ledger_project import cli, make_project
from tests.test_ledger import CRS, X0, Y0, sq, write_seeds

STREETS = [
    ("东街道", "南关区", box(X0 - 50, Y0 - 50, X0 + 250, Y0 + 1000)),
    ("西街道", "朝阳区", box(X0 + 250, Y0 - 50, X0 + 1000, Y0 + 1000)),
]
CELLS = [
    ("G0", "网格一组", box(X0 - 50, Y0 - 50, X0 + 150, Y0 + 1000)),
    ("G1", "网格二组", box(X0 + 150, Y0 - 50, X0 + 350, Y0 + 1000)),
]
ORDERED_DEADLINE = "2026-02-20"


def make_ledger_project(project: Path) -> Path:
    """The project above, with its ledger built by ``scarwatch ledger build``; returns the project folder."""
    make_project(project)
    raw = project / "raw"
    write_seeds(
        raw,
        [
            {"case_id": "S-1", "state": "stopped", "geometry": sq(0, 0, 20)},
            {"case_id": "S-2", "state": "ordered", "deadline": ORDERED_DEADLINE, "geometry": sq(50, 400, 20)},
        ],
    )
    gpd.GeoDataFrame(
        {"street": [s[0] for s in STREETS], "district": [s[1] for s in STREETS]},
        geometry=[s[2] for s in STREETS],
        crs=CRS,
    ).to_file(raw / "layers" / "streets.gpkg", driver="GPKG")
    gpd.GeoDataFrame({"district": [s[1] for s in STREETS]}, geometry=[s[2] for s in STREETS], crs=CRS).to_file(
        raw / "layers" / "districts.gpkg", driver="GPKG"
    )
    gpd.GeoDataFrame(
        {"cell_id": [c[0] for c in CELLS], "unit": [c[1] for c in CELLS]}, geometry=[c[2] for c in CELLS], crs=CRS
    ).to_file(raw / "layers" / "grid.gpkg", driver="GPKG")
    done = cli(project, "ledger", "build")
    assert done.returncode == 0, done.stderr
    return project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ledger_project(tmp_path_factory.mktemp("ledgercmd"))


def run(project: Path, *args: str, monkeypatch: pytest.MonkeyPatch) -> Result:
    """``scarwatch ARGS`` in ``project``, in this process (the CLI's own parsing, errors and exit codes)."""
    monkeypatch.chdir(project)
    monkeypatch.setenv("COLUMNS", "250")
    return CliRunner().invoke(scarwatch, list(args), obj={}, catch_exceptions=False)


def listed(project: Path, *args: str, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    result = run(project, "ledger", "list", "--format", "json", *args, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.stderr
    return list(json.loads(result.stdout))


def folded(project: Path) -> dict[str, str]:
    """Each case's state, folded from its events (the ledger's log)."""
    events, _, _ = read_ledger(project / "processed" / "ledger.gpkg")
    return {str(c): fold_state(g) for c, g in events.groupby("case_id")}


def first_month(project: Path) -> dict[str, str]:
    events, _, _ = read_ledger(project / "processed" / "ledger.gpkg")
    return {str(c): str(g.sort_values("seq")["month"].iloc[0]) for c, g in events.groupby("case_id")}


def unit_at(geom: object) -> str:
    """The unit of the grid cell under a footprint's representative point (else its street office)."""
    point = geom.representative_point()  # type: ignore[attr-defined]
    cell = [c[1] for c in CELLS if c[2].intersects(point)]
    street = [s[0] for s in STREETS if s[2].intersects(point)]
    return cell[0] if cell else f"{street[0]}办" if street else ""


def test_list_shows_every_case_with_its_folded_state_place_and_unit(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = listed(project, monkeypatch=monkeypatch)
    states = folded(project)
    assert {r["case_id"]: r["state"] for r in rows} == states
    assert len(states) == 7  # S-1, S-2, three imagery cases, the permit case, the field case
    _, cases, _ = read_ledger(project / "processed" / "ledger.gpkg")
    by_id = cases.set_index("case_id")
    for r in rows:
        case = by_id.loc[r["case_id"]]
        assert r["unit"] == unit_at(case.geometry)
        assert r["district"] == case["district"] and r["street"] == case["street"]
        assert r["area_m2"] == pytest.approx(case["area_m2"]) and r["area_mu"] == pytest.approx(
            case["area_m2"] / 666.667, abs=1e-3
        )
    s1 = next(r for r in rows if r["case_id"] == "S-1")
    assert (s1["state_zh"], s1["district"], s1["street"], s1["unit"]) == ("已制止", "南关区", "东街道", "网格一组")


@pytest.mark.parametrize("state", ["warning", "confirmed", "stopped", "已制止", "制止", "dismissed", "ordered"])
def test_list_by_state_returns_the_cases_in_that_state(
    state: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = {"已制止": "stopped", "制止": "stopped"}.get(state, state)
    expected = sorted(c for c, s in folded(project).items() if s == key)
    assert expected  # each state asked for has cases
    assert [r["case_id"] for r in listed(project, "--state", state, monkeypatch=monkeypatch)] == expected


def test_filters_combine(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    states, months = folded(project), first_month(project)
    expected = sorted(c for c in states if states[c] == "warning" and months[c] == "2026-03")
    got = listed(project, "--state", "warning", "--month", "2026-03", monkeypatch=monkeypatch)
    assert [r["case_id"] for r in got] == expected == ["SW-202603-0001"]
    both = listed(
        project, "--state", "warning", "--state", "confirmed", "--district", "朝阳区", monkeypatch=monkeypatch
    )
    _, cases, _ = read_ledger(project / "processed" / "ledger.gpkg")
    west = set(cases.loc[cases["district"] == "朝阳区", "case_id"])
    assert [r["case_id"] for r in both] == sorted(c for c in west if states[c] in ("warning", "confirmed"))
    unit = listed(project, "--unit", "网格二组", monkeypatch=monkeypatch)
    assert [r["case_id"] for r in unit] == sorted(
        c for c, g in zip(cases["case_id"], cases.geometry, strict=True) if unit_at(g) == "网格二组"
    )


def test_overdue_is_judged_on_the_day_asked(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    late = listed(project, "--overdue", "--as-of", "2026-03-31", monkeypatch=monkeypatch)
    assert [(r["case_id"], r["due"], r["overdue"]) for r in late] == [("S-2", ORDERED_DEADLINE, True)]
    assert listed(project, "--overdue", "--as-of", "2026-02-10", monkeypatch=monkeypatch) == []


def test_list_table_is_bilingual(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(project, "ledger", "list", "--as-of", "2026-03-31", monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.stderr
    s2 = next(line for line in result.stdout.splitlines() if "S-2" in line)
    for text in (
        "处置中 ordered",
        "违法建设 illegal_construction",
        "南关区",
        "网格一组",
        ORDERED_DEADLINE,
        "逾期 overdue",
    ):
        assert text in s2
    assert "7 of 7 cases" in result.stdout


def test_due_of_a_dispatched_case_waits_for_a_field_event() -> None:
    """A dispatch (contract C2) makes the field check due; a field event after it settles it."""
    geom = sq(0, 0)
    events = gpd.GeoDataFrame(
        {
            "seq": [1, 2, 3, 4, 5],
            "case_id": ["A", "A", "B", "B", "B"],
            "kind": ["flagged", "dispatched", "flagged", "dispatched", "confirmed"],
            "source": ["imagery", "dispatch", "imagery", "dispatch", "field"],
            "deadline": ["", "2026-03-04", "", "2026-03-04", ""],
        },
        geometry=[geom] * 5,
        crs=CRS,
    )
    cases = gpd.GeoDataFrame(
        {
            "case_id": ["A", "B"],
            "state": ["warning", "confirmed"],
            "category": ["illegal_construction"] * 2,
            "opened_at": ["2026-03-01"] * 2,
            "last_event_at": ["2026-03-01", "2026-03-03"],
            "deadline": ["", ""],
            "district": ["", ""],
            "street": ["", ""],
            "area_m2": [100.0, 100.0],
            "n_events": [2, 3],
            "first_month": ["2026-03"] * 2,
            "permit_id": ["", ""],
        },
        geometry=[geom, geom],
        crs=CRS,
    )
    ledger = Ledger(Path("l.gpkg"), events, cases, gpd.GeoDataFrame(geometry=[], crs=CRS))
    table = case_table(ledger, None, as_of=pd.Timestamp("2026-03-05").date()).set_index("case_id")
    assert table.loc["A", ["due", "due_for", "overdue"]].tolist() == ["2026-03-04", "check", True]
    assert table.loc["B", ["due", "due_for", "overdue"]].tolist() == ["", "", False]


def test_show_prints_the_timeline_in_log_order(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events, _, _ = read_ledger(project / "processed" / "ledger.gpkg")
    mine = events[events["case_id"] == "SW-202602-0001"].sort_values("seq")
    result = run(project, "ledger", "show", "SW-202602-0001", "--format", "json", monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["at"], r["kind"], r["source"], r["evidence"], r["actor"]) for r in rows] == list(
        zip(mine["at"], mine["kind"], mine["source"], mine["evidence"], mine["actor"], strict=True)
    )
    assert {r["state"] for r in rows} == {"confirmed"}
    table = run(project, "ledger", "show", "sw-202602-0001", monkeypatch=monkeypatch)  # ids match case-blind
    assert table.exit_code == 0, table.stderr
    out = table.stdout
    assert out.splitlines()[0].startswith("SW-202602-0001: 已发现 confirmed")
    assert out.index("预警 flagged") < out.index("确认 confirmed")
    assert "field_updates/2026-03.csv:2" in out


def test_alerts_by_month(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, alerts = read_ledger(project / "processed" / "ledger.gpkg")
    for month in ("2026-02", "2026-03"):
        result = run(project, "ledger", "alerts", "--month", month, "--format", "json", monkeypatch=monkeypatch)
        assert result.exit_code == 0, result.stderr
        got = sorted((r["case_id"], r["kind"], r["month"]) for r in json.loads(result.stdout))
        expected = sorted(zip(alerts["case_id"], alerts["kind"], alerts["month"], strict=True))
        assert got == [e for e in expected if e[2] == month]
        assert ("S-2", "overdue", month) in got
    table = run(project, "ledger", "alerts", monkeypatch=monkeypatch)
    assert "逾期未拆除 overdue" in table.stdout and f"期限 {ORDERED_DEADLINE}" in table.stdout
    none = run(project, "ledger", "alerts", "--month", "2027-01", monkeypatch=monkeypatch)
    assert none.exit_code == 0 and "in 2027-01: 0 (months with alerts: 2026-02, 2026-03)" in none.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "SW-202602-001"), r"no case 'SW-202602-001' in the ledger; did you mean SW-202602-0001"),
        (("list", "--state", "gone"), r"--state 'gone': not a lifecycle state; use one of warning \(预警\), confirmed"),
        (("list", "--district", "北区"), r"--district '北区': not in the ledger; use one of 南关区, 朝阳区"),
        (("list", "--unit", "x"), r"--unit 'x': not in the ledger; use one of 网格一组, 网格二组, 西街道办"),
        (("list", "--month", "2026-3"), r"--month '2026-3': not a month; write it YYYY-MM"),
        (("alerts", "--month", "March"), r"--month 'March': not a month"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(
    args: tuple[str, ...], message: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(project, "ledger", *args, monkeypatch=monkeypatch)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"scarwatch ledger {args[0]}: error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("command", [("list",), ("show", "S-1"), ("alerts",), ("export", "--format", "csv")])
def test_a_missing_ledger_says_how_to_build_it(command: tuple[str, ...], tmp_path: Path) -> None:
    make_project(tmp_path)  # no ledger built
    done = cli(tmp_path, "ledger", *command)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "ledger.gpkg: ledger not found; run `scarwatch ledger build` (or `dvc repro ledger`) first" in done.stderr
    assert not (tmp_path / "reports" / "ledger" / "ledger.csv").exists()
