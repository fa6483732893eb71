"""Checkpoint files: saving a trained network and loading it back as a :class:`ChangeModel`.

A checkpoint is a ``torch.save`` dict of plain values and tensors (so it loads with
``weights_only=True``): ``format``, ``version``, ``arch``, ``in_channels``, ``kwargs`` (the
architecture options), ``state_dict`` and ``meta`` (threshold, training settings, metrics).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ModelError, first_line
from pipeline.fileio import atomic_path
from pipeline.formats import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_checkpoint
from pipeline.nets import MODELS, create_model
from pipeline.nets.device import Precision, autocast, resolve_device

log = logging.getLogger(__name__)


def save_checkpoint(
    path: str | Path,
    module: nn.Module,
    arch: str,
    in_channels: int,
    kwargs: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``module``'s weights and what is needed to rebuild it, atomically.

    Args:
        path: the ``.pt`` file to write (parent folders are created).
        module: the trained network.
        arch: its registry name.
        in_channels: bands per epoch.
        kwargs: the options it was built with.
        meta: JSON-like extras; ``meta["threshold"]`` is the decision threshold (default 0.5).

    Returns:
        The path written.

    Raises:
        ModelError: ``arch`` is not a registered architecture.
    """
    if arch not in MODELS:
        raise ModelError(f"unknown architecture {arch!r}; valid names: {sorted(MODELS)!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "in_channels": int(in_channels),
        "kwargs": dict(kwargs or {}),
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    log.info("wrote checkpoint %s (%s, %d bands)", path, arch, in_channels)
    return path


class ChangeModel:
    """A loaded checkpoint ready for inference.

    Attributes:
        arch: the architecture name.
        in_channels: bands per epoch the network expects.
        threshold: the calibrated decision threshold on probabilities.
        object_threshold: the calibrated minimum mean probability of a flag object (None: not calibrated;
            see :mod:`pipeline.model.calibrate`).
        kwargs: the architecture options.
        meta: everything else the checkpoint recorded.
        module: the network, in eval mode, channels-last, on ``device``.
        device: where it runs (see :func:`pipeline.nets.device.resolve_device`).
        precision: the CPU inference precision ``predict`` runs at (``auto``, ``fp32`` or ``bf16``, the
            ``detect.precision`` setting; CUDA always autocasts, :mod:`pipeline.nets.device`).
    """

    def __init__(
        self,
        module: nn.Module,
        arch: str,
        in_channels: int,
        *,
        kwargs: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        precision: Precision = "fp32",
    ) -> None:
        self.device = resolve_device(device)
        self.precision: Precision = precision
        self.module = module.to(self.device).to(memory_format=torch.channels_last).eval()
        self.arch = arch
        self.in_channels = int(in_channels)
        self.kwargs = dict(kwargs or {})
        self.meta = dict(meta or {})
        self.threshold = float(self.meta.get("threshold", 0.5))
        obj = self.meta.get("object_threshold")
        self.object_threshold: float | None = None if obj is None else float(obj)

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", *, precision: Precision = "fp32"
    ) -> ChangeModel:
        """Load a checkpoint written by :func:`save_checkpoint`.

        Args:
            path: the ``.pt`` file.
            device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
            precision: the CPU inference precision of ``predict`` (``detect.precision``).

        Returns:
            The model, in eval mode on ``device``.

        Raises:
            ModelError: the file is missing, corrupt, not a ScarWatch checkpoint, names an unknown
                architecture or holds weights that do not fit it; DeviceError (a ModelError) for a device
                that is unknown or absent.
        """
        path = Path(path)
        payload = read_checkpoint(path)
        arch = payload.get("arch")
        if arch not in MODELS:
            raise ModelError(
                f"{path}: unknown architecture {arch!r} (valid: {sorted(MODELS)!r}); "
                "update ScarWatch or use a checkpoint of a known architecture"
            )
        in_channels = int(payload.get("in_channels", 3))
        kwargs = dict(payload.get("kwargs") or {})
        try:
            module = create_model(arch, in_channels=in_channels, **kwargs)
            module.load_state_dict(payload["state_dict"], strict=True)
        except (RuntimeError, KeyError, ModelError) as exc:
            raise ModelError(
                f"{path}: weights do not fit architecture {arch!r} ({first_line(exc)}); "
                "the checkpoint is from another version: retrain or restore the matching code"
            ) from exc
        dev = resolve_device(device)
        log.info("loaded %s (%s, %d bands) on %s", path, arch, in_channels, dev)
        meta = payload.get("meta") or {}
        return cls(module, arch, in_channels, kwargs=kwargs, meta=meta, device=dev, precision=precision)

    @torch.no_grad()
    def predict(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Change probabilities for a batch of image pairs, at the inference precision (``precision`` on the CPU).

        Args:
            x: ``(b, 2, c, h, w)`` float in [0, 1] as [prev, curr] (a single pair ``(2, c, h, w)`` is
                accepted too); h and w multiples of 16.

        Returns:
            float32 probabilities ``(b, 2, h, w)`` as [p_new, p_removed].

        Raises:
            ModelError: the band count differs from the checkpoint's.
            ValueError: the shape is not ``(b, 2, c, h, w)`` or h, w are not multiples of 16.
        """
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if t.ndim == 4:
            t = t.unsqueeze(0)
        if t.ndim != 5 or t.shape[1] != 2:
            raise ValueError(f"expected (b, 2, c, h, w) as [prev, curr], got {tuple(t.shape)!r}; stack the epochs")
        if t.shape[2] != self.in_channels:
            raise ModelError(
                f"input has {t.shape[2]} bands but checkpoint {self.arch!r} expects {self.in_channels}; "
                f"set align.bands to {self.in_channels} bands or use a {t.shape[2]}-band checkpoint"
            )
        t = t.to(self.device, dtype=torch.float32, non_blocking=True)
        with autocast(self.device, self.precision):
            logits = self.module(t)
        return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float32, copy=False)
