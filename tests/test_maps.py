from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest
from maps_report_data import (
    CRS,
    FLAG_IDS,
    MONTH,
    N_ALERTS_MONTH,
    N_CASES_MONTH,
    N_FLAGS_MONTH,
    FakePair,
    fake_open,
    rect,
    write_flags,
    write_inputs,
)

from pipeline.config import LedgerSettings, MapSettings
from pipeline.errors import CRSMismatchError, InputError, MissingInputError
from pipeline.ledger import build_ledger, read_ledger
from pipeline.ledger.labels import STATE_ZH
from pipeline.ledger.lifecycle import STATES
from pipeline.ledger.view import load_month_view
from pipeline.publish import maps
from pipeline.publish.mapimagery import make_chips, make_overlay
from pipeline.publish.maplayers import FLAG_COLORS, STATE_COLORS, flag_features


class _Links(HTMLParser):
    """Every URL a page would load by itself: script src, link href, img src, iframe src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src", "iframe": "src", "source": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


def external_urls(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return [u for u in parser.urls if re.match(r"^(https?:)?//", u.strip(), flags=re.I)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("mapdata"))


@pytest.fixture(scope="module")
def full_map(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    pair = FakePair()
    mp = pytest.MonkeyPatch()
    mp.setattr(maps, "_open_pair", lambda _d: fake_open(pair))
    try:
        out = maps.build_map(
            MONTH,
            inputs["ledger"],
            inputs["flags"],
            tmp_path_factory.mktemp("map") / "m.html",
            settings=MapSettings(),
            layers_dir=inputs["layers"],
            pair_dir=Path("unused"),
        )
    finally:
        mp.undo()
    return out.read_text(encoding="utf-8")


def _layer(layers: dict[str, dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    (name,) = [n for n in layers if n.startswith(prefix)]
    return layers[name]["features"]


def test_layers_have_one_feature_per_record(full_map: str) -> None:
    layers = maps.embedded_geojson(full_map)
    assert len(_layer(layers, "本月图斑 Flags")) == N_FLAGS_MONTH
    assert len(_layer(layers, "案件 Cases")) == N_CASES_MONTH
    assert len(_layer(layers, "告警 Alerts")) == N_ALERTS_MONTH
    assert len(_layer(layers, "区界")) == 2
    assert len(_layer(layers, "街道")) == 4
    assert len(_layer(layers, "网格")) == 16
    kinds = sorted(f["properties"]["kind"] for f in _layer(layers, "本月图斑"))
    assert kinds == ["new", "new", "new", "new", "removed"]
    colors = {f["properties"]["kind"]: f["properties"]["color"] for f in _layer(layers, "本月图斑")}
    assert colors == {"new": FLAG_COLORS["new"], "removed": FLAG_COLORS["removed"]}
    for feature in _layer(layers, "案件"):  # reprojected to lon/lat at the folium boundary
        lon, lat = feature["geometry"]["coordinates"][0][0]
        assert 125.9 < lon < 126.1 and 43.8 < lat < 44.0


def test_page_is_self_contained(full_map: str) -> None:
    assert external_urls(full_map) == []
    assert "cdn.jsdelivr" not in full_map and "jquery" not in full_map.lower()
    assert 't.version="1.9.3"' in full_map  # Leaflet inlined
    assert ".leaflet-container" in full_map and "url(images/" not in full_map
    assert "sourceMappingURL" not in full_map
    assert "L.control.layers" in full_map
    assert "data:image/jpeg;base64," in full_map  # image overlay and chips


def test_flag_popup_is_bilingual_with_case_history_and_chips(full_map: str) -> None:
    flags = {f["properties"]["flag_id"]: f["properties"] for f in _layer(maps.embedded_geojson(full_map), "本月图斑")}
    popup = flags[FLAG_IDS["F-0301"]]["popup"]
    assert "C-001" in popup and "亩" in popup and "m²" in popup
    assert popup.index("面积") < popup.index("Area")  # Chinese first
    assert "预警 warning" in popup  # state as of March, not the final 'closed'
    assert "网格员" in popup  # responsible grid unit
    assert popup.count(f'data-chip="{FLAG_IDS["F-0301"]}"') == 2  # before and after chips, from the chip table
    assert f'{json.dumps(FLAG_IDS["F-0301"])}: ["data:image/jpeg;base64,' in full_map
    assert "事件记录" in popup and "flagged" in popup
    assert "0.180" in popup  # 120 m² in 亩
    assert flags[FLAG_IDS["F-0304"]]["case_id"] == "C-005"  # matched by the event's evidence
    assert flags[FLAG_IDS["F-0305"]]["case_id"] == "C-004"


def test_case_and_alert_popups(full_map: str) -> None:
    layers = maps.embedded_geojson(full_map)
    cases = {f["properties"]["case_id"]: f["properties"] for f in _layer(layers, "案件")}
    assert "C-007" not in cases  # opens in April
    assert cases["C-001"]["state"] == "warning"
    assert cases["C-006"]["state"] == "closed" and cases["C-005"]["state"] == "demolished"
    assert cases["C-006"]["color"] == STATE_COLORS["closed"]
    assert "C-006" in cases["C-006"]["popup"] and "亩" in cases["C-006"]["popup"]
    assert "销号" in cases["C-006"]["popup"]
    alerts = [f["properties"] for f in _layer(layers, "告警")]
    assert {a["case_id"] for a in alerts} == {"C-005", "C-008"}
    assert any("制止后扩建" in a["popup"] and "Expansion after a stop order" in a["popup"] for a in alerts)


def test_legend_lists_every_state(full_map: str) -> None:
    legend = full_map[full_map.index('class="sw-legend') :]
    for state in STATES:
        assert f"{STATE_ZH[state]} {state}" in legend


def test_minimal_map_without_layers_or_imagery(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = maps.build_map(
        MONTH, inputs["ledger"], inputs["flags"], tmp_path / "a" / "m.html", settings=MapSettings(max_flags=2)
    )
    html = out.read_text(encoding="utf-8")
    layers = maps.embedded_geojson(html)
    assert sorted(n.split(" ")[1] for n in layers) == ["Alerts", "Cases", "Earlier", "Flags"]  # earlier: February
    flags = _layer(layers, "本月图斑")
    assert sorted(f["properties"]["flag_id"] for f in flags) == sorted(FLAG_IDS[f] for f in ("F-0302", "F-0305"))
    assert "data:image" not in flags[0]["properties"]["popup"]
    assert external_urls(html) == [] and "image_overlay_" not in html


def test_online_tiles_are_opt_in(inputs: dict[str, Path], tmp_path: Path) -> None:
    url = "https://tiles.example/{z}/{x}/{y}.png"
    html = maps.build_map(
        MONTH,
        inputs["ledger"],
        inputs["flags"],
        tmp_path / "m.html",
        settings=MapSettings(tiles=url, tiles_attribution="example"),
    ).read_text(encoding="utf-8")
    assert url in html and external_urls(html) == []  # tiles load from JS, never as page assets


def test_chips_and_overlay_read_only_inside_the_grid(inputs: dict[str, Path]) -> None:
    pair = FakePair()
    flags = gpd.read_file(inputs["flags"], layer="flags")
    chips = make_chips(pair, flags, MapSettings(max_chips=3, chip_px=32))
    assert len(chips) == 3 and all(u.startswith("data:image/jpeg;base64,") for c in chips.values() for u in c)
    overlay = make_overlay(pair, MapSettings(overlay_max_px=128))
    (south, west), (north, east) = overlay.bounds
    assert 43.87 < south < north < 43.90 and 125.99 < west < east < 126.03
    for win in pair.reads:
        assert win.col_off >= 0 and win.row_off >= 0
        assert win.col_off + win.width <= pair.width and win.row_off + win.height <= pair.height


def test_missing_inputs_raise_clear_errors(inputs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match=r"nope\.gpkg: not found; run the 'ledger' stage"):
        maps.build_map(MONTH, tmp_path / "nope.gpkg", inputs["flags"], tmp_path / "m.html", settings=MapSettings())
    with pytest.raises(InputError, match=r"layer 'flags' is missing"):
        maps.build_map(MONTH, inputs["ledger"], inputs["ledger"], tmp_path / "m.html", settings=MapSettings())
    with pytest.raises(ValueError, match="YYYY-MM"):
        maps.build_map("2026-3", inputs["ledger"], inputs["flags"], tmp_path / "m.html", settings=MapSettings())


def test_crs_mismatch_is_refused(inputs: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "flags3857.gpkg"
    gpd.read_file(inputs["flags"], layer="flags").to_crs(3857).to_file(other, layer="flags", driver="GPKG")
    with pytest.raises(CRSMismatchError, match="rebuild the ledger from these flags"):
        maps.build_map(MONTH, inputs["ledger"], other, tmp_path / "m.html", settings=MapSettings())


def test_leaflet_assets_come_from_the_package() -> None:
    js, css = maps._leaflet_assets()
    assert "L.version" in js or 'version="1.9.3"' in js
    assert "data:image/png;base64," in css and "url(images/" not in css
    assert "</script" not in js


def test_state_as_of_follows_the_log_order(inputs: dict[str, Path]) -> None:
    view = load_month_view("2026-02", inputs["ledger"], inputs["flags_feb"])
    states = dict(zip(view.cases["case_id"], view.cases["state_at"], strict=True))
    assert states == {"C-005": "ordered", "C-006": "demolished", "C-008": "stopped"}  # seed events share a date
    assert list(view.flags["flag_id"]) == [FLAG_IDS["F-0201"]] and len(view.alerts) == 1


def test_a_broken_outline_layer_names_its_fix_not_the_demo(inputs: dict[str, Path], tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    layers.mkdir()
    gpd.read_file(inputs["layers"] / "streets.gpkg").drop(columns=["street"]).to_file(layers / "streets.gpkg")
    with pytest.raises(
        InputError, match=r"streets\.gpkg: layer .* lacks columns \['street'\].*fix or remove it"
    ) as err:
        maps.build_map(
            MONTH, inputs["ledger"], inputs["flags"], tmp_path / "m.html", settings=MapSettings(), layers_dir=layers
        )
    assert "demo" not in str(err.value)


def test_a_flag_is_shown_on_the_case_the_ledger_put_it_on_and_never_on_a_dismissed_one_it_only_touches(
    tmp_path: Path,
) -> None:
    """The map shows the ledger's decision: a permit case its own flag opened, but no other flag on it."""
    permit = rect(0, 0, 400.0)
    raw = tmp_path / "raw"
    (raw / "layers").mkdir(parents=True)
    gpd.GeoDataFrame(
        {"permit_id": ["P-1"], "valid_from": ["2026-01-01"], "valid_to": [""]}, geometry=[permit], crs=CRS
    ).to_file(raw / "layers" / "permits.gpkg", driver="GPKG")
    built = rect(5, 5, 100.0)
    feb = write_flags(tmp_path / "flags" / "2026-02.gpkg", "2026-02", [("new", built, "", "")])
    mar = write_flags(tmp_path / "flags" / "2026-03.gpkg", "2026-03", [("removed", built, "", "")])
    ledger = tmp_path / "ledger.gpkg"
    months = ["2026-02", "2026-03"]
    build_ledger(sorted((tmp_path / "flags").glob("*.gpkg")), raw, ledger, LedgerSettings(), months=months)
    events, cases, _ = read_ledger(ledger)
    assert cases["state"].tolist() == ["dismissed"] and cases["permit_id"].tolist() == ["P-1"]
    assert mar["flag_id"][0] not in set(events["evidence"])  # the ledger matches no flag to a dismissed case

    for month, flags, case_id in (("2026-02", feb, cases["case_id"][0]), ("2026-03", mar, "")):
        view = load_month_view(month, ledger, tmp_path / "flags" / f"{month}.gpkg")
        assert view.flags["case_id"].tolist() == [case_id]
        (feature,) = flag_features(view, view.flags, None, {})["features"]
        assert feature["properties"]["flag_id"] == flags["flag_id"][0]
        assert feature["properties"]["case_id"] == case_id
        assert ("已排除 dismissed" in feature["properties"]["popup"]) == bool(case_id)
