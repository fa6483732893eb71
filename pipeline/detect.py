"""Batched, blended, streaming change detection over the tiles of an aligned pair.

:func:`detect_pair` reads the tile index, pushes the tiles through a :class:`Predictor` in batches and
writes the probability COG of the month (bands ``p_new``, ``p_removed``; uint8 ``round(p * 254)``,
255 = nodata outside the valid area; see ``docs/architecture.md``).

How it works:

* **Prefetch.** Reader threads (``settings.workers``, each with its own handle on the pair) decode the
  next ``settings.prefetch`` batches while the model runs on the current one; on CUDA the reader also
  pins the batch and starts its upload on a side stream, so the model never waits on I/O or copies.
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
import copy
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio
import rasterio.shutil
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.windows import Window
from scipy import ndimage

from pipeline.config import DetectSettings
from pipeline.errors import ConfigError, CRSMismatchError, InputError, ModelError
from pipeline.fileio import atomic_path
from pipeline.tiling import Tile, iter_batches, read_tile_index

log = logging.getLogger(__name__)

BAND_NAMES = ("p_new", "p_removed")
NODATA = 255
SCALE = 254
PAD_MULTIPLE = 16
BLOCK = 256


class PairReader(Protocol):
    """What the detector needs of an opened aligned pair (``pipeline.pair.AlignedPair``)."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    count: int

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Return images float32 (2, count, h, w) in [0, 1] as [prev, curr] and the valid mask (h, w)."""
        ...


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


# --------------------------------------------------------------------------------------------- devices


def resolve_device(requested: str) -> torch.device:
    """Turn ``auto`` / ``cpu`` / ``cuda[:N]`` into a torch device.

    Raises:
        ConfigError: CUDA requested but not available, or an unknown device name.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"detect.device is {requested!r} but torch sees no CUDA device; "
                "set detect.device to 'auto' or 'cpu' in params.yaml (or pass --device cpu)"
            )
        return torch.device(requested)
    raise ConfigError(f"detect.device {requested!r} is unknown; use 'auto', 'cpu' or 'cuda'")


# ------------------------------------------------------------------------------------------ predictors


class Predictor(Protocol):
    """A change model as the detector sees it: a batch (b, 2, c, h, w) in, probabilities (b, 2, h, w) out.

    ``setup`` places the model (called once per process before use), ``fit`` learns whatever needs a
    look at the data first (the CVA threshold; a no-op for networks), ``prepare`` runs in a reader
    thread (pinning, starting the upload), ``__call__`` runs the model on a prepared batch.
    """

    def setup(self) -> str:
        """Load and place the model; return the device name."""
        ...

    def fit(self, pair: Any, tiles: Sequence[Tile]) -> None:
        """Learn data-dependent parameters from ``tiles`` of ``pair``."""
        ...

    def prepare(self, batch: np.ndarray) -> Any:
        """Stage a float32 batch (b, 2, c, h, w) for the model."""
        ...

    def __call__(self, prepared: Any) -> np.ndarray:
        """Return probabilities float32 (b, 2, h, w) as [new, removed]."""
        ...


class ModulePredictor:
    """Runs a torch module that maps (b, 2, c, h, w) to logits (b, 2, h, w) (the ``pipeline.nets`` contract).

    On CUDA: channels_last weights, autocast (bf16 where supported, else fp16), batches pinned and
    uploaded with non-blocking copies on a side stream from the reader thread, so the next batch uploads
    while the current one runs. On CPU: float32 on every core. Pickles with its weights on the CPU, so a
    dask worker can rebuild it and pick its own device.

    Args:
        module: the network; its output is taken as logits.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        in_channels: bands the network expects (checked against the pair in :meth:`fit`); None skips it.
    """

    def __init__(self, module: torch.nn.Module | None, *, device: str = "auto", in_channels: int | None = None):
        self.module = module
        self.requested = device
        self.in_channels = in_channels
        self._device: torch.device | None = None
        self._stream: Any = None
        self._amp: torch.dtype | None = None
        self._lock = threading.Lock()
        self.threshold = 0.5  # decision threshold on the probabilities (a checkpoint carries a calibrated one)
        self.object_threshold: float | None = None  # minimum mean p of a flag (calibrated by evaluate)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        module = state["module"]
        if module is not None and any(p.device.type != "cpu" for p in module.parameters()):
            state["module"] = copy.deepcopy(module).cpu()
        state.update(_device=None, _stream=None, _amp=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self, device: torch.device) -> torch.nn.Module:
        if self.module is None:
            raise ModelError("ModulePredictor has no module; pass a torch.nn.Module")
        return self.module

    def setup(self) -> str:
        """Resolve the device, move the module there and pick the autocast dtype (idempotent)."""
        with self._lock:
            if self._device is not None:
                return str(self._device)
            device = resolve_device(self.requested)
            module = self._load(device).to(device).eval()
            if device.type == "cuda":
                module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
                self._stream = torch.cuda.Stream(device=device)
                self._amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.module = module
            self._device = device
            return str(device)

    def fit(self, pair: Any, tiles: Sequence[Tile]) -> None:
        """Check the network's band count against the pair."""
        if self.in_channels is not None and int(pair.count) != self.in_channels:
            raise ModelError(
                f"the model expects {self.in_channels} bands but the pair has {pair.count}; "
                "align with matching align.bands or use a checkpoint trained on those bands"
            )

    def prepare(self, batch: np.ndarray) -> Any:
        """Wrap the batch as a tensor; on CUDA pin it and start its upload on the side stream."""
        self.setup()
        host = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self._device is None or self._device.type != "cuda":
            return host
        host = host.pin_memory()
        with torch.cuda.stream(self._stream):
            dev = host.to(self._device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return (dev, event, host)  # keep the pinned host tensor alive until the copy is done

    def __call__(self, prepared: Any) -> np.ndarray:
        """Run the module; return sigmoid probabilities as float32 numpy (b, 2, h, w)."""
        if isinstance(prepared, np.ndarray):
            prepared = self.prepare(prepared)
        assert self.module is not None and self._device is not None  # set by setup() in prepare()
        with torch.inference_mode():
            if isinstance(prepared, tuple):
                dev, event, _host = prepared
                current = torch.cuda.current_stream(self._device)
                current.wait_event(event)
                dev.record_stream(current)
                with torch.autocast("cuda", dtype=self._amp):
                    logits = self.module(dev)
            else:
                logits = self.module(prepared)
            probs = torch.sigmoid(logits.float())
        return probs.cpu().numpy()


class CheckpointPredictor(ModulePredictor):
    """A :class:`ModulePredictor` over a checkpoint loaded lazily with ``pipeline.nets.checkpoint.ChangeModel.load``.

    Lazy loading keeps the object small to pickle: dask workers load the checkpoint themselves, on their
    own device. When ``ChangeModel`` exposes its torch module (it is one, or has ``module``/``net``/
    ``model``), the CUDA path above is used; otherwise its own ``predict`` is called.

    Args:
        path: the checkpoint (``detect.model``).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
    """

    def __init__(self, path: Path, *, device: str = "auto"):
        super().__init__(None, device=device)
        self.path = Path(path)
        self._wrapper: Any = None
        if not self.path.exists():
            raise ModelError(f"{self.path}: checkpoint not found; set detect.model or run 'scarwatch train'")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(module=None, _wrapper=None, _device=None, _stream=None, _amp=None, _lock=None)
        return state

    def _load(self, device: torch.device) -> torch.nn.Module:
        from pipeline.nets.checkpoint import ChangeModel

        wrapper = ChangeModel.load(self.path, device=str(device))
        self.in_channels = int(wrapper.in_channels)
        # the calibrated thresholds travel into the probability COG's tags (fit loads in every mode)
        self.threshold = float(getattr(wrapper, "threshold", None) or 0.5)
        obj = getattr(wrapper, "object_threshold", None)
        self.object_threshold = None if obj is None else float(obj)
        if isinstance(wrapper, torch.nn.Module):
            return wrapper
        for name in ("module", "net", "model"):
            candidate = getattr(wrapper, name, None)
            if isinstance(candidate, torch.nn.Module):
                return candidate
        self._wrapper = wrapper
        return torch.nn.Identity()

    def fit(self, pair: Any, tiles: Sequence[Tile]) -> None:
        """Load the checkpoint and check its band count against the pair."""
        self.setup()
        super().fit(pair, tiles)

    def prepare(self, batch: np.ndarray) -> Any:
        """Stage the batch (plain numpy when the wrapper does its own device handling)."""
        self.setup()
        return batch if self._wrapper is not None else super().prepare(batch)

    def __call__(self, prepared: Any) -> np.ndarray:
        """Predict probabilities (b, 2, h, w)."""
        self.setup()
        if self._wrapper is not None:
            return np.asarray(self._wrapper.predict(np.asarray(prepared, dtype=np.float32)), dtype=np.float32)
        return super().__call__(prepared)


class CvaPredictor:
    """Change vector analysis: the training-free baseline, with statistics fitted once for the whole pair.

    The same recipe as :func:`pipeline.nets.cva.cva_probabilities` (bands smoothed by a Gaussian of
    ``sigma`` px and standardised over both epochs, magnitude = Euclidean distance of the standardised
    band vectors, Otsu threshold ``t``, ``p = sigmoid((m - t) / (softness t))``, a brighter current
    epoch means *new*, a darker one *removed*), except that the band means and deviations and ``t``
    come from up to ``sample_tiles`` tiles spread over the index (:meth:`fit`) instead of from each
    tile, so neighbouring tiles agree and blend without seams.

    Args:
        sample_tiles: how many tiles :meth:`fit` reads.
        sigma: Gaussian smoothing of each band, in pixels.
        softness: width of the logistic ramp as a fraction of the threshold.
    """

    def __init__(self, *, sample_tiles: int = 64, sigma: float = 1.0, softness: float = 0.1):
        self.sample_tiles = sample_tiles
        self.sigma = sigma
        self.softness = softness
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.magnitude_threshold: float | None = None  # Otsu threshold on the change magnitude, from fit()
        # the decision threshold on the probabilities detect writes: p = 0.5 exactly at the Otsu magnitude
        self.threshold = 0.5

    def setup(self) -> str:
        """CVA runs with numpy on the CPU."""
        return "cpu"

    def _smooth(self, batch: np.ndarray) -> np.ndarray:
        if self.sigma <= 0:
            return batch
        sigma = (0,) * (batch.ndim - 2) + (self.sigma, self.sigma)
        return np.asarray(ndimage.gaussian_filter(batch, sigma=sigma, mode="reflect"), dtype=np.float32)

    def _magnitude(self, smooth: np.ndarray) -> np.ndarray:
        assert self.mean is not None and self.std is not None  # set by fit()
        diff = (smooth[:, 1] - smooth[:, 0]) / self.std[None, :, None, None]
        return np.sqrt((diff * diff).sum(axis=1))

    def fit(self, pair: Any, tiles: Sequence[Tile]) -> None:
        """Fit band statistics and the Otsu threshold on valid pixels of sampled tiles."""
        from skimage.filters import threshold_otsu

        n = min(self.sample_tiles, len(tiles))
        picks = np.unique(np.linspace(0, len(tiles) - 1, n).round().astype(int)) if n else np.zeros(0, int)
        samples = []
        for i in picks:
            images, valid = pair.read(tiles[int(i)].window)
            values = self._smooth(images[None])[0][:, :, valid]  # (2, c, n)
            samples.append(values[:, :, :: max(1, values.shape[-1] // 20000)])
        count = int(pair.count)
        pooled = np.concatenate(samples, axis=-1) if samples else np.zeros((2, count, 0), np.float32)
        if pooled.shape[-1] < 2:
            self.mean, self.std, self.magnitude_threshold = np.zeros(count), np.ones(count), 1.0
            log.warning("CVA: no valid pixels in %d sampled tiles; threshold set to 1.0", len(picks))
            return
        self.mean = pooled.mean(axis=(0, 2))
        self.std = pooled.std(axis=(0, 2)) + 1e-6
        mag = self._magnitude(pooled[None, ..., None])[0, :, 0]
        self.magnitude_threshold = float(threshold_otsu(mag)) if float(mag.max()) > float(mag.min()) else 1.0
        log.info("CVA threshold %.4f from %d pixels of %d tiles", self.magnitude_threshold, mag.size, len(picks))

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """CVA needs no staging."""
        return batch

    def __call__(self, prepared: np.ndarray) -> np.ndarray:
        """Probabilities (b, 2, h, w) of new / removed change."""
        if self.magnitude_threshold is None:
            raise ModelError("CVA statistics not fitted; call fit(pair, tiles) before predicting")
        smooth = self._smooth(np.asarray(prepared, dtype=np.float32))
        t = max(self.magnitude_threshold, 1e-6)
        p = _sigmoid((self._magnitude(smooth) - t) / max(self.softness * t, 1e-6))
        brighter = smooth[:, 1].mean(axis=1) > smooth[:, 0].mean(axis=1)
        return np.stack([np.where(brighter, p, 0.0), np.where(brighter, 0.0, p)], axis=1).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(x, -30, 30))))


def make_predictor(settings: DetectSettings) -> Predictor:
    """The predictor ``settings.method`` asks for (device resolved later, where the model runs)."""
    if settings.method == "cva":
        return CvaPredictor(sample_tiles=settings.cva_sample_tiles)
    return CheckpointPredictor(settings.model, device=settings.device)


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


def load_batch(pair: Any, tiles: Sequence[Tile], pad_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Read ``tiles`` and pad each by reflection to ``pad_size`` square.

    Returns:
        The batch float32 (b, 2, c, pad_size, pad_size) and each tile's valid mask (h, w).
    """
    xs, valids = [], []
    for tile in tiles:
        images, valid = pair.read(tile.window)
        h, w = images.shape[-2:]
        if (h, w) != (tile.height, tile.width):
            raise InputError(f"tile {tile.tile_id}: read {h}x{w} pixels, index says {tile.height}x{tile.width}")
        if h < pad_size or w < pad_size:
            images = np.pad(images, ((0, 0), (0, 0), (0, pad_size - h), (0, pad_size - w)), mode="reflect")
        xs.append(images)
        valids.append(np.asarray(valid, dtype=bool))
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


def to_uint8(probs: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Probabilities (2, h, w) to the stored encoding: ``round(p * 254)``, 255 where not ``ok``."""
    out = np.rint(np.clip(probs, 0.0, 1.0) * SCALE).astype(np.uint8)
    out[:, ~ok] = NODATA
    return out


# ---------------------------------------------------------------------------------------------- output


class _CogWriter:
    """Streams blocks into a tiled GeoTIFF, then adds overviews and copies it to a COG atomically."""

    def __init__(self, out_path: Path, *, width: int, height: int, crs: CRS, transform: Affine, tags: dict[str, str]):
        self.out_path = out_path
        out_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = out_path.with_name(f".{out_path.stem}.part.tif")
        profile = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": 2,
            "dtype": "uint8",
            "crs": crs,
            "transform": transform,
            "nodata": NODATA,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        self.ds = rasterio.open(self.tmp, "w", **profile)
        for i, name in enumerate(BAND_NAMES, start=1):
            self.ds.set_band_description(i, name)
        self.ds.update_tags(**tags)

    def write(self, row_off: int, probs: np.ndarray, ok: np.ndarray) -> None:
        self.ds.write(to_uint8(probs, ok), window=Window(0, row_off, probs.shape[2], probs.shape[1]))

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
        self.tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.ds.close()
        self.tmp.unlink(missing_ok=True)


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
    """Predict batches in this process; reader threads keep ``prefetch`` batches decoded ahead."""
    pairs = _ThreadPairs(opener, pair_dir)

    def read(batch: list[Tile]) -> tuple[Any, list[np.ndarray]]:
        x, valids = load_batch(pairs.get(), batch, pad_size)
        return predictor.prepare(x), valids

    try:
        with ThreadPoolExecutor(max_workers=max(1, settings.workers), thread_name_prefix="detect-read") as pool:
            todo = iter(batches)
            pending: deque[tuple[list[Tile], Future[tuple[Any, list[np.ndarray]]]]] = deque()

            def submit() -> None:
                batch = next(todo, None)
                if batch is not None:
                    pending.append((batch, pool.submit(read, batch)))

            for _ in range(settings.prefetch + max(1, settings.workers)):
                submit()
            while pending:
                batch, future = pending.popleft()
                prepared, valids = future.result()
                submit()
                probs = predictor(prepared)
                yield [(probs[i, :, : t.height, : t.width], valids[i]) for i, t in enumerate(batch)]
    finally:
        pairs.close()


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
        month = str(getattr(pair, "month", ""))
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

    size = max((max(t.height, t.width) for t in tiles), default=PAD_MULTIPLE)
    if 2 * overlap > size:
        raise ConfigError(f"tile.overlap {overlap!r} exceeds half the tile size {size!r}; lower it in params.yaml")
    pad_size = math.ceil(size / PAD_MULTIPLE) * PAD_MULTIPLE
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

    tags = {
        "month": month,
        "encoding": "round(p*254), 255=nodata",
        "method": settings.method,
        # the model's calibrated decision threshold; vectorize seeds objects at it unless vectorize.high is set
        "threshold": f"{float(getattr(predictor, 'threshold', 0.5)):.4f}",
    }
    object_threshold = getattr(predictor, "object_threshold", None)
    if object_threshold is not None:  # vectorize drops objects whose mean p is below it (pipeline/flagcheck.py)
        tags["object_threshold"] = f"{float(object_threshold):.4f}"
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
