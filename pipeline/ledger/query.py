"""The ledger as a bureau reads it: the case table, a case's timeline and the alerts.

What ``scarwatch ledger list``, ``ledger show`` and ``ledger alerts`` print and what the exports
(:mod:`pipeline.ledger.export`) write, read from the live ledger (:func:`pipeline.ledger.store.read_ledger`):

- :func:`case_table`: one row per case with its state in Chinese and English, category, area in m² and 亩,
  district and street (the ledger's), the 网格 cell and responsible unit (contract C1,
  :func:`pipeline.ledger.grid.assign_units`, at the footprint's representative point), the WGS84 lon/lat of
  that point, opened / last event dates, the due date and whether it is overdue on a given day.
- **Due** (decision): a case in state ``ordered`` is due at its deadline (``due_for`` ``order``); a case
  dispatched (派单, a ``dispatched`` event carrying the field check's due date as ``deadline``) with no
  field event since is due at that date (``due_for`` ``check``); otherwise nothing is due. Overdue: the due
  date lies before the day asked about (today by default), the same rule the month-end alerts apply.
- :func:`select_cases` filters the table (options combine; a value unknown to the ledger is an error
  listing the valid ones); :func:`case_timeline` gives one case's events in log order;
  :func:`alert_table` the alerts layer, optionally of one month.
"""

from __future__ import annotations

import datetime as dt
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pandas as pd

from pipeline.config import MONTH_RE
from pipeline.errors import InputError
from pipeline.formats import MU_M2
from pipeline.ledger.grid import assign_units
from pipeline.ledger.labels import ALERT_ZH, CATEGORY_ZH, KIND_ZH, STATE_ZH
from pipeline.ledger.lifecycle import STATES
from pipeline.ledger.store import read_ledger

DISPATCH_KIND = "dispatched"
"""The administrative event of a dispatch (contract C2): ``deadline`` is the field check's due date."""
KIND_ZH_EXTRA: dict[str, str] = {DISPATCH_KIND: "派单"}
"""Chinese names of kinds :data:`pipeline.ledger.labels.KIND_ZH` may not list yet."""

CASE_TABLE_COLUMNS: tuple[str, ...] = (
    "case_id",
    "state",
    "state_zh",
    "category",
    "category_zh",
    "area_m2",
    "area_mu",
    "district",
    "street",
    "cell_id",
    "unit",
    "unit_source",
    "opened_at",
    "last_event_at",
    "due",
    "due_for",
    "overdue",
    "deadline",
    "n_events",
    "first_month",
    "permit_id",
    "lon_wgs84",
    "lat_wgs84",
)
TIMELINE_COLUMNS: tuple[str, ...] = (
    "seq",
    "at",
    "kind",
    "kind_zh",
    "source",
    "actor",
    "evidence",
    "deadline",
    "note",
    "month",
    "event_id",
)
ALERT_TABLE_COLUMNS: tuple[str, ...] = ("month", "case_id", "kind", "kind_zh", "state", "message_zh", "message_en")


@dataclass(frozen=True)
class Ledger:
    """The live ledger's layers (events in log order), read once."""

    path: Path
    events: gpd.GeoDataFrame
    cases: gpd.GeoDataFrame
    alerts: gpd.GeoDataFrame


def open_ledger(path: Path) -> Ledger:
    """Read the live ledger.

    Raises:
        MissingInputError: there is none yet (the message says to run `scarwatch ledger build` / `dvc repro`).
        CorruptFileError: it cannot be read.
    """
    events, cases, alerts = read_ledger(path)
    return Ledger(Path(path), events, cases, alerts)


def kind_zh(kind: str) -> str:
    """The Chinese name of an event kind (the kind itself when it has none)."""
    return KIND_ZH.get(kind) or KIND_ZH_EXTRA.get(kind, kind)


def _due(ledger: Ledger) -> pd.DataFrame:
    """Per case: ``due`` (ISO date or "") and ``due_for`` (``order`` | ``check`` | ""), by the rule above."""
    ev = ledger.events
    cases = ledger.cases.set_index("case_id")
    due = pd.Series("", index=cases.index, dtype=object)
    due_for = pd.Series("", index=cases.index, dtype=object)
    dispatched = ev[ev["kind"] == DISPATCH_KIND].drop_duplicates("case_id", keep="last").set_index("case_id")
    if len(dispatched):
        last_field = ev[ev["source"] == "field"].groupby("case_id")["seq"].max()
        since = last_field.reindex(dispatched.index).fillna(-1) < dispatched["seq"]
        pending = dispatched.loc[since & (dispatched["deadline"] != ""), "deadline"]
        pending = pending[pending.index.isin(cases.index)]
        due[pending.index] = pending
        due_for[pending.index] = "check"
    ordered = (cases["state"] == "ordered") & (cases["deadline"] != "")
    due[ordered] = cases.loc[ordered, "deadline"]
    due_for[ordered] = "order"
    return pd.DataFrame({"due": due, "due_for": due_for})


def case_table(ledger: Ledger, layers_dir: Path | None, *, as_of: dt.date) -> gpd.GeoDataFrame:
    """One row per case (columns :data:`CASE_TABLE_COLUMNS`, the footprint, the ledger's CRS), by case id.

    Args:
        ledger: the live ledger.
        layers_dir: the ``layers/`` folder (``grid.gpkg``, ``streets.gpkg``, ``districts.gpkg``) the unit
            comes from; None or a missing folder gives no units (warned).
        as_of: the day ``overdue`` is judged on.
    """
    cases = ledger.cases.sort_values("case_id", kind="stable").reset_index(drop=True)
    if layers_dir is not None:
        units = assign_units(cases.geometry, Path(layers_dir))
    else:
        units = pd.DataFrame(
            {c: "" for c in ("cell_id", "unit", "street", "district")} | {"unit_source": "none"}, index=cases.index
        )
    due = _due(ledger).reindex(cases["case_id"]).reset_index(drop=True)
    present = ~(cases.geometry.isna() | cases.geometry.is_empty)
    points = cases.geometry[present].representative_point().to_crs("EPSG:4326")
    lon = pd.Series(float("nan"), index=cases.index)
    lat = pd.Series(float("nan"), index=cases.index)
    lon[present], lat[present] = points.x.round(7), points.y.round(7)
    today = as_of.isoformat()
    table = pd.DataFrame(
        {
            "case_id": cases["case_id"],
            "state": cases["state"],
            "state_zh": cases["state"].map(lambda s: STATE_ZH.get(s, s)),
            "category": cases["category"],
            "category_zh": cases["category"].map(lambda c: CATEGORY_ZH.get(c, c)),
            "area_m2": cases["area_m2"].astype(float).round(2),
            "area_mu": (cases["area_m2"].astype(float) / MU_M2).round(3),
            "district": cases["district"].where(cases["district"] != "", units["district"]),
            "street": cases["street"].where(cases["street"] != "", units["street"]),
            "cell_id": units["cell_id"],
            "unit": units["unit"],
            "unit_source": units["unit_source"],
            "opened_at": cases["opened_at"],
            "last_event_at": cases["last_event_at"],
            "due": due["due"],
            "due_for": due["due_for"],
            "overdue": (due["due"] != "") & (due["due"] < today),
            "deadline": cases["deadline"],
            "n_events": cases["n_events"].astype("int64"),
            "first_month": cases["first_month"],
            "permit_id": cases["permit_id"],
            "lon_wgs84": lon,
            "lat_wgs84": lat,
        },
        columns=list(CASE_TABLE_COLUMNS),
    )
    return gpd.GeoDataFrame(table, geometry=cases.geometry.values, crs=cases.crs)


def _state_key(value: str) -> str | None:
    """``stopped``, ``已制止`` or ``制止`` -> ``stopped``; None when no state has that name."""
    v = value.strip()
    for state in STATES:
        zh = STATE_ZH[state]
        if v.lower() == state or v in (zh, zh.removeprefix("已")):
            return state
    return None


def _unknown(option: str, value: str, valid: Sequence[str], what: str = "not in the ledger") -> InputError:
    shown = ", ".join(valid[:30]) + (f" and {len(valid) - 30} more" if len(valid) > 30 else "")
    return InputError(f"{option} {value!r}: {what}; use one of {shown or '(none: the ledger has none)'}")


def check_month_option(month: str, option: str = "--month") -> str:
    """``month`` when it is ``YYYY-MM``, else an InputError naming the option."""
    if not MONTH_RE.match(month):
        raise InputError(f"{option} {month!r}: not a month; write it YYYY-MM, e.g. 2026-03")
    return month


def select_cases(
    table: pd.DataFrame,
    *,
    states: Sequence[str] = (),
    districts: Sequence[str] = (),
    units: Sequence[str] = (),
    overdue: bool = False,
    month: str | None = None,
) -> pd.DataFrame:
    """The rows of :func:`case_table` that pass every filter given (a filter of several values: any of them).

    ``states`` take the English key or the Chinese name (``stopped``, ``已制止``, ``制止``); ``month`` selects
    cases first seen that month (``first_month``).

    Raises:
        InputError: a state, district or unit the ledger does not know, or a malformed month (the message
            lists the valid values).
    """
    keep = pd.Series(True, index=table.index)
    if states:
        keys = []
        for s in states:
            key = _state_key(s)
            if key is None:
                raise _unknown("--state", s, [f"{k} ({STATE_ZH[k]})" for k in STATES], "not a lifecycle state")
            keys.append(key)
        keep &= table["state"].isin(keys)
    for option, column, values in (("--district", "district", districts), ("--unit", "unit", units)):
        if values:
            valid = sorted({str(v) for v in table[column] if str(v)})
            for v in values:
                if v.strip() not in valid:
                    raise _unknown(option, v, valid)
            keep &= table[column].isin([v.strip() for v in values])
    if overdue:
        keep &= table["overdue"].astype(bool)
    if month is not None:
        keep &= table["first_month"] == check_month_option(month)
    return table[keep]


def case_timeline(ledger: Ledger, case_id: str) -> tuple[pd.Series, pd.DataFrame]:
    """One case's row of the cases layer and its events in log order (columns :data:`TIMELINE_COLUMNS`).

    Raises:
        InputError: no case has that id (the message suggests the closest ids).
    """
    ids = ledger.cases["case_id"].astype(str).tolist()
    wanted = case_id.strip()
    match = [i for i in ids if i == wanted] or [i for i in ids if i.upper() == wanted.upper()]
    if not match:
        close = difflib.get_close_matches(wanted.upper(), [i.upper() for i in ids], n=3, cutoff=0.6)
        by_upper = {i.upper(): i for i in ids}
        hint = (
            f"did you mean {', '.join(by_upper[c] for c in close)}?" if close else "`scarwatch ledger list` lists them"
        )
        raise InputError(f"{ledger.path}: no case {wanted!r} in the ledger; {hint}")
    case = ledger.cases[ledger.cases["case_id"] == match[0]].iloc[0]
    ev = ledger.events[ledger.events["case_id"] == match[0]].sort_values("seq", kind="stable")
    ev = ev.assign(kind_zh=ev["kind"].map(kind_zh))
    return case, pd.DataFrame(ev[list(TIMELINE_COLUMNS)]).reset_index(drop=True)


def alert_table(ledger: Ledger, month: str | None = None) -> gpd.GeoDataFrame:
    """The alerts layer (columns :data:`ALERT_TABLE_COLUMNS` + the footprint), by month then case id.

    ``state`` is the case's current state. ``month`` keeps that month's alerts only.

    Raises:
        InputError: ``month`` is not ``YYYY-MM``.
    """
    alerts = ledger.alerts
    if month is not None:
        alerts = alerts[alerts["month"] == check_month_option(month)]
    state = dict(zip(ledger.cases["case_id"], ledger.cases["state"], strict=True))
    alerts = alerts.assign(
        kind_zh=alerts["kind"].map(lambda k: ALERT_ZH.get(k, k)),
        state=alerts["case_id"].map(lambda c: state.get(c, "")),
    )
    alerts = alerts.sort_values(["month", "case_id", "kind"], kind="stable").reset_index(drop=True)
    return gpd.GeoDataFrame(alerts[[*ALERT_TABLE_COLUMNS, alerts.geometry.name]], crs=alerts.crs)
