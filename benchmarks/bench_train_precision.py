"""Training under bf16 autocast against fp32, side by side: step time and the loss curve on the same batches.

Both runs start from the same weights and draw the same batches (one seeded sampler, batches drawn once
and replayed), so the loss curves differ only by the precision. bf16 pays only on a CPU that computes it
(AMX, AVX512-BF16): on an AVX2-only EPYC here its 256² × 4 step took 8× the fp32 one (emulated).

    .venv/bin/python benchmarks/bench_train_precision.py [--steps 60] [--crop 128] [--batch 8] [--out FILE.json]

Needs ../shared/data (``paths.shared``). Prints the medians of the step times, their ratio, and the mean
loss of each precision over windows of 10 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_settings
from pipeline.model.sampler import TrainingSampler
from pipeline.model.train import load_training_data, masked_bce_dice
from pipeline.nets import create_model
from pipeline.nets.device import cpu_name


def run(
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]], init: dict, bf16: bool
) -> tuple[list[float], list[float]]:
    """Train a copy of ``init`` on ``batches``; return the step times and losses."""
    torch.manual_seed(0)
    module = create_model("scarnet").to(memory_format=torch.channels_last)
    module.load_state_dict(init)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=6e-4, weight_decay=1e-4)
    times, losses = [], []
    for images, labels, weight in batches:
        x, y, w = (torch.from_numpy(a) for a in (images, labels, weight))
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = module(x)
        loss = masked_bce_dice(logits, y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    return times, losses


def main() -> None:
    """Run both precisions and print (and optionally write) the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", default="models/scarnet.pt", help="start from this checkpoint's weights")
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings("params.yaml")
    data = load_training_data(settings.train, settings.paths.shared)
    sampler = TrainingSampler(
        data.tiles, dict(settings.train.mix), np.random.default_rng(1), pairs=data.pairs, coarsen_p=0.3
    )
    batches = [sampler.batch(args.batch, args.crop) for _ in range(args.steps)]
    init = torch.load(args.init, map_location="cpu", weights_only=True)["state_dict"]
    load_before = os.getloadavg()
    t32, l32 = run(batches, init, bf16=False)
    t16, l16 = run(batches, init, bf16=True)
    load_after = os.getloadavg()
    windows = range(0, args.steps, 10)
    out = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} threads",
        "load_before": load_before,
        "load_after": load_after,
        "steps": args.steps,
        "crop": args.crop,
        "batch": args.batch,
        "fp32_step_s_median": float(np.median(t32[3:])),
        "bf16_step_s_median": float(np.median(t16[3:])),
        "speedup": float(np.median(t32[3:]) / np.median(t16[3:])),
        "loss_fp32_by_10": [round(float(np.mean(l32[i : i + 10])), 4) for i in windows],
        "loss_bf16_by_10": [round(float(np.mean(l16[i : i + 10])), 4) for i in windows],
        "loss_mean_abs_diff": float(np.mean(np.abs(np.array(l32) - np.array(l16)))),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
