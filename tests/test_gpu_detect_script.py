"""scripts/gpu_detect.py: packs real tiles with the checkpoint here and measures them (here on the CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_detect  # noqa: E402

from pipeline.nets import create_model  # noqa: E402
from pipeline.nets.checkpoint import ChangeModel, save_checkpoint  # noqa: E402


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "net.pt", create_model("scarnet"), "scarnet", 3, meta={"threshold": 0.7})
    out = tmp_path / "pack"
    out.mkdir()
    tiles = np.random.default_rng(0).integers(0, 256, (3, 2, 3, 32, 32), dtype=np.uint8)
    np.save(out / "tiles.npy", tiles)
    (out / "model.pt").write_bytes(path.read_bytes())
    return out


def test_run_measures_each_batch_size_and_writes_json(packed: Path, tmp_path: Path) -> None:
    argv = ["run", "--pack", str(packed), "--out", str(tmp_path / "out"), "--device", "cpu", "--batch", "1,2"]
    assert gpu_detect.main([*argv, "--tiles", "4"]) == 0
    result = json.loads((tmp_path / "out" / "gpu_detect.json").read_text())
    assert result["device"] == "cpu" and result["precision"] == "bf16" and result["packed_tiles"] == 3
    assert set(result["batches"]) == {"1", "2"} and result["tile_shape"] == [2, 3, 32, 32]
    for entry in result["batches"].values():
        assert entry["tiles"] == 4 and entry["forward_tiles_per_s"] > 0 and entry["host_to_result_tiles_per_s"] > 0
    assert result["best_batch"] in (1, 2)


def test_the_packed_forward_is_the_checkpoints(packed: Path) -> None:
    """What run times is the checkpoint's forward on the unpacked tiles (bf16 within autocast tolerance)."""
    model = ChangeModel.load(packed / "model.pt")
    x = np.load(packed / "tiles.npy")[:2].astype(np.float32) / 255
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.sigmoid(model.module(torch.from_numpy(x)).float()).numpy()
    assert np.abs(got - model.predict(x)).max() < 0.05
