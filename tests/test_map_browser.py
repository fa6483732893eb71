"""Open the written map in headless Chromium with the network unused and check Leaflet really drew it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from maps_report_data import (
    FLAG_IDS,
    MONTH,
    N_ALERTS_MONTH,
    N_CASES_MONTH,
    N_FLAGS_MONTH,
    FakePair,
    fake_open,
    write_inputs,
)

from pipeline.config import MapSettings
from pipeline.publish import maps

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("SCARWATCH_CHROMIUM", "/usr/bin/chromium"))
SHOT_DIR = os.environ.get("SCARWATCH_SCREENSHOT_DIR")  # keep the screenshots there to look at them
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
    "--window-size=1280,900",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no host name resolves: an office network without internet
]
OPEN_POPUP = """
<style>.leaflet-popup { transition: none !important; }</style>
<script>
window.addEventListener("load", function () {
  Object.keys(window).filter(function (k) { return k.indexOf("geo_json_") === 0; }).forEach(function (k) {
    if (typeof window[k].eachLayer !== "function") { return; }  // skip the styler/add helpers
    window[k].eachLayer(function (layer) {
      if (layer.feature && layer.feature.properties.flag_id === "FLAG_ID") {
        var center = layer.getBounds().getCenter();
        layer._map.setView(center, 18, {animate: false});
        layer.openPopup(center);
      }
    });
  });
});
</script>
"""


def with_probe(page: Path, out: Path) -> Path:
    """A copy of ``page`` that opens flag F-0301's popup once the map scripts have run."""
    head, _, _ = page.read_text(encoding="utf-8").rpartition("</html>")
    out.write_text(head + OPEN_POPUP.replace("FLAG_ID", FLAG_IDS["F-0301"]) + "</html>\n", encoding="utf-8")
    return out


def chromium(page: Path, profile: Path, *extra: str) -> str:
    result = subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium fonts-noto-cjk)")
    root = tmp_path_factory.mktemp("browser")
    inputs = write_inputs(root)
    pair = FakePair()
    mp = pytest.MonkeyPatch()
    mp.setattr(maps, "_open_pair", lambda _d: fake_open(pair))
    try:
        return maps.build_map(
            MONTH,
            inputs["ledger"],
            inputs["flags"],
            root / "map.html",
            settings=MapSettings(),
            layers_dir=inputs["layers"],
            pair_dir=root,
        )
    finally:
        mp.undo()


def test_leaflet_draws_every_visible_feature(page: Path, tmp_path: Path) -> None:
    dom = chromium(page, tmp_path / "profile", "--dump-dom")
    assert "leaflet-container" in dom
    paths = re.findall(r'<path[^>]*class="leaflet-interactive"', dom)
    # districts (2) + streets (4) + cases + flags + alerts; the grid layer starts hidden
    assert len(paths) == 2 + 4 + N_CASES_MONTH + N_FLAGS_MONTH + N_ALERTS_MONTH
    assert dom.count('class="leaflet-image-layer') == 1  # this month's imagery; the previous one is off
    assert "leaflet-control-layers" in dom and "sw-legend" in dom


def test_popup_opens_with_case_and_chips(page: Path, tmp_path: Path) -> None:
    dom = chromium(with_probe(page, tmp_path / "probe.html"), tmp_path / "profile", "--dump-dom")
    popup = dom[dom.index('<div class="leaflet-popup-content"') :]
    assert FLAG_IDS["F-0301"] in popup and "C-001" in popup and "亩" in popup
    assert popup.count("<img") >= 2


def test_screenshot_shows_the_map(page: Path, tmp_path: Path) -> None:
    from PIL import Image

    out_dir = Path(SHOT_DIR) if SHOT_DIR else tmp_path
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, html in (("map", page), ("map_popup", with_probe(page, tmp_path / "probe.html"))):
        shot = out_dir / f"{name}.png"
        chromium(html, tmp_path / f"profile_{name}", f"--screenshot={shot}")
        pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
        assert pixels.shape[:2] == (900, 1280)
        assert pixels.std() > 10  # not a blank page
