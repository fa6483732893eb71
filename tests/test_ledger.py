"""The scar ledger: lifecycle, matching flags to cases, field updates, alerts, the store."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
from shapely.geometry import Polygon, box

from pipeline.config import LedgerSettings
from pipeline.errors import (
    CRSMismatchError,
    IllegalTransitionError,
    LedgerError,
    MissingInputError,
    ScarWatchError,
)
from pipeline.formats import MU_M2
from pipeline.ledger import build_ledger, fold_state, read_ledger
from pipeline.ledger.events import ADMIN_KINDS, EVENT_KINDS, LIFECYCLE_KINDS, OBSERVATION_KINDS, event_id
from pipeline.ledger.lifecycle import STATES, TRANSITIONS, apply, fold_kinds, next_state, seed_path

CRS = "EPSG:4551"
X0, Y0 = 500000.0, 4860000.0


def sq(x: float, y: float, size: float = 10.0) -> Polygon:
    """A square of ``size`` metres whose lower-left corner is ``(X0 + x, Y0 + y)``."""
    return box(X0 + x, Y0 + y, X0 + x + size, Y0 + y + size)


def write_flags(flags_dir: Path, month: str, rows: Sequence[tuple[str, str, Polygon]], crs: str = CRS) -> Path:
    """Write ``flags/<month>.gpkg`` from (flag_id, kind, polygon) rows."""
    flags_dir.mkdir(parents=True, exist_ok=True)
    geoms = [g for _, _, g in rows]
    frame = gpd.GeoDataFrame(
        {
            "flag_id": [f for f, _, _ in rows],
            "month": [month] * len(rows),
            "kind": [k for _, k, _ in rows],
            "area_m2": [g.area for g in geoms],
            "area_mu": [g.area / MU_M2 for g in geoms],
            "p_mean": [0.8] * len(rows),
            "p_max": [0.9] * len(rows),
            "lon": [125.3] * len(rows),
            "lat": [43.9] * len(rows),
            "district": ["南关区"] * len(rows),
            "street": ["永吉街道"] * len(rows),
        },
        geometry=gpd.GeoSeries(geoms, crs=crs),
        crs=crs,
    )
    path = flags_dir / f"{month}.gpkg"
    frame.to_file(path, layer="flags", driver="GPKG", engine="pyogrio", geometry_type="Polygon")
    return path


def write_seeds(raw: Path, rows: Sequence[dict[str, object]]) -> Path:
    """Write ``ledger/cases.gpkg`` from dicts with case_id, state, geometry (other columns defaulted)."""
    (raw / "ledger").mkdir(parents=True, exist_ok=True)
    defaults = {"opened_at": "2025-12-01", "category": "illegal_construction", "note": "", "deadline": ""}
    full = [{**defaults, **r} for r in rows]
    frame = gpd.GeoDataFrame(
        pd.DataFrame([{k: v for k, v in r.items() if k != "geometry"} for r in full]),
        geometry=gpd.GeoSeries([r["geometry"] for r in full], crs=CRS),
        crs=CRS,
    )
    path = raw / "ledger" / "cases.gpkg"
    frame.to_file(path, layer="cases", driver="GPKG", engine="pyogrio")
    return path


def write_permits(raw: Path, rows: Sequence[tuple[str, str, str, Polygon]]) -> Path:
    """Write ``layers/permits.gpkg`` from (permit_id, valid_from, valid_to, polygon) rows."""
    (raw / "layers").mkdir(parents=True, exist_ok=True)
    frame = gpd.GeoDataFrame(
        {
            "permit_id": [r[0] for r in rows],
            "valid_from": [r[1] for r in rows],
            "valid_to": [r[2] for r in rows],
            "note": [""] * len(rows),
        },
        geometry=gpd.GeoSeries([r[3] for r in rows], crs=CRS),
        crs=CRS,
    )
    path = raw / "layers" / "permits.gpkg"
    frame.to_file(path, layer="permits", driver="GPKG", engine="pyogrio")
    return path


def write_updates(raw: Path, month: str, rows: Sequence[dict[str, object]]) -> Path:
    """Write ``field_updates/<month>.csv`` (columns at, kind, actor, note, deadline, case_id, x, y)."""
    (raw / "field_updates").mkdir(parents=True, exist_ok=True)
    path = raw / "field_updates" / f"{month}.csv"
    cols = ["at", "kind", "actor", "note", "deadline", "case_id", "x", "y"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "inspector" if c == "actor" else "") for c in cols})
    return path


def run(tmp_path: Path, months: Sequence[str], out: str = "ledger.gpkg", **kw: float) -> Path:
    """Build the ledger of ``tmp_path`` (flags/ and raw/) for ``months``; return its path."""
    out_path = tmp_path / "processed" / out
    flags = sorted((tmp_path / "flags").glob("*.gpkg"))
    (tmp_path / "raw").mkdir(exist_ok=True)
    build_ledger(flags, tmp_path / "raw", out_path, LedgerSettings.model_validate(kw), months=months)
    return out_path


def kinds_of(events: gpd.GeoDataFrame, case_id: str, *, dispatches: bool = False) -> list[str]:
    """The kinds of a case's events in log order; the administrative ``dispatched`` ones only if asked."""
    kinds = events.loc[events["case_id"] == case_id, "kind"].tolist()
    return kinds if dispatches else [k for k in kinds if k != "dispatched"]


# -- lifecycle ---------------------------------------------------------------------------------------------

LEGAL = [(s, k, n) for s, table in TRANSITIONS.items() for k, n in table.items()]
ILLEGAL = [(s, k) for s in (None, *STATES) for k in LIFECYCLE_KINDS if k not in TRANSITIONS[s]]


@pytest.mark.parametrize(("state", "kind", "expected"), LEGAL)
def test_every_legal_transition(state: str | None, kind: str, expected: str) -> None:
    assert next_state(state, kind) == expected


@pytest.mark.parametrize(("state", "kind"), ILLEGAL)
def test_every_illegal_transition_raises(state: str | None, kind: str) -> None:
    allowed = ", ".join(TRANSITIONS[state])
    with pytest.raises(
        IllegalTransitionError, match=rf"here: case C1 .*{kind!r} is not allowed \(allowed: {allowed}\)"
    ):
        next_state(state, kind, case_id="C1", where="here: ")


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", OBSERVATION_KINDS)
def test_observations_never_change_state(state: str, kind: str) -> None:
    assert apply(state, kind) == state


@pytest.mark.parametrize("state", STATES)
def test_seed_path_reaches_state_legally(state: str) -> None:
    path = seed_path(state)
    assert path[0] == "flagged"
    assert fold_kinds(path) == state


def test_seed_path_is_shortest() -> None:
    assert seed_path("closed") == ("flagged", "confirmed", "demolished", "closed")
    assert seed_path("ordered") == ("flagged", "confirmed", "ordered")
    with pytest.raises(ValueError, match="not a lifecycle state"):
        seed_path("gone")


def test_fold_refuses_observation_before_opening() -> None:
    with pytest.raises(IllegalTransitionError, match="not opened yet"):
        fold_kinds(["observed_present", "flagged"])
    with pytest.raises(ValueError, match="no 'flagged' event"):
        fold_kinds([])


def test_event_id_is_deterministic_and_distinct() -> None:
    a = event_id("C1", "2026-02-01", "flagged", "imagery", "f1")
    assert a == event_id("C1", "2026-02-01", "flagged", "imagery", "f1")
    assert a != event_id("C1", "2026-02-01", "flagged", "imagery", "f2")
    assert len(a) == 16
    assert set(LIFECYCLE_KINDS) | set(OBSERVATION_KINDS) | set(ADMIN_KINDS) == set(EVENT_KINDS)


# -- matching flags to cases -------------------------------------------------------------------------------


def test_new_flags_open_warning_cases_in_flag_id_order(tmp_path: Path) -> None:
    write_flags(tmp_path / "flags", "2026-02", [("f2", "new", sq(100, 0)), ("f1", "new", sq(0, 0))])
    out = run(tmp_path, ["2026-02"])
    events, cases, alerts = read_ledger(out)
    assert cases["case_id"].tolist() == ["SW-202602-0001", "SW-202602-0002"]
    assert set(cases["state"]) == {"warning"}
    first = events[events["case_id"] == "SW-202602-0001"].iloc[0]
    assert (first["kind"], first["source"], first["evidence"], first["at"]) == (
        "flagged",
        "imagery",
        "f1",
        "2026-02-01",
    )
    assert cases.iloc[0]["district"] == "南关区"
    assert cases.iloc[0]["area_m2"] == pytest.approx(100.0)
    assert set(alerts["kind"]) == {"check_overdue"}  # dispatched, no field check by the month's end


def test_second_sighting_is_observed_present_not_a_new_case(tmp_path: Path) -> None:
    write_flags(tmp_path / "flags", "2026-02", [("a", "new", sq(0, 0))])
    write_flags(tmp_path / "flags", "2026-03", [("b", "new", sq(12, 0, 1))])  # 2 m away, small
    out = run(tmp_path, ["2026-02", "2026-03"])
    events, cases, _ = read_ledger(out)
    assert len(cases) == 1
    assert kinds_of(events, "SW-202602-0001") == ["flagged", "observed_present"]


def test_flag_on_demolished_case_is_rebuilt_with_alert(tmp_path: Path) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "OLD-1", "state": "demolished", "geometry": sq(0, 0)}])
    write_flags(tmp_path / "flags", "2026-02", [("r1", "new", sq(1, 1, 8))])
    out = run(tmp_path, ["2026-02"])
    events, cases, alerts = read_ledger(out)
    assert len(cases) == 1
    # the rebuild reopens the case (反弹), which makes it a warning again: dispatched to its unit like a new one,
    # and again at the month's end, unchecked past its due date
    assert kinds_of(events, "OLD-1", dispatches=True)[-4:] == ["reopened", "rebuilt", "dispatched", "dispatched"]
    rebuild = alerts[alerts["kind"] == "rebuild"]
    assert rebuild["case_id"].tolist() == ["OLD-1"]
    assert "反弹" in rebuild.iloc[0]["message_zh"]


def test_flag_inside_valid_permit_is_recorded_then_dismissed(tmp_path: Path) -> None:
    write_permits(
        tmp_path / "raw",
        [("P-1", "2026-01-01", "2026-12-31", sq(0, 0, 50)), ("P-old", "2020-01-01", "2021-01-01", sq(200, 0, 50))],
    )
    write_flags(tmp_path / "flags", "2026-02", [("in", "new", sq(10, 10)), ("expired", "new", sq(210, 10))])
    flags = sorted((tmp_path / "flags").glob("*.gpkg"))
    summary = build_ledger(
        flags, tmp_path / "raw", tmp_path / "l.gpkg", LedgerSettings.model_validate({}), months=["2026-02"]
    )
    events, cases, _ = read_ledger(tmp_path / "l.gpkg")
    permitted = cases[cases["permit_id"] != ""]
    assert permitted["permit_id"].tolist() == ["P-1"]
    assert permitted["state"].tolist() == ["dismissed"]
    last = events[events["case_id"] == permitted.iloc[0]["case_id"]].iloc[-1]
    assert (last["kind"], last["source"], last["evidence"]) == ("dismissed", "permit", "layers/permits.gpkg:P-1")
    assert cases.loc[cases["permit_id"] == "", "state"].tolist() == ["warning"]
    assert summary.new_cases_by_month == {"2026-02": 1}
    assert summary.permitted_by_month == {"2026-02": 1}


def test_flag_sticking_out_of_permit_is_a_warning(tmp_path: Path) -> None:
    write_permits(tmp_path / "raw", [("P-1", "", "", sq(0, 0, 20))])
    write_flags(tmp_path / "flags", "2026-02", [("big", "new", sq(10, 0, 30))])
    _, cases, _ = read_ledger(run(tmp_path, ["2026-02"]))
    assert cases["state"].tolist() == ["warning"]


def test_expansion_after_stop_raises_alert(tmp_path: Path) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "S-1", "state": "stopped", "geometry": sq(0, 0)}])
    write_flags(tmp_path / "flags", "2026-02", [("grow", "new", sq(10, 0))])  # adjoining: doubles the area
    out = run(tmp_path, ["2026-02"])
    events, cases, alerts = read_ledger(out)
    assert kinds_of(events, "S-1") == ["flagged", "confirmed", "stopped", "expanded"]
    assert cases.iloc[0]["area_m2"] == pytest.approx(200.0)
    assert alerts["kind"].tolist() == ["expansion_after_stop"]
    assert alerts.iloc[0]["message_en"] == "Expansion after a stop order"


def test_expansion_before_stop_is_no_alert(tmp_path: Path) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "W-1", "state": "warning", "geometry": sq(0, 0)}])
    write_flags(tmp_path / "flags", "2026-02", [("grow", "new", sq(10, 0))])
    events, _, alerts = read_ledger(run(tmp_path, ["2026-02"]))
    assert kinds_of(events, "W-1")[-1] == "expanded"
    assert alerts.empty


def test_removed_flag_annotates_and_asks_to_verify(tmp_path: Path) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "O-1", "state": "ordered", "geometry": sq(0, 0)}])
    write_flags(tmp_path / "flags", "2026-02", [("gone", "removed", sq(0, 0)), ("far", "removed", sq(500, 0))])
    events, cases, alerts = read_ledger(run(tmp_path, ["2026-02"]))
    assert kinds_of(events, "O-1")[-1] == "observed_removed"
    assert cases.iloc[0]["state"] == "ordered"  # observations never change the state
    assert alerts["kind"].tolist() == ["removal_unrecorded"]


# -- field updates -----------------------------------------------------------------------------------------


def test_field_update_by_location(tmp_path: Path) -> None:
    write_flags(tmp_path / "flags", "2026-02", [("f1", "new", sq(0, 0)), ("f2", "new", sq(100, 0))])
    write_updates(tmp_path / "raw", "2026-02", [{"at": "2026-02-10", "kind": "confirmed", "x": X0 + 103, "y": Y0 + 12}])
    events, cases, _ = read_ledger(run(tmp_path, ["2026-02"]))
    assert cases.set_index("case_id")["state"].to_dict() == {"SW-202602-0001": "warning", "SW-202602-0002": "confirmed"}
    ev = events[events["source"] == "field"].iloc[-1]
    assert (ev["kind"], ev["source"], ev["evidence"], ev["actor"]) == (
        "confirmed",
        "field",
        "field_updates/2026-02.csv:2",
        "inspector",
    )


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (X0 + 14, Y0 + 5, r"2026-02\.csv row 2: x=.* is ambiguous: cases SW-202602-0001, SW-202602-0002"),
        (X0 + 300, Y0 + 300, r"2026-02\.csv row 2: no case lies within 5 m"),
    ],
)
def test_field_update_location_must_be_unique(tmp_path: Path, x: float, y: float, match: str) -> None:
    write_flags(tmp_path / "flags", "2026-02", [("f1", "new", sq(0, 0)), ("f2", "new", sq(18, 0))])
    write_updates(tmp_path / "raw", "2026-02", [{"at": "2026-02-10", "kind": "stopped", "x": x, "y": y}])
    with pytest.raises(LedgerError, match=match):
        run(tmp_path, ["2026-02"])


def test_inspector_opens_a_case_imagery_missed_and_imagery_confirms_it_later(tmp_path: Path) -> None:
    # Imagery flags nothing in 2026-02; the inspector finds a structure at (X0+300, Y0+300), confirms it
    # and stops it. In 2026-03 imagery flags a 10x10 m structure there: evidence on the same case, not an
    # "expansion after stop" (the field case's disc was only provisional).
    write_flags(tmp_path / "flags", "2026-02", [])
    write_flags(tmp_path / "flags", "2026-03", [("f9", "new", sq(296, 296))])
    at = {"x": X0 + 300, "y": Y0 + 300}
    write_updates(
        tmp_path / "raw",
        "2026-02",
        [{"at": "2026-02-10", "kind": "confirmed", **at}, {"at": "2026-02-12", "kind": "stopped", **at}],
    )
    events, cases, alerts = read_ledger(run(tmp_path, ["2026-02", "2026-03"]))
    assert list(cases["case_id"]) == ["SW-202602-F001"]
    case = cases.iloc[0]
    assert case["state"] == "stopped"
    assert case["area_m2"] == pytest.approx(100.0, rel=0.02)  # the imagery footprint replaced the disc
    kinds = list(events.sort_values("seq")["kind"])
    assert kinds == ["flagged", "confirmed", "stopped", "observed_present"]
    assert list(events.sort_values("seq")["source"]) == ["field", "field", "field", "imagery"]
    assert "expansion_after_stop" not in set(alerts["kind"])


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"at": "2026-02-10", "kind": "confirmed", "case_id": "NOPE"}, r"row 2: case 'NOPE' is not in the ledger"),
        ({"at": "2026-02-10", "kind": "flagged", "case_id": "W-1"}, r"row 2: kind 'flagged' is not a field"),
        ({"at": "2026-02-10", "kind": "expanded", "case_id": "W-1"}, r"imagery observations come from flags"),
        (
            {"at": "10/02/2026", "kind": "confirmed", "case_id": "W-1"},
            r"row 2: at '10/02/2026' is not a date; write it like 2026-03-02",
        ),
        ({"at": "2026-03-02", "kind": "confirmed", "case_id": "W-1"}, r"outside 2026-02; move the row to .*2026-03"),
        ({"at": "2026-02-10", "kind": "confirmed"}, r"row 2: neither case_id nor x,y"),
    ],
)
def test_bad_field_rows_are_refused(tmp_path: Path, row: dict[str, object], match: str) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "W-1", "state": "warning", "geometry": sq(0, 0)}])
    write_flags(tmp_path / "flags", "2026-02", [])
    write_updates(tmp_path / "raw", "2026-02", [row])
    with pytest.raises(LedgerError, match=match):
        run(tmp_path, ["2026-02"])


def test_ordered_needs_deadline(tmp_path: Path) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "C-1", "state": "confirmed", "geometry": sq(0, 0)}])
    write_flags(tmp_path / "flags", "2026-02", [])
    write_updates(tmp_path / "raw", "2026-02", [{"at": "2026-02-10", "kind": "ordered", "case_id": "C-1"}])
    with pytest.raises(LedgerError, match=r"row 2: column 'deadline' is empty"):
        run(tmp_path, ["2026-02"])


def test_illegal_field_transition_writes_nothing(tmp_path: Path) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "W-1", "state": "warning", "geometry": sq(0, 0)}])
    write_flags(tmp_path / "flags", "2026-02", [("f", "new", sq(300, 0))])
    out = run(tmp_path, ["2026-02"])
    before = out.read_bytes()
    write_updates(
        tmp_path / "raw",
        "2026-02",
        [
            {"at": "2026-02-03", "kind": "confirmed", "case_id": "SW-202602-0001"},
            {"at": "2026-02-10", "kind": "demolished", "case_id": "W-1"},
        ],
    )
    with pytest.raises(
        IllegalTransitionError,
        match=r"2026-02\.csv row 3: case W-1 is in state 'warning'; event 'demolished' is not allowed "
        r"\(allowed: confirmed, dismissed\)",
    ):
        run(tmp_path, ["2026-02"])
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "ledger.gpkg",
        "ledger.log.jsonl",
    ]  # no temp file left behind


# -- alerts ------------------------------------------------------------------------------------------------


def test_overdue_deadline_alert(tmp_path: Path) -> None:
    write_seeds(
        tmp_path / "raw",
        [
            {"case_id": "O-1", "state": "ordered", "deadline": "2026-02-15", "geometry": sq(0, 0)},
            {"case_id": "O-2", "state": "ordered", "deadline": "2026-03-15", "geometry": sq(100, 0)},
        ],
    )
    write_flags(tmp_path / "flags", "2026-02", [])
    write_flags(tmp_path / "flags", "2026-03", [])
    write_updates(tmp_path / "raw", "2026-03", [{"at": "2026-03-10", "kind": "demolished", "case_id": "O-1"}])
    _, cases, alerts = read_ledger(run(tmp_path, ["2026-02", "2026-03"]))
    overdue = alerts[alerts["kind"] == "overdue"]
    assert list(zip(overdue["case_id"], overdue["month"], strict=True)) == [("O-1", "2026-02"), ("O-2", "2026-03")]
    assert "2026-02-15" in overdue.iloc[0]["message_zh"]
    assert cases.set_index("case_id").loc["O-2", "deadline"] == "2026-03-15"


def test_demolition_verification_and_unrepaired_scar(tmp_path: Path) -> None:
    write_seeds(
        tmp_path / "raw",
        [
            {"case_id": "A", "state": "ordered", "deadline": "2026-06-30", "geometry": sq(0, 0)},
            {"case_id": "B", "state": "ordered", "deadline": "2026-06-30", "geometry": sq(100, 0)},
        ],
    )
    write_updates(
        tmp_path / "raw",
        "2026-02",
        [{"at": "2026-02-10", "kind": "demolished", "case_id": c} for c in ("A", "B")],
    )
    write_flags(tmp_path / "flags", "2026-02", [])
    write_flags(tmp_path / "flags", "2026-03", [("rm", "removed", sq(0, 0))])  # only A seen removed
    write_flags(tmp_path / "flags", "2026-04", [])
    write_flags(tmp_path / "flags", "2026-05", [])
    months = ["2026-02", "2026-03", "2026-04", "2026-05"]
    _, _, alerts = read_ledger(run(tmp_path, months, repair_grace_months=2))
    got = set(zip(alerts["case_id"], alerts["kind"], alerts["month"], strict=True))
    assert ("B", "demolition_unverified", "2026-03") in got
    assert not any(c == "A" and k == "demolition_unverified" for c, k, _ in got)
    assert ("A", "unrepaired_scar", "2026-05") in got
    assert ("A", "unrepaired_scar", "2026-04") not in got


# -- the store: counts, idempotence, read-back -------------------------------------------------------------


def _scenario(tmp_path: Path) -> list[str]:
    raw = tmp_path / "raw"
    write_seeds(
        raw,
        [
            {"case_id": "S-1", "state": "stopped", "geometry": sq(0, 0)},
            {"case_id": "S-2", "state": "closed", "geometry": sq(100, 0)},
            {"case_id": "S-3", "state": "ordered", "deadline": "2026-02-20", "geometry": sq(200, 0)},
        ],
    )
    write_permits(raw, [("P-9", "2026-01-01", "", sq(400, 400, 40))])
    write_flags(
        tmp_path / "flags", "2026-02", [("a", "new", sq(10, 0)), ("b", "new", sq(300, 300)), ("p", "new", sq(405, 405))]
    )
    write_flags(tmp_path / "flags", "2026-03", [("c", "new", sq(101, 1, 8)), ("d", "removed", sq(200, 0))])
    write_updates(
        raw,
        "2026-01",  # a month without flags: its updates must not be lost
        [{"at": "2026-01-20", "kind": "ordered", "deadline": "2026-04-30", "case_id": "S-1"}],
    )
    write_updates(
        raw,
        "2026-03",
        [
            {"at": "2026-03-05", "kind": "confirmed", "x": X0 + 305, "y": Y0 + 305},
            {"at": "2026-03-20", "kind": "demolished", "case_id": "S-3"},
        ],
    )
    return ["2026-02", "2026-03"]


def test_no_data_is_lost_and_fold_matches_cases(tmp_path: Path) -> None:
    months = _scenario(tmp_path)
    flags = sorted((tmp_path / "flags").glob("*.gpkg"))
    summary = build_ledger(
        flags, tmp_path / "raw", tmp_path / "out.gpkg", LedgerSettings.model_validate({}), months=months
    )
    events, cases, alerts = read_ledger(tmp_path / "out.gpkg")
    seed_events = events[events["source"] == "seed"]
    assert len(seed_events) == len(seed_path("stopped")) + len(seed_path("closed")) + len(seed_path("ordered"))
    assert set(seed_events["case_id"]) == {"S-1", "S-2", "S-3"}
    field = events[events["source"] == "field"]
    assert field["evidence"].tolist() == [
        "field_updates/2026-01.csv:2",
        "field_updates/2026-03.csv:2",
        "field_updates/2026-03.csv:3",
    ]
    assert events["event_id"].is_unique
    assert events["seq"].tolist() == list(range(1, len(events) + 1))
    assert (summary.n_events, summary.n_cases, summary.n_alerts) == (len(events), len(cases), len(alerts))
    assert summary.new_cases_by_month == {"2026-02": 1, "2026-03": 0}
    assert summary.permitted_by_month == {"2026-02": 1, "2026-03": 0}
    assert sum(summary.states.values()) == len(cases)
    state = cases.set_index("case_id")["state"]
    assert state.to_dict() == {
        "S-1": "ordered",
        "S-2": "warning",  # closed, then rebuilt (反弹): reopened
        "S-3": "demolished",
        "SW-202602-0001": "confirmed",
        "SW-202602-0002": "dismissed",
    }
    for case_id, group in events.groupby("case_id"):
        assert fold_state(group) == state[case_id]
        assert cases.set_index("case_id").loc[case_id, "n_events"] == len(group)
    assert kinds_of(events, "S-1") == ["flagged", "confirmed", "stopped", "ordered", "expanded"]
    assert kinds_of(events, "S-2")[-2:] == ["reopened", "rebuilt"]
    assert set(zip(alerts["case_id"], alerts["kind"], strict=True)) >= {
        ("S-1", "expansion_after_stop"),
        ("S-2", "rebuild"),
        ("S-3", "overdue"),
    }


def test_rebuild_is_idempotent(tmp_path: Path) -> None:
    months = _scenario(tmp_path)
    first = read_ledger(run(tmp_path, months, out="a.gpkg"))
    second = read_ledger(run(tmp_path, months, out="b.gpkg"))
    again = read_ledger(run(tmp_path, months, out="a.gpkg"))  # overwriting in place
    for one, two, three in zip(first, second, again, strict=True):
        assert len(one) > 0
        pd.testing.assert_frame_equal(one.drop(columns="geometry"), two.drop(columns="geometry"))
        pd.testing.assert_frame_equal(one.drop(columns="geometry"), three.drop(columns="geometry"))
        assert one.geometry.to_wkb().tolist() == two.geometry.to_wkb().tolist() == three.geometry.to_wkb().tolist()
        assert one.crs == two.crs


def test_missing_flags_month_is_an_error(tmp_path: Path) -> None:
    write_flags(tmp_path / "flags", "2026-02", [])
    with pytest.raises(MissingInputError, match=r"flags for 2026-03.*vectorize --month 2026-03"):
        run(tmp_path, ["2026-02", "2026-03"])


def test_crs_mismatch_is_an_error(tmp_path: Path) -> None:
    write_flags(tmp_path / "flags", "2026-02", [("a", "new", sq(0, 0))])
    (tmp_path / "raw" / "layers").mkdir(parents=True)
    gpd.GeoDataFrame(
        {"permit_id": ["P"], "valid_from": [""], "valid_to": [""]},
        geometry=[box(125, 43, 125.1, 43.1)],
        crs="EPSG:4326",
    ).to_file(tmp_path / "raw" / "layers" / "permits.gpkg", driver="GPKG", engine="pyogrio")
    with pytest.raises(CRSMismatchError, match=r"permits\.gpkg: CRS .* differs from the flags' CRS"):
        run(tmp_path, ["2026-02"])


def test_read_ledger_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="ledger not found"):
        read_ledger(tmp_path / "nope.gpkg")


def test_field_update_file_must_be_named_after_a_month(tmp_path: Path) -> None:
    write_flags(tmp_path / "flags", "2026-02", [])
    write_updates(tmp_path / "raw", "march", [])
    with pytest.raises(LedgerError, match=r"march\.csv: field updates must be named <YYYY-MM>\.csv"):
        run(tmp_path, ["2026-02"])


def test_seed_case_gets_district_and_street_from_layers(tmp_path: Path) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "S-1", "state": "confirmed", "geometry": sq(0, 0)}])
    layers = tmp_path / "raw" / "layers"
    layers.mkdir(parents=True)
    streets = gpd.GeoDataFrame({"street": ["永吉街道"], "district": ["南关区"]}, geometry=[sq(-50, -50, 200)], crs=CRS)
    streets.to_file(layers / "streets.gpkg", driver="GPKG", engine="pyogrio")
    write_flags(tmp_path / "flags", "2026-02", [])
    _, cases, _ = read_ledger(run(tmp_path, ["2026-02"]))
    assert cases.iloc[0][["district", "street"]].tolist() == ["南关区", "永吉街道"]


def test_invalid_seed_rows_are_refused(tmp_path: Path) -> None:
    write_seeds(tmp_path / "raw", [{"case_id": "S-1", "state": "pending", "geometry": sq(0, 0)}])
    write_flags(tmp_path / "flags", "2026-02", [])
    with pytest.raises(LedgerError, match=r"cases\.gpkg feature 1 \(case S-1\): state 'pending' is not a lifecycle"):
        run(tmp_path, ["2026-02"])


def test_fold_state_takes_one_case() -> None:
    frame = pd.DataFrame({"case_id": ["A", "B"], "kind": ["flagged", "flagged"], "seq": [1, 2]})
    with pytest.raises(ValueError, match="events of one case"):
        fold_state(frame)
    one = pd.DataFrame({"case_id": ["A"] * 3, "kind": ["confirmed", "observed_present", "flagged"], "seq": [3, 2, 1]})
    assert fold_state(one) == "confirmed"


def test_failed_write_keeps_previous_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_flags(tmp_path / "flags", "2026-02", [("f", "new", sq(0, 0))])
    out = run(tmp_path, ["2026-02"])
    before = out.read_bytes()
    real = gpd.GeoDataFrame.to_file

    def flaky(self: gpd.GeoDataFrame, filename: Path, *args: object, **kw: object) -> None:
        if kw.get("layer") == "alerts":
            raise OSError("No space left on device")
        real(self, filename, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(gpd.GeoDataFrame, "to_file", flaky)
    with pytest.raises(ScarWatchError, match=r"ledger\.gpkg: cannot write the ledger \(No space left"):
        run(tmp_path, ["2026-02"])
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["ledger.gpkg", "ledger.log.jsonl"]


def test_inspector_may_confirm_a_permit_dismissal(tmp_path: Path) -> None:
    write_permits(tmp_path / "raw", [("P-1", "2026-01-01", "2026-12-31", sq(0, 0, 50))])
    write_flags(tmp_path / "flags", "2026-02", [("in", "new", sq(10, 10))])
    write_updates(
        tmp_path / "raw",
        "2026-03",
        [{"at": "2026-03-06", "kind": "dismissed", "note": "permit P-1", "x": X0 + 15, "y": Y0 + 15}],
    )
    events, cases, _ = read_ledger(run(tmp_path, ["2026-02"]))
    assert kinds_of(events, "SW-202602-0001") == ["flagged", "dismissed", "dismissed"]
    assert events["source"].tolist() == ["imagery", "permit", "field"]
    assert cases["state"].tolist() == ["dismissed"]


def test_labels_name_every_state_kind_category_and_alert() -> None:
    from pipeline.ledger.alerts import ALERT_TEXT
    from pipeline.ledger.events import CATEGORIES
    from pipeline.ledger.labels import ALERT_ZH, CATEGORY_ZH, FLAG_ZH, KIND_ZH, STATE_ZH

    assert set(STATE_ZH) == set(STATES)
    assert set(KIND_ZH) == set(EVENT_KINDS)
    assert set(CATEGORY_ZH) == set(CATEGORIES)
    assert set(ALERT_ZH) == set(ALERT_TEXT)
    assert set(FLAG_ZH) == {"new", "removed"}


def test_month_view_folds_states_like_the_ledger(tmp_path: Path) -> None:
    from pipeline.ledger import load_month_view

    months = _scenario(tmp_path)
    out = run(tmp_path, months)
    events, cases, _ = read_ledger(out)
    for month in months:
        view = load_month_view(month, out, tmp_path / "flags" / f"{month}.gpkg")
        cut = events[events["month"] <= month]
        for case_id, state in zip(view.cases["case_id"], view.cases["state_at"], strict=True):
            assert state == fold_state(cut[cut["case_id"] == case_id])
    assert dict(zip(view.cases["case_id"], view.cases["state_at"], strict=True)) == dict(
        zip(cases["case_id"], cases["state"], strict=True)
    )


def test_month_view_refuses_a_log_the_lifecycle_does_not_allow(tmp_path: Path) -> None:
    from pipeline.errors import CorruptFileError
    from pipeline.ledger import load_month_view
    from pipeline.ledger.store import write_ledger

    months = _scenario(tmp_path)
    out = run(tmp_path, months)
    events, cases, alerts = read_ledger(out)
    events.loc[(events["case_id"] == "S-2") & (events["kind"] == "confirmed"), "kind"] = "stopped"
    write_ledger(out, events, cases, alerts)
    with pytest.raises(CorruptFileError, match=r"layer 'events' does not fold .*case S-2 .*run the 'ledger' stage"):
        load_month_view("2026-03", out, tmp_path / "flags" / "2026-03.gpkg")
