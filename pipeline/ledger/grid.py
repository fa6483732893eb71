"""The unit responsible for a place: the 网格 responsibility grid, else the street office, else the district.

:func:`assign_units` (contract C1 of issue 12) gives each geometry the 网格 cell of ``layers/grid.gpkg``
(``cell_id``, ``unit``) under its representative point; outside the grid the street office of
``layers/streets.gpkg`` (``<street>街道办``), then the district squad of ``layers/districts.gpkg``
(``<district>城管中队``). ``district`` and ``street`` come from those layers wherever they cover the point.
A missing layer is allowed (one WARNING naming the file); a bad one (unreadable, no CRS, a missing column,
another CRS than the geometries') is one error naming the file and the fix. The joins are spatial-index
joins (:func:`geopandas.sjoin`), never a loop over polygons, so a city-scale grid stays fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from pyproj import CRS

from pipeline.errors import CRSMismatchError
from pipeline.fileio import read_layer

log = logging.getLogger(__name__)

UNIT_COLUMNS: tuple[str, ...] = ("cell_id", "unit", "street", "district", "unit_source")
UNIT_SOURCES: tuple[str, ...] = ("grid", "street", "district", "none")
"""``unit_source``: which layer named the unit (``none``: the point lies in no polygon of any layer)."""

LAYER_FILES: dict[str, str] = {"grid": "grid.gpkg", "street": "streets.gpkg", "district": "districts.gpkg"}
_COLUMNS: dict[str, tuple[str, ...]] = {
    "grid": ("cell_id", "unit"),
    "street": ("street", "district"),
    "district": ("district",),
}
_FIX: dict[str, str] = {
    "grid": "fix layers/grid.gpkg: 网格 polygons with 'cell_id' and 'unit', in the ledger's CRS",
    "street": "fix layers/streets.gpkg: polygons with 'street' and 'district', in the ledger's CRS",
    "district": "fix layers/districts.gpkg: polygons with 'district', in the ledger's CRS",
}


def street_office(street: str) -> str:
    """The fallback unit of a street (街道): its office, ``<street>街道办`` (``X街道`` → ``X街道办``)."""
    street = street.strip()
    if not street:
        return ""
    return f"{street}办" if street.endswith("街道") else f"{street}街道办"


def district_squad(district: str) -> str:
    """The fallback unit of a district: its city-management squad, ``<district>城管中队``."""
    district = district.strip()
    return f"{district}城管中队" if district else ""


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value).strip()


@dataclass(frozen=True)
class UnitLayers:
    """The grid, street and district polygons of a ``layers/`` folder, read and checked once.

    ``frames[name]`` is None where that layer's file is absent (warned once, when loaded).
    """

    layers_dir: Path
    frames: dict[str, gpd.GeoDataFrame | None]

    @classmethod
    def load(cls, layers_dir: Path) -> UnitLayers:
        """Read ``grid.gpkg``, ``streets.gpkg`` and ``districts.gpkg`` from ``layers_dir`` (each may be absent).

        Raises:
            CorruptFileError, InputError, CRSError: a layer file that exists but is unreadable, lacks a
                column or has no CRS (the message names the file and the fix).
        """
        layers_dir = Path(layers_dir)
        frames: dict[str, gpd.GeoDataFrame | None] = {}
        for name, file in LAYER_FILES.items():
            path = layers_dir / file
            if not path.exists():
                log.warning("%s: not found; units fall back past the %s layer", path, name)
                frames[name] = None
                continue
            what = f"the {name} layer (dispatch units)"
            frame = read_layer(path, None, what=what, fix=_FIX[name], columns=_COLUMNS[name])
            frame = frame[~(frame.geometry.isna() | frame.geometry.is_empty)]
            keep = {c: frame[c].map(_text) for c in _COLUMNS[name]}
            frames[name] = gpd.GeoDataFrame(keep, geometry=frame.geometry.values, crs=frame.crs).reset_index(drop=True)
        return cls(layers_dir, frames)

    def path(self, name: str) -> Path:
        """The file of layer ``name`` (``grid``, ``street``, ``district``)."""
        return self.layers_dir / LAYER_FILES[name]

    def assign(self, geoms: gpd.GeoSeries) -> pd.DataFrame:
        """:func:`assign_units` with these layers."""
        out = pd.DataFrame({c: [""] * len(geoms) for c in UNIT_COLUMNS}, index=geoms.index)
        out["unit_source"] = "none"
        if not len(geoms):
            return out
        present = ~(geoms.isna() | geoms.is_empty)
        points = gpd.GeoDataFrame(
            {"_pos": range(int(present.sum()))},
            geometry=geoms[present].representative_point().values,
            crs=geoms.crs,
        )
        found: dict[str, pd.DataFrame] = {}
        for name in LAYER_FILES:
            layer = self.frames.get(name)
            if layer is None or not len(points):
                continue
            theirs = CRS.from_user_input(layer.crs)
            if geoms.crs is not None and not theirs.equals(CRS.from_user_input(geoms.crs)):  # never reprojects
                ours = CRS.from_user_input(geoms.crs).to_string()
                raise CRSMismatchError(
                    f"{self.path(name)}: CRS {theirs.to_string()!r} differs from the cases' CRS {ours!r}; "
                    f"reproject the layer to it ({_FIX[name]})"
                )
            joined = gpd.sjoin(points, layer, how="inner", predicate="intersects")
            joined = joined.sort_values(["_pos", "index_right"]).drop_duplicates("_pos")  # on an edge: first
            found[name] = joined.set_index("_pos")[list(_COLUMNS[name])]
        n = len(points)

        def column(name: str, col: str) -> pd.Series:
            frame = found.get(name)
            if frame is None:
                return pd.Series([""] * n, index=range(n), dtype=object)
            return frame[col].reindex(range(n)).fillna("").astype(str)

        cell, grid_unit = column("grid", "cell_id"), column("grid", "unit")
        street = column("street", "street")
        district = column("district", "district").where(lambda d: d != "", column("street", "district"))
        in_grid, in_street, in_district = grid_unit != "", street != "", district != ""
        unit = grid_unit.where(in_grid, street.map(street_office).where(in_street, district.map(district_squad)))
        source = pd.Series("none", index=range(n), dtype=object)
        source[in_district] = "district"
        source[in_street] = "street"
        source[in_grid] = "grid"
        picked = pd.DataFrame(
            {
                "cell_id": cell.where(in_grid, ""),
                "unit": unit,
                "street": street,
                "district": district,
                "unit_source": source,
            }
        )
        rows = np.flatnonzero(present.to_numpy())  # positions: ``geoms`` may repeat an index label
        for j, col in enumerate(UNIT_COLUMNS):  # ``out``'s columns are UNIT_COLUMNS, in order
            out.iloc[rows, j] = picked[col].to_numpy()
        return out


def assign_units(geoms: gpd.GeoSeries, layers_dir: Path) -> pd.DataFrame:
    """The responsible unit of each geometry (contract C1).

    Args:
        geoms: case footprints (or any geometries) in the CRS of the layers.
        layers_dir: the ``layers/`` folder with ``grid.gpkg``, ``streets.gpkg``, ``districts.gpkg``.

    Returns:
        A frame aligned with ``geoms``' index: ``cell_id`` (the 网格 cell, "" outside the grid), ``unit``
        (the cell's unit, else ``<street>街道办``, else ``<district>城管中队``, else ""), ``street``,
        ``district`` (from those layers, "" where none covers the point) and ``unit_source``
        (``grid`` | ``street`` | ``district`` | ``none``), all taken at each geometry's representative point.

    Raises:
        CorruptFileError, InputError, CRSError, CRSMismatchError: a layer that exists but cannot be used.
    """
    return UnitLayers.load(layers_dir).assign(geoms)
