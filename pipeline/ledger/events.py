"""The event model of the ledger: kinds, sources, one frozen :class:`Event` per fact, dates and ids.

The ledger is an append-only log. Every fact (a seed case, an imagery observation, an inspector's
update, a permit match) is one event row; nothing is overwritten. Columns of the ``events`` layer:

``event_id``  16 hex digits of SHA-1 over ``case_id|at|kind|source|evidence``: the same inputs always
              give the same id, so a rebuilt ledger is identical.
``seq``       position in the log (processing order); the fold order of a case's events.
``case_id``, ``at`` (ISO date), ``kind``, ``source`` (``seed`` | ``imagery`` | ``field`` | ``permit`` | ``dispatch``),
``actor``, ``evidence`` (a flag id, or ``file:row``), ``month`` (``YYYY-MM`` the event was processed in),
``deadline`` (ISO date for ``ordered`` and ``dispatched``, else empty), ``category`` (on the opening event), ``note``,
geometry (the flag polygon for imagery events, the case footprint otherwise).

Dates: imagery events are dated the **1st of their month**. A month's flags are processed before that
month's field updates, so dating imagery at the month's start keeps date order and processing order
the same (a field update of 2026-03-10 comes after the March imagery dated 2026-03-01).
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import geopandas as gpd
import pandas as pd
from shapely.geometry.base import BaseGeometry

from pipeline.config import MONTH_RE
from pipeline.errors import LedgerError

LIFECYCLE_KINDS: Final[tuple[str, ...]] = (
    "flagged",
    "confirmed",
    "dismissed",
    "stopped",
    "ordered",
    "demolished",
    "repaired",
    "closed",
    "reopened",
)
"""Kinds that move a case through the lifecycle (see :mod:`pipeline.ledger.lifecycle`).

``reopened`` is written by the ledger itself (source ``imagery``) when a ``new`` flag shows a structure
back at a demolished, repaired or closed case (反弹): the case returns to ``warning`` and is dispatched
again. An inspector reopens a case with ``confirmed`` instead (复查), so it is no field kind."""

OBSERVATION_KINDS: Final[tuple[str, ...]] = ("observed_present", "observed_removed", "expanded", "rebuilt")
"""Imagery observations: they annotate a case and never change its state."""

ADMIN_KINDS: Final[tuple[str, ...]] = ("dispatched",)
"""Administrative events: they record what the bureau did with a case and never change its state.

``dispatched`` (派单, source ``dispatch``): the case was sent to its responsible unit for a field check;
``actor`` is the unit, ``note`` the 网格 cell (or the fallback), ``deadline`` the check's due date,
``evidence`` the layer feature that named the unit (``layers/grid.gpkg:<cell_id>``).
"""

EVENT_KINDS: Final[tuple[str, ...]] = LIFECYCLE_KINDS + OBSERVATION_KINDS + ADMIN_KINDS

FIELD_KINDS: Final[tuple[str, ...]] = tuple(k for k in LIFECYCLE_KINDS if k not in ("flagged", "reopened"))
# Field updates that may open a case at a point where the ledger has none: an inspector who finds
# construction imagery missed confirms it (发现) or dismisses it (e.g. permitted); other kinds need a case.
FIELD_OPENING_KINDS: Final[frozenset[str]] = frozenset({"confirmed", "dismissed"})
"""Kinds an inspector's field update may carry (cases are opened by imagery or the seed ledger)."""

FOOTPRINT_KINDS: Final[frozenset[str]] = frozenset({"flagged", "observed_present", "expanded", "rebuilt"})
"""Events whose geometry extends the case footprint (the footprint is the union of their geometries)."""

SOURCES: Final[tuple[str, ...]] = ("seed", "imagery", "field", "permit", "dispatch")

CATEGORIES: Final[tuple[str, ...]] = ("illegal_construction", "scar")

EVENT_COLUMNS: Final[tuple[str, ...]] = (
    "event_id",
    "seq",
    "case_id",
    "at",
    "kind",
    "source",
    "actor",
    "evidence",
    "month",
    "deadline",
    "category",
    "note",
)


@dataclass(frozen=True, slots=True)
class Event:
    """One row of the event log."""

    event_id: str
    seq: int
    case_id: str
    at: str
    kind: str
    source: str
    actor: str
    evidence: str
    month: str
    geometry: BaseGeometry
    deadline: str = ""
    category: str = ""
    note: str = ""

    @classmethod
    def create(
        cls,
        *,
        seq: int,
        case_id: str,
        at: str,
        kind: str,
        source: str,
        actor: str,
        evidence: str,
        month: str,
        geometry: BaseGeometry,
        deadline: str = "",
        category: str = "",
        note: str = "",
    ) -> Event:
        """Build an event with its deterministic id.

        Raises:
            ValueError: ``kind`` or ``source`` is not known (a programming error, not bad input).
        """
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind {kind!r} is not one of {', '.join(EVENT_KINDS)}")
        if source not in SOURCES:
            raise ValueError(f"event source {source!r} is not one of {', '.join(SOURCES)}")
        return cls(
            event_id=event_id(case_id, at, kind, source, evidence),
            seq=seq,
            case_id=case_id,
            at=at,
            kind=kind,
            source=source,
            actor=actor,
            evidence=evidence,
            month=month,
            geometry=geometry,
            deadline=deadline,
            category=category,
            note=note,
        )


def event_id(case_id: str, at: str, kind: str, source: str, evidence: str) -> str:
    """Return the deterministic id of an event: 16 hex digits of SHA-1 over its identifying fields."""
    key = "|".join((case_id, at, kind, source, evidence))
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def imagery_date(month: str) -> str:
    """Return the ISO date imagery events of ``month`` carry: the 1st of the month."""
    return f"{month}-01"


def month_end(month: str) -> dt.date:
    """Return the last day of ``month`` (``YYYY-MM``)."""
    year, mon = int(month[:4]), int(month[5:7])
    return dt.date(year, mon, calendar.monthrange(year, mon)[1])


def month_index(month: str) -> int:
    """Return a month as a running count of months (``2026-03`` → 2026 * 12 + 2), for differences."""
    return int(month[:4]) * 12 + int(month[5:7]) - 1


def working_days_after(day: str, n: int, holidays: Sequence[str] = ()) -> str:
    """The ISO date ``n`` working days (Monday to Friday, not in ``holidays``) after ``day``.

    A ``day`` that is no working day counts from the next one: Friday + 3 is Wednesday, Saturday + 3
    is Thursday (numpy's business-day calendar, ``roll="forward"``).
    """
    import numpy as np

    due = np.busday_offset(np.datetime64(day, "D"), n, roll="forward", holidays=list(holidays))
    return str(due)


def check_month_name(value: str, where: str) -> str:
    """Return ``value`` when it is a ``YYYY-MM`` month, else raise LedgerError naming ``where``."""
    if not MONTH_RE.match(value):
        raise LedgerError(f"{where}: {value!r} is not a month of the form YYYY-MM; rename it")
    return value


def parse_date(value: object, where: str, column: str, *, required: bool = True) -> str:
    """Normalise an ISO date cell to ``YYYY-MM-DD`` ("" when empty and not required).

    Args:
        value: the cell (str, date, timestamp, None or NaN).
        where: the file and row, for the message.
        column: the column name, for the message.
        required: whether an empty cell is an error.

    Raises:
        LedgerError: the cell is empty but required, or not an ISO date.
    """
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NaT:
        text = ""
    elif isinstance(value, dt.datetime | pd.Timestamp):
        return value.date().isoformat()
    elif isinstance(value, dt.date):
        return value.isoformat()
    else:
        text = str(value).strip()
    if not text:
        if required:
            raise LedgerError(f"{where}: column {column!r} is empty; give an ISO date like 2026-03-15")
        return ""
    try:
        return dt.date.fromisoformat(text[:10]).isoformat()
    except ValueError:
        raise LedgerError(f"{where}: {column} {text!r} is not an ISO date; write it like 2026-03-15") from None


def events_frame(events: Sequence[Event], crs: object) -> gpd.GeoDataFrame:
    """Return the events as the ``events`` layer (columns :data:`EVENT_COLUMNS` + geometry), in log order."""
    data: dict[str, list[object]] = {c: [getattr(e, c) for e in events] for c in EVENT_COLUMNS}
    frame = pd.DataFrame(data, columns=list(EVENT_COLUMNS))
    frame["seq"] = frame["seq"].astype("int64")
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries([e.geometry for e in events], crs=crs), crs=crs)
