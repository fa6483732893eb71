"""The ledger join at city scale: a month of generated flags against a ledger of generated cases.

A city of ``--cases`` seed cases on a 60 m lattice (10-20 m squares; one in ten dismissed, one in five
demolished or closed) and ``--flags`` flags of one month, by construction (:func:`generate`):

* ``hit``: a ``new`` flag overlapping one case (an observation, an expansion, or a rebuild that reopens
  a demolished or closed case; on a dismissed case it opens a new case instead);
* ``fresh``: a ``new`` flag in the gap between four cases, more than 5 m from any (opens a case);
* ``twin``: a second ``new`` flag 2 m beside a fresh one (matched to the case the fresh one opened, which
  only the month's own flags can find: :class:`pipeline.ledger.matching.MonthJoin`);
* ``removed``: a ``removed`` flag over a case.

The join is :meth:`pipeline.ledger.builder.LedgerBuilder.imagery` after the seed cases are loaded, the
real code of ``scarwatch ledger build``. It runs in a subprocess so that its peak RSS is its own
(``resource.getrusage``); the figures are printed as one JSON line and written flat to ``--json``.

Usage::

    .venv/bin/python benchmarks/bench_ledger.py --flags 100000 --cases 50000 --json .bench/ledger.json

``seconds`` is wall time, ``cpu_seconds`` the CPU time of the join (what a machine shared with a
training run does not inflate); ``load_before``/``load_after`` the 1-minute load average.

Measured 2026-12-01 on the 2-core Xeon beside a training run (load average 7): 100,000 flags x 50,000
cases 8.2 s wall, 3.2 CPU-s, peak RSS 485 MB (254 MB before the join); ``--blackshark ../shared/data``
(582 change polygons x 27,843 roofprints, the whole ``ledger build`` with its GeoPackage) 5.9 s, 393 MB.
Run it at normal priority: under ``nice`` beside the training run the same join took 66 s of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CRS = "EPSG:4551"
MONTH = "2026-03"
X0, Y0 = 500000.0, 4860000.0
PITCH = 60.0  # case lattice (m): neighbours are far more than the 5 m match distance apart
STATES = ("warning", "confirmed", "stopped", "ordered", "demolished", "closed")


def _state(i: int) -> str:
    """The seed state of case ``i``: one in ten dismissed, one in five demolished or closed."""
    if i % 10 == 0:
        return "dismissed"
    return STATES[i % len(STATES)]


def generate(n_cases: int, n_flags: int, seed: int = 20261201) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """Seed cases and one month's flags, laid out so that each flag's case follows from its ``role``.

    Returns:
        ``(seeds, flags)``: seeds with the seed-ledger columns (``case_id`` ``C<n>``); flags with the
        columns the ledger reads plus ``role`` (hit | fresh | twin | removed) and ``target`` (the seed
        case id a hit or removed flag lies on, the fresh flag id a twin lies beside, "" for fresh).
    """
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_cases)))
    idx = np.arange(n_cases)
    gx, gy = X0 + (idx % side) * PITCH, Y0 + (idx // side) * PITCH
    size = rng.uniform(10.0, 20.0, n_cases)
    seeds = gpd.GeoDataFrame(
        {
            "case_id": [f"C{i:06d}" for i in idx],
            "opened_at": "2025-12-01",
            "state": [_state(int(i)) for i in idx],
            "category": "illegal_construction",
            "note": "",
            "deadline": "",
        },
        geometry=shapely.box(gx, gy, gx + size, gy + size),
        crs=CRS,
    )
    n_removed = n_flags * 15 // 100
    n_twin = n_flags * 5 // 100
    n_fresh = n_flags * 40 // 100
    n_hit = n_flags - n_removed - n_twin - n_fresh
    if n_hit > n_cases or n_fresh > n_cases or n_twin > n_fresh:
        raise SystemExit(f"{n_flags} flags need at least {max(n_hit, n_fresh)} cases; give more --cases")
    hit = rng.choice(n_cases, n_hit, replace=False)
    # a hit covers 3-8 m of its case's lower-left corner region, shifted up to 4 m out of it
    w = rng.uniform(3.0, 8.0, n_hit)
    hx, hy = gx[hit] + rng.uniform(-4.0, 6.0, n_hit), gy[hit] + rng.uniform(-4.0, 6.0, n_hit)
    gap = rng.choice(n_cases, n_fresh, replace=False)  # the gap above-right of case `gap`: >= 15 m from any case
    fx, fy = gx[gap] + 36.0, gy[gap] + 36.0
    fw = rng.uniform(4.0, 8.0, n_fresh)
    twin_of = rng.choice(n_fresh, n_twin, replace=False)
    tx, ty = fx[twin_of] + fw[twin_of] + 2.0, fy[twin_of]  # 2 m to the right of its fresh flag
    removed = rng.choice(n_cases, n_removed, replace=False)
    geoms = np.concatenate(
        [
            shapely.box(hx, hy, hx + w, hy + w),
            shapely.box(fx, fy, fx + fw, fy + fw),
            shapely.box(tx, ty, tx + 4.0, ty + 4.0),
            shapely.box(gx[removed] + 1, gy[removed] + 1, gx[removed] + size[removed] - 1, gy[removed] + 5),
        ]
    )
    fresh_ids = [f"F-{MONTH.replace('-', '')}-fresh-{k:06d}" for k in range(n_fresh)]
    ids = [f"F-{MONTH.replace('-', '')}-hit-{k:06d}" for k in range(n_hit)]
    ids += fresh_ids
    ids += [f"F-{MONTH.replace('-', '')}-twin-{k:06d}" for k in range(n_twin)]
    ids += [f"F-{MONTH.replace('-', '')}-removed-{k:06d}" for k in range(n_removed)]
    roles = ["hit"] * n_hit + ["fresh"] * n_fresh + ["twin"] * n_twin + ["removed"] * n_removed
    targets = [seeds["case_id"].iat[i] for i in hit] + [""] * n_fresh
    targets += [fresh_ids[j] for j in twin_of] + [seeds["case_id"].iat[i] for i in removed]
    flags = gpd.GeoDataFrame(
        {
            "flag_id": ids,
            "month": MONTH,
            "kind": ["removed" if r == "removed" else "new" for r in roles],
            "district": "南关区",
            "street": "永吉街道",
            "role": roles,
            "target": targets,
        },
        geometry=geoms,
        crs=CRS,
    )
    # processing order is flag-id order in a real month; shuffle so twins may come before their fresh flag
    order = rng.permutation(len(flags))
    return seeds, flags.iloc[order].reset_index(drop=True)


def join(seeds: gpd.GeoDataFrame, flags: gpd.GeoDataFrame) -> tuple[object, dict[str, float]]:
    """Load the seeds into a :class:`LedgerBuilder` and join the month's flags; return it and the timings."""
    from pipeline.config import LedgerSettings
    from pipeline.ledger.builder import LedgerBuilder

    builder = LedgerBuilder(LedgerSettings(), None)
    t0 = time.perf_counter()
    builder.seed(seeds, Path("ledger/cases.gpkg"))
    t1, c1 = time.perf_counter(), _cpu()
    permits = gpd.GeoDataFrame(
        {"permit_id": [], "valid_from": [], "valid_to": []}, geometry=gpd.GeoSeries([], crs=CRS), crs=CRS
    )
    builder.imagery(MONTH, flags, permits, Path(f"flags/{MONTH}.gpkg"))
    t2, c2 = time.perf_counter(), _cpu()
    return builder, {"seed_seconds": round(t1 - t0, 3), "seconds": round(t2 - t1, 3), "cpu_seconds": round(c2 - c1, 3)}


def _cpu() -> float:
    """CPU seconds this process has used (user + system): the figure a busy machine does not inflate."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Project:
    """A ledger project on disk: ``raw/ledger/cases.gpkg`` and one month's ``flags/<month>.gpkg``."""

    root: Path
    month: str
    seeds: gpd.GeoDataFrame
    flags: gpd.GeoDataFrame
    missing: int  # change polygons without geometry, left out (vectorize never writes one)


def blackshark_project(shared: Path, root: Path, month: str = "2023-02") -> Project:
    """The Blackshark.ai Turkey 2023 polygons (../shared/data/blackshark-turkey, CC BY-NC 4.0) as a ledger project.

    The 27,843 roofprints of both catalogs become seed cases ``R<nnnnn>`` (every other one ``closed``, the
    others ``warning``); the change polygons of the three catalogs, in file order, one month's ``new``
    flags ``B<nnnn>``, EPSG:3857 as delivered.
    """
    from pipeline.formats import MU_M2

    data = shared / "blackshark-turkey"
    roofs = pd.concat([gpd.read_file(p) for p in sorted((data / "roofprints").glob("*.gpkg"))], ignore_index=True)
    changes = pd.concat([gpd.read_file(p) for p in sorted((data / "changes").glob("*.gpkg"))], ignore_index=True)
    absent = changes.geometry.isna() | changes.geometry.is_empty
    changes = changes[~absent].reset_index(drop=True)
    seeds = gpd.GeoDataFrame(
        {
            "case_id": [f"R{i:05d}" for i in range(len(roofs))],
            "opened_at": "2022-06-01",
            "state": ["closed" if i % 2 == 0 else "warning" for i in range(len(roofs))],
            "category": "illegal_construction",
            "note": "",
            "deadline": "",
        },
        geometry=shapely.make_valid(roofs.geometry.values),
        crs=roofs.crs,
    )
    (root / "raw" / "ledger").mkdir(parents=True, exist_ok=True)
    seeds.to_file(root / "raw" / "ledger" / "cases.gpkg", layer="cases", driver="GPKG", engine="pyogrio")
    area = changes.geometry.area
    flags = gpd.GeoDataFrame(
        {"flag_id": [f"B{i:04d}" for i in range(len(changes))], "month": month, "kind": "new"}
        | {"area_m2": area, "area_mu": area / MU_M2, "p_mean": 1.0, "p_max": 1.0, "lon": 0.0, "lat": 0.0}
        | {"district": "", "street": ""},
        geometry=changes.geometry.values,
        crs=changes.crs,
    )
    (root / "flags").mkdir(exist_ok=True)
    flags.to_file(root / "flags" / f"{month}.gpkg", layer="flags", driver="GPKG", engine="pyogrio")
    return Project(root, month, seeds, flags, int(absent.sum()))


def build_project(project: Project) -> float:
    """``scarwatch ledger build`` of the project (the real ``build_ledger``) into ``ledger.gpkg``; seconds."""
    from pipeline.config import LedgerSettings
    from pipeline.ledger import build_ledger

    t0 = time.perf_counter()
    flags = [project.root / "flags" / f"{project.month}.gpkg"]
    build_ledger(flags, project.root / "raw", project.root / "ledger.gpkg", LedgerSettings(), months=[project.month])
    return time.perf_counter() - t0


def _worker_blackshark(shared: Path) -> dict[str, object]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        project = blackshark_project(shared, Path(tmp))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        c0 = _cpu()
        seconds = build_project(project)
        cpu = _cpu() - c0
        import pyogrio

        events = pyogrio.read_info(project.root / "ledger.gpkg", layer="events")["features"]
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_build_mb": round(rss_before, 1),
        "flags": len(project.flags),
        "cases": len(project.seeds),
        "events": int(events),
    }


def _worker(n_flags: int, n_cases: int) -> dict[str, object]:
    seeds, flags = generate(n_cases, n_flags)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    builder, times = join(seeds, flags)
    kinds = pd.Series([e.kind for e in builder.events if e.source == "imagery"]).value_counts()  # type: ignore[attr-defined]
    return {
        **times,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_join_mb": round(rss_before, 1),
        "events": len(builder.events),  # type: ignore[attr-defined]
        "new_cases": int(kinds.get("flagged", 0)),
        "reopened": int(kinds.get("reopened", 0)),
        "observed": int(kinds.get("observed_present", 0) + kinds.get("expanded", 0) + kinds.get("rebuilt", 0)),
        "observed_removed": int(kinds.get("observed_removed", 0)),
    }


def main() -> None:
    """Run the join in a subprocess and print / write its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flags", type=int, default=100_000)
    ap.add_argument("--cases", type=int, default=50_000)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here (flat JSON)")
    ap.add_argument(
        "--blackshark",
        type=Path,
        default=None,
        metavar="SHARED",
        help="instead: the whole `ledger build` of the Blackshark polygons in SHARED/blackshark-turkey",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = _worker_blackshark(args.blackshark) if args.blackshark else _worker(args.flags, args.cases)
        sys.stdout.write(json.dumps(result) + "\n")
        return
    load_before = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--worker", "--flags", str(args.flags), "--cases", str(args.cases)]
    cmd += ["--blackshark", str(args.blackshark)] if args.blackshark else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.blackshark:
        name, what = "ledger_build_blackshark", "scarwatch ledger build: Blackshark change polygons x roofprints"
        command = f"python benchmarks/bench_ledger.py --blackshark {args.blackshark}"
    else:
        name, what = "ledger_join", "LedgerBuilder.imagery: one month's flags joined to the cases (STRtree)"
        command = f"python benchmarks/bench_ledger.py --flags {args.flags} --cases {args.cases}"
    out = {
        "name": name,
        "description": what,
        "seconds": figures.pop("seconds"),
        "peak_rss_mb": figures.pop("peak_rss_mb"),
        "flags": figures.pop("flags", args.flags),
        "cases": figures.pop("cases", args.cases),
        **figures,
        "cpus": os.cpu_count(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "command": command,
    }
    line = json.dumps(out, ensure_ascii=False)
    sys.stdout.write(line + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
