"""The demo town's layout: roads, blocks, ground features, buildings and trees, as vectors.

:func:`build_scene` lays a scene out over given bounds; :class:`Roof`, :class:`Block` and :class:`Scene`
hold it, :class:`Structure` is anything whose look changes over the months (a timeline of looks and
footprints). The small geometry and randomness helpers that planning and rendering share live here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry import LineString, Polygon, box

# Roof styles: colour and texture kind (steel: ribbed, tile: gabled, flat: parapet only).
ROOFS: dict[str, tuple[tuple[float, float, float], str]] = {
    "blue_steel": ((58, 108, 176), "steel"),
    "light_blue_steel": ((98, 146, 198), "steel"),
    "red_tile": ((158, 78, 62), "tile"),
    "grey_tile": ((104, 104, 108), "tile"),
    "grey_concrete": ((140, 139, 134), "flat"),
    "white": ((214, 214, 206), "flat"),
}

# Block land use: ground, trees per 1000 m², building lattice (cell u, v; length; width; fill; heights; roofs).
LAND_USES: dict[str, dict[str, Any]] = {
    "residential": dict(
        ground="grass",
        trees=6.0,
        cell=(46, 42),
        size=((30, 40), (10, 14)),
        fill=0.9,
        height=(12, 30),
        roofs={"grey_concrete": 4, "white": 3, "light_blue_steel": 1},
    ),
    "village": dict(
        ground="yard",
        trees=2.0,
        cell=(13, 13),
        size=((7, 11), (6, 10)),
        fill=0.7,
        height=(3, 6),
        roofs={"red_tile": 5, "grey_tile": 3, "blue_steel": 1, "white": 1},
    ),
    "industrial": dict(
        ground="paved",
        trees=0.8,
        cell=(48, 36),
        size=((25, 40), (15, 28)),
        fill=0.75,
        height=(8, 14),
        roofs={"blue_steel": 4, "light_blue_steel": 2, "white": 3, "grey_concrete": 2},
    ),
    "green": dict(
        ground="grass",
        trees=14.0,
        cell=(60, 60),
        size=((5, 10), (5, 8)),
        fill=0.08,
        height=(3, 4),
        roofs={"red_tile": 1, "grey_tile": 1},
    ),
    "soil": dict(
        ground="soil",
        trees=0.6,
        cell=(50, 50),
        size=((6, 12), (5, 8)),
        fill=0.1,
        height=(3, 4),
        roofs={"blue_steel": 1, "grey_tile": 1},
    ),
    "site": dict(
        ground="soil",
        trees=0.0,
        cell=(30, 22),
        size=((12, 18), (5, 7)),
        fill=0.3,
        height=(3, 3.5),
        roofs={"blue_steel": 2, "white": 1},
    ),
}
_USE_P = {"residential": 0.27, "village": 0.22, "industrial": 0.15, "green": 0.14, "soil": 0.13, "site": 0.09}


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


# ----------------------------------------------------------------------------------------------- helpers
def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """The random generator of stream ``key`` (e.g. ``(stream, month)``) under ``seed``."""
    return np.random.default_rng([seed, *key])


def _rects(cx: Any, cy: Any, length: Any, width: Any, angle: Any) -> np.ndarray:
    """Rotated rectangles (angle in degrees, counter-clockwise from east), vectorised over arrays."""
    cx, cy, length, width, a = (
        np.atleast_1d(np.asarray(v, dtype=float)) for v in (cx, cy, length, width, np.radians(angle))
    )
    du = np.array([-1, 1, 1, -1]) * length[:, None] / 2
    dv = np.array([-1, -1, 1, 1]) * width[:, None] / 2
    ca, sa = np.cos(a)[:, None], np.sin(a)[:, None]
    return shapely.polygons(np.stack([cx[:, None] + du * ca - dv * sa, cy[:, None] + du * sa + dv * ca], -1))


def rotated_rect(cx: float, cy: float, length: float, width: float, angle: float) -> Polygon:
    """One rotated rectangle centred on ``(cx, cy)`` (angle in degrees, counter-clockwise from east)."""
    return _rects(cx, cy, length, width, angle)[0]


def weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """One key of ``weights``, drawn with probability proportional to its weight."""
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


# ----------------------------------------------------------------------------------------------- scene
def build_scene(
    rng: np.random.Generator, bounds: tuple[float, float, float, float], *, spacing: float = 350.0
) -> Scene:
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
        lines.append(
            (
                LineString(
                    [(cx - d * math.cos(a), cy - d * math.sin(a)), (cx + d * math.cos(a), cy + d * math.sin(a))]
                ),
                float(rng.uniform(20, 28)),
                True,
            )
        )
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
    junctions = [
        asphalt[i].intersection(asphalt[j])
        for i in range(len(asphalt))
        for j in range(i + 1, len(asphalt))
        if asphalt[i].intersects(asphalt[j])
    ]
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
        blocks.append(Block(g, weighted_choice(rng, _USE_P), round(angle, 3)))
    features: list[tuple[Polygon, str]] = []
    buildings: list[tuple[Polygon, Roof, int]] = []
    for bi, blk in enumerate(blocks):
        if blk.use == "soil" and rng.random() < 0.5:
            features.append((blk.geom, "farm"))
        if blk.use == "site":
            c = blk.geom.representative_point()
            for kind, n in (("pit", 1), ("net", int(rng.integers(2, 5)))):
                for _ in range(n):
                    g = rotated_rect(
                        c.x + rng.uniform(-40, 40),
                        c.y + rng.uniform(-40, 40),
                        rng.uniform(20, 50),
                        rng.uniform(15, 35),
                        blk.angle,
                    ).intersection(blk.geom.buffer(-3))
                    if not g.is_empty and g.geom_type == "Polygon":
                        features.append((g, kind))
        buildings += [(g, r, bi) for g, r in _layout(rng, blk, features)]
    obstacles = [*asphalt, *(g for g, _, _ in buildings), *(g for g, k in features if k != "farm")]
    trees = _trees(rng, lines, clear, blocks, obstacles)
    return Scene(
        bounds, tuple(asphalt), walk_union, tuple(marks), tuple(blocks), tuple(features), tuple(buildings), trees
    )


def _trees(
    rng: np.random.Generator,
    lines: Sequence[tuple[LineString, float, bool]],
    clear: Any,
    blocks: Sequence[Block],
    obstacles: Sequence[Polygon],
) -> np.ndarray:
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
        n = rng.poisson(LAND_USES[blk.use]["trees"] * blk.geom.area / 1000)
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
    use = LAND_USES[blk.use]
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
