"""Detect throughput on a lent GPU (issue 15): the shipped network at several batch sizes under bf16.

The GPU machine has torch and numpy but no rasterio or pydantic, so the tiles travel as arrays:

1. Here, on the CPU, pack tiles read through the real reader (``AlignedPair.read``: sub-pixel shift and
   histogram tables), stored as uint8 (``round(255 x)``) ``(n, 2, c, h, w)``, plus the checkpoint::

       .venv/bin/python scripts/gpu_detect.py pack --pair <aligned pair dir> --tiles <tiles.parquet>
           --n 24 --out .gpu_detect          # 24 tiles of 512² = 38 MB (the carry limit is 64 MiB)

   (``benchmarks/run_all.py`` leaves such a pair when run with ``--workdir``; any aligned month works.)
2. The device tool: command ``python3 scripts/gpu_detect.py run --pack .gpu_detect --out "$OUT"``,
   carry ``[".gpu_detect"]``, timeout_s 300. Only ``pipeline.nets`` is imported (torch and numpy).
3. ``$OUT/gpu_detect.json``: per batch size, tiles/s of (a) the forward alone on tiles already on the
   GPU and (b) the host-to-result path (uint8 host tiles, pinned, uploaded, scaled, forward, sigmoid,
   uint8 probabilities copied back), which is what detect does after decoding. The packed tiles are
   cycled to make ``--tiles`` tiles per measurement. Compare with the host's decode floor in
   BENCHMARKS.md: the target is (b) >= 0.8 x that floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pack(args: argparse.Namespace) -> dict[str, Any]:
    """Read ``--n`` tiles spread over the index through the real reader; save them with the checkpoint."""
    import shutil

    from pipeline.detect import load_batch
    from pipeline.nets.blocks import padded_size
    from pipeline.pair import AlignedPair
    from pipeline.tiling import read_tile_index

    tiles = [t for t in read_tile_index(args.tiles)[0] if t.height == t.width == args.tile_size]
    picks = np.unique(np.linspace(0, len(tiles) - 1, min(args.n, len(tiles))).round().astype(int))
    out = []
    with AlignedPair.open(args.pair) as pair:
        for i in picks:  # one tile at a time, prepared exactly as detect prepares its batches
            batch, _ = load_batch(pair, [tiles[int(i)]], padded_size(args.tile_size))
            out.append(np.round(batch[0] * 255).astype(np.uint8))
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "tiles.npy", np.stack(out))
    shutil.copyfile(args.model, args.out / "model.pt")
    return {"tiles": len(out), "shape": list(np.stack(out).shape), "out": str(args.out)}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the forward and the host-to-result path at each batch size."""
    import torch

    from pipeline.nets.checkpoint import ChangeModel

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.benchmark = True
    host = np.load(args.pack / "tiles.npy")  # (n, 2, c, h, w) uint8
    model = ChangeModel.load(args.pack / "model.pt", device=device)
    net: Any = model.module
    if args.compile:
        net = torch.compile(net, dynamic=False)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "compile": args.compile,
        "tile_shape": list(host.shape[1:]),
        "packed_tiles": int(host.shape[0]),
        "tiles_per_measurement": args.tiles,
        "batches": {},
    }
    on_device = torch.from_numpy(host).to(device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            return torch.sigmoid(net(x).float())

    for b in args.batch:
        idx = [np.arange(i, i + b) % host.shape[0] for i in range(0, args.tiles, b)]
        gpu_x = [on_device[torch.from_numpy(ix).to(device)].float().div_(255) for ix in idx[:2]]
        forward(gpu_x[0])  # warm-up (cudnn autotuning, compile)
        _sync(device)
        t0 = time.perf_counter()
        for k in range(len(idx)):
            forward(gpu_x[k % len(gpu_x)])
        _sync(device)
        fwd = time.perf_counter() - t0
        pinned = [
            torch.from_numpy(host[ix]).pin_memory() if device.type == "cuda" else torch.from_numpy(host[ix])
            for ix in idx
        ]
        t0 = time.perf_counter()
        outs = []
        for x in pinned:
            with torch.inference_mode():
                p = forward(x.to(device, non_blocking=True).float().div_(255))
                outs.append(p.mul_(254).round_().to(torch.uint8).to("cpu", non_blocking=True))
        _sync(device)
        e2e = time.perf_counter() - t0
        n = sum(len(ix) for ix in idx)
        entry = {"tiles": n, "forward_tiles_per_s": round(n / fwd, 2), "host_to_result_tiles_per_s": round(n / e2e, 2)}
        if device.type == "cuda":
            entry["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            torch.cuda.reset_peak_memory_stats(device)
        result["batches"][str(b)] = entry
        print(json.dumps({"batch": b, **entry}), flush=True)
    best = max(result["batches"].items(), key=lambda kv: kv[1]["host_to_result_tiles_per_s"])
    result["best_batch"] = int(best[0])
    result["best_tiles_per_s"] = best[1]["host_to_result_tiles_per_s"]
    result["city_month_minutes_detect"] = round(9000 / best[1]["host_to_result_tiles_per_s"] / 60, 1)  # 500 km²
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_detect.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    """``pack`` here or ``run`` there; prints JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="pack tiles and the checkpoint (here, with rasterio)")
    pk.add_argument("--pair", type=Path, required=True)
    pk.add_argument("--tiles", type=Path, required=True)
    pk.add_argument("--model", type=Path, default=ROOT / "models" / "scarnet.pt")
    pk.add_argument("--n", type=int, default=24)
    pk.add_argument("--tile-size", type=int, default=512)
    pk.add_argument("--out", type=Path, default=ROOT / ".gpu_detect")
    rn = sub.add_parser("run", help="measure (there: torch and numpy only)")
    rn.add_argument("--pack", type=Path, default=ROOT / ".gpu_detect")
    rn.add_argument("--out", type=Path, required=True)
    rn.add_argument("--device", default="auto")
    rn.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    rn.add_argument("--compile", action="store_true")
    rn.add_argument("--batch", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 16, 32, 64, 128])
    rn.add_argument("--tiles", type=int, default=512, help="tiles per measurement (packed tiles are cycled)")
    args = p.parse_args(argv)
    result = pack(args) if args.cmd == "pack" else run(args)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
