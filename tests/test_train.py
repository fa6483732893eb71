"""Training pieces: the masked loss, the schedule, the data readers and sampler, the split, that loss goes
down, and that a stopped and resumed run equals one long run (on the fake shared-data tree)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.config import TrainSettings
from pipeline.errors import InputError, ModelError
from pipeline.model.data import (
    NATIVE_GSD_M,
    RealPair,
    SantaRosaTile,
    coarsen,
    consecutive_ids,
    instance_boxes,
    load_footprint_images,
    load_levir,
    load_png_pairs,
    split_clusters,
    whu_split,
)
from pipeline.model.sampler import TrainingSampler
from pipeline.model.train import lr_factor, masked_bce_dice, seed_everything, separation_weights
from pipeline.nets import create_model
from pipeline.nets.device import resolve_device

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


def test_separation_weights_follow_the_unet_border_formula() -> None:
    # two 10 px squares 4 px apart and a third far away, in one of two class maps
    labels = np.zeros((1, 2, 40, 60), np.float32)
    labels[0, 0, 5:15, 5:15] = 1
    labels[0, 0, 5:15, 19:29] = 1
    labels[0, 0, 30:36, 50:56] = 1
    w0, sigma = 10.0, 5.0
    got = separation_weights(labels, w0, sigma)
    assert got.shape == labels.shape and got.dtype == np.float32
    assert np.all(got[0, 1] == 1.0)  # an empty map: no border anywhere
    assert np.all(got[0, 0][labels[0, 0] > 0] == 1.0)  # structures keep weight 1
    # against distances to every structure computed over the whole map
    comps, n = ndimage.label(labels[0, 0] > 0, structure=np.ones((3, 3), bool))
    dists = np.sort(np.stack([ndimage.distance_transform_edt(comps != k) for k in range(1, n + 1)]), axis=0)
    want = np.where(comps > 0, 1.0, 1.0 + w0 * np.exp(-((dists[0] + dists[1]) ** 2) / (2 * sigma**2)))
    assert np.abs(got[0, 0] - want).max() <= w0 * np.exp(-4.5)
    # the gap between the close pair weighs most; the same pixel column far from both weighs about 1
    # (column 16: 2 px to the left square's last column 14, 3 px to the right one's first column 19)
    assert got[0, 0, 10, 16] == pytest.approx(1 + w0 * np.exp(-(5.0**2) / (2 * sigma**2)), rel=1e-5)
    assert got[0, 0, 10, 16] > 7.0 and got[0, 0, 38, 16] < 1.01
    # one structure, or w0 = 0: all ones
    single = np.zeros((1, 1, 20, 20), np.float32)
    single[0, 0, 5:10, 5:10] = 1
    assert np.all(separation_weights(single, w0, sigma) == 1.0)
    assert np.all(separation_weights(labels, 0.0, sigma) == 1.0)


def test_pixel_weights_scale_each_pixels_bce_within_the_counted_mean() -> None:
    logits = torch.zeros(1, 2, 4, 4)
    labels = torch.zeros(1, 2, 4, 4)
    weight = torch.ones(1, 4, 4, dtype=torch.bool)
    base = masked_bce_dice(logits, labels, weight, dice_weight=0)
    ones = masked_bce_dice(logits, labels, weight, dice_weight=0, pixel_weight=torch.ones(1, 2, 4, 4))
    assert float(ones) == pytest.approx(float(base), rel=1e-6)
    pw = torch.ones(1, 2, 4, 4)
    pw[0, 0, 1, 1] = 11.0  # one pixel of 32 weighs 11: the mean rises by 10/32 of a pixel's BCE
    heavier = masked_bce_dice(logits, labels, weight, dice_weight=0, pixel_weight=pw)
    assert float(heavier) == pytest.approx(float(base) * (1 + 10 / 32), rel=1e-5)
    weight2 = weight.clone()
    weight2[:, 1, 1] = False  # an ignored pixel stays ignored whatever its factor
    assert float(masked_bce_dice(logits, labels, weight2, dice_weight=0, pixel_weight=pw)) == pytest.approx(
        float(base), rel=1e-5
    )


def test_lr_schedule_warms_up_and_decays() -> None:
    assert lr_factor(0.0, 0.1) == pytest.approx(0.01)
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1) == pytest.approx(0.02)
    assert lr_factor(0.3, 0.1) > lr_factor(0.6, 0.1) > lr_factor(0.9, 0.1)
    # constant: the same warmup, then the full rate to the end
    assert lr_factor(0.05, 0.1, schedule="constant") == pytest.approx(0.5)
    assert lr_factor(0.3, 0.1, schedule="constant") == lr_factor(1.0, 0.1, schedule="constant") == 1.0


def test_training_resolves_devices_as_everything_else() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("source", ["santa", "erase", "paste", "nochange", "shadow", "block"])
def test_sampler_sources(source: str) -> None:
    sampler = TrainingSampler([fake_tile(0), fake_tile(1)], {source: 1.0}, np.random.default_rng(0))
    images, labels, weight = sampler.batch(3, 64)
    assert images.shape == (3, 2, 3, 64, 64) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert labels.shape == (3, 2, 64, 64) and set(np.unique(labels)) <= {0.0, 1.0}
    assert weight.shape == (3, 64, 64) and weight.dtype == bool
    if source in ("nochange", "shadow"):
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


def _single_date_tile(ground: int) -> SantaRosaTile:
    """A one-date tile of flat ``ground`` with a row of bright roofs (a footprint set's image)."""
    size = 160
    img = np.full((3, size, size), ground, np.uint8)
    inst = np.zeros((size, size), np.int32)
    for k, x in enumerate(range(12, size - 30, 36)):
        inst[60:84, x : x + 24] = k + 1
    img[:, inst > 0] = 230
    valid = np.ones((size, size), bool)
    return SantaRosaTile("fp", -1, img, img, valid, np.zeros((size, size), bool), inst, instance_boxes(inst))


def test_sampler_draws_single_date_pairs_from_footprint_sets_at_their_share() -> None:
    dark = _single_date_tile(ground=8)
    sampler = TrainingSampler(
        [fake_tile(0), fake_tile(1)], {"nochange": 1.0}, np.random.default_rng(0), footprints={"dark": (0.5, [dark])}
    )
    images, _, _ = sampler.batch(200, 64)
    from_dark = float((np.median(images[:, 0], axis=(1, 2, 3)) < 0.2).mean())  # Santa Rosa's ground is ~0.35
    assert 0.4 < from_dark < 0.6
    # erasing with every draw from the set: the erased roofs are the set's, on its dark ground
    sampler = TrainingSampler(
        [fake_tile(0)], {"erase": 1.0}, np.random.default_rng(1), footprints={"dark": (0.999, [dark])}
    )
    images, labels, weight = sampler.batch(8, 64)
    for im, lab, w in zip(images, labels, weight, strict=True):
        changed = lab.max(axis=0) > 0
        assert changed.any() and np.median(im[0][:, w & ~changed]) < 0.2


def test_sampler_without_footprint_sets_keeps_its_random_stream() -> None:
    tiles = [fake_tile(0), fake_tile(1)]
    a = TrainingSampler(tiles, MIX, np.random.default_rng(3)).batch(4, 64)
    b = TrainingSampler(tiles, MIX, np.random.default_rng(3), footprints={}).batch(4, 64)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_sampler_refuses_a_footprint_set_without_buildings() -> None:
    empty = _single_date_tile(ground=8)
    empty.boxes = []
    with pytest.raises(InputError, match="no buildings"):
        TrainingSampler([fake_tile(0)], MIX, np.random.default_rng(0), footprints={"x": (0.2, [empty])})


def test_shadow_pairs_differ_only_by_darker_ground_beside_the_buildings() -> None:
    tile = _single_date_tile(ground=120)
    sampler = TrainingSampler([tile], {"shadow": 1.0}, np.random.default_rng(4))
    changed = 0
    for _ in range(12):
        images, labels, valid = sampler._shadow(64)  # before the shared augmentation, to compare pixels
        assert not labels.any() and valid.all()
        roofs = images.min(axis=(0, 1)) >= 229  # the roofs (230) stand in both epochs, undarkened
        assert roofs.any() and (images[:, :, roofs] == 230).all()
        ground = ~roofs
        assert (images[:, :, ground] <= 120).all()  # shadows only darken the ground (120)
        darker = (images[0] != images[1]).any(axis=0)
        assert not (darker & roofs).any()
        changed += int(darker.sum() > 0)
    assert changed >= 6  # most pairs show shadows of another sun


def test_block_pairs_replace_a_region_by_open_ground_and_label_its_whole_footprints() -> None:
    built, empty = _single_date_tile(ground=120), _single_date_tile(ground=8)
    empty.instances[:], empty.pre[:], empty.boxes = 0, 8, []  # open ground, no roofs
    sampler = TrainingSampler([built, empty], {"block": 1.0}, np.random.default_rng(6))
    directions, labelled, exact = set(), 0, 0
    for _ in range(24):
        images, labels, weight = sampler._block(64)  # before the shared augmentation, to compare pixels
        assert not (labels[0] & labels[1]).any()
        k = 0 if labels[0].any() else 1
        later, earlier = (images[1], images[0]) if k == 0 else (images[0], images[1])  # built, open ground
        lab = labels[k] > 0
        roofs = later.min(axis=0) >= 229
        assert not (lab & ~roofs).any()  # only footprints are labelled ...
        comps, n = ndimage.label(roofs)
        for c in range(1, n + 1):  # ... each wholly or not at all
            assert lab[comps == c].all() or not lab[comps == c].any()
        if lab.any():
            labelled += 1
            directions.add(k)
            # where the block is new the earlier epoch is open ground (unless ignored: a building of the
            # ground crop, here when that crop came from the built tile itself)
            assert (earlier[:, lab & weight] < 200).all()
            assert (earlier[:, ~ndimage.binary_dilation(lab | ~roofs, iterations=4) & roofs] >= 200).all()
            exact += int(weight[lab].all())  # edges included: the outlines are exact
    assert labelled >= 12 and exact >= 6 and directions == {0, 1}


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
    assert TrainSettings().footprints == {}
    assert TrainSettings(footprints={"xbd-joplin": 0.3}).footprints == {"xbd-joplin": 0.3}
    with pytest.raises(ValueError, match=r"unknown footprint sets \['spacenet-sample'\]"):
        TrainSettings(footprints={"spacenet-sample": 0.3})
    with pytest.raises(ValueError, match="sum to less than 1"):
        TrainSettings(footprints={"xbd-joplin": 1.0})


def test_the_settings_accept_the_footprint_sets_the_readers_have() -> None:
    from pipeline import config
    from pipeline.model import data

    assert config.FOOTPRINT_SETS == data.FOOTPRINT_SETS


def test_consecutive_ids_close_the_gaps_and_keep_the_background() -> None:
    inst = np.array([[0, 3, 3, 9], [5, 5, 0, 9]])
    out = consecutive_ids(inst)
    np.testing.assert_array_equal(out, [[0, 1, 1, 3], [2, 2, 0, 3]])
    assert out.dtype == np.int32
    # box k is instance k + 1, which is what the sampler's copy-paste relies on
    for k, (y0, y1, x0, x1) in enumerate(instance_boxes(out)):
        assert (out[y0:y1, x0:x1] == k + 1).any()
    np.testing.assert_array_equal(consecutive_ids(np.array([[2, 2], [7, 7]])), [[1, 1], [2, 2]])  # no background
    assert not consecutive_ids(np.zeros((2, 2), np.int64)).any()


def test_footprint_images_rasterise_the_pre_polygons(fake_shared: Path) -> None:
    (tile,) = load_footprint_images(fake_shared / "xbd-joplin")
    assert tile.id == "joplin-tornado_00000000" and tile.cluster == -1
    side = int(round(96 * 0.55 / NATIVE_GSD_M))  # resampled from Joplin's 0.55 m to the network's 0.5 m
    assert tile.pre.shape == (3, side, side) and tile.post is tile.pre and not tile.change.any()
    assert len(tile.boxes) == 9 and tile.instances.max() == 9
    roofs = tile.instances > 0
    assert tile.pre[:, roofs].mean() > 180 and tile.pre[:, ~roofs].mean() < 130  # the footprints lie on the roofs


def test_footprint_images_refuse_an_unknown_set(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no footprint reader"):
        load_footprint_images(tmp_path / "spacenet-sample")


@pytest.mark.realdata
def test_joplin_footprints_match_the_shared_footprint_masks(shared_data: Path) -> None:
    from pipeline.model.data import resample_to

    tiles = load_footprint_images(shared_data / "xbd-joplin")
    assert [t.id for t in tiles] == [f"joplin-tornado_0000000{i}" for i in range(3)]
    assert sum(len(t.boxes) for t in tiles) == 486  # 185 + 198 + 103 polygons in the pre labels
    for t in tiles:
        assert t.pre.shape == (3, 1126, 1126) and t.instances.max() == len(t.boxes)
        # the shared footprint_pre masks were rasterised on the 1024² source grid, independently of this reader
        from PIL import Image

        mask = np.asarray(Image.open(shared_data / "xbd-joplin" / "footprint_pre" / f"{t.id}.png")) > 127
        mask = resample_to(mask[..., 0] if mask.ndim == 3 else mask, t.instances.shape, label=True)
        ours = t.instances > 0
        assert (ours & mask).sum() / (ours | mask).sum() > 0.9


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


def _real_pair(kind: str) -> RealPair:
    """A pair whose labelled roofs are standing in the later image ("new") or the earlier one ("removed")."""
    tile = fake_tile(3)
    images = np.stack([tile.post, tile.pre] if kind == "new" else [tile.pre, tile.post])
    return RealPair("fake", "p", images, tile.change, tile.valid, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "forward_channel"), [("new", 0), ("removed", 1)])
def test_real_pair_source_labels_the_right_direction(kind: str, forward_channel: int) -> None:
    sampler = TrainingSampler([fake_tile(0)], {"whu": 1.0}, np.random.default_rng(1), pairs={"whu": [_real_pair(kind)]})
    seen = set()
    for _ in range(12):
        images, labels, _ = sampler._real("whu", 64)
        assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)
        assert (labels[0] * labels[1]).sum() == 0
        # the labelled structure is dark (burnt, 40) where it is absent and bright (210) where it stands
        for k in (0, 1):
            if labels[k].any():
                seen.add(k)
                later, earlier = (images[1], images[0]) if k == 0 else (images[0], images[1])
                m = labels[k] > 0
                assert earlier[:, m].mean() < later[:, m].mean()
    assert seen == {0, 1}  # both readings occur; "new" read backwards is "removed"
    assert forward_channel in seen


def test_coarsen_keeps_the_shape_and_loses_detail() -> None:
    rng = np.random.default_rng(0)
    img = (rng.random((3, 64, 64)) * 255).astype(np.uint8)
    out = coarsen(img, 4.0)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert abs(float(out.mean()) - float(img.mean())) < 3  # area averaging keeps the brightness
    assert out.std() < 0.5 * img.std()  # and loses the pixel-scale texture
    np.testing.assert_array_equal(coarsen(img, 1.0), img)


def test_sampler_coarsens_a_share_of_the_samples() -> None:
    tiles = [fake_tile(0)]
    sharp = TrainingSampler(tiles, {"nochange": 1.0}, np.random.default_rng(2), coarsen_p=0.0)
    soft = TrainingSampler(tiles, {"nochange": 1.0}, np.random.default_rng(2), coarsen_p=1.0)

    def edge(images: np.ndarray) -> float:
        return float(np.abs(np.diff(images, axis=-1)).mean())

    assert edge(soft.batch(8, 64)[0]) < 0.8 * edge(sharp.batch(8, 64)[0])


def test_sampler_state_round_trip_draws_the_same_batches() -> None:
    a = TrainingSampler([fake_tile(0)], MIX, np.random.default_rng(9))
    a.batch(2, 64)
    state = a.state()
    expected = a.batch(2, 64)
    b = TrainingSampler([fake_tile(0)], MIX, np.random.default_rng(0))
    b.set_state(state)
    for x, y in zip(b.batch(2, 64), expected, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.counts == b.counts


def test_readers_on_the_fake_tree(fake_shared: Path) -> None:
    train_names, val_names = whu_split(fake_shared / "whu-cd")
    assert train_names == ["ucdscm_000001", "ucdscm_000002"] and val_names == ["lgpnet_test_1", "lgpnet_train_2"]
    whu = load_png_pairs(fake_shared / "whu-cd", "new", names=val_names)
    # 120 px at 0.3 m are 72 px at the network's 0.5 m
    assert [p.images.shape for p in whu] == [(2, 3, 72, 72)] * 2 and NATIVE_GSD_M == 0.5
    assert all(p.change.dtype == bool and 0 < p.change.mean() < 0.5 for p in whu)
    joplin = load_png_pairs(fake_shared / "xbd-joplin", "removed", label_dir="label_destroyed_or_major")
    assert joplin[0].kind == "removed" and joplin[0].images.shape == (2, 3, 106, 106)  # 0.55 m -> 0.5 m
    levir = load_levir(fake_shared / "levir-dev")
    assert [name for name, _, _ in levir] == ["train_1_0000_0000", "val_2_0000_0256"]


def _fake_train_settings(tmp_path: Path, **kw: object) -> TrainSettings:
    base = {
        "steps": 6,
        "crop": 64,
        "batch_size": 2,
        "arch_kwargs": {"widths": [4, 4, 8, 8, 8]},
        "checkpoint_every": 2,
        "val_every": 1000,
        "log_every": 1,
        "threads": 1,
        "warmup_steps": 1,
        "log_path": tmp_path / "log.jsonl",
    }
    return TrainSettings.model_validate({**base, **kw})


def test_a_stopped_and_resumed_run_equals_one_long_run(fake_shared: Path, tmp_path: Path) -> None:
    import json

    from pipeline.model.train import resume_path, train

    one = train(_fake_train_settings(tmp_path / "a"), tmp_path / "a" / "net.pt", data=fake_shared)
    assert one.steps == 6
    first = train(
        _fake_train_settings(tmp_path / "b", max_steps_this_run=4, keep_every=2),
        tmp_path / "b" / "net.pt",
        data=fake_shared,
    )
    assert first.steps == 4 and resume_path(tmp_path / "b" / "net.pt").is_file()
    at_4 = torch.load(tmp_path / "b" / "net.pt", weights_only=True)["state_dict"]
    second = train(
        _fake_train_settings(tmp_path / "b", keep_every=2), tmp_path / "b" / "net.pt", data=fake_shared, resume=True
    )
    assert second.steps == 6
    a = torch.load(tmp_path / "a" / "net.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "net.pt", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    # keep_every kept each candidate across the pause, as it was at its step; without it, none is kept
    kept = {p.name: torch.load(p, weights_only=True) for p in sorted((tmp_path / "b").glob("net.step*.pt"))}
    assert list(kept) == ["net.step00002.pt", "net.step00004.pt", "net.step00006.pt"]
    assert [c["meta"]["steps"] for c in kept.values()] == [2, 4, 6]
    assert all(torch.equal(v, kept["net.step00004.pt"]["state_dict"][k]) for k, v in at_4.items())
    assert all(torch.equal(v, kept["net.step00006.pt"]["state_dict"][k]) for k, v in b["state_dict"].items())
    assert not all(torch.equal(v, kept["net.step00002.pt"]["state_dict"][k]) for k, v in at_4.items())
    assert not list((tmp_path / "a").glob("net.step*.pt"))
    assert a["meta"]["native_gsd_m"] == 0.5 and b["meta"]["finished"]
    events = [json.loads(line)["event"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "pause" in events and "resume" in events and events[-1] == "end"
    losses_a = [
        json.loads(x)["loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines() if '"train"' in x
    ]
    losses_b = [
        json.loads(x)["loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines() if '"train"' in x
    ]
    assert losses_a == losses_b


def test_a_signal_pauses_the_run_with_its_state_and_resume_equals_one_long_run(
    fake_shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import os
    import signal

    import pipeline.model.train as train_module

    one = train_module.train(_fake_train_settings(tmp_path / "a"), tmp_path / "a" / "net.pt", data=fake_shared)
    real_step, calls = train_module.train_step, []

    def step_then_sigterm(*args: object, **kw: object) -> torch.Tensor:
        loss = real_step(*args, **kw)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 3:  # the signal lands in the middle of the run, as a kill would
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_module, "train_step", step_then_sigterm)
    out = tmp_path / "b" / "net.pt"
    stopped = train_module.train(_fake_train_settings(tmp_path / "b"), out, data=fake_shared)
    assert (stopped.steps, stopped.finished, stopped.signal) == (3, False, "SIGTERM")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the run's only
    assert torch.load(train_module.resume_path(out), weights_only=False)["step"] == 3
    monkeypatch.setattr(train_module, "train_step", real_step)
    resumed = train_module.train(_fake_train_settings(tmp_path / "b"), out, data=fake_shared, resume=True)
    assert resumed.steps == 6 and resumed.finished and resumed.signal is None
    a = torch.load(tmp_path / "a" / "net.pt", weights_only=True)["state_dict"]
    b = torch.load(out, weights_only=True)["state_dict"]
    assert one.steps == 6 and all(torch.equal(v, b[k]) for k, v in a.items())
    pause = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines() if '"pause"' in x]
    assert [(p["step"], p["signal"]) for p in pause] == [(3, "SIGTERM")]


def test_a_run_with_border_weights_trains_records_them_and_resumes_exactly(fake_shared: Path, tmp_path: Path) -> None:
    from pipeline.model.train import train

    kw = {"separation_weight": 10.0, "separation_sigma_px": 3.0}
    one = train(_fake_train_settings(tmp_path / "a", **kw), tmp_path / "a" / "net.pt", data=fake_shared)
    plain = train(_fake_train_settings(tmp_path / "p"), tmp_path / "p" / "net.pt", data=fake_shared)
    assert np.isfinite(one.final_loss) and one.final_loss != pytest.approx(plain.final_loss)
    train(_fake_train_settings(tmp_path / "b", max_steps_this_run=3, **kw), tmp_path / "b" / "net.pt", data=fake_shared)
    train(_fake_train_settings(tmp_path / "b", **kw), tmp_path / "b" / "net.pt", data=fake_shared, resume=True)
    a = torch.load(tmp_path / "a" / "net.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "net.pt", weights_only=True)
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert a["meta"]["train"]["separation_weight"] == 10.0 and a["meta"]["train"]["separation_sigma_px"] == 3.0


def test_resume_accepts_a_state_saved_before_later_fields_existed(fake_shared: Path, tmp_path: Path) -> None:
    import json

    from pipeline.model.train import resume_path, train

    train(_fake_train_settings(tmp_path, max_steps_this_run=2), tmp_path / "net.pt", data=fake_shared)
    path = resume_path(tmp_path / "net.pt")
    state = torch.load(path, weights_only=True)
    old = json.loads(state["settings"])
    del old["separation_weight"], old["separation_sigma_px"]  # as states saved before the fields were
    state["settings"] = json.dumps(old)
    torch.save(state, path)
    assert train(_fake_train_settings(tmp_path), tmp_path / "net.pt", data=fake_shared, resume=True).steps == 6
    torch.save(state, resume_path(tmp_path / "x.pt"))  # the old state ran without border weights
    with pytest.raises(ModelError, match=r"\['separation_weight'\] differ"):
        train(_fake_train_settings(tmp_path, separation_weight=5.0), tmp_path / "x.pt", data=fake_shared, resume=True)


def test_resume_refuses_changed_settings(fake_shared: Path, tmp_path: Path) -> None:
    from pipeline.model.train import train

    train(_fake_train_settings(tmp_path, max_steps_this_run=2), tmp_path / "net.pt", data=fake_shared)
    with pytest.raises(ModelError, match=r"\['lr'\] differ from the run being resumed"):
        train(_fake_train_settings(tmp_path, lr=0.5), tmp_path / "net.pt", data=fake_shared, resume=True)
    with pytest.raises(ModelError, match="no training state to resume"):
        train(_fake_train_settings(tmp_path), tmp_path / "other.pt", data=fake_shared, resume=True)


def test_the_train_command_says_when_it_paused(fake_shared: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    sets = {
        "paths.shared": str(fake_shared),
        "train.steps": "6",
        "train.max_steps_this_run": "2",
        "train.crop": "64",
        "train.batch_size": "2",
        "train.arch_kwargs": "{widths: [4, 4, 8, 8, 8]}",
        "train.threads": "1",
        "train.val_every": "1000",
        "train.log_path": str(tmp_path / "log.jsonl"),
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = tmp_path / "net.pt"
    res = CliRunner().invoke(cli, [*args, "train", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"paused at step 2, state saved -> {out}; continue with --resume" in res.output
    resume = [*args, "--set", "train.max_steps_this_run=null", "train", "--out", str(out), "--resume"]
    res = CliRunner().invoke(cli, resume)
    assert res.exit_code == 0 and f"trained scarnet for 6 steps -> {out}" in res.output


def test_training_grows_a_narrower_checkpoint_and_refuses_a_wider_one(
    fake_shared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from pipeline.model.train import train

    small = tmp_path / "small" / "net.pt"
    train(_fake_train_settings(tmp_path / "small", steps=2), small, data=fake_shared)
    wide = {"widths": [4, 8, 8, 16, 16]}
    with caplog.at_level(logging.INFO, logger="pipeline.model.train"):
        grown = train(
            _fake_train_settings(tmp_path / "big", steps=2, init_from=small, arch_kwargs=wide),
            tmp_path / "big" / "net.pt",
            data=fake_shared,
        )
    assert grown.steps == 2 and "grew" in caplog.text and "[4, 4, 8, 8, 8] to [4, 8, 8, 16, 16]" in caplog.text
    big = torch.load(tmp_path / "big" / "net.pt", weights_only=True)
    assert big["kwargs"]["widths"] == [4, 8, 8, 16, 16] and big["state_dict"]["head.weight"].shape == (1, 4, 1, 1)
    with pytest.raises(ModelError, match="at least the checkpoint's"):
        train(
            _fake_train_settings(tmp_path / "narrow", steps=2, init_from=tmp_path / "big" / "net.pt"),
            tmp_path / "narrow" / "net.pt",
            data=fake_shared,
        )
