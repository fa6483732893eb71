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
import pandas as pd

from pipeline.config import check_month
from pipeline.errors import CorruptFileError, CRSMismatchError, LedgerError
from pipeline.fileio import read_layer
from pipeline.ledger.alerts import ALERT_COLUMNS
from pipeline.ledger.builder import CASE_COLUMNS
from pipeline.ledger.events import EVENT_COLUMNS
from pipeline.ledger.lifecycle import fold_kinds
from pipeline.ledger.store import FLAG_COLUMNS, LEDGER_FIX, read_ledger_layer

log = logging.getLogger(__name__)


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
        columns=FLAG_COLUMNS,
    )
    ledger = Path(ledger_path)
    cases = read_ledger_layer(ledger, "cases", columns=CASE_COLUMNS)  # dates as ISO text, as the ledger built them
    events = read_ledger_layer(ledger, "events", columns=EVENT_COLUMNS)
    alerts = read_ledger_layer(ledger, "alerts", columns=ALERT_COLUMNS)
    if not flags.crs.equals(cases.crs):
        raise CRSMismatchError(
            f"{flags_path} is in {flags.crs.to_string()!r} but {ledger_path} in {cases.crs.to_string()!r}; "
            "rebuild the ledger from these flags so both share the grid CRS"
        )
    flags = flags[flags["month"].astype(str) == month]
    events = events.assign(month=events["month"].astype(str), at=events["at"].astype(str))
    events = events[events["month"] <= month].sort_values("seq", kind="stable")  # `seq` is the log order
    cases = cases[cases["first_month"].astype(str) <= month]
    flags = flags.assign(case_id=flag_cases(flags, events))
    try:
        cases = cases.assign(state_at=state_as_of(cases, events))
    except (LedgerError, ValueError) as exc:  # the ledger stage writes only legal logs
        raise CorruptFileError(
            f"{ledger_path}: layer 'events' does not fold through the lifecycle as of {month} ({exc}); {LEDGER_FIX}"
        ) from exc
    if not alerts.crs.equals(cases.crs):
        raise CRSMismatchError(f"{ledger_path}: layer 'alerts' CRS differs from 'cases'; {LEDGER_FIX}")
    alerts = alerts[alerts["month"].astype(str) == month]
    return MonthView(
        month,
        flags.reset_index(drop=True),
        cases.reset_index(drop=True),
        events.reset_index(drop=True),
        alerts.reset_index(drop=True),
    )
