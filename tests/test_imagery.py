"""Aligning two epochs of small synthetic sheets: grid, masks, shift, histograms, errors."""

from __future__ import annotations

import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import textured, write_tif
from rasterio.enums import ColorInterp, Resampling
from rasterio.transform import array_bounds
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window

from pipeline.config import AlignSettings
from pipeline.errors import (
    BandMismatchError,
    ConfigError,
    CorruptFileError,
    CRSError,
    CRSMismatchError,
    InputError,
    MissingInputError,
    NoOverlapError,
)
from pipeline.imagery import AlignSummary, align_pair
from pipeline.pair import AlignedPair
from pipeline.tiling import build_tiles

X0, Y0, RES = 500000.0, 4862000.0, 0.5
T = Affine(RES, 0, X0, 0, -RES, Y0)
MONTHS = {"month": "2026-02", "prev": "2026-01"}
NO_COREG = AlignSettings(coregister=False, normalize=False)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A 640 x 640 textured RGB scene; epochs are crops and shifts of it."""
    return textured((640, 640), seed=7)


def _align(tmp: Path, settings: AlignSettings = NO_COREG) -> AlignSummary:
    return align_pair(tmp / "prev", tmp / "curr", tmp / "out", settings, **MONTHS)


def _two_sheets(folder: Path, img: np.ndarray, transform: Affine = T, **kw: object) -> None:
    half = img.shape[2] // 2
    write_tif(folder / "a.tif", img[:, :, :half], transform=transform, **kw)  # type: ignore[arg-type]
    write_tif(folder / "b.tif", img[:, :, half:], transform=transform * Affine.translation(half, 0), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- grid


def test_grid_mosaic_and_exact_values(tmp_path: Path, scene: np.ndarray) -> None:
    curr = scene[:, :512, :512]
    _two_sheets(tmp_path / "curr", curr)
    # prev covers 10 px more to the east and starts 20 px lower: the grid is the intersection.
    write_tif(tmp_path / "prev" / "p.tif", scene[:, 20:532, 10:522], transform=T * Affine.translation(10, 20))
    s = _align(tmp_path)
    assert (s.width, s.height, s.res, s.crs) == (502, 492, 0.5, "EPSG:4551")
    assert s.shift_px == (0.0, 0.0)
    assert s.valid_fraction == 1.0
    with AlignedPair.open(tmp_path / "out") as pair:
        assert pair.transform == Affine(0.5, 0, X0 + 5.0, 0, -0.5, Y0 - 10.0)
        assert (pair.count, pair.month, pair.prev) == (3, "2026-02", "2026-01")
        # A window across the seam of the two current sheets (grid col 246 = sheet col 256).
        images, valid = pair.read(Window(200, 100, 100, 50))
    assert images.shape == (2, 3, 50, 100) and images.dtype == np.float32
    assert valid.all()
    expected = scene[:, 120:170, 210:310].astype(np.float32) / 255
    np.testing.assert_allclose(images[1], expected, atol=1e-6)
    np.testing.assert_allclose(images[0], expected, atol=1e-6)


def test_moved_checkout_still_reads_its_pair(tmp_path: Path, scene: np.ndarray) -> None:
    # pair.json keeps sheet paths relative to the pair, so a project moved (or cloned) elsewhere still works.
    _two_sheets(tmp_path / "a" / "curr", scene[:, :256, :256])
    _two_sheets(tmp_path / "a" / "prev", scene[:, :256, :256])
    _align(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    with AlignedPair.open(tmp_path / "b" / "out") as pair:
        images, valid = pair.read(Window(0, 0, 64, 64))
    assert valid.all()
    np.testing.assert_allclose(images[1], scene[:, :64, :64].astype(np.float32) / 255, atol=1e-6)


def test_sheet_paths_in_pair_json_are_confined_to_the_data_folder(tmp_path: Path, scene: np.ndarray) -> None:
    # pair.json is a file on disk: a sheet path edited (or planted) to lead out of the data folder is refused.
    _two_sheets(tmp_path / "raw" / "curr", scene[:, :256, :256])
    _two_sheets(tmp_path / "raw" / "prev", scene[:, :256, :256])
    align_pair(tmp_path / "raw" / "prev", tmp_path / "raw" / "curr", tmp_path / "out", NO_COREG, **MONTHS)
    with AlignedPair.open(tmp_path / "out", roots=[tmp_path / "raw"]) as pair:  # the sheets lie in raw/
        assert pair.read(Window(0, 0, 8, 8))[1].all()
    meta_path = tmp_path / "out" / "pair.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    outside = tmp_path / "elsewhere" / "a.tif"
    _two_sheets(outside.parent, scene[:, :256, :256])
    for planted in (str(outside), "../elsewhere/a.tif", "../raw/../elsewhere/a.tif"):
        meta["epochs"]["prev"]["sheets"][0]["path"] = planted
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
        with pytest.raises(
            CorruptFileError, match=r"pair\.json: the prev sheet .*elsewhere.* lies outside the data folder"
        ):
            AlignedPair.open(tmp_path / "out", roots=[tmp_path / "raw"])


def test_target_crs_and_resolution_params(tmp_path: Path, scene: np.ndarray) -> None:
    write_tif(tmp_path / "curr" / "c.tif", scene[:, :400, :400])
    write_tif(tmp_path / "prev" / "p.tif", scene[:, :400, :400])
    settings = AlignSettings(target_crs="EPSG:4547", resolution=1.0, coregister=False)  # type: ignore[call-arg]
    s = _align(tmp_path, settings)
    assert s.crs == "EPSG:4547" and s.res == 1.0
    # 200 m of Gauss-Kruger CM 126E seen from CM 114E is rotated: the bbox grows to about 226 m.
    assert 220 <= s.width <= 232 and 220 <= s.height <= 232
    with AlignedPair.open(tmp_path / "out") as pair:
        assert pair.transform.c % 1.0 == 0 and pair.transform.f % 1.0 == 0  # snapped to whole pixels
        assert pair.crs.to_epsg() == 4547
        images, valid = pair.read(Window(0, 0, s.width, s.height))
    assert 0.6 < valid.mean() < 0.95  # the rotated footprint inside its bbox
    np.testing.assert_allclose(images[0][:, valid], images[1][:, valid], atol=1e-6)


def test_a_coarse_delivery_is_resampled_to_the_network_pixel(tmp_path: Path, scene: np.ndarray) -> None:
    # a 2 m satellite-like delivery, a network trained at 0.5 m: the grid follows the network
    coarse = Affine(2.0, 0, X0, 0, -2.0, Y0)
    write_tif(tmp_path / "curr" / "c.tif", scene[:, :100, :100], transform=coarse)
    write_tif(tmp_path / "prev" / "p.tif", scene[:, :100, :100], transform=coarse)
    s = align_pair(tmp_path / "prev", tmp_path / "curr", tmp_path / "out", NO_COREG, **MONTHS, model_res=0.5)
    assert (s.res, s.width, s.height) == (0.5, 400, 400)
    meta = json.loads((tmp_path / "out" / "pair.json").read_text())
    assert meta["delivery_res"] == {"prev": 2.0, "curr": 2.0} and meta["resampling"] == "bilinear"
    qa = json.loads((tmp_path / "out" / "qa.json").read_text())
    assert qa["res"] == 0.5 and qa["delivery_res"]["curr"] == 2.0
    with AlignedPair.open(tmp_path / "out") as pair:
        images, _ = pair.read(Window(0, 0, 400, 400))
    # each 2 m pixel covers 4 x 4 grid pixels: the centre of each block holds the delivered value
    np.testing.assert_allclose(images[1][:, 2::4, 2::4][:, 1:-1, 1:-1], scene[:, 1:99, 1:99] / 255, atol=0.02)
    # "delivery" keeps the delivered pixel whatever the network
    d = AlignSettings(coregister=False, normalize=False, resolution="delivery")  # type: ignore[call-arg]
    s = align_pair(tmp_path / "prev", tmp_path / "curr", tmp_path / "out2", d, **MONTHS, model_res=0.5)
    assert (s.res, s.width) == (2.0, 100)


def test_a_fine_delivery_is_averaged_down_to_the_network_pixel(tmp_path: Path, scene: np.ndarray) -> None:
    fine = Affine(0.25, 0, X0, 0, -0.25, Y0)
    write_tif(tmp_path / "curr" / "c.tif", scene[:, :400, :400], transform=fine)
    write_tif(tmp_path / "prev" / "p.tif", scene[:, :400, :400], transform=fine)
    s = align_pair(tmp_path / "prev", tmp_path / "curr", tmp_path / "out", NO_COREG, **MONTHS, model_res=0.5)
    assert (s.res, s.width) == (0.5, 200)
    assert json.loads((tmp_path / "out" / "pair.json").read_text())["resampling"] == "average"
    with AlignedPair.open(tmp_path / "out") as pair:
        images, _ = pair.read(Window(0, 0, 200, 200))
    blocks = scene[:, :400, :400].reshape(3, 200, 2, 200, 2).mean(axis=(2, 4)) / 255
    np.testing.assert_allclose(images[1], blocks, atol=1.5 / 255)  # the 2 x 2 means, not a bilinear sample


def test_model_resolution_reads_the_checkpoint(tmp_path: Path) -> None:
    from pipeline.config import DetectSettings
    from pipeline.imagery import model_resolution
    from pipeline.nets import create_model
    from pipeline.nets.checkpoint import save_checkpoint

    kw = {"widths": (4, 4, 8, 8, 8)}
    net = create_model("scarnet", **kw)
    with_gsd = save_checkpoint(tmp_path / "a.pt", net, "scarnet", 3, kw, {"native_gsd_m": 0.5})
    without = save_checkpoint(tmp_path / "b.pt", net, "scarnet", 3, kw)
    follow = AlignSettings()  # type: ignore[call-arg]
    assert follow.resolution == "model"
    assert model_resolution(follow, DetectSettings(model=with_gsd)) == 0.5
    assert model_resolution(follow, DetectSettings(model=without)) is None
    assert model_resolution(follow, DetectSettings(model=with_gsd, method="cva")) is None
    assert model_resolution(AlignSettings(resolution=1.0), DetectSettings(model=with_gsd)) is None  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="'model' or 'delivery'"):
        AlignSettings(resolution="finest")  # type: ignore[call-arg,arg-type]


def test_sheet_in_other_crs_is_reprojected(tmp_path: Path, scene: np.ndarray) -> None:
    curr = scene[:, :512, :512]
    write_tif(tmp_path / "curr" / "a.tif", curr[:, :, :256])
    # The east sheet arrives in UTM 51N (EPSG:32651): reproject it there first, as a city might deliver.
    src_t = T * Affine.translation(256, 0)
    dst_t, w, h = calculate_default_transform("EPSG:4551", "EPSG:32651", 256, 512, *array_bounds(512, 256, src_t))
    out = np.zeros((3, h, w), np.uint8)
    reproject(
        curr[:, :, 256:],
        out,
        src_transform=src_t,
        src_crs="EPSG:4551",
        dst_transform=dst_t,
        dst_crs="EPSG:32651",
        resampling=Resampling.bilinear,
        dst_nodata=0,
    )
    write_tif(tmp_path / "curr" / "b.tif", out, crs="EPSG:32651", transform=dst_t, nodata=0)
    write_tif(tmp_path / "prev" / "p.tif", curr)
    s = _align(tmp_path)
    assert (s.crs, s.width, s.height) == ("EPSG:4551", 512, 512)
    with AlignedPair.open(tmp_path / "out") as pair:
        images, valid = pair.read(Window(240, 10, 40, 490))
    assert valid.all()  # the seam is covered by one sheet or the other
    diff = np.abs(images[1] - images[0]) * 255
    assert float(np.median(diff[:, :, 20:])) < 2.0  # east sheet, twice resampled: within a few DN
    assert float(diff[:, :, :16].max()) < 1e-3  # west sheet: same lattice, exact


def test_gap_of_one_missing_sheet_is_allowed(tmp_path: Path, scene: np.ndarray) -> None:
    img = scene[:, :128, :384]
    write_tif(tmp_path / "curr" / "a.tif", img[:, :, :128])
    write_tif(tmp_path / "curr" / "c.tif", img[:, :, 256:], transform=T * Affine.translation(256, 0))
    write_tif(tmp_path / "prev" / "p.tif", img)
    s = _align(tmp_path)
    assert (s.width, s.height) == (384, 128)
    assert s.valid_fraction == pytest.approx(2 / 3)
    with AlignedPair.open(tmp_path / "out") as pair:
        valid = pair.read_valid(Window(0, 0, 384, 128))
    assert valid[:, :128].all() and not valid[:, 128:256].any() and valid[:, 256:].all()


# ------------------------------------------------------------------------------------ valid masks


@pytest.mark.parametrize("kind", ["nodata", "mask", "alpha"])
def test_valid_mask_from_nodata_mask_or_alpha(tmp_path: Path, scene: np.ndarray, kind: str) -> None:
    curr = scene[:, :256, :256].copy()
    hole = np.ones((256, 256), bool)
    hole[:, :64] = False  # 64 columns without data in curr
    if kind == "nodata":
        curr[:, ~hole] = 0
        write_tif(tmp_path / "curr" / "c.tif", np.maximum(curr, 0), nodata=0)
    elif kind == "mask":
        write_tif(tmp_path / "curr" / "c.tif", curr, mask=hole)
    else:
        path = write_tif(tmp_path / "curr" / "c.tif", np.concatenate([curr, (hole * 255).astype("uint8")[None]]))
        with rasterio.open(path, "r+") as dst:
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    prev = scene[:, :256, :256].copy()
    prev[:, 200:, :] = 0  # 56 rows without data in prev
    write_tif(tmp_path / "prev" / "p.tif", prev, nodata=0)
    s = _align(tmp_path)
    assert s.valid_fraction == pytest.approx(200 * 192 / 256**2)
    with rasterio.open(tmp_path / "out" / "valid.tif") as v:
        arr = v.read(1)
        assert v.dtypes[0] == "uint8" and v.crs.to_epsg() == 4551 and v.transform == T
        assert v.profile["blockxsize"] == 512 or v.width < 512
    assert set(np.unique(arr)) == {0, 255}
    assert int((arr == 255).sum()) == 200 * 192
    assert (arr[:200, 64:] == 255).all()
    with AlignedPair.open(tmp_path / "out") as pair:
        _, valid = pair.read(Window(32, 180, 64, 64))
        assert int(valid.sum()) == 32 * 20
        np.testing.assert_array_equal(pair.read_valid(Window(32, 180, 64, 64)), valid)
        # Windows reaching past the grid are False there.
        out = pair.read_valid(Window(200, 100, 100, 100))
        assert out.shape == (100, 100) and out[:, :56].all() and not out[:, 56:].any()


# --------------------------------------------------------------------------------- co-registration


def test_known_shift_is_recovered(tmp_path: Path, scene: np.ndarray) -> None:
    curr = scene[:, 40:552, 40:552]
    _two_sheets(tmp_path / "curr", curr)
    dx, dy = 2.3, -1.6  # prev shows every feature 2.3 px east and 1.6 px north of curr
    write_tif(tmp_path / "prev" / "p.tif", curr, transform=T * Affine.translation(dx, dy))
    s = _align(tmp_path, AlignSettings(normalize=False))  # type: ignore[call-arg]
    assert abs(s.shift_px[0] - dx) < 0.25 and abs(s.shift_px[1] - dy) < 0.25
    assert s.residual_px < 0.25
    qa = json.loads((tmp_path / "out" / "qa.json").read_text())
    assert qa["shift_applied_px"] == list(s.shift_px)
    assert qa["residual_before_median_px"] == pytest.approx(np.hypot(dx, dy), abs=0.25)
    assert qa["residual_after_median_px"] < 0.25
    assert qa["blocks_measured"] >= 9 and len(qa["blocks"]) == 16
    pair_json = json.loads((tmp_path / "out" / "pair.json").read_text())
    assert pair_json["shift_px"] == list(s.shift_px)
    with AlignedPair.open(tmp_path / "out") as pair:
        images, valid = pair.read(Window(100, 100, 300, 300))
    after = float(np.abs(images[0] - images[1])[:, valid].mean())
    _align_again = align_pair(tmp_path / "prev", tmp_path / "curr", tmp_path / "raw", NO_COREG, **MONTHS)
    with AlignedPair.open(_align_again.out_dir) as raw:
        images, valid = raw.read(Window(100, 100, 300, 300))
    before = float(np.abs(images[0] - images[1])[:, valid].mean())
    assert after < before / 5


def test_flat_scene_applies_no_shift(tmp_path: Path) -> None:
    flat = np.full((3, 256, 256), 120, np.uint8)
    write_tif(tmp_path / "curr" / "c.tif", flat)
    write_tif(tmp_path / "prev" / "p.tif", flat, transform=T * Affine.translation(1, 1))
    s = _align(tmp_path, AlignSettings())  # type: ignore[call-arg]
    assert s.shift_px == (0.0, 0.0)
    assert json.loads((tmp_path / "out" / "qa.json").read_text())["blocks_measured"] == 0


# ------------------------------------------------------------------------------------- radiometry


def test_histogram_matching_removes_illumination_change(tmp_path: Path, scene: np.ndarray) -> None:
    curr = scene[:, :256, :256]
    write_tif(tmp_path / "curr" / "c.tif", curr)
    write_tif(tmp_path / "prev" / "p.tif", (curr * 0.6 + 20).astype(np.uint8))  # darker
    for normalize, lo, hi in ((False, 0.08, 1.0), (True, 0.0, 0.006)):
        settings = AlignSettings(coregister=False, normalize=normalize)  # type: ignore[call-arg]
        out = tmp_path / f"out{normalize}"
        align_pair(tmp_path / "prev", tmp_path / "curr", out, settings, **MONTHS)
        meta = json.loads((out / "pair.json").read_text())
        assert (meta["luts"] is not None) == normalize
        assert json.loads((out / "qa.json").read_text())["histogram_matching"] == normalize
        with AlignedPair.open(out) as pair:
            images, valid = pair.read(Window(0, 0, 256, 256))
        err = float(np.abs(images[0] - images[1])[:, valid].mean())
        assert lo <= err <= hi, (normalize, err)
    lut = np.array(meta["luts"]["prev"])
    assert lut.shape == (3, 256) and (np.diff(lut, axis=1) >= 0).all()


def test_histogram_tables_on_raw_pixels_equal_the_interpolation(tmp_path: Path, scene: np.ndarray) -> None:
    from pipeline import coregister
    from pipeline.pair import _to_unit, value_tables

    rng = np.random.default_rng(3)
    luts = np.sort(rng.random((3, 256)), axis=1)
    for dtype, scale16, top in (("uint8", None, 256), ("uint16", (2400.0, 2800.0), 65536)):
        pix = rng.integers(0, top, (3, 40, 50)).astype(dtype)
        tables = value_tables(luts, dtype, scale16)
        assert tables is not None and tables.shape == (3, top) and tables.dtype == np.float32
        looked_up = np.stack([np.take(tables[b], pix[b]) for b in range(3)])
        np.testing.assert_array_equal(looked_up, coregister.apply_luts(_to_unit(pix, dtype, scale16), luts))
    assert value_tables(luts, "float32", None) is None
    # the whole read, shifted sub-pixel (warped) prev included: bit for bit what interpolating gave
    curr = scene[:, :256, :256]
    write_tif(tmp_path / "curr" / "c.tif", curr)
    write_tif(tmp_path / "prev" / "p.tif", (curr * 0.6 + 20).astype(np.uint8), transform=T * Affine.translation(0.4, 0))
    _align(tmp_path, AlignSettings(normalize=True))  # type: ignore[call-arg]
    window = Window(10, 20, 200, 180)
    with AlignedPair.open(tmp_path / "out") as fast, AlignedPair.open(tmp_path / "out") as slow:
        slow._tables = None
        assert fast._tables is not None
        for got, want in zip(fast.read(window), slow.read(window), strict=True):
            np.testing.assert_array_equal(got, want)


def test_uint16_scaled_with_scale16(tmp_path: Path, scene: np.ndarray) -> None:
    img16 = np.concatenate([scene[:, :256, :256], scene[:1, :256, :256]]).astype(np.uint16) * 20  # about 2000..3200
    write_tif(tmp_path / "curr" / "c.tif", img16)
    write_tif(tmp_path / "prev" / "p.tif", img16)
    settings = AlignSettings(bands=(4, 1, 2, 3), scale16=(2400.0, 2800.0), coregister=False, normalize=False)  # type: ignore[call-arg]
    _align(tmp_path, settings)
    with AlignedPair.open(tmp_path / "out") as pair:
        assert pair.count == 4
        images, _ = pair.read(Window(0, 0, 256, 256))
    expected = np.clip((img16[[3, 0, 1, 2]].astype(np.float32) - 2400) / 400, 0, 1)
    np.testing.assert_allclose(images[1], expected, atol=1e-6)
    assert images.min() == 0.0 and images.max() == 1.0


# ------------------------------------------------------------------------- sharing, pickling, tiles


def test_pickle_threads_and_tiles(tmp_path: Path, scene: np.ndarray) -> None:
    img = scene[:, :600, :600]
    img_prev = img.copy()
    img_prev[:, 500:, :] = 0
    _two_sheets(tmp_path / "curr", img)
    write_tif(tmp_path / "prev" / "p.tif", img_prev, nodata=0)
    _align(tmp_path)
    pair = AlignedPair.open(tmp_path / "out")
    windows = [Window(c, r, 128, 128) for r in range(0, 600, 128) for c in range(0, 600, 128)]
    serial = [pair.read(w) for w in windows]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(pair.read, windows))
    clone = pickle.loads(pickle.dumps(pair))
    for (a, va), (b, vb), w in zip(serial, threaded, windows, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(va, vb)
        c, vc = clone.read(w)
        np.testing.assert_array_equal(a, c)
    tiles = build_tiles(pair, size=256, overlap=32, min_valid=0.05)
    # offsets 0, 224, 448 on both axes; rows at 448 keep 52 of 152 valid rows.
    assert len(tiles) == 9
    fracs = {t.tile_id: t.valid_fraction for t in tiles}
    assert fracs["r0000_c0000"] == 1.0
    assert fracs["r0002_c0002"] == pytest.approx(52 / 152)
    assert tiles[0].bounds == (X0, Y0 - 128.0, X0 + 128.0, Y0)
    pair.close()
    clone.close()


def test_rerun_replaces_output_atomically(tmp_path: Path, scene: np.ndarray) -> None:
    write_tif(tmp_path / "curr" / "c.tif", scene[:, :256, :256])
    write_tif(tmp_path / "prev" / "p.tif", scene[:, :256, :256])
    _align(tmp_path)
    (tmp_path / "out" / "stale.txt").write_text("x")
    _align(tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pair.json", "qa.json", "valid.tif"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curr", "out", "prev"]


# ----------------------------------------------------------------------------------------- errors


def _bad_input(tmp: Path, case: str, scene: np.ndarray) -> AlignSettings:
    img = scene[:, :256, :256]
    settings = NO_COREG
    if case != "missing":
        (tmp / "prev").mkdir(parents=True, exist_ok=True)
    if case not in ("empty", "missing"):
        write_tif(tmp / "prev" / "p.tif", img)
    if case == "no_crs":
        write_tif(tmp / "curr" / "c.tif", img, crs=None)
    elif case == "no_overlap":
        write_tif(tmp / "curr" / "c.tif", img, transform=T * Affine.translation(1000, 0))
    elif case == "bands":
        path = write_tif(tmp / "curr" / "c.tif", np.concatenate([img, img[:1]]))
        with rasterio.open(path, "r+") as dst:  # RGB+NIR: the 4th band is not alpha
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined]
    elif case == "dtype":
        write_tif(tmp / "curr" / "c.tif", img.astype(np.uint16))
        settings = AlignSettings(coregister=False, scale16=(0.0, 255.0))  # type: ignore[call-arg]
    elif case == "band_index":
        write_tif(tmp / "curr" / "c.tif", img)
        settings = AlignSettings(bands=(1, 2, 5), coregister=False)  # type: ignore[call-arg]
    elif case in ("empty", "missing"):
        write_tif(tmp / "curr" / "c.tif", img)
    elif case == "corrupt":
        write_tif(tmp / "curr" / "a.tif", img)
        (tmp / "curr" / "b.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    elif case == "truncated":
        path = write_tif(tmp / "curr" / "c.tif", textured((512, 512), seed=3), compress="none")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "stray_sheet":
        _two_sheets(tmp / "curr", img)
        # The same sheet labelled UTM 51N: the coordinates then lie ~250 km west of its neighbours.
        write_tif(tmp / "curr" / "c.tif", img, crs="EPSG:32651", transform=T * Affine.translation(0, 256))
    elif case == "uint16":
        write_tif(tmp / "prev" / "p.tif", img.astype(np.uint16))
        write_tif(tmp / "curr" / "c.tif", img.astype(np.uint16))
    elif case == "all_nodata":
        write_tif(tmp / "curr" / "c.tif", np.zeros_like(img), nodata=0)
    return settings


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("no_crs", CRSError, r"c\.tif: sheet has no CRS; set it"),
        ("no_overlap", NoOverlapError, r"prev: previous epoch .* do not overlap in EPSG:4551"),
        ("bands", BandMismatchError, r"p\.tif: 3 band\(s\) uint8 but the current epoch .* has 4 uint8"),
        ("dtype", BandMismatchError, r"3 band\(s\) uint8 but the current epoch .* has 3 uint16"),
        ("band_index", BandMismatchError, r"align\.bands \(1, 2, 5\) names band\(s\) \[5\]"),
        ("empty", MissingInputError, r"prev: previous epoch folder holds no \*\.tif sheets"),
        ("missing", MissingInputError, r"prev: previous epoch folder not found"),
        ("corrupt", CorruptFileError, r"b\.tif: not a readable GeoTIFF"),
        ("truncated", CorruptFileError, r"c\.tif: not a readable GeoTIFF"),
        ("stray_sheet", CRSMismatchError, r"c\.tif: declared CRS EPSG:32651 places this sheet \d+ map units away"),
        ("uint16", ConfigError, r"p\.tif: 16-bit imagery needs a scaling rule; set align\.scale16"),
        ("all_nodata", InputError, r"curr: every pixel of this epoch is nodata"),
    ],
)
def test_bad_input_raises_one_line_and_writes_nothing(
    tmp_path: Path, scene: np.ndarray, case: str, error: type[Exception], match: str
) -> None:
    settings = _bad_input(tmp_path, case, scene)
    with pytest.raises(error, match=match) as info:
        _align(tmp_path, settings)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("prev", "curr")) == []


def test_bad_month_and_missing_pair(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'2026-13' is not of the form"):
        align_pair(tmp_path, tmp_path, tmp_path / "out", NO_COREG, month="2026-13", prev="2026-01")
    with pytest.raises(MissingInputError, match="no aligned pair .* run 'scarwatch align' first"):
        AlignedPair.open(tmp_path / "nothing")


# ------------------------------------------------------------------- deliveries that degrade (issue 11)


@pytest.mark.parametrize("link", ["dangling", "loop", "folder"])
def test_a_sheet_that_is_not_a_file_stops_the_month(tmp_path: Path, scene: np.ndarray, link: str) -> None:
    _two_sheets(tmp_path / "prev", scene[:, :128, :256])
    _two_sheets(tmp_path / "curr", scene[:, :128, :256])
    bad = tmp_path / "curr" / "c.tif"
    if link == "dangling":
        bad.symlink_to(tmp_path / "gone.tif")
    elif link == "loop":
        bad.symlink_to(tmp_path / "curr" / "d.tif")
        (tmp_path / "curr" / "d.tif").symlink_to(bad)
    else:
        bad.mkdir()
    with pytest.raises(CorruptFileError, match=r"c\.tif: current epoch sheet is (a link to nothing|not a file)"):
        _align(tmp_path)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_sheet_stops_the_month(tmp_path: Path, scene: np.ndarray) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    _two_sheets(tmp_path / "prev", scene[:, :128, :256])
    _two_sheets(tmp_path / "curr", scene[:, :128, :256])
    (tmp_path / "curr" / "a.tif").chmod(0)
    with pytest.raises(CorruptFileError, match="not readable"):
        _align(tmp_path)


def test_a_sheet_missing_from_one_epoch_is_named(
    tmp_path: Path, scene: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    _two_sheets(tmp_path / "prev", scene[:, :128, :256])
    write_tif(tmp_path / "curr" / "a.tif", scene[:, :128, :128])  # b.tif was not delivered this month
    s = _align(tmp_path)
    assert s.width == 128
    assert "sheet(s) b.tif lie outside the current epoch's coverage" in caplog.text


def test_cloud_and_flat_imagery_is_flagged_unusable(tmp_path: Path, scene: np.ndarray) -> None:
    cloud = np.full((3, 256, 256), 245, np.uint8)
    write_tif(tmp_path / "curr" / "c.tif", cloud)
    write_tif(tmp_path / "prev" / "p.tif", scene[:, :256, :256])
    _align(tmp_path, AlignSettings())  # type: ignore[call-arg]
    usable = json.loads((tmp_path / "out" / "qa.json").read_text())["usable"]
    assert usable["ok"] is False and usable["cloud_fraction"] == 1.0 and usable["textured_fraction"] == 0.0
    assert any("cloud" in r for r in usable["reasons"]) and any("texture" in r for r in usable["reasons"])


def test_good_imagery_is_usable(tmp_path: Path, scene: np.ndarray) -> None:
    _two_sheets(tmp_path / "prev", scene[:, :256, :256])
    _two_sheets(tmp_path / "curr", scene[:, :256, :256])
    _align(tmp_path, AlignSettings())  # type: ignore[call-arg]
    usable = json.loads((tmp_path / "out" / "qa.json").read_text())["usable"]
    assert usable == {"ok": True, "reasons": [], "cloud_fraction": usable["cloud_fraction"], "textured_fraction": 1.0}
    assert usable["cloud_fraction"] < 0.1
