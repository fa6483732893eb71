"""`scarwatch demo` and `dvc repro` never discard a user's edits under the demo folder (issue 11)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ledger_project import ROOT, cli

SMALL = "demo:\n  out: data/demo\n  size_m: 300.0\n  n_months: 2\n"


def test_demo_refuses_to_overwrite_edits(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(SMALL)
    assert cli(tmp_path, "demo").returncode == 0
    assert cli(tmp_path, "demo").returncode == 0  # unchanged: regenerated
    edited = next((tmp_path / "data/demo/field_updates").glob("*.csv"))
    edited.write_text(edited.read_text() + "\n", encoding="utf-8")
    proc = cli(tmp_path, "demo")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"1 files changed since the demo wrote them (field_updates/{edited.name})" in proc.stderr
    assert edited.read_text().endswith("\n\n")
    (tmp_path / "data/demo/mine.txt").write_text("mine")
    assert "2 files changed" in cli(tmp_path, "demo").stderr
    proc = cli(tmp_path, "demo", "--force")
    assert proc.returncode == 0 and not (tmp_path / "data/demo/mine.txt").exists()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(SMALL)
    (tmp_path / "data/demo").mkdir(parents=True)
    (tmp_path / "data/demo/cases.gpkg").write_text("a city's own data")
    proc = cli(tmp_path, "demo")
    assert proc.returncode == 2 and "was not written by `scarwatch demo`" in proc.stderr
    assert (tmp_path / "data/demo/cases.gpkg").read_text() == "a city's own data"


@pytest.mark.slow
def test_dvc_repro_keeps_an_edit_under_the_demo_folder(tmp_path: Path) -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"demo": stages["demo"]}}))
    (tmp_path / "params.yaml").write_text(SMALL)
    for dep in ("pipeline",):
        os.symlink(ROOT / dep, tmp_path / dep)
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }

    def dvc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / "dvc"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )

    assert dvc("init", "--no-scm", "-q").returncode == 0
    first = dvc("repro")
    assert first.returncode == 0, first.stdout + first.stderr
    edited = next((tmp_path / "data/demo/field_updates").glob("*.csv"))
    text = edited.read_text(encoding="utf-8") + "2026-02-20,confirmed,inspector,edited by hand,,,1,1\n"
    edited.write_text(text, encoding="utf-8")
    second = dvc("repro")
    assert second.returncode != 0
    assert "files changed since the demo wrote them" in second.stdout + second.stderr
    assert edited.read_text(encoding="utf-8") == text  # the edit survived dvc repro
