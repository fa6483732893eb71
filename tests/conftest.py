"""Shared fixtures: tiny seeded rasters and the path to ../shared/data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


def write_tif(
    path: Path,
    array: np.ndarray,
    *,
    crs: str | None = "EPSG:4551",
    transform: Affine | None = None,
    nodata: float | None = None,
    mask: np.ndarray | None = None,
    compress: str = "deflate",
    tiled: bool = True,
    blocksize: int = 256,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write ``array`` ((bands, h, w) or (h, w)) as a GeoTIFF; ``mask`` (h, w bool) becomes an internal mask."""
    arr = array if array.ndim == 3 else array[None]
    count, height, width = arr.shape
    profile: dict[str, object] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": arr.dtype.name,
        "transform": transform or Affine(0.5, 0, 500000.0, 0, -0.5, 4862000.0),
        "compress": compress,
    }
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled and width >= blocksize and height >= blocksize:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)
        if mask is not None:
            dst.write_mask(mask.astype("uint8") * 255)
        if tags:
            dst.update_tags(**tags)
    return path


def textured(shape: Sequence[int], seed: int = 0, bands: int = 3) -> np.ndarray:
    """A smooth random uint8 texture of shape (bands, h, w): something phase correlation can lock on."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    h, w = shape
    base = gaussian_filter(rng.normal(size=(h, w)), 3) * 60 + gaussian_filter(rng.normal(size=(h, w)), 12) * 200
    out = np.stack([base * (0.8 + 0.2 * b) for b in range(bands)])
    return np.clip(out + 128, 1, 255).astype("uint8")


@pytest.fixture(scope="session")
def fake_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded fake of ../shared/data in the real layouts (tests/data/fake_shared.py)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from fake_shared import write_fake_shared

    return write_fake_shared(tmp_path_factory.mktemp("fake-shared"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests cleanly without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
