"""The monthly incremental-construction report (新增违法建设月报): HTML, Markdown and metrics JSON.

Figures are computed once (:func:`compute_figures`) from the month's view of the ledger and flags (see
:func:`pipeline.ledger.view.load_month_view`) and rendered twice by the templates ``report.html.j2`` and
``report.md.j2``, one section per language in ``report.languages`` order (Chinese first by default).

Conventions read from the ledger:
- new cases of the month: cases whose ``first_month`` is the month;
- permitted construction: a new case dismissed with a ``permit_id``, or by an event whose ``source``,
  ``evidence`` or ``note`` names a permit (the ledger writes source ``permit``); counted apart and left
  out of the 新增违法建设 figures;
- demolitions verified from imagery: an ``observed_removed`` event this month on a case with a
  ``demolished`` event; removals without a reported demolition and reported demolitions that imagery has
  not yet confirmed are listed too;
- rebuilds (反弹): cases with a ``rebuilt`` observation this month (most were reopened from demolished,
  repaired or closed to ``warning``), area the union of their rebuilt flags; expansions: cases with an
  ``expanded`` observation, area the growth of the footprint; ``illegal_total`` = new + rebuilds + expansions;
- closure rate: closed cases / cases opened by the month's end that were not dismissed (a reopened case is
  not closed: its state at the month's end is what counts).

With ``issued_dir`` each report is also an issued version (:mod:`pipeline.publish.issued`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd
import pyogrio
import shapely
from jinja2 import Environment, PackageLoader, StrictUndefined
from shapely.geometry.base import BaseGeometry

from pipeline.config import ReportSettings, check_month
from pipeline.errors import CorruptFileError, MissingInputError
from pipeline.fileio import atomic_paths, read_layer
from pipeline.formats import (
    MU_M2,
    QA_BLOCK_AFTER,
    QA_BLOCK_BEFORE,
    QA_BLOCK_VALUES,
    QA_BLOCKS,
    QA_KEYS,
)
from pipeline.ledger.events import FOOTPRINT_KINDS
from pipeline.ledger.labels import ALERT_ZH, FLAG_ZH, KIND_ZH, STATE_ZH
from pipeline.ledger.lifecycle import OPEN_STATES, STATES
from pipeline.ledger.view import MonthView, load_month_view
from pipeline.publish.charts import charts
from pipeline.publish.issued import plan_issue, write_issue
from pipeline.publish.league import deadlines_as_of, league_table, month_end, previous_month
from pipeline.publish.provenance import code_version, imagery_quality, model_card, params_digest

log = logging.getLogger(__name__)

LIFECYCLE_KINDS: tuple[str, ...] = ("confirmed", "stopped", "ordered", "demolished", "repaired", "closed", "dismissed")
PERMIT_WORDS: tuple[str, ...] = ("permit", "许可")
FUNNEL: tuple[str, ...] = ("warning", "confirmed", "stopped", "ordered", "demolished", "repaired", "closed")
"""The lifecycle steps of the funnel, in order (预警 → 发现 → 制止 → 处置 → 拆除 → 修复 → 销号)."""
FUNNEL_ZH: tuple[str, ...] = ("预警", "发现", "制止", "处置", "拆除", "修复", "销号")
AGE_BINS: tuple[tuple[str, int, int], ...] = (
    ("0–30", 0, 30),
    ("31–90", 31, 90),
    ("91–180", 91, 180),
    ("181–365", 181, 365),
    (">365", 366, 10**6),
)
"""Ageing bins of open cases (days from ``opened_at`` to the month's last day, inclusive bounds)."""

LABELS: dict[str, dict[str, str]] = {
    "zh": {
        "title": "新增违法建设监测月报",
        "summary": "概要",
        "new_illegal": "新增违法建设",
        "permitted": "许可建设（已排除，单独统计）",
        "dismissed_other": "误报排除",
        "flags": "影像变化图斑",
        "flag_new": "新增",
        "flag_removed": "消失",
        "closure": "结案（销号）率",
        "alerts": "告警",
        "count_unit": " 处",
        "mu": "亩",
        "accuracy": "演示精度（对象级，IoU ≥ 0.5）",
        "precision": "精确率",
        "recall": "召回率",
        "by_place": "按区、街道统计",
        "district": "区",
        "street": "街道",
        "count": "数量",
        "area": "面积",
        "new_cases": "本月新增案件",
        "case": "案件编号",
        "location": "位置",
        "status": "状态",
        "lifecycle": "本月案件流转",
        "step": "环节",
        "cases": "案件",
        "demolitions": "影像核验拆除",
        "verified": "已核验拆除（上报拆除且影像已消失）",
        "unreported": "影像消失但未上报拆除",
        "awaiting": "已上报拆除、待影像核验",
        "kind": "类型",
        "message": "说明",
        "states": "案件状态（截至月末）",
        "state": "状态",
        "qa": "质量检查：影像配准",
        "qa_missing": "未提供配准质检文件（qa.json）。",
        "residual": "分块残差位移（像素）",
        "key": "项目",
        "value": "值",
        "none": "无",
        "chart": "每月新增案件趋势",
        "active": "在办及已结案件",
    },
    "en": {
        "title": "Monthly incremental construction report",
        "summary": "Summary",
        "new_illegal": "New illegal construction",
        "permitted": "Permitted construction (excluded, counted apart)",
        "dismissed_other": "Dismissed as false positives",
        "flags": "Imagery change flags",
        "flag_new": "new",
        "flag_removed": "removed",
        "closure": "Closure rate",
        "alerts": "Alerts",
        "count_unit": "",
        "mu": "mu",
        "accuracy": "Demo accuracy (objects, IoU ≥ 0.5)",
        "precision": "precision",
        "recall": "recall",
        "by_place": "By district and street",
        "district": "District",
        "street": "Street",
        "count": "Count",
        "area": "Area",
        "new_cases": "New cases this month",
        "case": "Case",
        "location": "Location",
        "status": "Status",
        "lifecycle": "Cases moved through the lifecycle this month",
        "step": "Step",
        "cases": "Cases",
        "demolitions": "Demolitions verified from imagery",
        "verified": "Verified (demolition reported and structure gone from imagery)",
        "unreported": "Gone from imagery without a reported demolition",
        "awaiting": "Demolition reported, awaiting imagery",
        "kind": "Kind",
        "message": "Message",
        "states": "Case states (end of month)",
        "state": "State",
        "qa": "Quality check: co-registration",
        "qa_missing": "No co-registration QA file (qa.json) was given.",
        "residual": "Block residual shift (px)",
        "key": "Item",
        "value": "Value",
        "none": "none",
        "chart": "New cases per month",
        "active": "open and closed cases",
    },
}


LABELS["zh"] |= {
    "headline": "本月要点",
    "new_warnings": "本月新增预警（违法建设）",
    "rebuilds": "反弹重建",
    "expansions": "扩建",
    "this_month": "本月",
    "to_date": "累计",
    "field_check": "上月预警实地核查",
    "checked_share": "已核查比例",
    "confirmed_share": "核查确认为违建比例",
    "by_district": "按区统计",
    "charts": "图表",
    "league": "各区赛马排名",
    "rank": "名次",
    "rank_change": "名次变化",
    "score": "综合得分（平均名次）",
    "area_km2": "面积 km²",
    "new_per_km2": "新增违建 m²/km²",
    "overdue_share": "逾期比例",
    "demolition_rate": "拆除率",
    "repair_rate": "修复率",
    "league_rule": (
        "排名规则：四项指标分别排名（新增违建面积/km² 与逾期比例越低越好，拆除率与修复率越高越好；并列取最好名次），"
        "综合得分为四项名次的平均值，得分相同时按新增面积/km²、再按区名排序。"
        "名次变化 = 上月名次 − 本月名次（正数为上升）。"
        "拆除率 = 已拆除（含已修复、已销号）/ 未排除案件；修复率 = 已修复及已销号 / 已拆除及以后；无案件时记 100%；"
        "逾期比例 = 逾期案件 / 处置中案件。"
    ),
    "overdue": "逾期案件",
    "deadline": "期限",
    "days_overdue": "逾期天数",
    "unit": "责任网格",
    "rebuild_alerts": "反弹与扩建告警",
    "largest": "本月最大新增建筑",
    "before": "前期影像",
    "after": "本期影像",
    "flag": "图斑",
    "quality": "质量与可复现性",
    "imagery": "影像",
    "epoch_prev": "前期",
    "epoch_curr": "本期",
    "sheets": "图幅",
    "coverage": "两期有效覆盖率",
    "pixel": "像元大小：分析格网 {res} m；交付影像 前期 {prev} m、本期 {curr} m",
    "coreg": "两期配准",
    "coreg_text": (
        "对前期影像施加平移 dx={dx} 像元、dy={dy} 像元；分块残差中位数由 {before} 像元降至 {after} 像元"
        "（最大 {max} 像元，{n}/{blocks} 个分块纹理充足可测）"
    ),
    "coreg_off": "未进行配准（align.coregister 关闭）；分块残差中位数 {before} 像元",
    "unfit": "本月影像不合格：本月“0 新增”不能解读为没有新增违法建设",
    "unfit_reasons": "原因",
    "cloud": "云覆盖",
    "textured": "纹理充足比例",
    "model": "模型",
    "model_text": "{name}，检查点 SHA-256 {sha}，种子阈值 {thr}，对象阈值 {obj}",
    "model_missing": "未提供模型检查点信息",
    "validation": "验证集对象级指标",
    "dataset": "数据集",
    "f1": "F1",
    "reproduce": "复现",
    "code_version": "代码版本（git describe）",
    "params_file": "参数文件",
    "command": "复现命令",
    "more": "另有 {n} 条未列出，见 JSON",
    "page": "第 {n} 页",
    "illegal_total": "本月违法建设合计（新增 + 反弹 + 扩建）",
    "reopened": "已重新立案",
    "version": "第 {n} 版，签发于 {at}",
    "revision": "修订说明：本版（第 {n} 版）替代 {at} 签发的第 {prev} 版",
    "figure": "指标",
    "old": "原值",
    "new": "新值",
    "cases_changed": "月末状态变化的案件",
}
LABELS["en"] |= {
    "headline": "Headline figures",
    "new_warnings": "New warnings this month (illegal construction)",
    "rebuilds": "Rebuilds",
    "expansions": "Expansions",
    "this_month": "This month",
    "to_date": "To date",
    "field_check": "Field check of last month's warnings",
    "checked_share": "share checked in the field",
    "confirmed_share": "share of those confirmed illegal",
    "by_district": "By district",
    "charts": "Charts",
    "league": "District league table (赛马)",
    "rank": "Rank",
    "rank_change": "Change",
    "score": "Score (mean rank)",
    "area_km2": "Area km²",
    "new_per_km2": "New illegal m²/km²",
    "overdue_share": "Past deadline",
    "demolition_rate": "Demolition rate",
    "repair_rate": "Repair rate",
    "league_rule": (
        "Ranking rule: each of the four indicators ranks the districts (new illegal area per km² and the share past "
        "deadline: lower is better; demolition and repair rates: higher is better; ties share the best rank); the "
        "score is the mean of the four ranks, ties broken by new area per km², then by name. Change = last month's "
        "rank − this month's (positive: moved up). Demolition rate = cases demolished, repaired or closed / cases "
        "not dismissed; repair rate = repaired or closed / demolished or later; 100% when there are none. Past "
        "deadline = overdue cases / cases under a demolition order."
    ),
    "overdue": "Overdue cases",
    "deadline": "Deadline",
    "days_overdue": "Days overdue",
    "unit": "Responsible unit",
    "rebuild_alerts": "Rebuild and expansion alerts",
    "largest": "Largest new structures this month",
    "before": "before",
    "after": "after",
    "flag": "Flag",
    "quality": "Quality and reproducibility",
    "imagery": "Imagery",
    "epoch_prev": "previous",
    "epoch_curr": "current",
    "sheets": "sheets",
    "coverage": "Valid coverage of both epochs",
    "pixel": "Pixel: analysis grid {res} m; delivered imagery {prev} m (previous), {curr} m (current)",
    "coreg": "Co-registration",
    "coreg_text": (
        "the previous epoch was shifted by dx={dx} px, dy={dy} px; the median block residual fell from {before} px "
        "to {after} px (max {max} px; {n} of {blocks} blocks textured enough to measure)"
    ),
    "coreg_off": "not applied (align.coregister off); median block residual {before} px",
    "unfit": 'This month\'s imagery is unfit: its "0 new" must not be read as no new construction',
    "unfit_reasons": "Reasons",
    "cloud": "cloud cover",
    "textured": "textured share",
    "model": "Model",
    "model_text": "{name}, checkpoint SHA-256 {sha}, seed threshold {thr}, object threshold {obj}",
    "model_missing": "No model checkpoint was given",
    "validation": "Validation scores (objects)",
    "dataset": "Data set",
    "f1": "F1",
    "reproduce": "Reproduce",
    "code_version": "Code version (git describe)",
    "params_file": "Params file",
    "command": "Command",
    "more": "{n} more not listed; see the JSON",
    "page": "page {n}",
    "illegal_total": "Illegal construction this month in all (new + rebuilt + expanded)",
    "reopened": "reopened",
    "version": "Version {n}, issued {at}",
    "revision": "Revision note: this version ({n}) replaces version {prev} issued {at}",
    "figure": "Figure",
    "old": "old",
    "new": "new",
    "cases_changed": "Cases whose state at the month's end changed",
}


def _area(values: pd.Series) -> dict[str, float]:
    m2 = float(values.sum()) if len(values) else 0.0
    return {"area_m2": round(m2, 1), "area_mu": round(m2 / MU_M2, 3)}


def _permitted_cases(view: MonthView) -> set[str]:
    """Cases dismissed because of a permit: a ``dismissed`` event naming one (source ``permit``) or ``permit_id``."""
    ev = view.events[view.events["kind"] == "dismissed"]
    text = pd.Series("", index=ev.index)
    for col in ("evidence", "source", "note"):
        if col in ev.columns:
            text = text + " " + ev[col].fillna("").astype(str).str.lower()
    hit = text.apply(lambda t: any(w in t for w in PERMIT_WORDS))
    out = set(ev.loc[hit, "case_id"].astype(str))
    if "permit_id" in view.cases.columns:
        has_permit = view.cases["permit_id"].fillna("").astype(str).str.strip() != ""
        out |= set(view.cases.loc[has_permit & (view.cases["state_at"] == "dismissed"), "case_id"].astype(str))
    return out


def _row(case: Any) -> dict[str, Any]:
    area = float(case.area_m2)
    return {
        "case_id": str(case.case_id),
        "district": str(case.district or ""),
        "street": str(case.street or ""),
        "area_m2": round(area, 1),
        "area_mu": round(area / MU_M2, 3),
        "state": str(case.state_at),
    }


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_pair(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(_is_num(v) for v in value)


def _stats(values: list[Any]) -> dict[str, float]:
    good = [float(v) for v in values if not math.isnan(float(v))]
    if not good:
        return {"n": len(values)}
    return {"n": len(good), "mean": round(sum(good) / len(good), 3), "max": round(max(good), 3)}


def _stats_text(values: list[Any]) -> str:
    st = _stats(values)
    return ", ".join(f"{k}={v:g}" if k == "n" else f"{k}={v:.3f}" for k, v in st.items())


def _magnitudes(records: list[Mapping[str, Any]], field: str) -> list[float]:
    """The |[dx, dy]| of ``field`` in every record that holds a measured shift there."""
    return [math.hypot(*map(float, r[field])) for r in records if _is_pair(r.get(field))]


def _value_text(value: Any) -> str | None:
    """A top-level qa.json value as the report shows it (None: nothing to show)."""
    if value is None:
        return None
    if isinstance(value, list) and value and all(_is_num(v) for v in value):
        return ", ".join(f"{float(v):.3g}" for v in value) if len(value) <= 4 else _stats_text(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_value_text(v)}" for k, v in value.items())
    return str(value)


def summarize_qa(qa: Mapping[str, Any], limit: int = 40) -> dict[str, Any]:
    """Summarise a qa.json as the align stage writes it into rows of (key, value) and the residual shift.

    Reads exactly the keys of :mod:`pipeline.formats` (``QA_*``): the top-level values of
    :data:`~pipeline.formats.QA_KEYS` in their order (numbers and strings as they are, [dx, dy] as two
    numbers), then the block records of :data:`~pipeline.formats.QA_BLOCKS`: their count and, per field of
    :data:`~pipeline.formats.QA_BLOCK_VALUES`, n/mean/max (shift magnitudes for the [dx, dy] fields). The
    residual is the magnitude of :data:`~pipeline.formats.QA_BLOCK_AFTER` over the measured blocks.
    Other keys are not read.

    Args:
        qa: the parsed qa.json.
        limit: the most rows returned.

    Returns:
        ``{"rows": [[key, text], ...], "residual_px": {"n", "mean", "max", "field"} | None}``.
    """
    rows: list[list[str]] = []
    for key in QA_KEYS:
        text = _value_text(qa.get(key))
        if text is not None:
            rows.append([key, text])
    blocks = [b for b in qa.get(QA_BLOCKS) or [] if isinstance(b, Mapping)]
    residual: dict[str, Any] | None = None
    if blocks:
        rows.append([QA_BLOCKS, f"{len(blocks)} records"])
        for name in sorted(QA_BLOCK_VALUES):
            if name in (QA_BLOCK_BEFORE, QA_BLOCK_AFTER):
                rows.append([f"{QA_BLOCKS}[].{name} |d|", _stats_text(_magnitudes(blocks, name))])
            else:
                values = [float(b[name]) for b in blocks if _is_num(b.get(name))]
                rows.append([f"{QA_BLOCKS}[].{name}", _stats_text(values)])
        mags = _magnitudes(blocks, QA_BLOCK_AFTER)
        if mags:
            residual = {**_stats(mags), "field": QA_BLOCK_AFTER}
    return {"rows": rows[:limit], "residual_px": residual}


def read_qa(qa_path: Path) -> dict[str, Any]:
    """Read and summarise a qa.json written by the align stage (see :func:`summarize_qa`)."""
    if not qa_path.exists():
        raise MissingInputError(f"{qa_path}: not found; run the 'align' stage for this month or leave --qa out")
    try:
        qa = json.loads(qa_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{qa_path}: not valid JSON ({exc}); rerun the 'align' stage") from exc
    if not isinstance(qa, Mapping):
        raise CorruptFileError(f"{qa_path}: not a JSON object as the align stage writes; rerun the 'align' stage")
    return summarize_qa(qa)


def accuracy(month: str, flags: gpd.GeoDataFrame, truth_path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Object precision/recall of the month's flags against the demo truth, per kind and all.

    The scores are :func:`pipeline.metrics.flag_scores`, the ones the pipeline's tests and the flag
    check use. Decision: ``all`` is the sum of the per-kind counts, so a ``new`` flag never matches a
    ``removed`` truth (or the other way round); kinds are never pooled before matching.

    Args:
        month: ``YYYY-MM``.
        flags: the month's flags (grid CRS, with ``month`` and ``kind``).
        truth_path: the demo's truth GeoPackage (layer ``changes``).

    Returns:
        ``{"iou" | "centroid": {"new" | "removed" | "all": Scores.as_dict()}}`` (floats to 4 decimals):
        one-to-one matches at IoU >= 0.5, and flags that cover the true object's centroid.
    """
    from pipeline.metrics import flag_scores

    truth = read_layer(
        Path(truth_path), "changes", what="the demo truth", fix="run the 'demo' stage", columns=("month", "kind")
    )
    scores = flag_scores(flags, truth, month)
    return {
        mode: {
            kind: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores[kind][key].items()}
            for kind in ("new", "removed", "all")
        }
        for mode, key in (("iou", "iou50"), ("centroid", "centroid"))
    }


def _months(first: str, last: str) -> list[str]:
    out, month = [], first
    while month <= last:
        out.append(month)
        year, mon = int(month[:4]), int(month[5:7])
        month = f"{year + 1}-01" if mon == 12 else f"{year}-{mon + 1:02d}"
    return out


def _units(frame: gpd.GeoDataFrame, grid: gpd.GeoDataFrame | None) -> list[str]:
    """The 网格 unit responsible for each row (the grid cell holding its representative point), "" if none."""
    if grid is None or frame.empty:
        return [""] * len(frame)
    points = gpd.GeoDataFrame(geometry=frame.geometry.representative_point(), crs=frame.crs)
    joined = gpd.sjoin(points, grid[["unit", "geometry"]].to_crs(frame.crs), how="left", predicate="within")
    first = joined[~joined.index.duplicated(keep="first")]["unit"]
    return [str(u) if isinstance(u, str) else "" for u in first.reindex(range(len(frame)))]


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _footprints_before(events: pd.DataFrame, case_id: str, seq: int) -> BaseGeometry | None:
    """A case's footprint just before log position ``seq``, as the ledger builder grows it.

    The union of its footprint events' geometries in log order, except that a footprint an inspector's
    point gave (source ``field``) is provisional and replaced by the next one
    (:class:`pipeline.ledger.builder.LedgerBuilder.append`).
    """
    mine = events[(events["case_id"].astype(str) == case_id) & (events["seq"] < seq)]
    footprint: BaseGeometry | None = None
    provisional = False
    for kind, source, geom in zip(mine["kind"], mine["source"].astype(str), mine.geometry, strict=True):
        if kind not in FOOTPRINT_KINDS:
            continue
        footprint = geom if footprint is None or provisional else shapely.union(footprint, geom)
        provisional = source == "field"
    return footprint


def rebuild_figures(events: pd.DataFrame, month: str) -> dict[str, Any]:
    """The month's rebuilds (反弹): cases with a ``rebuilt`` observation, and the rebuilt area.

    The area is that of the month's ``rebuilt`` flags on each case (their union); ``reopened`` lists the
    cases the rebuild took back from demolished, repaired or closed to ``warning`` (the others were still
    open while imagery had seen them gone).
    """
    this = events[(events["month"].astype(str) == month)]
    rebuilt = this[this["kind"] == "rebuilt"]
    per_case = rebuilt.groupby(rebuilt["case_id"].astype(str)).geometry.agg(lambda g: shapely.union_all(list(g)).area)
    return {
        "count": len(per_case),
        **_area(per_case),
        "case_ids": sorted(per_case.index),
        "reopened": sorted(set(this.loc[this["kind"] == "reopened", "case_id"].astype(str))),
    }


def expansion_figures(events: pd.DataFrame, month: str) -> dict[str, Any]:
    """The month's expansions (扩建): cases with an ``expanded`` observation, and the area they added.

    The added area of one observation is the growth of the footprint it caused (footprint ∪ flag minus
    footprint: change detection flags the added part, possibly overlapping the old roof).
    """
    this = events[(events["month"].astype(str) == month) & (events["kind"] == "expanded")]
    added: dict[str, float] = {}
    for case_id, seq, geom in zip(this["case_id"].astype(str), this["seq"], this.geometry, strict=True):
        before = _footprints_before(events, case_id, int(seq))
        grown = float(geom.area) if before is None else float(shapely.union(before, geom).area - before.area)
        added[case_id] = added.get(case_id, 0.0) + grown
    return {"count": len(added), **_area(pd.Series(added, dtype=float)), "case_ids": sorted(added)}


def compute_figures(
    view: MonthView,
    *,
    district_area_km2: Mapping[str, float] | None = None,
    grid: gpd.GeoDataFrame | None = None,
    prev_month: str | None = None,
) -> dict[str, Any]:
    """Every number of the month's report (also its JSON).

    Args:
        view: the month's view of the ledger and flags.
        district_area_km2: each district of ``layers/districts.gpkg`` and its area (the league's rows).
        grid: ``layers/grid.gpkg`` (``unit`` polygons), for the unit responsible for each overdue case.
        prev_month: the month compared with (the field-check share reads its warnings); default the
            calendar month before.

    Returns:
        A JSON-ready mapping (see the module docstring for the conventions).
    """
    month, cases, events, flags = view.month, view.cases, view.events, view.flags
    end = month_end(month)
    prev_month = prev_month or previous_month(month)
    permitted = _permitted_cases(view)
    new = cases[cases["first_month"].astype(str) == month] if "first_month" in cases else cases.iloc[:0]
    is_permit = new["case_id"].astype(str).isin(permitted)
    is_dismissed = new["state_at"] == "dismissed"
    illegal = new[~is_permit & ~is_dismissed].sort_values("case_id")
    by_place = (
        illegal.groupby(["district", "street"], dropna=False)["area_m2"].agg(n="count", area="sum").reset_index()
        if len(illegal)
        else pd.DataFrame(columns=["district", "street", "n", "area"])
    )
    by_district = (
        illegal.groupby("district", dropna=False)["area_m2"].agg(n="count", area="sum").reset_index()
        if len(illegal)
        else pd.DataFrame(columns=["district", "n", "area"])
    )
    this_month = events[events["month"] == month]

    def ids(frame: pd.DataFrame, kind: str) -> list[str]:
        return sorted(set(frame.loc[frame["kind"] == kind, "case_id"].astype(str)))

    lifecycle = {k: ids(this_month, k) for k in LIFECYCLE_KINDS}
    to_date = {k: len(ids(events, k)) for k in LIFECYCLE_KINDS}
    demolished_ever = set(events.loc[events["kind"] == "demolished", "case_id"].astype(str))
    removed_seen = set(ids(this_month, "observed_removed"))
    removed_ever = set(events.loc[events["kind"] == "observed_removed", "case_id"].astype(str))
    active = cases[cases["state_at"] != "dismissed"]
    closed = int((active["state_at"] == "closed").sum())
    alerts = view.alerts

    # field check of last month's warnings: any field event by this month's end; confirmed among them
    last = cases[(cases["first_month"].astype(str) == prev_month) & ~cases["case_id"].astype(str).isin(permitted)]
    field = events[events["source"].astype(str) == "field"]
    checked = sorted(set(last["case_id"].astype(str)) & set(field["case_id"].astype(str)))
    confirmed = sorted(set(checked) & set(ids(events, "confirmed")))

    # trend: every month from the ledger's first to this one, zero months included
    first = min([*events["month"].astype(str), month])
    live = cases[(cases["state_at"] != "dismissed") & ~cases["case_id"].astype(str).isin(permitted)]
    trend = []
    for m in _months(first, month):
        opened = live[live["first_month"].astype(str) == m]
        gone = events[(events["month"] == m) & (events["kind"] == "demolished")]
        trend.append(
            {
                "month": m,
                "new_cases": len(opened),
                "new_area_m2": round(float(opened["area_m2"].sum()), 1),
                "demolished": int(gone["case_id"].nunique()),
            }
        )

    # funnel: cases (not dismissed) whose state has reached each step of the lifecycle
    order = {s: i for i, s in enumerate(FUNNEL)}
    reached = active["state_at"].map(lambda s: order.get(str(s), -1))
    funnel = [
        {"state": s, "label_zh": FUNNEL_ZH[i], "label_en": s, "count": int((reached >= i).sum())}
        for i, s in enumerate(FUNNEL)
    ]

    # ageing of open cases (days from opened_at to the month's end)
    open_cases = active[active["state_at"].isin(OPEN_STATES)]
    age = (pd.Timestamp(end) - pd.to_datetime(open_cases["opened_at"].astype(str), errors="coerce")).dt.days
    ageing = [{"label": label, "count": int(((age >= lo) & (age <= hi)).sum())} for label, lo, hi in AGE_BINS]

    # overdue: the ledger's overdue alerts, with the deadline as of the month and the grid unit
    deadline = deadlines_as_of(events)
    over = alerts[alerts["kind"] == "overdue"].drop_duplicates("case_id").sort_values("case_id")
    over_cases = cases.set_index(cases["case_id"].astype(str))
    overdue = []
    for (case_id, _geom), unit in zip(
        zip(over["case_id"].astype(str), over.geometry, strict=True),
        _units(over.reset_index(drop=True), grid),
        strict=True,
    ):
        due = deadline.get(case_id, "")
        row = over_cases.loc[case_id] if case_id in over_cases.index else None
        overdue.append(
            {
                "case_id": case_id,
                "deadline": due,
                "days_overdue": int((pd.Timestamp(end) - pd.Timestamp(due)).days) if due else None,
                "district": str(row["district"] or "") if row is not None else "",
                "street": str(row["street"] or "") if row is not None else "",
                "state": str(row["state_at"]) if row is not None else "",
                "unit": unit,
            }
        )
    overdue.sort(key=lambda r: (-(r["days_overdue"] or 0), r["case_id"]))

    rebuilds, expansions = rebuild_figures(events, month), expansion_figures(events, month)
    alert_items = [
        {
            "case_id": str(a.case_id),
            "kind": str(a.kind),
            "message_zh": str(a.message_zh or ""),
            "message_en": str(a.message_en or ""),
        }
        for a in alerts.sort_values(["kind", "case_id"]).itertuples()
    ]
    return {
        "month": month,
        "prev_month": prev_month,
        "month_end": end,
        "flags": {
            kind: {"count": int((flags["kind"] == kind).sum()), **_area(flags.loc[flags["kind"] == kind, "area_m2"])}
            for kind in ("new", "removed")
        },
        "new_cases": {
            "count": len(illegal),
            **_area(illegal["area_m2"]),
            "cases": [_row(c) for c in illegal.itertuples()],
        },
        "rebuilds": rebuilds,
        "expansions": expansions,
        "illegal_total": {
            "count": len(illegal) + rebuilds["count"] + expansions["count"],
            **_area(pd.Series([float(illegal["area_m2"].sum()), rebuilds["area_m2"], expansions["area_m2"]])),
        },
        "permitted": {
            "count": int(is_permit.sum()),
            **_area(new.loc[is_permit, "area_m2"]),
            "case_ids": sorted(new.loc[is_permit, "case_id"].astype(str)),
        },
        "dismissed_other": {
            "count": int((is_dismissed & ~is_permit).sum()),
            "case_ids": sorted(new.loc[is_dismissed & ~is_permit, "case_id"].astype(str)),
        },
        "by_district": [
            {
                "district": str(r["district"]),
                "count": int(r["n"]),
                "area_m2": round(float(r["area"]), 1),
                "area_mu": round(float(r["area"]) / MU_M2, 3),
            }
            for r in by_district.to_dict("records")
        ],
        "by_place": [
            {
                "district": str(r["district"]),
                "street": str(r["street"]),
                "count": int(r["n"]),
                "area_m2": round(float(r["area"]), 1),
                "area_mu": round(float(r["area"]) / MU_M2, 3),
            }
            for r in by_place.to_dict("records")
        ],
        "lifecycle": {k: {"count": len(v), "case_ids": v, "to_date": to_date[k]} for k, v in lifecycle.items()},
        "field_check": {
            "month": prev_month,
            "warnings": int(len(last)),
            "checked": len(checked),
            "confirmed": len(confirmed),
            "checked_share": _share(len(checked), len(last)),
            "confirmed_share": _share(len(confirmed), len(checked)),
        },
        "demolitions": {
            "verified": sorted(removed_seen & demolished_ever),
            "removed_without_report": sorted(removed_seen - demolished_ever),
            "awaiting_imagery": sorted(
                set(active.loc[active["state_at"] == "demolished", "case_id"].astype(str)) - removed_ever
            ),
        },
        "alerts": {
            "count": len(alerts),
            "by_kind": {str(k): int(n) for k, n in alerts["kind"].value_counts().sort_index().items()},
            "items": alert_items,
        },
        "rebuild_expansion_alerts": [a for a in alert_items if a["kind"] in ("rebuild", "expansion_after_stop")],
        "overdue": overdue,
        "trend": trend,
        "funnel": funnel,
        "ageing": ageing,
        "league": league_table(cases, events, month, district_area_km2=district_area_km2 or {}, permitted=permitted),
        "states": {s: int((cases["state_at"] == s).sum()) for s in STATES},
        "cases_total": len(cases),
        "cases_active": len(active),
        "cases_closed": closed,
        "closure_rate": round(closed / len(active), 4) if len(active) else None,
    }


def headline(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The month's headline figures as a small flat mapping (the DVC metrics file)."""
    lc = figures["lifecycle"]
    usable = (figures.get("quality") or {}).get("usable")
    out: dict[str, Any] = {
        "new_warnings": figures["new_cases"]["count"],
        "new_area_m2": figures["new_cases"]["area_m2"],
        "new_area_mu": figures["new_cases"]["area_mu"],
        "rebuilds": figures["rebuilds"]["count"],
        "rebuild_area_m2": figures["rebuilds"]["area_m2"],
        "expansions": figures["expansions"]["count"],
        "expansion_area_m2": figures["expansions"]["area_m2"],
        "illegal_total_area_m2": figures["illegal_total"]["area_m2"],
        "permitted": figures["permitted"]["count"],
    }
    for kind in ("confirmed", "stopped", "ordered", "demolished", "repaired", "closed"):
        out[kind] = lc[kind]["count"]
        out[f"{kind}_to_date"] = lc[kind]["to_date"]
    out |= {
        "field_checked_share": figures["field_check"]["checked_share"],
        "field_confirmed_share": figures["field_check"]["confirmed_share"],
        "overdue": len(figures["overdue"]),
        "alerts": figures["alerts"]["count"],
        "closure_rate": figures["closure_rate"],
        "imagery_usable": None if usable is None else bool(usable.get("ok")),
        "report_version": (figures.get("issue") or {}).get("version"),
    }
    return out


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


def md_escape(value: Any) -> str:
    """Ledger text made inert in Markdown: specials backslash-escaped, line breaks turned to spaces."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


@lru_cache(maxsize=2)
def _env(autoescape: bool) -> Environment:
    env = Environment(
        loader=PackageLoader("pipeline.publish", "templates"),
        autoescape=autoescape,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = lambda v, d=1: "–" if v is None else f"{float(v):,.{d}f}"
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * float(v):.1f}%"
    env.filters["md"] = md_escape if not autoescape else (lambda v: v)
    env.filters["signed"] = lambda v: "–" if v is None else ("±0" if v == 0 else f"{int(v):+d}")
    return env


def district_areas(layers_dir: Path | None) -> dict[str, float]:
    """Each district of ``layers_dir/districts.gpkg`` and its area in km² (empty without the layer)."""
    path = Path(layers_dir) / "districts.gpkg" if layers_dir is not None else None
    if path is None or not path.is_file():
        return {}
    frame = read_layer(path, None, what="the districts layer", fix="fix layers/districts.gpkg", columns=("district",))
    if frame.crs is None or not frame.crs.is_projected:
        raise CorruptFileError(f"{path}: districts need a projected CRS (metres) to measure km²; reproject the layer")
    areas = frame.assign(a=frame.geometry.area).groupby(frame["district"].astype(str))["a"].sum()
    return {str(d): float(a) / 1e6 for d, a in areas.items()}


def read_grid(layers_dir: Path | None) -> gpd.GeoDataFrame | None:
    """``layers_dir/grid.gpkg`` (网格 ``cell_id``, ``unit``), or None without it."""
    path = Path(layers_dir) / "grid.gpkg" if layers_dir is not None else None
    if path is None or not path.is_file():
        return None
    return read_layer(path, None, what="the grid layer", fix="fix layers/grid.gpkg", columns=("unit",))


def largest_structures(view: MonthView, figures: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """The ``n`` largest new illegal structures of the month with the flag that opened each."""
    flags = view.flags[view.flags["kind"] == "new"]
    out = []
    for case in sorted(figures["new_cases"]["cases"], key=lambda c: (-c["area_m2"], c["case_id"]))[:n]:
        mine = flags[flags["case_id"].astype(str) == case["case_id"]].sort_values("area_m2", ascending=False)
        out.append({**case, "flag_id": str(mine["flag_id"].iloc[0]) if len(mine) else ""})
    return out


def thumbnails(pair_dir: Path, view: MonthView, rows: list[dict[str, Any]], settings: ReportSettings) -> None:
    """Add ``before`` / ``after`` JPEG data URLs to ``rows`` from the aligned pair (the map's chips)."""
    from pipeline.config import MapSettings
    from pipeline.pair import AlignedPair
    from pipeline.publish.mapimagery import make_chips

    wanted = [r["flag_id"] for r in rows if r["flag_id"]]
    flags = view.flags[view.flags["flag_id"].astype(str).isin(wanted)]
    if flags.empty:
        return
    chip_settings = MapSettings.model_validate({"max_chips": len(flags), "chip_px": settings.thumbnail_px})
    with AlignedPair.open(pair_dir) as pair:
        chips = make_chips(pair, flags, chip_settings)
    for r in rows:
        if r["flag_id"] in chips:
            r["before"], r["after"] = chips[r["flag_id"]]


def trend_csv(trend: list[dict[str, Any]]) -> str:
    """The trend as CSV (month, new_cases, new_area_m2, demolished): the DVC plot."""
    lines = ["month,new_cases,new_area_m2,demolished"]
    lines += [f"{r['month']},{r['new_cases']},{r['new_area_m2']},{r['demolished']}" for r in trend]
    return "\n".join(lines) + "\n"


def build_report(
    month: str,
    ledger_path: Path,
    flags_path: Path,
    out_dir: Path,
    *,
    settings: ReportSettings,
    qa_path: Path | None = None,
    truth_path: Path | None = None,
    metrics_path: Path | None = None,
    trend_path: Path | None = None,
    layers_dir: Path | None = None,
    pair_dir: Path | None = None,
    prev_month: str | None = None,
    model_path: Path | None = None,
    model_metrics_path: Path | None = None,
    params_path: Path | None = None,
    params: Mapping[str, Any] | None = None,
    issued_dir: Path | None = None,
) -> Path:
    """Write the month's report as ``out_dir/<month>.{html,pdf,md}``, its figures as ``<month>.json``.

    With ``issued_dir`` the report is also an issued version (:mod:`pipeline.publish.issued`): the first
    one of the month, or one whose figures differ from the latest, is archived as the next
    ``issued_dir/<month>/v<n>/``; the report names its version and, after v1, carries the revision note.

    Args:
        month: ``YYYY-MM``.
        ledger_path: the ledger GeoPackage.
        flags_path: the month's flags GeoPackage.
        out_dir: the report folder (created).
        settings: the ``report`` section of params.yaml (languages, PDF, thumbnails).
        qa_path: the align stage's qa.json for the month (co-registration residuals, usable).
        truth_path: the demo's truth GeoPackage; adds the accuracy line (demo only).
        metrics_path: where to write the headline metrics (default ``out_dir/<month>.metrics.json``).
        trend_path: where to write the trend CSV (default ``out_dir/<month>.trend.csv``).
        layers_dir: folder with ``districts.gpkg`` (league rows, km²) and ``grid.gpkg`` (units).
        pair_dir: the month's aligned pair (sheets, thumbnails).
        prev_month: the month compared with (default the calendar month before).
        model_path: the checkpoint the month was detected with.
        model_metrics_path: ``models/metrics.json`` (the model's validation scores).
        params_path: params.yaml (its hash is printed).
        params: the params to print (e.g. the detect and vectorize sections).
        issued_dir: the archive of issued versions (``<reports>/issued``); None: not issued (a preview).

    Returns:
        The HTML report's path.

    Raises:
        MissingInputError: an input file is missing.
        CorruptFileError: qa.json is not valid JSON.
        ConfigError: ``settings.pdf`` is set and WeasyPrint cannot run.
    """
    check_month(month)
    view = load_month_view(month, Path(ledger_path), Path(flags_path))
    figures = compute_figures(
        view, district_area_km2=district_areas(layers_dir), grid=read_grid(layers_dir), prev_month=prev_month
    )
    qa_raw: dict[str, Any] | None = None
    if qa_path is not None:
        figures["qa"] = read_qa(Path(qa_path))
        qa_raw = json.loads(Path(qa_path).read_text(encoding="utf-8"))
    else:
        figures["qa"] = None
    figures["quality"] = imagery_quality(qa_raw, pair_dir) if qa_raw is not None else None
    scored = accuracy(month, view.flags, Path(truth_path)) if truth_path is not None else None
    figures["accuracy"] = scored["iou"] if scored else None
    figures["accuracy_centroid"] = scored["centroid"] if scored else None
    figures["model"] = model_card(model_path, model_metrics_path)
    figures["reproduce"] = {
        "code_version": code_version(),
        "params": params_digest(params_path),
        "values": json.loads(json.dumps(dict(params or {}), default=str)),
        "command": f"dvc repro report@{month}",
    }
    issue = None
    if issued_dir is not None:
        states = dict(zip(view.cases["case_id"].astype(str), view.cases["state_at"].astype(str), strict=True))
        issue = plan_issue(Path(issued_dir), month, headline(figures), states)
    figures["issue"] = issue.as_figures() if issue is not None else None
    largest = largest_structures(view, figures, settings.thumbnails)
    if pair_dir is not None and largest and Path(pair_dir).is_dir():
        thumbnails(Path(pair_dir), view, largest, settings)
    figures["largest"] = [{k: v for k, v in r.items() if k not in ("before", "after")} for r in largest]
    context = {
        "m": figures,
        "largest": largest,
        "languages": list(settings.languages),
        "limit": settings.list_limit,
        "labels": LABELS,
        "state_zh": STATE_ZH,
        "kind_zh": KIND_ZH,
        "flag_zh": FLAG_ZH,
        "alert_zh": ALERT_ZH,
        "lifecycle_kinds": LIFECYCLE_KINDS,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path, pdf_path = (out_dir / f"{month}.{ext}" for ext in ("html", "md", "pdf"))
    figs = {lang: charts(figures, lang) for lang in settings.languages}
    html = _env(True).get_template("report.html.j2").render(charts=figs, **context)
    markdown = _env(False).get_template("report.md.j2").render(**context)
    figures_path = out_dir / f"{month}.json"
    metrics_path = Path(metrics_path) if metrics_path is not None else out_dir / f"{month}.metrics.json"
    trend_path = Path(trend_path) if trend_path is not None else out_dir / f"{month}.trend.csv"
    # one generation: every file of the month's report is written first, then all are swapped in together
    # (the DVC metrics file last), so a failure leaves the previous report whole, never half old, half new
    outputs = [html_path, md_path, *([pdf_path] if settings.pdf else []), figures_path, trend_path, metrics_path]
    with atomic_paths(outputs) as tmps:
        tmp = dict(zip(outputs, tmps, strict=True))
        tmp[html_path].write_text(html, encoding="utf-8")
        tmp[md_path].write_text(markdown, encoding="utf-8")
        if settings.pdf:
            from pipeline.publish.pdf import write_pdf

            write_pdf(html, tmp[pdf_path])
        tmp[figures_path].write_text(json.dumps(figures, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        tmp[trend_path].write_text(trend_csv(figures["trend"]), encoding="utf-8")
        tmp[metrics_path].write_text(
            json.dumps(headline(figures), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        if issue is not None and issue.new:  # archived before the month's files are swapped in
            assert issued_dir is not None
            sent = {p.name: tmp[p] for p in (html_path, md_path, pdf_path, figures_path) if p in tmp}
            where = write_issue(
                Path(issued_dir),
                issue,
                sent,
                ledger_events=int(pyogrio.read_info(Path(ledger_path), layer="events")["features"]),
                ledger_events_to_month=len(view.events),
            )
            log.info("issued %s as version %d -> %s", month, issue.version, where)
    log.info(
        "wrote %s (+ .md%s, .json), %s: %d new cases, %d alerts",
        str(html_path),
        ", .pdf" if settings.pdf else "",
        str(metrics_path),
        figures["new_cases"]["count"],
        figures["alerts"]["count"],
    )
    return html_path
