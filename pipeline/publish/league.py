"""The district league table (赛马): every district ranked on four indicators of the month.

The ranking rule (also printed under the table in the report):

1. Per district, as of the month's end (cases in a district by the ledger's ``district`` column):
   - ``new_area_per_km2``: m² of new illegal construction opened this month (not dismissed, not permitted)
     per km² of the district's area (``layers/districts.gpkg``); lower is better;
   - ``overdue_share``: cases past their demolition deadline (state ``ordered``, deadline before the
     month's last day) / cases in state ``ordered``; 0 when none is ordered; lower is better;
   - ``demolition_rate``: cases demolished or later (demolished, repaired, closed) / cases on record that
     were not dismissed; 1 when the district has none; higher is better;
   - ``repair_rate``: cases repaired or closed / cases demolished or later; 1 when none; higher is better.
2. Each indicator ranks the districts 1..n (ties share the best rank, "min" method).
3. The score is the mean of the four ranks; the league orders by score, then by new area per km², then by
   the district name. Rank 1 is the best district.
4. ``rank_change`` = last month's rank − this month's rank (positive: moved up), None in the first month
   or for a district that was not ranked then.

Every district of the layer is listed, with zero rows; districts named only by cases are added (area unknown:
their ``new_area_per_km2`` is None and ranks last).
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from pipeline.ledger.lifecycle import REMOVED_STATES
from pipeline.ledger.view import state_as_of

INDICATORS: tuple[tuple[str, bool], ...] = (
    ("new_area_per_km2", True),  # (name, lower is better)
    ("overdue_share", True),
    ("demolition_rate", False),
    ("repair_rate", False),
)


def month_end(month: str) -> str:
    """The month's last day, ``YYYY-MM-DD``."""
    year, mon = int(month[:4]), int(month[5:7])
    return f"{month}-{calendar.monthrange(year, mon)[1]:02d}"


def previous_month(month: str) -> str:
    """The calendar month before ``month``."""
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year - 1}-12" if mon == 1 else f"{year}-{mon - 1:02d}"


def deadlines_as_of(events: pd.DataFrame) -> dict[str, str]:
    """Each case's deadline as its latest ``ordered`` event set it (events already cut at the month)."""
    ordered = events[(events["kind"] == "ordered") & (events["deadline"].fillna("").astype(str) != "")]
    return dict(zip(ordered["case_id"].astype(str), ordered["deadline"].astype(str), strict=True))


def cut(cases: pd.DataFrame, events: pd.DataFrame, month: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cases and events as they stood at the end of an earlier ``month`` (``state_at`` refolded)."""
    ev = events[events["month"].astype(str) <= month]
    cs = cases[cases["first_month"].astype(str) <= month]
    return cs.assign(state_at=state_as_of(cs, ev)), ev


def _indicators(
    cases: pd.DataFrame,
    events: pd.DataFrame,
    month: str,
    districts: Iterable[str],
    area_km2: Mapping[str, float],
    permitted: set[str],
) -> pd.DataFrame:
    end = month_end(month)
    deadline = deadlines_as_of(events)
    live = cases[cases["state_at"] != "dismissed"]
    rows = []
    for d in districts:
        mine = live[live["district"].fillna("").astype(str) == d]
        new = mine[(mine["first_month"].astype(str) == month) & ~mine["case_id"].astype(str).isin(permitted)]
        ordered = mine[mine["state_at"] == "ordered"]
        overdue = [c for c in ordered["case_id"].astype(str) if deadline.get(c, "") and deadline[c] < end]
        removed = mine[mine["state_at"].isin(REMOVED_STATES)]
        repaired = mine[mine["state_at"].isin({"repaired", "closed"})]
        new_m2 = float(new["area_m2"].sum())
        km2 = area_km2.get(d)
        rows.append(
            {
                "district": d,
                "area_km2": round(km2, 3) if km2 else None,
                "cases": len(mine),
                "new_cases": len(new),
                "new_area_m2": round(new_m2, 1),
                "new_area_per_km2": round(new_m2 / km2, 2) if km2 else None,
                "ordered": len(ordered),
                "overdue": len(overdue),
                "overdue_share": round(len(overdue) / len(ordered), 4) if len(ordered) else 0.0,
                "removed": len(removed),
                "demolition_rate": round(len(removed) / len(mine), 4) if len(mine) else 1.0,
                "repaired": len(repaired),
                "repair_rate": round(len(repaired) / len(removed), 4) if len(removed) else 1.0,
            }
        )
    return pd.DataFrame(rows)


def _rank(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table.assign(score=[], rank=[])
    ranks = []
    for name, lower in INDICATORS:
        values = table[name].astype(float)
        worst = float("inf") if lower else float("-inf")
        ranks.append(values.fillna(worst).rank(method="min", ascending=lower))
    score = pd.concat(ranks, axis=1).mean(axis=1)
    table = table.assign(
        score=score.round(3).astype(float),
        _area=table["new_area_per_km2"].astype(float).fillna(float("inf")),
    )
    table = table.sort_values(["score", "_area", "district"], kind="stable").drop(columns="_area")
    return table.assign(rank=range(1, len(table) + 1)).reset_index(drop=True)


def league_table(
    cases: pd.DataFrame,
    events: pd.DataFrame,
    month: str,
    *,
    district_area_km2: Mapping[str, float],
    permitted: set[str],
) -> list[dict[str, Any]]:
    """The league of ``month`` with the change of rank since the month before (see the module docstring).

    Args:
        cases: cases opened by the month with ``state_at`` (a :class:`~pipeline.ledger.view.MonthView`'s).
        events: events up to the month, in log order.
        month: ``YYYY-MM``.
        district_area_km2: every district of the layer and its area (km²); may be empty.
        permitted: case ids dismissed for a permit (never new illegal construction).

    Returns:
        One dict per district, best first: the indicators, ``score``, ``rank`` and ``rank_change``.
    """
    named = sorted({str(d) for d in cases["district"].fillna("") if str(d)} - set(district_area_km2))
    districts = [*sorted(district_area_km2), *named]
    now = _rank(_indicators(cases, events, month, districts, district_area_km2, permitted))
    prev = previous_month(month)
    before: dict[str, int] = {}
    if (events["month"].astype(str) <= prev).any():
        pc, pe = cut(cases, events, prev)
        ranked = _rank(_indicators(pc, pe, prev, districts, district_area_km2, permitted))
        before = dict(zip(ranked["district"], ranked["rank"], strict=True))
    out: list[dict[str, Any]] = []
    for record in now.to_dict("records"):
        row = {str(k): v for k, v in record.items()}
        was = before.get(row["district"])
        row["rank"] = int(row["rank"])
        row["rank_change"] = None if was is None else int(was) - row["rank"]
        out.append(row)
    return out
