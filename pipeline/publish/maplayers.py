"""The inspector map's GeoJSON layers: flags, cases, alerts and outlines with bilingual popups, and their colours.

Each ``*_features`` function turns a :class:`~pipeline.ledger.view.MonthView` (or an outline layer) into a
FeatureCollection in EPSG:4326 (the folium boundary) whose features carry a colour and a popup rendered by
the macros of ``templates/map_popup.html.j2``; :func:`legend_html` renders the legend. The Chinese names
come from :mod:`pipeline.ledger.labels` (the report uses the same); the colours are the map's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import geopandas as gpd
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from pipeline.formats import MU_M2
from pipeline.ledger.labels import ALERT_ZH, CATEGORY_ZH, FLAG_ZH, KIND_ZH, STATE_ZH
from pipeline.ledger.lifecycle import STATES
from pipeline.ledger.view import MonthView

STATE_COLORS: dict[str, str] = {
    "warning": "#e31a1c",
    "confirmed": "#fd8d3c",
    "stopped": "#fecc5c",
    "ordered": "#c51b8a",
    "demolished": "#6a51a3",
    "repaired": "#41ab5d",
    "closed": "#1a9850",
    "dismissed": "#969696",
}
"""Lifecycle state → the colour of its cases on the map (and in the legend)."""
FLAG_COLORS: dict[str, str] = {"new": "#d7191c", "removed": "#2c7bb6"}
"""Flag kind → the colour of its outline on the map and on the chips."""
ALERT_COLOR = "#ff7f00"
"""The colour of the alert markers."""


@lru_cache(maxsize=1)
def _templates() -> Environment:
    return Environment(
        loader=PackageLoader("pipeline.publish", "templates"),
        autoescape=select_autoescape(["html", "html.j2"]),
        trim_blocks=False,
    )


def _macro(name: str) -> Any:
    return getattr(_templates().get_template("map_popup.html.j2").module, name)


# --------------------------------------------------------------------------------------------- features


def _fmt(value: Any, digits: int) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    return "" if math.isnan(number) else f"{number:,.{digits}f}"


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _history(events: pd.DataFrame) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for row in events.itertuples(index=False):
        rec = {
            "at": _text(row.at)[:10],
            "kind": _text(row.kind),
            "kind_zh": KIND_ZH.get(_text(row.kind), ""),
            "source": _text(getattr(row, "source", "")),
            "actor": _text(getattr(row, "actor", "")),
            "note": _text(getattr(row, "note", "")),
        }
        out.setdefault(_text(row.case_id), []).append(rec)
    return out


def _grid_units(frame: gpd.GeoDataFrame, grid: gpd.GeoDataFrame | None) -> list[str]:
    """The 网格 cell and responsible unit under each feature's representative point."""
    if grid is None or not len(grid) or not len(frame):
        return [""] * len(frame)
    points = gpd.GeoDataFrame(geometry=frame.geometry.representative_point(), crs=frame.crs)
    joined = gpd.sjoin(points, grid[["cell_id", "unit", "geometry"]], how="left", predicate="within")
    joined = joined[~joined.index.duplicated(keep="first")]
    labels = [
        " / ".join(p for p in (_text(c), _text(u)) if p) for c, u in zip(joined["cell_id"], joined["unit"], strict=True)
    ]
    return labels


def _feature_collection(frame: gpd.GeoDataFrame, props: list[dict[str, Any]]) -> dict[str, Any]:
    """GeoJSON in EPSG:4326 (the folium boundary) with only the given properties."""
    import shapely

    geo = shapely.set_precision(frame.geometry.to_crs(4326).values, 1e-7)  # about 1 cm: a smaller page
    features = []
    for i, (geom, p) in enumerate(zip(geo, props, strict=True)):
        if geom is None or geom.is_empty:
            continue
        features.append({"type": "Feature", "id": str(i), "properties": p, "geometry": geom.__geo_interface__})
    return {"type": "FeatureCollection", "features": features}


def flag_features(
    view: MonthView,
    flags: gpd.GeoDataFrame,
    grid: gpd.GeoDataFrame | None,
    chips: Mapping[str, str],
    prev_label: str = "",
) -> dict[str, Any]:
    """The flags as GeoJSON with a bilingual popup per feature.

    A flag's case is the one the ledger attached it to (``flags["case_id"]`` from
    :func:`pipeline.ledger.view.flag_cases`); the map draws no match of its own, so a flag lying on a
    dismissed case shows that case only when the ledger recorded the flag on it.
    """
    case_of = [_text(c) for c in flags["case_id"]]
    states = dict(zip(view.cases["case_id"].astype(str), view.cases["state_at"], strict=True))
    history = _history(view.events)
    units = _grid_units(flags, grid)
    macro = _macro("flag_popup")
    props = []
    for row, case_id, unit in zip(flags.itertuples(index=False), case_of, units, strict=True):
        kind = _text(row.kind)
        flag_id = _text(row.flag_id)
        state = states.get(case_id, "")
        popup = macro(
            {
                "flag_id": flag_id,
                "kind": kind,
                "kind_zh": FLAG_ZH.get(kind, ""),
                "color": FLAG_COLORS.get(kind, "#000"),
                "area_m2": _fmt(row.area_m2, 1),
                "area_mu": _fmt(row.area_mu, 3),
                "p_mean": _fmt(row.p_mean, 2),
                "p_max": _fmt(row.p_max, 2),
                "district": _text(row.district),
                "street": _text(row.street),
                "grid": unit,
                "case_id": case_id,
                "state": state,
                "state_zh": STATE_ZH.get(state, ""),
                "chip": chips.get(flag_id, ""),
                "prev_label": prev_label,
                "month": view.month,
                "events": history.get(case_id, []),
            }
        )
        props.append(
            {
                "flag_id": flag_id,
                "kind": kind,
                "case_id": case_id,
                "color": FLAG_COLORS.get(kind, "#000"),
                "search": " ".join(p for p in (flag_id, case_id, _text(row.street), unit) if p),
                "popup": str(popup),
            }
        )
    return _feature_collection(flags, props)


def case_features(
    view: MonthView,
    grid: gpd.GeoDataFrame | None,
    chips: Mapping[str, str] | None = None,
    prev_label: str = "",
) -> dict[str, Any]:
    """The cases as GeoJSON, coloured by their state as of the month, with event history popups.

    ``chips`` maps a case id to the key of its before/after chips in the page's chip table (``data-chip``).
    """
    chips = chips or {}
    history = _history(view.events)
    units = _grid_units(view.cases, grid)
    macro = _macro("case_popup")
    props = []
    for row, unit in zip(view.cases.itertuples(index=False), units, strict=True):
        case_id, state, category = _text(row.case_id), _text(row.state_at), _text(row.category)
        popup = macro(
            {
                "case_id": case_id,
                "state": state,
                "state_zh": STATE_ZH.get(state, ""),
                "color": STATE_COLORS.get(state, "#000"),
                "category": category,
                "category_zh": CATEGORY_ZH.get(category, ""),
                "area_m2": _fmt(row.area_m2, 1),
                "area_mu": _fmt(float(row.area_m2) / MU_M2, 3),
                "district": _text(row.district),
                "street": _text(row.street),
                "grid": unit,
                "opened_at": _text(row.opened_at)[:10],
                "deadline": _text(row.deadline)[:10],
                "events": history.get(case_id, []),
                "chip": chips.get(case_id, ""),
                "prev_label": prev_label,
                "month": view.month,
            }
        )
        props.append(
            {
                "case_id": case_id,
                "state": state,
                "color": STATE_COLORS.get(state, "#000"),
                "search": " ".join(p for p in (case_id, _text(row.street), unit) if p),
                "popup": str(popup),
            }
        )
    return _feature_collection(view.cases, props)


def outline_features(frame: gpd.GeoDataFrame, column: str) -> dict[str, Any]:
    """An outline layer (districts, streets, grid cells) as GeoJSON, each feature named by ``column``.

    Grid cells are named ``cell / unit``; ``search`` holds the words the page's search box matches.
    """
    names = [_text(v) for v in frame[column]]
    if "unit" in frame.columns:
        names = [" / ".join(p for p in (n, _text(u)) if p) for n, u in zip(names, frame["unit"], strict=True)]
    return _feature_collection(frame, [{"name": n, "search": n} for n in names])


def permit_features(permits: gpd.GeoDataFrame, month: str) -> dict[str, Any]:
    """Permits as GeoJSON with a popup (id, validity, note) and whether each is valid in ``month``."""
    macro = _macro("permit_popup")
    props = []
    for row in permits.itertuples(index=False):
        start, end = _text(getattr(row, "valid_from", ""))[:10], _text(getattr(row, "valid_to", ""))[:10]
        valid = (not start or start[:7] <= month) and (not end or end[:7] >= month)
        permit_id = _text(row.permit_id)
        rec = {"permit_id": permit_id, "valid_from": start, "valid_to": end, "note": _text(getattr(row, "note", ""))}
        props.append({"permit_id": permit_id, "valid": valid, "search": permit_id, "popup": str(macro(rec))})
    return _feature_collection(permits, props)


def earlier_flag_features(view: MonthView) -> dict[str, Any]:
    """Flags of earlier months as the ledger recorded them (imagery events naming a flag), with their month."""
    events = view.events
    mask = (events["source"].astype(str) == "imagery") & (events["month"].astype(str) < view.month)
    mask &= events["evidence"].astype(str).str.startswith("F")
    earlier = events[mask].drop_duplicates("evidence", keep="first")
    macro = _macro("earlier_popup")
    props = []
    for row in earlier.itertuples(index=False):
        rec = {
            "flag_id": _text(row.evidence),
            "month": _text(row.month),
            "case_id": _text(row.case_id),
            "kind": _text(row.kind),
            "kind_zh": KIND_ZH.get(_text(row.kind), ""),
        }
        props.append(
            {
                "flag_id": rec["flag_id"],
                "month": rec["month"],
                "case_id": rec["case_id"],
                "search": f"{rec['flag_id']} {rec['case_id']}",
                "popup": str(macro(rec)),
            }
        )
    return _feature_collection(earlier, props)


def legend_html(title: str) -> str:
    """The map's legend: every lifecycle state and both flag kinds with their colours, Chinese first."""
    return str(
        _macro("legend")(
            title,
            [(s, STATE_ZH[s], STATE_COLORS[s]) for s in STATES],
            [(k, FLAG_ZH[k], FLAG_COLORS[k]) for k in ("new", "removed")],
        )
    )


def alert_features(view: MonthView, chips: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The month's alerts as points (representative point of each alert's geometry), linked to their case.

    ``chips`` maps a case id to its chip key (an alert shows its case's chips).
    """
    chips = chips or {}
    macro = _macro("alert_popup")
    props = []
    for row in view.alerts.itertuples(index=False):
        kind = _text(row.kind)
        props.append(
            {
                "case_id": _text(row.case_id),
                "kind": kind,
                "search": _text(row.case_id),
                "popup": str(
                    macro(
                        {
                            "case_id": _text(row.case_id),
                            "kind": kind,
                            "kind_zh": ALERT_ZH.get(kind, ""),
                            "message_zh": _text(row.message_zh),
                            "message_en": _text(row.message_en),
                            "chip": chips.get(_text(row.case_id), ""),
                            "month": view.month,
                        }
                    )
                ),
            }
        )
    points = view.alerts.set_geometry(view.alerts.geometry.representative_point())
    return _feature_collection(points, props)
