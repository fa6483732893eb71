"""Peak memory and throughput of align + tile on a large synthetic pair.

Writes two epochs of ``--size`` x ``--size`` px RGB uint8 (``--sheets`` x ``--sheets`` tiled GeoTIFF sheets
each, written window by window so generation itself streams) into a temporary folder, then runs
``align_pair`` + ``build_tiles`` + ``write_tile_index`` in a child process and prints one JSON line:
peak RSS of the child (MB), seconds per phase and MB/s of imagery (both epochs, uncompressed) aligned
and tiled. ``--read`` also reads every tile through ``AlignedPair.read`` (what detection does).

Usage::

    .venv/bin/python benchmarks/bench_align.py --size 20000 --sheets 4
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

log = logging.getLogger("bench_align")

RES = 0.5
ORIGIN = (500000.0, 4870000.0)
BLOCK = 512
SHIFT = (1.5, -0.75)  # prev is written this many px east / north of curr


def _texture(col0: int, row0: int, h: int, w: int) -> np.ndarray:
    """Deterministic texture for a window of the scene (global pixel coordinates), (3, h, w) uint8 >= 1."""
    cells = []
    for r in range(row0 // 8, (row0 + h + 7) // 8 + 1):
        rng = np.random.default_rng([r, col0 // 8])
        cells.append(rng.integers(40, 220, size=(w + 15) // 8 + 1))
    coarse = np.repeat(np.repeat(np.stack(cells), 8, axis=0), 8, axis=1)
    coarse = coarse[row0 % 8 : row0 % 8 + h, col0 % 8 : col0 % 8 + w]
    fine = np.random.default_rng([row0, col0, 1]).integers(-12, 13, size=(h, w))
    base = (coarse + fine).clip(1, 255)
    return (
        np.stack([base, (base * 0.9).astype(base.dtype), (base * 0.8).astype(base.dtype)]).clip(1, 255).astype(np.uint8)
    )


def generate(root: Path, size: int, sheets: int) -> None:
    """Write ``prev/`` and ``curr/`` as sheets x sheets tiled GeoTIFFs, one 512 px window at a time."""
    step = -(-size // sheets)
    base = Affine(RES, 0, ORIGIN[0], 0, -RES, ORIGIN[1])
    for epoch, shift, gain in (("curr", (0.0, 0.0), 1.0), ("prev", SHIFT, 0.85)):
        (root / epoch).mkdir(parents=True, exist_ok=True)
        for si in range(sheets):
            for sj in range(sheets):
                r0, c0 = si * step, sj * step
                h, w = min(step, size - r0), min(step, size - c0)
                profile = {
                    "driver": "GTiff",
                    "width": w,
                    "height": h,
                    "count": 3,
                    "dtype": "uint8",
                    "crs": "EPSG:4551",
                    "transform": base * Affine.translation(c0 + shift[0], r0 + shift[1]),
                    "tiled": True,
                    "blockxsize": BLOCK,
                    "blockysize": BLOCK,
                    "compress": "deflate",
                    "zlevel": 1,
                    "nodata": 0,
                }
                with rasterio.open(root / epoch / f"sheet_{si}_{sj}.tif", "w", **profile) as dst:
                    for br in range(0, h, BLOCK):
                        for bc in range(0, w, BLOCK):
                            bh, bw = min(BLOCK, h - br), min(BLOCK, w - bc)
                            arr = _texture(c0 + bc, r0 + br, bh, bw)
                            if gain != 1.0:
                                arr = (arr * gain).clip(1, 255).astype(np.uint8)
                            dst.write(arr, window=Window(bc, br, bw, bh))
        log.info("wrote %s", root / epoch)


def run(root: Path, read: bool) -> dict[str, float]:
    """Align + tile (+ read) the pair under ``root``; return timings and this process's peak RSS."""
    from pipeline.config import AlignSettings, TileSettings
    from pipeline.fileio import gdal_env
    from pipeline.imagery import align_pair
    from pipeline.pair import AlignedPair
    from pipeline.tiling import build_tiles, write_tile_index

    tile = TileSettings()  # type: ignore[call-arg]
    t0 = time.perf_counter()
    summary = align_pair(root / "prev", root / "curr", root / "out", AlignSettings(), month="2026-02", prev="2026-01")
    t1 = time.perf_counter()
    # Tiling and reading run under the same bounded GDAL cache as align_pair (as the CLI stages do).
    with gdal_env(), AlignedPair.open(summary.out_dir) as pair:
        tiles = build_tiles(pair, size=tile.size, overlap=tile.overlap, min_valid=tile.min_valid)
        write_tile_index(tiles, pair.crs, root / "tiles.parquet")
        t2 = time.perf_counter()
        if read:
            for t in tiles:
                pair.read(t.window)
    t3 = time.perf_counter()
    return {
        "align_s": round(t1 - t0, 2),
        "tile_s": round(t2 - t1, 2),
        "read_s": round(t3 - t2, 2) if read else None,  # type: ignore[dict-item]
        "tiles": len(tiles),
        "shift_px": list(summary.shift_px),  # type: ignore[dict-item]
        "residual_px": summary.residual_px,
        "valid_fraction": round(summary.valid_fraction, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    """Generate the pair, run align + tile in a child process, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="pixels on a side of each epoch")
    parser.add_argument("--sheets", type=int, default=4, help="sheets per side of each epoch")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--read", action="store_true", help="also read every tile through AlignedPair.read")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.child is not None:
        sys.stdout.write(json.dumps(run(args.child, args.read)) + "\n")
        return
    root = Path(tempfile.mkdtemp(prefix="bench_align_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        generate(root, args.size, args.sheets)
        gen_s = time.perf_counter() - t0
        gen_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(root)] + (["--read"] if args.read else [])
        child = subprocess.run(cmd, check=True, capture_output=True, text=True)
        sys.stderr.write(child.stderr[-4000:])
        result = json.loads(child.stdout.strip().splitlines()[-1])
        mb = 2 * 3 * args.size**2 / 1e6
        result.update(
            size=args.size,
            sheets_per_epoch=args.sheets**2,
            imagery_mb=round(mb, 1),
            generate_s=round(gen_s, 2),
            generate_peak_rss_mb=round(gen_rss, 1),
            mb_per_s=round(mb / (result["align_s"] + result["tile_s"]), 1),
        )
        if result.get("read_s"):
            result["read_mb_per_s"] = round(mb / result["read_s"], 1)
        sys.stdout.write(json.dumps(result) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
