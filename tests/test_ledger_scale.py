"""The ledger join at scale: spatial-index matches equal the rule, on generated cities and on real polygons.

The timings (100,000 flags x 50,000 cases) are ``benchmarks/bench_ledger.py``'s; these tests check what
is matched to what, never how fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from shapely.geometry import box

from pipeline.config import LedgerSettings
from pipeline.ledger import read_ledger
from pipeline.ledger.builder import LedgerBuilder
from pipeline.ledger.lifecycle import REMOVED_STATES
from pipeline.ledger.matching import is_expansion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_ledger  # noqa: E402

D = LedgerSettings().match_distance_m
RATIO = LedgerSettings().expand_ratio


def _recorded(builder: LedgerBuilder) -> dict[str, list[tuple[str, str]]]:
    """flag id -> [(case id, kind), ...] of the imagery events that name it."""
    out: dict[str, list[tuple[str, str]]] = {}
    for e in builder.events:
        if e.source == "imagery":
            out.setdefault(e.evidence, []).append((e.case_id, e.kind))
    return out


def test_generated_city_every_flag_lands_where_it_was_put() -> None:
    seeds, flags = bench_ledger.generate(3000, 6000, seed=7)
    builder, _ = bench_ledger.join(seeds, flags)
    on = _recorded(builder)
    state = dict(zip(seeds["case_id"], seeds["state"], strict=True))
    opened = {f: c for f, rec in on.items() for c, k in rec if k == "flagged"}
    for f in flags.itertuples(index=False):
        rec = on.get(f.flag_id, [])
        if f.role == "hit" and state[f.target] == "dismissed":  # never matched: new construction opens a case
            assert [k for _, k in rec] == ["flagged"], f.flag_id
        elif f.role == "hit" and state[f.target] in REMOVED_STATES:  # 反弹: reopened, then the observation
            assert rec == [(f.target, "reopened"), (f.target, "rebuilt")], f.flag_id
        elif f.role == "hit":
            assert len(rec) == 1 and rec[0][0] == f.target and rec[0][1] in ("observed_present", "expanded")
        elif f.role == "removed":
            cases = {c for c, _ in rec}
            assert all(k == "observed_removed" for _, k in rec)
            assert (f.target in cases) == (state[f.target] != "dismissed"), f.flag_id
        elif f.role == "fresh" and f.flag_id in opened:
            assert rec == [(opened[f.flag_id], "flagged")]
    # a twin and its fresh flag share one case, whichever of the two came first and opened it
    twins = flags[flags["role"] == "twin"]
    assert len(twins) == 300
    for t in twins.itertuples(index=False):
        (a,), (b,) = {c for c, _ in on[t.flag_id]}, {c for c, _ in on[t.target]}
        assert a == b
    fresh_or_twin = flags["role"].isin(["fresh", "twin"])
    dismissed_hits = flags[(flags["role"] == "hit") & flags["target"].map(state).eq("dismissed")]
    assert len(opened) == int(fresh_or_twin.sum()) - len(twins) + len(dismissed_hits)
    reopened = [e.case_id for e in builder.events if e.kind == "reopened"]
    assert len(reopened) == len(set(reopened)) and all(state[c] in REMOVED_STATES for c in reopened)
    assert all(builder.cases[c].state == "warning" for c in reopened)  # back in the loop, not closed


def _reference(seeds: gpd.GeoDataFrame, flags: gpd.GeoDataFrame) -> list[tuple[str, str]]:
    """The join rule of pipeline.ledger.matching, checked against every case (quadratic; small inputs only)."""
    ids = list(seeds["case_id"])
    foot = list(seeds.geometry)
    states = list(seeds["state"])
    out = []
    for f in flags[flags["kind"] == "new"].itertuples(index=False):
        g = f.geometry
        near = [i for i in range(len(ids)) if states[i] != "dismissed" and shapely.dwithin(foot[i], g, D)]
        if not near:
            ids.append(f"new:{f.flag_id}")
            foot.append(g)
            states.append("warning")
            out.append((ids[-1], "flagged"))
            continue
        i = min(near, key=lambda i: (-round(foot[i].intersection(g).area, 6), foot[i].distance(g), ids[i]))
        if states[i] in REMOVED_STATES:
            kind, states[i] = "rebuilt", "warning"
        else:
            kind = "expanded" if is_expansion(foot[i], g, RATIO) else "observed_present"
        foot[i] = shapely.union(foot[i], g)
        out.append((ids[i], kind))
    return out


def test_index_join_equals_the_quadratic_rule_on_crowded_random_flags() -> None:
    """Flags scattered densely (many within the match distance of several cases and of each other)."""
    rng = np.random.default_rng(11)
    seeds, _ = bench_ledger.generate(400, 200, seed=3)
    n = 1500
    x = bench_ledger.X0 + rng.uniform(0, 20 * bench_ledger.PITCH, n)
    y = bench_ledger.Y0 + rng.uniform(0, 20 * bench_ledger.PITCH, n)
    w = rng.uniform(2, 25, n)
    flags = gpd.GeoDataFrame(
        {"flag_id": [f"R{i:05d}" for i in range(n)], "kind": "new", "district": "", "street": ""},
        geometry=shapely.box(x, y, x + w, y + w * rng.uniform(0.5, 1.5, n)),
        crs=bench_ledger.CRS,
    )
    builder, _ = bench_ledger.join(seeds, flags)
    on = _recorded(builder)
    got = [next((c, k) for c, k in on[f] if k != "reopened") for f in flags["flag_id"]]
    expected = _reference(seeds, flags)
    new_id = {f"new:{f}": c for f, rec in on.items() for c, k in rec if k == "flagged"}
    assert [(new_id.get(c, c), k) for c, k in expected] == got
    assert sum(k == "flagged" for _, k in got) > 100 and sum(k == "expanded" for _, k in got) > 100


def test_a_footprint_grown_this_month_catches_the_next_flag() -> None:
    """Flag A widens case C; flag B lies 3 m beyond A, 13 m from C's seed polygon: B is on C, not a new case."""
    seeds = gpd.GeoDataFrame(
        {"case_id": ["C"], "opened_at": "2025-12-01", "state": "confirmed", "category": "illegal_construction"}
        | {"note": "", "deadline": ""},
        geometry=[box(0, 0, 10, 10)],
        crs=bench_ledger.CRS,
    )
    flags = gpd.GeoDataFrame(
        {"flag_id": ["A", "B"], "kind": "new", "district": "", "street": ""},
        geometry=[box(8, 0, 20, 10), box(23, 0, 30, 10)],
        crs=bench_ledger.CRS,
    )
    builder, _ = bench_ledger.join(seeds, flags)
    assert _recorded(builder) == {"A": [("C", "expanded")], "B": [("C", "expanded")]}


# -- real polygons: Blackshark.ai Turkey 2023 change polygons and roofprints (CC BY-NC 4.0) -----------------


@pytest.mark.realdata
def test_blackshark_changes_against_roofprints_through_the_ledger_build(shared_data: Path, tmp_path: Path) -> None:
    """27,843 roofprints as seed cases (every other one closed), 582 change polygons as one month's flags."""
    project = bench_ledger.blackshark_project(shared_data, tmp_path)
    seeds, flags = project.seeds, project.flags
    assert (len(seeds), len(flags), project.missing) == (27843, 582, 23)  # the data's README: 23 without geometry
    seconds = bench_ledger.build_project(project)
    sys.stderr.write(f"blackshark ledger build: {seconds:.1f} s\n")
    events, cases, _ = read_ledger(tmp_path / "ledger.gpkg")

    imagery = events[events["source"] == "imagery"]
    on = imagery.groupby("evidence")["case_id"].agg(set)
    assert set(on.index) == set(flags["flag_id"])  # every change polygon is on record, once per case
    # the roofprints each change polygon overlaps, from geopandas (an independent join)
    hits = gpd.sjoin(flags[["flag_id", "geometry"]], seeds[["case_id", "geometry"]], predicate="intersects")
    overlaps = hits.assign(
        a=shapely.area(
            shapely.intersection(flags.geometry.values[hits.index], seeds.geometry.values[hits["index_right"]])
        )
    )
    overlaps = overlaps[overlaps["a"] > 0]
    assert overlaps["flag_id"].nunique() >= 250  # 281 change polygons touch a roofprint
    seed_ids = set(seeds["case_id"])
    for flag_id, group in overlaps.groupby("flag_id"):
        (case,) = on[flag_id]
        assert case in set(group["case_id"]), flag_id  # on a roofprint it overlaps, never a new case
    # a change polygon that no roofprint and no earlier change polygon comes within 5 m of opens a case
    near_roof = set(gpd.sjoin(flags, seeds[["geometry"]], predicate="dwithin", distance=D)["flag_id"])
    a, b = shapely.STRtree(flags.geometry.values).query(flags.geometry.values, predicate="dwithin", distance=D)
    after_another = set(flags["flag_id"].to_numpy()[a[b < a]])
    alone = set(flags["flag_id"]) - near_roof - after_another
    opened = set(imagery.loc[imagery["kind"] == "flagged", "evidence"])
    assert alone <= opened and opened <= set(flags["flag_id"]) - near_roof
    assert len(cases) == len(seeds) + len(opened)
    # 反弹: every closed roofprint a change lands on reopens, once, and counts as open again
    reopened = imagery.loc[imagery["kind"] == "reopened", "case_id"]
    closed_hit = {c for f in on.index for c in on[f] if c in seed_ids and int(c[1:]) % 2 == 0}
    assert reopened.is_unique and set(reopened) == closed_hit and len(closed_hit) > 50
    assert (cases.set_index("case_id").loc[sorted(closed_hit), "state"] == "warning").all()
