"""File I/O every stage shares: atomic replacement of outputs and the bounded GDAL environment.

A stage writes into a temporary sibling, then swaps it in: a failed stage therefore never leaves a
half-written output, and the previous output stays readable until the new one is complete. Stages that
read rasters run inside :func:`gdal_env`, which bounds GDAL's block cache, and walk them with
:func:`block_windows`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import rasterio
    from rasterio.windows import Window

GDAL_CACHE_MB = 256
"""GDAL block cache while a stage reads rasters (GDAL's default, 5% of RAM, would dominate peak memory)."""


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing an existing ``dest`` (same filesystem)."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (same suffix, so writers pick the right format).

    On success the file replaces ``dest`` in one step; on error it is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp{dest.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def gdal_env(**options: Any) -> rasterio.Env:
    """A ``rasterio.Env`` whose GDAL block cache is bounded to ``GDAL_CACHE_MB``.

    :func:`pipeline.imagery.align_pair` runs inside one, and so does every CLI stage. Code that reads every
    window of an aligned pair (tiling, detection) outside the CLI should too, or GDAL's cache grows to its
    default of 5% of RAM.
    """
    import rasterio  # here, so that stages without rasters (ledger, report) do not load GDAL

    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20, **options)


def block_windows(width: int, height: int, size: int) -> Iterator[Window]:
    """The ``size`` x ``size`` windows that tile a ``width`` x ``height`` raster, row by row (edges clipped).

    For passes over a whole raster one block at a time (the valid mask, vectorising); the overlapping
    tile grid the detector reads is :func:`pipeline.tiling.make_grid`.
    """
    from rasterio.windows import Window

    for row in range(0, height, size):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(size, height - row))
