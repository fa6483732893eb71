from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest
from maps_report_data import CRS, FLAGS, MONTH, rect, write_inputs

from pipeline.config import ReportSettings
from pipeline.coregister import BlockShift, qa_report
from pipeline.errors import CorruptFileError, InputError, MissingInputError
from pipeline.formats import (
    MU_M2,
    QA_BLOCK_AFTER,
    QA_BLOCK_LAYOUT,
    QA_BLOCK_VALUES,
    QA_BLOCKS,
    QA_FILE,
    QA_KEYS,
)
from pipeline.publish import report

MONTHS = {"month": MONTH, "prev": "2026-02"}


def block(col: int, before: tuple[float, float] | None, texture: float = 0.2) -> BlockShift:
    return BlockShift(col_off=col, row_off=0, width=128, height=128, valid_fraction=1.0, texture=texture, shift=before)


def align_qa(after: list[tuple[float, float] | None], **values: Any) -> dict[str, Any]:
    """A qa.json exactly as the align stage writes it (its values first, then coregister.qa_report's)."""
    before = [block(128 * i, (s[0] - 1.0, s[1] + 1.5) if s else None) for i, s in enumerate(after)]
    shifted = [block(128 * i, s) for i, s in enumerate(after)]
    top = {"month": MONTH, "prev": "2026-02", "max_shift_px": 8.0, "shift_applied_px": [0.5, -0.25]}
    top |= {"histogram_matching": True, "valid_fraction": 0.98, "res": 0.5, "delivery_res": {"prev": 0.5, "curr": 0.5}}
    top |= {"usable": {"ok": True, "reasons": [], "cloud_fraction": 0.01, "textured_fraction": 1.0}}
    qa = {**top, **qa_report(before, shifted, coregister=True)}
    qa.update(values)
    assert list(qa) == [*QA_KEYS, QA_BLOCKS]
    return qa


QA = align_qa([(0.3, 0.4), (0.0, 1.0)])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report")
    paths = write_inputs(root)
    qa = root / "qa.json"
    qa.write_text(json.dumps(QA), encoding="utf-8")
    truth = root / "truth.gpkg"
    rows = [f for f in FLAGS if f[0] in ("F-0301", "F-0302", "F-0304")]
    gpd.GeoDataFrame(
        {
            "month": [MONTH] * 4,
            "kind": [f[2] for f in rows] + ["new"],
            "structure_id": ["s1", "s2", "s3", "s4"],
            "legal": [False] * 4,
            "event": ["build", "build", "demolish", "build"],
        },
        geometry=[rect(f[4], f[5], f[3]) for f in rows] + [rect(1900, 1900, 50.0)],
        crs=CRS,
    ).to_file(truth, layer="changes", driver="GPKG")
    html = report.build_report(
        MONTH,
        paths["ledger"],
        paths["flags"],
        root / "monthly",
        settings=ReportSettings(),
        qa_path=qa,
        truth_path=truth,
        metrics_path=root / "metrics.json",
    )
    return {
        "paths": paths,
        "root": root,
        "html": html.read_text(encoding="utf-8"),
        "md": (root / "monthly" / f"{MONTH}.md").read_text(encoding="utf-8"),
        "metrics": json.loads((root / "metrics.json").read_text(encoding="utf-8")),
    }


def test_new_illegal_construction_excludes_permits(built: dict[str, Any]) -> None:
    m = built["metrics"]
    assert m["month"] == MONTH
    assert m["new_cases"]["count"] == 3
    assert m["new_cases"]["area_m2"] == pytest.approx(450.0)
    assert m["new_cases"]["area_mu"] == pytest.approx(450.0 / MU_M2, abs=1e-3)
    assert [c["case_id"] for c in m["new_cases"]["cases"]] == ["C-001", "C-002", "C-003"]
    assert [c["state"] for c in m["new_cases"]["cases"]] == ["warning", "confirmed", "stopped"]
    assert m["permitted"] == {"count": 1, "area_m2": 300.0, "area_mu": 0.45, "case_ids": ["C-004"]}
    assert m["flags"]["new"]["count"] == 4 and m["flags"]["removed"]["count"] == 1
    assert m["flags"]["new"]["area_m2"] == pytest.approx(750.0)
    by_place = {(r["district"], r["street"]): r["count"] for r in m["by_place"]}
    assert by_place == {("南关区", "a1"): 1, ("南关区", "a2"): 1, ("朝阳区", "b1"): 1}


def test_lifecycle_demolitions_alerts_and_closure(built: dict[str, Any]) -> None:
    m = built["metrics"]
    moved = {k: v["case_ids"] for k, v in m["lifecycle"].items()}
    assert moved["stopped"] == ["C-003"] and moved["demolished"] == ["C-005"]
    assert moved["repaired"] == ["C-006"] and moved["closed"] == ["C-006"] and moved["ordered"] == []
    assert m["demolitions"]["verified"] == ["C-005"]
    assert m["demolitions"]["removed_without_report"] == [] and m["demolitions"]["awaiting_imagery"] == []
    assert m["alerts"]["count"] == 2 and m["alerts"]["by_kind"] == {"expansion_after_stop": 1, "overdue": 1}
    assert m["cases_total"] == 7 and m["cases_active"] == 6 and m["cases_closed"] == 1
    assert m["closure_rate"] == pytest.approx(1 / 6, abs=1e-4)
    assert m["states"]["warning"] == 1 and m["states"]["closed"] == 1  # C-001 closes only in May


def test_qa_and_accuracy(built: dict[str, Any]) -> None:
    m = built["metrics"]
    assert m["qa"]["residual_px"] == {"n": 2, "mean": 0.75, "max": 1.0, "field": "after_px"}
    assert ["prev", "2026-02"] in m["qa"]["rows"] and ["shift_applied_px", "0.5, -0.25"] in m["qa"]["rows"]
    acc = m["accuracy"]
    assert (acc["new"]["tp"], acc["new"]["fp"], acc["new"]["fn"]) == (2, 2, 1)
    assert acc["new"]["precision"] == pytest.approx(0.5) and acc["new"]["recall"] == pytest.approx(2 / 3, abs=1e-3)
    assert (acc["removed"]["tp"], acc["removed"]["fp"], acc["removed"]["fn"]) == (1, 0, 0)
    for scores in (acc, m["accuracy_centroid"]):  # "all" is the sum of the kinds
        for count in ("tp", "fp", "fn"):
            assert scores["all"][count] == scores["new"][count] + scores["removed"][count]
    hit = m["accuracy_centroid"]  # the centroid-hit variant of the same check
    assert set(hit) == {"new", "removed", "all"} and hit["removed"]["tp"] == 1
    assert hit["all"]["tp"] >= acc["all"]["tp"]
    assert "精确率 0.50" in built["html"] and "precision 0.50" in built["html"]


def test_html_is_chinese_first_and_self_contained(built: dict[str, Any]) -> None:
    html = built["html"]
    zh, en = html.index('id="section-zh"'), html.index('id="section-en"')
    assert zh < en
    zh_part, en_part = (re.sub(r"<[^>]+>", "", part) for part in (html[zh:en], html[en:]))
    assert "新增违法建设" in zh_part and "3 处" in zh_part and "450.0 m²" in zh_part and "0.675 亩" in zh_part
    assert "New illegal construction" in en_part and "0.675 mu" in en_part
    for case in ("C-001", "C-002", "C-003"):
        assert case in zh_part and case in en_part
    assert "C-007" not in html
    assert "许可建设（已排除，单独统计）: 1 处, 300.0 m² (0.450 亩) (C-004)" in zh_part  # excluded, but named
    assert "16.7%" in zh_part and "已核验拆除" in zh_part and "逾期" in zh_part
    assert "分块残差位移" in zh_part
    assert "Noto Sans CJK SC" in html  # CJK font stack
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)


def test_markdown_mirrors_the_html(built: dict[str, Any]) -> None:
    md = built["md"]
    assert md.index("# 2026-03 新增违法建设监测月报") < md.index("# 2026-03 Monthly incremental construction report")
    assert "| C-002 | 南关区 a2 | 250.0 | 0.375 | 已发现 |" in md
    assert "| C-002 | 南关区 a2 | 250.0 | 0.375 | confirmed |" in md
    assert "<" not in md.replace("<br>", "")  # no HTML escapes or tags leaked


def test_languages_setting_and_default_metrics_path(built: dict[str, Any], tmp_path: Path) -> None:
    p = built["paths"]
    out = report.build_report(MONTH, p["ledger"], p["flags"], tmp_path, settings=ReportSettings(languages=("en",)))
    html = out.read_text(encoding="utf-8")
    assert 'id="section-en"' in html and 'id="section-zh"' not in html
    metrics = json.loads((tmp_path / f"{MONTH}.json").read_text(encoding="utf-8"))
    assert metrics["qa"] is None and metrics["accuracy"] is None and metrics["accuracy_centroid"] is None
    assert "No co-registration QA file" in html


def test_qa_errors(built: dict[str, Any], tmp_path: Path) -> None:
    p = built["paths"]
    with pytest.raises(MissingInputError, match=r"qa\.json: not found; run the 'align' stage"):
        report.build_report(
            MONTH, p["ledger"], p["flags"], tmp_path, settings=ReportSettings(), qa_path=tmp_path / "qa.json"
        )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptFileError, match=r"bad\.json: not valid JSON"):
        report.build_report(MONTH, p["ledger"], p["flags"], tmp_path, settings=ReportSettings(), qa_path=bad)


@pytest.mark.parametrize(
    ("qa", "expected_rows", "residual"),
    [
        ({}, [], None),
        (  # the align stage's layout: per-block [dx, dy] before and after co-registration
            align_qa([(0.0, -0.1), (0.3, 0.4)], residual_after_median_px=0.1),
            [
                ["month", MONTH],
                ["prev", "2026-02"],
                ["max_shift_px", "8"],
                ["shift_applied_px", "0.5, -0.25"],
                ["histogram_matching", "True"],
                ["valid_fraction", "0.98"],
                ["res", "0.5"],
                ["delivery_res", "prev 0.5, curr 0.5"],
                ["usable", "ok True, reasons [], cloud_fraction 0.01, textured_fraction 1"],
                ["coregister", "True"],
                ["residual_before_median_px", "1.873"],
                ["residual_after_median_px", "0.1"],
                ["blocks_measured", "2"],
                ["blocks", "2 records"],
                ["blocks[].after_px |d|", "n=2, mean=0.300, max=0.500"],
                ["blocks[].before_px |d|", "n=2, mean=1.873, max=2.025"],
                ["blocks[].texture", "n=2, mean=0.200, max=0.200"],
                ["blocks[].valid_fraction", "n=2, mean=1.000, max=1.000"],
            ],
            {"n": 2, "mean": 0.3, "max": 0.5, "field": "after_px"},
        ),
        (  # a flat scene: no block measured
            align_qa([None, None]),
            None,
            None,
        ),
        (  # only the keys align writes are read
            {"rmse_px": 0.25, "blocks": [{"dx": 3.0, "dy": 4.0}], "shift_x": 3},
            [["blocks", "1 records"]],
            None,
        ),
    ],
)
def test_summarize_qa_reads_the_keys_align_writes(
    qa: Any, expected_rows: list[list[str]] | None, residual: Any
) -> None:
    out = report.summarize_qa(qa)
    if expected_rows is not None:
        assert out["rows"][: len(expected_rows)] == expected_rows
    assert out["residual_px"] == residual


def test_summarize_qa_reads_every_key_of_a_real_align(tmp_path: Path) -> None:
    from affine import Affine
    from conftest import textured, write_tif

    from pipeline.config import AlignSettings
    from pipeline.imagery import align_pair

    transform = Affine(0.5, 0, 500000.0, 0, -0.5, 4862000.0)
    curr = textured((512, 512), seed=7)
    write_tif(tmp_path / "curr" / "c.tif", curr, transform=transform)
    write_tif(tmp_path / "prev" / "p.tif", curr, transform=transform * Affine.translation(2.3, -1.6))
    align_pair(tmp_path / "prev", tmp_path / "curr", tmp_path / "out", AlignSettings(normalize=False), **MONTHS)
    qa = json.loads((tmp_path / "out" / QA_FILE).read_text(encoding="utf-8"))
    assert list(qa) == [*QA_KEYS, QA_BLOCKS]  # formats.py spells what align writes
    assert {k for b in qa[QA_BLOCKS] for k in b} == {*QA_BLOCK_LAYOUT, *QA_BLOCK_VALUES}
    out = report.summarize_qa(qa)
    assert [r[0] for r in out["rows"][: len(QA_KEYS)]] == [k for k in QA_KEYS if qa[k] is not None]
    measured = [b[QA_BLOCK_AFTER] for b in qa[QA_BLOCKS] if b[QA_BLOCK_AFTER]]
    assert out["residual_px"]["n"] == len(measured) == qa["blocks_measured"] > 0
    assert out["residual_px"]["max"] == pytest.approx(max(math.hypot(*s) for s in measured), abs=1e-3)


def test_a_ledger_the_ledger_stage_did_not_write_is_refused(built: dict[str, Any], tmp_path: Path) -> None:
    """The view reads the ledger as the store writes it and back-fills nothing: a hand-made one is refused."""
    p = built["paths"]
    ledger = tmp_path / "ledger.gpkg"
    cases = gpd.read_file(p["ledger"], layer="cases").drop(columns=["first_month"])
    cases.to_file(ledger, layer="cases", driver="GPKG")
    gpd.read_file(p["ledger"], layer="events").to_file(ledger, layer="events", driver="GPKG")
    with pytest.raises(InputError, match=r"layer 'cases' lacks columns \['first_month'\].*run the 'ledger' stage"):
        report.build_report(MONTH, ledger, p["flags"], tmp_path, settings=ReportSettings())
    gpd.read_file(p["ledger"], layer="cases").to_file(ledger, layer="cases", driver="GPKG")
    with pytest.raises(CorruptFileError, match=r"layer 'alerts' is missing .*run the 'ledger' stage"):
        report.build_report(MONTH, ledger, p["flags"], tmp_path, settings=ReportSettings())


def test_accuracy_never_matches_a_flag_to_a_truth_of_the_other_kind(tmp_path: Path) -> None:
    """Decision: the report's "all" sums the kinds, as metrics.flag_scores does; kinds are not pooled."""
    geom = rect(0, 0, 100.0)
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame({"month": [MONTH], "kind": ["removed"]}, geometry=[geom], crs=CRS).to_file(truth, layer="changes")
    flags = gpd.GeoDataFrame({"month": [MONTH], "kind": ["new"]}, geometry=[geom], crs=CRS)
    for scores in report.accuracy(MONTH, flags, truth).values():
        assert (scores["new"]["tp"], scores["new"]["fp"], scores["removed"]["fn"]) == (0, 1, 1)
        assert (scores["all"]["tp"], scores["all"]["fp"], scores["all"]["fn"]) == (0, 1, 1)
