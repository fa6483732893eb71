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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pandas as pd
from pyproj import CRS

from pipeline.config import LedgerSettings, check_month
from pipeline.errors import ConfigError, MissingInputError
from pipeline.ledger.alerts import ALERT_TEXT as ALERT_TEXT  # re-exported: the old home of the alert texts
from pipeline.ledger.builder import LedgerBuilder
from pipeline.ledger.lifecycle import STATES, fold_kinds
from pipeline.ledger.store import (
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

    builder = LedgerBuilder(settings, areas)
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
