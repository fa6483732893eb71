"""Run one ``scarwatch`` command with a fault injected at a named point (the reliability tests' driver).

``python tests/fault_driver.py POINT scarwatch-args...``: patches the function at POINT so that it kills the
process with SIGKILL (``kill:``) or raises ENOSPC (``enospc:``), then runs the real CLI. Nothing in the
package knows about it: the faults are injected from outside, as a crash or a full disk would strike.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.environ.get("SCARWATCH_ROOT", "."))


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _enospc() -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _on_call(owner: Any, name: str, fault: Callable[[], None], *, nth: int = 1) -> None:
    """Let ``owner.name`` run ``nth - 1`` times, then strike on the nth call (before it runs)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= nth:
            fault()
        return real(*args, **kwargs)

    setattr(owner, name, patched)


def _truncating_copy() -> None:
    """GDAL's silent failure on a full disk: the COG copy 'succeeds' but leaves a 4 KB file."""
    import rasterio.shutil

    real = rasterio.shutil.copy

    def copy(src: Any, dst: Any, **kw: Any) -> None:
        real(src, dst, **kw)
        with open(dst, "r+b") as fh:
            fh.truncate(4096)

    rasterio.shutil.copy = copy


def _half_copy_then_kill() -> None:
    """A crash in the middle of ``ledger import``'s copy: half the bytes are in the temporary file."""
    import shutil

    def copyfile(src: Any, dst: Any, **kw: Any) -> Any:
        with open(src, "rb") as fh:
            data = fh.read()
        with open(dst, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        _kill()

    shutil.copyfile = copyfile  # type: ignore[assignment]


TARGETS: dict[str, tuple[str, str, int]] = {
    # point: (module[:class], function, strike on the nth call)
    "ledger-before-write": ("pipeline.ledger.build", "write_ledger", 1),
    "ledger-mid-write": ("geopandas:GeoDataFrame", "to_file", 2),  # after the events layer
    "ledger-last-layer": ("geopandas:GeoDataFrame", "to_file", 4),  # before the registry layer
    "before-replace": ("os", "replace", 1),  # the temporary file is complete
    "ledger-before-replace": ("os", "replace", 1),
    "ledger-before-log": ("pipeline.ledger.record", "append_log", 1),
    "ledger-log-write": ("os", "write", 1),
    "detect-mid-raster": ("pipeline.detect:_CogWriter", "write", 1),
    "detect-before-cog": ("rasterio.shutil", "copy", 1),
    "vectorize-gpkg": ("geopandas:GeoDataFrame", "to_file", 1),
    "vectorize-parquet": ("geopandas:GeoDataFrame", "to_parquet", 1),
    "align-valid-mask": ("pipeline.imagery", "_valid_pass", 1),
    "map-write": ("pipeline.publish.maps", "build_map", 1),
    "report-write": ("pipeline.publish.report", "build_report", 1),
    "demo-write": ("pipeline.synth", "generate_demo", 1),
    "import-before-copy": ("pipeline.ledger.importer", "_copy_in", 1),  # checked, nothing written yet
    "import-before-append": ("pipeline.ledger.importer", "build_ledger", 1),  # the copy is in, no event yet
}


def install(point: str) -> None:
    """Patch the function named by ``point``.

    ``kill:<target>``, ``enospc:<target>``, ``detect-truncated-cog`` or ``kill:import-half-copy``.
    """
    import importlib

    kind, _, where = point.partition(":")
    if kind == "detect-truncated-cog":
        _truncating_copy()
        return
    if point == "kill:import-half-copy":
        _half_copy_then_kill()
        return
    if where not in TARGETS or kind not in ("kill", "enospc"):
        raise SystemExit(f"unknown fault point {point!r}")
    module, name, nth = TARGETS[where]
    mod_name, _, cls = module.partition(":")
    owner = importlib.import_module(mod_name)
    if cls:
        owner = getattr(owner, cls)
    _on_call(owner, name, _kill if kind == "kill" else _enospc, nth=nth)


if __name__ == "__main__":
    install(sys.argv[1])
    from pipeline.cli import cli

    cli.main(args=sys.argv[2:], prog_name="scarwatch", obj={})
