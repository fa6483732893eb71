"""Files between stages: atomic outputs, the bounded GDAL environment, the one checked layer reader.

A stage writes into a temporary sibling, then swaps it in (:func:`atomic_path`, :func:`replace_dir`): a
failed stage never leaves a half-written output, and the previous output stays readable until the new one
is complete. Stages that read rasters run inside :func:`gdal_env`, which bounds GDAL's block cache, and
walk them with :func:`block_windows`. :func:`read_layer` reads one GeoPackage layer and turns every
failure into one error that names the file, the layer and the fix.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import CorruptFileError, CRSError, InputError, MissingInputError

if TYPE_CHECKING:
    import geopandas as gpd
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


def temp_name(dest: Path, tag: str = "tmp") -> Path:
    """A temporary file beside ``dest`` that no other process uses: ``.<stem>.<pid>-<random>.<tag><suffix>``.

    Two runs on one output (two ``detect --month`` at once) never share it; the pid in the name lets
    :func:`remove_stale_temps` clear what a killed run left.
    """
    dest = Path(dest)
    return dest.with_name(f".{dest.stem}.{os.getpid()}-{secrets.token_hex(4)}.{tag}{dest.suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(dest: Path, *, stem: str | None = None) -> list[Path]:
    """Remove the temporary files of ``dest`` that killed runs left (their process is gone).

    Matches :func:`temp_name`'s files (and SQLite's ``-journal``/``-wal``/``-shm`` beside them) and
    :func:`temp_dir`'s folders (``stem``: the folder's whole name); those of a live process are kept.
    Returns what was removed.
    """
    dest = Path(dest)
    removed: list[Path] = []
    if not dest.parent.is_dir():
        return removed
    prefix = f".{stem or dest.stem}."
    for path in dest.parent.iterdir():
        name = path.name
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix) :].split("-", 1)[0].split(".", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if path.is_dir() and not path.is_symlink():  # a temporary folder (align, demo: :func:`temp_dir`)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def temp_dir(dest: Path) -> Path:
    """Create a temporary folder beside ``dest`` for :func:`replace_dir`, first removing killed runs' ones.

    Named ``.<name>.<pid>-<random>`` so that :func:`remove_stale_temps` can tell a dead run's folder.
    """
    import tempfile

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest, stem=dest.name)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}-", dir=dest.parent))


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (same suffix, so writers pick the right format).

    On success the file replaces ``dest`` in one step; on error it is removed and ``dest`` is untouched.
    Temporary files that killed runs left beside ``dest`` are removed first.
    """
    with atomic_paths([dest]) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(dests: Sequence[Path]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for outputs that belong together (flags GeoPackage + GeoParquet): one generation.

    Yields one temporary path per destination. Nothing is replaced until every temporary file is written;
    then all are moved in (the last destination last); if a move fails, the ones already moved are put
    back from hard-linked backups, so the outputs are either all old or all new.
    """
    dests = [Path(d) for d in dests]
    for dest in dests:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)
    tmps = [temp_name(d) for d in dests]
    backups: list[tuple[Path, Path]] = []
    try:
        yield tmps
        for dest in dests if len(dests) > 1 else ():  # one file needs no backup: os.replace is atomic
            if dest.exists():
                backup = temp_name(dest, "bak")
                os.link(dest, backup)
                backups.append((backup, dest))
        done: list[Path] = []
        try:
            for tmp, dest in zip(tmps, dests, strict=True):
                os.replace(tmp, dest)
                done.append(dest)
        except BaseException:
            for backup, dest in backups:
                if dest in done:
                    os.replace(backup, dest)
            for dest in done:
                if not any(d == dest for _, d in backups):
                    dest.unlink(missing_ok=True)
            raise
    finally:
        for path in [*tmps, *(b for b, _ in backups)]:
            path.unlink(missing_ok=True)


def tree_manifest(folder: Path, *, skip: Sequence[str] = ()) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file under ``folder`` (names in ``skip`` left out)."""
    import hashlib

    out: dict[str, str] = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel in skip or not path.is_file():
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


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


def read_layer(
    path: Path,
    layer: str | None = None,
    *,
    what: str,
    fix: str,
    columns: Sequence[str] = (),
) -> gpd.GeoDataFrame:
    """Read one layer of a GeoPackage, checked: the one reader of the vector layers the stages exchange.

    Every failure is one error whose message names the file, the layer and the fix, in the form
    ``<path>: <problem>; <fix> (<what>[, layer <layer>])``.

    Args:
        path: the GeoPackage (or another vector file GDAL reads).
        layer: the layer to read; None reads the file's first layer (one-layer files such as
            ``layers/streets.gpkg``, whatever their layer is called).
        what: what the file holds, for the message (``"the ledger"``, ``"permits"``).
        fix: what gets a good file, for the message (``"run the 'ledger' stage"``); said after every problem.
        columns: columns the layer must have.

    Returns:
        The layer in its stored CRS.

    Raises:
        MissingInputError: the file does not exist.
        CorruptFileError: the file or the layer cannot be read, or the layer is not in the file.
        InputError: the layer lacks one of ``columns``.
        CRSError: the layer has no CRS.
    """
    import geopandas as gpd
    import pyogrio

    path = Path(path)
    named = "the first layer" if layer is None else f"layer {layer!r}"
    if not path.is_file():
        raise MissingInputError(f"{path}: not found; {fix} ({what}, {named})")
    try:
        layers = [str(name) for name in pyogrio.list_layers(path)[:, 0]]
    except Exception as exc:  # noqa: BLE001 - GDAL raises many types for a corrupt file
        raise CorruptFileError(f"{path}: cannot be read as a GeoPackage ({exc}); {fix} ({what}, {named})") from exc
    if layer is None and not layers:
        raise CorruptFileError(f"{path}: holds no layer; {fix} ({what})")
    name = layers[0] if layer is None else layer
    if name not in layers:
        raise CorruptFileError(f"{path}: layer {name!r} is missing (the file has {layers!r}); {fix} ({what})")
    try:
        frame = gpd.read_file(path, layer=name, engine="pyogrio")
    except Exception as exc:  # noqa: BLE001
        raise CorruptFileError(f"{path}: layer {name!r} cannot be read ({exc}); {fix} ({what})") from exc
    if frame.crs is None:
        raise CRSError(f"{path}: layer {name!r} has no CRS; {fix} ({what})")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(
            f"{path}: layer {name!r} lacks columns {missing!r} (it has {list(frame.columns)!r}); {fix} ({what})"
        )
    return frame
