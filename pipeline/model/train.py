"""Train a change network: seeded, masked BCE + Dice, AdamW with warmup and cosine decay, resumable.

``train(settings, out_path, data=...)`` reads the training data (:func:`load_training_data`, or takes a
:class:`TrainingData` already in memory, e.g. from a bundle: :mod:`pipeline.model.bundle`) and draws
batches from :class:`pipeline.model.sampler.TrainingSampler` on a background thread (Santa Rosa training
clusters, WHU-CD and Joplin pairs, footprint erasing, copy-paste, no-change and demo-town pairs), trains
under bf16 autocast where ``train.amp`` allows (AMX on the CPU, CUDA), logs one JSON line per
``log_every`` steps to ``settings.log_path``, scores a quick validation every ``val_every`` steps and
writes the checkpoint and the resumable training state every ``checkpoint_every`` steps. With
``time_limit_min`` the cosine schedule runs on ``max(step / steps, elapsed / limit)``, so the learning
rate has decayed whenever the run stops; without it the schedule runs on steps alone, and a run stopped
and resumed (``--resume``) equals one long run. SIGTERM or Ctrl-C stops a run after the step it is in,
with the state saved (:class:`StopSignals`).

The command is ``scarwatch train [--set train.steps=3000 ...] [--resume]``. This module imports neither
pydantic nor rasterio (settings are read by attribute, the shared-data readers import rasterio when they
run), so :mod:`pipeline.model.gpu_train` uses its pieces on a machine with only torch, numpy, scipy and PIL.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import queue
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.errors import ModelError
from pipeline.fileio import atomic_path
from pipeline.metrics import Scores, pixel_scores, pool
from pipeline.model.data import (
    NATIVE_GSD_M,
    RealPair,
    SantaRosaTile,
    demo_pairs,
    load_footprint_images,
    load_png_pairs,
    load_santa_rosa,
    split_clusters,
    whu_split,
)
from pipeline.model.sampler import TrainingSampler
from pipeline.nets import create_model
from pipeline.nets.blocks import pad_to_multiple
from pipeline.nets.checkpoint import ChangeModel, save_checkpoint
from pipeline.nets.device import cpu_has_native_bf16, cpu_name, resolve_device

if TYPE_CHECKING:
    from pipeline.config import TrainSettings

log = logging.getLogger(__name__)

#: One quick-validation item: images uint8 (2, 3, h, w) as [a, b], label bool (h, w), valid bool (h, w) and
#: the output channel the label belongs to (0 new, 1 removed).
QuickItem = tuple[np.ndarray, np.ndarray, np.ndarray, int]


@dataclass
class TrainingData:
    """Everything a training run reads, in memory.

    Attributes:
        tiles: the Santa Rosa training tiles.
        pairs: other labelled real pairs by sampler source (``whu``, ``joplin``).
        quick_sets: the quick-validation sets by name (:class:`QuickValidation`).
        val_ids: the held-out Santa Rosa tile ids.
        synth: pre-rendered demo-town pairs ``(images uint8 (2, 3, s, s), labels uint8 (2, s, s))`` for the
            sampler's ``synth`` source; None renders them while training (needs :mod:`pipeline.synth`).
        train: the train settings (JSON-like) the data was loaded with.
        footprints: single-date footprint tiles by shared-data folder (``train.footprints``), for the
            sampler's erasing, copy-paste and no-change draws.
    """

    tiles: list[SantaRosaTile]
    pairs: dict[str, list[RealPair]]
    quick_sets: dict[str, list[QuickItem]]
    val_ids: list[str]
    synth: list[tuple[np.ndarray, np.ndarray]] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    footprints: dict[str, list[SantaRosaTile]] = field(default_factory=dict)


def settings_json(settings: Any) -> str:
    """``settings`` as JSON: a pydantic model's ``model_dump_json``, or a dataclass's fields (paths as text)."""
    if hasattr(settings, "model_dump_json"):
        return str(settings.model_dump_json())
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return json.dumps(dataclasses.asdict(settings), default=str, separators=(",", ":"))
    raise TypeError(f"cannot serialise settings of type {type(settings).__name__}; pass a pydantic model or dataclass")


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    Attributes:
        path: the checkpoint written (the last step).
        arch: the architecture name.
        steps: optimiser steps taken.
        wall_s: wall-clock seconds.
        final_loss: mean loss over the last logging window.
        best_val: the best quick-validation score seen (weighted pixel F1), or None.
        history: the logged records.
        finished: the schedule ran to its end (False: paused, to be resumed).
        signal: the signal that stopped the run (``SIGTERM``, ``SIGINT``), or None.
    """

    path: Path
    arch: str
    steps: int
    wall_s: float
    final_loss: float
    best_val: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = True
    signal: str | None = None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may use the legacy global generator
    torch.manual_seed(seed)


def masked_bce_dice(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    dice_weight: float = 1.0,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice, both over the pixels where ``weight`` is True.

    Args:
        logits: ``(b, k, h, w)``.
        labels: ``(b, k, h, w)`` in {0, 1}.
        weight: ``(b, h, w)`` bool; False pixels (invalid, ignored rings) do not count.
        dice_weight: weight of the Dice term.
        pixel_weight: optional ``(b, k, h, w)`` float factors on each pixel's BCE (:func:`separation_weights`);
            the mean is still over the counted pixels, so the factors add emphasis, not scale.

    Returns:
        The scalar loss.
    """
    w = weight.unsqueeze(1).expand_as(logits).float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    if pixel_weight is not None:
        bce = bce * pixel_weight
    bce = (bce * w).sum() / w.sum().clamp_min(1.0)
    if dice_weight <= 0:
        return bce
    p = torch.sigmoid(logits.float()) * w
    t = labels * w
    inter = (p * t).sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3)) + 1)
    return bce + dice_weight * dice.mean()


def separation_weights(labels: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """U-Net border weights (Ronneberger et al., 2015) for every label map of a batch.

    Each background pixel gets ``1 + w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))``, with ``d1``, ``d2`` its
    Euclidean distances in pixels to the nearest and the second-nearest structure (an 8-connected
    component of the label map); structures and pixels far from any two structures get 1. Narrow gaps
    between neighbouring structures weigh most, which is where a blobby change map merges houses into one
    object. Written here because no library of this field ships the weight map; the distances come from
    ``scipy.ndimage.distance_transform_edt``, one per structure on its bounding box grown by ``3 sigma``
    (beyond that its term is below ``exp(-4.5)`` of ``w0`` even next to a second structure).

    Args:
        labels: ``(b, k, h, w)`` label maps in {0, 1}.
        w0: weight of the border term (0: all ones).
        sigma: its width in pixels.

    Returns:
        ``(b, k, h, w)`` float32 weights >= 1.
    """
    from scipy import ndimage

    out = np.ones(labels.shape, dtype=np.float32)
    if w0 <= 0:
        return out
    reach = int(math.ceil(3 * sigma))
    structure = np.ones((3, 3), dtype=bool)
    for index in np.ndindex(labels.shape[:-2]):
        mask = labels[index] > 0.5
        lab, n = ndimage.label(mask, structure=structure)
        if n < 2:
            continue
        h, w = mask.shape
        d1 = np.full(mask.shape, np.inf, dtype=np.float32)
        d2 = np.full(mask.shape, np.inf, dtype=np.float32)
        for k, box in enumerate(ndimage.find_objects(lab), start=1):
            ys = slice(max(box[0].start - reach, 0), min(box[0].stop + reach, h))
            xs = slice(max(box[1].start - reach, 0), min(box[1].stop + reach, w))
            dist = ndimage.distance_transform_edt(lab[ys, xs] != k).astype(np.float32)
            a, b = d1[ys, xs], d2[ys, xs]
            d2[ys, xs] = np.minimum(b, np.maximum(a, dist))
            d1[ys, xs] = np.minimum(a, dist)
        border = np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
        out[index] = np.where(mask, 1.0, 1.0 + w0 * border).astype(np.float32)
    return out


def lr_factor(progress: float, warmup: float, floor: float = 0.02, schedule: str = "cosine") -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` (a progress fraction), then cosine to ``floor``.

    ``schedule="constant"`` holds 1.0 after the warmup.
    """
    if progress < warmup:
        return max(progress / warmup, 0.01)
    if schedule == "constant":
        return 1.0
    t = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def quick_validation_sets(
    data: Path, val_ids: list[str], seed: int, size: int = 256, n_santa: int = 24
) -> dict[str, list[QuickItem]]:
    """The quick-validation sets read from the shared data folder.

    Santa Rosa held-out crops (256², forward: removed), the ``levir-dev`` pairs (new), the WHU-CD
    validation tiling (new) and demo-town pairs.
    """
    rng = np.random.default_rng(seed)
    sets: dict[str, list[QuickItem]] = {}
    santa: list[QuickItem] = []
    tiles = load_santa_rosa(data / "xbd-santa-rosa", val_ids)
    changed = [t for t in tiles if t.change.any()]
    size = min(size, *(min(t.valid.shape) for t in tiles))
    for i in range(n_santa):
        tile = changed[i % len(changed)] if i % 3 else tiles[int(rng.integers(len(tiles)))]
        h, w = tile.valid.shape
        if tile.change.any() and i % 3:
            ys, xs = np.nonzero(tile.change)
            k = int(rng.integers(len(ys)))
            y = int(np.clip(ys[k] - size // 2, 0, h - size))
            x = int(np.clip(xs[k] - size // 2, 0, w - size))
        else:
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        sl = (slice(y, y + size), slice(x, x + size))
        imgs = np.stack([tile.pre[:, sl[0], sl[1]], tile.post[:, sl[0], sl[1]]])
        santa.append((imgs, tile.change[sl], tile.valid[sl], 1))
    sets["santa-rosa"] = santa
    sets["levir-dev"] = [(p.images, p.change, p.valid, 0) for p in load_png_pairs(data / "levir-dev", "new")]
    whu_root = data / "whu-cd"
    if whu_root.is_dir():
        _, whu_val = whu_split(whu_root)
        sets["whu-cd"] = [(p.images, p.change, p.valid, 0) for p in load_png_pairs(whu_root, "new", names=whu_val)]
    demo: list[QuickItem] = []
    for im, lab in demo_pairs(8, seed + 1, size):
        for k in (0, 1):
            if lab[k].any():
                demo.append((im, lab[k] > 0, np.ones(lab.shape[1:], bool), k))
    sets["demo-town"] = demo
    return sets


class QuickValidation:
    """A small fixed validation set scored during training (pixel F1 at p >= 0.5).

    ``sets`` are :func:`quick_validation_sets` (or the same read from a bundle). The score is the
    :data:`QUICK_WEIGHTS` mean over the sets present.
    """

    def __init__(self, sets: dict[str, list[QuickItem]]) -> None:
        self.sets = sets

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Score ``module``: pixel F1 per set and the weighted ``score``."""
        was_training = module.training
        module.eval()
        out: dict[str, float] = {}
        for name, items in self.sets.items():
            scores: list[Scores] = []
            for imgs, lab, valid, k in items:
                h, w = imgs.shape[-2:]
                x = torch.from_numpy(pad_to_multiple(imgs)[None].astype(np.float32) / 255.0).to(device)
                p = torch.sigmoid(module(x))[0, k, :h, :w].cpu().numpy()
                scores.append(pixel_scores(p >= 0.5, lab, valid))
            out[name] = round(pool(scores).f1, 4)
        present = {k: v for k, v in QUICK_WEIGHTS.items() if k in out}
        out["score"] = round(sum(out[k] * v for k, v in present.items()) / sum(present.values()), 4)
        module.train(was_training)
        return out


#: Weights of the quick-validation score (the real new-construction sets weigh most).
QUICK_WEIGHTS = {"levir-dev": 0.3, "whu-cd": 0.3, "demo-town": 0.2, "santa-rosa": 0.2}


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype training runs under for ``train.amp`` on ``device`` (None: full precision).

    Training has its own policy beside inference's (:func:`pipeline.nets.device.inference_dtype`): bf16
    pays twice on the CPU while training (AMX) and the calibration that follows is measured at the
    inference precision, so what ships is scored as detect runs it.

    ``auto`` is bf16 on CUDA and on a CPU with bf16 instructions (AMX: about 2× the fp32 step,
    ``benchmarks/bench_train_precision.py``), else full precision: a CPU without them (AVX2 only) emulates
    bf16, and a 256² × 4 step of the shipped network took 8× the fp32 one there. ``bf16`` asks for it
    whatever the CPU; ``fp16`` needs CUDA and a gradient scaler.
    """
    if amp == "off":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ModelError("train.amp is 'fp16' but training runs on the CPU; use bf16, auto or off")
        return torch.float16
    if amp == "auto" and device.type == "cpu" and not cpu_has_native_bf16():
        return None
    return torch.bfloat16


class Prefetcher:
    """Draws training batches on a background thread, in order, while the network trains.

    Each item is ``(batch, sampler state after drawing it)``; saving the state that came with the last
    batch consumed lets a resumed run draw exactly the next batch an uninterrupted run would have drawn.
    """

    def __init__(
        self,
        sampler: TrainingSampler,
        batch_size: int,
        crop: int,
        depth: int = 2,
        separation: tuple[float, float] = (0.0, 5.0),
    ) -> None:
        self._queue: queue.Queue[tuple[Any, dict[str, Any]] | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._separation = separation
        self._thread = threading.Thread(
            target=self._run, args=(sampler, batch_size, crop), name="train-sampler", daemon=True
        )
        self._thread.start()

    def _run(self, sampler: TrainingSampler, batch_size: int, crop: int) -> None:
        w0, sigma = self._separation
        try:
            while not self._stop.is_set():
                batch: tuple[np.ndarray, ...] = sampler.batch(batch_size, crop)
                if w0 > 0:  # a function of the labels alone: draws nothing, so resumption stays exact
                    batch = (*batch, separation_weights(batch[1], w0, sigma))
                item = (batch, copy.deepcopy(sampler.state()))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the training loop, which re-raises it
            self._queue.put(exc)

    def next(self) -> tuple[Any, dict[str, Any]]:
        """The next batch and the sampler state after it."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (batches already drawn are dropped)."""
        self._stop.set()
        self._thread.join(timeout=10)


class StopSignals:
    """While in use, SIGTERM and SIGINT ask the training loop to stop at the end of the step it is in.

    The loop then saves the checkpoint and the resumable state as at a planned pause, so stopping a run
    (``kill``, Ctrl-C, a scheduler's SIGTERM) loses no steps and ``--resume`` continues exactly. A second
    signal acts as it would without this (Ctrl-C twice stops at once). Outside the main thread, where
    Python cannot take signals, it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        for sig, handler in self._previous.items():  # the next one is not ours to soften
            signal.signal(sig, handler)
        log.warning("%s: stopping after this step, with the state saved (again to stop at once)", self.received)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def resume_path(out_path: Path) -> Path:
    """Where a run writing ``out_path`` keeps its resumable training state."""
    return out_path.with_name(out_path.stem + ".resume.pt")


#: Settings a resumed run may change (they do not alter the batches or the update rule).
RESUMABLE_CHANGES = {
    "time_limit_min",
    "max_steps_this_run",
    "threads",
    "log_every",
    "val_every",
    "checkpoint_every",
    "keep_every",
}


# fields added after training states were saved: a state without one ran at the field's default
LATER_FIELDS = ("separation_weight", "separation_sigma_px")


def _load_resume(path: Path, settings: TrainSettings) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"{path}: no training state to resume; start the run without --resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    defaults = {k: type(settings).model_fields[k].default for k in LATER_FIELDS}
    before = {**defaults, **json.loads(state["settings"])}
    now = json.loads(settings_json(settings))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ModelError(
            f"{path}: train settings {changed!r} differ from the run being resumed; restore them in params.yaml "
            "or start a new run (train.init_from the checkpoint)"
        )
    return state


def load_initial(module: torch.nn.Module, init: torch.nn.Module, path: Path) -> None:
    """Start ``module`` from ``init``'s weights: the same shape, or grown from a narrower network.

    Raises:
        ModelError: the shapes differ and ``module`` cannot grow from ``init``.
    """
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if shapes == {k: tuple(v.shape) for k, v in init.state_dict().items()}:
        module.load_state_dict(init.state_dict())
        return
    grow = getattr(module, "grow_from", None)
    if grow is None or type(init) is not type(module):
        raise ModelError(
            f"{path}: its weights do not fit the network train.arch and train.arch_kwargs build; "
            "set train.arch_kwargs to the checkpoint's or start from another checkpoint"
        )
    try:
        grow(init)
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}; set train.arch_kwargs.widths to at least the checkpoint's") from exc
    log.info(
        "grew %s from widths %s to %s", path, list(getattr(init, "widths", ())), list(getattr(module, "widths", ()))
    )


def load_training_data(settings: TrainSettings, data: Path) -> TrainingData:
    """Read what :func:`train` trains on from the shared data folder (``paths.shared``).

    The Santa Rosa clusters are split by ``val_fraction`` and ``split_seed``; WHU-CD and Joplin pairs are
    read when ``mix`` draws from them; the quick-validation sets are :func:`quick_validation_sets`.

    Raises:
        MissingInputError: the shared data is not at ``data``.
    """
    santa_root = data / "xbd-santa-rosa"
    train_ids, val_ids = split_clusters(santa_root, settings.val_fraction, settings.split_seed)
    log.info("Santa Rosa split (seed %d): %d train tiles, held out %r", settings.split_seed, len(train_ids), val_ids)
    pairs: dict[str, list[RealPair]] = {}
    if settings.mix.get("whu", 0) > 0:
        whu_train, _ = whu_split(data / "whu-cd")
        pairs["whu"] = load_png_pairs(data / "whu-cd", "new", names=whu_train)
    if settings.mix.get("joplin", 0) > 0:
        pairs["joplin"] = load_png_pairs(data / "xbd-joplin", "removed", label_dir="label_destroyed_or_major")
    footprints = {name: load_footprint_images(data / name) for name, share in settings.footprints.items() if share > 0}
    tiles = load_santa_rosa(santa_root, train_ids)
    quick = quick_validation_sets(data, val_ids, seed=settings.split_seed + 1)
    return TrainingData(tiles, pairs, quick, val_ids, train=json.loads(settings_json(settings)), footprints=footprints)


def training_sampler(data: TrainingData, settings: Any, rng: np.random.Generator) -> TrainingSampler:
    """The sampler over ``data`` with ``settings``' mix and coarsening, drawing from ``rng``.

    ``settings`` is the train section or the GPU trainer's plain settings (both have ``mix`` and
    ``coarsen_p``); training, the GPU trainer and weight averaging draw through this one constructor.
    """
    shares = dict(settings.footprints)
    return TrainingSampler(
        data.tiles,
        dict(settings.mix),
        rng,
        pairs=data.pairs,
        coarsen_p=settings.coarsen_p,
        synth_pairs=data.synth,
        footprints={name: (share, data.footprints.get(name, [])) for name, share in shares.items() if share > 0},
    )


def train_step(
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: tuple[torch.Tensor, ...],
    amp_dtype: torch.dtype | None,
    dice_weight: float,
) -> torch.Tensor:
    """One optimiser step on ``batch`` = ``(images, labels, weight[, pixel weight])`` (on the module's device).

    The optional fourth tensor is :func:`separation_weights`' ``(b, k, h, w)`` BCE factors. Returns the
    loss, detached.
    """
    x, y, w = batch[:3]
    pw = batch[3] if len(batch) > 3 else None
    ctx = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ctx:
        logits = module(x)
    loss = masked_bce_dice(logits, y, w, dice_weight, pw)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def kept_path(out_path: Path, step: int) -> Path:
    """Where ``train.keep_every`` keeps the checkpoint of ``step``: ``scarnet.pt`` -> ``scarnet.step04000.pt``."""
    return out_path.with_name(f"{out_path.stem}.step{step:05d}{out_path.suffix}")


def train(
    settings: TrainSettings, out_path: str | Path, *, data: Path | TrainingData, resume: bool = False
) -> TrainResult:
    """Train ``settings.arch`` and write its checkpoint to ``out_path``.

    Every ``checkpoint_every`` steps (and when the run stops) the checkpoint and the resumable state
    (:func:`resume_path`: weights, optimiser, step, sampler and torch generator states, loss window, wall
    time so far) are written. ``resume=True`` continues from that state; with the step schedule
    (``time_limit_min`` None) a run stopped and resumed any number of times ends with the same weights
    as one uninterrupted run.

    Args:
        settings: the ``train`` section of params.yaml.
        out_path: the checkpoint to write (also written every ``checkpoint_every`` steps).
        data: the shared data folder (``paths.shared``), or the data already read (:func:`load_training_data`,
            :func:`pipeline.model.bundle.read_bundle`).
        resume: continue the run whose state is beside ``out_path``.

    Returns:
        The run's summary (``steps`` counts every step of the run, across resumes; ``wall_s`` this run's).

    Raises:
        ModelError: unknown architecture, a bad ``init_from`` checkpoint, CUDA asked for but absent, or a
            resume whose settings differ from the stopped run's.
        MissingInputError: the shared data is not at ``data``.
    """
    out_path = Path(out_path)
    state_path = resume_path(out_path)
    saved = _load_resume(state_path, settings) if resume else None
    seed_everything(settings.seed)
    device = resolve_device(settings.device)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads)
    module = create_model(settings.arch, in_channels=settings.in_channels, **settings.arch_kwargs)
    if settings.init_from is not None and saved is None:
        init = ChangeModel.load(settings.init_from)
        if init.arch != settings.arch:
            raise ModelError(
                f"{settings.init_from}: holds {init.arch!r}, not {settings.arch!r}; set train.init_from to a "
                f"{settings.arch!r} checkpoint"
            )
        load_initial(module, init.module, settings.init_from)
    if saved is not None:
        module.load_state_dict(saved["model"])
    module = module.to(device).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in module.parameters())
    amp_dtype = autocast_dtype(settings.amp, device)
    log.info("training %s (%d parameters) on %s, autocast %s", settings.arch, n_params, device, amp_dtype)

    training = data if isinstance(data, TrainingData) else load_training_data(settings, Path(data))
    val_ids = training.val_ids
    rng = np.random.default_rng(settings.seed)
    sampler = training_sampler(training, settings, rng)
    quick = QuickValidation(training.quick_sets)

    opt = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    warmup = settings.warmup_steps / settings.steps
    settings.log_path.parent.mkdir(parents=True, exist_ok=True)
    meta_base: dict[str, Any] = {
        "threshold": 0.5,
        "train": json.loads(settings_json(settings)),
        "val_ids": val_ids,
        "parameters": n_params,
        "native_gsd_m": NATIVE_GSD_M,
    }
    best_path = out_path.with_name(out_path.stem + ".best.pt")
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    best: float | None = None
    step = 0
    wall_before = 0.0
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        sampler.set_state(json.loads(saved["sampler"]))
        torch.set_rng_state(saved["torch_rng"])
        step, wall_before = int(saved["step"]), float(saved["wall_s"])
        losses = list(saved["losses"])
        best = saved["best"]
        log.info("resuming %s at step %d (%.0f s trained before)", out_path, step, wall_before)
    start = time.monotonic()
    run_steps = 0
    prefetch = Prefetcher(
        sampler,
        settings.batch_size,
        settings.crop,
        separation=(settings.separation_weight, settings.separation_sigma_px),
    )
    sampler_state = sampler.state()
    module.train()
    with settings.log_path.open("a", encoding="utf-8") as log_file, StopSignals() as stop:

        def record(rec: dict[str, Any]) -> None:
            history.append(rec)
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

        def save(path: Path, **meta: Any) -> None:
            save_checkpoint(
                path, module, settings.arch, settings.in_channels, settings.arch_kwargs, {**meta_base, **meta}
            )

        def save_state() -> None:
            payload = {
                "settings": settings_json(settings),
                "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "sampler": json.dumps(sampler_state),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "wall_s": wall_before + time.monotonic() - start,
                "losses": losses[-settings.log_every :],
                "best": best,
            }
            with atomic_path(state_path) as tmp:
                torch.save(payload, tmp)

        record(
            {
                "event": "resume" if saved is not None else "start",
                "step": step,
                "arch": settings.arch,
                "parameters": n_params,
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                "threads": torch.get_num_threads(),
                "amp": str(amp_dtype),
                "out": str(out_path),
                "val_ids": val_ids,
                "settings": meta_base["train"],
            }
        )
        try:
            while True:
                elapsed = wall_before + time.monotonic() - start
                progress = step / settings.steps
                if settings.time_limit_min is not None:
                    progress = max(progress, elapsed / (settings.time_limit_min * 60))
                if progress >= 1.0:
                    break
                if settings.max_steps_this_run is not None and run_steps >= settings.max_steps_this_run:
                    break
                if stop.received is not None:
                    break
                lr = settings.lr * lr_factor(progress, warmup, schedule=settings.schedule)
                for group in opt.param_groups:
                    group["lr"] = lr
                batch, sampler_state = prefetch.next()
                tensors = tuple(torch.from_numpy(a).to(device, non_blocking=True) for a in batch)
                loss = train_step(module, opt, scaler, tensors, amp_dtype, settings.dice_weight)
                losses.append(float(loss))
                losses = losses[-settings.log_every :]
                step += 1
                run_steps += 1
                if step % settings.log_every == 0:
                    rec = {
                        "event": "train",
                        "step": step,
                        "loss": round(float(np.mean(losses)), 5),
                        "lr": lr,
                        "elapsed_s": round(wall_before + time.monotonic() - start, 1),
                        "progress": round(progress, 4),
                        "mix": dict(sampler_state["counts"]),
                    }
                    record(rec)
                    log.info("step %d loss %.4f lr %.2e %.0fs", step, rec["loss"], lr, rec["elapsed_s"])
                if step % settings.val_every == 0:
                    val = quick(module, device)
                    record({"event": "val", "step": step, "elapsed_s": round(time.monotonic() - start, 1), **val})
                    log.info("step %d quick validation %r", step, val)
                    if best is None or val["score"] > best:
                        best = val["score"]
                        save(best_path, steps=step, quick_val=val)
                if settings.keep_every is not None and step % settings.keep_every == 0:
                    save(kept_path(out_path, step), steps=step)
                if step % settings.checkpoint_every == 0:
                    save(out_path, steps=step)
                    save_state()
        finally:
            prefetch.close()
        wall = time.monotonic() - start
        finished = progress >= 1.0
        scored: dict[str, Any] = {}
        if stop.received is None:  # a run stopped by a signal saves at once, without the quick validation
            scored["quick_val"] = quick(module, device)
            record({"event": "val", "step": step, "elapsed_s": round(wall, 1), **scored["quick_val"]})
        save(out_path, steps=step, wall_s=round(wall_before + wall, 1), finished=finished, **scored)
        save_state()
        final = float(np.mean(losses)) if losses else float("nan")
        record(
            {
                "event": "end" if finished else "pause",
                "step": step,
                "run_steps": run_steps,
                "wall_s": round(wall, 1),
                "total_wall_s": round(wall_before + wall, 1),
                "final_loss": final,
                "mix": sampler_state["counts"],
                **({"signal": stop.received} if stop.received else {}),
            }
        )
    log.info("trained %s: %d steps (%d this run) in %.0f s -> %s", settings.arch, step, run_steps, wall, out_path)
    return TrainResult(out_path, settings.arch, step, wall, final, best, history, finished, stop.received)
