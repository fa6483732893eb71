"""The report's charts (matplotlib, PNG as base64), labelled in the section's language.

The numbers come from the report's figures (:func:`pipeline.publish.report.compute_figures`): ``trend``
(every month so far, zero months included), ``funnel`` (cases that reached each lifecycle step to date)
and ``ageing`` (open cases by age). Chinese labels need a CJK font (Debian ``fonts-noto-cjk``; ``make
sysdeps``); without one the Chinese charts fall back to English labels and say so in the log.
"""

from __future__ import annotations

import base64
import io
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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

TEXT: dict[str, dict[str, str]] = {
    "zh": {
        "trend": "每月新增违法建设与拆除",
        "new_cases": "新增案件（处）",
        "area": "新增面积（m²）",
        "demolished": "拆除（处）",
        "funnel": "案件流转漏斗（累计）",
        "ageing": "在办案件账龄",
        "cases": "案件（处）",
        "days": "天",
    },
    "en": {
        "trend": "New illegal construction and demolitions per month",
        "new_cases": "new cases",
        "area": "new area (m²)",
        "demolished": "demolished",
        "funnel": "Lifecycle funnel (to date)",
        "ageing": "Ageing of open cases",
        "cases": "cases",
        "days": "days",
    },
}


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The first CJK font matplotlib can use, registering system fonts installed after its cache was built."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    found = next((n for n in CJK_FONTS if n in names), None)
    if found is None:
        for path in font_manager.findSystemFonts():
            if any(tag in Path(path).name for tag in ("SansCJK", "wqy", "SourceHanSans", "simhei", "msyh")):
                font_manager.fontManager.addfont(path)
        names = {f.name for f in font_manager.fontManager.ttflist}
        found = next((n for n in CJK_FONTS if n in names), None)
    return found


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _style(lang: str) -> tuple[dict[str, str], dict[str, Any]]:
    font = cjk_font()
    if lang == "zh" and font is None:
        log.warning("no CJK font for matplotlib (install fonts-noto-cjk); the Chinese charts are labelled in English")
        return TEXT["en"], {}
    return TEXT[lang], ({"font.family": [font, "DejaVu Sans"]} if font else {})


def charts(figures: dict[str, Any], lang: str) -> dict[str, str]:
    """The trend, funnel and ageing charts of one section as base64 PNGs, keyed by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    t, rc = _style(lang)
    out: dict[str, str] = {}
    style: Any = {**rc, "font.size": 8, "axes.spines.top": False, "axes.spines.right": False}
    with plt.rc_context(style):
        trend = figures["trend"]
        months = [r["month"] for r in trend]
        x = list(range(len(months)))
        fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=130)
        ax.bar([i - 0.2 for i in x], [r["new_cases"] for r in trend], 0.4, color="#d7191c", label=t["new_cases"])
        ax.bar([i + 0.2 for i in x], [r["demolished"] for r in trend], 0.4, color="#2c7bb6", label=t["demolished"])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xticks(x, months, rotation=45 if len(months) > 8 else 0, ha="right" if len(months) > 8 else "center")
        ax.set_ylabel(t["cases"])
        ax2 = ax.twinx()
        ax2.plot(x, [r["new_area_m2"] for r in trend], "o-", color="#444444", lw=1, ms=3, label=t["area"])
        ax2.set_ylabel(t["area"])
        ax2.set_ylim(bottom=0)
        ax2.spines["top"].set_visible(False)
        (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
        fig.legend(h1 + h2, l1 + l2, loc="lower center", ncol=3, fontsize=7, frameon=False)
        ax.set_title(t["trend"], fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        out["trend"] = _png(fig)

        funnel = figures["funnel"]
        fig, ax = plt.subplots(figsize=(6.4, 2.3), dpi=130)
        labels = [r["label_" + lang] for r in funnel]
        values = [r["count"] for r in funnel]
        ax.barh(range(len(values)), values, color="#b71c1c")
        ax.set_yticks(range(len(values)), labels)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v}", va="center", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(t["funnel"], fontsize=9)
        fig.tight_layout()
        out["funnel"] = _png(fig)

        ageing = figures["ageing"]
        fig, ax = plt.subplots(figsize=(6.4, 2.0), dpi=130)
        ax.bar(range(len(ageing)), [r["count"] for r in ageing], color="#fdae61")
        ax.set_xticks(range(len(ageing)), [f"{r['label']} {t['days']}" for r in ageing])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(t["cases"])
        ax.set_title(t["ageing"], fontsize=9)
        fig.tight_layout()
        out["ageing"] = _png(fig)
    return out
