"""The ledger as a store of record: the live ledger is compared with every run before it is replaced.

The ``ledger`` stage replays its inputs (seed cases, every month's flags, permits, field updates) into a
ledger in memory; this module decides whether that ledger may replace the live one:

- **No loss.** Every event of the live ledger must be in the new one with the same content (compared by
  ``event_id`` on every column but ``seq``; geometries to a millimetre), and every live case must still
  be there. Otherwise the run is refused with one line naming the inputs that went missing or changed
  (months of flags, field-update files, the seed ledger, the permits) and how to proceed:
  restore them, or ``scarwatch ledger build --allow-shrink REASON``, which is recorded in the audit log.
- **Case ids once.** The ``registry`` layer of the ledger holds every case id ever assigned and what opened
  it (``opened_by``: a flag id, a ``field_updates/<file>:<row>`` or ``seed``). A replay gives a case
  opened by the same evidence the same id; a new case takes the next number that no case in the
  registry ever had, so ids never move and never collide (retired ids stay reserved).
- **Audit log.** Every build and rebuild appends one JSON line to ``<ledger>.log.jsonl`` beside the
  ledger (``ledger.log.jsonl``): when, who, what was run, the counts, the inputs' SHA-256, events added and
  lost, and the ``--allow-shrink`` reason. The log is not a DVC output: DVC never removes or restores it.
- **One writer.** A build holds an exclusive lock (``flock`` on the ledger's folder) from reading the live
  ledger to replacing it, so two concurrent runs cannot each keep what the other lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import pandas as pd
import shapely

from pipeline.errors import LedgerError, ScarWatchError
from pipeline.fileio import read_layer
from pipeline.ledger.events import EVENT_COLUMNS

log = logging.getLogger(__name__)

REGISTRY_LAYER = "registry"
REGISTRY_COLUMNS: tuple[str, ...] = ("case_id", "opened_by", "month")
SEED_OPENER = "seed"
COMPARED_COLUMNS: tuple[str, ...] = tuple(c for c in EVENT_COLUMNS if c not in ("event_id", "seq"))
"""Event columns that must not change between runs (``seq`` may: a late field update is replayed in place)."""
GEOM_TOLERANCE_M = 1e-3


class LedgerShrinkError(LedgerError):
    """A run would lose events or cases of the live ledger, or change an existing event."""


def log_path(ledger_path: Path) -> Path:
    """The audit log beside the ledger: ``ledger.gpkg`` -> ``ledger.log.jsonl``."""
    return Path(ledger_path).with_suffix(".log.jsonl")


@dataclass(frozen=True)
class Live:
    """What the live ledger holds (empty when there is none yet)."""

    events: pd.DataFrame
    case_ids: frozenset[str]
    registry: dict[str, str]  # opened_by -> case_id (every id ever assigned)
    registry_frame: pd.DataFrame = field(repr=False)

    @property
    def reserved(self) -> frozenset[str]:
        """Every case id ever assigned."""
        return frozenset(self.registry.values()) | self.case_ids


def _empty_registry() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in REGISTRY_COLUMNS})


def registry_from_events(events: pd.DataFrame) -> pd.DataFrame:
    """Derive the registry from an event log (ledgers written before the registry layer existed)."""
    if events.empty:
        return _empty_registry()
    first = events.sort_values("seq", kind="stable").drop_duplicates("case_id")
    opened_by = [
        SEED_OPENER if s == "seed" else str(e) for s, e in zip(first["source"], first["evidence"], strict=True)
    ]
    return pd.DataFrame({"case_id": first["case_id"].astype(str), "opened_by": opened_by, "month": first["month"]})


def read_live(ledger_path: Path) -> Live:
    """Read the live ledger's events, case ids and registry; an absent ledger is an empty one.

    Raises:
        CorruptFileError: the ledger exists but cannot be read (it is never silently replaced).
    """
    from pipeline.ledger.store import LAYERS, LEDGER_FIX, read_ledger_layer

    ledger_path = Path(ledger_path)
    if not ledger_path.exists():
        return Live(pd.DataFrame(), frozenset(), {}, _empty_registry())
    fix = "restore it from your backup, or move it away to start a new ledger (its events would be lost); " + LEDGER_FIX
    events = read_ledger_layer(ledger_path, LAYERS[0], what="the live ledger", fix=fix)  # dates as ISO text
    cases = read_ledger_layer(ledger_path, LAYERS[1], what="the live ledger", fix=fix)
    import pyogrio

    names = [str(n) for n in pyogrio.list_layers(ledger_path)[:, 0]]
    if REGISTRY_LAYER in names:
        reg = pd.DataFrame(read_layer(ledger_path, REGISTRY_LAYER, what="the live ledger", fix=fix))
        reg = reg[[c for c in REGISTRY_COLUMNS]].astype(str)
    else:
        reg = registry_from_events(events)
    derived = registry_from_events(events)
    reg = pd.concat([reg, derived[~derived["case_id"].isin(reg["case_id"])]], ignore_index=True)
    registry = dict(zip(reg["opened_by"], reg["case_id"], strict=True))
    registry.pop(SEED_OPENER, None)  # seed ids come from the seed file itself
    return Live(events, frozenset(cases["case_id"].astype(str)), registry, reg.reset_index(drop=True))


def merged_registry(live: Live, events: pd.DataFrame) -> gpd.GeoDataFrame:
    """The registry to write: every id the live registry had (retired ones too) plus the new cases."""
    new = registry_from_events(events)
    reg = pd.concat([live.registry_frame, new[~new["case_id"].isin(live.registry_frame["case_id"])]], ignore_index=True)
    reg = reg.sort_values("case_id", kind="stable").reset_index(drop=True)
    return gpd.GeoDataFrame(reg, geometry=gpd.GeoSeries([None] * len(reg), crs=events.crs), crs=events.crs)


@dataclass(frozen=True)
class Diff:
    """How a new ledger differs from the live one."""

    lost: pd.DataFrame  # live events missing from the new ledger
    changed: list[tuple[str, str]]  # (event_id, what changed)
    lost_cases: list[str]
    added: int

    @property
    def ok(self) -> bool:
        """Nothing lost or changed."""
        return self.lost.empty and not self.changed and not self.lost_cases


def diff(live: Live, new_events: pd.DataFrame, new_cases: pd.DataFrame) -> Diff:
    """Compare the live ledger with a replayed one."""
    if live.events.empty:
        return Diff(pd.DataFrame(), [], [], len(new_events))
    old = live.events.set_index("event_id", drop=False)
    new = new_events.set_index("event_id", drop=False)
    lost = old[~old.index.isin(new.index)]
    both = old.index[old.index.isin(new.index)]
    changed: list[tuple[str, str]] = []
    for col in COMPARED_COLUMNS:
        if col not in old.columns:
            continue
        a = old.loc[both, col].map(_norm)
        b = new.loc[both, col].map(_norm)
        for eid in both[(a != b).to_numpy()]:
            changed.append((str(eid), f"{col} {a[eid]!r} -> {b[eid]!r}"))
    ga, gb = old.loc[both].geometry, new.loc[both].geometry
    same = shapely.equals_exact(ga.to_numpy(), gb.to_numpy(), tolerance=GEOM_TOLERANCE_M) | (ga.isna() & gb.isna())
    for eid in both[~same.to_numpy()]:
        changed.append((str(eid), "geometry"))
    lost_cases = sorted(live.case_ids - set(new_cases["case_id"].astype(str)))
    added = int((~new.index.isin(old.index)).sum())
    return Diff(lost.reset_index(drop=True), changed, lost_cases, added)


def _norm(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value).strip()


def missing_inputs(lost: pd.DataFrame, months: list[str], raw_dir: Path) -> list[str]:
    """Name the inputs that the lost events came from (what went missing or changed)."""
    if lost.empty:
        return []
    out: list[str] = []
    imagery = sorted(set(lost.loc[lost["source"] == "imagery", "month"].astype(str)))
    gone = [m for m in imagery if m not in months]
    if gone:
        out.append(f"months {', '.join(gone)} (not in params.yaml 'months')")
    if len(gone) < len(imagery):
        out.append(f"flags of {', '.join(m for m in imagery if m in months)} (re-vectorized or changed)")
    field_files = sorted({str(e).rsplit(":", 1)[0] for e in lost.loc[lost["source"] == "field", "evidence"]})
    for f in field_files:
        state = "changed" if (raw_dir / f).exists() else "missing"
        out.append(f"{raw_dir / f} ({state})")
    if (lost["source"] == "seed").any():
        out.append(f"{raw_dir / 'ledger' / 'cases.gpkg'} (seed cases missing or changed)")
    if (lost["source"] == "permit").any():
        out.append(f"{raw_dir / 'layers' / 'permits.gpkg'} (permits missing or changed)")
    return out


def refusal(d: Diff, *, ledger_path: Path, months: list[str], raw_dir: Path) -> LedgerShrinkError:
    """The one-line refusal of a run that would lose or change events."""
    parts = []
    if not d.lost.empty:
        parts.append(f"lose {len(d.lost)} events")
    if d.lost_cases:
        parts.append(f"{len(d.lost_cases)} cases (e.g. {', '.join(d.lost_cases[:3])})")
    if d.changed:
        eid, what = d.changed[0]
        parts.append(f"change {len(d.changed)} existing events (e.g. {eid}: {what})")
    inputs = missing_inputs(d.lost, months, raw_dir)
    why = f"inputs missing or changed: {'; '.join(inputs)}" if inputs else "the inputs changed"
    return LedgerShrinkError(
        f"{ledger_path}: refused: this run would {' and '.join(parts)} of the live ledger ({why}); restore the "
        f'inputs and run again, or, if the loss is intended, `scarwatch ledger build --allow-shrink "REASON"` '
        f"(recorded in {log_path(ledger_path)})"
    )


def file_digest(path: Path) -> str:
    """SHA-256 of a file (the audit log names each input by content)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def append_log(ledger_path: Path, entry: dict[str, object]) -> None:
    """Append one JSON line to the audit log (O_APPEND, fsync'd).

    Raises:
        ScarWatchError: the log cannot be written.
    """
    path = log_path(ledger_path)
    line = json.dumps(
        {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "user": _user(), **entry},
        ensure_ascii=False,
        sort_keys=True,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ScarWatchError(f"{path}: cannot append to the ledger's audit log ({exc}); check free space") from exc


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - no passwd entry
        return str(os.getuid())


@contextlib.contextmanager
def exclusive(ledger_path: Path) -> Iterator[None]:
    """Hold the ledger's lock (``flock`` on its folder); a second run waits for the first to finish."""
    folder = Path(ledger_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another ledger run holds the lock; waiting for it", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
