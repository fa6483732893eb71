"""Reading the ledger's inputs and reading/writing the ledger GeoPackage (atomically).

Inputs (see docs/architecture.md): flags ``<processed>/flags/<month>.gpkg`` layer ``flags``; the seed
ledger ``<raw>/ledger/cases.gpkg`` layer ``cases``; permits ``<raw>/layers/permits.gpkg``. The seed ledger and
permits may be absent (then they are empty); flags may not. GeoPackage features count from 1 in messages.
Inspectors' field updates are read by :mod:`pipeline.ledger.fieldio`.

The ledger ``<processed>/ledger.gpkg`` has layers ``events``, ``cases`` and ``alerts``. It is written
to a temporary file beside the target and moved over it with :func:`os.replace`, so a failed build
leaves the previous ledger intact and readers never see half a ledger.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyarrow as pa
import shapely
from pyproj import CRS

from pipeline.errors import (
    CRSError,
    CRSMismatchError,
    LedgerError,
    MissingInputError,
    ScarWatchError,
)
from pipeline.fileio import atomic_path, read_layer
from pipeline.ledger.events import parse_date
from pipeline.ledger.fieldio import FieldUpdate as FieldUpdate  # re-exported: they lived here before fieldio
from pipeline.ledger.fieldio import field_update_files as field_update_files
from pipeline.ledger.fieldio import read_field_updates as read_field_updates

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
