"""Batched, blended, streaming change detection over the tiles of an aligned pair.

:func:`detect_pair` reads the tile index, pushes the tiles in batches through a
:class:`pipeline.predictors.Predictor` (a network checkpoint or the CVA baseline) and writes the
probability COG of the month (bands ``p_new``, ``p_removed``; uint8 ``round(p * 254)``, 255 = nodata
outside the valid area; the encoding and the tags are in :mod:`pipeline.formats`).

How it works:

* **Prefetch.** Reader threads (``settings.workers``, each with its own handle on the pair) decode the
  next ``settings.prefetch`` batches while the model runs on the current one; on CUDA the reader also
  pins the batch and starts its upload on a side stream, so the model never waits on I/O or copies.
  ``workers: 0`` starts no thread and reads each batch just before it runs (best on few CPU cores).
* **Skipping.** A batch none of whose pixels is valid in both epochs is not run through the network
  (its tiles are nodata anyway); the tile stage already drops tiles below ``tile.min_valid``.
* **Invalid pixels read as unchanged.** Wherever a pixel is not valid in both epochs (one epoch has no
  sheet there, the co-registration shift left a border strip empty, a cloud mask), the network is given
  ``curr``'s value in both epochs (:func:`pipeline.nets.blocks.unchanged_where_invalid`). Those pixels
  come out as nodata anyway; what matters is their valid neighbours: an epoch's missing pixels read as its empty value
  (black), and black beside real ground reads as a structure appearing or vanishing, which the network's
  receptive field carries a few pixels into the valid area.
* **Padding.** Every tile is padded by reflection to the nominal tile size rounded up to a multiple of
  16 (partial edge tiles included), so every batch has one shape and networks with stride 16 fit.
* **Blending.** Each tile's prediction is weighted by a separable window: ones in the middle, squared
  Hann ramps (``sin^4``) over the ``overlap`` pixels at each side, never exactly 0; the blended value
  is the weighted sum divided by the sum of weights. Weights fall smoothly, so there are no seams, and
  steeply near a tile's edge, so the few pixels whose receptive field reaches the padding carry almost
  no weight where a neighbouring tile sees them from its inside.
* **Bounded memory.** Tiles are processed in row-major grid order. Weighted sums are kept only for the
  strip of tile rows in flight (about one tile height plus one output block, full raster width). When a
  tile starts below row ``r``, no later tile touches rows above ``r``: those rows are final and are
  flushed, in whole output blocks, to a tiled GeoTIFF. The GeoTIFF then gets overviews and is copied to
  a COG with the GDAL COG driver (written to a temporary file, then renamed).
* **Scale-out.** With ``scheduler="tcp://host:port"`` the same batches run as tasks on an existing
  dask.distributed cluster: each task reopens the pair by path, reads, pads and predicts its batch and
  returns the cropped probabilities; the client gathers them in submission order (a bounded number in
  flight) and blends and writes exactly as above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.windows import Window

from pipeline.config import DetectSettings
from pipeline.errors import ConfigError, CRSMismatchError, InputError, ScarWatchError, first_line
from pipeline.fileio import atomic_path, remove_stale_temps, temp_name
from pipeline.formats import PROB_BANDS, PROB_NODATA, encode_probabilities, probability_tags
from pipeline.nets.blocks import STRIDE, pad_to_multiple, padded_size, unchanged_where_invalid
from pipeline.predictors import Predictor, make_predictor
from pipeline.tiling import Tile, iter_batches, read_tile_index

if TYPE_CHECKING:
    from pipeline.pair import PairReader

log = logging.getLogger(__name__)

BLOCK = 256


PairOpener = Callable[[Path], AbstractContextManager[Any]]


def open_aligned_pair(pair_dir: Path) -> AbstractContextManager[Any]:
    """Open the aligned pair written by ``scarwatch align`` (the default opener; picklable)."""
    from pipeline.pair import AlignedPair

    return AlignedPair.open(pair_dir)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class DetectSummary:
    """What one detection run did.

    Attributes:
        out_path: the probability COG written.
        n_tiles: tiles predicted.
        seconds: wall time of the whole run (reading, predicting, writing).
        tiles_per_s: tiles per second.
        km2_per_hour: area covered by tiles per hour, in km².
        device: where the model ran (``cpu``, ``cuda:0``, or ``... on dask tcp://...``).
    """

    out_path: Path
    n_tiles: int
    seconds: float
    tiles_per_s: float
    km2_per_hour: float
    device: str


# ------------------------------------------------------------------------------------ tiles and blending


def blend_ramp(size: int, overlap: int) -> np.ndarray:
    """1-D blending weights of a tile of ``size`` pixels: ``sin^4`` ramps over ``overlap`` at each end.

    The ramps never reach 0 (smallest ``sin^4(pi / (4 overlap))``); callers divide by the sum of weights.

    >>> [round(float(v), 3) for v in blend_ramp(6, 2)]
    [0.021, 0.729, 1.0, 1.0, 0.729, 0.021]
    """
    if not 0 <= 2 * overlap <= size:
        raise ValueError(f"overlap {overlap!r} must be between 0 and half the tile size {size!r}")
    w = np.ones(size, dtype=np.float64)
    if overlap:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 4
        w[:overlap] = ramp
        w[size - overlap :] = ramp[::-1]
    return w.astype(np.float32)


def load_batch(pair: PairReader, tiles: Sequence[Tile], pad_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Read ``tiles``, make their invalid pixels unchanged and pad each by reflection to ``pad_size`` square.

    ``pad_size`` is a multiple of ``STRIDE``; :func:`pipeline.nets.blocks.unchanged_where_invalid` says
    why invalid pixels are given ``curr`` in both epochs.

    Returns:
        The batch float32 (b, 2, c, pad_size, pad_size) and each tile's valid mask (h, w).
    """
    xs, valids = [], []
    for tile in tiles:
        images, valid = pair.read(tile.window)
        h, w = images.shape[-2:]
        if (h, w) != (tile.height, tile.width):
            raise InputError(f"tile {tile.tile_id}: read {h}x{w} pixels, index says {tile.height}x{tile.width}")
        valid = np.asarray(valid, dtype=bool)
        xs.append(pad_to_multiple(unchanged_where_invalid(images, valid), STRIDE, min_size=pad_size))
        valids.append(valid)
    return np.stack(xs).astype(np.float32, copy=False), valids


class StripBlender:
    """Weighted sums for the strip of tile rows in flight; final rows go to ``sink`` in whole blocks.

    Tiles must arrive in row-major order (non-decreasing ``row_off``). When a tile starts at row ``r``,
    every row above ``r`` is final; rows are flushed in multiples of ``block`` (so each output block is
    written once), so the buffer holds at most about ``tile height + block`` rows of the raster width.

    Args:
        width: raster width.
        height: raster height.
        sink: called with ``(row_off, probs float32 (2, n, width), ok bool (n, width))`` per flush;
            ``ok`` is False where no tile covered the pixel or it is outside the valid area.
        block: flush granularity in rows.
    """

    def __init__(
        self, width: int, height: int, sink: Callable[[int, np.ndarray, np.ndarray], None], *, block: int = BLOCK
    ):
        self.width, self.height, self.sink, self.block = width, height, sink, block
        self.top = 0
        self.acc = np.zeros((2, 0, width), np.float32)
        self.wsum = np.zeros((0, width), np.float32)
        self.valid = np.zeros((0, width), bool)
        self.covered_pixels = 0

    def _grow(self, bottom: int) -> None:
        extra = min(bottom, self.height) - (self.top + self.wsum.shape[0])
        if extra > 0:
            self.acc = np.concatenate([self.acc, np.zeros((2, extra, self.width), np.float32)], axis=1)
            self.wsum = np.concatenate([self.wsum, np.zeros((extra, self.width), np.float32)])
            self.valid = np.concatenate([self.valid, np.zeros((extra, self.width), bool)])

    def add(self, tile: Tile, probs: np.ndarray, valid: np.ndarray, weight: np.ndarray) -> None:
        """Blend one tile's probabilities (2, h, w) with its weights (h, w) and valid mask (h, w)."""
        if tile.row_off < self.top:
            raise ValueError(f"tile {tile.tile_id} starts at row {tile.row_off} above flushed row {self.top}")
        self.flush(tile.row_off // self.block * self.block)
        self._grow(tile.row_off + tile.height)
        r, c = tile.row_off - self.top, tile.col_off
        rows, cols = slice(r, r + tile.height), slice(c, c + tile.width)
        self.acc[:, rows, cols] += probs * weight
        self.wsum[rows, cols] += weight
        self.valid[rows, cols] |= valid

    def flush(self, until: int) -> None:
        """Hand rows ``[top, until)`` to the sink and drop them."""
        until = min(until, self.height)
        if until <= self.top:
            return
        self._grow(until)
        n = until - self.top
        wsum = self.wsum[:n]
        covered = wsum > 0
        probs = self.acc[:, :n] / np.where(covered, wsum, 1.0)
        self.covered_pixels += int(np.count_nonzero(covered))
        self.sink(self.top, probs, covered & self.valid[:n])
        self.acc, self.wsum, self.valid = self.acc[:, n:].copy(), self.wsum[n:].copy(), self.valid[n:].copy()
        self.top = until

    def close(self) -> None:
        """Flush everything left (rows no tile covered come out as nodata)."""
        self.flush(self.height)


# ---------------------------------------------------------------------------------------------- output


class _CogWriter:
    """Streams blocks into a tiled GeoTIFF, then adds overviews and copies it to a COG atomically."""

    def __init__(self, out_path: Path, *, width: int, height: int, crs: CRS, transform: Affine, tags: dict[str, str]):
        self.out_path = out_path
        out_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_path)  # what a killed run left
        self.tmp = temp_name(out_path, "part")  # unique: two runs on one month never share it
        profile = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": 2,
            "dtype": "uint8",
            "crs": crs,
            "transform": transform,
            "nodata": PROB_NODATA,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        self.ds = rasterio.open(self.tmp, "w", **profile)
        for i, name in enumerate(PROB_BANDS, start=1):
            self.ds.set_band_description(i, name)
        self.ds.update_tags(**tags)

    def write(self, row_off: int, probs: np.ndarray, ok: np.ndarray) -> None:
        self.ds.write(encode_probabilities(probs, ok), window=Window(0, row_off, probs.shape[2], probs.shape[1]))

    def finish(self) -> None:
        width, height = self.ds.width, self.ds.height
        self.ds.close()
        factors, f = [2], 2
        while max(width, height) / f > BLOCK:
            f *= 2
            factors.append(f)
        with rasterio.open(self.tmp, "r+") as ds:
            ds.build_overviews(factors, Resampling.average)
        with atomic_path(self.out_path) as part:
            rasterio.shutil.copy(self.tmp, part, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=BLOCK, OVERVIEWS="AUTO")
            _verify_cog(part, width=width, height=height)
        self.tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.ds.close()
        self.tmp.unlink(missing_ok=True)


def _verify_cog(path: Path, *, width: int, height: int) -> None:
    """Read every block of the written COG back: GDAL does not always raise on a failed write (full disk).

    Raises:
        ScarWatchError: the file is truncated or unreadable (the previous output is kept).
    """
    try:
        with rasterio.open(path) as ds:
            if (ds.width, ds.height, ds.count) != (width, height, 2):
                raise ScarWatchError(f"{path}: written raster is {ds.width}x{ds.height}x{ds.count}")
            for _, window in ds.block_windows(1):
                ds.read(window=window)
            for factor in ds.overviews(1):
                ds.read(1, out_shape=(max(1, height // factor), max(1, width // factor)))
    except (rasterio.errors.RasterioError, OSError, ScarWatchError) as exc:
        raise ScarWatchError(
            f"{path}: the probability raster could not be written whole ({first_line(exc)}); check free disk "
            "space and run again (the previous output is unchanged)"
        ) from exc


# ------------------------------------------------------------------------------------------ the runner


class _ThreadPairs:
    """One open pair per reader thread (rasterio handles must not be shared between threads)."""

    def __init__(self, opener: PairOpener, pair_dir: Path):
        self.opener, self.pair_dir = opener, pair_dir
        self.local = threading.local()
        self.stacks: list[contextlib.ExitStack] = []
        self.lock = threading.Lock()

    def get(self) -> Any:
        pair = getattr(self.local, "pair", None)
        if pair is None:
            stack = contextlib.ExitStack()
            pair = stack.enter_context(self.opener(self.pair_dir))
            with self.lock:
                self.stacks.append(stack)
            self.local.pair = pair
        return pair

    def close(self) -> None:
        for stack in self.stacks:
            stack.close()


def predict_batch_task(
    opener: PairOpener, pair_dir: Path, tiles: Sequence[Tile], pad_size: int, predictor: Predictor
) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """One dask task: read, pad and predict a batch; return the device and per tile (probs, valid) cropped.

    Module-level so worker processes can import it; opens the pair by path (tasks carry no handles).
    """
    device = predictor.setup()
    with opener(pair_dir) as pair:
        batch, valids = load_batch(pair, tiles, pad_size)
    probs = predictor(predictor.prepare(batch))
    return device, [(probs[i, :, : t.height, : t.width].copy(), valids[i]) for i, t in enumerate(tiles)]


def _local_results(
    opener: PairOpener,
    pair_dir: Path,
    batches: list[list[Tile]],
    pad_size: int,
    predictor: Predictor,
    settings: DetectSettings,
) -> Generator[list[tuple[np.ndarray, np.ndarray]], None, None]:
    """Predict batches in this process; reader threads keep ``prefetch`` batches decoded ahead.

    With ``settings.workers == 0`` no thread is started: each batch is read in this thread just before it
    is predicted (on two cores the network already uses both, so a reader only competes with it).
    """
    pairs = _ThreadPairs(opener, pair_dir)

    def read(batch: list[Tile]) -> tuple[Any, list[np.ndarray]]:
        x, valids = load_batch(pairs.get(), batch, pad_size)
        return predictor.prepare(x), valids

    try:
        if settings.workers == 0:
            for batch in batches:
                prepared, valids = read(batch)
                yield _predict_valid(predictor, prepared, valids, batch, pad_size)
            return
        with ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="detect-read") as pool:
            todo = iter(batches)
            pending: deque[tuple[list[Tile], Future[tuple[Any, list[np.ndarray]]]]] = deque()

            def submit() -> None:
                batch = next(todo, None)
                if batch is not None:
                    pending.append((batch, pool.submit(read, batch)))

            for _ in range(settings.prefetch + settings.workers):
                submit()
            while pending:
                batch, future = pending.popleft()
                prepared, valids = future.result()
                submit()
                yield _predict_valid(predictor, prepared, valids, batch, pad_size)
    finally:
        pairs.close()


def _predict_valid(
    predictor: Predictor, prepared: Any, valids: list[np.ndarray], batch: list[Tile], pad_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Predict a batch, skipping the network when no pixel of any of its tiles is valid in both epochs.

    Such tiles come out as nodata whatever the network says (the blender masks them), so their
    probabilities are zeros; a batch with some valid tiles runs whole (one shape per batch).
    """
    if not any(v.any() for v in valids):
        return [(np.zeros((2, t.height, t.width), np.float32), valids[i]) for i, t in enumerate(batch)]
    probs = predictor(prepared)
    return [(probs[i, :, : t.height, : t.width], valids[i]) for i, t in enumerate(batch)]


def _dask_results(
    scheduler: str,
    opener: PairOpener,
    pair_dir: Path,
    batches: list[list[Tile]],
    pad_size: int,
    predictor: Predictor,
    devices: set[str],
) -> Generator[list[tuple[np.ndarray, np.ndarray]], None, None]:
    """Predict batches as tasks on a dask.distributed cluster; yield results in submission order."""
    from distributed import Client

    if "://" not in scheduler:
        raise ConfigError(f"scheduler {scheduler!r} is not a dask address like 'tcp://host:8786'; fix --scheduler")
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the dask scheduler at {scheduler!r} ({exc}); start it ('dask scheduler') or drop --scheduler"
        ) from exc
    with client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        remote = client.scatter(predictor, broadcast=True)
        pair_dir = Path(pair_dir).resolve()
        todo = iter(batches)
        pending: deque[Any] = deque()

        def submit() -> None:
            batch = next(todo, None)
            if batch is not None:
                pending.append(client.submit(predict_batch_task, opener, pair_dir, batch, pad_size, remote, pure=False))

        for _ in range(2 * n_workers + 1):
            submit()
        while pending:
            future = pending.popleft()
            device, results = future.result()
            future.release()
            submit()
            devices.add(device)
            yield results


def detect_pair(
    pair_dir: Path,
    tiles_path: Path,
    out_path: Path,
    settings: DetectSettings,
    *,
    overlap: int,
    scheduler: str | None = None,
    predictor: Predictor | None = None,
    opener: PairOpener = open_aligned_pair,
) -> DetectSummary:
    """Predict change probabilities over every tile of an aligned pair and write them as a COG.

    Args:
        pair_dir: the aligned pair folder (``<interim>/aligned/<month>``).
        tiles_path: its GeoParquet tile index.
        out_path: the COG to write (``<processed>/prob/<month>.tif``).
        settings: ``detect`` settings (method, model, device, batch size, reader threads, prefetch).
        overlap: the tile overlap in pixels (``tile.overlap``); the blending ramps span it.
        scheduler: address of a dask.distributed scheduler (``tcp://host:port``); None runs here.
        predictor: a ready :class:`Predictor` (tests, notebooks); default from ``settings.method``.
        opener: opens a pair folder as a context manager (must be picklable for ``scheduler``).

    Returns:
        What was done and how fast.

    Raises:
        ConfigError: CUDA requested without CUDA, a bad scheduler address or overlap.
        ModelError: the checkpoint is missing or does not fit the pair's bands.
        CRSMismatchError: the tile index and the pair disagree on the CRS.
        InputError: the tile index does not fit the pair's grid.
    """
    start = time.perf_counter()
    pair_dir, out_path = Path(pair_dir), Path(out_path)
    tiles, tiles_crs = read_tile_index(tiles_path)
    tiles = sorted(tiles, key=lambda t: (t.row_off, t.col_off))
    if predictor is None:
        predictor = make_predictor(settings)
    if scheduler is None:
        device = predictor.setup()
        if not device.startswith("cuda"):
            torch.set_num_threads(os.cpu_count() or 1)  # this process is the only worker: every core
    else:
        device = "dask"
        if settings.device == "cuda":
            log.info("detect.device 'cuda' is resolved on the dask workers")

    with opener(pair_dir) as pair:
        crs, transform, width, height = CRS.from_user_input(pair.crs), pair.transform, pair.width, pair.height
        month = str(pair.month)
        if tiles_crs != crs:
            raise CRSMismatchError(
                f"{tiles_path}: tile index CRS differs from the pair in {pair_dir}; rerun 'scarwatch tile'"
            )
        for t in tiles:
            if t.row_off < 0 or t.col_off < 0 or t.row_off + t.height > height or t.col_off + t.width > width:
                raise InputError(
                    f"{tiles_path}: tile {t.tile_id} lies outside the {width}x{height} grid; rerun 'scarwatch tile'"
                )
        predictor.fit(pair, tiles)

    size = max((max(t.height, t.width) for t in tiles), default=STRIDE)
    if 2 * overlap > size:
        raise ConfigError(f"tile.overlap {overlap!r} exceeds half the tile size {size!r}; lower it in params.yaml")
    pad_size = padded_size(size)
    ramp = blend_ramp(size, overlap)
    batches = list(iter_batches(tiles, settings.batch_size))
    log.info(
        "detecting %d tiles of %d px in %d batches (pad to %d, overlap %d)",
        len(tiles),
        size,
        len(batches),
        pad_size,
        overlap,
    )

    tags = probability_tags(month, settings.method, predictor.threshold, predictor.object_threshold)
    writer = _CogWriter(out_path, width=width, height=height, crs=crs, transform=transform, tags=tags)
    blender = StripBlender(width, height, writer.write)
    devices: set[str] = set()
    try:
        if scheduler is None:
            stream = _local_results(opener, pair_dir, batches, pad_size, predictor, settings)
        else:
            stream = _dask_results(scheduler, opener, pair_dir, batches, pad_size, predictor, devices)
        with contextlib.closing(stream) as results:  # stops readers / releases futures on errors too
            for batch, batch_results in zip(batches, results, strict=True):
                for tile, (probs, valid) in zip(batch, batch_results, strict=True):
                    weight = np.outer(ramp[: tile.height], ramp[: tile.width])
                    blender.add(tile, probs, valid, weight)
        blender.close()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    if scheduler is not None:
        device = f"{','.join(sorted(devices)) or 'none'} on dask {scheduler}"

    seconds = time.perf_counter() - start
    km2 = blender.covered_pixels * abs(transform.determinant) / 1e6
    summary = DetectSummary(
        out_path=out_path,
        n_tiles=len(tiles),
        seconds=seconds,
        tiles_per_s=len(tiles) / seconds if seconds > 0 else 0.0,
        km2_per_hour=km2 / seconds * 3600 if seconds > 0 else 0.0,
        device=device,
    )
    log.info(
        "wrote %s: %d tiles on %s in %.1f s (%.2f tiles/s)", out_path, len(tiles), device, seconds, summary.tiles_per_s
    )
    return summary
