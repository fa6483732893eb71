"""Throughput of ``pipeline.detect.detect_pair``: tiles/s and km²/hour at 0.5 m, CPU and (when present) CUDA.

Builds a synthetic aligned pair (two 3-band uint8 GeoTIFF epochs, deflate, 256 px blocks, read window by
window, as the real pair is) and a tile index in a temporary folder, then runs the whole stage (read,
pad, predict, blend, write the COG with overviews) once per device and method. The CNN is the
checkpoint given with ``--model`` or, without one, a stand-in Siamese encoder-decoder of about the
cost of a small change network (the numbers then say what the pipeline around the model costs).

Usage::

    python benchmarks/bench_detect.py                      # 2048 px (1.05 km²), CNN stand-in + CVA
    python benchmarks/bench_detect.py --size 4096 --devices cpu,cuda --model models/scarnet.pt

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import detect as det  # noqa: E402
from pipeline.config import DetectSettings  # noqa: E402
from pipeline.nets.blocks import padded_size  # noqa: E402
from pipeline.predictors import CheckpointPredictor, CvaPredictor, ModulePredictor, Predictor  # noqa: E402
from pipeline.tiling import make_grid, write_tile_index  # noqa: E402

log = logging.getLogger("bench_detect")
GSD = 0.5
CRS = "EPSG:4551"


class TiffPair:
    """A minimal aligned pair over ``prev.tif``, ``curr.tif`` and ``valid.tif`` (the AlignedPair interface)."""

    def __init__(self, pair_dir: Path):
        self.prev_ds = rasterio.open(pair_dir / "prev.tif")
        self.curr_ds = rasterio.open(pair_dir / "curr.tif")
        self.valid_ds = rasterio.open(pair_dir / "valid.tif")
        self.crs, self.transform = self.curr_ds.crs, self.curr_ds.transform
        self.width, self.height, self.count = self.curr_ds.width, self.curr_ds.height, self.curr_ds.count
        self.res, self.month, self.prev = self.curr_ds.res, "2026-03", "2026-02"

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Images float32 (2, c, h, w) in [0, 1] as [prev, curr] and the valid mask."""
        images = np.stack([self.prev_ds.read(window=window), self.curr_ds.read(window=window)])
        return images.astype(np.float32) / 255.0, self.read_valid(window)

    def read_valid(self, window: Window) -> np.ndarray:
        """The valid mask (h, w)."""
        return np.asarray(self.valid_ds.read(1, window=window) > 0)

    def close(self) -> None:
        """Close the three datasets."""
        for ds in (self.prev_ds, self.curr_ds, self.valid_ds):
            ds.close()


@contextmanager
def open_tiff_pair(pair_dir: Path) -> Iterator[TiffPair]:
    """Open a :class:`TiffPair` (picklable opener for dask)."""
    pair = TiffPair(Path(pair_dir))
    try:
        yield pair
    finally:
        pair.close()


class StandInNet(torch.nn.Module):
    """Siamese U-Net-like stand-in: shared encoder to 1/8, [prev, curr - prev] skips, decoder, logits (b, 2, h, w)."""

    def __init__(self, bands: int = 3, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()
            )

        w = width
        self.enc = torch.nn.ModuleList(
            [block(bands, w), block(w, 2 * w, 2), block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 2)]
        )
        self.dec = torch.nn.ModuleList([block(16 * w, 4 * w), block(8 * w, 2 * w), block(4 * w, w)])
        self.head = torch.nn.Conv2d(w, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 2, c, h, w) -> logits (b, 2, h, w)."""
        b, t, c, h, w = x.shape
        y = x.reshape(b * t, c, h, w)
        skips = []
        for stage in self.enc:
            y = stage(y)
            f = y.reshape(b, t, *y.shape[1:])
            skips.append(torch.cat([f[:, 0], f[:, 1] - f[:, 0]], 1))
        y = skips[-1]
        for dec, skip in zip(self.dec, reversed(skips[:-1]), strict=True):
            y = torch.nn.functional.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = dec(torch.cat([y, skip], 1))
        return self.head(y)


def make_inputs(root: Path, size: int, tile: int, overlap: int) -> tuple[Path, Path]:
    """Write the synthetic pair and its tile index under ``root``."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(0)
    coarse = rng.random((3, size // 16 + 1, size // 16 + 1)).astype(np.float32)
    base = np.clip(
        zoom(coarse, (1, 16, 16), order=1)[:, :size, :size] * 200 + rng.normal(0, 8, (3, size, size)), 0, 255
    )
    prev = base.astype(np.uint8)
    curr = prev.copy()
    for _ in range(40):
        r, c = rng.integers(0, size - 40, 2)
        curr[:, r : r + 24, c : c + 32] = 230
    transform = Affine(GSD, 0, 500000.0, 0, -GSD, 4862000.0)
    pair_dir = root / "pair"
    pair_dir.mkdir(parents=True)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "dtype": "uint8",
        "crs": CRS,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    for name, arr in (("prev", prev), ("curr", curr), ("valid", np.full((1, size, size), 255, np.uint8))):
        with rasterio.open(pair_dir / f"{name}.tif", "w", count=arr.shape[0], **profile) as ds:
            ds.write(arr)
    tiles = make_grid(size, size, transform, size=tile, overlap=overlap)
    return pair_dir, write_tile_index(tiles, CRS, root / "tiles.parquet")


def run_one(
    root: Path, pair_dir: Path, tiles: Path, method: str, device: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One timed run of the stage."""
    settings = DetectSettings(method=method, device=device, batch_size=args.batch, workers=args.workers)  # type: ignore[arg-type,call-arg]
    predictor: Predictor
    if method == "cva":
        predictor = CvaPredictor(sample_tiles=settings.cva_sample_tiles)
    elif args.model:
        predictor = CheckpointPredictor(Path(args.model), device=device)
    else:
        predictor = ModulePredictor(StandInNet(), device=device)
    out = root / f"prob_{method}_{device}.tif"
    summary = det.detect_pair(
        pair_dir, tiles, out, settings, overlap=args.overlap, predictor=predictor, opener=open_tiff_pair
    )
    model_only = _model_only_tiles_per_s(predictor, args) if method == "cnn" else None
    return {
        "method": method,
        "model": "cva" if method == "cva" else (args.model or "stand-in"),
        "device": summary.device,
        "tiles": summary.n_tiles,
        "seconds": round(summary.seconds, 3),
        "tiles_per_s": round(summary.tiles_per_s, 3),
        "km2_per_hour": round(summary.km2_per_hour, 2),
        "model_only_tiles_per_s": model_only,
    }


def _model_only_tiles_per_s(predictor: Predictor, args: argparse.Namespace) -> float:
    """Forward passes alone on one random batch (after the run warmed up): the ceiling for the pipeline."""
    pad = padded_size(args.tile)
    x = np.random.default_rng(0).random((args.batch, 2, 3, pad, pad), dtype=np.float32)
    start = time.perf_counter()
    predictor(predictor.prepare(x))
    return round(args.batch / (time.perf_counter() - start), 3)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=2048, help="raster side in pixels (0.5 m)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="cnn,cva")
    parser.add_argument("--devices", default=None, help="comma list; default cpu plus cuda when present")
    parser.add_argument("--model", default=None, help="checkpoint for the CNN; default a stand-in network")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_detect_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pair_dir, tiles = make_inputs(root, args.size, args.tile, args.overlap)
        setup_s = time.perf_counter() - t0
        for device in devices:
            for method in args.methods.split(","):
                if method == "cva" and device != "cpu":
                    continue  # CVA runs with numpy on the CPU whatever the device
                results.append(run_one(root, pair_dir, tiles, method, device, args))
    report = {
        "benchmark": "detect_pair",
        "raster_px": args.size,
        "gsd_m": GSD,
        "area_km2": round((args.size * GSD) ** 2 / 1e6, 4),
        "tile": args.tile,
        "overlap": args.overlap,
        "batch": args.batch,
        "reader_threads": args.workers,
        "setup_s": round(setup_s, 2),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "results": results,
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
