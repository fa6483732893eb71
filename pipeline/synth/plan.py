"""The demo town's event script: structures' monthly histories, truth, field updates, permits, seed cases.

:func:`plan_demo` turns :class:`DemoSettings` into a :class:`DemoPlan` without touching a pixel. Month
``m`` draws only from generators seeded with ``(seed, stream, m)``, so a longer run repeats a shorter one.
"""

from __future__ import annotations

import calendar
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon, box

from pipeline.config import DemoSettings
from pipeline.synth.render import PAD_PX, month_look
from pipeline.synth.scene import Roof, Scene, Structure, build_scene, rotated_rect, seeded_rng, weighted_choice

log = logging.getLogger(__name__)

AREA_FULL = 2000.0 * 2000.0  # the reference district that the event rates are given for
ILLEGAL_PREF = {"village": 3.0, "soil": 3.0, "industrial": 2.0, "green": 1.5, "residential": 1.5, "site": 0.5}
_PERMIT_PREF = {"soil": 3.0, "site": 2.0, "green": 1.0, "industrial": 1.0}
# Per-month event rates for a 2 x 2 km district and the minimum count scripted in a given month index.
_RATES = {"appeared": 3.0, "expanded": 0.6, "demolished": 0.8, "rebuilt": 0.2, "permitted": 0.4, "removed": 0.4}
_MINIMA = {
    "appeared": range(1, 37),
    "expanded": (2, 5),
    "demolished": (1, 3, 5),
    "rebuilt": (3,),
    "permitted": (1, 4),
    "removed": (2, 5),
}
_INSPECTORS = ("王磊", "李娜", "刘洋", "陈静", "赵敏", "孙浩")


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


def _month_add(month: str, k: int) -> str:
    y, m = int(month[:4]), int(month[5:7]) - 1 + k
    return f"{y + m // 12:04d}-{m % 12 + 1:02d}"


def _date(month: str, day: int) -> str:
    y, m = int(month[:4]), int(month[5:7])
    return f"{month}-{min(max(day, 1), calendar.monthrange(y, m)[1]):02d}"


# ---------------------------------------------------------------------------------------------- planning
class Occupancy:
    """What new structures must not overlap: roads, buildings, ground features and earlier structures."""

    def __init__(self, scene: Scene, inner: Polygon) -> None:
        static = [
            *scene.roads,
            scene.sidewalks,
            *(g for g, _, _ in scene.buildings),
            *(g for g, k in scene.features if k != "farm"),
        ]
        self.tree = shapely.STRtree([g for g in static if not g.is_empty])
        self.inner = inner
        self.dynamic: dict[str, Polygon] = {}
        self.by_block: dict[int, list[Polygon]] = {}
        for g, _, bi in scene.buildings:
            self.by_block.setdefault(bi, []).append(g)

    def free(self, geom: Polygon, ignore: str = "") -> bool:
        """Whether ``geom`` lies inside the town and overlaps nothing (the structure ``ignore`` aside)."""
        if not self.inner.contains(geom) or self.tree.query(geom, predicate="intersects").size:
            return False
        return not any(g.intersects(geom) for k, g in self.dynamic.items() if k != ignore)


def place_structure(
    rng: np.random.Generator,
    scene: Scene,
    occ: Occupancy,
    area: float,
    pref: dict[str, float],
    *,
    margin: float = 1.5,
    attach: float = 0.5,
) -> tuple[float, float, float, float, float] | None:
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
        g = rotated_rect(float(centre[0]), float(centre[1]), length, width, angle)
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
    scene = build_scene(seeded_rng(seed, 1), (x0 - pad, y0 - pad, x0 + size + pad, y0 + size + pad))
    occ = Occupancy(scene, box(x0 + 3, y0 + 3, x0 + size - 3, y0 + size - 3))
    structures = [
        Structure(f"B{i + 1:05d}", i, "building", True, r, [(0, "roof", g)])
        for i, (g, r, _) in enumerate(scene.buildings)
    ]
    scale = size * size / AREA_FULL
    changes: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    permits: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []

    def new_structure(
        rng: np.random.Generator,
        m: int,
        category: str,
        area: float,
        pref: dict[str, float],
        style: str,
        height: tuple[float, float],
    ) -> Structure | None:
        dims = place_structure(rng, scene, occ, area, pref, attach=0.5 if category == "illegal" else 0.0)
        if dims is None:
            log.debug("no free spot for a %r structure in month %d", category, m)
            return None
        n = sum(s.category != "building" for s in structures) + 1
        roof = Roof(
            style, dims[4] + 90 * int(rng.integers(0, 2)), float(rng.uniform(*height)), float(rng.uniform(0.9, 1.08))
        )
        s = Structure(
            f"S{n:04d}",
            len(structures),
            category,
            category != "illegal",
            roof,
            [(m, "roof", rotated_rect(*dims))],
            dims,
            stage_month=m,
        )
        structures.append(s)
        occ.dynamic[s.sid] = s.states[0][2].buffer(2.0)
        return s

    def update(m: int, day: int, kind: str, s: Structure, note: str, deadline: str = "") -> None:
        p = s.states[-1][2].representative_point()
        updates.append(
            dict(
                month=m,
                at=_date(months[m], day),
                kind=kind,
                actor=_INSPECTORS[s.index % 6],
                note=note,
                deadline=deadline,
                case_id=s.case_id,
                x=None if s.case_id else round(p.x, 2),
                y=None if s.case_id else round(p.y, 2),
            )
        )

    def change(m: int, s: Structure, kind: str, event: str) -> None:
        changes.append(
            dict(
                month=m,
                kind=kind,
                structure_id=s.sid,
                legal=s.legal,
                event=event,
                geometry=s.states[-1][2] if kind == "new" else s.at(m - 1)[1],  # type: ignore[index]
            )
        )

    def illegal_style(rng: np.random.Generator) -> str:
        return weighted_choice(rng, {"blue_steel": 6, "light_blue_steel": 2, "white": 1, "grey_concrete": 1})

    # month 0: the seed ledger (existing illegal structures and one scar)
    rng0 = seeded_rng(seed, 3, 0)
    n_seed = max(4, min(8, round(6 * scale) + 1))
    states = ["ordered", "ordered", "stopped", "confirmed"] + ["stopped", "confirmed", "ordered"] * 2
    for k in range(n_seed):
        cat = "scar" if k == n_seed - 1 else "illegal"
        s = new_structure(
            rng0,
            0,
            cat,
            float(np.exp(rng0.uniform(math.log(40), math.log(300)))),
            ILLEGAL_PREF,
            illegal_style(rng0),
            (2.5, 4.5),
        )
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
        cases.append(
            dict(
                case_id=s.case_id,
                opened_at=_date(opened, int(rng0.integers(1, 28))),
                state=s.stage,
                category="scar" if cat == "scar" else "illegal_construction",
                note=note,
                deadline=s.deadline,
                geometry=s.states[0][2],
            )
        )

    looks = [month_look(seed, months[m], m) for m in range(len(months))]
    for m in range(1, len(months)):
        rng = seeded_rng(seed, 4, m)
        quota = {k: max(int(m in _MINIMA[k]), int(rng.poisson(r * scale))) for k, r in _RATES.items()}
        live = [s for s in structures if s.category in ("illegal", "scar")]
        # demolitions (earliest deadline first), then repairs of earlier demolitions
        cands = sorted(
            (s for s in live if s.stage == "ordered" and s.stage_month < m and not s.stubborn),
            key=lambda s: (s.deadline, s.sid),
        )
        for s in cands[: quota["demolished"]]:
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
        for s in [s for s in live if s.category == "illegal" and 0 < s.demolished_month <= m - 2 and not s.rebuilt][
            : quota["rebuilt"]
        ]:
            cx, cy, length, width, angle = s.dims
            dims = (cx, cy, length * rng.uniform(0.95, 1.25), width * rng.uniform(0.95, 1.1), angle)
            if not occ.free(rotated_rect(*dims), ignore=s.sid):
                dims = s.dims
            n = sum(t.category != "building" for t in structures) + 1
            r = Structure(
                f"S{n:04d}",
                len(structures),
                "illegal",
                False,
                Roof(illegal_style(rng), angle, float(rng.uniform(2.5, 4)), 1.0),
                [(m, "roof", rotated_rect(*dims))],
                dims,
                stage="rebuilt",
                stage_month=m,
            )
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
        cands = [
            s
            for s in live
            if s.category == "illegal"
            and s.states[-1][1] == "roof"
            and not s.expanded
            and s.states[0][0] < m
            and s.stage != "rebuilt"
        ]
        for i in rng.permutation(len(cands))[: quota["expanded"]]:
            s = cands[int(i)]
            cx, cy, length, width, angle = s.dims
            extra = length * rng.uniform(0.5, 1.0)
            a = math.radians(angle)
            for side in (1.0, -1.0):
                dims = (
                    cx + side * extra / 2 * math.cos(a),
                    cy + side * extra / 2 * math.sin(a),
                    length + extra,
                    width,
                    angle,
                )
                if occ.free(rotated_rect(*dims).buffer(1.5), ignore=s.sid):
                    s.dims, s.expanded = dims, True
                    s.states.append((m, "roof", rotated_rect(*dims)))
                    occ.dynamic[s.sid] = s.states[-1][2].buffer(2.0)
                    change(m, s, "new", "expanded")
                    break
        # removals of existing legal buildings (urban renewal)
        cands = [
            s
            for s in structures
            if s.category == "building" and s.states[-1][1] == "roof" and s.states[0][2].area < 1200
        ]
        for i in rng.permutation(len(cands))[: quota["removed"]]:
            s = cands[int(i)]
            s.states.append((m, "rubble" if rng.random() < 0.6 else "soil", s.states[0][2]))
            change(m, s, "removed", "removed")
        # new illegal structures, then permitted construction
        for _ in range(quota["appeared"]):
            area = float(np.exp(rng.uniform(math.log(20), math.log(300))))
            s = new_structure(rng, m, "illegal", area, ILLEGAL_PREF, illegal_style(rng), (2.5, 4.5))
            if s is not None:
                change(m, s, "new", "appeared")
        for _ in range(quota["permitted"]):
            s = new_structure(
                rng,
                m,
                "permitted",
                float(rng.uniform(300, 1000)),
                _PERMIT_PREF,
                weighted_choice(rng, {"grey_concrete": 2, "white": 1}),
                (8, 16),
            )
            if s is None:
                continue
            pid = f"JZ{months[m][:4]}-{len(permits) + 1:03d}"
            cx, cy, length, width, angle = s.dims
            area_poly = rotated_rect(cx, cy, length + 2 * rng.uniform(5, 12), width + 2 * rng.uniform(5, 12), angle)
            permits.append(
                dict(
                    month=m,
                    permit_id=pid,
                    valid_from=_date(_month_add(months[m], -2), 1),
                    valid_to=_date(_month_add(months[m], 16), 28),
                    note="建设工程规划许可证",
                    geometry=area_poly,
                )
            )
            occ.dynamic[s.sid] = area_poly
            change(m, s, "new", "permitted")
            if m + 1 < len(months):
                update(m + 1, int(rng.integers(2, 10)), "dismissed", s, f"permit {pid}")
    return DemoPlan(
        settings,
        months,
        scene,
        tuple(structures),
        tuple(changes),
        tuple(sorted(updates, key=lambda u: (u["month"], u["at"]))),
        tuple(permits),
        tuple(cases),
        tuple(looks),
    )
