"""Reading the ledger's inputs and reading/writing the ledger GeoPackage (atomically).

Inputs (see docs/architecture.md): flags ``<processed>/flags/<month>.gpkg`` layer ``flags``; the seed
ledger ``<raw>/ledger/cases.gpkg`` layer ``cases``; permits ``<raw>/layers/permits.gpkg``; inspectors'
updates ``<raw>/field_updates/<YYYY-MM>.csv``. The seed ledger, permits and field updates may be
absent (then they are empty); flags may not. Row numbers in messages count like a spreadsheet: the CSV
header is row 1, so the first update is row 2; GeoPackage features count from 1.

The ledger ``<processed>/ledger.gpkg`` has layers ``events``, ``cases`` and ``alerts``. It is written
to a temporary file beside the target and moved over it with :func:`os.replace`, so a failed build
leaves the previous ledger intact and readers never see half a ledger.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyarrow as pa
import shapely
from pyproj import CRS

from pipeline.errors import (
    CorruptFileError,
    CRSError,
    CRSMismatchError,
    LedgerError,
    MissingInputError,
    ScarWatchError,
)
from pipeline.fileio import atomic_path, read_layer
from pipeline.ledger.events import EVENT_KINDS, FIELD_KINDS, check_month_name, parse_date

log = logging.getLogger(__name__)

LAYERS: tuple[str, str, str] = ("events", "cases", "alerts")
FLAG_COLUMNS: tuple[str, ...] = (
    "flag_id",
    "month",
    "kind",
    "area_m2",
    "area_mu",
    "p_mean",
    "p_max",
    "lon",
    "lat",
    "district",
    "street",
)
SEED_COLUMNS: tuple[str, ...] = ("case_id", "opened_at", "state", "category", "note", "deadline")
PERMIT_COLUMNS: tuple[str, ...] = ("permit_id", "valid_from", "valid_to")

LEDGER_FIX = "run the 'ledger' stage (`scarwatch ledger build` or `dvc repro ledger`)"
"""What rebuilds the ledger GeoPackage, said in every error about it."""
SEED_FIX = "fix the seed ledger: a GeoPackage with layer 'cases' and columns " + ", ".join(SEED_COLUMNS)
PERMIT_FIX = "fix the permits: one polygon layer with columns " + ", ".join(PERMIT_COLUMNS)
AREAS_FIX = "fix the layer: polygons with 'district' (and 'street' in streets.gpkg)"


@dataclass(frozen=True, slots=True)
class FieldUpdate:
    """One validated row of a field-update CSV (the case is resolved later, against the ledger)."""

    source: str  # the file as named in evidence, relative to raw_dir: field_updates/2026-03.csv
    path: Path
    row: int
    month: str
    at: str
    kind: str
    actor: str
    note: str
    deadline: str
    case_id: str
    x: float | None
    y: float | None

    @property
    def where(self) -> str:
        """The file and row, for messages."""
        return f"{self.path} row {self.row}"

    @property
    def evidence(self) -> str:
        """The ``file:row`` evidence of the event this update becomes."""
        return f"{self.source}:{self.row}"


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], path: Path, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LedgerError(f"{path}: {what} lacks columns {missing!r} (has {list(frame.columns)!r}); add them")


def _text(value: object) -> str:
    """A cell as stripped text ("" for None/NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def check_crs(frame: gpd.GeoDataFrame, path: Path, crs: CRS | None) -> CRS:
    """Return the CRS of ``frame``; raise when it has none or differs from ``crs`` (never reprojects).

    Raises:
        CRSError: the layer has no CRS.
        CRSMismatchError: the layer's CRS differs from ``crs``.
    """
    if frame.crs is None:
        raise CRSError(f"{path}: layer has no CRS; set it (e.g. with ogr2ogr -a_srs) to the flags' CRS")
    if crs is not None and not CRS.from_user_input(frame.crs).equals(crs):
        raise CRSMismatchError(
            f"{path}: CRS {frame.crs.to_string()!r} differs from the flags' CRS {crs.to_string()!r}; "
            "reproject the file to the flags' CRS"
        )
    return CRS.from_user_input(frame.crs)


def read_flags(path: Path, month: str) -> gpd.GeoDataFrame:
    """Read a month's flags (layer ``flags``), sorted by ``flag_id``.

    Raises:
        MissingInputError: the file does not exist.
        CorruptFileError: it cannot be read or has no ``flags`` layer.
        InputError: a column is missing.
        LedgerError: a kind is unknown or a row belongs to another month.
        CRSError: the layer has no CRS.
    """
    flags = read_layer(
        path,
        "flags",
        what=f"flags of {month}",
        fix=f"run `scarwatch vectorize --month {month}`",
        columns=FLAG_COLUMNS,
    )
    flags = flags.assign(
        flag_id=flags["flag_id"].map(_text), month=flags["month"].map(_text), kind=flags["kind"].map(_text)
    )
    for col in ("district", "street"):
        flags[col] = flags[col].map(_text)
    bad_kind = flags.index[~flags["kind"].isin(["new", "removed"])]
    if len(bad_kind):
        i = int(bad_kind[0])
        raise LedgerError(
            f"{path} feature {i + 1}: kind {flags.at[i, 'kind']!r} is neither 'new' nor 'removed'; fix it"
        )
    other = flags.index[flags["month"] != month]
    if len(other):
        i = int(other[0])
        raise LedgerError(
            f"{path} feature {i + 1}: month {flags.at[i, 'month']!r} but the file is for {month}; "
            "re-run vectorize for that month"
        )
    empty = flags.index[flags.geometry.isna() | flags.geometry.is_empty]
    if len(empty):
        raise LedgerError(f"{path} feature {int(empty[0]) + 1}: flag has no geometry; re-run vectorize")
    dupes = flags["flag_id"][flags["flag_id"].duplicated()]
    if len(dupes):
        raise LedgerError(f"{path}: flag_id {dupes.iloc[0]!r} occurs more than once; re-run vectorize")
    return flags.sort_values("flag_id", kind="stable").reset_index(drop=True)


def read_seed_cases(path: Path) -> gpd.GeoDataFrame | None:
    """Read the seed ledger (layer ``cases``), or return None when the file is absent.

    Columns are checked here; values (states, dates) are checked where events are made from them.
    """
    if not path.exists():
        log.info("no seed ledger at %s: starting from an empty ledger", path)
        return None
    seeds = read_layer(path, "cases", what="the seed ledger", fix=SEED_FIX, columns=SEED_COLUMNS)
    return seeds.reset_index(drop=True)


def read_permits(path: Path) -> gpd.GeoDataFrame | None:
    """Read the permits (first layer) with ISO-normalised ``valid_from``/``valid_to``; None when absent.

    Raises:
        InputError: a column is missing.
        LedgerError: a date is not ISO.
    """
    if not path.exists():
        log.info("no permits at %s: no flag is treated as permitted", path)
        return None
    permits = read_layer(path, what="permits", fix=PERMIT_FIX, columns=PERMIT_COLUMNS)
    permits = permits.reset_index(drop=True)
    rows = [
        (
            _text(r.permit_id),
            parse_date(r.valid_from, f"{path} feature {i + 1}", "valid_from", required=False),
            parse_date(r.valid_to, f"{path} feature {i + 1}", "valid_to", required=False),
        )
        for i, r in enumerate(permits.itertuples(index=False))
    ]
    out = gpd.GeoDataFrame(
        pd.DataFrame(rows, columns=["permit_id", "valid_from", "valid_to"]),
        geometry=permits.geometry.values,
        crs=permits.crs,
    )
    return out[~(out.geometry.isna() | out.geometry.is_empty)].reset_index(drop=True)


def read_areas(layers_dir: Path) -> tuple[gpd.GeoDataFrame | None, Path]:
    """Read street polygons (``streets.gpkg``: street, district), else districts.

    Returns:
        The polygons with ``district`` and ``street`` ("" for districts), or None when neither file
        exists, and the path they came from.
    """
    for name, cols in (("streets.gpkg", ("street", "district")), ("districts.gpkg", ("district",))):
        path = layers_dir / name
        if path.exists():
            areas = read_layer(path, what=f"{path.stem} outlines", fix=AREAS_FIX, columns=cols)
            keep = gpd.GeoDataFrame(
                {
                    "district": areas["district"].map(_text),
                    "street": areas["street"].map(_text) if "street" in areas else "",
                },
                geometry=areas.geometry.values,
                crs=areas.crs,
            )
            return keep, path
    return None, layers_dir / "streets.gpkg"


def field_update_files(field_dir: Path) -> dict[str, Path]:
    """Return ``{month: path}`` of the field-update CSVs (``<YYYY-MM>.csv``) in ``field_dir``.

    Raises:
        LedgerError: a CSV there is not named after a month (its updates would otherwise be lost).
    """
    if not field_dir.exists():
        log.warning("%s: no field-update folder; no field updates are applied", field_dir)
        return {}
    if not field_dir.is_dir():
        raise LedgerError(f"{field_dir}: is not a folder; field updates go in a folder of <YYYY-MM>.csv files")
    out: dict[str, Path] = {}
    for path in sorted(field_dir.iterdir()):
        if path.name.startswith((".", "~$")):  # editor lock and hidden files
            log.debug("skipping %s", path)
            continue
        if path.suffix.lower() in (".xlsx", ".xls", ".ods"):
            raise LedgerError(
                f"{path}: field updates must be CSV; save the sheet as 'CSV UTF-8' named {path.stem}.csv "
                "and remove this file"
            )
        if path.suffix != ".csv":
            hint = f"rename it {path.stem}.csv" if path.suffix.lower() == ".csv" else "move it out of the folder"
            raise LedgerError(f"{path}: not a field-update file (<YYYY-MM>.csv, lower-case .csv); {hint}")
        if not path.is_file():
            raise LedgerError(f"{path}: not a readable file (a folder, or a link to nothing); replace it with the CSV")
        out[check_month_name(path.stem, f"{path}: field updates must be named <YYYY-MM>.csv; file name")] = path
    return out


def read_field_updates(path: Path, month: str, source: str) -> list[FieldUpdate]:
    """Read and validate one month's field updates (every row, before any event is made).

    Args:
        path: the CSV (UTF-8, a BOM is accepted).
        month: the month the file is named after; every ``at`` must fall in it.
        source: the file as evidence names it (``field_updates/2026-03.csv``).

    Raises:
        CorruptFileError: the file cannot be parsed as CSV.
        LedgerError: a column is missing, or a row has an unknown kind, a bad date, an ``ordered``
            without deadline, or neither ``case_id`` nor ``x``,``y`` (the message names file and row).
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", skip_blank_lines=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not a readable UTF-8 CSV ({exc}); re-export it as CSV UTF-8") from exc
    except pd.errors.EmptyDataError:
        log.warning("%s is empty: no field updates for %s (if they were lost, restore the file)", path, month)
        return []
    table.columns = [str(c).strip() for c in table.columns]
    _require_columns(table, ("at", "kind"), path, "field updates")
    has_xy = "x" in table.columns and "y" in table.columns
    if "case_id" not in table.columns and not has_xy:
        raise LedgerError(f"{path}: field updates need a 'case_id' column or 'x' and 'y' columns; add them")
    if table.empty:
        log.warning("%s holds a header but no rows: no field updates for %s", path, month)
        return []
    start, end = f"{month}-01", f"{month}-31"
    updates: list[FieldUpdate] = []
    seen: dict[tuple[object, ...], int] = {}
    for i, rec in enumerate(table.to_dict("records")):
        row = i + 2
        where = f"{path} row {row}"
        cell = {k: _text(v) for k, v in rec.items()}
        kind = cell["kind"]
        if kind not in FIELD_KINDS:
            hint = " (imagery observations come from flags)" if kind in EVENT_KINDS else ""
            raise LedgerError(
                f"{where}: kind {kind!r} is not a field update kind{hint}; use one of {', '.join(FIELD_KINDS)}"
            )
        at = parse_date(cell["at"], where, "at")
        if not start <= at <= end:
            raise LedgerError(f"{where}: at {at} is outside {month}; move the row to field_updates/{at[:7]}.csv")
        deadline = parse_date(cell.get("deadline", ""), where, "deadline", required=kind == "ordered")
        if deadline and deadline < at:
            raise LedgerError(f"{where}: deadline {deadline} is before at {at}; fix the deadline")
        x = y = None
        if not cell.get("case_id") and has_xy and (cell["x"] or cell["y"]):
            try:
                x, y = float(cell["x"]), float(cell["y"])
            except ValueError:
                raise LedgerError(
                    f"{where}: x {cell['x']!r}, y {cell['y']!r} are not numbers; give map coordinates"
                ) from None
            if not (math.isfinite(x) and math.isfinite(y)):
                raise LedgerError(f"{where}: x, y must be finite map coordinates; fix them")
        elif not cell.get("case_id"):
            raise LedgerError(f"{where}: neither case_id nor x,y is given; give the case id or its map coordinates")
        key = (cell.get("case_id", ""), x, y, at, kind, cell.get("actor", ""), cell.get("note", ""), deadline)
        if key in seen:  # the same fact twice (a pasted row): one event, the first row's
            log.warning("%s: repeats row %d; applied once", where, seen[key])
            continue
        seen[key] = row
        updates.append(
            FieldUpdate(
                source=source,
                path=path,
                row=row,
                month=month,
                at=at,
                kind=kind,
                actor=cell.get("actor", ""),
                note=cell.get("note", ""),
                deadline=deadline,
                case_id=cell.get("case_id", ""),
                x=x,
                y=y,
            )
        )
    return updates


DATE_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("at", "deadline"),
    "cases": ("opened_at", "last_event_at", "deadline"),
}
"""The ledger's date columns by layer: stored as GeoPackage ``DATE`` fields, read back as ISO text ("" if null)."""
GEOMETRY_TYPE = "MultiPolygon"
"""The one geometry type of every spatial ledger layer (a Polygon is stored as a one-part MultiPolygon)."""


def _date(value: object) -> dt.date | None:
    """An ISO-text date, a date or a timestamp as a date; None for "", None, NaN and NaT."""
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, dt.datetime):  # pandas.Timestamp included
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    return dt.date.fromisoformat(text[:10]) if text else None


def typed_dates(values: pd.Series) -> pd.Series:
    """Dates (ISO text, "" as null; or already dates) as Arrow ``date32``, which pyogrio stores as ``DATE``."""
    return pd.Series(
        [_date(v) for v in values],
        index=values.index,
        dtype=pd.ArrowDtype(pa.date32()),  # DATE even when every value is null
    )


def _as_stored(frame: gpd.GeoDataFrame, layer: str) -> gpd.GeoDataFrame:
    """The layer as written: its :data:`DATE_COLUMNS` typed (:func:`typed_dates`)."""
    out = frame.copy()
    for col in DATE_COLUMNS.get(layer, ()):
        if col in out.columns:
            out[col] = typed_dates(out[col])
    return out


def as_recorded(frame: gpd.GeoDataFrame, layer: str) -> gpd.GeoDataFrame:
    """A ledger layer as the pipeline compares and folds it: the inverse of what :func:`write_ledger` stores.

    Date fields come back as ``YYYY-MM-DD`` text ("" for null) and one-part MultiPolygons as the
    Polygons the ledger built, so an event read back equals the same event replayed (the store of
    record compares them, :mod:`pipeline.ledger.record`). Ledgers written before dates were typed
    (text dates, mixed geometry types) read the same.
    """
    out = frame.copy()
    for col in DATE_COLUMNS.get(layer, ()):
        if col in out.columns and pd.api.types.is_datetime64_any_dtype(out[col]):
            out[col] = out[col].dt.strftime("%Y-%m-%d").astype(object).where(out[col].notna(), "")
    if isinstance(out, gpd.GeoDataFrame) and out.geometry.name in out.columns and len(out):
        geoms = out.geometry.to_numpy()
        single = (shapely.get_type_id(geoms) == shapely.GeometryType.MULTIPOLYGON) & (
            shapely.get_num_geometries(geoms) == 1
        )
        if single.any():
            geoms = geoms.copy()
            geoms[single] = shapely.get_geometry(geoms[single], 0)
            out = out.set_geometry(gpd.GeoSeries(geoms, index=out.index, crs=out.crs))
    return out


def read_ledger_layer(
    path: Path, layer: str, *, what: str = "the ledger", fix: str = LEDGER_FIX, columns: tuple[str, ...] = ()
) -> gpd.GeoDataFrame:
    """Read one layer of a ledger GeoPackage (:func:`pipeline.fileio.read_layer`) as recorded (:func:`as_recorded`)."""
    return as_recorded(read_layer(path, layer, what=what, fix=fix, columns=columns), layer)


def write_polygon_layer(path: Path, layer: str, frame: gpd.GeoDataFrame, *, description: str = "") -> None:
    """Write one polygon layer to a GeoPackage as MultiPolygon (:data:`GEOMETRY_TYPE`), Arrow date columns as DATE.

    pyogrio's Arrow writer is used because it stores ``date32`` columns (:func:`typed_dates`) as ``DATE``
    fields, where the row-wise writer makes TEXT.
    """
    frame.to_file(
        path,
        layer=layer,
        driver="GPKG",
        engine="pyogrio",
        geometry_type=GEOMETRY_TYPE,
        promote_to_multi=True,
        use_arrow=True,
        layer_options={"DESCRIPTION": description} if description else None,
    )


def write_ledger(
    out_path: Path,
    events: gpd.GeoDataFrame,
    cases: gpd.GeoDataFrame,
    alerts: gpd.GeoDataFrame,
    registry: gpd.GeoDataFrame | None = None,
) -> Path:
    """Write the layers to ``out_path`` atomically (temporary file, then :func:`os.replace`).

    ``events``, ``cases`` and ``alerts`` are written with one geometry type, MultiPolygon (so QGIS opens
    each as one layer, not a choice of sublayers), and their dates (:data:`DATE_COLUMNS`) as ``DATE``
    fields; :func:`read_ledger_layer` reads them back as the ISO text and Polygons the ledger built.
    ``registry`` (every case id ever assigned and what opened it, see :mod:`pipeline.ledger.record`) is
    the fourth layer when given (no geometries).

    Returns:
        ``out_path``.

    Raises:
        ScarWatchError: the file cannot be written (the previous ledger, if any, is left unchanged).
    """
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            for name, frame in zip(LAYERS, (events, cases, alerts), strict=True):
                write_polygon_layer(tmp, name, _as_stored(frame, name))
            if registry is not None:
                registry.to_file(
                    tmp,
                    layer="registry",
                    driver="GPKG",
                    engine="pyogrio",
                    geometry_type="Unknown",
                    promote_to_multi=False,
                )
    except (OSError, RuntimeError) as exc:  # pyogrio's errors are RuntimeErrors
        raise ScarWatchError(
            f"{out_path}: cannot write the ledger ({exc}); check free space and permissions "
            "(the previous ledger is unchanged)"
        ) from exc
    log.info("wrote ledger %s (%d events, %d cases, %d alerts)", out_path, len(events), len(cases), len(alerts))
    return out_path


def read_ledger(path: str | Path) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """Read a ledger written by :func:`pipeline.ledger.build_ledger`.

    Returns:
        ``(events, cases, alerts)``; events in log order (by ``seq``). Text columns hold "" when empty.

    Raises:
        MissingInputError: the ledger does not exist (run the ledger stage first).
        CorruptFileError: it cannot be read or lacks a layer.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: ledger not found; run `scarwatch ledger build` (or `dvc repro ledger`) first")
    frames = []
    for name in LAYERS:
        frame = read_ledger_layer(path, name)
        text = [
            c
            for c in frame.columns
            if c != frame.geometry.name
            and (pd.api.types.is_object_dtype(frame[c]) or pd.api.types.is_string_dtype(frame[c]))
        ]
        for col in text:
            frame[col] = frame[col].map(_text)
        frames.append(frame)
    events, cases, alerts = frames
    if "seq" in events.columns:
        events = events.sort_values("seq", kind="stable").reset_index(drop=True)
    return events, cases, alerts
