"""The shipped checkpoint still computes what was stored when it shipped (tests/data/make_pinned.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).with_name("data")))
from make_pinned import CHECKPOINT, PINNED, pinned_input, sha256  # noqa: E402


@pytest.fixture(scope="module")
def pinned() -> dict[str, np.ndarray]:
    with np.load(PINNED) as z:
        return {k: z[k] for k in z.files}


def test_the_stored_input_is_the_generator_output(pinned: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(pinned["images"], pinned_input())


def test_the_pinned_output_belongs_to_the_shipped_checkpoint(pinned: dict[str, np.ndarray]) -> None:
    assert str(pinned["checkpoint_sha256"]) == sha256(CHECKPOINT), (
        "models/scarnet.pt changed since tests/data/pinned_scarnet.npz was made: "
        "run .venv/bin/python tests/data/make_pinned.py after checking the model card"
    )


def test_shipped_checkpoint_preserves_its_forward_output(pinned: dict[str, np.ndarray]) -> None:
    import torch

    from pipeline.nets.checkpoint import ChangeModel

    torch.set_num_threads(1)
    model = ChangeModel.load(CHECKPOINT)
    probs = model.predict(pinned["images"][None].astype(np.float32) / 255.0)[0]
    expected = pinned["probs"]
    assert probs.shape == expected.shape == (2, 128, 128)
    diff = np.abs(probs - expected)
    # bf16 or a different kernel may move single values a little; the maps and decisions must not move
    assert float(diff.mean()) < 2e-3 and float(diff.max()) < 0.05
    t = model.threshold
    assert np.mean((probs >= t) != (expected >= t)) < 1e-3
    # the stored pair is not trivial: the network sees change in it
    assert (expected >= t).any()
