"""Training pieces: the masked loss, the schedule, the sampler, the split, and that loss goes down."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.config import TrainSettings
from pipeline.datasets import SantaRosaTile, TrainingSampler, load_levir, split_clusters
from pipeline.errors import ModelError
from pipeline.nets import create_model
from pipeline.train import lr_factor, masked_bce_dice, pick_device, seed_everything

torch.set_num_threads(1)


def fake_tile(seed: int = 0, size: int = 160) -> SantaRosaTile:
    """A synthetic tile: grey-green ground, bright square buildings, half of them burnt in 'post'."""
    rng = np.random.default_rng(seed)
    ground = np.clip(rng.normal(90, 12, (3, size, size)), 0, 255)
    inst = np.zeros((size, size), np.int32)
    k = 0
    for y in range(10, size - 20, 30):
        for x in range(10, size - 20, 30):
            k += 1
            inst[y : y + 14, x : x + 14] = k
    pre = ground.copy()
    pre[:, inst > 0] = 210
    change = np.isin(inst, np.arange(1, k + 1, 2))
    post = pre.copy()
    post[:, change] = 40
    valid = np.ones((size, size), bool)
    valid[:, :8] = False
    boxes = [(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in ndimage.find_objects(inst) if s is not None]
    u8 = np.uint8
    return SantaRosaTile(f"{seed:08d}", seed, pre.astype(u8), post.astype(u8), valid, change, inst, boxes)


MIX = {"santa": 1.0, "erase": 1.0, "paste": 1.0, "nochange": 0.5}


def test_masked_loss_ignores_weighted_out_pixels() -> None:
    logits = torch.zeros(1, 2, 4, 4)
    labels = torch.zeros(1, 2, 4, 4)
    weight = torch.ones(1, 4, 4, dtype=torch.bool)
    base = masked_bce_dice(logits, labels, weight, dice_weight=0)
    assert float(base) == pytest.approx(np.log(2), rel=1e-5)
    logits2 = logits.clone()
    logits2[..., 0, 0] = 50.0  # a confident false alarm ...
    weight2 = weight.clone()
    weight2[:, 0, 0] = False  # ... on an ignored pixel costs nothing
    assert float(masked_bce_dice(logits2, labels, weight2, dice_weight=0)) == pytest.approx(float(base), rel=1e-5)
    assert float(masked_bce_dice(logits2, labels, weight, dice_weight=0)) > float(base)
    perfect = masked_bce_dice(torch.full((1, 2, 4, 4), 20.0), torch.ones(1, 2, 4, 4), weight, dice_weight=1)
    assert float(perfect) < 1e-3


def test_lr_schedule_warms_up_and_decays() -> None:
    assert lr_factor(0.0, 0.1) == pytest.approx(0.01)
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1) == pytest.approx(0.02)
    assert lr_factor(0.3, 0.1) > lr_factor(0.6, 0.1) > lr_factor(0.9, 0.1)


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(ModelError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.parametrize("source", ["santa", "erase", "paste", "nochange"])
def test_sampler_sources(source: str) -> None:
    sampler = TrainingSampler([fake_tile(0), fake_tile(1)], {source: 1.0}, np.random.default_rng(0))
    images, labels, weight = sampler.batch(3, 64)
    assert images.shape == (3, 2, 3, 64, 64) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert labels.shape == (3, 2, 64, 64) and set(np.unique(labels)) <= {0.0, 1.0}
    assert weight.shape == (3, 64, 64) and weight.dtype == bool
    if source == "nochange":
        assert labels.sum() == 0
    # a sample is new or removed, never both at one pixel
    assert (labels[:, 0] * labels[:, 1]).sum() == 0
    assert sampler.counts[source] == 3


def test_sampler_is_seeded() -> None:
    tiles = [fake_tile(0)]
    a = TrainingSampler(tiles, MIX, np.random.default_rng(5)).batch(2, 64)
    b = TrainingSampler(tiles, MIX, np.random.default_rng(5)).batch(2, 64)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_sampler_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown training sources"):
        TrainingSampler([fake_tile()], {"mystery": 1.0}, np.random.default_rng(0))


def test_loss_goes_down_in_20_steps() -> None:
    seed_everything(0)
    sampler = TrainingSampler([fake_tile(0), fake_tile(1)], {"santa": 1.0}, np.random.default_rng(0))
    images, labels, weight = (torch.from_numpy(a) for a in sampler.batch(4, 64))
    net = create_model("scarnet", widths=(8, 8, 16, 16, 16), dropout=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-2)
    losses = []
    for _ in range(20):
        loss = masked_bce_dice(net(images), labels, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])


def test_train_settings_validate() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainSettings(crop=100)
    assert TrainSettings().arch == "scarnet"


@pytest.mark.realdata
def test_split_keeps_clusters_apart(shared_data: Path) -> None:
    import pandas as pd

    root = shared_data / "xbd-santa-rosa"
    train_ids, val_ids = split_clusters(root, 0.2, 0)
    df = pd.read_csv(root / "tiles.csv", dtype={"id": str}).set_index("id")
    assert set(train_ids).isdisjoint(val_ids) and len(train_ids) + len(val_ids) == len(df)
    assert set(df.loc[train_ids, "cluster_id"]).isdisjoint(df.loc[val_ids, "cluster_id"])
    assert df.loc[val_ids, "changed_pixels"].sum() >= 0.2 * df["changed_pixels"].sum()
    assert split_clusters(root, 0.2, 0) == (train_ids, val_ids)


@pytest.mark.realdata
def test_levir_reads_pairs(shared_data: Path) -> None:
    pairs = load_levir(shared_data / "levir-dev")
    assert len(pairs) == 4
    name, images, label = pairs[0]
    assert images.shape == (2, 3, 256, 256) and images.dtype == np.uint8 and label.dtype == bool
