"""``scarwatch ledger import FILE``: check an inspector's field-update file against the live ledger, then record it.

1. The file is read and checked on its own (:func:`pipeline.ledger.fieldio.read_field_file`: encoding,
   headers, kinds, dates, the month, deadlines, positions), then against the live ledger
   (:func:`check_against_ledger`): unknown case ids, points that match no case or several, and the
   lifecycle: each row must be allowed by the state its case has at that point (the live ledger's events
   up to the file's month, then the month's field updates by date, the file's own earlier rows included),
   and the case's later events must stay allowed. Every problem is collected; any one refuses the file and
   nothing is written.
2. **The month** of the file is ``--month``, else the ``YYYY-MM`` its name starts with, else the month of
   its rows' dates (which must then all fall in one month). Every row must be dated in it. A month after
   the last imagery month is applied after it (a warning says so); its rows are never dropped.
3. The file is copied, byte for byte and atomically, into ``<raw>/field_updates/`` as
   ``<YYYY-MM>_<UTC time>_<first 8 hex digits of its SHA-256>.<ext>`` (so later imports sort later, and a
   replay, ``scarwatch ledger rebuild``, reads it like any other field-update file), and the ledger build
   (:func:`pipeline.ledger.build_ledger`, under the ledger's lock) appends its events.
4. **Idempotent.** A file whose content is already in the folder (any name) is not copied again, and rows
   whose finding is already in the ledger (the same case, date, kind, actor, note and deadline: the same
   rows in another file, name or encoding) add no event. A run killed between the copy and the build
   leaves a valid input in the folder: importing again (or any build) completes it. A build that fails
   removes the copy again, unless the ledger already holds its events.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import pandas as pd
import shapely
from pyproj import CRS

from pipeline.config import LedgerSettings, check_month
from pipeline.errors import ConfigError, IllegalTransitionError, InputError, MissingInputError
from pipeline.fileio import atomic_path, remove_stale_temps
from pipeline.ledger.build import build_ledger
from pipeline.ledger.events import FIELD_OPENING_KINDS, LIFECYCLE_KINDS
from pipeline.ledger.fieldio import (
    FIELD_DIR,
    SUFFIXES,
    FieldFile,
    FieldUpdate,
    FieldUpdateProblems,
    Problem,
    month_of_name,
    order_updates,
    read_field_file,
)
from pipeline.ledger.lifecycle import TRANSITIONS, apply
from pipeline.ledger.matching import FootprintIndex
from pipeline.ledger.record import file_digest
from pipeline.ledger.store import read_ledger

log = logging.getLogger(__name__)

STALE_RE = re.compile(r"^\.(?P<stem>.+?)\.\d+-[0-9a-f]+\.tmp(?P<suffix>\.[A-Za-z]+)$")


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_field_file` found and did."""

    path: Path
    month: str
    encoding: str
    sheet: str
    new_events: dict[str, int]  # kind -> events the file adds (a case found in the field adds 'flagged' too)
    not_checked: int  # rows without finding and date, skipped
    already: int  # rows whose finding the ledger already holds
    repeats: int  # rows repeating an earlier row of the file
    dry_run: bool
    copy: Path | None = None  # the file in field_updates/ (None: dry run, or nothing to add)
    copied: bool = False  # False when the same content was already there
    n_added: int = 0  # events the build added
    ahead_of: str = ""  # the last imagery month, when the file's month is later


@dataclass
class _Fold:
    """One case's state while the file is checked."""

    state: str | None
    later: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, month, evidence) after the file
    last_row: tuple[str, int] | None = None  # (where, row) of the file's last row on the case


_Step = tuple[str, FieldUpdate | None, tuple[str, str, str]]  # case, the file's row (None: live), (at, kind, where)


def _fold_live(events: pd.DataFrame, month: str) -> tuple[dict[str, _Fold], list[_Step]]:
    """Fold the live ledger up to ``month``'s field updates.

    Returns each case's state then, with its later events, and the month's live field events (which the
    file's rows interleave with, by date).
    """
    folds: dict[str, _Fold] = {}
    same_month: list[_Step] = []
    if events.empty:
        return folds, same_month
    ordered = events.sort_values("seq", kind="stable")
    for e in ordered.itertuples(index=False):
        case_id, kind, ev_month = str(e.case_id), str(e.kind), str(e.month)
        fold = folds.setdefault(case_id, _Fold(None))
        if ev_month > month:
            fold.later.append((kind, ev_month, str(e.evidence)))
        elif ev_month == month and str(e.source) == "field" and kind in LIFECYCLE_KINDS:
            same_month.append((case_id, None, (str(e.at), kind, str(e.evidence))))
        else:
            fold.state = _replayed(fold.state, kind)
    return folds, same_month


def _replayed(state: str | None, kind: str) -> str | None:
    """The state after a live event of ``kind`` (the live ledger was built legal).

    Kinds the lifecycle does not fold (observations, administrative events) leave the state as it is.
    """
    try:
        return apply(state, kind)
    except IllegalTransitionError:
        return state


def check_against_ledger(
    ff: FieldFile, events: pd.DataFrame, cases: gpd.GeoDataFrame, settings: LedgerSettings
) -> tuple[list[Problem], Counter[str], int]:
    """Check a read field-update file against the live ledger's ``events`` and ``cases``.

    Returns:
        Every problem (file, row, what, fix), the new events by kind, and the number of rows whose
        finding the ledger already holds.
    """
    month = ff.month or ""
    problems: list[Problem] = []
    new: Counter[str] = Counter()
    index = FootprintIndex()
    for c in cases.itertuples(index=False):
        geom = c.geometry
        if geom is not None and not geom.is_empty:
            index.put(str(c.case_id), geom, str(c.state))
    known = set(cases["case_id"].astype(str)) if len(cases) else set()
    facts: set[tuple[str, ...]] = set()
    if not events.empty:
        field_events = events[events["source"] == "field"]
        facts = {
            (str(r.case_id), str(r.at), str(r.kind), str(r.actor), str(r.note), str(r.deadline))
            for r in field_events.itertuples(index=False)
        }
    folds, same_month = _fold_live(events, month)
    already = 0
    d = settings.match_distance_m
    steps: list[_Step] = list(same_month)
    for u in order_updates(ff.updates):
        where = f"{ff.path}{f' sheet {ff.sheet!r}' if ff.sheet else ''} row {u.row}"
        case_id = u.case_id
        if case_id:
            if case_id not in known:
                problems.append(
                    Problem(where, f"case {case_id!r} is not in the live ledger; fix the case_id (案件编号)", u.row)
                )
                continue
        else:
            assert u.x is not None and u.y is not None
            hits = index.locate(u.x, u.y, d)
            if len(hits) > 1:
                problems.append(
                    Problem(
                        where,
                        f"the point is ambiguous: cases {', '.join(hits)} lie within {d:g} m; give case_id",
                        u.row,
                    )
                )
                continue
            if hits:
                case_id = hits[0]
            elif u.kind in FIELD_OPENING_KINDS:
                case_id = f"(found in the field at x={u.x:.0f}, y={u.y:.0f})"
                folds[case_id] = _Fold("warning")
                index.put(case_id, shapely.Point(u.x, u.y).buffer(settings.field_radius_m), "warning")
                new["flagged"] += 1
            else:
                problems.append(
                    Problem(
                        where,
                        f"no case lies within {d:g} m of the point (x={u.x:.2f}, y={u.y:.2f}); give case_id, fix the "
                        "position, or report 'confirmed' (确认) there first to open a case found in the field",
                        u.row,
                    )
                )
                continue
        if (case_id, u.at, u.kind, u.actor, u.note, u.deadline) in facts:
            already += 1
            continue
        steps.append((case_id, u, (u.at, u.kind, where)))
    steps.sort(key=lambda s: (s[2][0], LIFECYCLE_KINDS.index(s[2][1]) if s[2][1] in LIFECYCLE_KINDS else 99))
    for case_id, row, (_, kind, where) in steps:
        fold = folds.setdefault(case_id, _Fold(None))
        allowed = TRANSITIONS.get(fold.state, {})
        if kind in allowed:
            fold.state = allowed[kind]
            if row is not None:
                fold.last_row = (where, row.row)
                new[kind] += 1
        elif row is None:
            if fold.last_row:
                problems.append(
                    Problem(
                        fold.last_row[0],
                        f"after this row case {case_id} is in state {fold.state!r}, which makes the ledger's "
                        f"{kind!r} of {where} illegal; fix the kind or the date",
                        fold.last_row[1],
                    )
                )
        else:
            current = "not opened yet" if fold.state is None else f"in state {fold.state!r}"
            problems.append(
                Problem(
                    where,
                    f"case {case_id} is {current} at {row.at}; {kind!r} is not allowed (allowed: "
                    f"{', '.join(allowed) or 'none'}); fix the kind or record the missing steps first",
                    row.row,
                )
            )
    for case_id, fold in folds.items():
        if not fold.last_row:
            continue
        for kind, ev_month, evidence in fold.later:
            allowed = TRANSITIONS.get(fold.state, {})
            if kind not in LIFECYCLE_KINDS:
                fold.state = _replayed(fold.state, kind)
                continue
            if kind not in allowed:
                problems.append(
                    Problem(
                        fold.last_row[0],
                        f"after this row case {case_id} is in state {fold.state!r}, which makes its later event "
                        f"{kind!r} of {ev_month} ({evidence}) illegal; fix the kind or import it into a later month",
                        fold.last_row[1],
                    )
                )
                break
            fold.state = allowed[kind]
    return problems, new, already


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _same_content(field_dir: Path, digest: str, size: int) -> Path | None:
    if not field_dir.is_dir():
        return None
    for p in sorted(field_dir.iterdir()):
        candidate = p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")
        if candidate and p.stat().st_size == size and file_digest(p) == digest:
            return p
    return None


def _clear_stale(field_dir: Path) -> None:
    """Remove the temporary copies that killed imports left (their names are of a kind ``atomic_path`` makes)."""
    if not field_dir.is_dir():
        return
    for p in field_dir.iterdir():
        m = STALE_RE.match(p.name)
        if m:
            for gone in remove_stale_temps(field_dir / f"{m['stem']}{m['suffix']}"):
                log.info("removed %s, left by a killed import", gone)


def _copy_in(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` byte for byte, atomically (a temporary file beside it, then a rename)."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _file_month(path: Path, month: str | None) -> str | None:
    if month is not None:
        try:
            return check_month(month)
        except ValueError as exc:
            raise ConfigError(f"--month {month!r}: {exc}") from None
    return month_of_name(path.name)


def import_field_file(
    path: Path,
    *,
    flags_paths: Sequence[Path],
    raw_dir: Path,
    ledger_path: Path,
    settings: LedgerSettings,
    months: Sequence[str],
    month: str | None = None,
    dry_run: bool = False,
) -> ImportSummary:
    """Check ``path`` against the live ledger; unless ``dry_run``, copy it in and append its events.

    The copy goes into the field-update folder, the events come from the ledger build; the rules are in
    the module docstring.

    Raises:
        MissingInputError: the file or the live ledger does not exist.
        InputError: the file is not .csv/.xlsx, or holds no rows.
        CorruptFileError: the file cannot be read.
        FieldUpdateProblems: the file has problems (every one is in ``.problems``); nothing was written.
        the errors of :func:`pipeline.ledger.build_ledger`.
    """
    path, raw_dir, ledger_path = Path(path), Path(raw_dir), Path(ledger_path)
    if not path.is_file():
        raise MissingInputError(f"{path}: not found; give the path of the field-update file (.csv or .xlsx)")
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"{path}: a field-update file is .csv or .xlsx; save it as one of those (Excel: Save As)")
    if not ledger_path.is_file():
        raise MissingInputError(f"{ledger_path}: no live ledger to import into; run `scarwatch ledger build` first")
    events, cases, _ = read_ledger(ledger_path)
    crs = CRS.from_user_input(cases.crs if cases.crs is not None else events.crs)
    bound = _file_month(path, month)
    ff = read_field_file(path, source=f"{FIELD_DIR}/{path.name}", month=bound, crs=crs)
    if any(p.row == 0 for p in ff.problems):  # the header or the month: the rows cannot be checked further
        raise FieldUpdateProblems(ff.problems)
    if ff.n_rows == 0:
        raise InputError(f"{path}: holds no rows under its header; nothing to import")
    problems, new, already = check_against_ledger(ff, events, cases, settings)
    problems = sorted([*ff.problems, *problems], key=lambda p: p.row)  # every problem, in row order
    if problems:
        raise FieldUpdateProblems(problems)
    file_month = ff.month or ""
    last = max(months) if months else ""
    ahead = last if file_month and last and file_month > last else ""
    if ahead:
        log.warning(
            "%s: its month %s is after the last imagery month %s: its rows are applied after %s's imagery now "
            "(and after the imagery of the months between, once they are run)",
            path,
            file_month,
            last,
            last,
        )
    summary = ImportSummary(
        path, file_month, ff.encoding, ff.sheet, dict(new), ff.not_checked, already, ff.repeats, dry_run, ahead_of=ahead
    )
    field_dir = raw_dir / FIELD_DIR
    digest = file_digest(path)
    existing = _same_content(field_dir, digest, path.stat().st_size)
    if dry_run or not new:  # nothing new: the ledger already holds every row (or none is checked yet)
        return summary
    _clear_stale(field_dir)
    dest = existing or field_dir / f"{file_month}_{_stamp()}_{digest[:8]}{path.suffix.lower()}"
    if existing is None:
        _copy_in(path, dest)
        log.info("%s: copied to %s", path, dest)
    try:
        built = build_ledger(flags_paths, raw_dir, ledger_path, settings, months=months)
    except BaseException:
        if existing is None and not _holds_events_of(ledger_path, dest):
            dest.unlink(missing_ok=True)  # nothing of a refused import stays in the folder
        raise
    return ImportSummary(
        path,
        file_month,
        ff.encoding,
        ff.sheet,
        dict(new),
        ff.not_checked,
        already,
        ff.repeats,
        False,
        copy=dest,
        copied=existing is None,
        n_added=built.n_added,
        ahead_of=ahead,
    )


def _holds_events_of(ledger_path: Path, copy: Path) -> bool:
    """Whether the live ledger already holds events from ``copy`` (then the copy is part of the record)."""
    try:
        events, _, _ = read_ledger(ledger_path)
    except Exception:  # noqa: BLE001 - an unreadable ledger holds nothing we could lose by removing the copy
        return False
    prefix = f"{FIELD_DIR}/{copy.name}:"
    return bool(events["evidence"].astype(str).str.startswith(prefix).any()) if len(events) else False
