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
- closure rate: closed cases / cases opened by the month's end that were not dismissed.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined

from pipeline.config import ReportSettings, check_month
from pipeline.errors import CorruptFileError, MissingInputError
from pipeline.fileio import atomic_path, read_layer
from pipeline.formats import (
    MU_M2,
    QA_BLOCK_AFTER,
    QA_BLOCK_BEFORE,
    QA_BLOCK_VALUES,
    QA_BLOCKS,
    QA_KEYS,
)
from pipeline.ledger.labels import ALERT_ZH, FLAG_ZH, KIND_ZH, STATE_ZH
from pipeline.ledger.lifecycle import STATES
from pipeline.ledger.view import MonthView, load_month_view

log = logging.getLogger(__name__)

LIFECYCLE_KINDS: tuple[str, ...] = ("confirmed", "stopped", "ordered", "demolished", "repaired", "closed", "dismissed")
PERMIT_WORDS: tuple[str, ...] = ("permit", "许可")
CJK_FONTS: tuple[str, ...] = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
)

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


def compute_figures(view: MonthView) -> dict[str, Any]:
    """Every number of the month's report (also the metrics JSON).

    Args:
        view: the month's view of the ledger and flags.

    Returns:
        A JSON-ready mapping (see the module docstring for the conventions).
    """
    month, cases, events, flags = view.month, view.cases, view.events, view.flags
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
    this_month = events[events["month"] == month]
    lifecycle = {
        k: sorted(set(this_month.loc[this_month["kind"] == k, "case_id"].astype(str))) for k in LIFECYCLE_KINDS
    }
    demolished_ever = set(events.loc[events["kind"] == "demolished", "case_id"].astype(str))
    removed_seen = set(this_month.loc[this_month["kind"] == "observed_removed", "case_id"].astype(str))
    removed_ever = set(events.loc[events["kind"] == "observed_removed", "case_id"].astype(str))
    active = cases[cases["state_at"] != "dismissed"]
    closed = int((active["state_at"] == "closed").sum())
    alerts = view.alerts
    return {
        "month": month,
        "flags": {
            kind: {"count": int((flags["kind"] == kind).sum()), **_area(flags.loc[flags["kind"] == kind, "area_m2"])}
            for kind in ("new", "removed")
        },
        "new_cases": {
            "count": len(illegal),
            **_area(illegal["area_m2"]),
            "cases": [_row(c) for c in illegal.itertuples()],
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
        "lifecycle": {k: {"count": len(v), "case_ids": v} for k, v in lifecycle.items()},
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
            "items": [
                {
                    "case_id": str(a.case_id),
                    "kind": str(a.kind),
                    "message_zh": str(a.message_zh or ""),
                    "message_en": str(a.message_en or ""),
                }
                for a in alerts.sort_values(["kind", "case_id"]).itertuples()
            ],
        },
        "states": {s: int((cases["state_at"] == s).sum()) for s in STATES},
        "cases_total": len(cases),
        "cases_active": len(active),
        "cases_closed": closed,
        "closure_rate": round(closed / len(active), 4) if len(active) else None,
    }


def _cjk_font() -> str | None:
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    found = next((n for n in CJK_FONTS if n in names), None)
    if found is None:  # fonts installed after matplotlib built its cache: register them
        for path in font_manager.findSystemFonts():
            if any(tag in Path(path).name for tag in ("SansCJK", "wqy", "SourceHanSans", "simhei", "msyh")):
                font_manager.fontManager.addfont(path)
        names = {f.name for f in font_manager.fontManager.ttflist}
        found = next((n for n in CJK_FONTS if n in names), None)
    return found


def trend_chart(view: MonthView) -> str | None:
    """A small bar chart of new cases per month up to this one (base64 PNG), or None with < 2 months."""
    cases = view.cases[view.cases["state_at"] != "dismissed"]
    if "first_month" not in cases or cases["first_month"].nunique() < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    counts = cases.groupby(cases["first_month"].astype(str)).size().sort_index()
    font = _cjk_font()
    title = "每月新增案件 New cases per month" if font else "New cases per month"
    if font is None:
        log.info("no CJK font found for matplotlib; the chart is labelled in English only")
    rc: Any = {"font.family": [font, "sans-serif"]} if font else {}
    with plt.rc_context(rc):
        fig, ax = plt.subplots(figsize=(5.5, 2.4), dpi=110)
        colors = ["#d7191c" if m == view.month else "#9e9e9e" for m in counts.index]
        ax.bar(range(len(counts)), list(counts.values), color=colors)
        ax.set_xticks(range(len(counts)), [str(m) for m in counts.index])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
    return env


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
) -> Path:
    """Write the month's report as ``out_dir/<month>.html`` and ``.md``, and its numbers as JSON.

    Args:
        month: ``YYYY-MM``.
        ledger_path: the ledger GeoPackage.
        flags_path: the month's flags GeoPackage.
        out_dir: the report folder (created).
        settings: the ``report`` section of params.yaml (languages and their order).
        qa_path: the align stage's qa.json for the month (co-registration residuals).
        truth_path: the demo's truth GeoPackage; adds the accuracy line (demo only).
        metrics_path: where to write the metrics JSON (default ``out_dir/<month>.json``).

    Returns:
        The HTML report's path.

    Raises:
        MissingInputError: an input file is missing.
        CorruptFileError: qa.json is not valid JSON.
    """
    check_month(month)
    view = load_month_view(month, Path(ledger_path), Path(flags_path))
    figures = compute_figures(view)
    figures["qa"] = read_qa(Path(qa_path)) if qa_path is not None else None
    scored = accuracy(month, view.flags, Path(truth_path)) if truth_path is not None else None
    figures["accuracy"] = scored["iou"] if scored else None
    figures["accuracy_centroid"] = scored["centroid"] if scored else None
    context = {
        "m": figures,
        "languages": list(settings.languages),
        "labels": LABELS,
        "state_zh": STATE_ZH,
        "kind_zh": KIND_ZH,
        "flag_zh": FLAG_ZH,
        "alert_zh": ALERT_ZH,
        "lifecycle_kinds": LIFECYCLE_KINDS,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / f"{month}.html", out_dir / f"{month}.md"
    _write(html_path, _env(True).get_template("report.html.j2").render(chart=trend_chart(view), **context))
    _write(md_path, _env(False).get_template("report.md.j2").render(**context))
    metrics_path = Path(metrics_path) if metrics_path is not None else out_dir / f"{month}.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    _write(metrics_path, json.dumps(figures, ensure_ascii=False, indent=2) + "\n")
    log.info(
        "wrote %s, %s and %s: %d new cases, %d alerts",
        str(html_path),
        str(md_path),
        str(metrics_path),
        figures["new_cases"]["count"],
        figures["alerts"]["count"],
    )
    return html_path


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
