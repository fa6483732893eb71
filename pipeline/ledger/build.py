"""Build the scar ledger (台账) from seed cases, monthly flags, permits and inspectors' field updates.

Processing order (the log order, ``seq``):

1. Seed cases, in file order. Each becomes the shortest legal run of events that reaches its seed
   state (:func:`pipeline.ledger.lifecycle.seed_path`), all dated ``opened_at``, source ``seed``.
2. Month by month over the flag months and the months that have a field-update file (so an update
   filed for a month without imagery is never lost):

   a. ``new`` flags by ``flag_id``: an observation on a matching case (``observed_present``,
      ``expanded``, ``rebuilt``, the last after ``reopened`` at a demolished, repaired or closed case;
      see :mod:`pipeline.ledger.matching`); else, inside a valid permit, a
      case that is opened and at once dismissed (``flagged`` then ``dismissed`` with source ``permit``,
      evidence ``layers/permits.gpkg:<permit_id>``, the case's ``permit_id`` set), so permitted
      construction is on record and counted apart; else a new case in state ``warning``. Its id is the
      one the live ledger's registry gave the flag, else ``SW-<YYYYMM>-<nnnn>``, the next number (in
      flag-id order) that no case ever had (seed, field and retired ids included): ids never move;
   b. ``removed`` flags by ``flag_id``: ``observed_removed`` on every matching case;
   c. the month's field updates, from all its files, by date then a stable key of their content
      (:func:`pipeline.ledger.fieldio.order_updates`), a repeated finding once; an illegal transition
      raises IllegalTransitionError.
   After a. and b., every case that entered ``warning`` this month (not one opened inside a permit) is
   dispatched (派单): a ``dispatched`` event, source ``dispatch``, dated like the imagery, naming the
   responsible unit of ``layers/grid.gpkg`` (or the street office, the district squad:
   :mod:`pipeline.ledger.grid`) and the field check's due date ``ledger.dispatch_due_days`` working days on;
   d. Alerts are evaluated at the end of the month (see :mod:`pipeline.ledger.alerts`); a case whose field
   check is overdue (``check_overdue``) is dispatched again, dated the month's last day. A dispatch the live
   ledger holds keeps its unit and due date (a redrawn grid or a changed param applies to new dispatches only).

Everything is read and checked first and the ledger is built in memory; it replaces the live ledger only
when it keeps every live event and case unchanged (:mod:`pipeline.ledger.record`) and all of it
succeeded, atomically, so an error or a refusal leaves the previous ledger as it was.
:func:`rebuild_ledger` replays the same way and proves the result equals the live ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pandas as pd
from pyproj import CRS

from pipeline.config import LedgerSettings, check_month
from pipeline.errors import ConfigError, MissingInputError
from pipeline.ledger import record
from pipeline.ledger.alerts import ALERT_TEXT as ALERT_TEXT  # re-exported: the old home of the alert texts
from pipeline.ledger.builder import LedgerBuilder
from pipeline.ledger.fieldio import FIELD_DIR, FieldUpdate, field_update_files, order_updates, read_field_updates
from pipeline.ledger.grid import LAYER_FILES, UnitLayers
from pipeline.ledger.lifecycle import STATES, fold_kinds
from pipeline.ledger.record import Live
from pipeline.ledger.store import (
    check_crs,
    read_areas,
    read_flags,
    read_ledger,
    read_permits,
    read_seed_cases,
    write_ledger,
)

log = logging.getLogger(__name__)


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
    n_added: int = 0  # events not in the live ledger before this run


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


@dataclass(frozen=True)
class _Inputs:
    """Every input of the ledger, read and checked."""

    months: list[str]
    flags: dict[str, gpd.GeoDataFrame]
    flag_paths: dict[str, Path]
    seeds: gpd.GeoDataFrame | None
    seeds_path: Path
    permits: gpd.GeoDataFrame
    areas: gpd.GeoDataFrame | None
    updates: dict[str, list[FieldUpdate]]
    files: list[Path]
    crs: CRS
    units: UnitLayers | None = None


def _read_inputs(flags_paths: Sequence[Path], raw_dir: Path, months: Sequence[str]) -> _Inputs:
    """Read and check every input before any event is made."""
    try:
        months = sorted(check_month(m) for m in months)
    except ValueError as exc:
        raise ConfigError(f"build_ledger months: {exc}") from None
    if len(set(months)) != len(months):
        raise ConfigError(f"build_ledger months {months!r} lists a month twice; list each once")
    if not raw_dir.is_dir():
        raise MissingInputError(
            f"{raw_dir}: the raw input folder (paths.raw in params.yaml) does not exist; fix paths.raw"
        )
    paths = _flag_paths(flags_paths, months)
    flags = {m: read_flags(p, m) for m, p in paths.items()}
    crs: CRS | None = None
    for m, frame in flags.items():
        crs = check_crs(frame, paths[m], crs)
    seeds_path, permits_path = raw_dir / "ledger" / "cases.gpkg", raw_dir / "layers" / "permits.gpkg"
    if not seeds_path.exists():
        log.warning(
            "%s: no seed ledger (%s); starting without seed cases",
            seeds_path,
            "no ledger/ folder" if not seeds_path.parent.is_dir() else "the folder has no cases.gpkg",
        )
    if not (raw_dir / "layers").is_dir():
        log.warning("%s: no layers/ folder: no permits (no flag is treated as permitted), no districts", raw_dir)
    seeds = read_seed_cases(seeds_path)
    permits = read_permits(permits_path)
    areas, areas_path = read_areas(raw_dir / "layers")
    units = UnitLayers.load(raw_dir / "layers") if (raw_dir / "layers").is_dir() else None
    unit_frames = [(f, units.path(n)) for n, f in units.frames.items()] if units is not None else []
    for frame, path in ((seeds, seeds_path), (permits, permits_path), (areas, areas_path), *unit_frames):
        if frame is not None:
            crs = check_crs(frame, path, crs)
    if crs is None:
        raise MissingInputError(
            f"{raw_dir}: no flags and no seed ledger, so the ledger has no CRS; give at least one month of flags"
        )
    field_files = field_update_files(raw_dir / FIELD_DIR)
    updates = {
        m: order_updates(u for p in ps for u in read_field_updates(p, m, f"{FIELD_DIR}/{p.name}", crs=crs))
        for m, ps in field_files.items()
    }
    if permits is None:
        permits = gpd.GeoDataFrame({"permit_id": [], "valid_from": [], "valid_to": []}, geometry=[], crs=crs)
    files = [*paths.values(), *(p for ps in field_files.values() for p in ps)]
    layer_files = [raw_dir / "layers" / name for name in LAYER_FILES.values()]
    files += [p for p in dict.fromkeys((seeds_path, permits_path, areas_path, *layer_files)) if p.is_file()]
    return _Inputs(months, flags, paths, seeds, seeds_path, permits, areas, updates, files, crs, units)


def _live_dispatches(live: Live) -> dict[tuple[str, str], dict[str, str]]:
    """The live ledger's ``dispatched`` events by (case, date): unit, note, evidence, due date, month."""
    events = live.events
    if events.empty or "kind" not in events.columns:
        return {}
    rows = events[events["kind"] == "dispatched"]
    cols = ("actor", "note", "evidence", "deadline", "month")
    return {
        (str(r["case_id"]), str(r["at"])[:10]): {c: "" if pd.isna(r[c]) else str(r[c]) for c in cols}
        for _, r in rows.iterrows()
    }


def _replay(inputs: _Inputs, settings: LedgerSettings, live: Live) -> LedgerBuilder:
    """Fold every input, in the processing order, into a fresh in-memory ledger."""
    builder = LedgerBuilder(
        settings,
        inputs.areas,
        registry=live.registry,
        reserved=live.reserved,
        units=inputs.units,
        dispatched=_live_dispatches(live),
    )
    if inputs.seeds is not None:
        builder.seed(inputs.seeds, inputs.seeds_path)
    builder.seeded()
    for month in sorted(set(inputs.months) | set(inputs.updates)):
        if month in inputs.flags:
            builder.imagery(month, inputs.flags[month], inputs.permits, inputs.flag_paths[month])
            builder.dispatch_new(month)
        if month in inputs.updates:
            builder.field(inputs.updates[month])
        builder.evaluate_alerts(month)
        builder.redispatch(month)
    return builder


def _input_log(inputs: _Inputs) -> dict[str, str]:
    """Every input file by its SHA-256, for the audit log."""
    return {str(p): record.file_digest(p) for p in inputs.files}


def build_ledger(
    flags_paths: Sequence[Path],
    raw_dir: Path,
    out_path: Path,
    settings: LedgerSettings,
    *,
    months: Sequence[str],
    allow_shrink: str | None = None,
) -> LedgerSummary:
    """Replay all the ledger's inputs, check the result keeps the live ledger whole, and write it atomically.

    The live ledger at ``out_path`` (if any) is the record: every one of its events must come out of the
    replay unchanged and every case must remain, else the run is refused (:mod:`pipeline.ledger.record`);
    case ids come from its registry. Each run appends a line to the audit log beside it.

    Args:
        flags_paths: the flag GeoPackages, one ``<month>.gpkg`` per month of ``months`` (others ignored).
        raw_dir: the raw input folder (``ledger/cases.gpkg``, ``layers/permits.gpkg``,
            ``layers/streets.gpkg``, ``field_updates/<YYYY-MM>[_<tag>].csv|.xlsx``; each may be absent, with a
            warning).
        out_path: the ledger GeoPackage (layers ``events``, ``cases``, ``alerts``, ``registry``).
        settings: ``ledger`` section of params.yaml.
        months: the flag months to include, ``YYYY-MM``.
        allow_shrink: a reason; lets the run lose or change live events (recorded in the audit log).

    Returns:
        A :class:`LedgerSummary` of what was written.

    Raises:
        ConfigError: a month is malformed or repeated.
        MissingInputError: a month's flags file or the raw folder is missing.
        CRSError, CRSMismatchError: an input has no CRS or another CRS than the flags.
        LedgerError: an input row is invalid (the message names file and row).
        IllegalTransitionError: a field update its case's state does not allow.
        LedgerShrinkError: the run would lose or change live events (and ``allow_shrink`` is not given).
    """
    raw_dir, out_path = Path(raw_dir), Path(out_path)
    if allow_shrink is not None and not allow_shrink.strip():
        raise ConfigError("--allow-shrink needs a reason (it is recorded in the ledger's audit log); give one")
    with record.exclusive(out_path):
        inputs = _read_inputs(flags_paths, raw_dir, months)
        live = record.read_live(out_path)
        builder = _replay(inputs, settings, live)
        events, cases, alerts = builder.frames(inputs.crs)
        d = record.diff(live, events, cases)
        if not d.ok and allow_shrink is None:
            raise record.refusal(d, ledger_path=out_path, months=inputs.months, raw_dir=raw_dir)
        registry = record.merged_registry(live, events)
        write_ledger(out_path, events, cases, alerts, registry)
        entry: dict[str, object] = {
            "command": "build",
            "months": inputs.months,
            "events": len(events),
            "cases": len(cases),
            "added": d.added,
            "inputs": _input_log(inputs),
        }
        if not d.ok:
            entry.update(
                allow_shrink=allow_shrink,
                lost_events=d.lost["event_id"].tolist() if not d.lost.empty else [],
                lost_cases=d.lost_cases,
                changed_events=[e for e, _ in d.changed],
            )
            log.warning(
                "ledger: --allow-shrink %r: %d events and %d cases lost, %d events changed (recorded in %s)",
                allow_shrink,
                len(d.lost),
                len(d.lost_cases),
                len(d.changed),
                record.log_path(out_path),
            )
        record.append_log(out_path, entry)

    states = {s: int((cases["state"] == s).sum()) for s in STATES}
    summary = LedgerSummary(
        out_path=out_path,
        n_cases=len(cases),
        n_events=len(events),
        n_alerts=len(alerts),
        states=states,
        new_cases_by_month={m: builder.new_by_month[m] for m in inputs.months},
        permitted_by_month={m: builder.permitted_by_month[m] for m in inputs.months},
        n_added=d.added,
    )
    log.info(
        "ledger: %d cases (%s), %d events (%d new), %d alerts",
        summary.n_cases,
        ", ".join(f"{s} {n}" for s, n in states.items() if n),
        summary.n_events,
        summary.n_added,
        summary.n_alerts,
    )
    return summary


@dataclass(frozen=True)
class RebuildSummary:
    """What :func:`rebuild_ledger` found."""

    ledger_path: Path
    n_events: int
    n_cases: int
    equal: bool
    differences: list[str]


def rebuild_ledger(
    flags_paths: Sequence[Path],
    raw_dir: Path,
    ledger_path: Path,
    settings: LedgerSettings,
    *,
    months: Sequence[str],
    out_path: Path | None = None,
) -> RebuildSummary:
    """Replay every input into a fresh ledger and compare it with the live one (which is never written).

    The fresh ledger takes case ids from the live registry (ids are part of the record, not derived);
    everything else (events in log order, ``seq`` included, cases and their state) must be equal. The
    result is appended to the audit log; ``out_path`` also writes the fresh ledger there.

    Raises:
        MissingInputError: there is no live ledger to compare with.
        the errors of :func:`build_ledger` for bad inputs.
    """
    raw_dir, ledger_path = Path(raw_dir), Path(ledger_path)
    if not ledger_path.is_file():
        raise MissingInputError(f"{ledger_path}: no live ledger to rebuild; run `scarwatch ledger build` first")
    with record.exclusive(ledger_path):
        inputs = _read_inputs(flags_paths, raw_dir, months)
        live = record.read_live(ledger_path)
        events, cases, alerts = _replay(inputs, settings, live).frames(inputs.crs)
        _, live_cases, _ = read_ledger(ledger_path)
        diffs = _differences(live.events, events, live_cases, cases)
        if out_path is not None:
            write_ledger(Path(out_path), events, cases, alerts, record.merged_registry(live, events))
        record.append_log(
            ledger_path,
            {
                "command": "rebuild",
                "months": inputs.months,
                "events": len(events),
                "cases": len(cases),
                "equal": not diffs,
                "differences": diffs[:20],
                "inputs": _input_log(inputs),
            },
        )
    return RebuildSummary(ledger_path, len(events), len(cases), not diffs, diffs)


def _differences(
    live_events: pd.DataFrame, events: pd.DataFrame, live_cases: pd.DataFrame, cases: pd.DataFrame
) -> list[str]:
    """Every way the fresh ledger differs from the live one (empty when equal)."""
    out: list[str] = []
    a, b = live_events.set_index("event_id"), events.set_index("event_id")
    out += [f"event {e} is only in the live ledger" for e in a.index.difference(b.index)]
    out += [f"event {e} is only in the rebuild" for e in b.index.difference(a.index)]
    both = a.index.intersection(b.index)
    for col in ("seq", *record.COMPARED_COLUMNS):
        x, y = a.loc[both, col].map(str), b.loc[both, col].map(str)
        out += [f"event {e}: {col} {x[e]!r} in the live ledger, {y[e]!r} in the rebuild" for e in both[x != y]]
    ca, cb = live_cases.set_index("case_id"), cases.set_index("case_id")
    out += [f"case {c} is only in the live ledger" for c in ca.index.difference(cb.index)]
    out += [f"case {c} is only in the rebuild" for c in cb.index.difference(ca.index)]
    common = ca.index.intersection(cb.index)
    for col in ("state", "deadline", "n_events", "first_month", "permit_id"):
        x, y = ca.loc[common, col].map(str), cb.loc[common, col].map(str)
        out += [f"case {c}: {col} {x[c]!r} in the live ledger, {y[c]!r} in the rebuild" for c in common[x != y]]
    return out


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
