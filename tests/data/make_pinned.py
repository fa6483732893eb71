"""Store what the shipped checkpoint computes on a fixed input (after smp's test_preserve_forward_output).

The input is a demo-town pair rendered by the project's own generator from a fixed seed (no third-party
imagery is stored); the output is the shipped network's probabilities on it. ``tests/test_pinned.py``
recomputes them: a change of the network code, of the checkpoint or of the inference path that moves
the numbers fails there. After shipping a new checkpoint on purpose (and regenerating its card), run

    .venv/bin/python tests/data/make_pinned.py

and commit ``tests/data/pinned_scarnet.npz`` with the checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "models" / "scarnet.pt"
PINNED = Path(__file__).with_name("pinned_scarnet.npz")
SEED, SIZE = 20261201, 128


def pinned_input() -> np.ndarray:
    """The stored input: uint8 (2, 3, 128, 128) as [prev, curr], a demo-town pair from a fixed seed."""
    from pipeline.synth.training import training_pair

    images, _ = training_pair(np.random.default_rng(SEED), size=SIZE)
    return np.asarray(images, dtype=np.uint8)[:, :3]


def sha256(path: Path) -> str:
    """The file's SHA-256 (hex)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    """Recompute and store the pinned input and output."""
    import torch

    from pipeline.nets.checkpoint import ChangeModel

    torch.set_num_threads(1)
    images = pinned_input()
    model = ChangeModel.load(CHECKPOINT)
    probs = model.predict(images[None].astype(np.float32) / 255.0)[0]
    np.savez_compressed(PINNED, images=images, probs=probs.astype(np.float32), checkpoint_sha256=sha256(CHECKPOINT))
    print(f"wrote {PINNED} ({PINNED.stat().st_size} bytes) for {CHECKPOINT} {sha256(CHECKPOINT)[:12]}")


if __name__ == "__main__":
    main()
