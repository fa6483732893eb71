"""The notebooks run top to bottom (nbclient), so they never rot.

``01_monthly_review`` runs on a small generated month: the map/report fixture's flags, ledger and layers
(tests/maps_report_data.py) and a real aligned pair written by ``align_pair`` over the same ground;
``02_model_evaluation`` on the committed ``models/metrics.json`` (its worst tiles' images only where ../shared/data is).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from affine import Affine
from conftest import textured, write_tif
from maps_report_data import FLAGS, MONTH, X0, Y0, write_inputs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow


def run_notebook(name: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> object:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's pipeline
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # make exports Agg
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def small_project(root: Path) -> Path:
    """A params.yaml whose paths hold one generated month (flags, ledger, layers, aligned pair)."""
    from pipeline.config import AlignSettings
    from pipeline.imagery import align_pair

    processed = root / "processed"
    write_inputs(processed)
    (root / "raw").mkdir()
    shutil.move(processed / "layers", root / "raw" / "layers")
    transform = Affine(4.0, 0, X0, 0, -4.0, Y0 + 2000)
    ground = textured((500, 500), seed=3)
    curr = ground.copy()
    for _, month, kind, area, x, y, _, _ in FLAGS:  # bright roofs where the month's new flags are
        if month == MONTH and kind == "new":
            side = int(area**0.5 / 4) + 1
            row, col = int((2000 - y) / 4) - side, int(x / 4)
            curr[:, max(row, 0) : row + side, col : col + side] = 240
    write_tif(root / "raw" / "imagery" / "2026-02" / "a.tif", ground, transform=transform)
    write_tif(root / "raw" / "imagery" / MONTH / "a.tif", curr, transform=transform)
    align_pair(
        root / "raw" / "imagery" / "2026-02",
        root / "raw" / "imagery" / MONTH,
        root / "interim" / "aligned" / MONTH,
        AlignSettings(resolution="delivery", normalize=False),
        month=MONTH,
        prev="2026-02",
    )
    params = {
        "paths": {"raw": "raw", "interim": "interim", "processed": "processed", "reports": "reports"},
        "months": {MONTH: {"prev": "2026-02"}},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def _outputs(nb: object) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]  # type: ignore[attr-defined]


def test_monthly_review_runs_on_a_generated_month(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = small_project(tmp_path)
    nb = run_notebook("01_monthly_review.ipynb", monkeypatch, SCARWATCH_PARAMS=str(params), SCARWATCH_MONTH=MONTH)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1  # the imagery behind the flags
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("C-008" in h for h in html)  # this month's alerts only: C-008 and C-005
    assert any("folium" in h or "leaflet" in h.lower() for h in html)  # the inline map
    assert np.isfinite(len(outputs))


def test_model_evaluation_runs_on_the_committed_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    nb = run_notebook("02_model_evaluation.ipynb", monkeypatch)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1  # the calibration curves
    text = " ".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", "")) for o in outputs)
    assert "demo-town" in text and "santa-rosa" in text
    per_tile = json.loads((ROOT / "models" / "metrics.json").read_text())["flags"]["santa-rosa"]["per_tile"]
    worst = min(per_tile, key=lambda t: (per_tile[t]["removed_iou50"]["f1"], -per_tile[t]["truth"]))
    assert worst in text  # the worst held-out tile by its F1 heads the table
