"""Issued report versions: v1 archived when a month is first reported, v2 with a revision note when a late
field update changes that month, nothing new for a rerun with the same figures."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import ReportSettings
from pipeline.errors import CorruptFileError
from pipeline.publish.report import build_report
from tests.test_ledger import write_updates
from tests.test_ledger_semantics import MAR, build, make_town

SETTINGS = ReportSettings(pdf=False)


def report(root: Path, ledger: Path, settings: ReportSettings = SETTINGS) -> Path:
    """The March report as the report stage writes it (reports/monthly, metrics, issued)."""
    reports = root / "reports"
    return build_report(
        MAR,
        ledger,
        root / "flags" / f"{MAR}.gpkg",
        reports / "monthly",
        settings=settings,
        metrics_path=reports / "metrics" / f"{MAR}.json",
        issued_dir=reports / "issued",
    )


def dvc_cleans_outputs(root: Path) -> None:
    """What `dvc repro` does before rerunning the report stage: its outputs are deleted."""
    for path in (root / "reports" / "monthly").glob(f"{MAR}.*"):
        path.unlink()
    (root / "reports" / "metrics" / f"{MAR}.json").unlink()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def town(tmp_path: Path) -> tuple[Path, Path]:
    make_town(tmp_path)
    return tmp_path, build(tmp_path)


def test_the_first_report_is_issued_as_v1(town: tuple[Path, Path]) -> None:
    root, ledger = town
    html = report(root, ledger)
    v1 = root / "reports" / "issued" / MAR / "v1"
    assert sorted(p.name for p in v1.iterdir()) == sorted(
        [f"{MAR}.html", f"{MAR}.md", f"{MAR}.json", "states.json", "manifest.json"]
    )
    manifest = json.loads((v1 / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["month"], manifest["version"], manifest["revision"]) == (MAR, 1, None)
    assert manifest["files"] == {p.name: sha(p) for p in v1.iterdir() if p.name != "manifest.json"}
    import pyogrio

    assert manifest["ledger_events"] == pyogrio.read_info(ledger, layer="events")["features"] == 19  # 5 dispatches
    assert manifest["headline"]["rebuilds"] == 1 and manifest["headline"]["closure_rate"] == 0.25
    assert "report_version" not in manifest["headline"]  # the version is no figure of the month
    assert json.loads((v1 / "states.json").read_text(encoding="utf-8"))["S-1"] == "warning"
    # what was sent is what the monthly folder shows, and it names its version
    assert (v1 / f"{MAR}.html").read_bytes() == html.read_bytes()
    assert "第 1 版，签发于" in html.read_text(encoding="utf-8") and "Version 1, issued" in html.read_text(
        encoding="utf-8"
    )
    metrics = json.loads((root / "reports" / "metrics" / f"{MAR}.json").read_text(encoding="utf-8"))
    assert metrics["report_version"] == 1


def test_a_rerun_with_the_same_figures_issues_nothing(town: tuple[Path, Path]) -> None:
    root, ledger = town
    report(root, ledger)
    v1 = root / "reports" / "issued" / MAR / "v1"
    before = snapshot(v1)
    dvc_cleans_outputs(root)
    build(root)  # the ledger stage reruns too: the same inputs, the same ledger
    report(root, ledger)
    report(root, ledger, ReportSettings(pdf=False, languages=("en",)))  # a cosmetic rerender: other layout
    assert sorted(p.name for p in (root / "reports" / "issued" / MAR).iterdir()) == ["v1"]
    assert snapshot(v1) == before
    html = (root / "reports" / "monthly" / f"{MAR}.html").read_text(encoding="utf-8")
    assert "Version 1, issued" in html and "Revision note" not in html


def test_a_late_field_update_issues_v2_with_a_revision_note(town: tuple[Path, Path]) -> None:
    root, ledger = town
    report(root, ledger)
    v1 = root / "reports" / "issued" / MAR / "v1"
    before = snapshot(v1)
    # after March was reported, inspectors return March's sheet: S-3 was stopped and S-1 confirmed on site
    write_updates(
        root / "raw",
        MAR,
        [
            {"at": "2026-03-20", "kind": "stopped", "case_id": "S-3"},
            {"at": "2026-03-21", "kind": "confirmed", "case_id": "S-1"},
        ],
    )
    dvc_cleans_outputs(root)
    build(root)
    html = report(root, ledger)
    assert snapshot(v1) == before  # what was sent upward stays as it was
    v2 = root / "reports" / "issued" / MAR / "v2"
    manifest = json.loads((v2 / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["version"] == 2 and manifest["ledger_events"] == 21
    rev = manifest["revision"]
    assert rev["from_version"] == 1
    changed = {r["figure"]: (r["old"], r["new"]) for r in rev["figures"]}
    # S-1's rebuild alert and its field check falling overdue are answered by the confirmation (the other
    # warning's check stays overdue); S-1 was confirmed before (seed), so to date stays 3
    assert changed == {"confirmed": (0, 1), "stopped": (0, 1), "stopped_to_date": (0, 1), "alerts": (3, 1)}
    assert rev["cases"] == [
        {"case_id": "S-1", "old": "warning", "new": "confirmed"},
        {"case_id": "S-3", "old": "confirmed", "new": "stopped"},
    ]
    note = (v2 / "revision.md").read_text(encoding="utf-8")
    assert "v2 replaces v1" in note and "| stopped | 0 | 1 |" in note and "| S-3 | confirmed | stopped |" in note
    # the monthly report shows the latest version and its revision note, in both languages
    page = html.read_text(encoding="utf-8")
    assert (v2 / f"{MAR}.html").read_text(encoding="utf-8") == page
    assert "第 2 版，签发于" in page and "修订说明：本版（第 2 版）替代" in page
    assert "Revision note: this version (2) replaces version 1" in page
    assert (
        "<td>S-3</td><td>confirmed</td><td>stopped</td>" in page
        and "<td>S-3</td><td>已发现</td><td>已制止</td>" in page
    )
    md = (root / "reports" / "monthly" / f"{MAR}.md").read_text(encoding="utf-8")
    assert "| stopped | 0 | 1 |" in md
    assert json.loads((root / "reports" / "metrics" / f"{MAR}.json").read_text(encoding="utf-8"))["report_version"] == 2
    # and a rerun after it issues no v3
    dvc_cleans_outputs(root)
    report(root, ledger)
    assert sorted(p.name for p in (root / "reports" / "issued" / MAR).iterdir()) == ["v1", "v2"]


def test_a_damaged_issued_version_is_refused_not_overwritten(town: tuple[Path, Path]) -> None:
    root, ledger = town
    report(root, ledger)
    manifest = root / "reports" / "issued" / MAR / "v1" / "manifest.json"
    manifest.write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptFileError, match=r"v1/manifest\.json: unreadable .*restore it from the backup"):
        report(root, ledger)
    assert manifest.read_text(encoding="utf-8") == "{not json"


def test_without_an_issued_folder_the_report_is_a_preview(town: tuple[Path, Path], tmp_path: Path) -> None:
    root, ledger = town
    out = tmp_path / "preview"
    html = build_report(MAR, ledger, root / "flags" / f"{MAR}.gpkg", out, settings=SETTINGS)
    assert "Version" not in html.read_text(encoding="utf-8")
    assert json.loads((out / f"{MAR}.metrics.json").read_text(encoding="utf-8"))["report_version"] is None
    shutil.rmtree(out)
