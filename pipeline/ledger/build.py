"""Build the scar ledger (台账) from seed cases, monthly flags, permits and inspectors' field updates.

Processing order (the log order, ``seq``):

1. Seed cases, in file order. Each becomes the shortest legal run of events that reaches its seed
   state (:func:`pipeline.ledger.lifecycle.seed_path`), all dated ``opened_at``, source ``seed``.
2. Month by month over the flag months and the months that have a field-update file (so an update
   filed for a month without imagery is never lost):

   a. ``new`` flags by ``flag_id``: an observation on a matching case (``observed_present``,
      ``expanded``, ``rebuilt``; see :mod:`pipeline.ledger.matching`); else, inside a valid permit, a
      case that is opened and at once dismissed (``flagged`` then ``dismissed`` with source ``permit``,
      evidence ``layers/permits.gpkg:<permit_id>``, the case's ``permit_id`` set), so permitted
      construction is on record and counted apart; else a new case in state ``warning``, id
      ``SW-<YYYYMM>-<nnnn>`` numbered from 0001 in flag-id order (ids taken by seed cases are skipped);
   b. ``removed`` flags by ``flag_id``: ``observed_removed`` on every matching case;
   c. the month's field updates in row order; an illegal transition raises IllegalTransitionError.
   d. Alerts are evaluated at the end of the month (see :mod:`pipeline.ledger.alerts`).

Everything is read and checked first and the ledger is built in memory; it is written only when all of
it succeeded, atomically, so an error leaves the previous ledger as it was.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pandas as pd
import shapely
from pyproj import CRS
from shapely.geometry.base import BaseGeometry

from pipeline.config import LedgerSettings, check_month
from pipeline.errors import ConfigError, LedgerError, MissingInputError
from pipeline.ledger.alerts import ALERT_COLUMNS, month_alerts
from pipeline.ledger.alerts import ALERT_TEXT as ALERT_TEXT  # re-exported: the old home of the alert texts
from pipeline.ledger.events import (
    CATEGORIES,
    FIELD_OPENING_KINDS,
    FOOTPRINT_KINDS,
    LIFECYCLE_KINDS,
    Event,
    events_frame,
    imagery_date,
    parse_date,
)
from pipeline.ledger.lifecycle import STATES, STOP_STATES, fold_kinds, next_state, seed_path
from pipeline.ledger.matching import FootprintIndex, find_permit
from pipeline.ledger.store import (
    FieldUpdate,
    check_crs,
    field_update_files,
    read_areas,
    read_field_updates,
    read_flags,
    read_permits,
    read_seed_cases,
    write_ledger,
)

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


@dataclass(frozen=True)
class LedgerSummary:
    """What :func:`build_ledger` wrote."""

    out_path: Path
    n_cases: int
    n_events: int
    n_alerts: int
    states: dict[str, int]
    new_cases_by_month: dict[str, int]
    permitted_by_month: dict[str, int]


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


def _clean(geom: BaseGeometry, where: str) -> BaseGeometry:
    """Return a valid polygonal geometry (repairing an invalid one), or raise LedgerError."""
    if geom is None or geom.is_empty:
        raise LedgerError(f"{where}: no geometry; draw the case polygon")
    if not geom.is_valid:
        log.warning("%s: invalid polygon repaired with make_valid", where)
        geom = shapely.make_valid(geom)
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        raise LedgerError(f"{where}: geometry is {geom.geom_type}, not a polygon; draw the case polygon")
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


class _Builder:
    """Appends events in processing order and keeps each case's folded view current."""

    def __init__(self, settings: LedgerSettings, areas: gpd.GeoDataFrame | None) -> None:
        self.settings = settings
        self.areas = areas
        self.events: list[Event] = []
        self.cases: dict[str, _Case] = {}
        self.index = FootprintIndex()
        self.alerts: list[dict[str, object]] = []
        self.new_by_month: Counter[str] = Counter()
        self.permitted_by_month: Counter[str] = Counter()
        self.last_imagery_month = ""

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
            case.state = next_state(case.state, kind, case_id=case.case_id, where=where)
            case.rebuild_pending = case.expansion_pending = False
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
        if deadline:
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

    # -- imagery ------------------------------------------------------------------------------------
    def imagery(self, month: str, flags: gpd.GeoDataFrame, permits: gpd.GeoDataFrame, path: Path) -> None:
        """Join a month's flags to the cases (observations, permitted or new cases)."""
        d, at = self.settings.match_distance_m, imagery_date(month)
        number = 0
        for i, flag in enumerate(flags.itertuples(index=False)):
            if flag.kind != "new":
                continue
            geom = _clean(flag.geometry, f"{path} flag {flag.flag_id}")
            obs = self.index.match_new(geom, d, self.settings.expand_ratio)
            if obs is not None:
                self.append(
                    self.cases[obs.case_id],
                    obs.kind,
                    source="imagery",
                    at=at,
                    actor=IMAGERY_ACTOR,
                    evidence=str(flag.flag_id),
                    month=month,
                    geometry=geom,
                )
                continue
            case_id = ""
            while not case_id or case_id in self.cases:
                number += 1
                case_id = f"SW-{month.replace('-', '')}-{number:04d}"
            district, street = str(flag.district), str(flag.street)
            if not district:
                district, street = self._area_of(geom)
            case = _Case(case_id, "illegal_construction", at, month, district, street)
            self.cases[case_id] = case
            self.append(
                case,
                "flagged",
                source="imagery",
                at=at,
                actor=IMAGERY_ACTOR,
                evidence=str(flag.flag_id),
                month=month,
                geometry=geom,
                category="illegal_construction",
            )
            permit = find_permit(geom, permits, month, d)
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
        for flag in flags.itertuples(index=False):
            if flag.kind != "removed":
                continue
            geom = _clean(flag.geometry, f"{path} flag {flag.flag_id}")
            hits = self.index.match_removed(geom, d)
            if not hits:
                log.debug("removed flag %s matches no case", flag.flag_id)
            for case_id in hits:
                self.append(
                    self.cases[case_id],
                    "observed_removed",
                    source="imagery",
                    at=at,
                    actor=IMAGERY_ACTOR,
                    evidence=str(flag.flag_id),
                    month=month,
                    geometry=geom,
                )
        self.last_imagery_month = month

    # -- field updates ------------------------------------------------------------------------------
    def field(self, updates: Sequence[FieldUpdate]) -> None:
        """Apply a month's field updates in row order (IllegalTransitionError names file and row)."""
        d = self.settings.match_distance_m
        for u in updates:
            if u.case_id:
                case = self.cases.get(u.case_id)
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
        number = 1 + sum(1 for c in self.cases if c.startswith(f"SW-{tag}-F"))
        case_id = f"SW-{tag}-F{number:03d}"
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


def _flag_paths(flags_paths: Sequence[Path], months: Sequence[str]) -> dict[str, Path]:
    """Map every month to its flags file (``<month>.gpkg``); raise for a month without one."""
    by_stem: dict[str, Path] = {}
    for p in flags_paths:
        by_stem.setdefault(Path(p).stem, Path(p))
    out: dict[str, Path] = {}
    for month in months:
        path = by_stem.get(month)
        if path is None:
            raise MissingInputError(
                f"flags for {month}: no <month>.gpkg among the {len(flags_paths)} flag files given; "
                f"run `scarwatch vectorize --month {month}` first"
            )
        if not path.is_file():
            raise MissingInputError(
                f"{path}: flags for {month} not found; run `scarwatch vectorize --month {month}` first"
            )
        out[month] = path
    return out


def build_ledger(
    flags_paths: Sequence[Path],
    raw_dir: Path,
    out_path: Path,
    settings: LedgerSettings,
    *,
    months: Sequence[str],
) -> LedgerSummary:
    """Rebuild the ledger from all its inputs and write it atomically to ``out_path``.

    Args:
        flags_paths: the flag GeoPackages, one ``<month>.gpkg`` per month of ``months`` (others ignored).
        raw_dir: the raw input folder (``ledger/cases.gpkg``, ``layers/permits.gpkg``,
            ``layers/streets.gpkg``, ``field_updates/<YYYY-MM>.csv``; each may be absent).
        out_path: the ledger GeoPackage to write (layers ``events``, ``cases``, ``alerts``).
        settings: ``ledger`` section of params.yaml.
        months: the flag months to include, ``YYYY-MM``.

    Returns:
        A :class:`LedgerSummary` of what was written.

    Raises:
        ConfigError: a month is malformed or repeated.
        MissingInputError: a month's flags file is missing.
        CRSError, CRSMismatchError: an input has no CRS or another CRS than the flags.
        LedgerError: an input row is invalid (the message names file and row).
        IllegalTransitionError: a field update its case's state does not allow.
    """
    raw_dir, out_path = Path(raw_dir), Path(out_path)
    try:
        months = sorted(check_month(m) for m in months)
    except ValueError as exc:
        raise ConfigError(f"build_ledger months: {exc}") from None
    if len(set(months)) != len(months):
        raise ConfigError(f"build_ledger months {months!r} lists a month twice; list each once")

    # Read and check every input before any event is made.
    paths = _flag_paths(flags_paths, months)
    flags = {m: read_flags(p, m) for m, p in paths.items()}
    crs: CRS | None = None
    for m, frame in flags.items():
        crs = check_crs(frame, paths[m], crs)
    seeds_path, permits_path = raw_dir / "ledger" / "cases.gpkg", raw_dir / "layers" / "permits.gpkg"
    seeds = read_seed_cases(seeds_path)
    permits = read_permits(permits_path)
    areas, areas_path = read_areas(raw_dir / "layers")
    for frame, path in ((seeds, seeds_path), (permits, permits_path), (areas, areas_path)):
        if frame is not None:
            crs = check_crs(frame, path, crs)
    if crs is None:
        raise MissingInputError(
            f"{raw_dir}: no flags and no seed ledger, so the ledger has no CRS; give at least one month of flags"
        )
    field_files = field_update_files(raw_dir / "field_updates")
    updates = {m: read_field_updates(p, m, f"field_updates/{p.name}") for m, p in field_files.items()}
    if permits is None:
        permits = gpd.GeoDataFrame({"permit_id": [], "valid_from": [], "valid_to": []}, geometry=[], crs=crs)

    builder = _Builder(settings, areas)
    if seeds is not None:
        builder.seed(seeds, seeds_path)
    for month in sorted(set(months) | set(updates)):
        if month in flags:
            builder.imagery(month, flags[month], permits, paths[month])
        if month in updates:
            builder.field(updates[month])
        builder.evaluate_alerts(month)
    events, cases, alerts = builder.frames(crs)
    write_ledger(out_path, events, cases, alerts)

    states = {s: int((cases["state"] == s).sum()) for s in STATES}
    summary = LedgerSummary(
        out_path=out_path,
        n_cases=len(cases),
        n_events=len(events),
        n_alerts=len(alerts),
        states=states,
        new_cases_by_month={m: builder.new_by_month[m] for m in months},
        permitted_by_month={m: builder.permitted_by_month[m] for m in months},
    )
    log.info(
        "ledger: %d cases (%s), %d events, %d alerts",
        summary.n_cases,
        ", ".join(f"{s} {n}" for s, n in states.items() if n),
        summary.n_events,
        summary.n_alerts,
    )
    return summary


def fold_state(events: pd.DataFrame) -> str:
    """Return the state of one case folded from its events (a frame with ``kind``, optionally ``seq``).

    Args:
        events: the events of a single case, e.g. ``events[events.case_id == "SW-202603-0001"]`` from
            :func:`pipeline.ledger.read_ledger`; sorted by ``seq`` when present.

    Raises:
        ValueError: the events belong to several cases, or none opens a case.
        IllegalTransitionError: the events hold an illegal transition.
    """
    if "case_id" in events.columns and events["case_id"].nunique() > 1:
        raise ValueError(f"fold_state takes the events of one case, got {sorted(events['case_id'].unique())!r}")
    ordered = events.sort_values("seq", kind="stable") if "seq" in events.columns else events
    case_id = str(events["case_id"].iloc[0]) if "case_id" in events.columns and len(events) else "?"
    return fold_kinds((str(k) for k in ordered["kind"]), case_id=case_id)
