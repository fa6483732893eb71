"""Weight averaging: one network from several checkpoints of one run (``scarwatch average``).

Stochastic weight averaging (Izmailov et al., UAI 2018): checkpoints taken along the low-learning-rate
end of one run lie around one minimum; the uniform average of their weights sits nearer its centre and
generalises better and more steadily than any single one of them. Here that steadiness is the point:
between two checkpoints of one run 1,000 steps apart the calibrated `levir-dev` pixel F1 moved by
0.085 (stage 6, models/scarnet.md), so which single checkpoint ships would be luck.

BatchNorm's running statistics of the averaged network are not the average of the checkpoints'
statistics, so they are recomputed: reset, then accumulated (cumulative mean, momentum None) over
training batches drawn from the mix the checkpoints were trained on, in train mode without gradients
(the rule of ``torch.optim.swa_utils.update_bn``, which this uses). The result is uncalibrated
(threshold 0.5); ``scarwatch calibrate`` sets its thresholds like any checkpoint's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.errors import ModelError
from pipeline.nets.checkpoint import ChangeModel, save_checkpoint

if TYPE_CHECKING:
    from pipeline.config import Settings

log = logging.getLogger(__name__)

#: Checkpoint fields that describe one checkpoint's calibration or training moment, not the average.
_NOT_INHERITED = (
    "threshold",
    "calibration",
    "object_threshold",
    "object_calibration",
    "calibrated_precision",
    "quick_val",
    "finished",
    "wall_s",
)


def average_weights(models: Sequence[ChangeModel]) -> dict[str, torch.Tensor]:
    """The uniform average of the models' floating-point weights (integer buffers: the largest value).

    Raises:
        ModelError: fewer than two models, or models of different architectures, options or band counts.
    """
    if len(models) < 2:
        raise ModelError("averaging needs at least two checkpoints of one run; pass two or more")
    first = models[0]
    for m in models[1:]:
        if (m.arch, m.in_channels, m.kwargs) != (first.arch, first.in_channels, first.kwargs):
            raise ModelError(
                f"cannot average {m.arch!r} ({m.in_channels} bands, {m.kwargs}) with {first.arch!r} "
                f"({first.in_channels} bands, {first.kwargs}); average checkpoints of one run"
            )
    states = [{k: v.detach().cpu() for k, v in m.module.state_dict().items()} for m in models]
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        stack = torch.stack([s[key] for s in states])
        # num_batches_tracked: a count, not a weight
        out[key] = stack.mean(0).to(ref.dtype) if ref.is_floating_point() else stack.max(0).values
    return out


def recompute_batchnorm(module: torch.nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset every BatchNorm's running statistics and accumulate them over ``batches``; the batches used."""
    n = 0

    def counted() -> Iterable[torch.Tensor]:
        nonlocal n
        for x in batches:
            n += 1
            yield x

    torch.optim.swa_utils.update_bn(counted(), module)
    module.eval()
    return n


def training_batches(settings: Settings, train_meta: dict[str, Any], n: int, *, seed: int) -> Iterable[torch.Tensor]:
    """``n`` training input batches drawn from the mix, crop and batch size recorded in ``train_meta``."""
    from pipeline.model.train import load_training_data, training_sampler

    train = settings.train.model_copy(
        update={k: train_meta[k] for k in ("mix", "footprints", "coarsen_p", "crop", "batch_size") if k in train_meta}
    )
    data = load_training_data(train, settings.paths.shared)
    sampler = training_sampler(data, train, np.random.default_rng(seed))
    for _ in range(n):
        images, _, _ = sampler.batch(train.batch_size, train.crop)
        yield torch.from_numpy(np.asarray(images, dtype=np.float32))


def average_checkpoints(
    paths: Sequence[str | Path],
    out: str | Path,
    batches: Iterable[torch.Tensor],
) -> dict[str, Any]:
    """Average ``paths`` into ``out``, with BatchNorm statistics recomputed over ``batches``.

    Returns:
        ``{"out", "averaged_from", "averaged_steps", "bn_batches"}``.

    Raises:
        ModelError: a checkpoint cannot be loaded, or the checkpoints are not of one architecture.
    """
    from pipeline.nets import create_model

    models = [ChangeModel.load(p) for p in paths]
    state = average_weights(models)
    last = models[-1]
    module = create_model(last.arch, in_channels=last.in_channels, **last.kwargs)
    module.load_state_dict(state, strict=True)
    n = recompute_batchnorm(module, batches)
    if n == 0:
        raise ModelError("no training batches to recompute the BatchNorm statistics; pass --bn-batches above 0")
    meta = {k: v for k, v in last.meta.items() if k not in _NOT_INHERITED}
    result = {
        "averaged_from": [str(p) for p in paths],
        "averaged_steps": [m.meta.get("steps") for m in models],
        "bn_batches": n,
    }
    save_checkpoint(out, module, last.arch, last.in_channels, last.kwargs, {**meta, **result, "threshold": 0.5})
    steps = json.dumps(result["averaged_steps"])
    log.info("averaged %d checkpoints (steps %s) -> %s; BatchNorm over %d batches", len(models), steps, out, n)
    return {"out": str(out), **result}
