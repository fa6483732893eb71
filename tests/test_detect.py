"""Detection: seam-free blending, nodata, COG layout, CVA, device checks, dask equivalence."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline import detect as det
from pipeline.config import DetectSettings, VectorizeSettings
from pipeline.errors import ConfigError, CRSMismatchError, ModelError
from pipeline.formats import PROB_NODATA, PROB_SCALE, encode_probabilities, probability_tags
from pipeline.nets.blocks import unchanged_where_invalid
from pipeline.nets.device import resolve_device
from pipeline.predictors import CheckpointPredictor, CvaPredictor, ModulePredictor, make_predictor
from pipeline.tiling import make_grid, write_tile_index

CRS_CODE = "EPSG:4551"
TRANSFORM = Affine(0.5, 0, 500000.0, 0, -0.5, 4862000.0)


class NpyPair:
    """Fake ``AlignedPair``: arrays in ``pair_dir`` (images.npy (2, c, H, W) float32, valid.npy, pair.json)."""

    def __init__(self, pair_dir: Path):
        meta = json.loads((pair_dir / "pair.json").read_text())
        self.images = np.load(pair_dir / "images.npy", mmap_mode="r")
        self.valid = np.load(pair_dir / "valid.npy", mmap_mode="r")
        self.crs = CRS.from_user_input(meta["crs"])
        self.transform = Affine(*meta["transform"])
        self.count = int(self.images.shape[1])
        self.height, self.width = (int(v) for v in self.images.shape[-2:])
        self.res = (abs(self.transform.a), abs(self.transform.e))
        self.month, self.prev = meta["month"], meta["prev"]

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = window.toslices()
        return np.array(self.images[:, :, rows, cols], dtype=np.float32), np.array(self.valid[rows, cols])

    def read_valid(self, window: Window) -> np.ndarray:
        rows, cols = window.toslices()
        return np.array(self.valid[rows, cols])


@contextmanager
def open_npy_pair(pair_dir: Path) -> Iterator[NpyPair]:
    yield NpyPair(Path(pair_dir))


class ConvNet(torch.nn.Module):
    """Deterministic fake change network: two 3x3 convs (receptive field 5 px), logits (b, 2, h, w)."""

    def __init__(self, bands: int = 3):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.conv1 = torch.nn.Conv2d(2 * bands, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 2, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        return 3.0 * self.conv2(torch.tanh(self.conv1(x.reshape(b, t * c, h, w))))


def make_pair(tmp: Path, *, height: int = 200, width: int = 232, seed: int = 0, invalid: bool = True) -> Path:
    """A smooth random pair with a bright new block; optionally an invalid left strip and corner."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    prev = np.stack([gaussian_filter(rng.random((height, width)), 2) for _ in range(3)])
    prev = (prev - prev.min()) / (prev.max() - prev.min())
    curr = prev.copy()
    curr[:, 60:100, 120:180] = 0.95
    images = np.stack([prev, curr]).astype(np.float32)
    valid = np.ones((height, width), bool)
    if invalid:
        valid[:, :20] = False
        valid[-30:, -40:] = False
    pair_dir = tmp / "pair"
    pair_dir.mkdir(parents=True, exist_ok=True)
    np.save(pair_dir / "images.npy", images)
    np.save(pair_dir / "valid.npy", valid)
    meta = {"crs": CRS_CODE, "transform": list(TRANSFORM)[:6], "month": "2026-03", "prev": "2026-02"}
    (pair_dir / "pair.json").write_text(json.dumps(meta))
    return pair_dir


def tile_index(tmp: Path, pair_dir: Path, size: int, overlap: int) -> Path:
    pair = NpyPair(pair_dir)
    tiles = make_grid(pair.width, pair.height, pair.transform, size=size, overlap=overlap)
    return write_tile_index(tiles, CRS_CODE, tmp / f"tiles_{size}_{overlap}.parquet")


def run(tmp: Path, pair_dir: Path, size: int, overlap: int, **kw: Any) -> tuple[np.ndarray, det.DetectSummary]:
    settings = kw.pop("settings", DetectSettings(method="cnn", device="cpu", batch_size=3, workers=2))
    predictor = kw.pop("predictor", None) or ModulePredictor(ConvNet(), device="cpu")
    out = tmp / f"prob_{size}_{overlap}_{kw.get('scheduler') is not None}.tif"
    summary = det.detect_pair(
        pair_dir,
        tile_index(tmp, pair_dir, size, overlap),
        out,
        settings,
        overlap=overlap,
        predictor=predictor,
        opener=open_npy_pair,
        **kw,
    )
    with rasterio.open(out) as ds:
        return ds.read(), summary


def test_blend_ramp_smooth_and_positive() -> None:
    ramp = det.blend_ramp(64, 16)
    assert ramp.min() > 0 and ramp[0] < 1e-3
    assert (np.diff(ramp[:16]) > 0).all()
    np.testing.assert_allclose(ramp[:16], ramp[-16:][::-1])
    assert (ramp[16:-16] == 1).all()
    assert (det.blend_ramp(32, 0) == 1).all()
    with pytest.raises(ValueError, match="half the tile size"):
        det.blend_ramp(32, 17)


@pytest.mark.parametrize(("size", "overlap"), [(64, 16), (96, 24), (80, 32)])
def test_tiled_equals_whole_away_from_border(tmp_path: Path, size: int, overlap: int) -> None:
    pair_dir = make_pair(tmp_path, invalid=False)
    whole, _ = run(tmp_path, pair_dir, 256, 0)  # one tile covers the 232 x 200 raster
    tiled, summary = run(tmp_path, pair_dir, size, overlap)
    assert summary.n_tiles > 6
    m = 8
    a = whole[:, m:-m, m:-m].astype(int)
    b = tiled[:, m:-m, m:-m].astype(int)
    assert (a != PROB_NODATA).all() and (b != PROB_NODATA).all()
    diff = np.abs(a - b)
    assert diff.max() <= 2, f"max diff {diff.max()} / 254"
    assert diff.mean() < 0.05
    assert a.std() > 20  # the fake model is not trivially constant


def test_tiles_without_blending_show_seams(tmp_path: Path) -> None:
    """Control: cropping tiles without weights would differ from the whole prediction at tile edges."""
    pair_dir = make_pair(tmp_path, invalid=False)
    whole, _ = run(tmp_path, pair_dir, 256, 0)
    hard, _ = run(tmp_path, pair_dir, 64, 0)  # no overlap: edge pixels see zero padding
    assert np.abs(whole[:, 8:-8, 8:-8].astype(int) - hard[:, 8:-8, 8:-8]).max() > 5


def test_nodata_outside_valid_area_and_cog_layout(tmp_path: Path) -> None:
    pair_dir = make_pair(tmp_path)
    probs, summary = run(tmp_path, pair_dir, 64, 16)
    valid = np.load(pair_dir / "valid.npy")
    assert (probs[:, ~valid] == PROB_NODATA).all()
    assert (probs[:, valid] <= PROB_SCALE).all()
    assert summary.out_path.exists() and summary.tiles_per_s > 0 and summary.km2_per_hour > 0
    assert summary.device == "cpu"
    with rasterio.open(summary.out_path) as ds:
        assert ds.driver == "GTiff"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.count == 2 and ds.dtypes == ("uint8", "uint8")
        assert ds.descriptions == ("p_new", "p_removed")
        assert ds.nodata == PROB_NODATA
        assert ds.crs == CRS.from_user_input(CRS_CODE)
        assert ds.transform == TRANSFORM
        assert ds.overviews(1) and ds.overviews(2)
        assert ds.profile["tiled"]
        assert ds.tags()["month"] == "2026-03"
        assert "object_threshold" not in ds.tags()  # an uncalibrated predictor keeps every seeded object
    assert not list(tmp_path.glob(".*part*"))  # temporaries cleaned up


def test_missing_tiles_come_out_as_nodata(tmp_path: Path) -> None:
    pair_dir = make_pair(tmp_path, invalid=False)
    pair = NpyPair(pair_dir)
    tiles = make_grid(pair.width, pair.height, pair.transform, size=64, overlap=16)
    kept = [t for t in tiles if t.row != 1]
    index = write_tile_index(kept, CRS_CODE, tmp_path / "partial.parquet")
    out = tmp_path / "partial.tif"
    settings = DetectSettings(device="cpu", batch_size=2)
    det.detect_pair(
        pair_dir, index, out, settings, overlap=16, predictor=ModulePredictor(ConvNet()), opener=open_npy_pair
    )
    with rasterio.open(out) as ds:
        probs = ds.read()
    row1 = next(t for t in tiles if t.row == 1)
    gap = slice(row1.row_off + 16, row1.row_off + row1.height - 16)  # rows only the dropped tiles covered
    assert (probs[:, gap] == PROB_NODATA).all()
    assert (probs[:, :32] != PROB_NODATA).all()


def test_strip_blender_rejects_out_of_order_tiles() -> None:
    blender = det.StripBlender(64, 600, lambda *a: None, block=64)
    tiles = make_grid(64, 600, TRANSFORM, size=200, overlap=20)
    ones = np.ones((2, 200, 64), np.float32)
    blender.add(tiles[2], ones, np.ones((200, 64), bool), np.ones((200, 64), np.float32))
    with pytest.raises(ValueError, match="above flushed row"):
        blender.add(tiles[0], ones, np.ones((200, 64), bool), np.ones((200, 64), np.float32))


def test_strip_blender_memory_is_bounded_by_the_strip() -> None:
    height, width, size = 3000, 40, 128
    seen: list[int] = []
    blender = det.StripBlender(width, height, lambda r, p, ok: seen.append(r), block=64)
    peak = 0
    for tile in make_grid(width, height, TRANSFORM, size=size, overlap=32):
        blender.add(
            tile,
            np.full((2, tile.height, tile.width), 0.5, np.float32),
            np.ones((tile.height, tile.width), bool),
            np.ones((tile.height, tile.width), np.float32),
        )
        peak = max(peak, blender.wsum.shape[0])
    blender.close()
    assert peak <= size + 64
    assert seen[0] == 0 and seen == sorted(seen) and blender.top == height
    assert all(r % 64 == 0 for r in seen)


def test_strip_blender_flushes_the_same_values_as_a_whole_raster_blend() -> None:
    # Several flushes (block 64 on a 700-row raster): every flushed row must equal the blend computed
    # on the whole raster at once, including rows carried over between flushes.
    height, width, size, overlap = 700, 90, 128, 32
    rng = np.random.default_rng(3)
    tiles = make_grid(width, height, TRANSFORM, size=size, overlap=overlap)
    out = np.full((2, height, width), np.nan, np.float32)
    ok_out = np.zeros((height, width), bool)

    def sink(row: int, probs: np.ndarray, ok: np.ndarray) -> None:
        out[:, row : row + probs.shape[1]] = probs
        ok_out[row : row + probs.shape[1]] = ok

    blender = det.StripBlender(width, height, sink, block=64)
    acc = np.zeros((2, height, width))
    wsum = np.zeros((height, width))
    for tile in tiles:
        probs = rng.random((2, tile.height, tile.width)).astype(np.float32)
        weight = (np.outer(det.blend_ramp(size, overlap), det.blend_ramp(size, overlap)))[: tile.height, : tile.width]
        weight = weight.astype(np.float32)
        blender.add(tile, probs, np.ones((tile.height, tile.width), bool), weight)
        rows, cols = slice(tile.row_off, tile.row_off + tile.height), slice(tile.col_off, tile.col_off + tile.width)
        acc[:, rows, cols] += probs * weight
        wsum[rows, cols] += weight
    blender.close()
    assert ok_out.all()
    np.testing.assert_allclose(out, acc / wsum, rtol=1e-5, atol=1e-6)


def test_cva_predictor_flags_the_new_block(tmp_path: Path) -> None:
    pair_dir = make_pair(tmp_path, invalid=False)
    settings = DetectSettings(method="cva", device="cpu", batch_size=4, cva_sample_tiles=8)
    predictor = make_predictor(settings)
    assert isinstance(predictor, CvaPredictor)
    probs, _ = run(tmp_path, pair_dir, 64, 16, settings=settings, predictor=predictor)
    assert predictor.magnitude_threshold is not None and predictor.magnitude_threshold > 0
    with rasterio.open(tmp_path / "prob_64_16_False.tif") as ds:
        # the probability threshold (p = 0.5 at the Otsu magnitude), not the magnitude itself: vectorize seeds at it
        assert ds.tags()["threshold"] == "0.5000" and "object_threshold" not in ds.tags()
    inside = probs[0, 65:95, 125:175].astype(float)
    outside = probs[0, 150:190, 30:100].astype(float)
    assert inside.mean() > 200 and outside.mean() < 60


def test_cva_needs_fit() -> None:
    with pytest.raises(ModelError, match="fit"):
        CvaPredictor()(np.zeros((1, 2, 3, 8, 8), np.float32))


def test_module_predictor_checks_bands(tmp_path: Path) -> None:
    pair_dir = make_pair(tmp_path, invalid=False)
    with pytest.raises(ModelError, match="expects 4 bands but the pair has 3"):
        run(tmp_path, pair_dir, 64, 16, predictor=ModulePredictor(ConvNet(), device="cpu", in_channels=4))


def test_missing_checkpoint_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"checkpoint not found; set detect.model"):
        make_predictor(DetectSettings(model=tmp_path / "nope.pt"))


def test_cuda_without_cuda_is_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown"):
        resolve_device("tpu")
    pair_dir = make_pair(tmp_path, invalid=False)
    out = tmp_path / "never.tif"
    with pytest.raises(ConfigError, match="no CUDA device"):
        det.detect_pair(
            pair_dir,
            tile_index(tmp_path, pair_dir, 64, 16),
            out,
            DetectSettings(device="cuda"),
            overlap=16,
            predictor=ModulePredictor(ConvNet(), device="cuda"),
            opener=open_npy_pair,
        )
    assert not out.exists()


def test_crs_mismatch_between_index_and_pair(tmp_path: Path) -> None:
    pair_dir = make_pair(tmp_path, invalid=False)
    pair = NpyPair(pair_dir)
    tiles = make_grid(pair.width, pair.height, pair.transform, size=64, overlap=16)
    index = write_tile_index(tiles, "EPSG:32651", tmp_path / "other.parquet")
    with pytest.raises(CRSMismatchError, match="rerun 'scarwatch tile'"):
        det.detect_pair(
            pair_dir,
            index,
            tmp_path / "x.tif",
            DetectSettings(device="cpu"),
            overlap=16,
            predictor=ModulePredictor(ConvNet()),
            opener=open_npy_pair,
        )


def test_bad_scheduler_address(tmp_path: Path) -> None:
    pair_dir = make_pair(tmp_path, invalid=False)
    with pytest.raises(ConfigError, match="not a dask address"):
        run(tmp_path, pair_dir, 64, 16, scheduler="localhost")


def test_predictor_pickles_without_runtime_state() -> None:
    import pickle

    predictor = ModulePredictor(ConvNet(), device="cpu")
    predictor.setup()
    clone = pickle.loads(pickle.dumps(predictor))
    assert clone._device is None
    assert clone.setup() == "cpu"
    x = np.random.default_rng(0).random((1, 2, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(clone(x), predictor(x), atol=1e-6)


@pytest.mark.slow
def test_local_cluster_matches_single_process(tmp_path: Path) -> None:
    import cloudpickle
    from distributed import LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module
    try:
        pair_dir = make_pair(tmp_path)
        local, _ = run(tmp_path, pair_dir, 64, 16)
        with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
            remote, summary = run(tmp_path, pair_dir, 64, 16, scheduler=cluster.scheduler_address)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert "dask" in summary.device and "cpu" in summary.device
    assert np.abs(local.astype(int) - remote.astype(int)).max() <= 1
    assert replace(summary, seconds=0).n_tiles == 20


def test_checkpoint_predictor_runs_a_scarwatch_checkpoint(tmp_path: Path) -> None:
    checkpoint = pytest.importorskip("pipeline.nets.checkpoint")
    from pipeline.nets import create_model

    torch.manual_seed(0)
    path = checkpoint.save_checkpoint(
        tmp_path / "net.pt",
        create_model("fc_siam_diff"),
        "fc_siam_diff",
        3,
        meta={"threshold": 0.8, "object_threshold": 0.85},
    )
    pair_dir = make_pair(tmp_path, height=120, width=136)
    settings = DetectSettings(method="cnn", model=path, device="cpu", batch_size=2)
    predictor = make_predictor(settings)
    assert isinstance(predictor, CheckpointPredictor)
    probs, summary = run(tmp_path, pair_dir, 128, 16, settings=settings, predictor=predictor)
    assert summary.device == "cpu" and summary.n_tiles == 2 and predictor.in_channels == 3
    with rasterio.open(summary.out_path) as ds:
        assert ds.tags()["threshold"] == "0.8000"  # the calibrated thresholds travel to vectorize
        assert ds.tags()["object_threshold"] == "0.8500"
    valid = np.load(pair_dir / "valid.npy")
    assert (probs[:, ~valid] == PROB_NODATA).all() and (probs[:, valid] <= PROB_SCALE).all()
    x = np.random.default_rng(0).random((1, 2, 3, 32, 32), dtype=np.float32)
    reference = checkpoint.ChangeModel.load(path, precision=settings.precision).predict(x)  # the same precision
    np.testing.assert_allclose(predictor(predictor.prepare(x)), reference, atol=1e-5)


def test_probability_encoding_is_what_vectorize_reads(tmp_path: Path) -> None:
    from pipeline.formats import TAG_OBJECT_THRESHOLD, TAG_THRESHOLD, decode_probabilities, tag_float
    from pipeline.vectorize import resolve_thresholds

    p = np.linspace(0, 1, 509, dtype=np.float32).reshape(1, 1, 509).repeat(2, axis=0)
    ok = np.ones((1, 509), bool)
    ok[0, :3] = False
    stored = encode_probabilities(p, ok)
    assert stored.dtype == np.uint8 and (stored[:, 0, :3] == PROB_NODATA).all() and stored.max() == PROB_NODATA
    back = decode_probabilities(stored)
    assert (back[:, 0, :3] == 0).all()
    assert np.abs(back[:, :, 3:] - p[:, :, 3:]).max() <= 0.5 / PROB_SCALE + 1e-7
    tags = probability_tags("2026-03", "cnn", 0.8, None)
    assert TAG_OBJECT_THRESHOLD not in tags and tag_float(tags, TAG_THRESHOLD, 0.6) == 0.8
    settings = resolve_thresholds(VectorizeSettings(), probability_tags("2026-03", "cnn", 0.7, 0.85))
    assert (settings.high, settings.min_p_mean) == (0.7, 0.85)


def test_workers_zero_reads_in_the_model_thread_and_writes_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair_dir = make_pair(tmp_path)
    threaded, _ = run(tmp_path, pair_dir, 64, 16)
    started: list[int] = []
    monkeypatch.setattr(det, "ThreadPoolExecutor", lambda *a, **k: started.append(1))  # must not be called
    inline, summary = run(tmp_path, pair_dir, 64, 16, settings=DetectSettings(device="cpu", batch_size=3, workers=0))
    assert started == [] and summary.n_tiles == 20
    np.testing.assert_array_equal(inline, threaded)


def test_batches_without_a_valid_pixel_skip_the_network(tmp_path: Path) -> None:
    pair_dir = make_pair(tmp_path, height=64, width=192, invalid=False)
    valid = np.load(pair_dir / "valid.npy")
    valid[:, :128] = False  # the first two 64 px tiles (one batch of 2) have no valid pixel
    np.save(pair_dir / "valid.npy", valid)
    calls: list[int] = []

    class Counting(ModulePredictor):
        def __call__(self, prepared: Any) -> np.ndarray:
            calls.append(int(prepared.shape[0]))
            return super().__call__(prepared)

    settings = DetectSettings(device="cpu", batch_size=2, workers=0)
    probs, summary = run(tmp_path, pair_dir, 64, 0, settings=settings, predictor=Counting(ConvNet(), device="cpu"))
    assert summary.n_tiles == 3 and calls == [1]  # only the last batch (one tile) ran
    assert (probs[:, :, :128] == PROB_NODATA).all() and (probs[:, :, 128:] <= PROB_SCALE).all()


def _pair_with_empty_prev_rows(tmp: Path, fill: np.ndarray | float) -> Path:
    """make_pair's pair whose last 6 rows are missing in ``prev`` (read as ``fill``) and so not valid."""
    pair_dir = make_pair(tmp, height=96, width=128, invalid=False)
    images, valid = np.load(pair_dir / "images.npy"), np.load(pair_dir / "valid.npy")
    images[0, :, -6:, :] = fill
    valid[-6:, :] = False
    np.save(pair_dir / "images.npy", images)
    np.save(pair_dir / "valid.npy", valid)
    return pair_dir


def test_what_an_epoch_lacks_does_not_spill_change_into_valid_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prev's empty border rows (black, or anything else) leave the valid pixels' probabilities as they are."""
    noise = np.random.default_rng(3).random((3, 6, 128)).astype(np.float32)
    settings = DetectSettings(device="cpu", batch_size=2, workers=0)
    black = run(tmp_path / "black", _pair_with_empty_prev_rows(tmp_path / "black", 0.0), 64, 16, settings=settings)[0]
    other = run(tmp_path / "noise", _pair_with_empty_prev_rows(tmp_path / "noise", noise), 64, 16, settings=settings)[0]
    assert (black[:, -6:] == PROB_NODATA).all() and (black[:, :-6] <= PROB_SCALE).all()
    np.testing.assert_array_equal(black, other)
    # without the rule the network's receptive field (5 px here) carries the black rows into the valid ones
    monkeypatch.setattr(det, "unchanged_where_invalid", lambda images, valid: images)
    raw = run(tmp_path / "raw", _pair_with_empty_prev_rows(tmp_path / "raw", 0.0), 64, 16, settings=settings)[0]
    spilled = np.abs(raw[:, -8:-6].astype(int) - black[:, -8:-6].astype(int))
    assert spilled.max() > 10 and (raw[:, :-10] == black[:, :-10]).all()


def test_unchanged_where_invalid_copies_curr_into_prev_only_where_invalid() -> None:
    images = np.stack([np.zeros((3, 4, 5), np.float32), np.ones((3, 4, 5), np.float32)])
    valid = np.ones((4, 5), bool)
    valid[0, :2] = valid[3, 4] = False
    out = unchanged_where_invalid(images, valid)
    assert out is images
    np.testing.assert_array_equal(out[0], np.where(valid, 0.0, 1.0)[None].repeat(3, 0))
    np.testing.assert_array_equal(out[1], 1.0)


def test_bf16_agrees_with_fp32_on_the_shipped_checkpoint() -> None:
    """bf16 autocast on the CPU: thresholded masks of the shipped network agree with fp32 to 1 pixel in 10^3."""
    shipped = Path(__file__).resolve().parents[1] / "models" / "scarnet.pt"
    sys.path.insert(0, str(Path(__file__).with_name("data")))
    from make_pinned import pinned_input

    x = pinned_input()[None].astype(np.float32) / 255.0
    fp32 = CheckpointPredictor(shipped, device="cpu")
    bf16 = CheckpointPredictor(shipped, device="cpu", precision="bf16")
    p32, p16 = fp32(x), bf16(x)
    t = fp32.threshold
    assert np.abs(p32 - p16).max() < 0.1
    assert np.mean((p32 >= t) != (p16 >= t)) <= 1e-3 and (p32 >= t).any()


def test_compile_failure_falls_back_to_eager_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(module: torch.nn.Module, **kw: Any) -> Any:
        def call(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("inductor: no C++ compiler\nmore detail")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    predictor = ModulePredictor(ConvNet(), device="cpu", compile=True)
    eager = ModulePredictor(ConvNet(), device="cpu")
    x = np.random.default_rng(0).random((2, 2, 3, 16, 16), dtype=np.float32)
    with caplog.at_level("WARNING", logger="pipeline.predictors"):
        out = predictor(x)
    np.testing.assert_allclose(out, eager(x), atol=1e-6)
    assert "torch.compile failed (inductor: no C++ compiler)" in caplog.text
    assert predictor._compiled is None


def test_compiled_predictor_pads_a_short_batch_to_the_compiled_size(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[int] = []

    def recording(module: torch.nn.Module, **kw: Any) -> Any:
        assert kw["options"] == {"freezing": True} and kw["dynamic"] is False

        def call(x: torch.Tensor) -> torch.Tensor:
            shapes.append(int(x.shape[0]))
            return module(x)  # type: ignore[no-any-return]

        return call

    monkeypatch.setattr(torch, "compile", recording)
    predictor = ModulePredictor(ConvNet(), device="cpu", compile=True)
    x = np.random.default_rng(0).random((3, 2, 3, 16, 16), dtype=np.float32)
    full, short = predictor(x), predictor(x[:1])
    assert shapes == [3, 3] and short.shape == (1, 2, 16, 16)
    np.testing.assert_allclose(short, full[:1], atol=1e-6)


def test_compile_auto_follows_the_tile_count_and_the_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """detect.compile auto: compiles a run of at least compile_min_tiles tiles, stays eager below or without g++."""
    from pipeline.errors import DeviceError
    from pipeline.nets import device as dev

    cpu = torch.device("cpu")
    assert dev.resolve_compile(True, cpu, 1, 1000) == (True, "detect.compile is true")
    assert dev.resolve_compile(False, cpu, 10**6, 1000)[0] is False
    assert dev.resolve_compile("auto", cpu, 999, 1000) == (False, "999 tiles, fewer than detect.compile_min_tiles 1000")
    assert dev.resolve_compile("auto", torch.device("cuda"), 10**6, 1000)[0] is False
    with pytest.raises(DeviceError, match="use true, false or auto"):
        dev.resolve_compile("yes", cpu, 1, 1)  # type: ignore[arg-type]
    monkeypatch.setattr(dev, "inductor_compiler", lambda: "/usr/bin/g++")
    assert dev.resolve_compile("auto", cpu, 1000, 1000)[0] is True
    monkeypatch.setattr(dev, "inductor_compiler", lambda: None)
    ok, why = dev.resolve_compile("auto", cpu, 1000, 1000)
    assert ok is False and "no C++ compiler" in why

    monkeypatch.setattr(dev, "inductor_compiler", lambda: "/usr/bin/g++")
    compiled: list[int] = []

    def recording(module: torch.nn.Module, **kw: Any) -> Any:
        def call(x: torch.Tensor) -> torch.Tensor:
            compiled.append(int(x.shape[0]))
            return module(x)  # type: ignore[no-any-return]

        return call

    monkeypatch.setattr(torch, "compile", recording)
    x = np.random.default_rng(0).random((2, 2, 3, 16, 16), dtype=np.float32)
    few = ModulePredictor(ConvNet(), device="cpu", compile="auto", compile_min_tiles=3)
    few.fit(None, [None, None])  # type: ignore[arg-type]
    few(x)
    assert few.compile is False and compiled == []
    many = ModulePredictor(ConvNet(), device="cpu", compile="auto", compile_min_tiles=3)
    many.fit(None, [None] * 3)  # type: ignore[arg-type]
    many(x)
    assert many.compile is True and compiled == [2]
    unfitted = ModulePredictor(ConvNet(), device="cpu", compile="auto")
    unfitted(x)  # calibrate and evaluate call the predictor without fit: auto runs eager
    assert compiled == [2]
    assert DetectSettings().compile == "auto" and DetectSettings(compile=True).compile is True
