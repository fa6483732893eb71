import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["align", "tile", "detect", "vectorize", "ledger", "map", "report", "train", "evaluate", "demo"]


def test_help_lists_every_stage():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in STAGES:
        assert f"  {name} " in result.output


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real console command, as an analyst or DVC runs it."""
    exe = Path(sys.executable).with_name("scarwatch")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_unknown_month_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text('months:\n  "2026-03": {prev: "2026-02"}\n')
    proc = run_cli("tile", "--month", "2026-09", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("scarwatch tile: error:")
    assert "'2026-09' is not in params.yaml" in lines[0]


def test_bad_params_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("tile:\n  size: -3\n")
    proc = run_cli("ledger", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "tile.size" in proc.stderr


@pytest.mark.parametrize("flag", ["-v", "-q"])
def test_missing_params_file(tmp_path, flag):
    proc = run_cli(flag, "--params", "absent.yaml", "ledger", cwd=tmp_path)
    assert proc.returncode == 2
    assert "absent.yaml: parameters file not found" in proc.stderr
