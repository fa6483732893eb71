"""Faults through the real CLI (issue 11): SIGKILL at named points and at random times, concurrent runs,
a full disk (injected ENOSPC, and a real one on a small tmpfs where the machine allows). After every fault
the previous output is intact or the new one complete, no temporary file outlives the next run, and no
ledger event is lost. docs/reliability.md lists every case."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.ledger import read_ledger
from tests.conftest import textured, write_tif
from tests.ledger_project import ROOT, cli, make_project, popen
from tests.test_ledger import sq, write_flags

DRIVER = ROOT / "tests" / "fault_driver.py"


def faulty(project: Path, point: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``scarwatch ARGS`` with the fault ``point`` injected (tests/fault_driver.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCARWATCH_ROOT": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(DRIVER), point, *args], cwd=project, capture_output=True, text=True, timeout=180, env=env
    )


def hidden(folder: Path) -> list[str]:
    """Temporary files (hidden names) left in ``folder``."""
    return sorted(p.name for p in folder.rglob(".*") if p.is_file())


def event_ids(project: Path) -> set[str]:
    return set(read_ledger(project / "processed" / "ledger.gpkg")[0]["event_id"])


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode in (1, 2), (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------- the ledger


@pytest.fixture
def ledger_project(tmp_path: Path) -> Path:
    p = make_project(tmp_path)
    assert cli(p, "ledger", "build").returncode == 0
    # one more month of flags, so that every faulty run has events to add
    write_flags(
        p / "processed" / "flags",
        "2026-03",
        [("F-c", "new", sq(300, 0)), ("F-s", "new", sq(1, 1, 24)), ("F-d", "new", sq(1200, 0))],
    )
    return p


LEDGER_KILLS = [
    "kill:ledger-before-write",
    "kill:ledger-mid-write",
    "kill:ledger-last-layer",
    "kill:ledger-before-replace",
    "kill:ledger-before-log",
]


@pytest.mark.parametrize("point", LEDGER_KILLS)
def test_sigkill_of_the_ledger_loses_nothing(ledger_project: Path, point: str) -> None:
    p = ledger_project
    before_ids, before = event_ids(p), (p / "processed" / "ledger.gpkg").read_bytes()
    proc = faulty(p, point, "ledger", "build")
    assert proc.returncode == -signal.SIGKILL
    after = (p / "processed" / "ledger.gpkg").read_bytes()
    if point == "kill:ledger-before-log":
        assert before_ids < event_ids(p)  # the new ledger was in place, only its log line is missing
    else:
        assert after == before  # the live ledger is untouched
    proc = cli(p, "ledger", "build")
    assert proc.returncode == 0, proc.stderr
    assert before_ids <= event_ids(p)
    assert hidden(p / "processed") == []  # the next run removed what the killed one left


def test_sigkill_of_the_ledger_at_random_times(ledger_project: Path) -> None:
    p = ledger_project
    original = event_ids(p)
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 1.8):
        proc = popen(p, "ledger", "build")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        ids = event_ids(p)  # always a readable ledger: the old one or the new one
        assert original <= ids
    assert cli(p, "ledger", "build").returncode == 0
    assert hidden(p / "processed") == []
    assert cli(p, "ledger", "rebuild").returncode == 0


def test_concurrent_ledger_runs_serialise(ledger_project: Path) -> None:
    p = ledger_project
    original = event_ids(p)
    procs = [popen(p, "ledger", "build") for _ in range(3)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outs
    assert original < event_ids(p)
    log = (p / "processed" / "ledger.log.jsonl").read_text().splitlines()
    assert len(log) == 4  # the fixture's build and the three
    assert hidden(p / "processed") == []
    assert cli(p, "ledger", "rebuild").returncode == 0


@pytest.mark.parametrize("point", ["enospc:ledger-mid-write", "enospc:ledger-before-replace"])
def test_a_full_disk_keeps_the_previous_ledger(ledger_project: Path, point: str) -> None:
    p = ledger_project
    before = (p / "processed" / "ledger.gpkg").read_bytes()
    one_error_line(faulty(p, point, "ledger", "build"), "No space left on device")
    assert (p / "processed" / "ledger.gpkg").read_bytes() == before
    assert hidden(p / "processed") == []


def test_a_full_disk_while_logging_is_one_line(ledger_project: Path) -> None:
    p = ledger_project
    one_error_line(faulty(p, "enospc:ledger-log-write", "ledger", "build"), "audit log", "free space")
    assert cli(p, "ledger", "build").returncode == 0  # the next run completes the record


def _mount_tmpfs(target: Path, size: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True)
    return proc.returncode == 0


def test_a_real_full_disk_on_tmpfs(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    p = make_project(tmp_path / "project")
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root and a kernel that allows it)")
    try:
        params = p / "params.yaml"
        params.write_text(params.read_text().replace("processed: processed", f"processed: {disk}"))
        shutil.move(p / "processed" / "flags", disk / "flags")
        assert cli(p, "ledger", "build").returncode == 0
        before = (disk / "ledger.gpkg").read_bytes()
        write_flags(
            disk / "flags",
            "2026-03",
            [("F-c", "new", sq(300, 0)), ("F-s", "new", sq(1, 1, 24)), ("F-x", "new", sq(1300, 0))],
        )
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * max(0, free - 64 * 1024))
        proc = cli(p, "ledger", "build")
        one_error_line(proc)
        assert (disk / "ledger.gpkg").read_bytes() == before
        (disk / "filler").unlink()
        assert cli(p, "ledger", "build").returncode == 0
        assert hidden(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------------------ ledger import

IMPORT_ROWS = [  # a returned sheet, saved by a Chinese-locale Excel (GBK)
    "案件编号 case_id,核查结果 finding,核查日期 checked_at,核查人 inspector",
    "SW-202602-0002,确认,2026/3/12,张三",
    "SW-202602-0001,制止,2026年3月15日,李四",
    "SW-202603-0001,,,",
]


@pytest.fixture(scope="module")
def import_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = make_project(tmp_path_factory.mktemp("import"))
    assert cli(p, "ledger", "build").returncode == 0
    (p / "returned.csv").write_bytes(("\r\n".join(IMPORT_ROWS) + "\r\n").encode("gbk"))
    return p


IMPORT_KILLS = [
    "kill:import-before-copy",  # checked against the live ledger, nothing written
    "kill:import-half-copy",  # half the file in the temporary copy
    "kill:before-replace",  # the temporary copy complete, not yet renamed
    "kill:import-before-append",  # the copy in the folder, the ledger not yet built
    "kill:ledger-mid-write",  # during the GeoPackage write (after the events layer)
    "kill:ledger-before-log",  # the new ledger in place, its audit line not yet written
]


@pytest.mark.parametrize("point", IMPORT_KILLS)
def test_sigkill_of_ledger_import_loses_nothing(import_base: Path, tmp_path: Path, point: str) -> None:
    p = Path(shutil.copytree(import_base, tmp_path / "p"))
    src, folder, ledger = p / "returned.csv", p / "raw" / "field_updates", p / "processed" / "ledger.gpkg"
    before_ids, before = event_ids(p), ledger.read_bytes()
    proc = faulty(p, point, "ledger", "import", "returned.csv")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    copies = [f for f in folder.iterdir() if not f.name.startswith(".") and f.name != "2026-03.csv"]
    assert all(f.read_bytes() == src.read_bytes() for f in copies)  # never a half file under a real name
    assert len(copies) == (0 if point in IMPORT_KILLS[:3] else 1)
    if point == "kill:ledger-before-log":
        assert before_ids < event_ids(p)  # the events are in; only the log line is missing
    else:
        assert ledger.read_bytes() == before  # the live ledger untouched
    rerun = cli(p, "ledger", "import", "returned.csv")  # the inspector's natural next step
    assert rerun.returncode == 0, rerun.stderr
    after = read_ledger(ledger)[0]
    assert before_ids < set(after["event_id"])
    field = after[(after["source"] == "field") & after["evidence"].str.startswith("field_updates/2026-03_")]
    assert sorted(field["kind"]) == ["confirmed", "stopped"]  # each event once
    assert len([f for f in folder.iterdir() if f.name != "2026-03.csv"]) == 1  # one copy, no temp left
    assert hidden(p / "processed") == []
    assert cli(p, "ledger", "rebuild").returncode == 0  # the folder and the ledger agree


# ---------------------------------------------------------------------------- align, detect, vectorize

PARAMS = """\
paths: {raw: raw, interim: interim, processed: processed, reports: reports}
months:
  "2026-02": {prev: "2026-01"}
align: {resolution: delivery}
tile: {size: 64, overlap: 8}
detect: {method: cva, workers: 0, batch_size: 2, cva_sample_tiles: 8}
"""


@pytest.fixture(scope="module")
def raster_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny month through the real align, tile, detect and vectorize (CVA: no checkpoint needed)."""
    p = tmp_path_factory.mktemp("rasters")
    (p / "params.yaml").write_text(PARAMS)
    scene = textured((192, 192), seed=3)
    write_tif(p / "raw" / "imagery" / "2026-01" / "s.tif", scene)
    changed = scene.copy()
    changed[:, 60:100, 60:110] = 250
    write_tif(p / "raw" / "imagery" / "2026-02" / "s.tif", changed)
    for stage in ("align", "tile", "detect", "vectorize"):
        proc = cli(p, stage, "--month", "2026-02")
        assert proc.returncode == 0, proc.stderr
    return p


def _readable_cog(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


@pytest.mark.parametrize("point", ["kill:detect-mid-raster", "kill:detect-before-cog", "kill:before-replace"])
def test_sigkill_of_detect_keeps_the_previous_raster(raster_project: Path, point: str) -> None:
    p, prob = raster_project, raster_project / "processed" / "prob" / "2026-02.tif"
    before = prob.read_bytes()
    proc = faulty(p, point, "detect", "--month", "2026-02")
    assert proc.returncode == -signal.SIGKILL
    assert prob.read_bytes() == before
    assert cli(p, "detect", "--month", "2026-02").returncode == 0
    assert hidden(prob.parent) == []
    _readable_cog(prob)


@pytest.mark.parametrize(
    ("point", "needle"),
    [("detect-truncated-cog", "could not be written whole"), ("enospc:detect-before-cog", "No space left")],
)
def test_a_full_disk_during_detect_is_an_error_not_a_4kb_raster(raster_project: Path, point: str, needle: str) -> None:
    p, prob = raster_project, raster_project / "processed" / "prob" / "2026-02.tif"
    before = prob.read_bytes()
    one_error_line(faulty(p, point, "detect", "--month", "2026-02"), needle)
    assert prob.read_bytes() == before
    assert hidden(prob.parent) == []


def test_two_detect_runs_on_one_month(raster_project: Path) -> None:
    p, prob = raster_project, raster_project / "processed" / "prob" / "2026-02.tif"
    expected = _readable_cog(prob)
    procs = [popen(p, "detect", "--month", "2026-02") for _ in range(2)]
    outs = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    np.testing.assert_array_equal(_readable_cog(prob), expected)
    assert hidden(prob.parent) == []


@pytest.mark.parametrize("point", ["enospc:vectorize-gpkg", "enospc:vectorize-parquet"])
def test_a_full_disk_during_vectorize_keeps_both_flag_files(raster_project: Path, point: str) -> None:
    p, flags = raster_project, raster_project / "processed" / "flags"
    before = {f.name: f.read_bytes() for f in flags.iterdir()}
    one_error_line(faulty(p, point, "vectorize", "--month", "2026-02"), "No space left")
    assert {f.name: f.read_bytes() for f in flags.iterdir()} == before


def test_a_full_disk_during_align_keeps_the_previous_pair(raster_project: Path) -> None:
    p, pair = raster_project, raster_project / "interim" / "aligned" / "2026-02"
    before = {f.name: f.read_bytes() for f in pair.iterdir()}
    one_error_line(faulty(p, "enospc:align-valid-mask", "align", "--month", "2026-02"), "No space left")
    assert {f.name: f.read_bytes() for f in pair.iterdir()} == before
    assert [d.name for d in pair.parent.iterdir()] == ["2026-02"]


def test_sigkill_of_align_leaves_no_temp_folder_behind(raster_project: Path) -> None:
    p, aligned = raster_project, raster_project / "interim" / "aligned"
    proc = faulty(p, "kill:align-valid-mask", "align", "--month", "2026-02")
    assert proc.returncode == -signal.SIGKILL
    assert [d.name for d in aligned.iterdir() if d.name.startswith(".")]  # the killed run's folder
    assert cli(p, "align", "--month", "2026-02").returncode == 0
    assert [d.name for d in aligned.iterdir()] == ["2026-02"]


@pytest.mark.parametrize(("point", "stage"), [("enospc:map-write", "map"), ("enospc:report-write", "report")])
def test_a_full_disk_in_map_and_report_is_one_line(raster_project: Path, point: str, stage: str) -> None:
    one_error_line(faulty(raster_project, point, stage, "--month", "2026-02"), "No space left", "free disk space")


def test_an_unwritable_output_folder_is_one_line(raster_project: Path, tmp_path: Path) -> None:
    import shutil

    p = tmp_path / "copy"
    shutil.copytree(raster_project, p)
    (p / "processed" / "flags").chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        one_error_line(cli(p, "vectorize", "--month", "2026-02"), "Permission denied")
    finally:
        (p / "processed" / "flags").chmod(0o700)
