"""Detection on CUDA: same probabilities as the CPU (autocast tolerance), pinned non-blocking uploads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_detect import ConvNet, make_pair, run

from pipeline.config import DetectSettings
from pipeline.formats import PROB_NODATA
from pipeline.nets.device import resolve_device
from pipeline.predictors import ModulePredictor

pytestmark = pytest.mark.gpu


def test_cuda_matches_cpu(tmp_path: Path) -> None:
    pair_dir = make_pair(tmp_path)
    cpu, cpu_summary = run(tmp_path / "cpu", pair_dir, 64, 16)
    settings = DetectSettings(device="cuda", batch_size=4, workers=2)
    gpu, gpu_summary = run(
        tmp_path / "gpu", pair_dir, 64, 16, settings=settings, predictor=ModulePredictor(ConvNet(), device="cuda")
    )
    assert cpu_summary.device == "cpu" and gpu_summary.device.startswith("cuda")
    diff = np.abs(cpu.astype(int) - gpu.astype(int))
    assert (cpu == PROB_NODATA).sum() == (gpu == PROB_NODATA).sum()
    assert diff.max() <= 4 and diff.mean() < 0.5  # bf16/fp16 autocast


def test_prepare_pins_and_uploads_on_a_side_stream() -> None:
    predictor = ModulePredictor(ConvNet(), device="cuda")
    assert predictor.setup().startswith("cuda")
    assert predictor.module is not None
    weight = predictor.module.conv1.weight  # type: ignore[union-attr]
    assert weight.is_cuda and weight.is_contiguous(memory_format=torch.channels_last)
    x = np.random.default_rng(0).random((2, 2, 3, 32, 32), dtype=np.float32)
    dev, event, host = predictor.prepare(x)
    assert host.is_pinned() and dev.is_cuda
    event.synchronize()
    np.testing.assert_array_equal(dev.cpu().numpy(), x)
    probs = predictor((dev, event, host))
    assert probs.shape == (2, 2, 32, 32) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()


def test_auto_picks_cuda() -> None:
    assert resolve_device("auto").type == "cuda"
