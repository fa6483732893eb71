from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from maps_report_data import CRS, FLAGS, MONTH, FakePair, fake_open, rect, write_inputs

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
from pipeline.publish.league import cut, league_table

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


ROOT = Path(__file__).resolve().parents[1]


def _can_print() -> bool:
    try:
        import weasyprint  # noqa: F401
    except (ImportError, OSError):  # OSError: Pango is missing
        return False
    return True


CAN_PRINT = _can_print()
needs_pdf = pytest.mark.skipif(not CAN_PRINT, reason="needs WeasyPrint and Pango (pip install -e .; make sysdeps)")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from pipeline.pair import AlignedPair

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
    pair = FakePair()
    with pytest.MonkeyPatch.context() as mp:  # the thumbnails read the fake pair as AlignedPair.open would
        mp.setattr(AlignedPair, "open", classmethod(lambda cls, path: fake_open(pair)))
        html = report.build_report(
            MONTH,
            paths["ledger"],
            paths["flags"],
            root / "monthly",
            settings=ReportSettings(pdf=CAN_PRINT),
            qa_path=qa,
            truth_path=truth,
            metrics_path=root / "metrics.json",
            layers_dir=paths["layers"],
            pair_dir=root,
            prev_month="2026-02",
            model_path=ROOT / "models" / "scarnet.pt",
            model_metrics_path=ROOT / "models" / "metrics.json",
            params_path=ROOT / "params.yaml",
            params={"vectorize": {"min_area_m2": 12.0}},
        )
    return {
        "paths": paths,
        "root": root,
        "pair": pair,
        "html": html.read_text(encoding="utf-8"),
        "md": (root / "monthly" / f"{MONTH}.md").read_text(encoding="utf-8"),
        "metrics": json.loads((root / "monthly" / f"{MONTH}.json").read_text(encoding="utf-8")),
        "headline": json.loads((root / "metrics.json").read_text(encoding="utf-8")),
        "pdf": root / "monthly" / f"{MONTH}.pdf",
        "trend": (root / "monthly" / f"{MONTH}.trend.csv").read_text(encoding="utf-8"),
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
    assert "New warnings this month" in en_part and "0.675 mu" in en_part
    for case in ("C-001", "C-002", "C-003"):
        assert case in zh_part and case in en_part
    assert "C-007" not in html
    assert "许可建设（已排除，单独统计）: 1 处, 300.0 m² (0.450 亩) (C-004)" in zh_part  # excluded, but named
    assert "16.7%" in zh_part and "已核验拆除" in zh_part and "逾期" in zh_part
    assert "分块残差中位数" in zh_part and "两期有效覆盖率: 98.0%" in zh_part
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


# --------------------------------------------------------------------------- the report that goes upward


def _flat(text: str) -> str:
    return " ".join(text.split())


@needs_pdf
@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="needs poppler-utils (make sysdeps)")
def test_pdf_text_holds_the_ledgers_headline_numbers(built: dict[str, Any]) -> None:
    pdf = built["pdf"]
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert "A4" in info
    fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
    cjk = [line for line in fonts.splitlines() if "CJK" in line]
    assert cjk and all(" yes " in line for line in cjk)  # the CJK fonts are embedded
    text = _flat(subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout)
    m = built["metrics"]
    n, a = m["new_cases"]["count"], m["new_cases"]
    assert (n, a["area_m2"]) == (3, 450.0)  # the ledger's: C-001..C-003, 120 + 250 + 80 m²
    assert f"本月新增预警（违法建设）: {n} 处, {a['area_m2']:.1f} m² ({a['area_mu']:.3f} 亩)" in text
    assert f"New warnings this month (illegal construction): {n}, {a['area_m2']:.1f} m² ({a['area_mu']:.3f} mu)" in text
    # C-008's flag (20 x 10 m) grows its 200 m² square footprint by 58.6 m²
    assert "扩建: 1 处, 58.6 m² (0.088 亩) (C-008)" in text and "Expansions: 1, 58.6 m² (0.088 mu) (C-008)" in text
    assert "本月违法建设合计（新增 + 反弹 + 扩建）: 4 处, 508.6 m²" in text
    assert text.index("新增违法建设监测月报") < text.index("Monthly incremental construction report")
    for case in ("C-001", "C-002", "C-003", "C-005"):
        assert case in text


@needs_pdf
@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="needs poppler-utils (make sysdeps)")
def test_pdf_page_one_renders_and_is_not_blank(built: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    subprocess.run(
        ["pdftoppm", "-f", "1", "-l", "1", "-r", "50", "-png", str(built["pdf"]), str(tmp_path / "p")], check=True
    )
    (png,) = tmp_path.glob("p*.png")
    page = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert page.shape[0] > page.shape[1] * 1.3  # portrait A4
    ink = (page < 200).mean()
    assert 0.02 < ink < 0.6, ink  # text and a chart, not a blank or black page
    red = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    assert ((red[..., 0] > 150) & (red[..., 1] < 80) & (red[..., 2] < 80)).sum() > 50  # the headline's red


def test_headline_metrics_are_small_and_equal_the_figures(built: dict[str, Any]) -> None:
    h, m = built["headline"], built["metrics"]
    assert all(not isinstance(v, dict | list) for v in h.values())  # flat: `dvc metrics show` stays readable
    assert len(h) < 30
    assert (h["new_warnings"], h["new_area_m2"], h["rebuilds"], h["expansions"]) == (3, 450.0, 0, 1)
    assert (h["confirmed"], h["stopped"], h["demolished"], h["repaired"], h["closed"]) == (2, 1, 1, 1, 1)
    assert (h["confirmed_to_date"], h["demolished_to_date"], h["ordered_to_date"]) == (5, 2, 1)
    # last month's warnings (C-008, opened in February) were checked in the field and confirmed
    assert m["field_check"] == {
        "month": "2026-02",
        "warnings": 1,
        "checked": 1,
        "confirmed": 1,
        "checked_share": 1.0,
        "confirmed_share": 1.0,
    }
    assert h["field_checked_share"] == 1.0 and h["overdue"] == 1 and h["imagery_usable"] is True  # qa says usable


def test_trend_has_every_month_and_is_the_dvc_plot(built: dict[str, Any]) -> None:
    trend = built["metrics"]["trend"]
    assert [r["month"] for r in trend] == ["2026-01", "2026-02", "2026-03"]
    assert [r["new_cases"] for r in trend] == [2, 1, 3]  # C-005 C-006 | C-008 | C-001..C-003 (C-004 permitted)
    assert [r["demolished"] for r in trend] == [1, 0, 1]  # a zero month stays in
    assert [r["new_area_m2"] for r in trend] == [650.0, 200.0, 450.0]
    assert built["trend"].splitlines() == [
        "month,new_cases,new_area_m2,demolished",
        "2026-01,2,650.0,1",
        "2026-02,1,200.0,0",
        "2026-03,3,450.0,1",
    ]
    assert report._months("2025-11", "2026-02") == ["2025-11", "2025-12", "2026-01", "2026-02"]


def test_funnel_ageing_overdue_and_thumbnails(built: dict[str, Any]) -> None:
    m = built["metrics"]
    # not dismissed as of March: C-001 warning, C-002 confirmed, C-003/C-008 stopped, C-005 demolished, C-006 closed
    assert [r["count"] for r in m["funnel"]] == [6, 5, 4, 2, 2, 1, 1]
    assert [r["label_zh"] for r in m["funnel"]] == ["预警", "发现", "制止", "处置", "拆除", "修复", "销号"]
    assert sum(r["count"] for r in m["ageing"]) == 4  # the open cases C-001, C-002, C-003, C-008
    assert m["overdue"] == [
        {
            "case_id": "C-005",
            "deadline": "2026-02-28",
            "days_overdue": 31,
            "district": "南关区",
            "street": "a2",
            "state": "demolished",
            "unit": "网格员00",
        }
    ]
    assert [a["case_id"] for a in m["rebuild_expansion_alerts"]] == ["C-008"]
    assert [r["case_id"] for r in m["largest"]] == ["C-002", "C-001", "C-003"]
    assert built["html"].count('class="chip"') == 2 * 2 * 3  # before + after, 3 structures, 2 languages
    assert built["pair"].reads  # read from the aligned pair


def test_quality_and_reproducibility_in_words(built: dict[str, Any]) -> None:
    text = re.sub(r"<[^>]+>", "", built["html"])
    assert "residual_after_median_px" not in text and "|d|" not in text and "|d|" not in built["md"]
    assert "像元大小：分析格网 0.50 m；交付影像 前期 0.50 m、本期 0.50 m" in text
    assert "Pixel: analysis grid 0.50 m; delivered imagery 0.50 m (previous), 0.50 m (current)" in text
    assert "shifted by dx=0.50 px, dy=-0.25 px" in text
    model = built["metrics"]["model"]
    assert model["name"] == "scarnet" and len(model["sha256"]) == 12 and model["threshold"] is not None
    assert f"checkpoint SHA-256 {model['sha256']}" in text
    assert built["metrics"]["reproduce"]["code_version"] in text
    assert "dvc repro report@2026-03" in text and "min_area_m2=12.0" in text


def test_unfit_imagery_is_a_prominent_warning(built: dict[str, Any], tmp_path: Path) -> None:
    p = built["paths"]
    qa = tmp_path / "qa.json"
    usable = {"ok": False, "reasons": ["cloud cover 70%"], "cloud_fraction": 0.7, "textured_fraction": 0.1}
    qa.write_text(json.dumps({**QA, "usable": usable}), encoding="utf-8")
    settings = ReportSettings(pdf=False)
    html = report.build_report(MONTH, p["ledger"], p["flags"], tmp_path, settings=settings, qa_path=qa)
    page = html.read_text(encoding="utf-8")
    assert page.count('class="unfit"') == 2
    assert page.index('class="unfit"') < page.index("本月要点")  # above the headline figures
    assert "本月影像不合格" in page and "must not be read as no new construction" in page
    assert "cloud cover 70%" in page
    assert json.loads((tmp_path / f"{MONTH}.metrics.json").read_text())["imagery_usable"] is False


def test_markdown_lines_and_tables_hold(built: dict[str, Any]) -> None:
    md = built["md"]
    lines = md.splitlines()
    bullets = [line for line in lines if line.startswith("- 反弹重建") or line.startswith("- 许可建设")]
    assert len(bullets) == 2  # each summary bullet on its own line
    tables = _md_tables(md)
    assert tables and all(len({len(r) for r in t}) == 1 for t in tables), "a table row with the wrong cell count"


def _md_tables(md: str) -> list[list[list[str]]]:
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            current.append(re.split(r"(?<!\\)\|", line.strip())[1:-1])
        elif current:
            tables.append(current)
            current = []
    return tables


PAYLOAD = '<script>alert("x")</script> | **bold** [link](http://evil) <img src=x onerror=alert(1)> # _u_'


def test_ledger_text_is_escaped_in_html_and_markdown(tmp_path: Path) -> None:
    from pipeline.ledger.store import write_ledger

    paths = write_inputs(tmp_path)
    ledger = paths["ledger"]
    events = gpd.read_file(ledger, layer="events")
    cases = gpd.read_file(ledger, layer="cases")
    alerts = gpd.read_file(ledger, layer="alerts")
    cases.loc[cases["case_id"] == "C-001", "street"] = PAYLOAD
    cases.loc[cases["case_id"] == "C-002", "district"] = PAYLOAD
    alerts["message_zh"] = PAYLOAD
    alerts["message_en"] = PAYLOAD
    write_ledger(ledger, events, cases, alerts)
    grid = gpd.read_file(paths["layers"] / "grid.gpkg")
    grid["unit"] = PAYLOAD
    grid.to_file(paths["layers"] / "grid.gpkg", driver="GPKG")
    html = report.build_report(
        MONTH, ledger, paths["flags"], tmp_path / "out", settings=ReportSettings(pdf=False), layers_dir=paths["layers"]
    ).read_text(encoding="utf-8")
    assert "<script" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    md = (tmp_path / "out" / f"{MONTH}.md").read_text(encoding="utf-8")
    assert not re.search(r"(?<!\\)[<>]", md)  # no live HTML tag
    assert "](http" not in md and "**bold**" not in md
    assert r"\<script\>" in md and r"\*\*bold\*\*" in md
    tables = _md_tables(md)
    assert all(len({len(r) for r in t}) == 1 for t in tables), "a planted | split a Markdown table row"
    assert report.md_escape(PAYLOAD) in md  # the text is there, inert


def test_league_table_against_hand_computed_values(built: dict[str, Any]) -> None:
    """The fixture's March, 2 km² each; a third district of the layer with no case gets a zero row.

    南关区: C-001 warning 120 m², C-002 confirmed 250 m² (new), C-005 demolished, C-008 stopped: new 370 m² ->
    185 m²/km², nothing ordered -> 0 overdue, demolition 1/4, repair 0/1. 朝阳区: C-003 stopped 80 m² (new;
    C-004 permitted, left out), C-006 closed: 40 m²/km², demolition 1/2, repair 1/1. 绿园区 (1 km²): none ->
    0 m²/km², rates 100%. Ranks (area, overdue, demolition, repair): 绿园 1,1,1,1 = 1.0; 朝阳 2,1,2,1 = 1.5;
    南关 3,1,3,3 = 2.5. February: 绿园 1,1,1,1; 朝阳 (0 m², 0%, 1/1, 0/1) 1,1,1,3 = 1.5; 南关 (C-008 200 m²,
    C-005 ordered but not yet due, 0/2, none removed) 3,1,3,1 = 2.0: the same order, no change.
    """
    from pipeline.ledger.view import load_month_view

    p = built["paths"]
    view = load_month_view(MONTH, p["ledger"], p["flags"])
    areas = {"南关区": 2.0, "朝阳区": 2.0, "绿园区": 1.0}
    table = league_table(view.cases, view.events, MONTH, district_area_km2=areas, permitted={"C-004"})
    got = [
        (
            r["rank"],
            r["district"],
            r["new_area_per_km2"],
            r["overdue_share"],
            r["demolition_rate"],
            r["repair_rate"],
            r["score"],
            r["rank_change"],
        )
        for r in table
    ]
    assert got == [
        (1, "绿园区", 0.0, 0.0, 1.0, 1.0, 1.0, 0),
        (2, "朝阳区", 40.0, 0.0, 0.5, 1.0, 1.5, 0),
        (3, "南关区", 185.0, 0.0, 0.25, 0.0, 2.5, 0),
    ]
    assert built["metrics"]["league"][0]["district"] == "朝阳区"  # the fixture's own layer: 2 km² each
    assert [r["score"] for r in built["metrics"]["league"]] == [1.0, 1.75]


def test_league_rank_change_and_overdue_share() -> None:
    """A: a case in January, ordered with a past deadline in February; B: a new 500 m² case in February.

    January: A (100 m²/km², 0/1 demolished) ranks 2,1,2,1 = 1.5; B (none) 1,1,1,1 = 1.0 -> B first.
    February: A 0 m²/km² but 1 of 1 ordered case overdue, 0/1; B 500 m²/km², 0/1: A 1,2,1,1 = 1.25;
    B 2,1,1,1 = 1.25 -> tied score, A first on the lower new area: A +1, B -1.
    """
    cases = pd.DataFrame(
        {
            "case_id": ["a1", "b1"],
            "district": ["A", "B"],
            "first_month": ["2026-01", "2026-02"],
            "area_m2": [100.0, 500.0],
        }
    )
    events = pd.DataFrame(
        {
            "case_id": ["a1", "a1", "a1", "b1"],
            "kind": ["flagged", "confirmed", "ordered", "flagged"],
            "month": ["2026-01", "2026-02", "2026-02", "2026-02"],
            "deadline": ["", "", "2026-02-15", ""],
        }
    )
    cut_cases, cut_events = cut(cases, events, "2026-02")
    table = league_table(cut_cases, cut_events, "2026-02", district_area_km2={"A": 1.0, "B": 1.0}, permitted=set())
    assert [(r["district"], r["rank"], r["score"], r["rank_change"], r["overdue_share"]) for r in table] == [
        ("A", 1, 1.25, 1, 1.0),
        ("B", 2, 1.25, -1, 0.0),
    ]


def test_each_section_has_its_own_charts_in_its_language(built: dict[str, Any]) -> None:
    from pipeline.publish.charts import cjk_font

    html = built["html"]
    zh, en = html.index('id="section-zh"'), html.index('id="section-en"')
    pngs = [re.findall(r'src="data:image/png;base64,([^"]+)"', part) for part in (html[zh:en], html[en:])]
    assert [len(p) for p in pngs] == [3, 3]  # trend, funnel, ageing in both
    if cjk_font() is not None:  # with a CJK font the Chinese charts carry Chinese labels: other pixels
        assert all(a != b for a, b in zip(*pngs, strict=True))


def test_a_failed_report_leaves_the_previous_generation_whole(
    built: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTML, Markdown, PDF, figures, trend and metrics are swapped in together, or not at all."""
    import errno

    from pipeline.publish import pdf

    p = built["paths"]
    settings = ReportSettings(pdf=False)
    report.build_report(MONTH, p["ledger"], p["flags"], tmp_path, settings=settings)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert {f"{MONTH}.html", f"{MONTH}.md", f"{MONTH}.json", f"{MONTH}.metrics.json"} <= set(before)
    (tmp_path / f"{MONTH}.md").write_text("an earlier generation", encoding="utf-8")
    before[f"{MONTH}.md"] = (tmp_path / f"{MONTH}.md").read_bytes()

    def disk_full(html: str, out_path: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(out_path))

    monkeypatch.setattr(pdf, "write_pdf", disk_full)
    with pytest.raises(OSError, match="No space left"):
        report.build_report(MONTH, p["ledger"], p["flags"], tmp_path, settings=ReportSettings(pdf=True))
    after = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert after == before  # the HTML and Markdown written before the PDF failed were not swapped in; no temps
