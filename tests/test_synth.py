"""The demo town: event script, files and layers, pixels, determinism, and the training pairs."""

from __future__ import annotations

import collections
import hashlib
import json
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.merge import merge

from pipeline.config import DemoSettings
from pipeline.errors import ConfigError
from pipeline.synth import DemoSummary, generate_demo, plan_demo, training_pair

SMALL = DemoSettings(size_m=400.0, n_months=3, seed=7)
EVENTS = ("appeared", "expanded", "demolished", "rebuilt", "permitted", "removed")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _mosaic(root: Path, month: str) -> tuple[np.ndarray, rasterio.Affine]:
    paths = sorted((root / "imagery" / month).glob("sheet_*.tif"))
    arr, transform = merge(paths)
    return arr.astype(np.float32), transform


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoSummary]:
    out = tmp_path_factory.mktemp("synth") / "demo"
    return out, generate_demo(out, SMALL)


def test_default_script_has_every_event_in_realistic_numbers() -> None:
    plan = plan_demo(DemoSettings())
    counts = collections.Counter(c["event"] for c in plan.changes)
    for event in EVENTS:
        assert counts[event] > 0, f"no {event!r} event in the default script: {counts}"
    assert 25 <= len(plan.changes) <= 45
    assert {c["kind"] for c in plan.changes} == {"new", "removed"}
    assert all(c["legal"] == (c["event"] in ("permitted", "removed")) for c in plan.changes)
    # seed ledger: a handful of cases, some ordered with a deadline, one scar
    states = collections.Counter(c["state"] for c in plan.cases)
    assert 4 <= len(plan.cases) <= 9 and states["ordered"] >= 1 and states["demolished"] == 1
    assert all(c["deadline"] for c in plan.cases if c["state"] == "ordered")
    # a rebuilt structure stands where a demolished one stood, at least two months later
    demolished = [c for c in plan.changes if c["event"] == "demolished"]
    for r in (c for c in plan.changes if c["event"] == "rebuilt"):
        assert any(d["geometry"].intersects(r["geometry"]) and d["month"] <= r["month"] - 2 for d in demolished)
    # an expansion grows the footprint it replaces
    by_id = {s.sid: s for s in plan.structures}
    for e in (c for c in plan.changes if c["event"] == "expanded"):
        before = by_id[e["structure_id"]].at(e["month"] - 1)
        assert before is not None and e["geometry"].area > before[1].area * 1.3
        assert e["geometry"].buffer(0.01).contains(before[1])


def test_field_updates_agree_with_the_script() -> None:
    plan = plan_demo(DemoSettings())
    changes = pd.DataFrame(plan.changes)
    case_geoms = {c["case_id"]: c["geometry"] for c in plan.cases}
    kinds = {u["kind"] for u in plan.updates}
    assert {"confirmed", "stopped", "ordered", "demolished", "repaired", "closed", "dismissed"} <= kinds
    for u in plan.updates:
        if u["case_id"]:
            assert u["case_id"] in case_geoms and u["x"] is None
            where = case_geoms[u["case_id"]].centroid
        else:
            where = shapely.Point(u["x"], u["y"])
        if u["kind"] == "demolished":  # the imagery of that month shows it gone
            gone = changes[(changes.month == u["month"]) & (changes.event == "demolished")]
            assert any(g.buffer(0.5).contains(where) for g in gone.geometry)
        if u["kind"] == "ordered":
            assert u["deadline"] > u["at"]
    permits = {p["permit_id"] for p in plan.permits}
    dismissed = [u for u in plan.updates if u["kind"] == "dismissed"]
    assert dismissed and all(u["note"].split()[1] in permits for u in dismissed)


def test_files_sheets_and_crs(demo: tuple[Path, DemoSummary]) -> None:
    out, summary = demo
    assert summary.months == ["2026-01", "2026-02", "2026-03"] and summary.crs == "EPSG:4551"
    assert summary.n_changes > 0 and summary.n_structures > 10
    meta = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert meta["n_changes"] == summary.n_changes and set(meta["shifts"]) == set(summary.months)
    assert all(1.0 <= np.hypot(s["dx"], s["dy"]) <= 2.0 + 1e-6 for s in meta["shifts"].values())
    x0, y0 = SMALL.origin
    compressions = set()
    for month in summary.months:
        sheets = sorted((out / "imagery" / month).glob("*.tif"))
        assert [p.name for p in sheets] == ["sheet_0_0.tif", "sheet_0_1.tif", "sheet_1_0.tif", "sheet_1_1.tif"]
        boxes = []
        for p in sheets:
            with rasterio.open(p) as src:
                assert src.crs.to_epsg() == 4551 and src.count == 3 and src.dtypes == ("uint8",) * 3
                assert src.res == (0.5, 0.5) and src.block_shapes[0] == (256, 256)
                compressions.add(src.compression.name)
                if src.compression.name == "jpeg":
                    assert src.photometric.name == "ycbcr"
                boxes.append(shapely.box(*src.bounds))
        union = shapely.union_all(boxes)
        assert union.equals(shapely.box(x0, y0, x0 + 400, y0 + 400))
        assert sum(b.area for b in boxes) == pytest.approx(400 * 400)  # edge to edge, no overlap
    assert compressions == {"deflate", "jpeg"}


def test_vector_layers_columns_and_crs(demo: tuple[Path, DemoSummary]) -> None:
    out, _ = demo
    expected = {
        "ledger/cases.gpkg": ("cases", ["case_id", "opened_at", "state", "category", "note", "deadline"]),
        "layers/permits.gpkg": ("permits", ["permit_id", "valid_from", "valid_to", "note"]),
        "layers/districts.gpkg": ("districts", ["district"]),
        "layers/streets.gpkg": ("streets", ["street", "district"]),
        "layers/grid.gpkg": ("grid", ["cell_id", "unit"]),
        "truth/truth.gpkg": ("changes", ["month", "kind", "structure_id", "legal", "event"]),
    }
    for rel, (layer, columns) in expected.items():
        assert layer in [name for name, _ in pyogrio.list_layers(out / rel)]
        gdf = gpd.read_file(out / rel, layer=layer)
        assert list(gdf.columns) == [*columns, "geometry"], rel
        assert gdf.crs.to_epsg() == 4551, rel
        assert len(gdf) > 0, rel
    area = 400 * 400
    districts = gpd.read_file(out / "layers/districts.gpkg")
    assert 2 <= len(districts) <= 4 and districts.area.sum() == pytest.approx(area)
    assert districts.district.str.endswith("区").all()
    streets = gpd.read_file(out / "layers/streets.gpkg")
    assert streets.street.str.endswith("街道").all() and set(streets.district) == set(districts.district)
    grid = gpd.read_file(out / "layers/grid.gpkg")
    assert grid.area.sum() == pytest.approx(area) and grid.area.max() == pytest.approx(250 * 250)
    assert grid.unit.str.contains("网格").all() and grid.cell_id.is_unique
    cases = gpd.read_file(out / "ledger/cases.gpkg")
    assert set(cases.category) == {"illegal_construction", "scar"}
    truth = gpd.read_file(out / "truth/truth.gpkg", layer="changes")
    assert set(truth.month) <= {"2026-02", "2026-03"} and truth.legal.dtype == bool
    assert {"appeared", "demolished"} <= set(truth.event)
    life = gpd.read_file(out / "truth/truth.gpkg", layer="structures")
    assert set(truth.structure_id) <= set(life.structure_id)
    updates = pd.read_csv(out / "field_updates/2026-02.csv", dtype=str, keep_default_na=False)
    assert list(updates.columns) == ["at", "kind", "actor", "note", "deadline", "case_id", "x", "y"]
    assert (updates["at"].str[:7] == "2026-02").all()
    assert ((updates.case_id != "") ^ (updates.x != "")).all()


def test_new_structure_changes_pixels_far_area_only_drifts(demo: tuple[Path, DemoSummary]) -> None:
    out, _ = demo
    truth = gpd.read_file(out / "truth/truth.gpkg", layer="changes")
    new = truth[(truth.month == "2026-02") & (truth.event == "appeared")].iloc[0]
    prev, transform = _mosaic(out, "2026-01")
    curr, _ = _mosaic(out, "2026-02")
    inner = new.geometry.buffer(-1.0)  # stay clear of the 1-2 px misregistration
    inside = rasterio.features.geometry_mask([inner], prev.shape[1:], transform, invert=True)
    changed = shapely.union_all(list(truth.geometry.buffer(30.0)))
    far = rasterio.features.geometry_mask([changed], prev.shape[1:], transform)
    assert inside.sum() >= 20 and far.mean() > 0.5
    raw = np.abs(curr - prev).mean(axis=0)
    assert raw[inside].mean() > 25  # grey levels
    # undo the global illumination change (per-band gain and offset over the far area), as align does
    for band in range(3):
        p, c = prev[band][far], curr[band][far]
        curr[band] = (curr[band] - c.mean()) / c.std() * p.std() + p.mean()
    diff = np.abs(curr - prev).mean(axis=0)
    assert np.median(diff[far]) < 12  # drift, shadows, noise, JPEG and misregistration only
    assert diff[inside].mean() > 3 * np.median(diff[far])


def test_same_settings_give_identical_files_and_adding_a_month_keeps_earlier_ones(tmp_path: Path) -> None:
    settings = DemoSettings(size_m=300.0, n_months=2, seed=11, sheets=(1, 2))
    a, b = generate_demo(tmp_path / "a", settings), generate_demo(tmp_path / "b", settings)
    assert _hashes(a.out_dir) == _hashes(b.out_dir)
    c = generate_demo(tmp_path / "c", settings.model_copy(update={"n_months": 3}))
    ha, hc = _hashes(a.out_dir), _hashes(c.out_dir)
    images = [k for k in ha if k.startswith("imagery/")]
    assert len(images) == 4 and all(ha[k] == hc[k] for k in images)
    assert ha["ledger/cases.gpkg"] == hc["ledger/cases.gpkg"]
    assert ha["field_updates/2026-02.csv"] == hc["field_updates/2026-02.csv"]
    ta = gpd.read_file(a.out_dir / "truth/truth.gpkg", layer="changes")
    tc = gpd.read_file(c.out_dir / "truth/truth.gpkg", layer="changes")
    pd.testing.assert_frame_equal(ta, tc[tc.month <= "2026-02"].reset_index(drop=True))


def test_generate_replaces_existing_output_atomically(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    (out / "imagery" / "1999-01").mkdir(parents=True)
    (out / "stale.txt").write_text("old", encoding="utf-8")
    generate_demo(out, DemoSettings(size_m=300.0, n_months=2, sheets=(1, 1)))
    assert not (out / "stale.txt").exists() and not (out / "imagery" / "1999-01").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.parametrize(("crs", "match"), [("EPSG:4326", "not projected"), ("EPSG:999999", "not a CRS")])
def test_bad_crs_is_a_config_error(tmp_path: Path, crs: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        generate_demo(tmp_path / "demo", DemoSettings(crs=crs))
    assert not (tmp_path / "demo").exists()


def test_size_must_fit_the_pixel_grid(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="whole number of pixels"):
        generate_demo(tmp_path / "demo", DemoSettings(size_m=300.25))


def test_training_pair_shapes_and_labels_match_the_differences() -> None:
    rng = np.random.default_rng(3)
    inside, outside, n_new, n_removed = [], [], 0, 0
    start = time.perf_counter()
    for _ in range(8):
        images, labels = training_pair(rng)
        assert images.shape == (2, 3, 256, 256) and images.dtype == np.uint8
        assert labels.shape == (2, 256, 256) and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1} and not (labels[0] & labels[1]).any()
        n_new += int(labels[0].sum())
        n_removed += int(labels[1].sum())
        diff = np.abs(images[1].astype(np.float32) - images[0]).mean(axis=0)
        changed = labels.any(axis=0)
        if changed.sum() > 50:
            from scipy import ndimage

            core = ndimage.binary_erosion(changed, iterations=3)
            if core.sum() > 20:
                inside.append(diff[core].mean())
                outside.append(np.median(diff[~ndimage.binary_dilation(changed, iterations=6)]))
    assert (time.perf_counter() - start) / 8 < 1.0
    assert n_new > 0 and n_removed > 0 and len(inside) >= 4
    assert np.mean(inside) > 3 * np.mean(outside)
    small_images, small_labels = training_pair(np.random.default_rng(1), size=64)
    assert small_images.shape == (2, 3, 64, 64) and small_labels.shape == (2, 64, 64)
