"""The in-memory ledger builder: cases folded event by event, as :func:`pipeline.ledger.build_ledger` drives it.

:class:`LedgerBuilder` appends events (checking each against the lifecycle), opens cases for seed rows,
imagery flags and field findings, keeps each case's folded state and footprint, and finally turns the
log into the ``events``, ``cases`` and ``alerts`` tables. The processing order is described in
:mod:`pipeline.ledger.build`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS
from shapely.geometry.base import BaseGeometry

from pipeline.config import LedgerSettings
from pipeline.errors import LedgerError
from pipeline.ledger.alerts import ALERT_COLUMNS, month_alerts
from pipeline.ledger.events import (
    ADMIN_KINDS,
    CATEGORIES,
    FIELD_OPENING_KINDS,
    FOOTPRINT_KINDS,
    LIFECYCLE_KINDS,
    Event,
    events_frame,
    imagery_date,
    month_end,
    parse_date,
    working_days_after,
)
from pipeline.ledger.fieldio import FieldUpdate
from pipeline.ledger.grid import UnitLayers, dispatch_target
from pipeline.ledger.lifecycle import REMOVED_STATES, STATES, STOP_STATES, next_state, seed_path
from pipeline.ledger.matching import FootprintIndex, PermitIndex

log = logging.getLogger(__name__)

IMAGERY_ACTOR = "scarwatch"
CASE_COLUMNS: tuple[str, ...] = (
    "case_id",
    "state",
    "category",
    "opened_at",
    "last_event_at",
    "deadline",
    "district",
    "street",
    "area_m2",
    "n_events",
    "first_month",
    "permit_id",
)


@dataclass
class _Case:
    """The folded, mutable view of one case while the log is built."""

    case_id: str
    category: str
    opened_at: str
    first_month: str
    district: str = ""
    street: str = ""
    state: str | None = None
    footprint: BaseGeometry | None = None
    deadline: str = ""
    permit_id: str = ""
    n_events: int = 0
    last_event_at: str = ""
    removed_seen: bool = False
    rebuild_pending: bool = False
    expansion_pending: bool = False
    demolished_month: str = ""
    demolished_by_field: bool = False
    provisional: bool = False  # footprint is a disc around an inspector's point, not yet seen in imagery
    dispatch_due: str = ""  # the last dispatch (派单): its field check's due date and unit
    dispatch_unit: str = ""
    checked_since_dispatch: bool = False  # a field event came after the last dispatch


def _clean(geom: BaseGeometry, where: str) -> BaseGeometry:
    """Return a valid polygonal geometry (repairing an invalid one), or raise LedgerError."""
    if geom is None or geom.is_empty:
        raise LedgerError(f"{where}: no geometry; draw the case polygon")
    if geom.geom_type == "Polygon" and geom.is_valid:  # nearly every input: nothing to repair or take apart
        return geom
    if not geom.is_valid:
        log.warning("%s: invalid polygon repaired with make_valid", where)
        geom = shapely.make_valid(geom)
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        raise LedgerError(f"{where}: geometry is {geom.geom_type}, not a polygon; draw the case polygon")
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


class _Flag(NamedTuple):
    flag_id: str
    kind: str
    district: str
    street: str
    geometry: BaseGeometry


def _month_flags(flags: gpd.GeoDataFrame, path: Path) -> list[_Flag]:
    """The flags' columns the join reads, as plain tuples, each polygon checked by :func:`_clean`.

    Iterating a frame row by row costs more than the join itself at city scale; a valid, non-empty Polygon
    (nearly every flag) needs no repair, so only the others go through :func:`_clean`.
    """
    geoms = np.asarray(flags.geometry.values, dtype=object)
    fine = shapely.is_valid(geoms) & ~shapely.is_empty(geoms) & (shapely.get_type_id(geoms) == 3)
    cols = [flags[c].astype(str).tolist() for c in ("flag_id", "kind", "district", "street")]
    return [
        _Flag(fid, kind, district, street, g if ok else _clean(g, f"{path} flag {fid}"))
        for fid, kind, district, street, g, ok in zip(*cols, geoms, fine.tolist(), strict=True)
    ]


class LedgerBuilder:
    """Appends events in processing order and keeps each case's folded view current."""

    def __init__(
        self,
        settings: LedgerSettings,
        areas: gpd.GeoDataFrame | None,
        *,
        registry: dict[str, str] | None = None,
        reserved: frozenset[str] = frozenset(),
        units: UnitLayers | None = None,
        dispatched: dict[tuple[str, str], dict[str, str]] | None = None,
    ) -> None:
        self.settings = settings
        self.areas = areas
        # case ids are assigned once: opened_by (flag id, field file:row) -> the id it was given before;
        # ``reserved`` holds every id ever assigned, so a new case never takes a retired or seed id
        self.registry = dict(registry or {})
        self.owner = {case_id: opener for opener, case_id in self.registry.items()}
        self.reserved = set(reserved) | set(self.registry.values())
        self.events: list[Event] = []
        self.cases: dict[str, _Case] = {}
        self.index = FootprintIndex()
        self.alerts: list[dict[str, object]] = []
        self.new_by_month: Counter[str] = Counter()
        self.permitted_by_month: Counter[str] = Counter()
        self.last_imagery_month = ""
        # dispatch (派单): the unit layers; the live ledger's dispatches by (case, date), which are part of the
        # record like case ids (a redrawn grid or a late field update never rewrites a dispatch already made)
        self.units = units
        self.live_dispatched = dict(dispatched or {})
        self._dispatched: set[tuple[str, str]] = set()
        self._entered_warning: list[str] = []
        self.field_facts: dict[tuple[str, ...], str] = {}  # (case, at, kind, actor, note, deadline) -> evidence

    # -- events -------------------------------------------------------------------------------------
    def append(
        self,
        case: _Case,
        kind: str,
        *,
        source: str,
        at: str,
        actor: str,
        evidence: str,
        month: str,
        geometry: BaseGeometry | None = None,
        deadline: str = "",
        category: str = "",
        note: str = "",
        where: str = "",
    ) -> Event:
        """Fold one event into ``case`` (refusing an illegal transition) and append it to the log."""
        if kind in LIFECYCLE_KINDS:
            before = case.state
            case.state = next_state(case.state, kind, case_id=case.case_id, where=where)
            case.rebuild_pending = case.expansion_pending = False
            if case.state == "warning" and before != "warning":
                self._entered_warning.append(case.case_id)
        if source == "field":
            case.checked_since_dispatch = True
        elif kind == "dispatched":
            case.dispatch_due, case.dispatch_unit, case.checked_since_dispatch = deadline, actor, False
        if kind in FOOTPRINT_KINDS:
            assert geometry is not None  # imagery events always carry the flag polygon
            if case.footprint is None or case.provisional:
                case.footprint = geometry
                case.provisional = source == "field"
            else:
                case.footprint = shapely.union(case.footprint, geometry)
            case.removed_seen = False
        geom = geometry if geometry is not None else case.footprint
        assert geom is not None and case.state is not None  # the first event of a case is 'flagged'
        if kind == "rebuilt":
            case.rebuild_pending = True
        elif kind == "expanded" and case.state in STOP_STATES:
            case.expansion_pending = True
        elif kind == "observed_removed":
            case.removed_seen = True
            case.rebuild_pending = case.expansion_pending = False
        elif kind == "demolished":
            case.demolished_month, case.demolished_by_field = month, source == "field"
        if deadline and kind not in ADMIN_KINDS:  # a dispatch's due date is not the case's deadline
            case.deadline = deadline
        case.n_events += 1
        case.last_event_at = max(case.last_event_at, at)
        event = Event.create(
            seq=len(self.events) + 1,
            case_id=case.case_id,
            at=at,
            kind=kind,
            source=source,
            actor=actor,
            evidence=evidence,
            month=month,
            geometry=geom,
            deadline=deadline,
            category=category,
            note=note,
        )
        self.events.append(event)
        footprint = case.footprint if case.footprint is not None else geom
        self.index.put(
            case.case_id, footprint, case.state, removed_seen=case.removed_seen, provisional=case.provisional
        )
        return event

    def _area_of(self, geom: BaseGeometry) -> tuple[str, str]:
        """Return (district, street) of the area holding the geometry's representative point."""
        if self.areas is None or self.areas.empty:
            return "", ""
        hits = self.areas[self.areas.geometry.covers(geom.representative_point())]
        if hits.empty:
            return "", ""
        first = hits.sort_values(["district", "street"]).iloc[0]
        return str(first["district"]), str(first["street"])

    # -- seed ---------------------------------------------------------------------------------------
    def seed(self, seeds: gpd.GeoDataFrame, path: Path) -> None:
        """Turn every seed case into the events that reconstruct its state."""
        for i, row in enumerate(seeds.itertuples(index=False)):
            case_id = "" if pd.isna(row.case_id) else str(row.case_id).strip()
            where = f"{path} feature {i + 1}" + (f" (case {case_id})" if case_id else "")
            if not case_id:
                raise LedgerError(f"{where}: case_id is empty; give every seed case an id")
            if case_id in self.cases:
                raise LedgerError(f"{where}: case_id {case_id!r} occurs twice in the seed ledger; make ids unique")
            if case_id in self.owner:
                raise LedgerError(
                    f"{where}: case_id {case_id!r} is already the id of the case opened by {self.owner[case_id]!r} "
                    "in the ledger; give the seed case another id"
                )
            state = "" if pd.isna(row.state) else str(row.state).strip()
            if state not in STATES:
                raise LedgerError(f"{where}: state {state!r} is not a lifecycle state; use one of {', '.join(STATES)}")
            category = "" if pd.isna(row.category) else str(row.category).strip()
            if category not in CATEGORIES:
                raise LedgerError(f"{where}: category {category!r} is unknown; use one of {', '.join(CATEGORIES)}")
            opened = parse_date(row.opened_at, where, "opened_at")
            deadline = parse_date(row.deadline, where, "deadline", required=False)
            note = "" if pd.isna(row.note) else str(row.note).strip()
            geom = _clean(row.geometry, where)
            district, street = self._area_of(geom)
            case = _Case(case_id, category, opened, opened[:7], district, street)
            self.cases[case_id] = case
            kinds = seed_path(state)
            deadline_on = "ordered" if "ordered" in kinds else kinds[-1]
            for kind in kinds:
                self.append(
                    case,
                    kind,
                    source="seed",
                    at=opened,
                    actor="seed",
                    evidence=f"ledger/cases.gpkg:{i + 1}",
                    month=opened[:7],
                    geometry=geom if kind == "flagged" else None,
                    deadline=deadline if kind == deadline_on else "",
                    category=category if kind == "flagged" else "",
                    note=note if kind == kinds[-1] else "",
                    where=f"{where}: ",
                )

    def _assigned(self, opener: str, where: str) -> str:
        """The id the registry gave the case ``opener`` opened ("" for a new case); refuse a taken one."""
        case_id = self.registry.get(opener, "")
        if case_id and case_id in self.cases:
            raise LedgerError(
                f"{where}: opens case {case_id!r} as recorded in the ledger's registry, but a seed case now has "
                "that id; give the seed case another id"
            )
        return case_id

    # -- imagery ------------------------------------------------------------------------------------
    def imagery(self, month: str, flags: gpd.GeoDataFrame, permits: gpd.GeoDataFrame, path: Path) -> None:
        """Join a month's flags to the cases (observations, permitted or new cases)."""
        d, at = self.settings.match_distance_m, imagery_date(month)
        number = 0
        rows = _month_flags(flags, path)
        new = [(i, f, f.geometry) for i, f in enumerate(rows) if f.kind == "new"]
        join = self.index.month_join([g for _, _, g in new], d)  # spatial index: never every flag × every case
        in_permit = PermitIndex(permits, month, d)
        seen = partial(self.append, source="imagery", at=at, actor=IMAGERY_ACTOR, month=month)
        for k, (i, flag, geom) in enumerate(new):
            obs = self.index.match_new(geom, d, self.settings.expand_ratio, candidates=join.candidates(k))
            if obs is not None:
                join.attach(k, obs.case_id)
                matched = self.cases[obs.case_id]
                if obs.kind == "rebuilt" and matched.state in REMOVED_STATES:
                    # 反弹: the structure is back at a demolished/repaired/closed case, which reopens (same id)
                    # and goes back to 'warning', to be dispatched and checked again; never counted closed
                    seen(matched, "reopened", evidence=str(flag.flag_id), note="反弹 rebuilt")
                seen(matched, obs.kind, evidence=str(flag.flag_id), geometry=geom)
                continue
            case_id = self._assigned(str(flag.flag_id), f"{path} flag {flag.flag_id}")
            if not case_id:  # a new case: the next number no case ever had
                while not case_id or case_id in self.cases or case_id in self.reserved:
                    number += 1
                    case_id = f"SW-{month.replace('-', '')}-{number:04d}"
                self.reserved.add(case_id)
            district, street = str(flag.district), str(flag.street)
            if not district:
                district, street = self._area_of(geom)
            case = _Case(case_id, "illegal_construction", at, month, district, street)
            self.cases[case_id] = case
            join.attach(k, case_id)
            seen(case, "flagged", evidence=str(flag.flag_id), geometry=geom, category="illegal_construction")
            permit = in_permit.find(geom)
            if permit is not None:
                case.permit_id = permit
                self.append(
                    case,
                    "dismissed",
                    source="permit",
                    at=at,
                    actor="permit",
                    evidence=f"layers/permits.gpkg:{permit}",
                    month=month,
                    note=f"inside permit {permit}",
                )
                self.permitted_by_month[month] += 1
            else:
                self.new_by_month[month] += 1
            log.debug("flag %s (row %d) opened case %s", flag.flag_id, i + 1, case_id)
        removed = [f for f in rows if f.kind == "removed"]
        for flag, hits in zip(removed, self.index.match_removed_many([f.geometry for f in removed], d), strict=True):
            if not hits:
                log.debug("removed flag %s matches no case", flag.flag_id)
            for case_id in hits:
                seen(self.cases[case_id], "observed_removed", evidence=str(flag.flag_id), geometry=flag.geometry)
        self.last_imagery_month = month

    # -- field updates ------------------------------------------------------------------------------
    def field(self, updates: Sequence[FieldUpdate]) -> None:
        """Apply a month's field updates in the order given (IllegalTransitionError names file and row).

        An update that repeats one already applied to the same case (same date, kind, actor, note and
        deadline, from another file) is applied once: re-importing rows under another name adds nothing.
        """
        d = self.settings.match_distance_m
        for u in updates:
            if u.case_id:
                case = self.cases.get(u.case_id)
                if case is None and u.case_id in self.reserved:
                    opener = self.owner.get(u.case_id, "the seed ledger")
                    raise LedgerError(
                        f"{u.where}: case {u.case_id!r} is in the live ledger (opened by {opener!r}), but this run "
                        "did not open it: its input is missing (a month removed from params.yaml 'months', flags "
                        "re-made, the seed ledger changed); restore that input"
                    )
                if case is None:
                    raise LedgerError(
                        f"{u.where}: case {u.case_id!r} is not in the ledger (seed cases and cases opened by "
                        f"imagery up to {u.month}); fix the case_id"
                    )
            else:
                assert u.x is not None and u.y is not None  # read_field_updates guarantees one of the two
                hits = self.index.locate(u.x, u.y, d)
                if len(hits) > 1:
                    raise LedgerError(
                        f"{u.where}: x={u.x:.2f}, y={u.y:.2f} is ambiguous: cases {', '.join(hits)} lie within "
                        f"{d:g} m; give case_id"
                    )
                if hits:
                    case = self.cases[hits[0]]
                elif u.kind in FIELD_OPENING_KINDS:
                    case = self._open_field_case(u)
                else:
                    raise LedgerError(
                        f"{u.where}: no case lies within {d:g} m of x={u.x:.2f}, y={u.y:.2f}; give case_id, "
                        f"fix the coordinates, or first report 'confirmed' there to open a case found in the field"
                    )
            fact = (case.case_id, u.at, u.kind, u.actor, u.note, u.deadline)
            if fact in self.field_facts:  # the same finding in another file (re-imported, re-encoded): one event
                log.info("%s: the same update as %s; applied once", u.where, self.field_facts[fact])
                continue
            self.field_facts[fact] = u.evidence
            self.append(
                case,
                u.kind,
                source="field",
                at=u.at,
                actor=u.actor,
                evidence=u.evidence,
                month=u.month,
                deadline=u.deadline,
                note=u.note,
                where=f"{u.where}: ",
            )

    def _open_field_case(self, u: FieldUpdate) -> _Case:
        """Open a case an inspector found in the field (发现) where imagery flagged nothing.

        Its footprint is a disc of ``ledger.field_radius_m`` around the point until imagery sees it.
        """
        assert u.x is not None and u.y is not None
        tag = u.month.replace("-", "")
        case_id, number = self._assigned(u.evidence, u.where), 0
        if not case_id:  # a new case: the next number no case ever had
            while not case_id or case_id in self.cases or case_id in self.reserved:
                number += 1
                case_id = f"SW-{tag}-F{number:03d}"
            self.reserved.add(case_id)
        geom = shapely.Point(u.x, u.y).buffer(self.settings.field_radius_m)
        district, street = self._area_of(geom)
        case = _Case(case_id, "illegal_construction", u.at, u.month, district, street)
        self.cases[case_id] = case
        self.append(
            case,
            "flagged",
            source="field",
            at=u.at,
            actor=u.actor,
            evidence=u.evidence,
            month=u.month,
            geometry=geom,
            category="illegal_construction",
            note="现场发现 found in the field",
        )
        self.new_by_month[u.month] += 1
        log.info("%s: no case at x=%.2f, y=%.2f; opened field case %s", u.where, u.x, u.y, case_id)
        return case

    # -- dispatch (派单) -----------------------------------------------------------------------------
    def seeded(self) -> None:
        """Seed cases are the bureau's existing record: a seed ``warning`` is not dispatched."""
        self._entered_warning.clear()

    def dispatch_new(self, month: str) -> None:
        """After a month's imagery: dispatch every case that entered ``warning`` and is still one."""
        ids = [c for c in dict.fromkeys(self._entered_warning) if self.cases[c].state == "warning"]
        self._entered_warning.clear()
        self._dispatch(ids, imagery_date(month), month)

    def redispatch(self, month: str) -> None:
        """At a month's end (after its alerts): dispatch again each case whose field check is overdue.

        Dated the month's last day. A dispatch the live ledger holds for this month that the rules no longer
        make (a late field update arrived) is kept: it was made and sent.
        """
        self._entered_warning.clear()
        end = month_end(month).isoformat()
        overdue = [str(a["case_id"]) for a in self.alerts if a["month"] == month and a["kind"] == "check_overdue"]
        self._dispatch(overdue, end, month)
        kept = sorted(
            (at, case_id)
            for (case_id, at), e in self.live_dispatched.items()
            if e["month"] == month and (case_id, at) not in self._dispatched and case_id in self.cases
        )
        for at, case_id in kept:
            self._dispatch([case_id], at, month)

    def _dispatch(self, case_ids: Sequence[str], at: str, month: str) -> None:
        """Append a ``dispatched`` event (unit, cell, due date) to each case, in the order given."""
        case_ids = [c for c in case_ids if (c, at) not in self._dispatched]
        fresh = [c for c in case_ids if (c, at) not in self.live_dispatched]
        assigned: dict[str, pd.Series] = {}
        if fresh:
            units = self.units if self.units is not None else UnitLayers(Path("layers"), {})
            geoms = gpd.GeoSeries([self.cases[c].footprint for c in fresh], crs=units.crs)
            table = units.assign(geoms)
            assigned = {c: table.iloc[i] for i, c in enumerate(fresh)}
        days, holidays = self.settings.dispatch_due_days, [d.isoformat() for d in self.settings.dispatch_holidays]
        for case_id in case_ids:
            live = self.live_dispatched.get((case_id, at))
            if live is not None:
                actor, note, evidence, due = live["actor"], live["note"], live["evidence"], live["deadline"]
            else:
                actor, note, evidence = dispatch_target(assigned[case_id])
                due = working_days_after(at, days, holidays)
            self.append(
                self.cases[case_id],
                "dispatched",
                source="dispatch",
                at=at,
                actor=actor,
                evidence=evidence,
                month=month,
                deadline=due,
                note=note,
            )
            self._dispatched.add((case_id, at))

    # -- alerts -------------------------------------------------------------------------------------
    def evaluate_alerts(self, month: str) -> None:
        """Append the alerts that hold at the end of ``month`` (the rules: :mod:`pipeline.ledger.alerts`)."""
        self.alerts += month_alerts(
            self.cases,
            month,
            repair_grace_months=self.settings.repair_grace_months,
            last_imagery_month=self.last_imagery_month,
        )

    # -- output -------------------------------------------------------------------------------------
    def frames(self, crs: CRS) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, gpd.GeoDataFrame]:
        """Return the ``events``, ``cases`` and ``alerts`` layers."""
        ids = [e.event_id for e in self.events]
        if len(set(ids)) != len(ids):
            dup = next(i for i, n in Counter(ids).items() if n > 1)
            raise LedgerError(f"event id {dup} occurs twice: the same fact was given twice; remove the duplicate input")
        events = events_frame(self.events, crs)
        rows = [
            {
                "case_id": c.case_id,
                "state": c.state,
                "category": c.category,
                "opened_at": c.opened_at,
                "last_event_at": c.last_event_at,
                "deadline": c.deadline,
                "district": c.district,
                "street": c.street,
                "area_m2": round(float(c.footprint.area), 2) if c.footprint else 0.0,
                "n_events": c.n_events,
                "first_month": c.first_month,
                "permit_id": c.permit_id,
            }
            for c in (self.cases[k] for k in sorted(self.cases))
        ]
        cases = gpd.GeoDataFrame(
            pd.DataFrame(rows, columns=list(CASE_COLUMNS)),
            geometry=gpd.GeoSeries([self.cases[k].footprint for k in sorted(self.cases)], crs=crs),
            crs=crs,
        )
        cases["n_events"] = cases["n_events"].astype("int64")
        cases["area_m2"] = cases["area_m2"].astype("float64")
        alerts = gpd.GeoDataFrame(
            pd.DataFrame([{k: a[k] for k in ALERT_COLUMNS} for a in self.alerts], columns=list(ALERT_COLUMNS)),
            geometry=gpd.GeoSeries([a["geometry"] for a in self.alerts], crs=crs),
            crs=crs,
        )
        return events, cases, alerts
