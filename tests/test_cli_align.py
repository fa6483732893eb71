"""Bad imagery deliveries through the real `scarwatch align` command: one line, exit 2, nothing written."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from tests.conftest import textured, write_tif

T = Affine(0.5, 0, 500000.0, 0, -0.5, 4862000.0)
FAR = Affine(0.5, 0, 600000.0, 0, -0.5, 4962000.0)


def _good(folder: Path) -> None:
    write_tif(folder / "s.tif", textured((128, 128), seed=1), transform=T)


def _no_crs(folder: Path) -> None:
    write_tif(folder / "s.tif", textured((128, 128)), crs=None, transform=T)


def _corrupt(folder: Path) -> None:
    _good(folder)
    data = (folder / "s.tif").read_bytes()
    (folder / "s.tif").write_bytes(data[: len(data) // 3])


def _five_bands(folder: Path) -> None:
    write_tif(folder / "s.tif", textured((128, 128), bands=5), transform=T)


def _far_away(folder: Path) -> None:
    write_tif(folder / "s.tif", textured((128, 128)), transform=FAR)


def _uint16(folder: Path) -> None:
    write_tif(folder / "s.tif", textured((128, 128)).astype(np.uint16) * 40, transform=T)


def _all_nodata(folder: Path) -> None:
    write_tif(folder / "s.tif", np.zeros((3, 128, 128), np.uint8), transform=T, nodata=0)


def _empty(folder: Path) -> None:
    folder.mkdir(parents=True)


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing CRS", _no_crs, r"s\.tif: .*CRS"),
    ("corrupt file", _corrupt, r"s\.tif: "),
    ("band count", _five_bands, r"3 band\(s\) uint8 but the current epoch .* has 5 uint8"),
    ("no overlap", _far_away, r"overlap"),
    ("16-bit without scaling", _uint16, r"scale16"),
    ("all nodata", _all_nodata, r"nodata"),
    ("empty folder", _empty, r"2026-02"),
]


@pytest.mark.parametrize(("name", "make_curr", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_delivery_is_one_line_exit_2_and_writes_nothing(tmp_path, name, make_curr, pattern):
    raw = tmp_path / "raw"
    _good(raw / "imagery" / "2026-01")
    make_curr(raw / "imagery" / "2026-02")
    checkpoint = Path(__file__).resolve().parents[1] / "models" / "scarnet.pt"
    (tmp_path / "params.yaml").write_text(
        f'paths:\n  raw: {raw}\n  interim: {tmp_path / "interim"}\nmonths:\n  "2026-02": {{prev: "2026-01"}}\n'
        f"detect:\n  model: {checkpoint}\n"
    )
    exe = Path(sys.executable).with_name("scarwatch")
    proc = subprocess.run(
        [str(exe), "align", "--month", "2026-02"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    *warnings, error = proc.stderr.strip().splitlines()  # one error line, last; warnings (one line each) before it
    assert all(w.startswith("WARNING ") for w in warnings), proc.stderr
    assert error.startswith("scarwatch align: error: ")
    assert re.search(pattern, error), error
    assert not (tmp_path / "interim" / "aligned" / "2026-02").exists()
    leftovers = list((tmp_path / "interim").rglob("*")) if (tmp_path / "interim").exists() else []
    assert [p for p in leftovers if p.is_file()] == []


def test_a_pair_json_pointing_out_of_the_data_folder_is_refused_by_the_next_stage(tmp_path):
    # pair.json is a file on disk: a sheet path edited to lead out of paths.raw stops `tile` (one line, exit 2)
    # before any sheet is opened, and nothing is written.
    raw = tmp_path / "raw"
    _good(raw / "imagery" / "2026-01")
    _good(raw / "imagery" / "2026-02")
    _good(tmp_path / "elsewhere")
    checkpoint = Path(__file__).resolve().parents[1] / "models" / "scarnet.pt"
    (tmp_path / "params.yaml").write_text(
        f'paths:\n  raw: {raw}\n  interim: {tmp_path / "interim"}\nmonths:\n  "2026-02": {{prev: "2026-01"}}\n'
        f"detect:\n  model: {checkpoint}\n"
    )
    exe = Path(sys.executable).with_name("scarwatch")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(exe), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert run("align", "--month", "2026-02").returncode == 0
    meta_path = tmp_path / "interim" / "aligned" / "2026-02" / "pair.json"
    meta_path.write_text(meta_path.read_text().replace("imagery/2026-01/s.tif", "../elsewhere/s.tif"))
    proc = run("tile", "--month", "2026-02")
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"pair\.json: the prev sheet .*elsewhere.s\.tif lies outside the data folder .*raw", error)
    assert not (tmp_path / "interim" / "tiles").exists()
