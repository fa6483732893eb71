"""Change probabilities -> flag polygons with attributes, merged across window borders.

:func:`vectorize_month` reads the probability COG of a month (``p_new``, ``p_removed``; uint8
``round(p * 254)``, 255 = nodata) window by window and writes the month's flags (GeoPackage layer
``flags`` and a GeoParquet twin), in the grid's CRS.

Per window (``window_px`` square) it reads ``halo_px`` of context on every side and, per kind:

1. **Hysteresis**: pixels above ``high`` seed objects that grow into connected pixels above ``low``
   (``skimage.filters.apply_hysteresis_threshold``); a weak blob with no strong pixel is dropped.
2. **Clean-up**: a 3x3 opening (removes specks and one-pixel bridges) and a 3x3 closing (closes
   one-pixel gaps); both leave axis-aligned rectangles unchanged.
3. **Cutting** (``split``, :func:`split_objects`): a blob that fills less than ``split_keep_fill`` of
   its minimum rotated rectangle, usually neighbouring houses grown into one, is cut at its necks (a
   watershed of the distance to the background); only objects that the window and its halo show whole
   are cut, each piece named by its marker's raster pixel.
4. **Polygons**: the window's core (halo dropped) is labelled (4-connectivity, one label per piece) and
   traced with ``rasterio.features.shapes``; per label the sum, count and maximum of ``p`` are kept.

Memory is bounded by one window plus its halo; objects connected through more than ``halo_px`` of
context beyond a window are outside that bound (a documented limit, not a silent one).

Then, per kind, parts that share an edge across window borders are unioned (``unary_union``) into one
object, its pixel statistics pooled (two pieces of one cut object stay two). An object whose mean
probability is below ``min_p_mean`` (default: the model's calibrated object threshold, COG tag
``object_threshold``; see :mod:`pipeline.model.calibrate`) is dropped: the network is often sure of a
shadow edge but not of a whole blob. A piece is kept or dropped with the whole object it was cut from.
Each object loses its holes, is dropped below ``min_area_m2``, is regularised or simplified, and slivers
narrower than ``sliver_m`` are dropped:

* **Regularisation** (``regularize``): when the polygon fills at least ``rect_fill`` of its minimum
  rotated rectangle (building-like), it is replaced by that rectangle scaled about its centroid to the
  polygon's area (orientation from the data, area preserved); otherwise it is simplified by
  ``simplify_m`` (Douglas-Peucker, topology preserved).

Attributes (the schema is in :mod:`pipeline.formats`): ``flag_id``
(``F<YYYYMM>-<N|R>-<8 hex of sha1(month, kind, geometry rounded to 0.1 m)>``, stable across runs),
``month``, ``kind``, ``area_m2``, ``area_mu`` (亩 = 10000/15 m² ≈ 666.67 m²), ``p_mean``, ``p_max``,
``lon``/``lat`` of the centroid in EPSG:4326, ``district`` and ``street`` of the polygon of
``layers_dir/districts.gpkg`` / ``streets.gpkg`` holding the centroid ('' when none).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.windows import Window
from scipy import ndimage
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from skimage import measure
from skimage.filters import apply_hysteresis_threshold
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from pipeline.config import VectorizeSettings, check_month
from pipeline.errors import ConfigError, CorruptFileError, CRSError, InputError, MissingInputError
from pipeline.fileio import atomic_paths, block_windows
from pipeline.formats import (
    FLAG_COLUMNS,
    FLAG_FLOAT_COLUMNS,
    FLAG_KINDS,
    FLAGS_LAYER,
    MU_M2,
    TAG_OBJECT_THRESHOLD,
    TAG_THRESHOLD,
    decode_probabilities,
    flag_id,
    tag_float,
)

log = logging.getLogger(__name__)

DEFAULT_HIGH = 0.6  # seed threshold when neither vectorize.high nor the probability COG says one
_FOOTPRINT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Piece:
    """A piece of a cut object: its marker's first pixel (row, col) in the raster, and the object it was cut from."""

    marker: tuple[int, int]
    parent: int  # the label of the whole object before the cut


@dataclass
class _Part:
    """A connected object found in one window's core, with its pixel statistics."""

    geom: BaseGeometry
    window: int
    p_sum: float
    n: int
    p_max: float
    on_seam: bool
    piece: tuple[int, int] | None = None  # a cut object's piece: its marker's (row, col) in the raster
    gate_mean: float | None = None  # a piece's: the mean probability of the whole object it was cut from


def resolve_thresholds(settings: VectorizeSettings, tags: dict[str, str]) -> VectorizeSettings:
    """Settings with a concrete ``high`` and ``min_p_mean``: params first, else the detector's calibration.

    The probability COG carries the thresholds the model was calibrated at (tags ``threshold`` and
    ``object_threshold``, see :mod:`pipeline.model.calibrate`); seeding and keeping objects there keeps vectorize
    consistent with the model card. ``low`` never exceeds ``high``; without a calibrated object threshold
    every seeded object is kept (``min_p_mean`` 0).
    """
    high = settings.high if settings.high is not None else tag_float(tags, TAG_THRESHOLD, DEFAULT_HIGH)
    min_p_mean = settings.min_p_mean if settings.min_p_mean is not None else tag_float(tags, TAG_OBJECT_THRESHOLD, 0.0)
    return settings.model_copy(update={"high": high, "low": min(settings.low, high), "min_p_mean": min_p_mean})


def clean_mask(p: np.ndarray, settings: VectorizeSettings) -> np.ndarray:
    """Hysteresis threshold then 3x3 opening and closing of a probability array (h, w) in [0, 1]."""
    assert settings.high is not None  # resolve_thresholds ran first
    mask = apply_hysteresis_threshold(p, settings.low, settings.high)
    mask = ndimage.binary_opening(mask, structure=_FOOTPRINT)
    padded = np.pad(mask, 1, mode="edge")  # so the closing does not erode objects at the array edge
    return np.asarray(ndimage.binary_closing(padded, structure=_FOOTPRINT)[1:-1, 1:-1])


def _fill(comp: np.ndarray) -> float:
    """Share of its minimum rotated rectangle that a pixel mask fills (pixel squares, not centres).

    The convex hull of the squares is that of the corners of each row's first and last pixel, so only
    those are handed to shapely (8 points a row instead of 4 a pixel).
    """
    rows = np.flatnonzero(comp.any(axis=1))
    n = int(comp.sum())
    if n < 3:
        return 1.0
    first = comp[rows].argmax(axis=1)
    last = comp.shape[1] - 1 - comp[rows, ::-1].argmax(axis=1)
    xs = np.concatenate([first - 0.5, first - 0.5, last + 0.5, last + 0.5])
    ys = np.concatenate([rows - 0.5, rows + 0.5, rows - 0.5, rows + 0.5])
    rect = shapely.minimum_rotated_rectangle(shapely.convex_hull(shapely.multipoints(np.stack([xs, ys], axis=1))))
    return float(n / max(rect.area, 1e-9))


def split_objects(
    labels: np.ndarray,
    settings: VectorizeSettings,
    *,
    origin: tuple[int, int] = (0, 0),
    open_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
) -> tuple[np.ndarray, dict[int, Piece]]:
    """Cut objects that are not one rectangle at their narrow necks (distance-transform watershed).

    Neighbouring houses grown into one blob are the largest loss at object level (the model card's
    object fates). An object of ``split_min_px`` pixels or more that fills less than ``split_keep_fill``
    of its minimum rotated rectangle (a long shed or a row of houses fills it well and stays whole) is
    flooded from the h-maxima of its distance to the background, h = max(``split_h_px``, ``split_h_rel``
    times its largest distance); with two markers or more and no piece under ``split_min_piece_px``,
    the pieces replace it. scikit-image gives the markers and the flooding; the gate is ours, because
    a plain watershed cuts long buildings at any dent of their outline.

    Args:
        labels: object labels (h, w), 0 the background.
        settings: ``vectorize`` settings (``split*``).
        origin: (row, col) of ``labels[0, 0]`` in the raster, so that pieces are named in raster pixels.
        open_edges: (top, bottom, left, right) edges of ``labels`` that are not the raster's: an object
            touching one may reach beyond what is seen here and is left whole.

    Returns:
        The labels with each cut object's pieces numbered after the existing labels (the first piece
        keeps the old label), and each piece's label with its :class:`Piece`.
    """
    pieces: dict[int, Piece] = {}
    if not settings.split:
        return labels, pieces
    out = labels.copy()
    nxt = int(labels.max()) + 1
    h, w = labels.shape
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        touches = (box[0].start == 0, box[0].stop == h, box[1].start == 0, box[1].stop == w)
        if any(t and o for t, o in zip(touches, open_edges, strict=True)):
            continue
        box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)  # a ring of background where there is one
        comp = labels[box] == lab
        n = int(comp.sum())
        if n < settings.split_min_px or _fill(comp) >= settings.split_keep_fill:
            continue
        edt = ndimage.distance_transform_edt(comp)  # an object cut by the raster's edge is not thinner there
        height = max(settings.split_h_px, settings.split_h_rel * float(edt.max()))
        # markers: the regional maxima of the h-maximum transform (the distance reconstructed from itself
        # lowered by h): one per dome that rises more than h above the saddle to any higher dome.
        # skimage.morphology.h_maxima marks every pixel standing h above that transform instead, which
        # splits one flat-topped ridge into several markers (a U-shaped building at its two corners).
        domes = reconstruction(np.maximum(edt - height, 0.0), edt, method="dilation")
        markers, k = ndimage.label(local_maxima(domes) & comp)
        if k < 2:
            continue
        flooded = watershed(-edt, markers, mask=comp)
        if np.bincount(flooded.ravel(), minlength=k + 1)[1:].min() < settings.split_min_piece_px:
            continue
        view = out[box]
        for j in range(1, k + 1):
            r, c = np.argwhere(markers == j)[0]
            piece = Piece((origin[0] + box[0].start + int(r), origin[1] + box[1].start + int(c)), lab)
            if j == 1:
                pieces[lab] = piece
            else:
                view[flooded == j] = nxt
                pieces[nxt] = piece
                nxt += 1
    return out, pieces


def gate_means(means: np.ndarray, labels_max: int, pieces: dict[int, Piece]) -> np.ndarray:
    """Per label of the cut labels (``labels_max`` the largest), the mean probability that keeps or drops it.

    ``means`` holds the whole objects' means (index 0 the background); a piece takes its parent's, so
    that it is kept or dropped with the object it was cut from.
    """
    out = np.concatenate([means, np.zeros(max(0, labels_max + 1 - len(means)))])
    for lab, piece in pieces.items():
        out[lab] = means[piece.parent]
    return out


def label_objects(mask: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objects of a mask: 4-connected labels (as ``shapes(connectivity=4)`` traces them), sums and counts.

    Returns ``(labels, sums, counts)``: each label's sum and pixel count of ``p`` (index 0 is the background).
    """
    labels, n = ndimage.label(mask)
    flat = labels.ravel()
    return labels, np.bincount(flat, weights=p.ravel(), minlength=n + 1), np.bincount(flat, minlength=n + 1)


def _core_objects(
    mask: np.ndarray,
    p: np.ndarray,
    rows: slice,
    cols: slice,
    origin: tuple[int, int],
    open_edges: tuple[bool, bool, bool, bool],
    settings: VectorizeSettings,
) -> tuple[np.ndarray, dict[int, tuple[tuple[int, int], float]]]:
    """Labels of a window's core, objects cut seen with the halo; per piece label its marker and gate mean.

    A piece is kept or dropped (``min_p_mean``) with the whole object it was cut from, whose mean is
    exact here: only objects that the window and its halo show whole are cut.
    """
    if not settings.split:
        return ndimage.label(mask[rows, cols])[0], {}
    whole = ndimage.label(mask)[0]
    full, pieces = split_objects(whole, settings, origin=origin, open_edges=open_edges)
    cut = full[rows, cols]
    if not pieces:
        return ndimage.label(cut > 0)[0], {}
    # the whole objects' means, over the window and its halo (exact: only objects seen whole are cut)
    flat = whole.ravel()
    means = np.bincount(flat, weights=p.ravel()) / np.maximum(np.bincount(flat), 1)
    gates = gate_means(means, int(full.max()), pieces)
    # a piece cropped to the core may fall apart, and pieces touch: one label per 4-connected run of one piece
    parts = measure.label(cut, background=0, connectivity=1)
    piece_of = np.zeros(int(parts.max()) + 1, np.int64)
    piece_of[parts.ravel()] = cut.ravel()
    return parts, {i: (pieces[v].marker, float(gates[v])) for i, v in enumerate(piece_of.tolist()) if v in pieces}


def _window_parts(ds: Any, core: Window, index: int, settings: VectorizeSettings) -> dict[str, list[_Part]]:
    """Objects of both kinds in one window's core (context read from the halo around it)."""
    halo = settings.halo_px
    r0, c0 = max(0, core.row_off - halo), max(0, core.col_off - halo)
    r1 = min(ds.height, core.row_off + core.height + halo)
    c1 = min(ds.width, core.col_off + core.width + halo)
    data = ds.read(window=Window(c0, r0, c1 - c0, r1 - r0))
    rows = slice(core.row_off - r0, core.row_off - r0 + core.height)
    cols = slice(core.col_off - c0, core.col_off - c0 + core.width)
    transform = ds.window_transform(core)
    seams = (
        core.row_off > 0,
        core.row_off + core.height < ds.height,
        core.col_off > 0,
        core.col_off + core.width < ds.width,
    )
    open_edges = (r0 > 0, r1 < ds.height, c0 > 0, c1 < ds.width)
    out: dict[str, list[_Part]] = {}
    for band, kind in enumerate(FLAG_KINDS):
        p = decode_probabilities(data[band])
        pc = p[rows, cols]
        labels, named = _core_objects(clean_mask(p, settings), p, rows, cols, (r0, c0), open_edges, settings)
        n = int(labels.max())
        flat = labels.ravel()
        sums, counts = np.bincount(flat, weights=pc.ravel(), minlength=n + 1), np.bincount(flat, minlength=n + 1)
        if n == 0:
            out[kind] = []
            continue
        maxs = np.zeros(n + 1, np.float64)  # ndimage.maximum over an index array is ~50x slower
        np.maximum.at(maxs, flat, pc.ravel())
        edge: set[int] = set()
        for on, line in zip(seams, (labels[0], labels[-1], labels[:, 0], labels[:, -1]), strict=True):
            if on:
                edge.update(np.unique(line[line > 0]).tolist())
        parts = []
        for geom, value in shapes(labels.astype(np.int32), mask=labels > 0, connectivity=4, transform=transform):
            lab = int(value)
            stats = (float(sums[lab]), int(counts[lab]), float(maxs[lab]))
            marker, gate = named.get(lab, (None, None))
            parts.append(_Part(shape(geom), index, *stats, lab in edge, marker, gate))
        out[kind] = parts
    return out


def _merge_seams(parts: list[_Part]) -> list[_Part]:
    """Union parts of different windows that share an edge (union-find over an STRtree)."""
    idx = [i for i, p in enumerate(parts) if p.on_seam]
    if len(idx) < 2:
        return parts
    parent = list(range(len(idx)))  # union-find over positions in idx

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tree = shapely.STRtree([parts[i].geom for i in idx])
    left, right = tree.query([parts[i].geom for i in idx], predicate="intersects")
    for a, b in zip(left.tolist(), right.tolist(), strict=True):
        pa, pb = parts[idx[a]], parts[idx[b]]
        one_piece = pa.piece is None or pb.piece is None or pa.piece == pb.piece  # two pieces of a cut stay two
        if a < b and pa.window != pb.window and one_piece and pa.geom.intersection(pb.geom).length > 0:
            parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for a in range(len(idx)):
        groups.setdefault(find(a), []).append(idx[a])
    merged = [p for p in parts if not p.on_seam]
    for members in groups.values():
        group = [parts[i] for i in members]
        geom = group[0].geom if len(group) == 1 else shapely.unary_union([g.geom for g in group])
        one = len({g.piece for g in group}) == 1  # one piece seen from several windows keeps its gate
        merged.append(
            _Part(geom, group[0].window, sum(g.p_sum for g in group), sum(g.n for g in group),
                  max(g.p_max for g in group), False, group[0].piece if one else None,
                  group[0].gate_mean if one else None)
        )  # fmt: skip
    return merged


def _polygons(geom: BaseGeometry) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    if hasattr(geom, "geoms"):
        return [g for sub in geom.geoms for g in _polygons(sub)]
    return []


def _rectangle(poly: Polygon, fill: float) -> Polygon | None:
    """The area-preserving minimum rotated rectangle of ``poly`` when ``poly`` fills it well, else None."""
    rect = poly.minimum_rotated_rectangle
    if not isinstance(rect, Polygon) or rect.area <= 0 or poly.area / rect.area < fill:
        return None
    k = math.sqrt(poly.area / rect.area)
    out = affinity.scale(rect, xfact=k, yfact=k, origin=rect.centroid)
    return out if isinstance(out, Polygon) else None


def _width(poly: Polygon) -> float:
    """Shorter side of the minimum rotated rectangle."""
    rect = poly.minimum_rotated_rectangle
    if not isinstance(rect, Polygon):
        return 0.0
    xy = np.asarray(rect.exterior.coords)[:3]
    sides = np.hypot(*np.diff(xy, axis=0).T)
    return float(sides.min())


def shape_object(geom: BaseGeometry, settings: VectorizeSettings) -> list[Polygon]:
    """Remove holes, drop small parts, regularise or simplify, drop slivers."""
    out = []
    for part in _polygons(geom):
        poly = Polygon(part.exterior)
        if poly.area < settings.min_area_m2 or poly.area <= 0:
            continue
        rect = _rectangle(poly, settings.rect_fill) if settings.regularize else None
        if rect is not None:
            poly = rect
        elif settings.simplify_m > 0:
            simple = poly.simplify(settings.simplify_m, preserve_topology=True)
            poly = simple if isinstance(simple, Polygon) and simple.is_valid else poly
        if not poly.is_valid:
            poly = max(_polygons(shapely.make_valid(poly)), key=lambda g: g.area, default=Polygon())
        if poly.is_empty or poly.area < settings.min_area_m2 or _width(poly) < settings.sliver_m:
            continue
        out.append(poly)
    return out


def empty_flags(crs: CRS | str | None) -> gpd.GeoDataFrame:
    """An empty flags table with the full schema."""
    data: dict[str, Any] = {
        c: pd.Series(dtype="float64" if c in FLAG_FLOAT_COLUMNS else "object") for c in FLAG_COLUMNS
    }
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def _join_layer(points: gpd.GeoSeries, path: Path, column: str) -> list[str]:
    """Value of ``column`` of the polygon of ``path`` holding each point ('' when none)."""
    if not path.exists():
        log.info("%s not found; '%s' left empty", path, column)
        return [""] * len(points)
    try:
        layer = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several unrelated types for a bad file
        raise CorruptFileError(f"{path}: not a readable GeoPackage ({exc}); rewrite the layer") from exc
    if column not in layer.columns:
        raise InputError(f"{path}: no '{column}' column (has {list(layer.columns)!r}); add it to the layer")
    if layer.crs is None:
        raise CRSError(f"{path}: layer has no CRS; set one (e.g. layer.set_crs) and rewrite it")
    if CRS.from_user_input(layer.crs) != CRS.from_user_input(points.crs):
        log.info("reprojecting %s from %s to the grid CRS for the '%s' join", path, layer.crs, column)
        layer = layer.to_crs(points.crs)
    if len(points) == 0:
        return []
    pts = gpd.GeoDataFrame(geometry=points.reset_index(drop=True))
    joined = gpd.sjoin(pts, layer[[column, "geometry"]], how="left", predicate="within")
    joined = joined[~joined.index.duplicated(keep="first")].sort_index()
    return [str(v) if isinstance(v, str) or pd.notna(v) else "" for v in joined[column]]


def _write(gdf: gpd.GeoDataFrame, out_path: Path) -> None:
    """Write the GeoParquet twin and the GeoPackage layer ``flags`` as one generation (:func:`atomic_paths`).

    Both are written to temporary files first; a failure (a full disk) leaves both previous files.
    """
    with atomic_paths([out_path.with_suffix(".parquet"), out_path]) as (parquet_tmp, gpkg_tmp):
        gdf.to_parquet(parquet_tmp, index=False)
        gdf.to_file(gpkg_tmp, layer=FLAGS_LAYER, driver="GPKG", engine="pyogrio", geometry_type="Polygon")


def vectorize_month(
    prob_path: Path,
    out_path: Path,
    settings: VectorizeSettings,
    *,
    month: str,
    layers_dir: Path | None = None,
) -> gpd.GeoDataFrame:
    """Turn a month's probability COG into flag polygons and write them.

    Args:
        prob_path: the probability COG (``<processed>/prob/<month>.tif``).
        out_path: the GeoPackage to write (``<processed>/flags/<month>.gpkg``; ``.parquet`` beside it).
        settings: ``vectorize`` settings.
        month: the month (``YYYY-MM``) the flags belong to.
        layers_dir: folder with ``districts.gpkg`` and ``streets.gpkg``; None leaves both columns empty.

    Returns:
        The flags (columns of :data:`pipeline.formats.FLAG_COLUMNS` plus geometry, in the grid CRS), as written.

    Raises:
        ConfigError: ``month`` is not ``YYYY-MM``.
        MissingInputError: ``prob_path`` does not exist.
        CorruptFileError: it cannot be read.
        InputError: it does not have the two probability bands.
        CRSError: it has no CRS.
    """
    try:
        check_month(month)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    prob_path, out_path = Path(prob_path), Path(out_path)
    if not prob_path.exists():
        raise MissingInputError(f"{prob_path}: probability raster not found; run 'scarwatch detect' for {month}")
    try:
        ds = rasterio.open(prob_path)
    except rasterio.errors.RasterioIOError as exc:
        raise CorruptFileError(f"{prob_path}: not a readable raster ({exc}); rerun 'scarwatch detect'") from exc
    with ds:
        if ds.count != 2 or ds.dtypes[0] != "uint8":
            raise InputError(f"{prob_path}: expected 2 uint8 bands (p_new, p_removed); rerun 'scarwatch detect'")
        if ds.crs is None:
            raise CRSError(f"{prob_path}: raster has no CRS; rerun 'scarwatch align' and 'detect'")
        crs = ds.crs
        settings = resolve_thresholds(settings, ds.tags())
        parts: dict[str, list[_Part]] = {k: [] for k in FLAG_KINDS}
        for i, window in enumerate(block_windows(ds.width, ds.height, settings.window_px)):
            for kind, found in _window_parts(ds, window, i, settings).items():
                parts[kind].extend(found)

    rows: list[dict[str, Any]] = []
    geoms: list[Polygon] = []
    dropped = 0
    for kind in FLAG_KINDS:
        for obj in _merge_seams(parts[kind]):
            gate = obj.gate_mean if obj.gate_mean is not None else obj.p_sum / max(obj.n, 1)
            if gate < (settings.min_p_mean or 0.0):
                dropped += 1
                continue
            for poly in shape_object(obj.geom, settings):
                rows.append(
                    {
                        "flag_id": flag_id(month, kind, poly),
                        "month": month,
                        "kind": kind,
                        "area_m2": round(poly.area, 2),
                        "area_mu": round(poly.area / MU_M2, 4),
                        "p_mean": round(obj.p_sum / max(obj.n, 1), 4),
                        "p_max": round(obj.p_max, 4),
                    }
                )
                geoms.append(poly)
    if not rows:
        flags = empty_flags(crs)
    else:
        flags = gpd.GeoDataFrame(pd.DataFrame(rows), geometry=geoms, crs=crs)
        centroids = flags.geometry.centroid
        lonlat = centroids.to_crs("EPSG:4326")
        flags["lon"] = lonlat.x.round(7).to_numpy()
        flags["lat"] = lonlat.y.round(7).to_numpy()
        for column, name in (("district", "districts.gpkg"), ("street", "streets.gpkg")):
            flags[column] = _join_layer(centroids, layers_dir / name, column) if layers_dir else [""] * len(flags)
        order = np.lexsort((centroids.x.to_numpy(), -centroids.y.to_numpy(), flags["kind"].to_numpy()))
        flags = flags.iloc[order].reset_index(drop=True)[[*FLAG_COLUMNS, "geometry"]]
        flags = flags.drop_duplicates("flag_id").reset_index(drop=True)
    _write(flags, out_path)
    log.info(
        "%s: %d flags -> %s (%d objects below the mean probability %.2f dropped)",
        month,
        len(flags),
        out_path,
        dropped,
        settings.min_p_mean or 0.0,
    )
    return flags
