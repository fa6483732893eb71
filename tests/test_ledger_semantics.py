"""Rebuilds (反弹) and expansions: a structure back at a closed-out case reopens it, and the month counts it.

Crafted ledgers through the real ``build_ledger``, then the month's figures as the report computes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest
from shapely.geometry import box

from pipeline.config import LedgerSettings
from pipeline.errors import IllegalTransitionError, LedgerError
from pipeline.ledger import build_ledger, read_ledger
from pipeline.ledger.events import FIELD_KINDS, LIFECYCLE_KINDS
from pipeline.ledger.lifecycle import OPEN_STATES, next_state, seed_path
from pipeline.ledger.view import load_month_view
from pipeline.publish.report import compute_figures, headline
from tests.test_ledger import CRS, X0, Y0, kinds_of, sq, write_flags, write_seeds, write_updates

FEB, MAR = "2026-02", "2026-03"


def write_streets(raw: Path) -> None:
    """One street of 南关区 covering the whole test town (the ledger gives each case its district)."""
    (raw / "layers").mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame(
        {"street": ["永吉街道"], "district": ["南关区"]},
        geometry=[box(X0 - 1000, Y0 - 1000, X0 + 3000, Y0 + 3000)],
        crs=CRS,
    ).to_file(raw / "layers" / "streets.gpkg", layer="streets", driver="GPKG", engine="pyogrio")


def make_town(root: Path) -> Path:
    """S-1 and S-2 closed, S-3 confirmed; February opens a case far away; March rebuilds on S-1 and expands S-3."""
    raw = root / "raw"
    write_seeds(
        raw,
        [
            {"case_id": "S-1", "state": "closed", "geometry": sq(0, 0, 20)},
            {"case_id": "S-2", "state": "closed", "geometry": sq(100, 0, 20)},
            {"case_id": "S-3", "state": "confirmed", "geometry": sq(200, 0, 20)},
        ],
    )
    write_streets(raw)
    write_flags(root / "flags", FEB, [("a", "new", sq(600, 600, 10))])
    write_flags(root / "flags", MAR, [("r", "new", sq(2, 2, 10)), ("e", "new", sq(215, 0, 15))])
    return root


def build(root: Path, months: tuple[str, ...] = (FEB, MAR)) -> Path:
    """Build ``root``'s ledger with the real ledger stage; return its path."""
    out = root / "processed" / "ledger.gpkg"
    flags = sorted((root / "flags").glob("*.gpkg"))
    build_ledger(flags, root / "raw", out, LedgerSettings(), months=months)
    return out


def figures(root: Path, ledger: Path, month: str) -> dict[str, Any]:
    view = load_month_view(month, ledger, root / "flags" / f"{month}.gpkg")
    return compute_figures(view, district_area_km2={"南关区": 16.0})


# -- the lifecycle --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["demolished", "repaired", "closed"])
def test_reopened_takes_a_closed_out_case_back_to_warning(state: str) -> None:
    assert next_state(state, "reopened") == "warning"
    assert "warning" in OPEN_STATES


@pytest.mark.parametrize("state", ["warning", "confirmed", "stopped", "ordered", "dismissed", None])
def test_reopened_is_refused_where_nothing_was_closed_out(state: str | None) -> None:
    with pytest.raises(IllegalTransitionError, match="'reopened' is not allowed"):
        next_state(state, "reopened", case_id="C1")


def test_reopened_is_the_ledgers_own_kind_not_an_inspectors() -> None:
    assert "reopened" in LIFECYCLE_KINDS and "reopened" not in FIELD_KINDS
    assert seed_path("closed") == ("flagged", "confirmed", "demolished", "closed")  # seeds invent no reopening


def test_a_field_sheet_saying_reopened_is_refused(tmp_path: Path) -> None:
    make_town(tmp_path)
    write_updates(tmp_path / "raw", MAR, [{"at": "2026-03-05", "kind": "reopened", "case_id": "S-1"}])
    with pytest.raises(LedgerError, match=r"2026-03\.csv.*'reopened' is not a field update kind"):
        build(tmp_path)


# -- the ledger ---------------------------------------------------------------------------------------------


def test_a_rebuild_at_a_closed_case_reopens_the_same_case(tmp_path: Path) -> None:
    make_town(tmp_path)
    events, cases, alerts = read_ledger(build(tmp_path))
    assert kinds_of(events, "S-1") == ["flagged", "confirmed", "demolished", "closed", "reopened", "rebuilt"]
    reopened = events[events["kind"] == "reopened"].iloc[0]
    assert (reopened["source"], reopened["month"], reopened["at"]) == ("imagery", MAR, "2026-03-01")
    assert reopened["evidence"] == events[events["kind"] == "rebuilt"].iloc[0]["evidence"]  # the same flag
    state = cases.set_index("case_id")["state"]
    assert state.to_dict() == {"S-1": "warning", "S-2": "closed", "S-3": "confirmed", "SW-202602-0001": "warning"}
    assert len(cases) == 4  # no new case for the rebuilt structure: case ids never change
    assert kinds_of(events, "S-3")[-1] == "expanded"
    mar = alerts[alerts["month"] == MAR]
    # the rebuild alert; both warnings also fall overdue for their field check (dispatched, unchecked at month end)
    assert set(zip(mar["case_id"], mar["kind"], strict=True)) == {
        ("S-1", "rebuild"),
        ("S-1", "check_overdue"),
        ("SW-202602-0001", "check_overdue"),
    }


def test_a_rebuild_where_imagery_saw_an_open_case_gone_does_not_reopen(tmp_path: Path) -> None:
    """The case never closed (a removal nobody recorded): the rebuild is an observation, no reopening."""
    write_seeds(tmp_path / "raw", [{"case_id": "S-1", "state": "warning", "geometry": sq(0, 0, 20)}])
    write_flags(tmp_path / "flags", FEB, [("gone", "removed", sq(0, 0, 20))])
    write_flags(tmp_path / "flags", MAR, [("back", "new", sq(1, 1, 18))])
    events, cases, _ = read_ledger(build(tmp_path))
    assert kinds_of(events, "S-1") == ["flagged", "observed_removed", "rebuilt"]
    assert cases.set_index("case_id").loc["S-1", "state"] == "warning"


def test_the_reopened_case_goes_round_the_loop_again(tmp_path: Path) -> None:
    make_town(tmp_path)
    steps = ["confirmed", "stopped", "demolished", "closed"]
    write_updates(
        tmp_path / "raw",
        MAR,
        [{"at": f"2026-03-{10 + i:02d}", "kind": k, "case_id": "S-1"} for i, k in enumerate(steps)],
    )
    events, cases, alerts = read_ledger(build(tmp_path))
    assert kinds_of(events, "S-1")[-6:] == ["reopened", "rebuilt", *steps]
    assert cases.set_index("case_id").loc["S-1", "state"] == "closed"
    assert "rebuild" not in set(alerts.loc[alerts["month"] == MAR, "kind"])  # answered in the field


# -- the month's figures ------------------------------------------------------------------------------------


def test_the_month_counts_the_rebuild_and_the_expansion_with_their_areas(tmp_path: Path) -> None:
    make_town(tmp_path)
    ledger = build(tmp_path)
    feb, mar = figures(tmp_path, ledger, FEB), figures(tmp_path, ledger, MAR)
    assert mar["new_cases"]["count"] == 0
    assert mar["rebuilds"] == {
        "count": 1,
        "area_m2": 100.0,  # the rebuilt flag: 10 x 10 m
        "area_mu": round(100.0 / 666.6667, 3),
        "case_ids": ["S-1"],
        "reopened": ["S-1"],
    }
    # S-3's 20 x 20 m footprint and the 15 x 15 m flag overlapping it by 5 x 15 m: 150 m² added
    assert (mar["expansions"]["count"], mar["expansions"]["area_m2"], mar["expansions"]["case_ids"]) == (
        1,
        150.0,
        ["S-3"],
    )
    assert (mar["illegal_total"]["count"], mar["illegal_total"]["area_m2"]) == (2, 250.0)
    h = headline(mar)
    assert (h["new_warnings"], h["rebuilds"], h["rebuild_area_m2"], h["expansions"], h["expansion_area_m2"]) == (
        0,
        1,
        100.0,
        1,
        150.0,
    )
    assert h["illegal_total_area_m2"] == 250.0
    # February: S-1 and S-2 closed of 4 open or closed cases; March: S-1 reopened, only S-2 closed
    assert (feb["cases_closed"], feb["cases_active"], feb["closure_rate"]) == (2, 4, 0.5)
    assert (mar["cases_closed"], mar["cases_active"], mar["closure_rate"]) == (1, 4, 0.25)
    assert h["closure_rate"] == 0.25
    (feb_row,), (mar_row,) = feb["league"], mar["league"]
    assert (feb_row["removed"], feb_row["demolition_rate"]) == (2, 0.5)
    assert (mar_row["removed"], mar_row["demolition_rate"]) == (1, 0.25)  # the league counts it open again
    assert mar["states"]["warning"] == 2 and mar["states"]["closed"] == 1
    assert feb["rebuilds"]["count"] == 0 and feb["expansions"]["count"] == 0
