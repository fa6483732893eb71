"""Atomic replacement of stage outputs: a stage writes into a temporary sibling, then swaps it in.

A failed stage therefore never leaves a half-written output, and the previous output stays readable
until the new one is complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path


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
