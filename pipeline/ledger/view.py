"""The month view of the ledger: the ledger and one month's flags as they stood at the month's end.

:func:`load_month_view` reads the ledger GeoPackage (layers ``events``, ``cases``, ``alerts``) and the
month's flags, checks their CRS and columns (:func:`pipeline.fileio.read_layer`) and cuts them at the
month, folding each case's state as of then (:func:`state_as_of`). The inspector map and the monthly
report both read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio

from pipeline.config import check_month
from pipeline.errors import CorruptFileError, CRSMismatchError, LedgerError
from pipeline.fileio import read_layer
from pipeline.formats import MU_M2
from pipeline.ledger.lifecycle import fold_kinds
from pipeline.ledger.store import LEDGER_FIX

log = logging.getLogger(__name__)

_FLAG_COLUMNS = ("flag_id", "kind", "area_m2")
_CASE_COLUMNS = ("case_id", "state")
_EVENT_COLUMNS = ("case_id", "at", "kind", "evidence")
_ALERT_COLUMNS = ("case_id", "kind")


@dataclass(frozen=True)
class MonthView:
    """The ledger and flags as they stood at the end of one month, all in the grid CRS.

    Attributes:
        month: the month, ``YYYY-MM``.
        flags: this month's flags (layer ``flags`` rows whose ``month`` is the month), with ``case_id``:
            the case the ledger attached the flag to, "" when none (see :func:`flag_cases`).
        cases: cases opened by the month, with ``state_at`` (the state as of the month's end).
        events: events up to and including the month, in log order (by ``seq``).
        alerts: this month's alerts.
    """

    month: str
    flags: gpd.GeoDataFrame
    cases: gpd.GeoDataFrame
    events: gpd.GeoDataFrame
    alerts: gpd.GeoDataFrame


def _month_of(frame: pd.DataFrame, date_column: str) -> pd.Series:
    """The ``month`` column when present, else the first 7 characters of ``date_column``."""
    if "month" in frame.columns:
        return frame["month"].astype(str)
    return frame[date_column].astype(str).str.slice(0, 7)


def state_as_of(cases: pd.DataFrame, events: pd.DataFrame) -> pd.Series:
    """Each case's state folded from its events in ``events`` through the lifecycle (the ledger's own fold).

    Args:
        cases: cases with ``case_id``.
        events: events already cut at the month, in log order (by ``seq``).

    Returns:
        States indexed like ``cases``.

    Raises:
        IllegalTransitionError: a case's events hold a transition the lifecycle does not allow.
        ValueError: a case has no event that opens it up to the month.
    """
    kinds = events.groupby("case_id", sort=False)["kind"].agg(list)
    states = [fold_kinds(kinds.get(case_id, []), case_id=str(case_id)) for case_id in cases["case_id"]]
    return pd.Series(states, index=cases.index, dtype=object)


def flag_cases(flags: pd.DataFrame, events: pd.DataFrame) -> list[str]:
    """The case the ledger attached each flag to: the one whose event names the flag as its ``evidence``.

    This is the ledger's decision (:mod:`pipeline.ledger.matching`), read back, not a second spatial
    match: a flag no event names belongs to no case, even where it overlaps one. For dismissed cases
    this means: the ledger never matches a flag to a dismissed case, so a flag is linked to one only
    when the flag itself opened the case and the ledger dismissed it at once (a flag inside a valid
    permit); a flag that merely lies on a dismissed case is linked to none. A ``removed`` flag the
    ledger recorded on several cases is shown on the last of them in log order.

    Args:
        flags: flags with ``flag_id``.
        events: events in log order with ``case_id`` and ``evidence``.

    Returns:
        One case id per flag, "" for a flag the ledger attached to no case.
    """
    by_flag = dict(zip(events["evidence"].astype(str), events["case_id"].astype(str), strict=True))  # last wins
    return [by_flag.get(str(flag_id), "") for flag_id in flags["flag_id"]]


def load_month_view(month: str, ledger_path: Path, flags_path: Path) -> MonthView:
    """Read the ledger and the flags and cut them at ``month``.

    Args:
        month: ``YYYY-MM``.
        ledger_path: the ledger GeoPackage (layers ``events``, ``cases``, ``alerts``).
        flags_path: the month's flags GeoPackage (layer ``flags``).

    Returns:
        The month's view, every frame in the flags' CRS.

    Raises:
        CRSMismatchError: the ledger and the flags are in different CRSs.
        CorruptFileError: a case's events do not fold through the lifecycle (see :func:`state_as_of`).
    """
    check_month(month)
    flags = read_layer(
        Path(flags_path),
        "flags",
        what=f"flags of {month}",
        fix=f"run the 'vectorize' stage (`scarwatch vectorize --month {month}`)",
        columns=_FLAG_COLUMNS,
    )
    ledger = Path(ledger_path)
    cases = read_layer(ledger, "cases", what="the ledger", fix=LEDGER_FIX, columns=_CASE_COLUMNS)
    events = read_layer(ledger, "events", what="the ledger", fix=LEDGER_FIX, columns=_EVENT_COLUMNS)
    if "alerts" in pyogrio.list_layers(ledger)[:, 0]:
        alerts = read_layer(ledger, "alerts", what="the ledger", fix=LEDGER_FIX, columns=_ALERT_COLUMNS)
    else:
        log.info("%s has no layer 'alerts'; treating it as empty", str(ledger))
        alerts = gpd.GeoDataFrame({c: [] for c in _ALERT_COLUMNS}, geometry=gpd.GeoSeries([]))
    if not flags.crs.equals(cases.crs):
        raise CRSMismatchError(
            f"{flags_path} is in {flags.crs.to_string()!r} but {ledger_path} in {cases.crs.to_string()!r}; "
            "rebuild the ledger from these flags so both share the grid CRS"
        )
    if "month" in flags.columns:
        flags = flags[flags["month"].astype(str) == month]
    for col, default in (("district", ""), ("street", ""), ("p_mean", np.nan), ("p_max", np.nan)):
        if col not in flags.columns:
            flags[col] = default
    if "area_mu" not in flags.columns:
        flags["area_mu"] = flags["area_m2"] / MU_M2

    events = events.assign(month=_month_of(events, "at"), at=events["at"].astype(str))
    if "first_month" not in cases.columns:  # derive it from the whole log, before the cut
        first = events.groupby("case_id")["month"].min()
        opened = cases["opened_at"].astype(str).str.slice(0, 7) if "opened_at" in cases else ""
        cases = cases.assign(first_month=cases["case_id"].map(first).fillna(opened))
    order = [c for c in ("seq",) if c in events.columns] or [c for c in ("at", "event_id") if c in events.columns]
    events = events[events["month"] <= month].sort_values(order, kind="stable")  # `seq` is the log order
    cases = cases[cases["first_month"].astype(str) <= month]
    flags = flags.assign(case_id=flag_cases(flags, events))
    try:
        cases = cases.assign(state_at=state_as_of(cases, events))
    except (LedgerError, ValueError) as exc:  # the ledger stage writes only legal logs
        raise CorruptFileError(
            f"{ledger_path}: layer 'events' does not fold through the lifecycle as of {month} ({exc}); {LEDGER_FIX}"
        ) from exc
    for col in ("district", "street", "category", "opened_at", "deadline"):
        if col not in cases.columns:
            cases[col] = ""
    if "area_m2" not in cases.columns:
        cases["area_m2"] = cases.geometry.area
    if len(alerts):
        alerts = alerts.set_crs(cases.crs, allow_override=False) if alerts.crs is None else alerts
        if not alerts.crs.equals(cases.crs):
            raise CRSMismatchError(f"{ledger_path}: layer 'alerts' CRS differs from 'cases'; rebuild the ledger")
        if "month" in alerts.columns:
            alerts = alerts[alerts["month"].astype(str) == month]
    for col in ("message_zh", "message_en"):
        if col not in alerts.columns:
            alerts[col] = ""
    return MonthView(
        month,
        flags.reset_index(drop=True),
        cases.reset_index(drop=True),
        events.reset_index(drop=True),
        alerts.reset_index(drop=True),
    )
