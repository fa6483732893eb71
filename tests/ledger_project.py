"""A tiny ledger project on disk (params.yaml, flags, seed cases, permits, field updates) and the real CLI.

Used by the store-of-record and the reliability tests: everything goes through ``python -m pipeline.cli``
exactly as DVC runs it, in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.test_ledger import X0, Y0, sq, write_flags, write_permits, write_seeds, write_updates

ROOT = Path(__file__).resolve().parents[1]
MONTHS = ("2026-02", "2026-03")
PARAMS = """\
paths:
  raw: raw
  interim: interim
  processed: processed
  reports: reports
months:
{months}
"""


def write_params(project: Path, months: tuple[str, ...] = MONTHS) -> Path:
    """params.yaml with ``months`` (each compared with the month before)."""
    lines = "".join(f'  "{m}": {{prev: "{m[:5]}{int(m[5:]) - 1:02d}"}}\n' for m in months)
    path = project / "params.yaml"
    path.write_text(PARAMS.format(months=lines), encoding="utf-8")
    return path


def make_project(project: Path) -> Path:
    """A project whose ledger holds seed, imagery, permit and field events (and a field-opened case)."""
    raw = project / "raw"
    write_params(project)
    write_seeds(raw, [{"case_id": "S-1", "state": "stopped", "geometry": sq(0, 0, 20)}])
    write_permits(raw, [("P-1", "2026-01-01", "2026-12-31", sq(500, 500, 60))])
    (raw / "layers").mkdir(parents=True, exist_ok=True)
    flags = project / "processed" / "flags"
    write_flags(
        flags, "2026-02", [("F-b", "new", sq(100, 0)), ("F-a", "new", sq(200, 0)), ("F-p", "new", sq(510, 510))]
    )
    write_flags(flags, "2026-03", [("F-c", "new", sq(300, 0)), ("F-s", "new", sq(1, 1, 24))])
    write_updates(
        raw,
        "2026-03",
        [
            {"at": "2026-03-05", "kind": "confirmed", "case_id": "SW-202602-0001"},
            {"at": "2026-03-09", "kind": "confirmed", "x": X0 + 900, "y": Y0 + 900},
        ],
    )
    return project


def cli(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``scarwatch ARGS`` in ``project`` with this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def popen(project: Path, *args: str) -> subprocess.Popen[str]:
    """Start ``scarwatch ARGS`` in ``project`` (for kill and concurrency tests)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
