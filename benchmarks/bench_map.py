"""The inspector map at scale: tile-pyramid build, page size and load-to-interactive in headless Chromium.

Generates a month of ``--size`` x ``--size`` px at 0.5 m (the texture of ``bench_align.py``: noise, so
the WebP sizes are an upper bound for real imagery), aligns it with the real ``align_pair``, writes
``--flags`` random flags with the vectorize schema and builds the ledger from them with the real
``build_ledger``; then times :func:`pipeline.publish.tiles.build_pyramid` (both epochs, native zoom)
and :func:`pipeline.publish.maps.build_map`, and opens the page in headless Chromium over CDP
(``tests/test_map_browser.Browser``): seconds from navigation to the UI being ready, and to a search
that pans to a case and opens its popup. Prints one JSON line.

Usage::

    .venv/bin/python benchmarks/bench_map.py --size 8192 --flags 5000

Measured 2026-12-01 on a 2-core Xeon shared with a training run (load average 3-8), ``--size 8192``
(4.1 km x 4.1 km, 16.8 km² at 0.5 m), 5,000 flags (3,093 cases, 433 alerts): pyramid zoom 12-18,
3,984 tiles, 51.1 MB (noise texture: an upper bound), 45.5-139.7 s on 2 threads depending on the load;
page 14.6 MB, built in 2.2 s; load-to-interactive 1.0-1.3 s, search-and-pan 0.15 s, a 3-level zoom-out
redraw 0.27 s; no request left file://, no console error. Tiles grow with the area: a 20 km x 20 km city
(400 km², 24x) is about 95,000 tiles, 1.2 GB and 20-55 min on these 2 cores; the page grows with the
flags, not the area.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]

from bench_align import ORIGIN, RES, generate  # noqa: E402

MONTH, PREV = "2026-02", "2026-01"


def _flags(path: Path, size: int, n: int) -> None:
    from maps_report_data import write_flags
    from shapely.geometry import box

    rng = np.random.default_rng(20261201)
    extent = size * RES
    rows = []
    for i in range(n):
        w, h = rng.uniform(6, 30, size=2)
        x = ORIGIN[0] + rng.uniform(50, extent - 80)
        y = ORIGIN[1] - extent + rng.uniform(50, extent - 80)
        kind = "removed" if i % 5 == 0 else "new"
        rows.append((kind, box(x, y, x + w, y + h), "", ""))
    write_flags(path, MONTH, rows)


def main(argv: list[str] | None = None) -> None:
    """Generate, align, tile, map and load; print one JSON line of figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="pixels on a side (0.5 m)")
    parser.add_argument("--sheets", type=int, default=2, help="sheets per side of each epoch")
    parser.add_argument("--flags", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=None, help="tile threads (default: one per CPU)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    from pipeline.config import AlignSettings, LedgerSettings, MapSettings
    from pipeline.fileio import gdal_env
    from pipeline.imagery import align_pair
    from pipeline.ledger import build_ledger
    from pipeline.pair import AlignedPair
    from pipeline.publish.maps import build_map
    from pipeline.publish.tiles import build_pyramid

    root = Path(tempfile.mkdtemp(prefix="bench_map_", dir=args.workdir))
    out: dict[str, object] = {"size_px": args.size, "res_m": RES, "km": args.size * RES / 1000, "flags": args.flags}
    try:
        t = time.perf_counter()
        generate(root, args.size, args.sheets)
        out["generate_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        align_pair(root / "prev", root / "curr", root / "pair", AlignSettings(), month=MONTH, prev=PREV)
        out["align_s"] = round(time.perf_counter() - t, 1)
        _flags(root / "flags" / f"{MONTH}.gpkg", args.size, args.flags)
        (root / "raw").mkdir()
        t = time.perf_counter()
        build_ledger(
            [root / "flags" / f"{MONTH}.gpkg"], root / "raw", root / "ledger.gpkg", LedgerSettings(), months=[MONTH]
        )
        out["ledger_s"] = round(time.perf_counter() - t, 1)

        settings = MapSettings(tiles_workers=args.workers)
        tiles = root / "maps" / f"{MONTH}_tiles"
        with gdal_env(), AlignedPair.open(root / "pair") as pair:
            summary = build_pyramid(pair, tiles, settings, month=MONTH)
        p = summary.pyramid
        out.update(
            pyramid_s=round(summary.seconds, 2),
            pyramid_workers=summary.workers,
            zoom=f"{p.minzoom}-{p.maxzoom}",
            tiles=p.n_tiles,
            pyramid_mb=round(p.n_bytes / 1e6, 1),
            pyramid_files_mb=round(sum(f.stat().st_size for f in tiles.rglob("*.*")) / 1e6, 1),
        )
        t = time.perf_counter()
        with gdal_env():
            page = build_map(
                MONTH,
                root / "ledger.gpkg",
                root / "flags" / f"{MONTH}.gpkg",
                root / "maps" / f"{MONTH}.html",
                settings=settings,
                pair_dir=root / "pair",
                tiles_dir=tiles,
            )
        out["map_s"] = round(time.perf_counter() - t, 1)
        out["html_mb"] = round(page.stat().st_size / 1e6, 2)
        if not args.no_browser:
            from test_map_browser import Browser

            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile, Browser(Path(profile)) as b:
                out["load_to_interactive_s"] = round(b.open(page, 1280, 900), 2)
                out["features"] = b.js("SW.all.flags.length + SW.all.cases.length")
                t = time.perf_counter()
                b.js("SW.focus(SW.find(SW.all.cases[SW.all.cases.length - 1].feature.properties.case_id)[0]); 0")
                b.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                out["search_focus_s"] = round(time.perf_counter() - t, 2)
                t = time.perf_counter()
                b.js("SW.map.setZoom(SW.map.getZoom() - 3, {animate:false}); 0")
                b.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                out["zoom_out_redraw_s"] = round(time.perf_counter() - t, 2)
                leaving = [u for u in b.requests() if not u.startswith(("file:", "data:", "about:"))]
                out["requests_leaving_file"] = len(leaving)
                out["console_errors"] = len(b.errors())
        sys.stdout.write(json.dumps(out) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
