"""Predictors: what turns a batch of tile pairs into change probabilities for :mod:`pipeline.detect`.

A :class:`Predictor` takes ``(b, 2, c, h, w)`` float32 in [0, 1] as [prev, curr] and returns float32
probabilities ``(b, 2, h, w)`` as [p_new, p_removed]; it also carries the decision thresholds that detect
writes into the probability COG's tags (:mod:`pipeline.formats`).

* :class:`ModulePredictor` runs any torch module of the :mod:`pipeline.nets` contract, on the device and
  at the precision of :mod:`pipeline.nets.device`.
* :class:`CheckpointPredictor` is a :class:`ModulePredictor` over a checkpoint, loaded lazily as a
  :class:`pipeline.nets.checkpoint.ChangeModel` (``detect --method cnn``).
* :class:`CvaPredictor` is the training-free baseline (``detect --method cva``): the maths of
  :mod:`pipeline.nets.cva` with statistics fitted once per month on tiles sampled over the whole grid (the
  decision and its reason are in that module's docstring).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from pipeline.config import DetectSettings
from pipeline.errors import ModelError, first_line
from pipeline.nets.checkpoint import ChangeModel
from pipeline.nets.cva import FALLBACK_THRESHOLD, CvaStats, apply_cva, fit_cva
from pipeline.nets.device import CompileSetting, Precision, autocast, precision_label, resolve_compile, resolve_device

if TYPE_CHECKING:
    from pipeline.pair import PairReader
    from pipeline.tiling import Tile

log = logging.getLogger(__name__)

CVA_PIXELS_PER_TILE = 20_000
"""About this many valid pixels of each sampled tile feed the CVA statistics."""


class Predictor(Protocol):
    """A change model as the detector sees it: a batch (b, 2, c, h, w) in, probabilities (b, 2, h, w) out.

    ``setup`` places the model (called once per process before use), ``fit`` learns whatever needs a
    look at the data first (the CVA statistics; the band check for networks), ``prepare`` runs in a reader
    thread (pinning, starting the upload), ``__call__`` runs the model on a prepared batch.

    Attributes:
        threshold: the decision threshold on the probabilities (COG tag ``threshold``).
        object_threshold: the calibrated minimum mean probability of a flag, None when not calibrated
            (COG tag ``object_threshold``).
    """

    threshold: float
    object_threshold: float | None

    def setup(self) -> str:
        """Load and place the model; return the device name."""
        ...

    def fit(self, pair: PairReader, tiles: Sequence[Tile]) -> None:
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

    Always channels_last weights and :func:`pipeline.nets.device.autocast` (the inference precision policy:
    ``precision`` on the CPU, bf16/fp16 autocast on CUDA). On CUDA, batches are pinned and uploaded with
    non-blocking copies on a side stream from the reader thread, so the next batch uploads while the
    current one runs. With ``compile`` the module goes through ``torch.compile`` (inductor, freezing on)
    once per process, at the first batch; ``auto`` is decided in :meth:`fit` from the number of tiles
    (:func:`pipeline.nets.device.resolve_compile`), and a predictor used without ``fit`` runs ``auto``
    eager. A batch smaller than the first is padded to its size so the graph is never recompiled; if
    compiling fails, a WARNING names the error and the module runs eager.
    Pickles with its weights on the CPU and without the compiled graph, so a dask worker rebuilds it.

    Args:
        module: the network; its output is taken as logits.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (:func:`pipeline.nets.device.resolve_device`).
        in_channels: bands the network expects (checked against the pair in :meth:`fit`); None skips it.
        precision: ``auto``, ``fp32`` or ``bf16`` (CPU inference precision, ``detect.precision``).
        compile: run the module through ``torch.compile``: True, False or ``auto`` (``detect.compile``).
        compile_min_tiles: the fewest tiles for which ``auto`` compiles (``detect.compile_min_tiles``).
    """

    def __init__(
        self,
        module: torch.nn.Module | None,
        *,
        device: str = "auto",
        in_channels: int | None = None,
        precision: Precision = "fp32",
        compile: CompileSetting = False,
        compile_min_tiles: int = 1000,
    ):
        self.module = module
        self.requested = device
        self.in_channels = in_channels
        self.precision: Precision = precision
        self.compile: CompileSetting = compile
        self.compile_min_tiles = compile_min_tiles
        self._device: torch.device | None = None
        self._stream: Any = None
        self._compiled: Any = None
        self._compiled_batch = 0
        self._lock = threading.Lock()
        self.threshold = 0.5  # decision threshold on the probabilities (a checkpoint carries a calibrated one)
        self.object_threshold: float | None = None  # minimum mean p of a flag (calibrated by evaluate)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        module = state["module"]
        if module is not None and any(p.device.type != "cpu" for p in module.parameters()):
            state["module"] = copy.deepcopy(module).cpu()
        state.update(_device=None, _stream=None, _lock=None, _compiled=None, _compiled_batch=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self, device: torch.device) -> torch.nn.Module:
        if self.module is None:
            raise ModelError("ModulePredictor has no module; pass a torch.nn.Module")
        return self.module

    def setup(self) -> str:
        """Resolve the device and move the module there (idempotent)."""
        with self._lock:
            if self._device is not None:
                return str(self._device)
            device = resolve_device(self.requested)
            module = self._load(device).to(device).eval()
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if device.type == "cuda":
                self._stream = torch.cuda.Stream(device=device)
            if self.compile is True:
                # inductor compiles lazily, at the first call (_forward); freezing folds the weights into it
                self._compiled = torch.compile(module, dynamic=False, options={"freezing": True})
            self.module = module
            self._device = device
            at = precision_label(device, self.precision)
            log.info("the network runs on %s at %s%s", device, at, ", compiled" if self.compile is True else "")
            return str(device)

    def decide_compile(self, n_tiles: int) -> None:
        """Settle ``compile: auto`` for a run of ``n_tiles`` tiles (before :meth:`setup`); log the decision."""
        if self.compile != "auto" or self._device is not None:
            return
        self.compile, why = resolve_compile("auto", resolve_device(self.requested), n_tiles, self.compile_min_tiles)
        log.info("detect.compile auto: %s (%s)", "compiling" if self.compile else "eager", why)

    def fit(self, pair: PairReader, tiles: Sequence[Tile]) -> None:
        """Settle ``compile: auto``, set the network up (a checkpoint is loaded here) and check its bands."""
        self.decide_compile(len(tiles))
        self.setup()
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
        with torch.inference_mode(), autocast(self._device, self.precision):
            if isinstance(prepared, tuple):
                dev, event, _host = prepared
                current = torch.cuda.current_stream(self._device)
                current.wait_event(event)
                dev.record_stream(current)
                logits = self._forward(dev)
            else:
                logits = self._forward(prepared)
            probs = torch.sigmoid(logits.float())
        return probs.cpu().numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled module where there is one (padding short batches to its batch size), else eager."""
        assert self.module is not None  # noqa: S101 - set by setup()
        if self._compiled is None:
            return self.module(x)  # type: ignore[no-any-return]
        b = x.shape[0]
        if not self._compiled_batch:
            self._compiled_batch = b
        if b < self._compiled_batch:
            pad = x.new_zeros((self._compiled_batch - b, *x.shape[1:]))
            return self._forward(torch.cat([x, pad]))[:b]
        try:
            return self._compiled(x)  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager instead
            log.warning("torch.compile failed (%s); detect runs the network uncompiled", first_line(exc))
            self._compiled = None
            return self.module(x)  # type: ignore[no-any-return]


class CheckpointPredictor(ModulePredictor):
    """A :class:`ModulePredictor` over a checkpoint, loaded lazily as a :class:`ChangeModel`.

    Lazy loading keeps the object small to pickle: dask workers load the checkpoint themselves, on their
    own device. The loaded model's network, band count and calibrated thresholds are used as they are.

    Args:
        path: the checkpoint (``detect.model``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32`` or ``bf16`` (``detect.precision``).
        compile: ``torch.compile`` the network (``detect.compile``).

    Raises:
        ModelError: the checkpoint does not exist.
    """

    def __init__(
        self,
        path: Path,
        *,
        device: str = "auto",
        precision: Precision = "fp32",
        compile: CompileSetting = False,
        compile_min_tiles: int = 1000,
    ):
        super().__init__(None, device=device, precision=precision, compile=compile, compile_min_tiles=compile_min_tiles)
        self.path = Path(path)
        if not self.path.exists():
            raise ModelError(f"{self.path}: checkpoint not found; set detect.model or run 'scarwatch train'")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(module=None, _device=None, _stream=None, _lock=None, _compiled=None, _compiled_batch=0)
        return state

    def _load(self, device: torch.device) -> torch.nn.Module:
        model = ChangeModel.load(self.path, device=device)
        self.in_channels = model.in_channels
        # the calibrated thresholds travel into the probability COG's tags (fit loads in every mode)
        self.threshold = model.threshold
        self.object_threshold = model.object_threshold
        return model.module


class CvaPredictor:
    """Change vector analysis, the training-free baseline, with statistics fitted once for the whole pair.

    :meth:`fit` reads up to ``sample_tiles`` tiles spread evenly over the index and fits the band
    deviations and the Otsu magnitude threshold on about :data:`CVA_PIXELS_PER_TILE` valid pixels of each
    (:func:`pipeline.nets.cva.fit_cva`); every batch is then scored with those statistics
    (:func:`pipeline.nets.cva.apply_cva`), so the whole month shares one threshold.

    Args:
        sample_tiles: how many tiles :meth:`fit` reads.
        sigma: Gaussian smoothing of each band, in pixels.
        softness: width of the logistic ramp as a fraction of the threshold.
    """

    def __init__(self, *, sample_tiles: int = 64, sigma: float = 1.0, softness: float = 0.1):
        self.sample_tiles = sample_tiles
        self.sigma = sigma
        self.softness = softness
        self.stats: CvaStats | None = None
        # the decision threshold on the probabilities detect writes: p = 0.5 exactly at the Otsu magnitude
        self.threshold = 0.5
        self.object_threshold: float | None = None  # not calibrated: vectorize keeps every seeded object

    @property
    def magnitude_threshold(self) -> float | None:
        """The Otsu threshold on the change magnitude, from :meth:`fit` (None before)."""
        return None if self.stats is None else self.stats.threshold

    def setup(self) -> str:
        """CVA runs with numpy on the CPU."""
        return "cpu"

    def fit(self, pair: PairReader, tiles: Sequence[Tile]) -> None:
        """Fit band statistics and the Otsu threshold on valid pixels of sampled tiles."""
        n = min(self.sample_tiles, len(tiles))
        picks = np.unique(np.linspace(0, len(tiles) - 1, n).round().astype(int)) if n else np.zeros(0, int)
        if len(picks):
            samples = (pair.read(tiles[int(i)].window) for i in picks)
            self.stats = fit_cva(samples, sigma=self.sigma, max_pixels=CVA_PIXELS_PER_TILE)
        else:
            self.stats = CvaStats(np.ones(int(pair.count), np.float32), FALLBACK_THRESHOLD, 0)
        stats = self.stats
        if stats.n_pixels == 0:
            log.warning("CVA: no valid pixels in %d sampled tiles; threshold set to %.1f", len(picks), stats.threshold)
        else:
            log.info("CVA threshold %.4f from %d pixels of %d tiles", stats.threshold, stats.n_pixels, len(picks))

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """CVA needs no staging."""
        return batch

    def __call__(self, prepared: np.ndarray) -> np.ndarray:
        """Probabilities (b, 2, h, w) of new / removed change."""
        if self.stats is None:
            raise ModelError("CVA statistics not fitted; call fit(pair, tiles) before predicting")
        return apply_cva(prepared, self.stats, sigma=self.sigma, softness=self.softness)


def make_predictor(settings: DetectSettings) -> Predictor:
    """The predictor ``settings.method`` asks for (device resolved later, where the model runs)."""
    if settings.method == "cva":
        return CvaPredictor(sample_tiles=settings.cva_sample_tiles)
    return CheckpointPredictor(
        settings.model,
        device=settings.device,
        precision=settings.precision,
        compile=settings.compile,
        compile_min_tiles=settings.compile_min_tiles,
    )
