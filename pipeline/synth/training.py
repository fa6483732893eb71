"""Training chips from the demo town's code: a random small scene before and after a few random events."""

from __future__ import annotations

import math

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.io import MemoryFile
from shapely.geometry import box

from pipeline.synth.plan import ILLEGAL_PREF, Occupancy, place_structure
from pipeline.synth.render import (
    PAD_PX,
    finish_sheet,
    month_look,
    paint_roofs,
    paint_structures,
    render_ground,
    shadow_mask,
    sheet_profile,
)
from pipeline.synth.scene import ROOFS, Roof, Structure, build_scene, rotated_rect, weighted_choice


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
    structures = [
        Structure(f"B{i}", i, "building", True, r, [(0, "roof", g)]) for i, (g, r, _) in enumerate(scene.buildings)
    ]
    occ = Occupancy(scene, box(0, 0, ext, ext))
    pref = {**ILLEGAL_PREF, "site": 2.0}
    for _ in range(int(rng.integers(1, 5))):
        dims = place_structure(rng, scene, occ, float(np.exp(rng.uniform(math.log(15), math.log(400)))), pref)
        if dims is None:
            continue
        roof = Roof(
            weighted_choice(rng, {k: 1.0 for k in ROOFS}),
            dims[4],
            float(rng.uniform(2.5, 8)),
            float(rng.uniform(0.9, 1.08)),
        )
        s = Structure(
            f"S{len(structures)}", len(structures), "illegal", False, roof, [(1, "roof", rotated_rect(*dims))], dims
        )
        if rng.random() < 0.25:  # already there, then expanded
            cx, cy, length, width, angle = dims
            small = rotated_rect(
                cx - length / 4 * math.cos(math.radians(angle)),
                cy - length / 4 * math.sin(math.radians(angle)),
                length / 2,
                width,
                angle,
            )
            s.states = [(0, "roof", small), (1, "roof", rotated_rect(*dims))]
        structures.append(s)
        occ.dynamic[s.sid] = rotated_rect(*dims).buffer(2.0)
    inside = [s for s in structures[: len(scene.buildings)] if box(0, 0, ext, ext).intersects(s.states[0][2])]
    for i in rng.permutation(len(inside))[: int(rng.integers(0, 3))]:
        s = inside[int(i)]
        s.states.append((1, str(rng.choice(["rubble", "soil", "grass"])), s.states[0][2]))
    full = (size + 2 * PAD_PX, size + 2 * PAD_PX)
    grid = Affine(gsd, 0, 0, 0, -gsd, ext)
    padded = grid * Affine.translation(-PAD_PX, -PAD_PX)
    seed = int(rng.integers(2**31))
    base = render_ground(rng, scene, padded, full)
    paint_roofs(base, [(s.states[0][2], s.roof) for s in structures if s.states[0][0] == 0])
    images = np.empty((2, 3, size, size), np.uint8)
    for t in range(2):
        canvas = base.copy()
        paint_structures(canvas, [s for s in structures if s.changed_after_start()], t, seed)
        month = f"2026-{int(rng.integers(1, 13)):02d}"
        look = month_look(seed, month, t)
        look["compress"] = "jpeg" if rng.random() < 0.5 else "none"
        shadow = shadow_mask(structures, canvas, t, look["shadow_k"])
        arr = finish_sheet(canvas, shadow, look, rng, 0, 0, size, size)
        if look["compress"] == "jpeg":
            with MemoryFile() as mem:
                with mem.open(**sheet_profile(look, CRS.from_epsg(4551), grid, size, size)) as dst:
                    dst.write(arr)
                with mem.open() as src:
                    arr = src.read()
        images[t] = arr
    labels = np.zeros((2, size, size), np.uint8)
    roofs = []
    for t in range(2):
        geoms = [cur[1] for s in structures if (cur := s.at(t)) is not None and cur[0] == "roof"]
        roofs.append(
            rasterize(geoms, out_shape=(size, size), transform=grid, dtype="uint8") > 0
            if geoms
            else np.zeros((size, size), bool)
        )
    labels[0] = roofs[1] & ~roofs[0]
    labels[1] = roofs[0] & ~roofs[1]
    return images, labels
