"""Vectorisation: known rectangles -> polygons, seams, hysteresis, ids, joins, output files, scores."""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from shapely.geometry import Polygon, box

from pipeline.config import VectorizeSettings
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.formats import FLAG_COLUMNS, MU_M2, flag_id
from pipeline.metrics import flag_scores
from pipeline.vectorize import resolve_thresholds, vectorize_month

CRS = "EPSG:4551"
X0, Y0 = 500000.0, 4862000.0
TRANSFORM = Affine(0.5, 0, X0, 0, -0.5, Y0)
# small windows: objects cross window borders; explicit hysteresis thresholds (seeds > 0.6 grow into > 0.4)
SETTINGS = VectorizeSettings(window_px=64, halo_px=16, high=0.6, low=0.4)


def px_box(r0: int, c0: int, r1: int, c1: int) -> Polygon:
    """Map polygon of pixel rows [r0, r1) and columns [c0, c1)."""
    return box(X0 + c0 * 0.5, Y0 - r1 * 0.5, X0 + c1 * 0.5, Y0 - r0 * 0.5)


def scene() -> np.ndarray:
    p = np.zeros((2, 200, 240), np.float32)
    new, removed = p
    new[10:30, 10:50] = 0.9  # A: 40 x 20 px = 200 m², inside one window
    new[50:80, 40:100] = 0.8  # B: crosses the window borders at row 64 and column 64 -> 450 m²
    new[100:104, 10:14] = 0.95  # C: 4 m² < min_area -> dropped
    new[110:140, 110:140] = 0.9  # D: 30 x 30 px ring ...
    new[122:128, 122:128] = 0.0  # ... with a 6 x 6 hole -> 225 m², no hole
    new[150:160, 10:20] = 0.9  # E: strong seed 10 x 10 ...
    new[150:160, 20:50] = 0.5  # ... grows into the weak part -> 10 x 40 px = 100 m²
    new[170:190, 100:120] = 0.5  # F: isolated weak blob -> dropped
    new[20:40, 180:230] = 1.0  # nodata (255) block -> ignored
    removed[150:180, 180:220] = 0.85  # G: removed, 40 x 30 px = 300 m²
    out = np.rint(p * 254).astype(np.uint8)
    out[0, 20:40, 180:230] = 255
    return out


def write_tif(path: Path, data: np.ndarray, *, nodata: int | None = 255) -> Path:
    arr = data if data.ndim == 3 else data[None]
    profile = {
        "driver": "GTiff",
        "count": arr.shape[0],
        "height": arr.shape[1],
        "width": arr.shape[2],
        "dtype": "uint8",
        "crs": CRS,
        "transform": TRANSFORM,
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(arr)
    return path


def write_prob(path: Path, data: np.ndarray) -> Path:
    return write_tif(path, data)


@pytest.fixture
def prob(tmp_path: Path) -> Path:
    return write_prob(tmp_path / "prob.tif", scene())


def test_known_rectangles(prob: Path, tmp_path: Path) -> None:
    flags = vectorize_month(prob, tmp_path / "flags" / "2026-03.gpkg", SETTINGS, month="2026-03")
    assert list(flags.columns) == [*FLAG_COLUMNS, "geometry"]
    new = flags[flags.kind == "new"]
    removed = flags[flags.kind == "removed"]
    assert len(new) == 4 and len(removed) == 1
    expected = {
        "A": (px_box(10, 10, 30, 50), 200.0),
        "B": (px_box(50, 40, 80, 100), 450.0),
        "D": (px_box(110, 110, 140, 140), 225.0),
        "E": (px_box(150, 10, 160, 50), 100.0),
    }
    for name, (geom, area) in expected.items():
        hits = new[new.intersects(geom.centroid)]
        assert len(hits) == 1, f"{name}: {len(hits)} polygons"  # B crosses 2 window borders: one polygon
        got = hits.iloc[0]
        assert got.area_m2 == pytest.approx(area, rel=0.05), name
        assert got.geometry.intersection(geom).area / geom.union(got.geometry).area > 0.95, name
        assert len(got.geometry.interiors) == 0, name
        assert got.area_mu == pytest.approx(got.area_m2 / MU_M2, rel=1e-3)
    a = new[new.intersects(px_box(10, 10, 30, 50).centroid)].iloc[0]
    assert a.p_mean == pytest.approx(0.9, abs=0.01) and a.p_max == pytest.approx(0.9, abs=0.01)
    e = new[new.intersects(px_box(150, 10, 160, 50).centroid)].iloc[0]
    assert 0.5 < e.p_mean < 0.9 and e.p_max == pytest.approx(0.9, abs=0.01)
    assert not new.intersects(px_box(100, 10, 104, 14)).any()  # C below min area
    assert not new.intersects(px_box(170, 100, 190, 120)).any()  # F weak without a seed
    assert not new.intersects(px_box(20, 180, 40, 230)).any()  # nodata is not change
    assert removed.iloc[0].area_m2 == pytest.approx(300.0, rel=0.05)
    assert (flags.month == "2026-03").all()
    # EPSG:4551 (CGCS2000 GK CM 126E): x = 500 km is the central meridian
    assert flags.lon.between(125.99, 126.01).all() and flags.lat.between(43.8, 44.0).all()
    assert (flags.district == "").all() and (flags.street == "").all()


def test_window_size_does_not_change_the_result(prob: Path, tmp_path: Path) -> None:
    small = vectorize_month(prob, tmp_path / "a.gpkg", SETTINGS, month="2026-03")
    whole = vectorize_month(
        prob, tmp_path / "b.gpkg", VectorizeSettings(window_px=4096, high=0.6, low=0.4), month="2026-03"
    )
    assert sorted(small.flag_id) == sorted(whole.flag_id)


def test_flag_ids_are_deterministic(prob: Path, tmp_path: Path) -> None:
    one = vectorize_month(prob, tmp_path / "one.gpkg", SETTINGS, month="2026-03")
    two = vectorize_month(prob, tmp_path / "two.gpkg", SETTINGS, month="2026-03")
    assert list(one.flag_id) == list(two.flag_id)
    assert one.flag_id.is_unique
    assert all(re.fullmatch(r"F202603-[NR]-[0-9a-f]{8}", f) for f in one.flag_id)
    other = vectorize_month(prob, tmp_path / "three.gpkg", SETTINGS, month="2026-04")
    assert set(other.flag_id).isdisjoint(one.flag_id)
    square = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)])
    shifted = Polygon([(0, 10), (0, 0), (10, 0), (10, 10.01)])  # same ring, other start, 1 cm off
    assert flag_id("2026-03", "new", square) == flag_id("2026-03", "new", shifted)
    assert flag_id("2026-03", "new", square) != flag_id("2026-03", "removed", square)


def test_regularisation(tmp_path: Path) -> None:
    data = np.zeros((2, 160, 160), np.uint8)
    yy, xx = np.mgrid[0:160, 0:160]
    u = (xx - 50) * np.cos(0.4) + (yy - 50) * np.sin(0.4)
    v = -(xx - 50) * np.sin(0.4) + (yy - 50) * np.cos(0.4)
    data[0][(np.abs(u) < 24) & (np.abs(v) < 12)] = 230  # rotated 48 x 24 px rectangle
    data[0][100:150, 100:110] = 230  # an L: 50 x 10 ...
    data[0][140:150, 110:150] = 230  # ... + 10 x 40 (fills ~0.36 of its box)
    path = write_prob(tmp_path / "p.tif", data)
    flags = vectorize_month(path, tmp_path / "f.gpkg", SETTINGS, month="2026-03")
    assert len(flags) == 2
    rect = flags[flags.intersects(px_box(49, 49, 51, 51))].geometry.iloc[0]
    ell = flags[flags.intersects(px_box(120, 104, 121, 105))].geometry.iloc[0]
    assert len(rect.exterior.coords) == 5  # a rectangle
    assert rect.area == pytest.approx(48 * 24 * 0.25, rel=0.05)
    assert ell.area == pytest.approx((500 + 400) * 0.25, rel=0.05)
    assert len(ell.exterior.coords) == 7  # the L keeps its six corners
    plain = vectorize_month(
        path,
        tmp_path / "g.gpkg",
        VectorizeSettings(window_px=64, halo_px=16, high=0.6, low=0.4, regularize=False),
        month="2026-03",
    )
    assert len(plain[plain.intersects(px_box(49, 49, 51, 51))].geometry.iloc[0].exterior.coords) > 5


def test_slivers_dropped(tmp_path: Path) -> None:
    data = np.zeros((2, 100, 100), np.uint8)
    data[0][10:12, 10:90] = 230  # 2 px = 1 m wide, 40 m long: opening removes it
    data[0][30:33, 10:90] = 230  # 3 px = 1.5 m wide: kept by the opening, kept as >= sliver_m
    path = write_prob(tmp_path / "p.tif", data)
    flags = vectorize_month(path, tmp_path / "f.gpkg", SETTINGS, month="2026-03")
    assert len(flags) == 1
    strict = vectorize_month(
        path,
        tmp_path / "g.gpkg",
        VectorizeSettings(window_px=64, halo_px=16, high=0.6, low=0.4, sliver_m=2.0),
        month="2026-03",
    )
    assert len(strict) == 0


def test_districts_and_streets_joined(prob: Path, tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    layers.mkdir()
    west, east = px_box(0, 0, 200, 80), px_box(0, 80, 200, 240)
    gpd.GeoDataFrame({"district": ["朝阳区", "南关区"]}, geometry=[west, east], crs=CRS).to_file(
        layers / "districts.gpkg"
    )
    streets = gpd.GeoDataFrame(
        {"street": ["前进街道"], "district": ["朝阳区"]}, geometry=[px_box(0, 0, 40, 80)], crs=CRS
    )
    streets.to_crs("EPSG:4326").to_file(layers / "streets.gpkg")  # another CRS: reprojected explicitly
    flags = vectorize_month(prob, tmp_path / "f.gpkg", SETTINGS, month="2026-03", layers_dir=layers)
    by_centroid = {
        (round(g.centroid.x), round(g.centroid.y)): (d, s)
        for g, d, s in zip(flags.geometry, flags.district, flags.street, strict=True)
    }
    a = px_box(10, 10, 30, 50).centroid
    d = px_box(110, 110, 140, 140).centroid
    assert by_centroid[(round(a.x), round(a.y))] == ("朝阳区", "前进街道")
    assert by_centroid[(round(d.x), round(d.y))] == ("南关区", "")


def test_layer_without_column(prob: Path, tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    layers.mkdir()
    gpd.GeoDataFrame({"name": ["x"]}, geometry=[px_box(0, 0, 200, 240)], crs=CRS).to_file(layers / "districts.gpkg")
    with pytest.raises(InputError, match=r"districts.gpkg: no 'district' column"):
        vectorize_month(prob, tmp_path / "f.gpkg", SETTINGS, month="2026-03", layers_dir=layers)


def test_outputs_written_atomically(prob: Path, tmp_path: Path) -> None:
    out = tmp_path / "flags" / "2026-03.gpkg"
    flags = vectorize_month(prob, out, SETTINGS, month="2026-03")
    back = gpd.read_file(out, layer="flags")
    parquet = gpd.read_parquet(out.with_suffix(".parquet"))
    assert list(back.flag_id) == list(flags.flag_id) == list(parquet.flag_id)
    assert back.crs == flags.crs == parquet.crs
    assert set(back.geom_type) == {"Polygon"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["2026-03.gpkg", "2026-03.parquet"]


def test_empty_result_has_schema(tmp_path: Path) -> None:
    path = write_prob(tmp_path / "p.tif", np.zeros((2, 100, 100), np.uint8))
    out = tmp_path / "f.gpkg"
    flags = vectorize_month(path, out, SETTINGS, month="2026-03")
    assert len(flags) == 0 and list(flags.columns) == [*FLAG_COLUMNS, "geometry"]
    back = gpd.read_file(out, layer="flags")
    assert len(back) == 0 and set(FLAG_COLUMNS) <= set(back.columns) and back.crs is not None
    assert len(gpd.read_parquet(out.with_suffix(".parquet"))) == 0


def test_input_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="run 'scarwatch detect'"):
        vectorize_month(tmp_path / "none.tif", tmp_path / "f.gpkg", SETTINGS, month="2026-03")
    with pytest.raises(ConfigError, match="YYYY-MM"):
        vectorize_month(tmp_path / "none.tif", tmp_path / "f.gpkg", SETTINGS, month="2026-3")
    one_band = write_tif(tmp_path / "one.tif", np.zeros((50, 50), np.uint8))
    with pytest.raises(InputError, match="expected 2 uint8 bands"):
        vectorize_month(one_band, tmp_path / "f.gpkg", SETTINGS, month="2026-03")


def test_flag_scores(prob: Path, tmp_path: Path) -> None:
    flags = vectorize_month(prob, tmp_path / "f.gpkg", SETTINGS, month="2026-03")
    truth = gpd.GeoDataFrame(
        {
            "month": ["2026-03", "2026-03", "2026-03", "2026-03", "2026-02"],
            "kind": ["new", "new", "new", "removed", "new"],
            "structure_id": ["a", "b", "z", "g", "old"],
            "legal": [False, False, True, False, False],
            "event": ["build", "build", "build", "demolish", "build"],
        },
        geometry=[
            px_box(10, 10, 30, 50),  # A: exact
            px_box(50, 40, 70, 100),  # B: 2/3 of it -> IoU 0.67, centroid inside
            px_box(0, 200, 10, 210),  # missed
            px_box(150, 180, 180, 220),  # G
            px_box(110, 110, 140, 140),  # another month: ignored
        ],
        crs=CRS,
    )
    scores = flag_scores(flags, truth, "2026-03")
    assert scores["new"]["iou50"]["tp"] == 2 and scores["new"]["iou50"]["fn"] == 1
    assert scores["new"]["iou50"]["fp"] == 2  # D and E are not in this truth
    assert scores["new"]["centroid"]["tp"] == 2
    assert scores["removed"]["iou50"] == {**scores["removed"]["iou50"], "tp": 1, "fp": 0, "fn": 0}
    assert scores["all"]["iou50"]["tp"] == 3
    with pytest.raises(InputError, match="lacks columns"):
        flag_scores(flags, truth.drop(columns="kind"), "2026-03")


def test_seed_threshold_defaults_to_the_detectors_calibrated_one(tmp_path: Path) -> None:
    data = scene()
    path = write_prob(tmp_path / "prob.tif", data)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(threshold="0.8600")  # what detect writes from the checkpoint
    flags = vectorize_month(path, tmp_path / "f.gpkg", VectorizeSettings(window_px=64, halo_px=16), month="2026-03")
    # seeds need p > 0.86: A (0.9), D (0.9), E's seed (0.9) stay; B (0.8) and removed G (0.85) go
    new = flags[flags.kind == "new"]
    assert len(new) == 3 and (flags.kind == "removed").sum() == 0
    assert not new.intersects(px_box(50, 40, 80, 100).centroid).any()
    assert resolve_thresholds(VectorizeSettings(high=0.7), {"threshold": "0.85"}).high == 0.7  # params win
    assert resolve_thresholds(VectorizeSettings(low=0.5), {"threshold": "0.3"}).low == 0.3  # low <= high


def test_objects_below_the_calibrated_mean_probability_are_dropped(tmp_path: Path) -> None:
    path = write_prob(tmp_path / "prob.tif", scene())
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(threshold="0.6000", object_threshold="0.7900")  # what detect writes from the checkpoint
    settings = VectorizeSettings(window_px=64, halo_px=16, low=0.4)
    flags = vectorize_month(path, tmp_path / "f.gpkg", settings, month="2026-03")
    new = flags[flags.kind == "new"]
    # A and D (0.9) stay; B (203/254 = 0.799) stays as one object: its mean pools the windows it crosses;
    # E (a 0.9 seed grown into 0.5: mean 0.6) is dropped; removed G (0.85) stays
    assert len(new) == 3 and (flags.kind == "removed").sum() == 1
    assert new.intersects(px_box(50, 40, 80, 100).centroid).any()
    assert not new.intersects(px_box(150, 10, 160, 50).centroid).any()
    assert new.p_mean.min() == pytest.approx(203 / 254, abs=1e-4)
    # params win over the tag: 0 keeps E again, 0.86 drops B and G too
    keep = vectorize_month(path, tmp_path / "k.gpkg", settings.model_copy(update={"min_p_mean": 0.0}), month="2026-03")
    assert (keep.kind == "new").sum() == 4
    strict = settings.model_copy(update={"min_p_mean": 0.86})
    strict_flags = vectorize_month(path, tmp_path / "s.gpkg", strict, month="2026-03")
    assert (strict_flags.kind == "new").sum() == 2 and (strict_flags.kind == "removed").sum() == 0
    # no calibration anywhere: every seeded object is kept
    assert resolve_thresholds(VectorizeSettings(), {}).min_p_mean == 0.0
    assert resolve_thresholds(VectorizeSettings(), {"object_threshold": "junk"}).min_p_mean == 0.0


def blobs() -> np.ndarray:
    """Probabilities (2, 160, 200): two offset houses grown into one blob, a long shed, an L and a U."""
    p = np.zeros((2, 160, 200), np.float32)
    new = p[0]
    new[10:34, 50:74] = 0.9  # house 1: 24 x 24 px
    new[28:52, 78:102] = 0.9  # house 2, offset by 18 rows ...
    new[28:34, 74:78] = 0.9  # ... joined to house 1 by a 6-pixel neck: one blob, 1,176 px
    new[70:92, 10:88] = 0.9  # a long shed, 78 x 22 px (it fills its rectangle: stays whole) ...
    new[70:74, 45:51] = 0.0  # ... with a dent in its roof line
    new[100:140, 10:22] = 0.9  # an L: two 12-pixel arms
    new[128:140, 22:50] = 0.9
    new[100:150, 120:130] = 0.9  # a U (courtyard house): a 10-pixel spine and two arms
    new[100:110, 130:170] = 0.9
    new[140:150, 130:170] = 0.9
    return np.rint(p * 254).astype(np.uint8)


def test_neighbouring_houses_grown_together_are_cut_and_buildings_stay_whole(tmp_path: Path) -> None:
    path = write_prob(tmp_path / "prob.tif", blobs())
    settings = VectorizeSettings(window_px=4096, high=0.6, low=0.4)
    flags = vectorize_month(path, tmp_path / "f.gpkg", settings, month="2026-03")
    houses = flags[flags.intersects(px_box(10, 50, 52, 102))]
    assert len(houses) == 2  # one flag per house, not one for the blob
    for r0, c0 in ((10, 50), (28, 78)):
        house = px_box(r0, c0, r0 + 24, c0 + 24)
        got = houses[houses.intersects(house.centroid)]
        assert len(got) == 1
        assert got.geometry.iloc[0].intersection(house).area / got.geometry.iloc[0].union(house).area > 0.8
    for name, region in (
        ("shed", px_box(70, 10, 92, 88)),
        ("L", px_box(100, 10, 140, 50)),
        ("U", px_box(100, 120, 150, 170)),
    ):
        assert flags.intersects(region).sum() == 1, name
    assert len(flags) == 5
    whole = vectorize_month(path, tmp_path / "w.gpkg", settings.model_copy(update={"split": False}), month="2026-03")
    assert len(whole) == 4 and whole.intersects(px_box(10, 50, 52, 102)).sum() == 1
    # the blob is too small to cut below split_min_px, and not cut when any piece would be tiny
    small = settings.model_copy(update={"split_min_px": 2000})
    assert len(vectorize_month(path, tmp_path / "s.gpkg", small, month="2026-03")) == 4
    tiny = settings.model_copy(update={"split_min_piece_px": 600})
    assert len(vectorize_month(path, tmp_path / "t.gpkg", tiny, month="2026-03")) == 4


def test_cut_objects_across_window_seams(tmp_path: Path) -> None:
    # the blob crosses the seam at column 64; with a 32-pixel halo both windows see it whole and cut it alike
    path = write_prob(tmp_path / "prob.tif", blobs())
    whole = vectorize_month(
        path, tmp_path / "a.gpkg", VectorizeSettings(window_px=4096, high=0.6, low=0.4), month="2026-03"
    )
    seams = VectorizeSettings(window_px=64, halo_px=40, high=0.6, low=0.4)
    windowed = vectorize_month(path, tmp_path / "b.gpkg", seams, month="2026-03")
    assert sorted(windowed.flag_id) == sorted(whole.flag_id)
    # an object reaching beyond the halo is not judged from a part of it: it stays one object
    narrow = vectorize_month(path, tmp_path / "c.gpkg", seams.model_copy(update={"halo_px": 8}), month="2026-03")
    assert narrow.intersects(px_box(10, 50, 52, 102)).sum() == 1


def test_pieces_are_kept_or_dropped_with_the_object_they_were_cut_from(tmp_path: Path) -> None:
    data = blobs()
    data[0, 28:52, 78:102] = round(0.62 * 254)  # house 2 is less sure: the blob's mean is 0.757
    data[0, 28:34, 74:78] = round(0.62 * 254)
    data[0, 60:160] = 0  # only the blob
    path = write_prob(tmp_path / "prob.tif", data)
    settings = VectorizeSettings(window_px=4096, high=0.6, low=0.4)
    kept = vectorize_month(path, tmp_path / "k.gpkg", settings.model_copy(update={"min_p_mean": 0.75}), month="2026-03")
    assert len(kept) == 2  # house 2 alone (0.62) is below 0.75, the blob it was cut from is not
    assert sorted(kept.p_mean.round(2)) == [0.62, 0.9]  # each flag reports its own mean
    dropped = vectorize_month(
        path, tmp_path / "d.gpkg", settings.model_copy(update={"min_p_mean": 0.8}), month="2026-03"
    )
    assert len(dropped) == 0
