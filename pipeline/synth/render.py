"""Rendering the demo town: ground textures, trees, roofs, rubble, shadows, season, illumination, noise.

A scene is painted once onto a padded float canvas (:class:`_Canvas`); each month copies it, paints the
structures that changed, casts shadows and is finished window by window into uint8 sheets with that
month's imaging conditions (:func:`month_look`), including its global sub-pixel misregistration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from scipy import ndimage, sparse
from shapely.geometry import Polygon

from pipeline.synth.scene import LAND_USES, ROOFS, Roof, Scene, Structure, seeded_rng

PAD_PX = 8  # canvas margin (pixels) that the global misregistration shift samples from
SUN_AZIMUTH = math.radians(160.0)  # sun in the SSE; shadows fall to the NNW
SHADOW_DIR = np.array([-math.sin(SUN_AZIMUTH), -math.cos(SUN_AZIMUTH)])  # map x, y
SUN_PIX = np.array([math.sin(SUN_AZIMUTH), -math.cos(SUN_AZIMUTH)])  # towards the sun in (col, row)
LATITUDE = 43.9
TREE_HEIGHTS = np.array([6.0, 8.0, 10.0, 12.0])  # upper edges of the tree-height classes (m) for shadows
SHADE = np.array([0.42, 0.46, 0.58], dtype=np.float32)[:, None]  # shadows are dark and bluish
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


# ----------------------------------------------------------------------------------------------- helpers
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


def month_look(seed: int, month: str, m: int) -> dict[str, Any]:
    """The month's imaging conditions: season, sun, illumination, misregistration, noise, compression."""
    rng = seeded_rng(seed, 2, m)
    moy = int(month[5:7])
    doy = (moy - 1) * 30.4 + 15
    elevation = max(90 - LATITUDE + 23.44 * math.sin(2 * math.pi * (doy - 81) / 365) - 3, 32.0)
    mag, ang = rng.uniform(1.0, 2.0), rng.uniform(0, 2 * math.pi)
    return dict(
        month=month,
        green=0.5 - 0.5 * math.cos(2 * math.pi * (moy - 1) / 12),
        shadow_k=1 / math.tan(math.radians(elevation)),
        gain=float(rng.uniform(0.88, 1.12)),
        balance=[float(v) for v in 1 + rng.normal(0, 0.03, 3)],
        bias=float(rng.uniform(-6, 6)),
        haze=float(rng.uniform(0, 10)),
        noise=float(rng.uniform(1.5, 3.5)),
        dx=round(mag * math.cos(ang), 3),
        dy=round(mag * math.sin(ang), 3),
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


def render_ground(rng: np.random.Generator, scene: Scene, transform: Affine, shape: tuple[int, int]) -> _Canvas:
    """Ground, trees and roads (no buildings) of ``scene`` on a grid."""
    uses = [(b.geom, _CODE[LAND_USES[b.use]["ground"]]) for b in scene.blocks]
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
        ids = rasterize(
            zip(
                shapely.buffer(shapely.points(trees[:, :2]), trees[:, 2], quad_segs=4),
                range(1, len(trees) + 1),
                strict=True,
            ),
            out_shape=shape,
            transform=transform,
            fill=0,
            dtype="int32",
        )
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


def paint_roofs(
    canvas: _Canvas, items: Sequence[tuple[Polygon, Roof]], win: tuple[slice, slice, Affine] | None = None
) -> None:
    """Paint roofs (colour, ribs or gable shading, eave line) into the canvas or a window of it."""
    if not items:
        return
    rs, cs, transform = win or (slice(None), slice(None), canvas.transform)
    img, roofmask = canvas.img[:, rs, cs], canvas.roof[rs, cs]
    ids = rasterize(
        zip(_geojson([g for g, _ in items]), range(1, len(items) + 1), strict=True),
        out_shape=roofmask.shape,
        transform=transform,
        fill=0,
        dtype="int32",
    )
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


def paint_structures(canvas: _Canvas, items: Sequence[Structure], m: int, seed: int) -> None:
    """Paint the month-``m`` look of each structure: cleared ground first, then roofs on top."""
    looks = [(s, s.at(m)) for s in items]
    for s, cur in looks:
        if cur is not None and cur[0] != "roof":
            month = max(t for t, _, _ in s.states if t <= m)
            _paint_ground(canvas, cur[1], cur[0], seeded_rng(seed, 11, s.index, month))
    for s, cur in looks:
        if cur is not None and cur[0] == "roof":
            win = _window(canvas.transform, canvas.roof.shape, cur[1])
            if win is not None:
                paint_roofs(canvas, [(cur[1], s.roof)], win)


def _geojson(geoms: Sequence[Any]) -> list[dict[str, Any]]:
    """GeoJSON mappings for rasterize, converted in bulk (much faster than one ``__geo_interface__`` each)."""
    return [json.loads(s) for s in shapely.to_geojson(np.asarray(geoms, dtype=object))]


def shadow_mask(structures: Sequence[Structure], canvas: _Canvas, m: int, k: float) -> np.ndarray:
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
        src = canvas.crowns[max(-dr, 0) : shape[0] - max(dr, 0), max(-dc, 0) : shape[1] - max(dc, 0)] == cls + 1
        mask[max(dr, 0) : shape[0] - max(-dr, 0), max(dc, 0) : shape[1] - max(-dc, 0)] |= src
    return mask


def finish_sheet(
    canvas: _Canvas,
    shadow: np.ndarray,
    look: dict[str, Any],
    rng: np.random.Generator,
    r0: int,
    c0: int,
    h: int,
    w: int,
) -> np.ndarray:
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
        left = sub[:, :, ix : ix + w]
        cols = left + fx * (sub[:, :, ix + 1 : ix + 1 + w] - left)
        strip = cols[:, :-1] + fy * (cols[:, 1:] - cols[:, :-1])
        strip += look["noise"] * rng.standard_normal(strip.shape, dtype=np.float32) + 0.5
        out[:, a:b] = np.clip(strip, 0, 255)
    return out


def sheet_profile(look: dict[str, Any], crs: CRS, transform: Affine, h: int, w: int) -> dict[str, Any]:
    """The GeoTIFF profile of one month's ``h`` x ``w`` sheet (compression from the month's ``look``)."""
    profile: dict[str, Any] = dict(
        driver="GTiff",
        width=w,
        height=h,
        count=3,
        dtype="uint8",
        crs=crs,
        transform=transform,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        interleave="pixel",
    )
    if look["compress"] == "jpeg":
        profile.update(compress="JPEG", photometric="YCBCR", jpeg_quality=85)
    else:
        profile.update(compress="DEFLATE", predictor=2, photometric="RGB")
    return profile
