"""Fine-tune a change network from a training bundle within a wall-time limit, on a lent GPU.

``scripts/gpu_train.sh`` holds the device command (run from the repository root, ``.bundle`` carried)::

    PYTHONUNBUFFERED=1 python3 -m pipeline.model.gpu_train --bundle .bundle --out $OUT --minutes 8
        --init models/scarnet.pt

With ``--arch-kwargs`` beside ``--init`` the network is grown wider from the checkpoint first
(:func:`~pipeline.model.train.load_initial`), as ``train.init_from`` with wider ``train.arch_kwargs`` does.
The device machine has torch, numpy, scipy and PIL but neither rasterio nor pydantic, so nothing here
imports them: the data are a bundle (:mod:`pipeline.model.bundle`, written here by ``scarwatch bundle``),
the settings a plain :class:`PlainTrainSettings` filled from the bundle manifest (the params.yaml train
section it was built with) and the command line. Batches are drawn by a torch ``DataLoader`` of worker
processes, each running its own :class:`~pipeline.model.sampler.TrainingSampler` seeded by
``(seed, worker id)``, in chunks the main process concatenates to a batch; the step is
:func:`~pipeline.model.train.train_step` under bf16 autocast. The learning rate warms up over
``--warmup-frac`` and anneals on ``max(step / --max-steps, elapsed / --minutes)``, so it has decayed when
the time is up. The quick validation (the bundle's sets) scores the initial network, every
``--val-minutes`` (writing the checkpoint and summary each time, so a run cut short still leaves them)
and the final one. Written to ``--out``: ``scarnet.pt`` (:func:`~pipeline.nets.checkpoint.save_checkpoint`;
meta: device name, steps, samples seen, wall time, quick validation), ``scarnet.best.pt`` (the best quick
validation, when one beat the initial network), ``train_log.jsonl`` and ``summary.json``. Its threshold
is 0.5: calibrate it here afterwards (``scarwatch calibrate --model ...``).

Runs on the CPU too (``--device cpu``), which the tests do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import InputError, ModelError, ScarWatchError
from pipeline.model.bundle import read_bundle
from pipeline.model.data import NATIVE_GSD_M
from pipeline.model.sampler import TrainingSampler
from pipeline.model.train import (
    QuickValidation,
    TrainingData,
    autocast_dtype,
    load_initial,
    lr_factor,
    seed_everything,
    settings_json,
    train_step,
    training_sampler,
)
from pipeline.nets import create_model
from pipeline.nets.checkpoint import ChangeModel, save_checkpoint
from pipeline.nets.device import cpu_name, resolve_device

log = logging.getLogger(__name__)

Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, dict[str, int]]


@dataclasses.dataclass(frozen=True)
class PlainTrainSettings:
    """The fields of :class:`pipeline.config.TrainSettings` as a plain dataclass (no pydantic, no defaults).

    :meth:`from_manifest` fills it from a bundle's ``train`` section; a test keeps the fields equal to
    ``TrainSettings``'s.
    """

    arch: str
    arch_kwargs: dict[str, Any]
    in_channels: int
    seed: int
    steps: int
    time_limit_min: float | None
    batch_size: int
    crop: int
    lr: float
    weight_decay: float
    warmup_steps: int
    dice_weight: float
    mix: dict[str, float]
    coarsen_p: float
    amp: str
    val_fraction: float
    split_seed: int
    log_every: int
    val_every: int
    checkpoint_every: int
    log_path: Path
    threads: int
    device: str
    init_from: Path | None
    max_steps_this_run: int | None
    schedule: str = "cosine"  # bundles written before the field existed train on the cosine schedule
    footprints: dict[str, float] = dataclasses.field(default_factory=dict)  # older bundles: Santa Rosa only
    keep_every: int | None = None  # read for equal fields; a GPU run (minutes) keeps its best and its last
    separation_weight: float = 0.0  # refused above 0 (main): the bundle's batches carry no border weights
    separation_sigma_px: float = 5.0

    @classmethod
    def from_manifest(cls, train: dict[str, Any], **overrides: Any) -> PlainTrainSettings:
        """Settings from a manifest's ``train`` section, with ``overrides`` (None values are overrides too).

        Raises:
            InputError: the section lacks a field.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        values = {**{k: train[k] for k in names if k in train}, **overrides}
        optional = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        missing = [n for n in names if n not in values and n not in optional]
        if missing:
            raise InputError(f"the bundle's train settings lack {missing!r}; write the bundle again (scarwatch bundle)")
        values["log_path"] = Path(values["log_path"])
        if values["init_from"] is not None:
            values["init_from"] = Path(values["init_from"])
        return cls(**values)


class SampleStream(IterableDataset[Chunk]):
    """An endless stream of training chunks; each worker process draws from its own seeded sampler.

    Items are ``(images float16 (n, 2, 3, s, s), labels uint8 (n, 2, s, s), weight bool (n, s, s), worker id,
    the worker's source counts so far)``; float16 halves what crosses the workers' shared memory and is
    finer than the bf16 the network computes in.
    """

    def __init__(self, data: TrainingData, settings: PlainTrainSettings, chunk: int) -> None:
        self.data, self.settings, self.chunk = data, settings, chunk

    def sampler(self, worker: int) -> TrainingSampler:
        """The sampler of ``worker``, seeded by ``(seed, worker)``."""
        s, d = self.settings, self.data
        rng = np.random.default_rng([s.seed, worker])
        return training_sampler(d, s, rng)

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        sampler = self.sampler(worker)
        while True:
            images, labels, weight = sampler.batch(self.chunk, self.settings.crop)
            yield (
                torch.from_numpy(images.astype(np.float16)),
                torch.from_numpy(labels.astype(np.uint8)),
                torch.from_numpy(weight),
                worker,
                dict(sampler.counts),
            )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def chunk_bytes(chunk: int, crop: int) -> int:
    """Bytes of one :class:`SampleStream` item."""
    return chunk * crop * crop * (2 * 3 * 2 + 2 + 1)


def fit_workers(workers: int, nbytes: int, prefetch: int, shm: str = "/dev/shm") -> int:
    """``workers``, or fewer when the chunks in flight would not fit twice into ``shm`` (0: in-process)."""
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return workers
    fit = int(free // (2 * nbytes * prefetch))
    if fit < workers:
        print(
            f"warning: {shm} has {free / 2**20:.0f} MiB free, room for {fit} of {workers} workers "
            f"({nbytes * prefetch / 2**20:.0f} MiB in flight each)",
            flush=True,
        )
        return max(0, fit)
    return workers


def make_loader(data: TrainingData, settings: PlainTrainSettings, chunk: int, workers: int, pin: bool) -> DataLoader:
    """The ``DataLoader`` of :class:`SampleStream` chunks (``workers`` 0: drawn in this process)."""
    stream = SampleStream(data, settings, chunk)
    stream.sampler(0)  # fail here, not in a worker, on a mix the data cannot serve
    extra: dict[str, Any] = {}
    if workers > 0:
        fork = "fork" in multiprocessing.get_all_start_methods()
        extra = {
            "prefetch_factor": 2,
            "worker_init_fn": _worker_init,
            "multiprocessing_context": "fork" if fork else None,  # fork shares the bundle's arrays, unpickled
        }
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin, **extra)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def gpu_train(
    bundle: Path,
    out: Path,
    *,
    minutes: float | None,
    max_steps: int | None = None,
    init: Path | None = None,
    device: str = "auto",
    batch: int = 64,
    crop: int = 384,
    workers: int | None = None,
    chunk: int = 8,
    lr: float | None = None,
    val_minutes: float = 3.0,
    warmup_frac: float = 0.03,
    log_every: int = 20,
    arch_kwargs: dict[str, Any] | None = None,
    seed: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train from ``bundle`` into ``out`` (see the module docstring) and return the summary.

    Raises:
        InputError: neither ``minutes`` nor ``max_steps``, a crop that is not a multiple of 16, or a bundle
            that cannot serve the mix.
        ModelError: ``init`` is not a checkpoint of the bundle's architecture; CUDA asked for but absent.
    """
    wall_start = time.monotonic()
    if minutes is None and max_steps is None:
        raise InputError("give --minutes or --max-steps (or both); the run would never end")
    if crop % 16:
        raise InputError(f"--crop {crop} must be a multiple of 16 (the networks' stride)")
    chunk = math.gcd(batch, max(1, min(chunk, batch)))
    out.mkdir(parents=True, exist_ok=True)
    print(f"reading bundle {bundle}", flush=True)
    data = read_bundle(bundle)
    overrides: dict[str, Any] = {
        "batch_size": batch,
        "crop": crop,
        "time_limit_min": minutes,
        "max_steps_this_run": max_steps,
        "device": device,
        "init_from": init,
        "log_every": log_every,
        "log_path": out / "train_log.jsonl",
    }
    for key, value in {"lr": lr, "seed": seed, "threads": threads, "arch_kwargs": arch_kwargs}.items():
        if value is not None:
            overrides[key] = value
    settings = PlainTrainSettings.from_manifest(data.train, **overrides)
    if settings.separation_weight > 0:
        raise InputError(
            f"the bundle's train.separation_weight is {settings.separation_weight}: the GPU trainer has no border"
            " weights; write the bundle with --set train.separation_weight=0"
        )
    dev = resolve_device(settings.device)
    if workers is None:
        workers = max(1, (os.cpu_count() or 2) - 1)
    workers = fit_workers(workers, chunk_bytes(chunk, crop), 2)
    # the workers fork before the network reaches the GPU
    batches = iter(make_loader(data, settings, chunk, workers, pin=dev.type == "cuda"))

    seed_everything(settings.seed)
    if dev.type == "cpu":
        torch.set_num_threads(settings.threads)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if init is not None:
        loaded = ChangeModel.load(init)
        if loaded.arch != settings.arch or loaded.in_channels != settings.in_channels:
            raise ModelError(
                f"{init}: holds {loaded.arch!r} with {loaded.in_channels} bands, the bundle trains "
                f"{settings.arch!r} with {settings.in_channels}; pass a matching --init"
            )
        if arch_kwargs is None:  # the checkpoint's own network
            module = loaded.module
            settings = dataclasses.replace(settings, arch_kwargs=loaded.kwargs)
        else:  # a wider network grown from it (ScarNet.grow_from), as train.init_from does
            module = create_model(settings.arch, in_channels=settings.in_channels, **settings.arch_kwargs)
            load_initial(module, loaded.module, init)
    else:
        module = create_model(settings.arch, in_channels=settings.in_channels, **settings.arch_kwargs)
    module = module.to(dev).to(memory_format=torch.channels_last)
    module.train()
    n_params = sum(p.numel() for p in module.parameters())
    amp_dtype = autocast_dtype(settings.amp, dev)
    opt = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    quick = QuickValidation(data.quick_sets)
    name = _device_name(dev)
    meta_base: dict[str, Any] = {
        "threshold": 0.5,
        "train": json.loads(settings_json(settings)),
        "val_ids": data.val_ids,
        "parameters": n_params,
        "native_gsd_m": NATIVE_GSD_M,
        "device_name": name,
        "init_from": None if init is None else str(init),
        "gpu_train": {"workers": workers, "chunk": chunk, "warmup_frac": warmup_frac, "bundle": str(bundle)},
    }

    with settings.log_path.open("w", encoding="utf-8") as log_file:
        run = _Run(module, dev, settings, out, log_file, meta_base, wall_start)
        run.record(
            {
                "event": "start",
                "step": 0,
                "arch": settings.arch,
                "parameters": n_params,
                "device": str(dev),
                "device_name": name,
                "amp": str(amp_dtype),
                "workers": workers,
                "chunk": chunk,
                "tiles": len(data.tiles),
                "pairs": {k: len(v) for k, v in data.pairs.items()},
                "demo_pairs": len(data.synth or []),
                "settings": meta_base["train"],
            }
        )
        initial = run.validate(quick, step=0)
        best = initial["score"]
        start = time.monotonic()
        last_val = start
        step = samples = 0
        data_wait = 0.0
        progress = 0.0
        window: list[torch.Tensor] = []
        counts: dict[int, dict[str, int]] = {}
        loss_mean = float("nan")
        try:
            while True:
                elapsed = time.monotonic() - start
                progress = max(step / max_steps if max_steps else 0.0, elapsed / (minutes * 60) if minutes else 0.0)
                if progress >= 1.0:
                    break
                rate = settings.lr * lr_factor(progress, warmup_frac, schedule=settings.schedule)
                for group in opt.param_groups:
                    group["lr"] = rate
                t = time.monotonic()
                x, y, w = _next_batch(batches, batch // chunk, dev, counts)
                data_wait += time.monotonic() - t
                window.append(train_step(module, opt, scaler, (x, y, w), amp_dtype, settings.dice_weight))
                step += 1
                samples += x.shape[0]
                if step % settings.log_every == 0:
                    loss_mean = float(torch.stack(window).float().mean())
                    window.clear()
                    now = time.monotonic() - start
                    run.record(
                        {
                            "event": "train",
                            "step": step,
                            "loss": round(loss_mean, 5),
                            "lr": rate,
                            "elapsed_s": round(now, 1),
                            "progress": round(progress, 4),
                            "samples_per_s": round(samples / max(now, 1e-9), 1),
                            "data_wait_s": round(data_wait, 1),
                            "mix": _total(counts),
                        }
                    )
                if val_minutes > 0 and time.monotonic() - last_val >= val_minutes * 60:
                    val = run.validate(quick, step)
                    so_far = time.monotonic() - start
                    run.save("scarnet.pt", step=step, samples=samples, train_s=so_far, val=val)
                    if val["score"] > best:
                        best = val["score"]
                        run.save("scarnet.best.pt", step=step, samples=samples, train_s=so_far, val=val)
                    last_val = time.monotonic()
        finally:
            del batches  # stops the workers
        if window:
            loss_mean = float(torch.stack(window).float().mean())
        train_s = time.monotonic() - start
        val = run.validate(quick, step)
        finished = progress >= 1.0
        run.save("scarnet.pt", step=step, samples=samples, train_s=train_s, val=val, finished=finished)
        if val["score"] > best:
            run.save("scarnet.best.pt", step=step, samples=samples, train_s=train_s, val=val, finished=finished)
        summary = {
            "steps": step,
            "samples_seen": samples,
            "batch": batch,
            "crop": crop,
            "lr": settings.lr,
            "train_s": round(train_s, 1),
            "wall_s": round(time.monotonic() - wall_start, 1),
            "samples_per_s": round(samples / max(train_s, 1e-9), 1),
            "data_wait_s": round(data_wait, 1),
            "final_loss": loss_mean,
            "initial_quick_val": initial,
            "quick_val": val,
            "best_quick_val": max(best, val["score"]),
            "device": str(dev),
            "device_name": name,
            "workers": workers,
            "chunk": chunk,
            "mix": _total(counts),
            "finished": finished,
            "init_from": None if init is None else str(init),
            "checkpoint": str(out / "scarnet.pt"),
        }
        run.record({"event": "end", **summary})
    _write_json(out / "summary.json", summary)
    print(
        f"done: {step} steps, {samples} samples in {train_s:.0f} s on {name}; quick validation "
        f"{initial['score']:.4f} -> {val['score']:.4f} -> {out / 'scarnet.pt'}",
        flush=True,
    )
    return summary


class _Run:
    """The log, the quick validation and the checkpoints of one run."""

    def __init__(
        self,
        module: torch.nn.Module,
        device: torch.device,
        settings: PlainTrainSettings,
        out: Path,
        log_file: TextIO,
        meta_base: dict[str, Any],
        wall_start: float,
    ) -> None:
        self.module, self.device, self.settings, self.out = module, device, settings, out
        self.log_file, self.meta_base, self.wall_start = log_file, meta_base, wall_start

    def record(self, rec: dict[str, Any]) -> None:
        self.log_file.write(json.dumps(rec) + "\n")
        self.log_file.flush()
        print(json.dumps(rec), flush=True)

    def validate(self, quick: QuickValidation, step: int) -> dict[str, float]:
        t = time.monotonic()
        val = quick(self.module, self.device)
        self.record({"event": "val", "step": step, "val_s": round(time.monotonic() - t, 1), **val})
        return val

    def save(
        self, name: str, *, step: int, samples: int, train_s: float, val: dict[str, float], finished: bool = False
    ) -> None:
        s = self.settings
        meta = {
            **self.meta_base,
            "steps": step,
            "samples_seen": samples,
            "wall_s": round(train_s, 1),
            "quick_val": val,
            "finished": finished,
        }
        save_checkpoint(self.out / name, self.module, s.arch, s.in_channels, s.arch_kwargs, meta)
        if name == "scarnet.pt":
            partial = {"steps": step, "samples_seen": samples, "train_s": round(train_s, 1), "quick_val": val}
            _write_json(self.out / "summary.json", {**partial, "finished": finished, "partial": not finished})


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _total(counts: dict[int, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_worker in counts.values():
        for k, v in per_worker.items():
            out[k] = out.get(k, 0) + v
    return out


def _next_batch(
    batches: Iterator[Chunk], n: int, device: torch.device, counts: dict[int, dict[str, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` chunks concatenated on ``device``: images float32, labels float32, weight bool."""
    xs, ys, ws = [], [], []
    for _ in range(n):
        x, y, w, worker, worker_counts = next(batches)
        counts[worker] = worker_counts
        xs.append(x.to(device, non_blocking=True).float())
        ys.append(y.to(device, non_blocking=True).float())
        ws.append(w.to(device, non_blocking=True))
    return torch.cat(xs), torch.cat(ys), torch.cat(ws)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m pipeline.model.gpu_train", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path(".bundle"), help="the training bundle (scarwatch bundle)")
    p.add_argument("--out", type=Path, required=True, help="folder for scarnet.pt, train_log.jsonl, summary.json")
    p.add_argument("--minutes", type=float, default=None, help="training wall time; the LR has annealed by then")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the LR anneals by them)")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint (its network, or with --arch-kwargs one grown wider from it)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch", type=int, default=64, help="samples per step")
    p.add_argument("--crop", type=int, default=384, help="sample side in pixels (a multiple of 16)")
    p.add_argument("--workers", type=int, default=None, help="sampler processes (default: CPU cores - 1)")
    p.add_argument("--chunk", type=int, default=8, help="samples a worker draws per item (divides --batch)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the bundle's train.lr)")
    p.add_argument("--val-minutes", type=float, default=3.0, help="quick validation this often (0: only at the end)")
    p.add_argument("--warmup-frac", type=float, default=0.03, help="share of the run the LR warms up over")
    p.add_argument("--log-every", type=int, default=20, help="steps per train log line")
    p.add_argument(
        "--arch-kwargs",
        type=json.loads,
        default=None,
        help="architecture options as JSON (with --init: widths to grow it to)",
    )
    p.add_argument("--seed", type=int, default=None, help="default: the bundle's train.seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: train.threads)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``python -m pipeline.model.gpu_train ...``; 2 on an expected error."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        gpu_train(
            args.bundle,
            args.out,
            minutes=args.minutes,
            max_steps=args.max_steps,
            init=args.init,
            device=args.device,
            batch=args.batch,
            crop=args.crop,
            workers=args.workers,
            chunk=args.chunk,
            lr=args.lr,
            val_minutes=args.val_minutes,
            warmup_frac=args.warmup_frac,
            log_every=args.log_every,
            arch_kwargs=args.arch_kwargs,
            seed=args.seed,
            threads=args.threads,
        )
    except ScarWatchError as exc:
        print(f"gpu_train: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
