"""``make bench``: every performance figure of issue 15 in one run; writes BENCHMARKS.md and results.json.

Each figure is measured in its own child process (``--part NAME``), so its peak RSS is that child's own
(``os.wait4``), with the load average before and after it: the box may be shared (a training run), and
ratios measured side by side in one run are what the figures mean. Inputs are generated here: a
two-epoch pair of ``--size`` px at 0.5 m (the texture of ``bench_align.py``, the previous epoch shifted by
(1.5, -0.75) px and darker, so align measures a sub-pixel shift and fits histogram tables), aligned and
tiled by the real stages; detect runs the shipped checkpoint.

Parts: align + tile, the decode floor (rasterio reading every tile window of both epochs, one thread),
detect's reader (``AlignedPair.read``: warp + histogram tables, with the old interpolation beside it),
the compute floor (the network's forward on tiles already in memory), detect per precision mode and the
agreement of its thresholded masks with fp32, the torchgeo peer loop (``GridGeoSampler`` + ``DataLoader``,
same network, tile, stride, batch and precision, stitched naively), vectorize, the ledger join
(``bench_ledger.py`` when present), map (tile pyramid + page, ``bench_map.py``), the report of a month,
Dask (``LocalCluster`` of 1 and 2 worker processes, and an existing scheduler started with the
``dask scheduler`` / ``dask worker`` commands), growth over ``--growth`` sizes (align + tile + detect +
vectorize: seconds and peak RSS), and a plot of the growth.

Usage::

    .venv/bin/python benchmarks/run_all.py                 # the default run (4 min on 2 idle cores, 8 beside a 1-thread training run)
    .venv/bin/python benchmarks/run_all.py --size 1024 --growth 512,1024 --skip dask,map   # a smoke run
"""

# ruff: noqa: E501 - the Markdown rows are f-strings that read best on one line each

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

if TYPE_CHECKING:  # the parent process must not import torch (its RSS would be inherited by every child)
    from pipeline.nets.device import Precision

log = logging.getLogger("run_all")
GSD = 0.5
MONTH, PREV = "2026-02", "2026-01"
CHECKPOINT = ROOT / "models" / "scarnet.pt"
MODES: dict[str, tuple[Precision, bool]] = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "bf16-compile": ("bf16", True),
}
CITY_KM2 = 500.0
CITY_TILES = round(CITY_KM2 * 1e6 / GSD**2 / 448**2)  # 512² tiles at stride 448: about 10,000


# ------------------------------------------------------------------------------------ the child parts


def _settings(mode: str, batch: int, workers: int = 0) -> Any:
    from pipeline.config import DetectSettings

    precision, compile_ = MODES[mode]
    return DetectSettings(
        model=CHECKPOINT, device="cpu", batch_size=batch, workers=workers, precision=precision, compile=compile_
    )  # type: ignore[call-arg]


def _tiles(root: Path) -> list[Any]:
    from pipeline.tiling import read_tile_index

    return sorted(read_tile_index(root / "tiles.parquet")[0], key=lambda t: (t.row_off, t.col_off))


def part_align(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """Align + tile the generated pair (``bench_align.run``)."""
    import bench_align

    out = bench_align.run(root, read=False)
    out.pop("peak_rss_mb", None)
    mb = 2 * 3 * a["size"] ** 2 / 1e6
    out.update(imagery_mb=round(mb, 1), mb_per_s=round(mb / (out["align_s"] + out["tile_s"]), 2))
    return out


def part_decode(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The decode floor: rasterio reading every tile window of both epochs' sheets on one thread."""
    import rasterio
    from rasterio.windows import Window

    tiles = _tiles(root)
    with rasterio.open(root / "prev" / "sheet_0_0.tif") as p, rasterio.open(root / "curr" / "sheet_0_0.tif") as c:
        t0 = time.perf_counter()
        for t in tiles:
            for ds in (p, c):
                w = Window(t.col_off, t.row_off, t.width, t.height)
                ds.read(window=w, boundless=False)
        s = time.perf_counter() - t0
    return {"pairs": len(tiles), "seconds": round(s, 3), "pairs_per_s": round(len(tiles) / s, 2)}


def part_reader(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The reader detect uses: ``AlignedPair.read`` of every tile, with the value tables and with ``np.interp``."""
    from pipeline.pair import AlignedPair

    tiles = _tiles(root)
    out: dict[str, Any] = {"pairs": len(tiles)}
    import bench_align

    for name in ("tables", "interp", "unwarped"):
        with AlignedPair.open(root / "out") as pair:
            if name == "interp":
                pair._tables = None  # the interpolation path the tables replaced
            if name == "unwarped":  # the previous epoch read directly: what a warp-free shift path starts from
                out["measured_shift_px"] = list(pair.shift_px)
                pair.shift_px = bench_align.SHIFT  # exactly the sheet's offset: it lies on the lattice
            pair.read(tiles[0].window)  # open the datasets outside the timing
            t0 = time.perf_counter()
            for t in tiles:
                pair.read(t.window)
            s = time.perf_counter() - t0
        out[f"{name}_s"] = round(s, 3)
        out[f"{name}_pairs_per_s"] = round(len(tiles) / s, 2)
    return out


def _batches(root: Path, batch: int) -> list[Any]:
    from pipeline.detect import load_batch
    from pipeline.nets.blocks import padded_size
    from pipeline.pair import AlignedPair
    from pipeline.tiling import iter_batches

    tiles = _tiles(root)
    pad = padded_size(max(max(t.height, t.width) for t in tiles))
    with AlignedPair.open(root / "out") as pair:
        return [load_batch(pair, b, pad)[0] for b in iter_batches(tiles, batch)]


def part_compute(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The compute floor: the network's forward over every tile, already read and padded in memory."""
    import torch

    from pipeline.predictors import make_predictor

    torch.set_num_threads(os.cpu_count() or 1)
    batches = _batches(root, a["batch"])
    predictor = make_predictor(_settings(a["mode"], a["batch"]))
    t0 = time.perf_counter()
    predictor.setup()
    predictor(predictor.prepare(batches[0]))  # warm-up (and the compile, when on)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x in batches:
        predictor(predictor.prepare(x))
    s = time.perf_counter() - t0
    n = sum(len(x) for x in batches)
    return {"pairs": n, "seconds": round(s, 3), "pairs_per_s": round(n / s, 3), "first_batch_s": round(first, 2)}


def part_detect(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """``detect_pair`` on the aligned pair (the whole stage: model load, read, predict, blend, COG)."""
    from pipeline.config import TileSettings
    from pipeline.detect import detect_pair

    settings = _settings(a["mode"], a["batch"], a.get("workers", 0))
    out = root / f"prob_{a['tag']}.tif"
    s = detect_pair(root / "out", root / "tiles.parquet", out, settings, overlap=TileSettings().overlap)  # type: ignore[call-arg]
    km2 = (a["size"] * GSD) ** 2 / 1e6
    return {
        "pairs": s.n_tiles,
        "seconds": round(s.seconds, 2),
        "pairs_per_s": round(s.tiles_per_s, 3),
        "km2_per_hour": round(km2 / s.seconds * 3600, 2),
        "out": str(out),
    }


def part_agree(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """Thresholded masks of two probability COGs (same grid) at the checkpoint's calibrated threshold."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from pipeline.formats import PROB_NODATA, decode_probabilities
    from pipeline.nets.checkpoint import ChangeModel

    thr = ChangeModel.load(CHECKPOINT).threshold
    with rasterio.open(a["a"]) as da, rasterio.open(a["b"]) as db:
        # the overlap of the two grids (same pixel size; the peer's grid is the current sheet's)
        dc, dr = (round(v) for v in ~db.transform * (da.transform.c, da.transform.f))
        ca, ra, cb, rb = max(0, -dc), max(0, -dr), max(0, dc), max(0, dr)
        h, w = min(da.height - ra, db.height - rb), min(da.width - ca, db.width - cb)
        sa = da.read(window=Window(ca, ra, w, h))
        sb = db.read(window=Window(cb, rb, w, h))
    ok = (sa != PROB_NODATA) & (sb != PROB_NODATA)
    pa, pb = decode_probabilities(sa), decode_probabilities(sb)
    flips = int(np.count_nonzero((pa[ok] >= thr) != (pb[ok] >= thr)))
    return {
        "threshold": thr,
        "pixels": int(ok.sum()),
        "flipped": flips,
        "flipped_fraction": flips / max(1, int(ok.sum())),
        "max_abs_diff": float(np.abs(pa[ok] - pb[ok]).max()) if ok.any() else 0.0,
    }


def part_torchgeo(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The peer: torchgeo 0.8.1's GridGeoSampler + DataLoader loop, same network/tile/stride/batch/precision.

    torchgeo has no stitcher: each tile's prediction is written into a full-size array at the tile's
    pixel offset (later tiles overwrite the overlap), as a user must; the result is written as a GeoTIFF.
    Pitfalls of 0.8.1 handled here: ``torchgeo.datasets`` imports ``requests`` without declaring it (the
    ``bench`` extra installs it); file names must carry no date (a dated name gives each epoch a time
    span, ``IntersectionDataset`` then finds no temporal overlap, and ``spatial_only=True`` breaks the
    sampler), so the sheets are named ``sheet_0_0.tif``.
    """
    import numpy as np
    import rasterio
    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import IntersectionDataset, RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler, Units

    from pipeline.config import TileSettings
    from pipeline.nets.checkpoint import ChangeModel
    from pipeline.nets.device import autocast

    torch.set_num_threads(os.cpu_count() or 1)
    tile = TileSettings()  # type: ignore[call-arg]

    class Epoch(RasterDataset):
        filename_glob = "sheet_*.tif"
        is_image = True

    t_start = time.perf_counter()
    model = ChangeModel.load(CHECKPOINT)
    precision, compile_ = MODES[a["mode"]]
    net: Any = model.module
    if compile_:
        net = torch.compile(net, dynamic=False, options={"freezing": True})
    prev, curr = Epoch(str(root / "prev")), Epoch(str(root / "curr"))
    data = IntersectionDataset(prev, curr)
    sampler = GridGeoSampler(data, size=tile.size, stride=tile.size - tile.overlap, units=Units.PIXELS)
    loader = DataLoader(
        data, sampler=sampler, batch_size=a["batch"], num_workers=a.get("workers", 0), collate_fn=stack_samples
    )
    with rasterio.open(root / "curr" / "sheet_0_0.tif") as ds:
        transform, crs, width, height = ds.transform, ds.crs, ds.width, ds.height
    out = np.zeros((2, height, width), np.float32)
    inv = ~transform
    n = 0
    for sample in loader:
        x = sample["image"].float() / 255.0
        b, c2, h, w = x.shape
        with torch.inference_mode(), autocast(torch.device("cpu"), precision):
            probs = torch.sigmoid(net(x.reshape(b, 2, c2 // 2, h, w)).float()).numpy()
        for i in range(b):
            col, row = (round(v) for v in inv * (_left_top(sample, i)))
            r0, c0 = max(row, 0), max(col, 0)
            r1, c1 = min(row + h, height), min(col + w, width)
            out[:, r0:r1, c0:c1] = probs[i, :, r0 - row : r1 - row, c0 - col : c1 - col]
        n += b
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 2, "dtype": "uint8", "crs": crs}
    with rasterio.open(
        root / f"peer_{a['tag']}.tif", "w", **profile, transform=transform, tiled=True, compress="deflate"
    ) as ds:
        ds.write(np.round(out * 254).astype(np.uint8))
    s = time.perf_counter() - t_start
    return {
        "pairs": n,
        "seconds": round(s, 2),
        "pairs_per_s": round(n / s, 3),
        "out": str(root / f"peer_{a['tag']}.tif"),
    }


def _left_top(sample: dict[str, Any], i: int) -> tuple[float, float]:
    """The map (left, top) of sample ``i``'s window, from what torchgeo 0.8 puts in the sample."""
    bounds = sample["bounds"][i]
    if hasattr(bounds, "minx"):  # BoundingBox (torchgeo < 0.7)
        return float(bounds.minx), float(bounds.maxy)
    if isinstance(bounds, tuple | list) and isinstance(bounds[0], slice):  # (x slice, y slice, t slice)
        return float(bounds[0].start), float(bounds[1].stop)
    v = [float(u) for u in bounds][:4]  # tensor [xmin, xmax, ymin, ymax, ...]
    return v[0], v[3]


def part_vectorize(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """``vectorize_month`` on a probability COG of ``size`` px with a planted structure every 96 px.

    The generated imagery has no change, so detect's own raster would give no object to count; this one
    has 40-70 px rectangles (p 0.97 inside a 0.6 ring, 0.03 elsewhere), written in the detect encoding,
    and in every other cell two offset 24 px houses joined by a neck instead (one blob that the cutting
    of merged blobs, ``vectorize.split``, turns into two). With ``compare`` the same raster is vectorised
    again without the cutting, right after, so that its cost is a ratio of two runs side by side.
    """
    import numpy as np
    import rasterio
    from affine import Affine

    from pipeline.config import VectorizeSettings
    from pipeline.formats import PROB_BANDS, encode_probabilities, probability_tags
    from pipeline.vectorize import vectorize_month

    size = a["size"]
    rng = np.random.default_rng(0)
    p = np.full((2, size, size), 0.03, np.float32)
    planted = blobs = 0
    for r in range(8, size - 80, 96):
        for c in range(8, size - 80, 96):
            if (r // 96 + c // 96) % 2:
                p[0, r : r + 24, c : c + 24] = 0.97
                p[0, r + 18 : r + 42, c + 28 : c + 52] = 0.97
                p[0, r + 18 : r + 24, c + 24 : c + 28] = 0.97
                blobs += 1
                continue
            h, w = rng.integers(40, 70, 2)
            p[0, r - 3 : r + h + 3, c - 3 : c + w + 3] = 0.6
            p[0, r : r + h, c : c + w] = 0.97
            planted += 1
    prob = root / "prob_planted.tif"
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 2, "dtype": "uint8", "crs": "EPSG:4551"}
    transform = Affine(GSD, 0, 500000.0, 0, -GSD, 4870000.0)
    with rasterio.open(prob, "w", **profile, transform=transform, tiled=True, compress="deflate", nodata=255) as ds:
        ds.write(encode_probabilities(p, np.ones((size, size), bool)))
        ds.descriptions = PROB_BANDS
        ds.update_tags(**probability_tags(MONTH, "cnn", 0.9, None))
    settings = VectorizeSettings.model_validate({})
    t0 = time.perf_counter()
    flags = vectorize_month(prob, root / "flags.gpkg", settings, month=MONTH)
    s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "planted": planted,
        "blobs": blobs,
        "objects": len(flags),
        "seconds": round(s, 2),
        "objects_per_s": round(len(flags) / s, 2),
    }
    if a.get("compare"):
        t0 = time.perf_counter()
        whole = vectorize_month(
            prob, root / "flags_uncut.gpkg", settings.model_copy(update={"split": False}), month=MONTH
        )
        s_uncut = time.perf_counter() - t0
        out.update(objects_uncut=len(whole), seconds_uncut=round(s_uncut, 2), cut_cost=round(s / s_uncut, 2))
    return out


def part_generate(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """Write the two epochs (``bench_align.generate``, one sheet each), in a child so the parent stays small."""
    import bench_align

    t0 = time.perf_counter()
    bench_align.generate(root, a["size"], 1)
    return {"size": a["size"], "seconds": round(time.perf_counter() - t0, 2)}


def part_machine(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """Library versions (imported in a child: the parent must not hold torch when it forks)."""
    import torch

    from pipeline.config import load_settings
    from pipeline.nets.device import cpu_precision, resolve_compile

    info: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    detect = load_settings(ROOT / "params.yaml").detect
    # the mode params.yaml ships on this CPU for a 500 km² month (CITY_TILES): detect.precision auto resolved,
    # and detect.compile auto decided by that tile count; growth runs in it, Dask in its eager precision
    compiled, why = resolve_compile(detect.compile, torch.device("cpu"), CITY_TILES, detect.compile_min_tiles)
    info["shipped_mode"] = cpu_precision(detect.precision) + ("-compile" if compiled else "")
    info["shipped_setting"] = {
        "precision": detect.precision,
        "compile": detect.compile,
        "compile_min_tiles": detect.compile_min_tiles,
        "compile_for_a_month": why,
    }
    with contextlib.suppress(ImportError):
        import torchgeo

        info["torchgeo"] = torchgeo.__version__
    return info


def part_report(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """``build_report`` of one month (HTML, Markdown, PDF) on the test fixture's ledger and flags."""
    sys.path.insert(0, str(ROOT / "tests"))
    from maps_report_data import MONTH as RMONTH
    from maps_report_data import write_inputs

    from pipeline.config import ReportSettings
    from pipeline.publish import report

    p = write_inputs(root / "report_in")
    t0 = time.perf_counter()
    report.build_report(RMONTH, p["ledger"], p["flags"], root / "report_out", settings=ReportSettings())  # type: ignore[call-arg]
    return {"seconds_per_month": round(time.perf_counter() - t0, 2)}


def part_dask(root: Path, a: dict[str, Any]) -> dict[str, Any]:
    """Detect on a dask cluster: a LocalCluster of ``workers`` processes, or an existing ``scheduler``."""
    import torch
    from distributed import Client, LocalCluster

    from pipeline.config import TileSettings
    from pipeline.detect import detect_pair

    settings = _settings(a["mode"], a["batch"])
    with contextlib.ExitStack() as stack:
        address = a.get("scheduler")
        if address is None:
            cluster = stack.enter_context(
                LocalCluster(n_workers=a["workers"], processes=True, threads_per_worker=1, dashboard_address=None)
            )
            address = cluster.scheduler_address
        with Client(address) as client:
            n = len(client.scheduler_info()["workers"])
            threads = max(1, (os.cpu_count() or 1) // n)
            client.run(torch.set_num_threads, threads)  # share the cores instead of oversubscribing them
        out = root / f"prob_dask_{a['tag']}.tif"
        overlap = TileSettings().overlap  # type: ignore[call-arg]
        s = detect_pair(root / "out", root / "tiles.parquet", out, settings, overlap=overlap, scheduler=address)
    return {
        "workers": n,
        "torch_threads_per_worker": threads,
        "pairs": s.n_tiles,
        "seconds": round(s.seconds, 2),
        "pairs_per_s": round(s.tiles_per_s, 3),
    }


PARTS: dict[str, Callable[[Path, dict[str, Any]], dict[str, Any]]] = {
    "align": part_align,
    "decode": part_decode,
    "reader": part_reader,
    "compute": part_compute,
    "detect": part_detect,
    "agree": part_agree,
    "torchgeo": part_torchgeo,
    "vectorize": part_vectorize,
    "generate": part_generate,
    "machine": part_machine,
    "report": part_report,
    "dask": part_dask,
}


def _child_main(name: str, root: Path, args_json: str) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = PARTS[name](root, json.loads(args_json))
    sys.stdout.write(json.dumps(result) + "\n")


# ------------------------------------------------------------------------------------ the orchestrator


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Runner:
    """Runs parts in child processes and keeps every figure with its load, wall time and peak RSS."""

    def __init__(self, root: Path, deadline: float):
        self.root, self.deadline = root, deadline
        self.figures: dict[str, Any] = {}

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.deadline - time.monotonic()

    def run(self, key: str, part: str, root: Path, **a: Any) -> dict[str, Any] | None:
        """Run ``part`` on ``root`` with arguments ``a`` in a child; keep its figures under ``key``."""
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--part",
            part,
            "--root",
            str(root),
            "--args",
            json.dumps(a),
        ]
        return self.command(key, cmd, parse=True)

    def command(self, key: str, cmd: list[str], *, parse: bool) -> dict[str, Any] | None:
        """Run ``cmd``; keep its wall time, its own peak RSS (``os.wait4``) and the load around it."""
        before, t0 = _load(), time.perf_counter()
        log.info("%-24s (%.0f s left)", key, self.left())
        with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)  # noqa: S603 - our own commands
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            fo.seek(0)
            fe.seek(0)
            out, err = fo.read(), fe.read()
        entry: dict[str, Any] = {
            "load_before": before,
            "load_after": _load(),
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        }
        if proc.returncode != 0 or (parse and not out.strip()):
            entry["error"] = (err.strip().splitlines() or ["failed"])[-1][:300]
            log.warning("%s failed: %s", key, entry["error"])
        elif parse:
            entry.update(json.loads(out.strip().splitlines()[-1]))
        self.figures[key] = entry
        return entry if "error" not in entry else None


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L3"):
                info[key.strip()] = value.strip()
        flags = next((ln for ln in lscpu.splitlines() if ln.startswith("Flags")), "")
        info["bf16_flags"] = sorted({f for f in flags.split() if "bf16" in f or f.startswith("amx")})
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        info["memory_gb"] = round(int(mem) / 1024**2, 1)
    return info


@contextlib.contextmanager
def _dask_processes() -> Iterator[str | None]:
    """An existing scheduler with two one-thread worker processes, started with the dask CLI."""
    dask = Path(sys.executable).with_name("dask")
    port = 8786 + os.getpid() % 1000
    procs: list[subprocess.Popen[bytes]] = []
    address = f"tcp://127.0.0.1:{port}"
    try:
        procs.append(
            subprocess.Popen([str(dask), "scheduler", "--port", str(port), "--no-dashboard"], stderr=subprocess.DEVNULL)
        )
        time.sleep(3)
        for _ in range(2):
            cmd = [str(dask), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"]
            procs.append(
                subprocess.Popen(cmd, stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            )
        time.sleep(8)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _get(figs: dict[str, Any], key: str, field: str) -> Any:
    return (figs.get(key) or {}).get(field)


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run every part in order of importance while the time budget lasts; return the figures."""
    r = Runner(root, time.monotonic() + args.budget_s)
    size, batch = args.size, args.batch
    main = root / f"s{size}"
    r.run("machine", "machine", root)
    r.run("generate", "generate", main, size=size)
    skip = set(args.skip)
    if r.run("align", "align", main, size=size) is None:
        return r.figures
    r.run("decode_floor", "decode", main)
    r.run("reader", "reader", main)
    shipped = _get(r.figures, "machine", "shipped_mode") or "fp32"
    modes = ["fp32", "bf16"] + (["bf16-compile"] if args.compile or shipped == "bf16-compile" else [])
    for mode in modes:
        r.run(f"compute_floor:{mode}", "compute", main, mode=mode, batch=batch)
        r.run(f"detect:{mode}", "detect", main, mode=mode, batch=batch, size=size, tag=mode)
    for mode in modes[1:]:
        if _get(r.figures, f"detect:{mode}", "out"):
            r.run(
                f"agree:{mode}_vs_fp32",
                "agree",
                main,
                a=r.figures["detect:fp32"]["out"],
                b=r.figures[f"detect:{mode}"]["out"],
            )
    if "torchgeo" not in skip:
        for mode in modes[:2]:  # the peer is not compiled (each compile costs minutes here)
            r.run(f"torchgeo:{mode}", "torchgeo", main, mode=mode, batch=batch, tag=mode)
        if _get(r.figures, "torchgeo:fp32", "out"):
            r.run(
                "agree:torchgeo_vs_scarwatch_fp32",
                "agree",
                main,
                a=r.figures["detect:fp32"]["out"],
                b=r.figures["torchgeo:fp32"]["out"],
            )
    r.run("vectorize", "vectorize", main, size=size, compare=True)
    ledger_script = ROOT / "benchmarks" / "bench_ledger.py"
    if ledger_script.exists() and "ledger" not in skip:
        out = root / "ledger.json"
        if (
            r.command("ledger", [sys.executable, str(ledger_script), "--json", str(out)], parse=False) is not None
            and out.exists()
        ):
            own = json.loads(out.read_text())  # its own load readings must not replace the runner's
            r.figures["ledger"].update({(f"own_{k}" if k.startswith("load_") else k): v for k, v in own.items()})
    if "report" not in skip:
        r.run("report", "report", root)
    if "map" not in skip:
        # two sizes, so the month's map figure is a slope (its fixed start-up drops out), as growth's are
        for msize in sorted(args.map_size):
            cmd = [
                sys.executable,
                str(ROOT / "benchmarks" / "bench_map.py"),
                "--size",
                str(msize),
                "--flags",
                str(args.map_flags),
                "--no-browser",
                "--workdir",
                str(root),
            ]
            r.command(_map_key(msize, args), cmd, parse=True)
    if "dask" not in skip:
        small = root / f"s{args.dask_size}"
        if small != main:
            r.run(f"generate:{args.dask_size}", "generate", small, size=args.dask_size)
            r.run(f"align:{args.dask_size}", "align", small, size=args.dask_size)
        # the Dask pair's few tiles run eager, as detect.compile auto runs them (each worker would compile)
        dmode = shipped.removesuffix("-compile")
        r.run("dask:inprocess", "detect", small, mode=dmode, batch=batch, size=args.dask_size, tag="dask_ref")
        for n in (1, 2):
            r.run(f"dask:local{n}", "dask", small, mode=dmode, batch=batch, workers=n, tag=f"local{n}")
        with _dask_processes() as address:
            r.run("dask:existing", "dask", small, mode=dmode, batch=batch, scheduler=address, tag="existing")
    growth(r, args, root)
    return r.figures


def growth(r: Runner, args: argparse.Namespace, root: Path, *, force: bool = False) -> None:
    """The pipeline (align + tile, detect in the shipped mode, vectorize) over growing generated pairs."""
    shipped = _get(r.figures, "machine", "shipped_mode") or "fp32"
    per_pair = _get(r.figures, f"detect:{shipped}", "seconds") or _get(r.figures, "detect:fp32", "seconds") or 0.0
    pairs = _get(r.figures, f"detect:{shipped}", "pairs") or 1
    for gsize in args.growth:
        n_tiles = max(1, -(-(gsize - 64) // 448)) ** 2
        estimate = 3 * n_tiles * per_pair / pairs + 30
        if gsize != args.size and estimate > r.left() and not force:
            r.figures[f"growth:{gsize}"] = {"skipped": f"needs about {estimate:.0f} s, {r.left():.0f} s left"}
            continue
        d = root / f"s{gsize}"
        if gsize == args.size:
            stages = {
                "align": r.figures.get("align"),
                "detect": r.figures.get(f"detect:{shipped}"),
                "vectorize": r.figures.get("vectorize"),
            }
        else:
            have = (d / "out").is_dir() or r.run(f"growth:{gsize}:generate", "generate", d, size=gsize)
            a = r.run(f"growth:{gsize}:align", "align", d, size=gsize) if have else None
            det = (
                r.run(f"growth:{gsize}:detect", "detect", d, mode=shipped, batch=args.batch, size=gsize, tag=shipped)
                if a
                else None
            )
            vec = r.run(f"growth:{gsize}:vectorize", "vectorize", d, size=gsize) if det else None
            stages = {"align": a, "detect": det, "vectorize": vec}
        if all(stages.values()):
            r.figures[f"growth:{gsize}"] = {
                "size": gsize,
                "km2": (gsize * GSD) ** 2 / 1e6,
                "seconds": round(sum(v["wall_s"] for v in stages.values() if v), 2),
                "stage_seconds": {k: v["wall_s"] for k, v in stages.items() if v},
                "peak_rss_mb": max(v["peak_rss_mb"] for v in stages.values() if v),
                "stage_peak_rss_mb": {k: v["peak_rss_mb"] for k, v in stages.items() if v},
            }


def plot_growth(figs: dict[str, Any], path: Path) -> bool:
    """Seconds and peak RSS against area, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(
        (v for k, v in figs.items() if k.count(":") == 1 and k.startswith("growth:") and "km2" in v),
        key=lambda v: v["km2"],
    )
    if not rows:
        return False
    km2 = [v["km2"] for v in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for stage in ("align", "detect", "vectorize"):
        a1.plot(km2, [v["stage_seconds"][stage] for v in rows], "o-", label=stage)
        a2.plot(km2, [v["stage_peak_rss_mb"][stage] for v in rows], "o-", label=stage)
    a1.set(xlabel="area (km², 0.5 m)", ylabel="seconds", title="time")
    a2.set(xlabel="area (km², 0.5 m)", ylabel="peak RSS (MB)", title="memory")
    a1.legend()
    a2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def derive(figs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Ratios, floors and the extrapolation to a 500 km² month, from the measured figures."""
    d: dict[str, Any] = {}
    decode = _get(figs, "decode_floor", "pairs_per_s")
    for mode in MODES:
        det = _get(figs, f"detect:{mode}", "pairs_per_s")
        comp = _get(figs, f"compute_floor:{mode}", "pairs_per_s")
        if det:
            d[f"peer_ratio:{mode}"] = _ratio(det, _get(figs, f"torchgeo:{mode}", "pairs_per_s"))
            floor = min(v for v in (decode, comp) if v) if (decode or comp) else None
            d[f"over_floor:{mode}"] = _ratio(floor, det)  # detect's time over the time of the slower floor
    rows = sorted(
        (v for k, v in figs.items() if k.startswith("growth:") and k.count(":") == 1 and "km2" in v),
        key=lambda v: v["km2"],
    )
    marginal = detect_marginal(figs, args, rows)
    if marginal:
        d.update(marginal)
    if rows:
        big = rows[-1]
        d["growth_s_per_km2"] = {str(v["size"]): round(v["seconds"] / v["km2"], 1) for v in rows}
        d["growth_peak_rss_mb"] = {str(v["size"]): v["peak_rss_mb"] for v in rows}
        # seconds per km² of each stage: the slope between the two largest pairs (what one more km² costs;
        # the fixed start-up of each stage drops out), or time / area with one size only
        per_km2 = {}
        for k, sec in big["stage_seconds"].items():
            slope = None
            if len(rows) > 1:
                small = rows[-2]
                slope = (sec - small["stage_seconds"][k]) / (big["km2"] - small["km2"])
            per_km2[k] = slope if slope is not None and slope > 0 else sec / big["km2"]
        d["city_month_method"] = (
            "slope between the two largest pairs" if len(rows) > 1 else "time / area of the one pair"
        )
        map_rate, map_method = map_s_per_km2(figs, args)
        if map_rate:
            per_km2["map"] = map_rate
            d["city_month_map_method"] = map_method
        month = {k: round(v * CITY_KM2 / 60, 1) for k, v in per_km2.items()}
        ledger = _get(figs, "ledger", "seconds")
        if ledger:
            month["ledger (100k flags x 50k cases)"] = round(ledger / 60, 2)
        report = _get(figs, "report", "seconds_per_month")
        if report:
            month["report"] = round(report / 60, 2)
        d["city_month_minutes"] = month
        d["city_month_total_minutes"] = round(sum(month.values()), 1)
        d["city_month_from_size"] = big["size"]
    return d


def detect_marginal(figs: dict[str, Any], args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Detect's seconds per tile between the two largest growth pairs (the shipped mode), over the floor's.

    What one more tile of a month costs: the model load, the compile (when on) and the COG's overviews are
    paid once per run and drop out of the slope, as they do over a city's 10,000 tiles.
    """
    shipped = _get(figs, "machine", "shipped_mode") or "fp32"
    pts = []
    for v in rows[-2:]:
        key = f"detect:{shipped}" if v["size"] == args.size else f"growth:{v['size']}:detect"
        sec, n = _get(figs, key, "seconds"), _get(figs, key, "pairs")
        if sec and n:
            pts.append((n, sec))
    decode = _get(figs, "decode_floor", "pairs_per_s")
    comp = _get(figs, f"compute_floor:{shipped}", "pairs_per_s")
    if len(pts) < 2 or pts[1][0] <= pts[0][0] or not (decode or comp):
        return {}
    per_tile = (pts[1][1] - pts[0][1]) / (pts[1][0] - pts[0][0])
    floor_s = max(1 / v for v in (decode, comp) if v)
    return {
        f"marginal_s_per_tile:{shipped}": round(per_tile, 4),
        f"over_floor_marginal:{shipped}": round(per_tile / floor_s, 3) if per_tile > 0 else None,
        "marginal_between_tiles": [pts[0][0], pts[1][0]],
    }


def _map_key(size: int, args: argparse.Namespace) -> str:
    """The figure's key of the map at ``size``: ``map`` for the largest, ``map:<size>`` for the others."""
    return "map" if size == max(args.map_size) else f"map:{size}"


def map_s_per_km2(figs: dict[str, Any], args: argparse.Namespace) -> tuple[float | None, str]:
    """Pyramid seconds per km²: the slope between the smallest and the largest map, else time / area of one."""
    rows = []
    for size in sorted(set(args.map_size)):
        sec = _get(figs, _map_key(size, args), "pyramid_s")
        if sec:
            rows.append(((size * GSD) ** 2 / 1e6, sec))
    if len(rows) > 1 and rows[-1][1] > rows[0][1]:
        (k0, s0), (k1, s1) = rows[0], rows[-1]
        return (s1 - s0) / (k1 - k0), f"slope between the {min(args.map_size)}² and {max(args.map_size)}² maps"
    if rows:
        return rows[-1][1] / rows[-1][0], "time / area of one map"
    return None, "not measured"


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def _load_text(e: dict[str, Any] | None) -> str:
    if not e or "load_before" not in e:
        return ""
    return f"{e['load_before'][0]:.1f} → {e['load_after'][0]:.1f}"


def _break_even(figs: dict[str, Any]) -> float | None:
    """Tiles after which compiling pays: the compiled first batch's extra seconds over the seconds saved per tile."""
    c_bf16 = _get(figs, "compute_floor:bf16", "pairs_per_s")
    c_comp = _get(figs, "compute_floor:bf16-compile", "pairs_per_s")
    first_c = _get(figs, "compute_floor:bf16-compile", "first_batch_s")
    first_e = _get(figs, "compute_floor:bf16", "first_batch_s") or 0.0
    if not (c_bf16 and c_comp and first_c) or c_comp <= c_bf16:
        return None
    return max(0.0, first_c - first_e) / (1 / c_bf16 - 1 / c_comp)


def month_why(figs: dict[str, Any], d: dict[str, Any]) -> str:
    """Why the 500 km² month takes what it takes, from this run's figures (the compile estimate included)."""
    month = d.get("city_month_minutes") or {}
    det, total = month.get("detect"), d.get("city_month_total_minutes")
    slow = max(month, key=lambda k: month[k]) if month else "detect"
    text = (
        f"the largest part is {slow} ({_fmt(month.get(slow), 0)} min); detect runs about {CITY_TILES:,} tiles of 512² "
        "through a 40-GFLOP network on 2 cores (see the load columns: a job beside the run slows it several-fold)"
    )
    c_bf16 = _get(figs, "compute_floor:bf16", "pairs_per_s")
    c_comp = _get(figs, "compute_floor:bf16-compile", "pairs_per_s")
    shipped = _get(figs, "machine", "shipped_mode") or "fp32"
    if shipped.endswith("-compile"):
        text += "; detect.compile auto compiles a month of this size, and the figures above ran compiled"
    elif det and total and c_bf16 and c_comp and c_comp > c_bf16:
        saved = det - det * c_bf16 / c_comp
        text += (
            f"; detect.compile (its compute floor {_fmt(c_comp / c_bf16)}x bf16 eager here) would bring detect to about "
            f"{_fmt(det - saved, 0)} min and the month to about {_fmt(total - saved, 0)} min"
        )
    if total and total < 60:
        return text + "; a GPU (scripts/gpu_detect.py) takes detect to minutes"
    return text + "; a GPU (scripts/gpu_detect.py) or a cheaper network is what meets it with room"


def targets(figs: dict[str, Any], d: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (target, measured, status, why) of issue 15's targets, from the figures of this run."""
    rows: list[tuple[str, str, str, str]] = []

    def status(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**not met**")

    for mode in ("fp32", "bf16"):
        r = d.get(f"peer_ratio:{mode}")
        rows.append(
            (
                f"detect ≥ 2x the torchgeo loop, {mode} against {mode}",
                f"{_fmt(r)}x" if r else "not measured",
                status(None if r is None else r >= 2),
                "both loops run the same forward, most of their time here (compute floor below), so the ratio is "
                "at most (peer time) / (compute floor time); detect's lead is outside the network (value tables "
                "instead of np.interp, no reader thread, no torchvision import), the peer pays rasterio.merge per "
                "sample, its index and a full-raster stitch",
            )
        )
    ag = figs.get("agree:bf16_vs_fp32") or {}
    if "flipped_fraction" in ag:
        f = ag["flipped_fraction"]
        rows.append(
            (
                "bf16 masks agree with fp32 to 1 pixel in 10⁴",
                f"{ag['flipped']} of {ag['pixels']} pixels ({_fmt(f)})",
                status(f <= 1e-4),
                "synthetic texture without change: the probabilities sit far from the threshold; the calibrated "
                "pixel F1 on every validation set in bf16 is equal or higher (models/scarnet.md, Inference precision)",
            )
        )
    shipped = _get(figs, "machine", "shipped_mode") or "fp32"
    setting = _get(figs, "machine", "shipped_setting") or {}
    of = d.get(f"over_floor:{shipped}")
    om = d.get(f"over_floor_marginal:{shipped}")
    between = d.get("marginal_between_tiles") or ["?", "?"]
    rows.append(
        (
            f"detect within 1.25x of max(decode floor, compute floor), shipped mode ({shipped}, params.yaml "
            f"detect.precision {setting.get('precision', 'n/a')}, compile {setting.get('compile', 'n/a')} for a month)",
            (f"{_fmt(om)}x per tile of a month ({between[0]} → {between[1]} tiles); " if om else "")
            + (f"{_fmt(of)}x over the whole main-pair run" if of else "whole run not measured"),
            status(None if (om or of) is None else (om or of) <= 1.25),
            "the per-tile figure is what a city's month pays (the slope between the two largest growth pairs); the "
            "whole run adds the model load (about 1.5 s), the compile when on, the first batch, blending and the COG "
            "with overviews, paid once per run",
        )
    )
    total = d.get("city_month_total_minutes")
    det = (d.get("city_month_minutes") or {}).get("detect")
    rows.append(
        (
            "a 500 km² month through align → report under 60 min on these 2 cores",
            f"{_fmt(total, 0)} min extrapolated (detect {_fmt(det, 0)} min)" if total else "not measured",
            status(None if total is None else total < 60),
            month_why(figs, d),
        )
    )
    rss = d.get("growth_peak_rss_mb") or {}
    if rss:
        sizes = sorted(rss, key=int)
        flat = rss[sizes[-1]] / max(1.0, rss[sizes[0]])
        top = max(rss.values())
        rows.append(
            (
                "peak RSS of every stage on a 20k² pair under 2 GB, flat in raster size",
                f"max {top:.0f} MB over {', '.join(s + '²' for s in sizes)}; largest/smallest {flat:.2f}",
                status(top < 2048 and flat < 1.25),
                "measured up to the largest size the budget allowed; detect's memory is torch plus the network's "
                "activations for one batch plus a strip of tile rows (width x about 768 rows x 13 bytes: "
                "200 MB at 20k), align and vectorize work window by window; 20k² extrapolated from this flat growth",
            )
        )
    lg = figs.get("ledger") or {}
    lsec = lg.get("seconds")
    rows.append(
        (
            "ledger join of 100,000 flags against 50,000 cases under 10 s",
            f"{_fmt(lsec)} s" if lsec else "not measured (benchmarks/bench_ledger.py absent in this run)",
            status(None if lsec is None else lsec < 10),
            "STRtree bulk queries over the cases and permits (pipeline/ledger/matching.py), checked equal to the "
            "quadratic rule in tests/test_ledger_scale.py",
        )
    )
    rows.append(
        (
            "on a GPU: detect ≥ 0.8 x the host's decode floor at its best batch (bf16)",
            "not measured (no GPU lent to this task)",
            "n/a",
            "scripts/gpu_detect.py is ready: pack tiles here, run there (torch and numpy only)",
        )
    )
    return rows


def _bf16_words(machine: dict[str, Any]) -> str:
    """How this CPU computes bf16, from the run's own lscpu flags (the boxes here differ run to run)."""
    flags = set(machine.get("bf16_flags") or [])
    name = (machine.get("Model name") or "this CPU").strip()
    if "amx_bf16" in flags:
        return f"AMX-BF16 on this {name}"
    if "avx512_bf16" in flags:
        return f"AVX512-BF16 on this {name}; no AMX"
    return f"no native bf16 on this {name}"


def notes(figs: dict[str, Any], d: dict[str, Any], machine: dict[str, Any] | None = None) -> list[str]:
    """The prose under the tables: the levers, the peer, Dask, what a GPU cluster would give."""
    rd = figs.get("reader") or {}
    f = {
        k: _get(figs, k, "pairs_per_s")
        for k in (
            "decode_floor",
            "compute_floor:fp32",
            "compute_floor:bf16",
            "detect:fp32",
            "detect:bf16",
            "dask:inprocess",
            "dask:local1",
            "dask:local2",
            "dask:existing",
            "compute_floor:bf16-compile",
        )
    }
    return [
        "## Notes",
        "",
        "**Levers in detect, each measured above.** (1) The histogram match is a lookup of one float32 per stored "
        f"value (`pair.value_tables`: 256 entries for uint8, 65,536 for uint16) instead of `np.interp` on float32: the reader runs at {_fmt(rd.get('tables_pairs_per_s'))} "
        f"against {_fmt(rd.get('interp_pairs_per_s'))} pairs/s, bit for bit the same (tests/test_imagery.py). (2) The previous epoch's sub-pixel shift still goes "
        f"through a bilinear WarpedVRT: reading it unwarped runs at {_fmt(rd.get('unwarped_pairs_per_s'))} pairs/s, so a warp-free path could gain at most that "
        "ratio on the reader, which is already far above the compute floor on this box; not changed (GDAL's edge and alpha semantics would have to be matched "
        "and measured). (3) `detect.workers: 0` starts no reader thread (used here; params.yaml keeps 2). (4) torchvision is no longer imported: "
        "`conv_bn_relu` builds the same `Conv2d`/`BatchNorm2d`/`ReLU` sequence (same parameter names, the checkpoints load unchanged), about 1.5 s of CPU "
        "before the first batch. (5) `detect.precision: bf16` (autocast, channels-last) and `detect.compile: true` (torch.compile with freezing, once per "
        "process, short batches padded, eager fallback with a WARNING). (6) A batch with no pixel valid in both epochs skips the network; tiles below "
        "`tile.min_valid` never reach detect.",
        "",
        f"**bf16 and compile.** The compute floor is {_fmt(_ratio(f['compute_floor:bf16'], f['compute_floor:fp32']))}x faster in bf16 than fp32 in this run "
        f"({_bf16_words(machine or {})}) and {_fmt(_ratio(f['compute_floor:bf16-compile'], f['compute_floor:fp32']))}x with bf16 + torch.compile "
        f"(freezing on; the first batch, which compiles, took {_fmt(_get(figs, 'compute_floor:bf16-compile', 'first_batch_s'))} s with inductor's cache as this run left it, "
        f"74 s cold when measured by hand), with the masks' agreement above; so compile pays after about {_fmt(_break_even(figs), 0)} tiles "
        "with the cache warm, and after about 1,000 cold. params.yaml's `detect.precision: auto` runs bf16 where the CPU has bf16 instructions (AVX512-BF16 or AMX; "
        "fp32 elsewhere) and `scarwatch calibrate`/`evaluate` run at the same precision; at bf16 the shipped checkpoint's calibrated pixel F1 is equal or "
        "higher on every validation set and class (models/scarnet.md, Inference precision). `detect.compile: auto` (the default) "
        "compiles runs of `detect.compile_min_tiles` (1,000) tiles or more where a C++ compiler is found, so a city's month compiles and "
        "the demo town's 20-tile months do not.",
        "",
        "**The torchgeo peer** (`part_torchgeo`): two `RasterDataset`s (one per epoch folder) in an `IntersectionDataset`, a `GridGeoSampler` with the "
        "same 512 px tile and 448 px stride, a `DataLoader` with `stack_samples`, the same checkpoint's network at the same batch and precision; torchgeo has "
        "no stitcher, so each tile is written into a full-size array at its offset (the overlap overwritten), then to a GeoTIFF. It reads the raw sheets "
        "(no co-registration, no histogram match), so its masks differ from detect's by what those change, not by the loop. torchgeo 0.8.1 pitfalls: "
        "`torchgeo.datasets` imports `requests` without declaring it (the `bench` extra adds it); a date in the file names gives each epoch its own time "
        "span, `IntersectionDataset` then finds no temporal overlap and `spatial_only=True` breaks the sampler, so the sheets carry no date.",
        "",
        f"**Dask.** The same graph ran in process ({_fmt(f['dask:inprocess'], 3)} pairs/s), on a `LocalCluster` of 1 worker process with 2 torch threads "
        f"({_fmt(f['dask:local1'], 3)}), of 2 processes with 1 thread each ({_fmt(f['dask:local2'], 3)}), and on an existing scheduler started with `dask scheduler` "
        f"and two `dask worker` processes ({_fmt(f['dask:existing'], 3)}). On 2 cores there is no parallel speed-up to gain: the forward already uses both "
        "cores through torch's intra-op threads, so two workers split the same two cores, and each task pays a reopen of the pair and the pickled result "
        "on top (1 worker < in process). Where 2 workers come out ahead of in process, that is a share of a contended box (two busy processes hold more "
        "of the CPU against the other jobs than one), not scaling; compare the load columns. On a "
        "cluster of N GPU workers each worker delivers its own detect rate (scripts/gpu_detect.py measures it; each worker also decodes its own tiles, so "
        "a worker is bound by its host's decode floor), and the client blends and writes in order, which is what caps N: the client's share is the part of "
        "detect outside the network, paid once per tile on one core.",
    ]


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    """BENCHMARKS.md from the results."""
    figs, d, m = results["figures"], results["derived"], results["machine"]
    L: list[str] = ["# ScarWatch benchmarks", ""]
    L += [
        f"Generated by `make bench` ({results['command']}) on {results['date']} in {results['total_s']:.0f} s. "
        "Every figure below was measured in this one run, each in its own child process (peak RSS is that "
        "process's own); the load average (1 min) before → after each figure is given because the box may be "
        "shared: compare figures of one run with each other (ratios), not with another run.",
        "",
        f"**Machine**: {m.get('Model name')} , {m.get('CPU(s)')} CPUs, {m.get('memory_gb')} GB; bf16/AMX flags: "
        f"{', '.join(m.get('bf16_flags') or []) or 'none'}; Python {m['python']}, torch {m.get('torch')}, torchgeo "
        f"{m.get('torchgeo', 'not installed')}. Network: `{CHECKPOINT.relative_to(ROOT)}`, tile 512, overlap 64 "
        f"(stride 448), batch {args.batch}, detect.workers 0.",
        "",
        "## Targets (issue 15)",
        "",
        "| target | measured in this run | status | why |",
        "|---|---|---|---|",
        *(f"| {t} | {m_} | {st} | {why} |" for t, m_, st, why in targets(figs, d)),
        "",
        "## Stages",
        "",
        "| figure | value | peak RSS MB | load before → after | wall s |",
        "|---|---|---|---|---|",
    ]

    def row(label: str, key: str, value: str) -> None:
        e = figs.get(key)
        if e is None:
            return
        if "error" in e:
            value = f"failed: {e['error']}"
        L.append(
            f"| {label} | {value} | {_fmt(e.get('peak_rss_mb'), 0)} | {_load_text(e)} | {_fmt(e.get('wall_s'), 1)} |"
        )

    a = figs.get("align") or {}
    row(
        f"align + tile, {args.size}² px",
        "align",
        f"{_fmt(a.get('mb_per_s'))} MB/s ({_fmt(a.get('align_s'))} + {_fmt(a.get('tile_s'))} s, {a.get('tiles')} tiles, shift {a.get('shift_px')})",
    )
    row(
        "decode floor (rasterio, both epochs, 1 thread)",
        "decode_floor",
        f"{_fmt(_get(figs, 'decode_floor', 'pairs_per_s'))} pairs/s",
    )
    rd = figs.get("reader") or {}
    row(
        "detect's reader (AlignedPair.read: warp + value tables)",
        "reader",
        f"{_fmt(rd.get('tables_pairs_per_s'))} pairs/s; with np.interp as before: {_fmt(rd.get('interp_pairs_per_s'))} pairs/s ({_fmt(_ratio(rd.get('tables_pairs_per_s'), rd.get('interp_pairs_per_s')))}x); previous epoch unwarped (no sub-pixel shift): {_fmt(rd.get('unwarped_pairs_per_s'))} pairs/s",
    )
    for kind, label, text in (
        (
            "compute_floor",
            "compute floor, {} (forward on tiles in memory)",
            "{pairs_per_s} pairs/s (first batch {first_batch_s} s)",
        ),
        (
            "detect",
            "detect, {}",
            "{pairs_per_s} pairs/s, {km2_per_hour} km²/h at 0.5 m ({pairs} pairs, {seconds} s with model load and COG)",
        ),
    ):
        for mode in MODES:
            e = figs.get(f"{kind}:{mode}") or {}
            row(
                label.format(mode),
                f"{kind}:{mode}",
                text.format_map(
                    {k: _fmt(e.get(k), 3) for k in ("pairs_per_s", "first_batch_s", "km2_per_hour", "pairs", "seconds")}
                ),
            )
    for mode in MODES:
        e = figs.get(f"torchgeo:{mode}") or {}
        row(f"torchgeo peer loop, {mode}", f"torchgeo:{mode}", f"{_fmt(e.get('pairs_per_s'), 3)} pairs/s")
    v = figs.get("vectorize") or {}
    row(
        "vectorize",
        "vectorize",
        f"{_fmt(v.get('objects_per_s'))} objects/s ({v.get('objects')} objects in {_fmt(v.get('seconds'))} s, "
        f"{v.get('blobs')} blobs of two houses cut); without the cutting {v.get('objects_uncut')} objects in "
        f"{_fmt(v.get('seconds_uncut'))} s, so cutting costs {_fmt(v.get('cut_cost'))}x",
    )
    lg = figs.get("ledger") or {}
    row(
        "ledger join (bench_ledger.py: one month's flags joined to the cases, STRtree)",
        "ledger",
        f"{_fmt(lg.get('seconds'))} s ({_fmt(lg.get('cpu_seconds'))} CPU-s) for {lg.get('flags')} flags against "
        f"{lg.get('cases')} cases: {lg.get('events')} events, {lg.get('new_cases')} new cases, "
        f"{lg.get('reopened')} reopened; seeding the cases {_fmt(lg.get('seed_seconds'))} s",
    )
    for msize in sorted(args.map_size):
        mp = figs.get(_map_key(msize, args)) or {}
        row(
            f"map, {msize}² px, {args.map_flags} flags (bench_map.py, no browser)",
            _map_key(msize, args),
            ", ".join(
                f"{k} {_fmt(val)}"
                for k, val in mp.items()
                if k.endswith(("_s", "_mb", "tiles")) and k not in ("wall_s", "peak_rss_mb")
            ),
        )
    row(
        "report of one month (test fixture ledger; HTML, Markdown, PDF)",
        "report",
        f"{_fmt(_get(figs, 'report', 'seconds_per_month'))} s per month",
    )

    L += [
        "",
        "## Agreement (thresholded at the checkpoint's calibrated threshold)",
        "",
        "| compared | pixels | flipped | fraction | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for key, e in figs.items():
        if key.startswith("agree:") and "flipped" in e:
            L.append(
                f"| {key[6:]} | {e['pixels']} | {e['flipped']} | {_fmt(e['flipped_fraction'])} | {_fmt(e['max_abs_diff'], 4)} |"
            )

    L += ["", "## Ratios", "", "| mode | detect / torchgeo | detect time / slower floor |", "|---|---|---|"]
    for mode in MODES:
        if f"peer_ratio:{mode}" in d:
            peer = d[f"peer_ratio:{mode}"]
            peer_text = f"{_fmt(peer)}x" if peer is not None else "n/a (the peer runs eager)"
            L.append(f"| {mode} | {peer_text} | {_fmt(d.get(f'over_floor:{mode}'))} |")

    L += [
        "",
        "## Dask",
        "",
        "| run | workers | torch threads each | pairs/s | load before → after |",
        "|---|---|---|---|---|",
    ]
    for key in ("dask:inprocess", "dask:local1", "dask:local2", "dask:existing"):
        e = figs.get(key)
        if e:
            L.append(
                f"| {key[5:]} | {e.get('workers', 'in process')} | {e.get('torch_threads_per_worker', 'all')} | {_fmt(e.get('pairs_per_s'), 3) if 'error' not in e else 'failed: ' + e['error']} | {_load_text(e)} |"
            )

    L += [
        "",
        "## Growth",
        "",
        "| size | km² | seconds (align, detect, vectorize) | s per km² | peak RSS MB (align, detect, vectorize) |",
        "|---|---|---|---|---|",
    ]
    for key, e in sorted(figs.items(), key=lambda kv: kv[1].get("size", 0) if isinstance(kv[1], dict) else 0):
        if key.startswith("growth:") and key.count(":") == 1:
            if "skipped" in e:
                L.append(f"| {key[7:]}² | | skipped: {e['skipped']} | | |")
            else:
                st, rs = e["stage_seconds"], e["stage_peak_rss_mb"]
                L.append(
                    f"| {e['size']}² | {e['km2']:.2f} | {e['seconds']:.0f} ({', '.join(_fmt(st[k], 1) for k in st)}) | {e['seconds'] / e['km2']:.0f} | {e['peak_rss_mb']:.0f} ({', '.join(_fmt(rs[k], 0) for k in rs)}) |"
                )
    if results.get("plot"):
        L += ["", f"![growth]({results['plot']})"]
    if "city_month_minutes" in d:
        parts = ", ".join(f"{k} {v} min" for k, v in d["city_month_minutes"].items())
        L += [
            "",
            f"**A 500 km² month, extrapolated** linearly in area ({d['city_month_method']}, largest {d['city_month_from_size']}²; map: pyramid seconds per km², {d.get('city_month_map_method', 'not measured')}; ledger and report as measured): {parts}; total **{d['city_month_total_minutes']} min**.",
        ]
    L += ["", *notes(figs, d, m)]
    L += [
        "",
        "## Reproduce",
        "",
        "```",
        "make bench                      # = .venv/bin/python benchmarks/run_all.py",
        results["command"],
        "```",
        "",
    ]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    """Measure, then write results.json, the growth plot and BENCHMARKS.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size", type=int, default=1536, help="side of the main generated pair (px at 0.5 m)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--growth", default="512,1024,1536,4096", help="sides of the growth pairs, as budget allows")
    p.add_argument("--dask-size", type=int, default=1024)
    p.add_argument(
        "--map-size", type=int, nargs="+", default=[1024, 4096], help="sides of the maps (two give the month a slope)"
    )
    p.add_argument("--map-flags", type=int, default=1000)
    p.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip bf16 + torch.compile (about 100 s here)"
    )
    p.add_argument("--skip", default="", help="comma list of: torchgeo, ledger, report, map, dask")
    p.add_argument("--budget-s", type=float, default=780.0, help="growth sizes that would overrun this are skipped")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the generated pairs (e.g. for scripts/gpu_detect.py pack)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    p.add_argument("--render", type=Path, default=None, help="only rewrite --out from this results.json")
    p.add_argument("--add-growth", action="store_true", help="measure only the --growth sizes; add them to --json")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        _child_main(args.part, args.root, args.args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.render:
        stored = json.loads(args.render.read_text(encoding="utf-8"))
        for k, v in stored.get("args", {}).items():
            setattr(args, k, v)
        stored["derived"] = derive(stored["figures"], args)
        args.out.write_text(render(stored, args), encoding="utf-8")
        return 0
    args.growth = [int(v) for v in args.growth.split(",") if v]
    args.skip = [v for v in args.skip.split(",") if v]
    root = Path(tempfile.mkdtemp(prefix="scarwatch_bench_", dir=args.workdir))
    if args.add_growth:  # a later run adds growth sizes the main run's budget skipped
        stored = json.loads(args.json.read_text(encoding="utf-8"))
        r = Runner(root, time.monotonic() + args.budget_s)
        r.figures = stored["figures"]
        args.size = stored.get("args", {}).get("size", args.size)
        growth(r, args, root, force=True)
        stored["command"] += f"; then {sys.argv[0]} --add-growth --growth {','.join(map(str, args.growth))}"
        stored["derived"] = derive(r.figures, args)
        stored["plot"] = (
            os.path.relpath(args.json.with_name("growth.png"), args.out.parent)
            if plot_growth(r.figures, args.json.with_name("growth.png"))
            else None
        )
        args.json.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
        args.out.write_text(render(stored, args), encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        return 0
    t0 = time.perf_counter()
    try:
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "nice -n 5 .venv/bin/python benchmarks/run_all.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": _machine(),
            "args": {k: getattr(args, k) for k in ("size", "batch", "dask_size", "map_size", "map_flags")},
            "load_start": _load(),
        }
        results["figures"] = measure(args, root)
        versions = results["figures"].get("machine") or {}
        results["machine"].update({k: versions[k] for k in ("torch", "torchgeo", "torch_threads") if k in versions})
        results["derived"] = derive(results["figures"], args)
        results["load_end"] = _load()
        results["total_s"] = round(time.perf_counter() - t0, 1)
        png = args.json.with_name("growth.png")
        results["plot"] = os.path.relpath(png, args.out.parent) if plot_growth(results["figures"], png) else None
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        args.out.write_text(render(results, args), encoding="utf-8")
        log.info("wrote %s and %s in %.0f s", args.out, args.json, results["total_s"])
    finally:
        if args.keep:
            log.info("kept the generated pairs in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
