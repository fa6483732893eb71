"""The demo town: a deterministic synthetic district with scripted change events.

Planning and rendering are separate. :func:`plan_demo` turns :class:`DemoSettings` into a
:class:`DemoPlan` (scene vectors, structures with their timelines, truth rows, field updates, permits,
seed cases) without touching a pixel; :func:`generate_demo` renders and writes it; :func:`training_pair`
renders a small random scene and two epochs with the same scene and rendering code.

Conventions:
    * Month index 0 is ``first_month``. The randomness of month ``m`` comes from generators seeded with
      ``(seed, stream, m)`` and never from ``n_months``: adding a month leaves earlier months unchanged.
    * Truth geometries are true map coordinates. Each month's imagery is displaced by a global
      sub-pixel shift ``(dx, dy)`` in pixels (+x east, +y south), recorded in ``demo.json``: a feature at
      true pixel (row, col) appears at (row + dy, col + dx).
    * ``expanded`` truth rows carry the full new footprint (old part included).
    * Sheets are ``sheet_<r>_<c>.tif``, 0-based, row 0 in the north, column 0 in the west.
    * Field updates about a structure first seen in month ``m`` start in month ``m + 1``; an update
      ``demolished`` in month ``m`` means the imagery of month ``m`` shows rubble.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError as RioCRSError
from rasterio.features import rasterize
from rasterio.io import MemoryFile
from scipy import ndimage, sparse
from shapely.geometry import LineString, Polygon, box

from pipeline.config import DemoSettings
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

PAD_PX = 8  # canvas margin (pixels) that the global misregistration shift samples from
SUN_AZIMUTH = math.radians(160.0)  # sun in the SSE; shadows fall to the NNW
SHADOW_DIR = np.array([-math.sin(SUN_AZIMUTH), -math.cos(SUN_AZIMUTH)])  # map x, y
SUN_PIX = np.array([math.sin(SUN_AZIMUTH), -math.cos(SUN_AZIMUTH)])  # towards the sun in (col, row)
LATITUDE = 43.9
TREE_HEIGHTS = np.array([6.0, 8.0, 10.0, 12.0])  # upper edges of the tree-height classes (m) for shadows
SHADE = np.array([0.42, 0.46, 0.58], dtype=np.float32)[:, None]  # shadows are dark and bluish
AREA_FULL = 2000.0 * 2000.0  # the reference district that the event rates are given for

# Roof styles: colour and texture kind (steel: ribbed, tile: gabled, flat: parapet only).
ROOFS: dict[str, tuple[tuple[float, float, float], str]] = {
    "blue_steel": ((58, 108, 176), "steel"),
    "light_blue_steel": ((98, 146, 198), "steel"),
    "red_tile": ((158, 78, 62), "tile"),
    "grey_tile": ((104, 104, 108), "tile"),
    "grey_concrete": ((140, 139, 134), "flat"),
    "white": ((214, 214, 206), "flat"),
}
# Ground codes: colour, vegetation weight, grain (std of per-pixel noise).
GROUND: dict[str, tuple[int, tuple[float, float, float], float, float]] = {
    "grass": (0, (92, 116, 62), 1.0, 9.0),
    "soil": (1, (154, 132, 106), 0.0, 8.0),
    "farm": (2, (138, 122, 92), 0.3, 7.0),
    "paved": (3, (158, 156, 148), 0.0, 4.0),
    "net": (4, (48, 94, 70), 0.0, 6.0),
    "pit": (5, (116, 100, 84), 0.0, 7.0),
    "sidewalk": (6, (172, 166, 156), 0.0, 4.0),
    "asphalt": (7, (84, 86, 90), 0.0, 3.5),
    "mark": (8, (222, 222, 214), 0.0, 4.0),
    "yard": (9, (142, 134, 120), 0.1, 8.0),
}
_CODE = {k: v[0] for k, v in GROUND.items()}
_LUT_RGB = np.array([v[1] for v in GROUND.values()], dtype=np.float32)
_LUT_VEG = np.array([v[2] for v in GROUND.values()], dtype=np.float32)
_LUT_GRAIN = np.array([v[3] for v in GROUND.values()], dtype=np.float32)

# Block land use: ground, trees per 1000 m², building lattice (cell u, v; length; width; fill; heights; roofs).
_USES: dict[str, dict[str, Any]] = {
    "residential": dict(ground="grass", trees=6.0, cell=(46, 42), size=((30, 40), (10, 14)), fill=0.9,
                        height=(12, 30), roofs={"grey_concrete": 4, "white": 3, "light_blue_steel": 1}),
    "village": dict(ground="yard", trees=2.0, cell=(13, 13), size=((7, 11), (6, 10)), fill=0.7,
                    height=(3, 6), roofs={"red_tile": 5, "grey_tile": 3, "blue_steel": 1, "white": 1}),
    "industrial": dict(ground="paved", trees=0.8, cell=(48, 36), size=((25, 40), (15, 28)), fill=0.75,
                       height=(8, 14), roofs={"blue_steel": 4, "light_blue_steel": 2, "white": 3,
                                              "grey_concrete": 2}),
    "green": dict(ground="grass", trees=14.0, cell=(60, 60), size=((5, 10), (5, 8)), fill=0.08,
                  height=(3, 4), roofs={"red_tile": 1, "grey_tile": 1}),
    "soil": dict(ground="soil", trees=0.6, cell=(50, 50), size=((6, 12), (5, 8)), fill=0.1,
                 height=(3, 4), roofs={"blue_steel": 1, "grey_tile": 1}),
    "site": dict(ground="soil", trees=0.0, cell=(30, 22), size=((12, 18), (5, 7)), fill=0.3,
                 height=(3, 3.5), roofs={"blue_steel": 2, "white": 1}),
}
_USE_P = {"residential": 0.27, "village": 0.22, "industrial": 0.15, "green": 0.14, "soil": 0.13, "site": 0.09}
_ILLEGAL_PREF = {"village": 3.0, "soil": 3.0, "industrial": 2.0, "green": 1.5, "residential": 1.5, "site": 0.5}
_PERMIT_PREF = {"soil": 3.0, "site": 2.0, "green": 1.0, "industrial": 1.0}
# Per-month event rates for a 2 x 2 km district and the minimum count scripted in a given month index.
_RATES = {"appeared": 3.0, "expanded": 0.6, "demolished": 0.8, "rebuilt": 0.2, "permitted": 0.4, "removed": 0.4}
_MINIMA = {"appeared": range(1, 37), "expanded": (2, 5), "demolished": (1, 3, 5), "rebuilt": (3,),
           "permitted": (1, 4), "removed": (2, 5)}
_DISTRICTS = ("青禾区", "北澜区", "泰和区", "云岫区")
_STREETS = ("清水", "永安", "长丰", "曙光", "柳溪", "新民", "锦程", "富康", "春晖", "安澜", "瑞祥", "松涛")
_INSPECTORS = ("王磊", "李娜", "刘洋", "陈静", "赵敏", "孙浩")


@dataclass(frozen=True)
class Roof:
    """How a structure looks from above: style (a key of ``ROOFS``), ridge angle (deg), height (m)."""

    style: str
    angle: float
    height: float
    tint: float = 1.0


@dataclass(frozen=True)
class Block:
    """A city block between roads with its land use and building orientation (degrees)."""

    geom: Polygon
    use: str
    angle: float


@dataclass(frozen=True)
class Scene:
    """The static vectors of a scene: roads, blocks, ground features and buildings (all map units)."""

    bounds: tuple[float, float, float, float]
    roads: tuple[Any, ...]  # asphalt polygons
    sidewalks: Any
    marks: tuple[Any, ...]  # lane lines
    blocks: tuple[Block, ...]
    features: tuple[tuple[Polygon, str], ...]
    buildings: tuple[tuple[Polygon, Roof, int], ...]  # footprint, roof, block index
    trees: np.ndarray  # (n, 4): x, y, crown radius, height (m)


@dataclass
class Structure:
    """Anything whose look may change: a timeline of ``(month index, look, footprint)``.

    Looks are ``roof`` (present), ``rubble``, ``grass`` and ``soil`` (cleared ground).
    """

    sid: str
    index: int
    category: str  # building | illegal | permitted | scar
    legal: bool
    roof: Roof
    states: list[tuple[int, str, Polygon]]
    dims: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)  # cx, cy, length, width, angle
    stage: str = "new"  # field lifecycle stage
    stage_month: int = 0
    case_id: str = ""
    deadline: str = ""
    demolished_month: int = -1
    expanded: bool = False
    rebuilt: bool = False
    stubborn: bool = False

    def at(self, m: int) -> tuple[str, Polygon] | None:
        """The look and footprint in month ``m`` (None before the structure exists)."""
        cur = None
        for month, look, geom in self.states:
            if month <= m:
                cur = (look, geom)
        return cur

    def changed_after_start(self) -> bool:
        """Whether the structure needs painting on top of the month-0 base."""
        return any(month > 0 for month, _, _ in self.states)


@dataclass(frozen=True)
class DemoPlan:
    """Everything :func:`generate_demo` writes, as data (truth, updates, permits: month-indexed rows)."""

    settings: DemoSettings
    months: tuple[str, ...]
    scene: Scene
    structures: tuple[Structure, ...]
    changes: tuple[dict[str, Any], ...]
    updates: tuple[dict[str, Any], ...]
    permits: tuple[dict[str, Any], ...]
    cases: tuple[dict[str, Any], ...]
    looks: tuple[dict[str, Any], ...]  # per month: season, shift, illumination, compression


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`generate_demo` wrote."""

    out_dir: Path
    months: list[str]
    n_structures: int
    n_changes: int
    crs: str


# ----------------------------------------------------------------------------------------------- helpers
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _month_add(month: str, k: int) -> str:
    y, m = int(month[:4]), int(month[5:7]) - 1 + k
    return f"{y + m // 12:04d}-{m % 12 + 1:02d}"


def _date(month: str, day: int) -> str:
    y, m = int(month[:4]), int(month[5:7])
    return f"{month}-{min(max(day, 1), calendar.monthrange(y, m)[1]):02d}"


def _rects(cx: Any, cy: Any, length: Any, width: Any, angle: Any) -> np.ndarray:
    """Rotated rectangles (angle in degrees, counter-clockwise from east), vectorised over arrays."""
    cx, cy, length, width, a = (np.atleast_1d(np.asarray(v, dtype=float)) for v in
                                (cx, cy, length, width, np.radians(angle)))
    du = np.array([-1, 1, 1, -1]) * length[:, None] / 2
    dv = np.array([-1, -1, 1, 1]) * width[:, None] / 2
    ca, sa = np.cos(a)[:, None], np.sin(a)[:, None]
    return shapely.polygons(np.stack([cx[:, None] + du * ca - dv * sa, cy[:, None] + du * sa + dv * ca], -1))


def _rect(cx: float, cy: float, length: float, width: float, angle: float) -> Polygon:
    return _rects(cx, cy, length, width, angle)[0]


def _upsampler(n_out: int, n_in: int, f: float) -> sparse.csr_matrix:
    """The (n_out, n_in) linear-interpolation matrix that enlarges a 1-D signal ``f`` times."""
    pos = np.clip((np.arange(n_out) + 0.5) / f - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (pos - i0).astype(np.float32)
    rows = np.r_[np.arange(n_out), np.arange(n_out)]
    return sparse.csr_matrix((np.r_[1 - w1, w1], (rows, np.r_[i0, i1])), shape=(n_out, n_in))


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Smooth zero-mean noise (about unit std) with features about ``scale_px`` pixels across."""
    h, w = shape
    f = max(scale_px / 2.0, 1.0)
    coarse = ndimage.gaussian_filter(rng.standard_normal((int(h / f) + 3, int(w / f) + 3), dtype=np.float32), 1.0)
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-6)
    if f == 1:
        return coarse[:h, :w]
    rows = _upsampler(h, coarse.shape[0], f) @ coarse  # (h, cw)
    return np.ascontiguousarray((_upsampler(w, coarse.shape[1], f) @ rows.T).T, dtype=np.float32)


def _window(transform: Affine, shape: tuple[int, int], geom: Any) -> tuple[slice, slice, Affine] | None:
    """The pixel window (rows, cols, window transform) that covers ``geom`` on a grid, or None outside."""
    x0, y0, x1, y1 = geom.bounds
    c0, r0 = ~transform * (x0, y1)
    c1, r1 = ~transform * (x1, y0)
    r0, c0 = max(int(math.floor(r0)) - 1, 0), max(int(math.floor(c0)) - 1, 0)
    r1, c1 = min(int(math.ceil(r1)) + 1, shape[0]), min(int(math.ceil(c1)) + 1, shape[1])
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1), transform * Affine.translation(c0, r0)


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


# ----------------------------------------------------------------------------------------------- scene
def build_scene(rng: np.random.Generator, bounds: tuple[float, float, float, float], *,
                spacing: float = 350.0) -> Scene:
    """Lay out roads, blocks, ground features and buildings over ``bounds`` (map units, metres).

    Args:
        rng: the scene's random generator.
        bounds: ``(xmin, ymin, xmax, ymax)`` to fill (include any margin the renderer needs).
        spacing: mean distance between major roads.

    Returns:
        The scene's vectors.
    """
    x0, y0, x1, y1 = bounds
    area = box(*bounds)
    lines: list[tuple[LineString, float, bool]] = []  # centreline, width, major
    cuts = {}
    for axis, lo, hi in (("x", x0, x1), ("y", y0, y1)):
        pos = np.arange(lo + rng.uniform(0.2, 1.0) * spacing, hi, spacing)
        pos = np.sort(pos + rng.uniform(-0.08, 0.08, pos.size) * spacing)
        cuts[axis] = np.r_[lo, pos, hi]
        for p in pos:
            ends = [(p, y0 - 30), (p, y1 + 30)] if axis == "x" else [(x0 - 30, p), (x1 + 30, p)]
            lines.append((LineString(ends), float(rng.uniform(18, 26)), True))
    span = max(x1 - x0, y1 - y0)
    for _ in range(int(span >= 600) + int(span >= 1500 and rng.random() < 0.6) or int(rng.random() < 0.4)):
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        a = math.radians(rng.uniform(25, 65) + 90 * rng.integers(0, 2))
        d = 2 * span
        lines.append((LineString([(cx - d * math.cos(a), cy - d * math.sin(a)),
                                  (cx + d * math.cos(a), cy + d * math.sin(a))]),
                      float(rng.uniform(20, 28)), True))
    for i in range(len(cuts["x"]) - 1):  # minor roads inside the major cells
        for j in range(len(cuts["y"]) - 1):
            cx0, cx1, cy0, cy1 = cuts["x"][i], cuts["x"][i + 1], cuts["y"][j], cuts["y"][j + 1]
            if rng.random() < 0.65 and min(cx1 - cx0, cy1 - cy0) > 120:
                if rng.random() < 0.5:
                    p = rng.uniform(0.35, 0.65) * (cx1 - cx0) + cx0
                    ln = LineString([(p, cy0), (p, cy1)])
                else:
                    p = rng.uniform(0.35, 0.65) * (cy1 - cy0) + cy0
                    ln = LineString([(cx0, p), (cx1, p)])
                lines.append((ln, float(rng.uniform(7, 10)), False))
    asphalt = [ln.buffer(w / 2, cap_style="flat") for ln, w, _ in lines]
    road_union = shapely.union_all(asphalt) if asphalt else Polygon()
    walks = [ln.buffer(w / 2 + 3.0, cap_style="flat") for ln, w, major in lines if major]
    walk_union = shapely.union_all(walks).difference(road_union) if walks else Polygon()
    junctions = [asphalt[i].intersection(asphalt[j]) for i in range(len(asphalt))
                 for j in range(i + 1, len(asphalt)) if asphalt[i].intersects(asphalt[j])]
    clear = shapely.union_all(junctions).buffer(3.0) if junctions else Polygon()
    shapely.prepare(clear)
    marks: list[Any] = []  # dashed lane lines and the double centre line of major roads, no marks in junctions
    for ln, w, major in lines:
        if not major:
            continue
        a, b = np.asarray(ln.coords)
        d = (b - a) / ln.length
        nrm = np.array([-d[1], d[0]])
        start = a + np.arange(0, ln.length, 9.0)[:, None] * d
        segs = [np.stack([start + off * nrm, start + off * nrm + 3.0 * d], axis=1) for off in (-w / 4, w / 4)]
        segs += [np.array([[a + off * nrm, b + off * nrm]]) for off in (-0.3, 0.3)]
        geoms = shapely.linestrings(np.concatenate(segs))
        hit = shapely.intersects(clear, geoms)
        geoms[hit] = shapely.difference(geoms[hit], clear)
        marks += [g for g in geoms if not g.is_empty]
    rest = area.difference(shapely.union_all([road_union, walk_union]))
    polys = [g for g in getattr(rest, "geoms", [rest]) if g.geom_type == "Polygon" and g.area > 150]
    blocks = []
    for g in sorted(polys, key=lambda p: (round(p.centroid.x, 3), round(p.centroid.y, 3))):
        mrr = np.asarray(g.minimum_rotated_rectangle.exterior.coords)
        edges = np.diff(mrr, axis=0)
        e = edges[int(np.argmax(np.hypot(edges[:, 0], edges[:, 1])))]
        angle = (math.degrees(math.atan2(e[1], e[0])) + 45) % 90 - 45
        blocks.append(Block(g, _pick(rng, _USE_P), round(angle, 3)))
    features: list[tuple[Polygon, str]] = []
    buildings: list[tuple[Polygon, Roof, int]] = []
    for bi, blk in enumerate(blocks):
        if blk.use == "soil" and rng.random() < 0.5:
            features.append((blk.geom, "farm"))
        if blk.use == "site":
            c = blk.geom.representative_point()
            for kind, n in (("pit", 1), ("net", int(rng.integers(2, 5)))):
                for _ in range(n):
                    g = _rect(c.x + rng.uniform(-40, 40), c.y + rng.uniform(-40, 40), rng.uniform(20, 50),
                              rng.uniform(15, 35), blk.angle).intersection(blk.geom.buffer(-3))
                    if not g.is_empty and g.geom_type == "Polygon":
                        features.append((g, kind))
        buildings += [(g, r, bi) for g, r in _layout(rng, blk, features)]
    obstacles = [*asphalt, *(g for g, _, _ in buildings), *(g for g, k in features if k != "farm")]
    trees = _trees(rng, lines, clear, blocks, obstacles)
    return Scene(bounds, tuple(asphalt), walk_union, tuple(marks), tuple(blocks), tuple(features), tuple(buildings),
                 trees)


def _trees(rng: np.random.Generator, lines: Sequence[tuple[LineString, float, bool]], clear: Any,
           blocks: Sequence[Block], obstacles: Sequence[Polygon]) -> np.ndarray:
    """Street trees along major roads and trees scattered in blocks, clear of buildings and junctions."""
    pts = []
    for ln, w, major in lines:
        if major:
            a, b = np.asarray(ln.coords)
            d = (b - a) / ln.length
            s = np.arange(0, ln.length, 7.0) + rng.uniform(-0.5, 0.5)
            for off in (-w / 2 - 1.5, w / 2 + 1.5):
                pts.append(a + s[:, None] * d + off * np.array([-d[1], d[0]]))
    for blk in blocks:
        n = rng.poisson(_USES[blk.use]["trees"] * blk.geom.area / 1000)
        x0, y0, x1, y1 = blk.geom.bounds
        xy = np.c_[rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)]
        pts.append(xy[shapely.contains_xy(blk.geom.buffer(-1.5), xy[:, 0], xy[:, 1])])
    xy = np.concatenate(pts) if pts else np.zeros((0, 2))
    trees = np.c_[xy, rng.uniform(1.8, 4.2, len(xy)), rng.uniform(5, 13, len(xy))]
    crowns = shapely.buffer(shapely.points(xy), trees[:, 2] * 0.4)
    bad = shapely.intersects(clear, crowns)
    if obstacles:
        bad[np.unique(shapely.STRtree(list(obstacles)).query(crowns, predicate="intersects")[0])] = True
    return trees[~bad]


def _layout(rng: np.random.Generator, blk: Block, features: list[tuple[Polygon, str]]) -> list[tuple[Polygon, Roof]]:
    """Buildings of a block on a jittered lattice aligned with the block."""
    use = _USES[blk.use]
    inner = blk.geom.buffer(-3.0)
    if inner.is_empty:
        return []
    a = math.radians(blk.angle)
    ca, sa = math.cos(a), math.sin(a)
    c = blk.geom.centroid
    xy = np.asarray(blk.geom.exterior.coords) - (c.x, c.y)
    u, v = xy[:, 0] * ca + xy[:, 1] * sa, -xy[:, 0] * sa + xy[:, 1] * ca
    cu, cv = use["cell"]
    grid_u, grid_v = np.meshgrid(np.arange(u.min() + cu / 2, u.max(), cu), np.arange(v.min() + cv / 2, v.max(), cv))
    uu, vv = grid_u.ravel(), grid_v.ravel()
    n = uu.size
    keep = rng.random(n) < use["fill"]
    (l0, l1), (w0, w1) = use["size"]
    length = np.minimum(rng.uniform(l0, l1, n), cu - 2.5)
    width = np.minimum(rng.uniform(w0, w1, n), cv - 2.5)
    uu = uu + rng.uniform(-1, 1, n) * (cu - length - 2) / 2
    vv = vv + rng.uniform(-1, 1, n) * (cv - width - 2) / 2
    angle = blk.angle + rng.normal(0, 2.0 if blk.use == "village" else 0.5, n)
    heights = rng.uniform(float(use["height"][0]), float(use["height"][1]), n)
    keys = list(use["roofs"])
    p = np.array([use["roofs"][k] for k in keys], dtype=float)
    styles = rng.choice(len(keys), size=n, p=p / p.sum())
    tints = rng.uniform(0.88, 1.1, n)
    flip = rng.random(n) < 0.5
    shapely.prepare(inner)
    rects = _rects(c.x + uu * ca - vv * sa, c.y + uu * sa + vv * ca, length, width, angle)
    ok = keep & shapely.contains(inner, rects)
    if features:
        ok &= ~shapely.intersects(shapely.union_all([g for g, _ in features]), rects)
    out = []
    for i in np.flatnonzero(ok):
        style = keys[int(styles[i])]
        ridge = angle[i] + (90.0 if flip[i] and ROOFS[style][1] == "steel" else 0.0)
        out.append((rects[i], Roof(style, float(ridge), float(heights[i]), float(tints[i]))))
    return out


# ---------------------------------------------------------------------------------------------- planning
class _Occupancy:
    """What new structures must not overlap: roads, buildings, ground features and earlier structures."""

    def __init__(self, scene: Scene, inner: Polygon) -> None:
        static = [*scene.roads, scene.sidewalks, *(g for g, _, _ in scene.buildings),
                  *(g for g, k in scene.features if k != "farm")]
        self.tree = shapely.STRtree([g for g in static if not g.is_empty])
        self.inner = inner
        self.dynamic: dict[str, Polygon] = {}
        self.by_block: dict[int, list[Polygon]] = {}
        for g, _, bi in scene.buildings:
            self.by_block.setdefault(bi, []).append(g)

    def free(self, geom: Polygon, ignore: str = "") -> bool:
        if not self.inner.contains(geom) or self.tree.query(geom, predicate="intersects").size:
            return False
        return not any(g.intersects(geom) for k, g in self.dynamic.items() if k != ignore)


def _place(rng: np.random.Generator, scene: Scene, occ: _Occupancy, area: float, pref: dict[str, float],
           *, margin: float = 1.5, attach: float = 0.5) -> tuple[float, float, float, float, float] | None:
    """Find a free spot for a ``area`` m² rectangle; return ``(cx, cy, length, width, angle)`` or None."""
    weights = np.array([pref.get(b.use, 0.0) * b.geom.area for b in scene.blocks])
    if weights.sum() <= 0:
        return None
    by_block = occ.by_block
    for _ in range(80):
        bi = int(rng.choice(len(scene.blocks), p=weights / weights.sum()))
        blk = scene.blocks[bi]
        aspect = rng.uniform(1.0, 2.6)
        length, width = math.sqrt(area * aspect), math.sqrt(area / aspect)
        angle = blk.angle + rng.normal(0, 1.5)
        a = math.radians(angle)
        eu, ev = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
        if by_block.get(bi) and rng.random() < attach:  # an extension next to a house
            host = by_block[bi][int(rng.integers(len(by_block[bi])))]
            hc = np.array(host.centroid.coords[0])
            rel = np.asarray(host.exterior.coords) - hc
            hu, hv = np.abs(rel @ eu).max(), np.abs(rel @ ev).max()
            side = rng.choice([-1.0, 1.0])
            if rng.random() < 0.5:
                centre = hc + side * (hu + margin + 0.3 + length / 2) * eu + rng.uniform(-hv, hv) * 0.5 * ev
            else:
                centre = hc + side * (hv + margin + 0.3 + width / 2) * ev + rng.uniform(-hu, hu) * 0.5 * eu
        else:
            bx0, by0, bx1, by1 = blk.geom.bounds
            centre = np.array([rng.uniform(bx0, bx1), rng.uniform(by0, by1)])
        g = _rect(float(centre[0]), float(centre[1]), length, width, angle)
        if blk.geom.contains(g) and occ.free(g.buffer(margin)):
            return float(centre[0]), float(centre[1]), length, width, angle
    return None


def plan_demo(settings: DemoSettings) -> DemoPlan:
    """Plan the demo town month by month: scene, structures, truth, field updates, permits and seed cases.

    Month ``m`` draws only from generators seeded with ``(settings.seed, stream, m)`` and from the state
    left by months before it, so a longer run repeats a shorter one exactly.

    Args:
        settings: the demo settings.

    Returns:
        The plan; nothing is rendered or written.
    """
    seed, gsd = settings.seed, settings.gsd
    x0, y0 = settings.origin
    size = settings.size_m
    pad = PAD_PX * gsd
    months = tuple(_month_add(settings.first_month, k) for k in range(settings.n_months))
    scene = build_scene(_rng(seed, 1), (x0 - pad, y0 - pad, x0 + size + pad, y0 + size + pad))
    occ = _Occupancy(scene, box(x0 + 3, y0 + 3, x0 + size - 3, y0 + size - 3))
    structures = [Structure(f"B{i + 1:05d}", i, "building", True, r, [(0, "roof", g)])
                  for i, (g, r, _) in enumerate(scene.buildings)]
    scale = size * size / AREA_FULL
    changes: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    permits: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []

    def new_structure(rng: np.random.Generator, m: int, category: str, area: float, pref: dict[str, float],
                      style: str, height: tuple[float, float]) -> Structure | None:
        dims = _place(rng, scene, occ, area, pref, attach=0.5 if category == "illegal" else 0.0)
        if dims is None:
            log.debug("no free spot for a %r structure in month %d", category, m)
            return None
        n = sum(s.category != "building" for s in structures) + 1
        roof = Roof(style, dims[4] + 90 * int(rng.integers(0, 2)), float(rng.uniform(*height)),
                    float(rng.uniform(0.9, 1.08)))
        s = Structure(f"S{n:04d}", len(structures), category, category != "illegal", roof,
                      [(m, "roof", _rect(*dims))], dims, stage_month=m)
        structures.append(s)
        occ.dynamic[s.sid] = s.states[0][2].buffer(2.0)
        return s

    def update(m: int, day: int, kind: str, s: Structure, note: str, deadline: str = "") -> None:
        p = s.states[-1][2].representative_point()
        updates.append(dict(month=m, at=_date(months[m], day), kind=kind, actor=_INSPECTORS[s.index % 6],
                            note=note, deadline=deadline, case_id=s.case_id,
                            x=None if s.case_id else round(p.x, 2), y=None if s.case_id else round(p.y, 2)))

    def change(m: int, s: Structure, kind: str, event: str) -> None:
        changes.append(dict(month=m, kind=kind, structure_id=s.sid, legal=s.legal, event=event,
                            geometry=s.states[-1][2] if kind == "new" else s.at(m - 1)[1]))  # type: ignore[index]

    def illegal_style(rng: np.random.Generator) -> str:
        return _pick(rng, {"blue_steel": 6, "light_blue_steel": 2, "white": 1, "grey_concrete": 1})

    # month 0: the seed ledger (existing illegal structures and one scar)
    rng0 = _rng(seed, 3, 0)
    n_seed = max(4, min(8, round(6 * scale) + 1))
    states = ["ordered", "ordered", "stopped", "confirmed"] + ["stopped", "confirmed", "ordered"] * 2
    for k in range(n_seed):
        cat = "scar" if k == n_seed - 1 else "illegal"
        s = new_structure(rng0, 0, cat, float(np.exp(rng0.uniform(math.log(40), math.log(300)))),
                          _ILLEGAL_PREF, illegal_style(rng0), (2.5, 4.5))
        if s is None:
            continue
        s.legal, s.case_id = False, f"C{months[0][:4]}-{k + 1:04d}"
        opened = _month_add(months[0], -int(rng0.integers(2, 9)))
        if cat == "scar":
            s.states[0] = (0, "rubble", s.states[0][2])
            s.stage, s.demolished_month, note = "demolished", 0, "拆除后遗留建筑垃圾，待清运复绿"
        else:
            s.stage = states[k]
            note = "彩钢板房违法建设" if s.roof.style.endswith("steel") else "违法加建"
            if s.stage == "ordered":
                s.deadline = _date(months[0], 31) if k == 0 else _date(_month_add(months[0], -1), 10)
                s.stubborn = k != 0
        cases.append(dict(case_id=s.case_id, opened_at=_date(opened, int(rng0.integers(1, 28))),
                          state=s.stage, category="scar" if cat == "scar" else "illegal_construction",
                          note=note, deadline=s.deadline, geometry=s.states[0][2]))

    looks = [_month_look(seed, months[m], m) for m in range(len(months))]
    for m in range(1, len(months)):
        rng = _rng(seed, 4, m)
        quota = {k: max(int(m in _MINIMA[k]), int(rng.poisson(r * scale))) for k, r in _RATES.items()}
        live = [s for s in structures if s.category in ("illegal", "scar")]
        # demolitions (earliest deadline first), then repairs of earlier demolitions
        cands = sorted((s for s in live if s.stage == "ordered" and s.stage_month < m and not s.stubborn),
                       key=lambda s: (s.deadline, s.sid))
        for s in cands[:quota["demolished"]]:
            geom = s.states[-1][2]
            s.states.append((m, "rubble", geom))
            s.stage, s.stage_month, s.demolished_month = "demolished", m, m
            change(m, s, "removed", "demolished")
            update(m, int(rng.integers(3, 12)), "demolished", s, "已依法拆除")
        for s in live:
            if s.stage == "demolished" and s.stage_month < m and not s.rebuilt and rng.random() < 0.45:
                look = "grass" if rng.random() < 0.6 else "soil"
                s.states.append((m, look, s.states[-1][2]))
                s.stage, s.stage_month = "closed", m
                update(m, int(rng.integers(12, 20)), "repaired", s, "已复绿" if look == "grass" else "已平整")
                update(m, int(rng.integers(21, 28)), "closed", s, "销号")
        # rebuilds (反弹) at sites demolished at least two months ago
        for s in [s for s in live if s.category == "illegal" and 0 < s.demolished_month <= m - 2
                  and not s.rebuilt][:quota["rebuilt"]]:
            cx, cy, length, width, angle = s.dims
            dims = (cx, cy, length * rng.uniform(0.95, 1.25), width * rng.uniform(0.95, 1.1), angle)
            if not occ.free(_rect(*dims), ignore=s.sid):
                dims = s.dims
            n = sum(t.category != "building" for t in structures) + 1
            r = Structure(f"S{n:04d}", len(structures), "illegal", False,
                          Roof(illegal_style(rng), angle, float(rng.uniform(2.5, 4)), 1.0),
                          [(m, "roof", _rect(*dims))], dims, stage="rebuilt", stage_month=m)
            structures.append(r)
            s.rebuilt = True
            occ.dynamic[s.sid] = occ.dynamic[s.sid].union(r.states[0][2].buffer(2.0))
            change(m, r, "new", "rebuilt")
        # field lifecycle of cases seen in earlier months
        for s in live:
            if s.states[-1][1] != "roof" or s.stage_month >= m or s.stage in ("rebuilt", "demolished", "closed"):
                continue
            if s.stage == "new":
                area = round(s.states[-1][2].area)
                update(m, int(rng.integers(2, 8)), "confirmed", s, f"现场核实：违法建设约{area}㎡")
                s.stage, s.stage_month = "confirmed", m
                if rng.random() < 0.5:
                    update(m, int(rng.integers(9, 15)), "stopped", s, "已下达责令停止违法行为通知书")
                    s.stage = "stopped"
            elif s.stage in ("confirmed", "stopped") and rng.random() < 0.55:
                s.deadline = _date(_month_add(months[m], 1), 31)
                update(m, int(rng.integers(15, 25)), "ordered", s, "责令限期拆除", s.deadline)
                s.stage, s.stage_month = "ordered", m
        # expansions of standing illegal structures
        cands = [s for s in live if s.category == "illegal" and s.states[-1][1] == "roof" and not s.expanded
                 and s.states[0][0] < m and s.stage != "rebuilt"]
        for i in rng.permutation(len(cands))[: quota["expanded"]]:
            s = cands[int(i)]
            cx, cy, length, width, angle = s.dims
            extra = length * rng.uniform(0.5, 1.0)
            a = math.radians(angle)
            for side in (1.0, -1.0):
                dims = (cx + side * extra / 2 * math.cos(a), cy + side * extra / 2 * math.sin(a),
                        length + extra, width, angle)
                if occ.free(_rect(*dims).buffer(1.5), ignore=s.sid):
                    s.dims, s.expanded = dims, True
                    s.states.append((m, "roof", _rect(*dims)))
                    occ.dynamic[s.sid] = s.states[-1][2].buffer(2.0)
                    change(m, s, "new", "expanded")
                    break
        # removals of existing legal buildings (urban renewal)
        cands = [s for s in structures if s.category == "building" and s.states[-1][1] == "roof"
                 and s.states[0][2].area < 1200]
        for i in rng.permutation(len(cands))[: quota["removed"]]:
            s = cands[int(i)]
            s.states.append((m, "rubble" if rng.random() < 0.6 else "soil", s.states[0][2]))
            change(m, s, "removed", "removed")
        # new illegal structures, then permitted construction
        for _ in range(quota["appeared"]):
            area = float(np.exp(rng.uniform(math.log(20), math.log(300))))
            s = new_structure(rng, m, "illegal", area, _ILLEGAL_PREF, illegal_style(rng), (2.5, 4.5))
            if s is not None:
                change(m, s, "new", "appeared")
        for _ in range(quota["permitted"]):
            s = new_structure(rng, m, "permitted", float(rng.uniform(300, 1000)), _PERMIT_PREF,
                              _pick(rng, {"grey_concrete": 2, "white": 1}), (8, 16))
            if s is None:
                continue
            pid = f"JZ{months[m][:4]}-{len(permits) + 1:03d}"
            cx, cy, length, width, angle = s.dims
            area_poly = _rect(cx, cy, length + 2 * rng.uniform(5, 12), width + 2 * rng.uniform(5, 12), angle)
            permits.append(dict(month=m, permit_id=pid, valid_from=_date(_month_add(months[m], -2), 1),
                                valid_to=_date(_month_add(months[m], 16), 28), note="建设工程规划许可证",
                                geometry=area_poly))
            occ.dynamic[s.sid] = area_poly
            change(m, s, "new", "permitted")
            if m + 1 < len(months):
                update(m + 1, int(rng.integers(2, 10)), "dismissed", s, f"permit {pid}")
    return DemoPlan(settings, months, scene, tuple(structures), tuple(changes),
                    tuple(sorted(updates, key=lambda u: (u["month"], u["at"]))), tuple(permits),
                    tuple(cases), tuple(looks))


def _month_look(seed: int, month: str, m: int) -> dict[str, Any]:
    """The month's imaging conditions: season, sun, illumination, misregistration, noise, compression."""
    rng = _rng(seed, 2, m)
    moy = int(month[5:7])
    doy = (moy - 1) * 30.4 + 15
    elevation = max(90 - LATITUDE + 23.44 * math.sin(2 * math.pi * (doy - 81) / 365) - 3, 32.0)
    mag, ang = rng.uniform(1.0, 2.0), rng.uniform(0, 2 * math.pi)
    return dict(
        month=month, green=0.5 - 0.5 * math.cos(2 * math.pi * (moy - 1) / 12),
        shadow_k=1 / math.tan(math.radians(elevation)), gain=float(rng.uniform(0.88, 1.12)),
        balance=[float(v) for v in 1 + rng.normal(0, 0.03, 3)], bias=float(rng.uniform(-6, 6)),
        haze=float(rng.uniform(0, 10)), noise=float(rng.uniform(1.5, 3.5)),
        dx=round(mag * math.cos(ang), 3), dy=round(mag * math.sin(ang), 3),
        compress="deflate" if m == 0 else "jpeg" if m == 1 else str(rng.choice(["jpeg", "deflate"])),
    )


# --------------------------------------------------------------------------------------------- rendering
@dataclass
class _Canvas:
    """A padded float32 RGB canvas with its vegetation weight and roof mask."""

    img: np.ndarray  # (3, h, w)
    veg: np.ndarray
    roof: np.ndarray  # raised surfaces (roofs, tree crowns): cast shadows do not darken them
    grain: np.ndarray  # fixed per-pixel noise: roofs painted in any order or batch come out the same
    crowns: np.ndarray  # uint8 tree-height class + 1 under each crown, 0 elsewhere (for tree shadows)
    transform: Affine

    def copy(self) -> _Canvas:
        return _Canvas(self.img.copy(), self.veg.copy(), self.roof.copy(), self.grain, self.crowns, self.transform)


def _render_ground(rng: np.random.Generator, scene: Scene, transform: Affine, shape: tuple[int, int]) -> _Canvas:
    """Ground, trees and roads (no buildings) of ``scene`` on a grid."""
    uses = [(b.geom, _CODE[_USES[b.use]["ground"]]) for b in scene.blocks]
    shapes = uses + [(g, _CODE[k]) for g, k in scene.features]
    shapes += [(g, _CODE["sidewalk"]) for g in [scene.sidewalks] if not g.is_empty]
    shapes += [(g, _CODE["asphalt"]) for g in scene.roads]
    code = rasterize(shapes, out_shape=shape, transform=transform, fill=_CODE["grass"], dtype="uint8")
    if scene.marks:
        code[rasterize(scene.marks, out_shape=shape, transform=transform, dtype="uint8") > 0] = _CODE["mark"]
    large, medium = _noise(rng, shape, 80), _noise(rng, shape, 12)
    grain = rng.standard_normal(shape, dtype=np.float32)
    texture = 1 + 0.07 * large + 0.05 * medium
    img = np.stack([_LUT_RGB[:, b][code] * texture for b in range(3)])
    img += _LUT_GRAIN[code] * grain
    rows = np.arange(shape[0], dtype=np.float32)[:, None]
    cols = np.arange(shape[1], dtype=np.float32)[None, :]
    farm = code == _CODE["farm"]
    img *= np.where(farm, 1 + 0.08 * np.sin(rows * 0.9), 1.0)
    net = code == _CODE["net"]
    img *= np.where(net & (((rows % 3) == 0) | ((cols % 3) == 0)), 1.15, 1.0)
    veg = _LUT_VEG[code]
    raised = np.zeros(shape, bool)
    crowns = np.zeros(shape, np.uint8)
    trees = scene.trees
    if len(trees):  # round crowns: a dome lit from the sun side, leaf clumps from the grain
        ids = rasterize(zip(shapely.buffer(shapely.points(trees[:, :2]), trees[:, 2], quad_segs=4),
                            range(1, len(trees) + 1), strict=True),
                        out_shape=shape, transform=transform, fill=0, dtype="int32")
        r, c = np.nonzero(ids)
        k = ids[r, c] - 1
        cc, cr = ~transform * (trees[:, 0], trees[:, 1])
        rad = trees[:, 2] / abs(transform.a)
        ox, oy = (c + 0.5 - cc[k]) / rad[k], (r + 0.5 - cr[k]) / rad[k]
        dome = np.sqrt(np.clip(1 - ox * ox - oy * oy, 0, 1))
        shade = (0.75 + 0.3 * dome) * (1 + 0.35 * (ox * SUN_PIX[0] + oy * SUN_PIX[1]))
        tint = rng.uniform(0.85, 1.15, len(trees))[k]
        shade = (shade * tint * (1 + 0.12 * grain[r, c])).astype(np.float32)
        img[:, r, c] = np.array([46, 78, 40], dtype=np.float32)[:, None] * shade
        veg[r, c] = 1.0
        raised[r, c] = True
        crowns[r, c] = np.searchsorted(TREE_HEIGHTS, trees[:, 3])[k] + 1
    return _Canvas(img.astype(np.float32), veg, raised, grain, crowns, transform)


def _paint_roofs(canvas: _Canvas, items: Sequence[tuple[Polygon, Roof]],
                 win: tuple[slice, slice, Affine] | None = None) -> None:
    """Paint roofs (colour, ribs or gable shading, eave line) into the canvas or a window of it."""
    if not items:
        return
    rs, cs, transform = win or (slice(None), slice(None), canvas.transform)
    img, roofmask = canvas.img[:, rs, cs], canvas.roof[rs, cs]
    ids = rasterize(zip(_geojson([g for g, _ in items]), range(1, len(items) + 1), strict=True),
                    out_shape=roofmask.shape,
                    transform=transform, fill=0, dtype="int32")
    rows, cols = np.nonzero(ids)
    if rows.size == 0:
        return
    k = ids[rows, cols] - 1
    colour = np.array([ROOFS[r.style][0] for _, r in items], dtype=np.float32)
    colour *= np.array([r.tint for _, r in items], dtype=np.float32)[:, None]
    kind = np.array([ROOFS[r.style][1] for _, r in items])[k]
    ang = np.radians(np.array([r.angle for _, r in items]))[k]
    cen = np.array([~transform * g.centroid.coords[0] for g, _ in items])[k]
    dc, dr = cols - cen[:, 0], rows - cen[:, 1]
    along = dc * np.cos(ang) - dr * np.sin(ang)
    across = dc * np.sin(ang) + dr * np.cos(ang)
    facing = np.sign(np.sin(ang) * SUN_PIX[0] + np.cos(ang) * SUN_PIX[1] + 1e-9)
    f = np.ones(rows.size, dtype=np.float32)
    f = np.where(kind == "steel", 1 + 0.06 * np.sin(2 * np.pi * along / 2.6), f)
    f = np.where(kind == "tile", np.where(across * facing > 0, 1.1, 0.84), f)
    f *= 1 + 0.025 * canvas.grain[rs, cs][rows, cols]
    edge = np.zeros(ids.shape, bool)
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    f *= np.where(edge[rows, cols], 0.8, 1.0)
    img[:, rows, cols] = colour[k].T * f
    roofmask[rows, cols] = True
    canvas.veg[rs, cs][rows, cols] = 0.0


def _paint_ground(canvas: _Canvas, geom: Polygon, look: str, rng: np.random.Generator) -> None:
    """Paint a cleared site: rubble (grey-brown speckle with lumps), fresh grass or levelled soil."""
    area = geom.buffer(1.0 if look == "rubble" else 1.5)
    win = _window(canvas.transform, canvas.roof.shape, area)
    if win is None:
        return
    rs, cs, transform = win
    mask = rasterize([area], out_shape=canvas.roof[rs, cs].shape, transform=transform, dtype="uint8") > 0
    n = int(mask.sum())
    if look == "rubble":
        t = rng.random(n, dtype=np.float32)[:, None]
        rgb = (1 - t) * np.array([132, 128, 122]) + t * np.array([146, 118, 92])
        lumps = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.0)[mask]
        rgb = rgb * (1 + 0.22 * rng.standard_normal((n, 1)) + 0.35 * lumps[:, None])
        veg = 0.0
    else:
        base = np.array(GROUND["grass" if look == "grass" else "soil"][1])
        rgb = base * (1 + 0.08 * rng.standard_normal((n, 1)))
        veg = 1.0 if look == "grass" else 0.0
    sub = canvas.img[:, rs, cs]
    sub[:, mask] = rgb.T.astype(np.float32)
    canvas.veg[rs, cs][mask] = veg
    canvas.roof[rs, cs][mask] = False


def _paint_structures(canvas: _Canvas, items: Sequence[Structure], m: int, seed: int) -> None:
    """Paint the month-``m`` look of each structure: cleared ground first, then roofs on top."""
    looks = [(s, s.at(m)) for s in items]
    for s, cur in looks:
        if cur is not None and cur[0] != "roof":
            month = max(t for t, _, _ in s.states if t <= m)
            _paint_ground(canvas, cur[1], cur[0], _rng(seed, 11, s.index, month))
    for s, cur in looks:
        if cur is not None and cur[0] == "roof":
            win = _window(canvas.transform, canvas.roof.shape, cur[1])
            if win is not None:
                _paint_roofs(canvas, [(cur[1], s.roof)], win)


def _geojson(geoms: Sequence[Any]) -> list[dict[str, Any]]:
    """GeoJSON mappings for rasterize, converted in bulk (much faster than one ``__geo_interface__`` each)."""
    return [json.loads(s) for s in shapely.to_geojson(np.asarray(geoms, dtype=object))]


def _shadow_mask(structures: Sequence[Structure], canvas: _Canvas, m: int, k: float) -> np.ndarray:
    """Shadows of every roof standing in month ``m`` and of the trees (sun at ``SUN_AZIMUTH``, length k × height)."""
    shape = canvas.roof.shape
    standing = [(cur[1], s.roof.height) for s in structures if (cur := s.at(m)) is not None and cur[0] == "roof"]
    mask = np.zeros(shape, bool)
    if standing:
        geoms = np.array([g for g, _ in standing], dtype=object)
        off = SHADOW_DIR[None, :] * (np.array([h for _, h in standing]) * k)[:, None]
        _, idx = shapely.get_coordinates(geoms, return_index=True)
        moved = shapely.transform(geoms, lambda c: c + off[idx])
        hulls = shapely.convex_hull(shapely.union(geoms, moved))
        mask = rasterize(_geojson(hulls), out_shape=shape, transform=canvas.transform, dtype="uint8") > 0
    gsd = abs(canvas.transform.a)
    for cls, height in enumerate(TREE_HEIGHTS - 1.0):  # crowns shifted by their class's shadow length
        dc = int(round(SHADOW_DIR[0] * height * k * 0.8 / gsd))
        dr = int(round(-SHADOW_DIR[1] * height * k * 0.8 / gsd))
        src = canvas.crowns[max(-dr, 0):shape[0] - max(dr, 0), max(-dc, 0):shape[1] - max(dc, 0)] == cls + 1
        mask[max(dr, 0):shape[0] - max(-dr, 0), max(dc, 0):shape[1] - max(-dc, 0)] |= src
    return mask


def _finish(canvas: _Canvas, shadow: np.ndarray, look: dict[str, Any], rng: np.random.Generator,
            r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """Season, shadows, illumination, misregistration and noise of one output window -> uint8 (3, h, w).

    ``r0, c0`` index the unpadded grid; the window reads ``PAD_PX`` pixels of margin on every side. Works
    in strips of rows so that the temporaries stay small.
    """
    winter = np.array([1.45, 1.08, 0.92], dtype=np.float32)[:, None, None]
    season = winter + np.float32(look["green"]) * (1 - winter) - 1
    scale = np.float32(look["gain"]) * np.array(look["balance"], dtype=np.float32)[:, None, None]
    offset = look["bias"] + look["haze"] * np.array([0.8, 0.9, 1.1], dtype=np.float32)[:, None, None]
    sy, sx = PAD_PX - look["dy"], PAD_PX - look["dx"]  # bilinear resampling, one axis at a time
    iy, ix = int(math.floor(sy)), int(math.floor(sx))
    fy, fx = np.float32(sy - iy), np.float32(sx - ix)
    cs = slice(c0, c0 + w + 2 * PAD_PX)
    out = np.empty((3, h, w), np.uint8)
    for a in range(0, h, 128):
        b = min(a + 128, h)
        rs = slice(r0 + a + iy, r0 + b + iy + 1)
        sub = canvas.img[:, rs, cs] * (1 + canvas.veg[rs, cs][None] * season)
        sub[:, shadow[rs, cs] & ~canvas.roof[rs, cs]] *= SHADE
        sub *= scale
        sub += offset
        left = sub[:, :, ix:ix + w]
        cols = left + fx * (sub[:, :, ix + 1:ix + 1 + w] - left)
        strip = cols[:, :-1] + fy * (cols[:, 1:] - cols[:, :-1])
        strip += look["noise"] * rng.standard_normal(strip.shape, dtype=np.float32) + 0.5
        out[:, a:b] = np.clip(strip, 0, 255)
    return out


def _profile(look: dict[str, Any], crs: CRS, transform: Affine, h: int, w: int) -> dict[str, Any]:
    profile: dict[str, Any] = dict(driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs,
                                   transform=transform, tiled=True, blockxsize=256, blockysize=256,
                                   interleave="pixel")
    if look["compress"] == "jpeg":
        profile.update(compress="JPEG", photometric="YCBCR", jpeg_quality=85)
    else:
        profile.update(compress="DEFLATE", predictor=2, photometric="RGB")
    return profile


# ----------------------------------------------------------------------------------------------- writing
@contextmanager
def _fixed_gpkg_date() -> Iterator[None]:
    """Pin the GeoPackage ``last_change`` timestamps so that reruns give byte-identical files."""
    old = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": "2000-01-01T00:00:00.000Z"})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": old})


def _write_layer(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str], crs: str,
                 layer: str | None = None) -> None:
    df = pd.DataFrame(list(rows), columns=[*columns, "geometry"])
    gdf = gpd.GeoDataFrame(df[list(columns)], geometry=list(df["geometry"]), crs=crs)
    path.parent.mkdir(parents=True, exist_ok=True)
    gdf.to_file(path, layer=layer or path.stem, driver="GPKG", engine="pyogrio")


def _admin_layers(out: Path, settings: DemoSettings) -> None:
    """Districts, streets (街道) and the 网格 management grid, covering the area."""
    rng = _rng(settings.seed, 20)
    x0, y0 = settings.origin
    s = settings.size_m
    n = int(rng.integers(2, 5))
    xs, ys = x0 + s * rng.uniform(0.4, 0.6), y0 + s * rng.uniform(0.4, 0.6)
    parts = {2: [(x0, y0, xs, y0 + s), (xs, y0, x0 + s, y0 + s)],
             3: [(x0, y0, xs, y0 + s), (xs, ys, x0 + s, y0 + s), (xs, y0, x0 + s, ys)],
             4: [(x0, ys, xs, y0 + s), (xs, ys, x0 + s, y0 + s), (x0, y0, xs, ys), (xs, y0, x0 + s, ys)]}[n]
    names = [_DISTRICTS[int(i)] for i in rng.permutation(len(_DISTRICTS))[:n]]
    districts = [dict(district=nm, geometry=box(*b)) for nm, b in zip(names, parts, strict=True)]
    streets, pool = [], [_STREETS[int(i)] for i in rng.permutation(len(_STREETS))]
    for d, (bx0, by0, bx1, by1) in zip(names, parts, strict=True):
        cut = by0 + (by1 - by0) * rng.uniform(0.35, 0.65)
        for b in ((bx0, by0, bx1, cut), (bx0, cut, bx1, by1)):
            streets.append(dict(street=f"{pool.pop()}街道", district=d, geometry=box(*b)))
    cells, k = [], 0
    edges = np.r_[np.arange(0, s, 250.0), s]
    for r in range(len(edges) - 2, -1, -1):
        for c in range(len(edges) - 1):
            k += 1
            g = box(x0 + edges[c], y0 + edges[r], x0 + edges[c + 1], y0 + edges[r + 1])
            d = max(districts, key=lambda x: x["geometry"].intersection(g).area)["district"]
            cells.append(dict(cell_id=f"G{k:03d}", unit=f"第{k}网格 {d}城管中队", geometry=g))
    _write_layer(out / "districts.gpkg", districts, ["district"], settings.crs)
    _write_layer(out / "streets.gpkg", streets, ["street", "district"], settings.crs)
    _write_layer(out / "grid.gpkg", cells, ["cell_id", "unit"], settings.crs)


def _write_vectors(out: Path, plan: DemoPlan) -> None:
    settings, months, crs = plan.settings, plan.months, plan.settings.crs
    _write_layer(out / "ledger" / "cases.gpkg", plan.cases,
                 ["case_id", "opened_at", "state", "category", "note", "deadline"], crs)
    _write_layer(out / "layers" / "permits.gpkg", plan.permits, ["permit_id", "valid_from", "valid_to", "note"], crs)
    _admin_layers(out / "layers", settings)
    rows = [dict(c, month=months[c["month"]]) for c in plan.changes]
    _write_layer(out / "truth" / "truth.gpkg", rows, ["month", "kind", "structure_id", "legal", "event"], crs,
                 layer="changes")
    life = []
    for s in plan.structures:
        present = [m for m in range(len(months)) if (cur := s.at(m)) is not None and cur[0] == "roof"]
        present = present or [m for m in range(len(months)) if s.at(m) is not None]  # a scar: rubble only
        if present:
            life.append(dict(structure_id=s.sid, first_month=months[present[0]], last_month=months[present[-1]],
                             category=s.category, legal=s.legal, geometry=s.at(present[-1])[1]))  # type: ignore[index]
    _write_layer(out / "truth" / "truth.gpkg", life, ["structure_id", "first_month", "last_month", "category",
                                                       "legal"], crs, layer="structures")
    cols = ["at", "kind", "actor", "note", "deadline", "case_id", "x", "y"]
    (out / "field_updates").mkdir(parents=True, exist_ok=True)
    for m in range(1, len(months)):
        df = pd.DataFrame([u for u in plan.updates if u["month"] == m], columns=cols)
        df.to_csv(out / "field_updates" / f"{months[m]}.csv", index=False, lineterminator="\n")


def _check_settings(settings: DemoSettings) -> CRS:
    try:
        crs = CRS.from_user_input(settings.crs)
    except RioCRSError as exc:
        raise ConfigError(
            f"demo.crs {settings.crs!r} is not a CRS ({exc}); use e.g. 'EPSG:4551' in params.yaml"
        ) from exc
    if not crs.is_projected:
        raise ConfigError(f"demo.crs {settings.crs!r} is not projected; the demo needs metres (e.g. 'EPSG:4551')")
    px = settings.size_m / settings.gsd
    rows, cols = settings.sheets
    if abs(px - round(px)) > 1e-6 or rows < 1 or cols < 1 or round(px) < max(rows, cols) * 16:
        raise ConfigError(f"demo.size_m {settings.size_m} / demo.gsd {settings.gsd} must be a whole number of "
                          f"pixels, at least 16 per sheet of demo.sheets {settings.sheets!r}; fix params.yaml")
    return crs


def generate_demo(out_dir: Path | str, settings: DemoSettings) -> DemoSummary:
    """Render and write the demo town (imagery, ledger, layers, field updates, truth, ``demo.json``).

    Everything is written into a sibling temporary folder that replaces ``out_dir`` at the end, so a
    failed run leaves no half-written output. Same settings give byte-identical files.

    Args:
        out_dir: the folder to (re)create.
        settings: the demo settings.

    Returns:
        The summary of what was written.

    Raises:
        ConfigError: the CRS is unknown or not projected, or size, gsd and sheets do not fit together.
    """
    out_dir = Path(out_dir)
    crs = _check_settings(settings)
    plan = plan_demo(settings)
    n = round(settings.size_m / settings.gsd)
    full = (n + 2 * PAD_PX, n + 2 * PAD_PX)
    x0, y0 = settings.origin
    grid = Affine(settings.gsd, 0, x0, 0, -settings.gsd, y0 + settings.size_m)
    padded = grid * Affine.translation(-PAD_PX, -PAD_PX)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        base = _render_ground(_rng(settings.seed, 10), plan.scene, padded, full)
        first = [s for s in plan.structures if s.states[0][0] == 0]
        _paint_structures(base, [s for s in first if s.states[0][1] != "roof"], 0, settings.seed)
        _paint_roofs(base, [(s.states[0][2], s.roof) for s in first if s.states[0][1] == "roof"])
        rows = np.linspace(0, n, settings.sheets[0] + 1).round().astype(int)
        cols = np.linspace(0, n, settings.sheets[1] + 1).round().astype(int)
        dynamic = [s for s in plan.structures if s.changed_after_start()]
        for m, month in enumerate(plan.months):
            look = plan.looks[m]
            canvas = base
            if m > 0:
                canvas = base.copy()
                _paint_structures(canvas, dynamic, m, settings.seed)
            shadow = _shadow_mask(plan.structures, canvas, m, look["shadow_k"])
            folder = tmp / "imagery" / month
            folder.mkdir(parents=True)
            for r in range(settings.sheets[0]):
                for c in range(settings.sheets[1]):
                    r0, c0 = int(rows[r]), int(cols[c])
                    h, w = int(rows[r + 1]) - r0, int(cols[c + 1]) - c0
                    arr = _finish(canvas, shadow, look, _rng(settings.seed, 5, m, r, c), r0, c0, h, w)
                    profile = _profile(look, crs, grid * Affine.translation(c0, r0), h, w)
                    with rasterio.open(folder / f"sheet_{r}_{c}.tif", "w", **profile) as dst:
                        dst.write(arr)
            log.info("demo month %s rendered (%s, shift %.2f, %.2f px)", month, look["compress"],
                     look["dx"], look["dy"])
        with _fixed_gpkg_date():
            _write_vectors(tmp, plan)
        present = {s.sid for s in plan.structures for m in range(len(plan.months)) if s.at(m) is not None}
        summary = DemoSummary(out_dir, list(plan.months), len(present), len(plan.changes), settings.crs)
        meta = dict(months=summary.months, n_structures=summary.n_structures, n_changes=summary.n_changes,
                    crs=summary.crs, seed=settings.seed, gsd=settings.gsd, size_m=settings.size_m,
                    sheets=list(settings.sheets), shift_convention="feature at true (row, col) appears at "
                    "(row + dy, col + dx), pixels", shifts={lk["month"]: dict(dx=lk["dx"], dy=lk["dy"])
                                                            for lk in plan.looks},
                    compression={lk["month"]: lk["compress"] for lk in plan.looks})
        (tmp / "demo.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    log.info("demo town written to %s: %d months, %d changes", out_dir, len(plan.months), len(plan.changes))
    return summary


# ---------------------------------------------------------------------------------------------- training
def training_pair(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A random small scene before and after a few random events, rendered like the demo town.

    Args:
        rng: the generator everything is drawn from.
        size: side of the square chip in pixels (0.5 m each).

    Returns:
        ``images`` uint8 ``(2, 3, size, size)`` as [prev, curr] and ``labels`` uint8 ``(2, size, size)``
        as [new, removed] with 1 on changed roof pixels (true coordinates; each epoch carries its own
        random 0-2 px misregistration, season, illumination, noise and, half the time, JPEG artefacts).
    """
    if size < 32:
        raise ValueError(f"size {size!r} must be at least 32 pixels")
    gsd, ext = 0.5, size * 0.5
    pad = PAD_PX * gsd
    scene = build_scene(rng, (-pad, -pad, ext + pad, ext + pad), spacing=float(rng.uniform(90, 220)))
    structures = [Structure(f"B{i}", i, "building", True, r, [(0, "roof", g)])
                  for i, (g, r, _) in enumerate(scene.buildings)]
    occ = _Occupancy(scene, box(0, 0, ext, ext))
    pref = {**_ILLEGAL_PREF, "site": 2.0}
    for _ in range(int(rng.integers(1, 5))):
        dims = _place(rng, scene, occ, float(np.exp(rng.uniform(math.log(15), math.log(400)))), pref)
        if dims is None:
            continue
        roof = Roof(_pick(rng, {k: 1.0 for k in ROOFS}), dims[4], float(rng.uniform(2.5, 8)),
                    float(rng.uniform(0.9, 1.08)))
        s = Structure(f"S{len(structures)}", len(structures), "illegal", False, roof, [(1, "roof", _rect(*dims))], dims)
        if rng.random() < 0.25:  # already there, then expanded
            cx, cy, length, width, angle = dims
            small = _rect(cx - length / 4 * math.cos(math.radians(angle)),
                          cy - length / 4 * math.sin(math.radians(angle)), length / 2, width, angle)
            s.states = [(0, "roof", small), (1, "roof", _rect(*dims))]
        structures.append(s)
        occ.dynamic[s.sid] = _rect(*dims).buffer(2.0)
    inside = [s for s in structures[: len(scene.buildings)] if box(0, 0, ext, ext).intersects(s.states[0][2])]
    for i in rng.permutation(len(inside))[: int(rng.integers(0, 3))]:
        s = inside[int(i)]
        s.states.append((1, str(rng.choice(["rubble", "soil", "grass"])), s.states[0][2]))
    full = (size + 2 * PAD_PX, size + 2 * PAD_PX)
    grid = Affine(gsd, 0, 0, 0, -gsd, ext)
    padded = grid * Affine.translation(-PAD_PX, -PAD_PX)
    seed = int(rng.integers(2**31))
    base = _render_ground(rng, scene, padded, full)
    _paint_roofs(base, [(s.states[0][2], s.roof) for s in structures if s.states[0][0] == 0])
    images = np.empty((2, 3, size, size), np.uint8)
    for t in range(2):
        canvas = base.copy()
        _paint_structures(canvas, [s for s in structures if s.changed_after_start()], t, seed)
        month = f"2026-{int(rng.integers(1, 13)):02d}"
        look = _month_look(seed, month, t)
        look["compress"] = "jpeg" if rng.random() < 0.5 else "none"
        shadow = _shadow_mask(structures, canvas, t, look["shadow_k"])
        arr = _finish(canvas, shadow, look, rng, 0, 0, size, size)
        if look["compress"] == "jpeg":
            with MemoryFile() as mem:
                with mem.open(**_profile(look, CRS.from_epsg(4551), grid, size, size)) as dst:
                    dst.write(arr)
                with mem.open() as src:
                    arr = src.read()
        images[t] = arr
    labels = np.zeros((2, size, size), np.uint8)
    roofs = []
    for t in range(2):
        geoms = [cur[1] for s in structures if (cur := s.at(t)) is not None and cur[0] == "roof"]
        roofs.append(rasterize(geoms, out_shape=(size, size), transform=grid, dtype="uint8") > 0 if geoms
                     else np.zeros((size, size), bool))
    labels[0] = roofs[1] & ~roofs[0]
    labels[1] = roofs[0] & ~roofs[1]
    return images, labels
