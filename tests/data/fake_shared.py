"""Write a tiny, seeded fake of ../shared/data in the real layouts, so the loaders, the sampler, training,
calibration and evaluation run in CI without the real data (after torchgeo's ``tests/data/*/data.py``).

Layouts copied from the real sets (see ../shared/data/README.md): ``xbd-santa-rosa`` (tiles.csv, pre/ and
post/ RGB GeoTIFFs with an internal mask in EPSG:32610 at 0.5 m, labels/<id>_destroyed.tif,
buildings/<id>.geojson in EPSG:4326 with ``subtype``), ``levir-dev`` and ``whu-cd`` (A/, B/, label/
PNGs; WHU at 0.3 m with the ``ucdscm_`` and ``lgpnet_`` tilings) and ``xbd-joplin`` (A/, B/, label/,
label_destroyed_or_major/, footprint_pre/ PNGs and json/<tile>_pre_disaster.json polygons). The scenes
are grey-green ground with bright square roofs; in "later" images some roofs are new (LEVIR/WHU) or burnt
(Santa Rosa/Joplin).

Run ``python tests/data/fake_shared.py OUT`` to write one by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SANTA_TILES = 8  # 8 clusters of one tile: enough for the 20 % cluster split
SANTA_PX = 96


def _scene(rng: np.random.Generator, size: int, n: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Ground (3, size, size) uint8 and ``n`` non-overlapping square roofs (y0, y1, x0, x1)."""
    ground = np.clip(rng.normal([[[95]], [[110]], [[80]]], 10, (3, size, size)), 0, 255)
    roofs: list[tuple[int, int, int, int]] = []
    step = size // int(np.ceil(np.sqrt(n)))
    for k in range(n):
        r, c = divmod(k, size // step)
        side = int(rng.integers(step // 3, step // 2 + 1))
        y0, x0 = r * step + 2, c * step + 2
        roofs.append((y0, y0 + side, x0, x0 + side))
    return ground.astype(np.uint8), roofs


def _paint(img: np.ndarray, roofs: list[tuple[int, int, int, int]], value: int) -> np.ndarray:
    out = img.copy()
    for y0, y1, x0, x1 in roofs:
        out[:, y0:y1, x0:x1] = value
    return out


def _mask(shape: tuple[int, int], roofs: list[tuple[int, int, int, int]]) -> np.ndarray:
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in roofs:
        m[y0:y1, x0:x1] = True
    return m


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.transpose(1, 2, 0) if array.ndim == 3 else array).save(path)


def _png_pairs(root: Path, names: list[str], size: int, rng: np.random.Generator, *, removed: bool) -> None:
    for name in names:
        ground, roofs = _scene(rng, size, 9)
        changed = roofs[::2]
        kept = roofs[1::2]
        before = _paint(ground, kept + (changed if removed else []), 215)
        after = _paint(ground, kept + ([] if removed else changed), 215)
        if removed:
            after = _paint(after, changed, 45)
        label = _mask((size, size), changed).astype(np.uint8) * 255
        _png(root / "A" / f"{name}.png", before)
        _png(root / "B" / f"{name}.png", after)
        _png(root / "label" / f"{name}.png", label)
        if removed:
            _png(root / "label_destroyed_or_major" / f"{name}.png", label)
            _png(root / "footprint_pre" / f"{name}.png", _mask((size, size), roofs).astype(np.uint8) * 255)
            _xbd_json(root / "json" / f"{name}_pre_disaster.json", roofs)


def _xbd_json(path: Path, roofs: list[tuple[int, int, int, int]]) -> None:
    """xBD's label layout: ``features.xy`` polygons in pixel coordinates as WKT (x, y)."""
    import json

    xy = [
        {
            "properties": {"feature_type": "building"},
            "wkt": f"POLYGON (({x0} {y0}, {x1} {y0}, {x1} {y1}, {x0} {y1}, {x0} {y0}))",
        }
        for y0, y1, x0, x1 in roofs
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"features": {"xy": xy}, "metadata": {"width": 0}}), encoding="utf-8")


def _santa_rosa(root: Path, rng: np.random.Generator) -> None:
    import geopandas as gpd
    import pandas as pd
    import rasterio
    from affine import Affine
    from shapely.geometry import box

    rows = []
    for i in range(SANTA_TILES):
        tid = f"{i + 1:08d}"
        ground, roofs = _scene(rng, SANTA_PX, 9)
        destroyed = roofs[::3] if i % 4 else []  # every fourth tile has no change
        pre = _paint(ground, roofs, 215)
        post = _paint(pre, destroyed, 45)
        valid = np.ones((SANTA_PX, SANTA_PX), bool)
        valid[:, :4] = False  # a strip of no-data, as at the edge of an xBD strip
        x0, y0 = 520000.0 + 1000.0 * i, 4260000.0
        transform = Affine(0.5, 0, x0, 0, -0.5, y0)
        profile = {
            "driver": "GTiff",
            "width": SANTA_PX,
            "height": SANTA_PX,
            "count": 3,
            "dtype": "uint8",
            "crs": "EPSG:32610",
            "transform": transform,
        }
        for folder, img in (("pre", pre), ("post", post)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            with (
                rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
                rasterio.open(root / folder / f"{tid}.tif", "w", **profile) as dst,
            ):
                dst.write(img)
                dst.write_mask(valid.astype(np.uint8) * 255)
        label = _mask((SANTA_PX, SANTA_PX), destroyed).astype(np.uint8)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        with rasterio.open(root / "labels" / f"{tid}_destroyed.tif", "w", **{**profile, "count": 1}) as dst:
            dst.write(label[None])
        geoms = [box(x0 + 0.5 * c0, y0 - 0.5 * r1, x0 + 0.5 * c1, y0 - 0.5 * r0) for r0, r1, c0, c1 in roofs]
        subtype = ["destroyed" if r in destroyed else "no-damage" for r in roofs]
        gdf = gpd.GeoDataFrame(
            {"feature_type": "building", "subtype": subtype, "uid": [f"{tid}-{k}" for k in range(len(roofs))]},
            geometry=geoms,
            crs="EPSG:32610",
        ).to_crs("EPSG:4326")
        (root / "buildings").mkdir(parents=True, exist_ok=True)
        gdf.to_file(root / "buildings" / f"{tid}.geojson", driver="GeoJSON")
        rows.append(
            {
                "id": tid,
                "crs": "EPSG:32610",
                "width": SANTA_PX,
                "height": SANTA_PX,
                "pixel_size": 0.5,
                "n_buildings": len(roofs),
                "n_destroyed": len(destroyed),
                "n_major_damage": 0,
                "changed_pixels": int(label.sum()),
                "cluster_id": i,
            }
        )
    pd.DataFrame(rows).to_csv(root / "tiles.csv", index=False)


def write_fake_shared(out: Path, seed: int = 0) -> Path:
    """Write the fake shared-data tree under ``out`` and return ``out``."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    _santa_rosa(out / "xbd-santa-rosa", rng)
    _png_pairs(out / "levir-dev", ["train_1_0000_0000", "val_2_0000_0256"], 64, rng, removed=False)
    _png_pairs(
        out / "whu-cd", ["ucdscm_000001", "ucdscm_000002", "lgpnet_test_1", "lgpnet_train_2"], 120, rng, removed=False
    )
    _png_pairs(out / "xbd-joplin", ["joplin-tornado_00000000"], 96, rng, removed=True)
    return out


if __name__ == "__main__":  # pragma: no cover
    write_fake_shared(Path(sys.argv[1]))
