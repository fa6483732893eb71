"""The written map in headless Chromium, driven over the DevTools protocol with the network unused.

Every request the page makes is recorded (``Network.requestWillBeSent``) and must stay on ``file:`` or
``data:``; console errors, exceptions and dialogs are recorded too. The page is the demo month's map with
its tile pyramid beside it, built from the shared fixtures (:mod:`maps_report_data`), and a second page
whose ledger and layers carry XSS payloads. Screenshots at desktop (1280×900) and phone (390×844) size are
written to ``$SCARWATCH_SCREENSHOT_DIR`` when set (else the test's tmp folder).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from maps_report_data import (
    FLAG_IDS,
    MONTH,
    N_ALERTS_MONTH,
    N_CASES_MONTH,
    N_FLAGS_MONTH,
    XSS_CASE,
    build_fixture_map,
)

from pipeline.ledger.view import load_month_view

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("SCARWATCH_CHROMIUM", "/usr/bin/chromium"))
SHOT_DIR = os.environ.get("SCARWATCH_SCREENSHOT_DIR")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no host name resolves: an office network without internet
    "--remote-debugging-port=0",
]


class Browser:
    """Headless Chromium over CDP (one page target, events recorded); a context manager."""

    def __init__(self, profile: Path) -> None:
        import websocket  # websocket-client

        self.proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stderr is not None
        url = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "DevTools listening on" in line:
                url = line.split("on ", 1)[1].strip()
                break
        assert url, "Chromium did not start its DevTools endpoint"
        self.ws = websocket.create_connection(url, timeout=60)
        self._id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                assert "error" not in reply, (method, reply["error"])
                return dict(reply.get("result", {}))
            self.events.append(reply)
            if reply.get("method") == "Page.javascriptDialogOpening":  # close it, and remember it
                self._id += 1
                self.ws.send(
                    json.dumps(
                        {
                            "id": self._id,
                            "method": "Page.handleJavaScriptDialog",
                            "params": {"accept": True},
                            "sessionId": self.session,
                        }
                    )
                )

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def js(self, expr: str) -> Any:
        out = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    def open(self, page: Path, width: int, height: int, *, mobile: bool = False) -> float:
        """Load ``page`` at ``width``×``height``; return the seconds until the map's UI is ready."""
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)
        if mobile:
            self.send("Emulation.setTouchEmulationEnabled", enabled=True)
        start = time.perf_counter()
        self.send("Page.navigate", url=page.resolve().as_uri())
        deadline = time.monotonic() + 120
        while not self.js("!!(window.SW && SW.ready && document.readyState === 'complete')"):
            assert time.monotonic() < deadline and not self.errors(), ("the map never became ready", self.errors())
            time.sleep(0.05)
        ready = time.perf_counter() - start
        self.idle()
        return ready

    def idle(self, seconds: float = 0.6) -> None:
        """Let tiles and timers settle (and record what they did)."""
        time.sleep(seconds)
        self.js("1")

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def center(self, element: str) -> tuple[float, float]:
        """The viewport centre of the element the JS expression ``element`` evaluates to (to click it)."""
        x, y = self.js(
            f"(function(){{var r=({element}).getBoundingClientRect();return [r.left+r.width/2, r.top+r.height/2];}})()"
        )
        return x, y

    def drag(self, x0: float, y0: float, x1: float, y1: float) -> None:
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y0, button="left", clickCount=1)
        for t in np.linspace(0, 1, 8):
            self.send(
                "Input.dispatchMouseEvent",
                type="mouseMoved",
                x=x0 + t * (x1 - x0),
                y=y0 + t * (y1 - y0),
                button="left",
                buttons=1,
            )
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y1, button="left", clickCount=1)

    def screenshot(self, path: Path) -> np.ndarray:
        from PIL import Image

        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return np.asarray(Image.open(path).convert("RGB"), dtype=float)

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(str(p["exceptionDetails"]))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(str(p.get("args")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(str(p["entry"]))
        return out

    def dialogs(self) -> list[str]:
        return [e["params"]["message"] for e in self.events if e.get("method") == "Page.javascriptDialogOpening"]

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def build_demo(root: Path, *, xss: bool = False) -> Path:
    """The demo month's map with its tile pyramid beside it (``<root>/maps/<month>.html``)."""
    return build_fixture_map(root, tiles=True, xss=xss)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(SHOT_DIR) if SHOT_DIR else tmp_path_factory.mktemp("shots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium fonts-noto-cjk)")
    pytest.importorskip("websocket", reason="pip install websocket-client")
    return build_demo(tmp_path_factory.mktemp("browser"))


@pytest.fixture()
def browser() -> Iterator[Browser]:
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile, Browser(Path(profile)) as b:
        yield b


def assert_offline_and_clean(b: Browser) -> None:
    urls = b.requests()
    assert urls, "no request recorded: the network log is not working"
    leaving = [u for u in urls if not u.startswith(("file:", "data:", "about:"))]
    assert leaving == []
    assert b.errors() == []
    assert b.dialogs() == []


def test_renders_offline_with_every_feature_and_tiles(page: Path, browser: Browser, shots: Path) -> None:
    browser.open(page, 1280, 900)
    assert_offline_and_clean(browser)
    assert any("_tiles/curr/" in u for u in browser.requests())  # imagery from the pyramid beside the page
    counts = browser.js("Object.fromEntries(Object.keys(SW.all).map(k => [k, SW.all[k].length]))")
    view = load_month_view(MONTH, page.parent.parent / "ledger.gpkg", page.parent.parent / "flags" / f"{MONTH}.gpkg")
    assert counts["flags"] == len(view.flags) == N_FLAGS_MONTH
    assert counts["cases"] == len(view.cases) == N_CASES_MONTH
    assert counts["alerts"] == len(view.alerts) == N_ALERTS_MONTH
    assert counts["earlier"] == 1 and counts["permits"] == 1  # February's flag, the permit
    assert counts["districts"] == 2 and counts["streets"] == 4 and counts["grid"] == 16
    assert browser.js("document.title").startswith(f"ScarWatch {MONTH}")
    assert browser.js("document.querySelectorAll('.leaflet-tile-loaded').length") > 0
    pixels = browser.screenshot(shots / "map_desktop.png")
    assert pixels.shape[:2] == (900, 1280) and pixels.std() > 10


def flag_point(b: Browser, flag_id: str, zoom: int = 18) -> tuple[float, float]:
    """Centre the map on the flag and return its centre in page pixels."""
    return tuple(
        b.js(
            "(function(){var l=SW.all.flags.find(x=>x.feature.properties.flag_id==="
            + json.dumps(flag_id)
            + ");var c=l.getBounds().getCenter();SW.map.setView(c,"
            + str(zoom)
            + ",{animate:false});var p=SW.map.latLngToContainerPoint(c);"
            "var r=SW.map.getContainer().getBoundingClientRect();return [p.x+r.left,p.y+r.top];})()"
        )
    )


def test_a_click_on_a_flag_opens_its_popup_with_the_timeline(page: Path, browser: Browser) -> None:
    browser.open(page, 1280, 900)
    x, y = flag_point(browser, FLAG_IDS["F-0301"])
    browser.click(x, y)
    browser.idle(0.4)
    text = browser.js("(document.querySelector('.leaflet-popup-content')||{}).textContent||''")
    assert FLAG_IDS["F-0301"] in text and "C-001" in text and "亩" in text
    assert "事件记录" in text and "flagged" in text
    browser.idle(0.5)
    chips = browser.js(  # before/after chips cut from the pyramid's tiles, the flag's outline over them
        "Array.from(document.querySelectorAll('.leaflet-popup-content .sw-chip')).map(c => ["
        "Array.from(c.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth === 256).length,"
        "c.querySelectorAll('svg path').length, Array.from(c.querySelectorAll('img')).map(i => i.src)])"
    )
    assert len(chips) == 2 and all(n >= 1 and paths == 1 for n, paths, _ in chips), chips
    assert "/prev/" in chips[0][2][0] and "/curr/" in chips[1][2][0]


def test_search_finds_a_case_and_pans(page: Path, browser: Browser) -> None:
    browser.open(page, 1280, 900)
    browser.js("SW.map.setView([43.8, 125.9], 14, {animate:false}); 0")
    browser.js(
        "(function(){var i=document.querySelector('.sw-search input');i.focus();i.value='C-005';"
        "i.dispatchEvent(new Event('input'));})()"
    )
    browser.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    browser.send("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    browser.idle(0.4)
    text = browser.js("(document.querySelector('.leaflet-popup-content')||{}).textContent||''")
    assert "C-005" in text and "拆除" in text
    inside = browser.js(
        "(function(){var l=SW.all.cases.find(x=>x.feature.properties.case_id==='C-005');"
        "return SW.map.getBounds().contains(l.getBounds());})()"
    )
    assert inside and browser.js("SW.map.getZoom()") >= 17
    assert [h["label"] for h in browser.js("SW.find('a2').map(e=>({label:e.label}))")][:1]  # a street
    assert browser.js("SW.find('网格员05').length") >= 1  # a grid unit


def test_swipe_moves_and_toggle_switches_epochs(page: Path, browser: Browser) -> None:
    browser.open(page, 1280, 900)
    browser.js("SW.show('prev')")
    assert browser.js("document.querySelector('.sw-epoch .sw-on').getAttribute('data-mode')") == "prev"
    browser.js("SW.show('swipe')")
    browser.idle(0.3)
    rect = browser.js(
        "(function(){var r=document.querySelector('.leaflet-sbs-divider').getBoundingClientRect();"
        "return [r.left, r.top, r.height];})()"
    )
    assert abs(rect[0] + 2 - 640) < 5  # starts in the middle
    r = browser.js(
        "(function(){var r=document.querySelector('.leaflet-sbs-range').getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height];})()"
    )
    browser.drag(r[0] + r[2] / 2, r[1] + r[3] / 2, 300, r[1] + r[3] / 2)
    browser.idle(0.3)
    moved = browser.js("document.querySelector('.leaflet-sbs-divider').getBoundingClientRect().left")
    assert moved < 400
    clips = browser.js(
        "Array.from(document.querySelectorAll('.leaflet-tile-pane .leaflet-layer')).map(e => e.style.clip)"
    )
    clips = [c for c in clips if c]
    assert len(clips) == 2 and all(c.startswith("rect(") for c in clips) and clips[0] != clips[1]
    assert_offline_and_clean(browser)


def test_phone_popup_fits_the_screen(page: Path, browser: Browser, shots: Path) -> None:
    browser.open(page, 390, 844, mobile=True)
    assert browser.js("document.body.classList.contains('sw-phone')")
    assert not browser.js("document.querySelector('.sw-legend').open")  # collapsed legend
    assert not browser.js(
        "document.querySelector('.leaflet-control-layers').classList.contains('leaflet-control-layers-expanded')"
    )
    x, y = flag_point(browser, FLAG_IDS["F-0302"])
    browser.click(x, y)
    browser.idle(0.8)  # the auto-pan
    box = browser.js(
        "(function(){var r=document.querySelector('.leaflet-popup').getBoundingClientRect();"
        "return [r.left, r.top, r.right, r.bottom];})()"
    )
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= 390 and box[3] <= 844, box
    covered = browser.js(  # nothing lies on top of the popup: every probe point hits the popup itself
        "(function(){var p=document.querySelector('.leaflet-popup'),n=0,"
        "r=p.querySelector('.leaflet-popup-content-wrapper').getBoundingClientRect();"
        "[[.05,.05],[.95,.05],[.5,.5],[.05,.95],[.95,.95]].forEach(function(f){"
        "var e=document.elementFromPoint(r.left+f[0]*r.width,r.top+f[1]*r.height);if(!p.contains(e)){n++;}});"
        "return n;})()"
    )
    assert covered == 0
    pixels = browser.screenshot(shots / "map_phone.png")
    assert pixels.shape[:2] == (844, 390) and pixels.std() > 10
    assert_offline_and_clean(browser)


def test_measure_and_coordinates(page: Path, browser: Browser) -> None:
    browser.open(page, 1280, 900)
    browser.js("SW.measure(true)")
    area = browser.js(
        "(function(){var c=SW.map.getCenter(),m=SW.map;"
        "var d=0.001;[[0,0],[0,d],[d,d],[d,0]].forEach(function(o){SW.addPoint(L.latLng(c.lat+o[0],c.lng+o[1]))});"
        "return SW.measured;})()"
    )
    expected = (111320 * 0.001) * (111320 * 0.001 * np.cos(np.radians(43.885)))
    assert area["area_m2"] == pytest.approx(expected, rel=0.01)
    assert "亩" in browser.js("document.querySelector('.sw-status').textContent")
    browser.js("SW.measure(false)")
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=700, y=500)
    coords = browser.js("SW.coordText.textContent")
    lat, lon = (float(v) for v in coords.split(","))
    assert 43.8 < lat < 44.0 and 125.9 < lon < 126.1


def test_xss_payloads_stay_inert(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> None:
    if not CHROMIUM.exists():
        pytest.skip("no Chromium")
    page = build_demo(tmp_path_factory.mktemp("xss"), xss=True)
    browser.open(page, 1280, 900)
    # open every popup and tooltip the page has, and search the payloads
    browser.js(
        "Object.keys(SW.all).forEach(function(k){SW.all[k].forEach(function(l){"
        "if(l.getPopup()){l.openPopup();}"
        "if(l.getTooltip()){l.openTooltip(l.getBounds?l.getBounds().getCenter():l.getLatLng());}"
        "});});"
    )
    browser.js("SW.find('svg').concat(SW.find('script')).forEach(SW.focus)")
    browser.js(
        "(function(){var i=document.querySelector('.sw-search input');i.value='onerror';"
        "i.dispatchEvent(new Event('input'));})()"
    )
    browser.idle(1.0)
    assert browser.dialogs() == []
    assert browser.js("document.querySelectorAll('script').length") == browser.js(
        "document.querySelectorAll('script:not([src])').length"
    )
    assert browser.js("document.querySelectorAll('svg [onload], [onload], [onerror], img[src=\"x\"]').length") == 0
    assert browser.js("document.querySelectorAll('a[href^=\"javascript\"]').length") == 0
    found = browser.js("SW.find(" + json.dumps(XSS_CASE) + ").length")
    assert found >= 1  # the odd id is searchable, as text
    html = browser.js("document.body.innerText")
    assert "<script>alert(1)</script>" in html or "onerror" in html
    assert browser.errors() == []


def test_an_alert_links_to_its_case_and_filters_hide_features(page: Path, browser: Browser) -> None:
    browser.open(page, 1280, 900)
    browser.js(
        "(function(){var a=SW.all.alerts.find(x=>x.feature.properties.case_id==='C-008');"
        "SW.map.setView(a.getLatLng(),18,{animate:false});a.openPopup();})()"
    )
    browser.idle(0.3)
    browser.click(*browser.center("document.querySelector('.leaflet-popup a.sw-go')"))
    browser.idle(0.4)
    text = browser.js("document.querySelector('.leaflet-popup-content').textContent")
    assert "案件 Case C-008" in text and "制止" in text
    # the legend's state boxes filter the cases layer; the month filter the earlier flags
    browser.js(
        "(function(){var b=document.querySelector('.sw-filter[data-value=\"warning\"]');b.checked=false;"
        "b.dispatchEvent(new Event('change'));})()"
    )
    states = browser.js(f"{LAYER_PROPS}('cases', 'state')")
    assert "warning" not in states and len(states) == N_CASES_MONTH - 1  # C-001 is the one warning in March
    browser.js("SW.monthSelect.value='2026-02'; SW.monthSelect.dispatchEvent(new Event('change'))")
    assert browser.js(f"{LAYER_PROPS}('earlier', 'month')") == ["2026-02"]
    assert_offline_and_clean(browser)


LAYER_PROPS = "(function(k, p){return SW.layers[k].getLayers().map(l => l.feature.properties[p]);})"


def test_single_file_mode_renders_offline(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> None:
    from pipeline.config import MapSettings

    if not CHROMIUM.exists():
        pytest.skip("no Chromium")
    page = build_fixture_map(tmp_path_factory.mktemp("inline"), MapSettings(imagery="inline"), tiles=False)
    browser.open(page, 1280, 900)
    assert browser.js("document.querySelectorAll('.leaflet-image-layer').length") == 1
    assert browser.js("Array.from(document.querySelectorAll('.sw-epoch .sw-btn')).map(b => b.dataset.mode)") == [
        "prev",
        "curr",
    ]  # no swipe over image overlays
    x, y = flag_point(browser, FLAG_IDS["F-0301"])
    browser.click(x, y)
    browser.idle(0.4)
    chips = "document.querySelectorAll('.leaflet-popup-content img[src^=\"data:image/jpeg\"]').length"
    assert browser.js(chips) == 2  # embedded chips, from the page's chip table
    assert_offline_and_clean(browser)


def test_locate_and_copy_coordinates(page: Path, browser: Browser) -> None:
    browser.call("Browser.grantPermissions", permissions=["geolocation"])
    browser.send("Emulation.setGeolocationOverride", latitude=43.8845, longitude=126.0101, accuracy=8)
    browser.open(page, 390, 844, mobile=True)
    browser.click(
        *browser.center("Array.from(document.querySelectorAll('.sw-btn')).find(b=>b.title.indexOf('Locate')>=0)")
    )
    browser.idle(1.0)
    center = browser.js("[SW.map.getCenter().lat, SW.map.getCenter().lng, SW.map.getZoom()]")
    assert center[0] == pytest.approx(43.8845, abs=1e-4) and center[1] == pytest.approx(126.0101, abs=1e-4)
    assert center[2] >= 17
    browser.click(*browser.center("document.querySelector('.sw-coords .sw-btn')"))
    browser.idle(0.3)
    copied = browser.js("SW.copied")
    lat, lon = (float(v) for v in copied.split(","))
    assert 43.8 < lat < 44.0 and 125.9 < lon < 126.1
    assert_offline_and_clean(browser)
