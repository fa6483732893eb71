/* ScarWatch inspector map: the page's own controls (search, swipe and toggle, measure, locate, fullscreen,
 * coordinates, legend filters, phone layout). Plain ES5 over Leaflet 1.9, no network, no innerHTML with data:
 * every value from the ledger reaches the DOM through textContent (popups are HTML escaped at build time). */
(function () {
  "use strict";
  var SW = {};
  window.SW = SW;
  var MU_M2 = 2000 / 3;
  var PHONE = function () { return window.innerWidth < 600; };

  function el(tag, cls, text, parent) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = text; }
    if (parent) { parent.appendChild(e); }
    return e;
  }

  function button(parent, text, title, fn) {
    var b = el("a", "sw-btn", text, parent);
    b.href = "#";
    b.setAttribute("role", "button");
    b.title = title;
    L.DomEvent.on(b, "click", function (ev) { L.DomEvent.stop(ev); fn(b); });
    return b;
  }

  function control(position, build) {
    var C = L.Control.extend({
      onAdd: function () {
        var div = L.DomUtil.create("div", "leaflet-bar sw-control");
        L.DomEvent.disableClickPropagation(div);
        L.DomEvent.disableScrollPropagation(div);
        build(div);
        return div;
      }
    });
    return new C({position: position});
  }

  /* Popups that fit the screen: called by every GeoJSON layer's onEachFeature (before init runs). */
  var popupTable = null;
  function popupText(feature) {
    if (feature.properties.pi === undefined) { return String(feature.properties.popup || ""); }
    if (!popupTable) { popupTable = JSON.parse(document.getElementById("sw-popups").textContent); }
    return popupTable[feature.properties.pi];
  }
  SW.popup = function (feature, layer) {
    layer.bindPopup(function () { return popupText(feature); }, {
      maxWidth: Math.min(420, window.innerWidth - 40),
      minWidth: Math.min(260, window.innerWidth - 60),
      maxHeight: Math.round(window.innerHeight * (PHONE() ? 0.55 : 0.7)),
      autoPanPaddingTopLeft: PHONE() ? [8, 70] : [60, 10],
      autoPanPaddingBottomRight: PHONE() ? [8, 40] : [330, 10]
    });
  };

  /* Outline names as text (never innerHTML). */
  SW.tooltip = function (feature, layer) {
    layer.bindTooltip(function () { return el("span", null, feature.properties.name); }, {sticky: true});
  };

  function fmt(n, d) { return n.toLocaleString("en-US", {maximumFractionDigits: d, minimumFractionDigits: d}); }

  function geodesicArea(latlngs) {  /* m², spherical excess on the WGS84 mean radius (as Leaflet.draw) */
    var R = 6378137, area = 0, n = latlngs.length, rad = Math.PI / 180;
    if (n < 3) { return 0; }
    for (var i = 0; i < n; i++) {
      var p1 = latlngs[i], p2 = latlngs[(i + 1) % n];
      area += (p2.lng - p1.lng) * rad * (2 + Math.sin(p1.lat * rad) + Math.sin(p2.lat * rad));
    }
    return Math.abs(area * R * R / 2);
  }
  SW.geodesicArea = geodesicArea;

  function bounds(layer) {
    return layer.getBounds ? layer.getBounds() : L.latLngBounds([layer.getLatLng(), layer.getLatLng()]);
  }

  /* A 128 px before/after chip of a feature, from the tiles of the pyramid (no image data in the page):
   * the deepest zoom at which the feature and a margin fit, tiles placed around its centre, its outline
   * drawn over them as SVG (coordinates only, no markup from data). */
  function tileChip(t, epoch, layer) {
    var size = 128, svgNS = "http://www.w3.org/2000/svg";
    var b = layer.getBounds ? layer.getBounds() : layer.getLatLng().toBounds(60);
    var pad = b.pad(0.6), z = t.maxzoom, span = 0;
    for (; z >= t.minzoom; z--) {
      var p1 = SW.map.project(pad.getNorthWest(), z), p2 = SW.map.project(pad.getSouthEast(), z);
      span = Math.max(p2.x - p1.x, p2.y - p1.y, 1);
      if (span <= size || z === t.minzoom) { break; }
    }
    var scale = Math.min(4, Math.max(1, size / span)), view = size / scale;
    var c = SW.map.project(b.getCenter(), z), x0 = c.x - view / 2, y0 = c.y - view / 2;
    var lo = SW.map.project(L.latLng(t.bounds[1][0], t.bounds[0][1]), z).divideBy(256).floor();
    var hi = SW.map.project(L.latLng(t.bounds[0][0], t.bounds[1][1]), z).divideBy(256).floor();
    var outer = el("div", "sw-chip"), inner = el("div", "sw-chip-inner", null, outer);
    outer.style.width = outer.style.height = size + "px";
    inner.style.width = inner.style.height = view + "px";
    inner.style.transform = "scale(" + scale + ")";
    var url = t.urls[epoch];
    for (var tx = Math.floor(x0 / 256); tx <= Math.floor((x0 + view) / 256); tx++) {
      for (var ty = Math.floor(y0 / 256); ty <= Math.floor((y0 + view) / 256); ty++) {
        if (tx < lo.x || tx > hi.x || ty < lo.y || ty > hi.y) { continue; }  /* outside the pyramid */
        var img = el("img", null, null, inner);
        img.alt = "";
        img.src = url.replace("{z}", z).replace("{x}", tx).replace("{y}", ty);
        img.style.left = (tx * 256 - x0) + "px";
        img.style.top = (ty * 256 - y0) + "px";
      }
    }
    if (layer.getLatLngs) {
      var svg = document.createElementNS(svgNS, "svg"), d = "";
      svg.setAttribute("width", view); svg.setAttribute("height", view);
      var rings = layer.getLatLngs();
      (function walk(r) {
        if (!r.length) { return; }
        if (r[0] instanceof L.LatLng) {
          r.forEach(function (ll, i) {
            var p = SW.map.project(ll, z);
            d += (i ? "L" : "M") + (p.x - x0).toFixed(1) + " " + (p.y - y0).toFixed(1);
          });
          d += "Z";
        } else { r.forEach(walk); }
      }(rings));
      var path = document.createElementNS(svgNS, "path");
      path.setAttribute("d", d);
      path.setAttribute("fill", "none");
      path.setAttribute("stroke", String(layer.options.color || "#ff0"));
      path.setAttribute("stroke-width", String(2 / scale));
      svg.appendChild(path);
      inner.appendChild(svg);
    }
    SW.tileChips = (SW.tileChips || 0) + 1;
    return outer;
  }

  SW.init = function (cfg) {
    var map = cfg.map, T = cfg.text;
    SW.map = map;
    SW.layers = cfg.layers;
    SW.all = {};
    Object.keys(cfg.layers).forEach(function (k) { SW.all[k] = cfg.layers[k].getLayers(); });

    /* ---- search: case id, flag id, street, grid unit, permit */
    var index = [];
    (cfg.search || []).forEach(function (k) {
      (SW.all[k] || []).forEach(function (layer) {
        var p = layer.feature.properties;
        index.push({key: k, text: String(p.search || p.name || "").toLowerCase(),
                    label: String(p.case_id || p.flag_id || p.permit_id || p.name || ""), layer: layer});
      });
    });
    SW.find = function (q) {
      q = String(q || "").trim().toLowerCase();
      if (!q) { return []; }
      var exact = [], part = [];
      index.forEach(function (e) {
        var words = e.text.split(/\s+/);
        if (words.indexOf(q) >= 0 || e.label.toLowerCase() === q) { exact.push(e); }
        else if (e.text.indexOf(q) >= 0) { part.push(e); }
      });
      return exact.concat(part);
    };
    SW.focus = function (e) {
      var group = cfg.layers[e.key];
      if (group && !map.hasLayer(group)) { map.addLayer(group); }
      if (group && !group.hasLayer(e.layer)) { group.addLayer(e.layer); }
      var b = bounds(e.layer);
      map.fitBounds(b, {maxZoom: Math.min(cfg.maxZoom, 19), animate: false, padding: [20, 20]});
      if (e.layer.getPopup()) { e.layer.openPopup(b.getCenter()); }
    };
    SW.focusCase = function (caseId) {
      var hit = SW.find(caseId).filter(function (e) { return e.key === "cases"; });
      if (hit.length) { SW.focus(hit[0]); }
    };
    control("topleft", function (div) {
      div.classList.add("sw-search");
      var input = el("input", null, null, div);
      input.type = "search";
      input.placeholder = T.search;
      input.setAttribute("aria-label", T.search);
      var list = el("ul", "sw-results", null, div);
      function run(go) {
        list.textContent = "";
        var hits = SW.find(input.value).slice(0, 8);
        if (!hits.length && input.value) { el("li", "sw-none", T.none, list); }
        hits.forEach(function (e) {
          var li = el("li", null, e.label + "  (" + (T.layer[e.key] || e.key) + ")", list);
          L.DomEvent.on(li, "click", function () { list.textContent = ""; SW.focus(e); });
        });
        if (go && hits.length) { list.textContent = ""; SW.focus(hits[0]); }
      }
      L.DomEvent.on(input, "input", function () { run(false); });
      L.DomEvent.on(input, "keydown", function (ev) { if (ev.key === "Enter") { run(true); } });
    }).addTo(map);

    /* ---- tools: fullscreen, locate, measure */
    var status;
    control("topleft", function (div) {
      button(div, T.fullscreenShort, T.fullscreen, function () {
        var d = document;
        if (d.fullscreenElement) { d.exitFullscreen(); }
        else if (d.documentElement.requestFullscreen) { d.documentElement.requestFullscreen(); }
      });
      button(div, T.locateShort, T.locate, function () { map.locate({setView: true, maxZoom: 18, enableHighAccuracy: true}); });
      SW.measureButton = button(div, T.measureShort, T.measure, function (b) { SW.measure(!SW.measuring); });
    }).addTo(map);
    var here = L.layerGroup().addTo(map);
    map.on("locationfound", function (e) {
      here.clearLayers();
      L.circle(e.latlng, {radius: e.accuracy, weight: 1}).addTo(here);
      L.circleMarker(e.latlng, {radius: 7, color: "#fff", weight: 2, fillColor: "#1f78b4", fillOpacity: 1}).addTo(here);
    });
    map.on("locationerror", function (e) { status.textContent = T.noLocation + " (" + e.message + ")"; });

    /* measure: tap points; distance along them, area (m², 亩) once three or more */
    var pts = [], line = L.polyline([], {color: "#ffff00", weight: 3, interactive: false}),
      poly = L.polygon([], {color: "#ffff00", weight: 1, fillOpacity: 0.2, interactive: false});
    SW.measuring = false;
    SW.measure = function (on) {
      SW.measuring = on;
      pts = [];
      line.setLatLngs([]); poly.setLatLngs([]);
      if (on) { line.addTo(map); poly.addTo(map); status.textContent = T.measureHint; }
      else { map.removeLayer(line); map.removeLayer(poly); status.textContent = ""; }
      SW.measureButton.classList.toggle("sw-on", on);
      map.getContainer().classList.toggle("sw-measuring", on);
    };
    SW.addPoint = function (latlng) {
      pts.push(latlng);
      line.setLatLngs(pts);
      var d = 0;
      for (var i = 1; i < pts.length; i++) { d += map.distance(pts[i - 1], pts[i]); }
      var text = T.distance + " " + (d >= 1000 ? fmt(d / 1000, 3) + " km" : fmt(d, 1) + " m");
      if (pts.length >= 3) {
        poly.setLatLngs(pts);
        var a = geodesicArea(pts);
        text += " · " + T.area + " " + fmt(a, 1) + " m² (" + fmt(a / MU_M2, 3) + " 亩)";
      }
      status.textContent = text;
      SW.measured = {distance_m: d, area_m2: pts.length >= 3 ? geodesicArea(pts) : 0};
    };
    map.on("popupopen", function () { if (SW.measuring) { map.closePopup(); } });

    /* ---- coordinates (WGS84) under the cursor or the last tap, with a copy button */
    var last = map.getCenter();
    control("bottomleft", function (div) {
      div.classList.add("sw-coords");
      var text = el("span", "sw-coord-text", "", div);
      SW.coordText = text;
      button(div, T.copyShort, T.copy, function () {
        var s = text.textContent;
        function fallback() {
          var ta = el("textarea", null, s, document.body);
          ta.select();
          try { document.execCommand("copy"); } catch (err) { /* nothing to do offline */ }
          document.body.removeChild(ta);
        }
        if (navigator.clipboard && navigator.clipboard.writeText) { navigator.clipboard.writeText(s).catch(fallback); }
        else { fallback(); }
        SW.copied = s;
        status.textContent = T.copied + " " + s;
      });
      status = el("div", "sw-status", "", div);
      function show(ll) { last = ll; text.textContent = ll.lat.toFixed(6) + ", " + ll.lng.toFixed(6); }
      map.on("mousemove", function (e) { show(e.latlng); });
      map.on("click", function (e) { show(e.latlng); if (SW.measuring) { SW.addPoint(e.latlng); } });
      show(last);
    }).addTo(map);

    /* ---- imagery: before / after toggle and the swipe */
    if (cfg.prev && cfg.curr) {
      var swipe = null;
      SW.show = function (mode) {  /* "curr" | "prev" | "swipe" */
        if (swipe) { map.removeControl(swipe); swipe = null; }
        if (mode === "prev" || mode === "swipe") { map.addLayer(cfg.prev); } else { map.removeLayer(cfg.prev); }
        if (mode === "curr" || mode === "swipe") { map.addLayer(cfg.curr); } else { map.removeLayer(cfg.curr); }
        if (mode === "swipe" && L.control.sideBySide && cfg.prev.getContainer) {
          swipe = L.control.sideBySide(cfg.prev, cfg.curr).addTo(map);
        }
        SW.mode = mode;
        Array.prototype.forEach.call(document.querySelectorAll(".sw-epoch .sw-btn"), function (b) {
          b.classList.toggle("sw-on", b.getAttribute("data-mode") === mode);
        });
      };
      control("topleft", function (div) {
        div.classList.add("sw-epoch");
        var modes = [["prev", T.before], ["curr", T.after]];
        if (cfg.prev.getContainer) { modes.push(["swipe", T.swipe]); }
        modes.forEach(function (m) {
          button(div, m[1], m[1], function () { SW.show(m[0]); }).setAttribute("data-mode", m[0]);
        });
      }).addTo(map);
      SW.show("curr");
    }

    /* ---- minimap */
    if (cfg.minimap && L.Control.MiniMap) {
      new L.Control.MiniMap(cfg.minimap, {toggleDisplay: true, minimized: PHONE(), position: "bottomleft",
                                          width: 140, height: 140, zoomLevelOffset: -4}).addTo(map);
    }

    /* ---- legend filters: states, flag kinds, earlier months */
    SW.filter = function (key) {
      var group = cfg.layers[key];
      if (!group) { return; }
      var boxes = document.querySelectorAll('.sw-filter[data-layer="' + key + '"]');
      var off = {};
      Array.prototype.forEach.call(boxes, function (b) {
        if (!b.checked) { off[b.getAttribute("data-prop") + "=" + b.getAttribute("data-value")] = true; }
      });
      var month = key === "earlier" && SW.monthSelect ? SW.monthSelect.value : "";
      group.clearLayers();
      SW.all[key].forEach(function (l) {
        var p = l.feature.properties;
        if (off["state=" + p.state] || off["kind=" + p.kind]) { return; }
        if (month && p.month !== month) { return; }
        group.addLayer(l);
      });
    };
    Array.prototype.forEach.call(document.querySelectorAll(".sw-filter"), function (b) {
      L.DomEvent.on(b, "change", function () { SW.filter(b.getAttribute("data-layer")); });
    });
    var legend = document.querySelector(".sw-legend");
    if (legend && cfg.months && cfg.months.length && cfg.layers.earlier) {
      var row = el("label", "sw-month", T.earlier + " ", legend);
      var sel = el("select", null, null, row);
      el("option", null, T.allMonths, sel).value = "";
      cfg.months.forEach(function (m) { el("option", null, m, sel).value = m; });
      SW.monthSelect = sel;
      L.DomEvent.on(sel, "change", function () {
        if (sel.value && !map.hasLayer(cfg.layers.earlier)) { map.addLayer(cfg.layers.earlier); }
        SW.filter("earlier");
      });
    }

    /* ---- before/after chips: one table in the page, set into a popup's images when it opens */
    SW.chips = cfg.chips || {};
    map.on("popupopen", function (e) {
      var root = e.popup.getElement(), source = e.popup._source;
      Array.prototype.forEach.call(root ? root.querySelectorAll("img[data-chip]") : [], function (img) {
        var key = img.getAttribute("data-chip"), epoch = Number(img.getAttribute("data-epoch"));
        if (key === "@" && cfg.chipTiles && source) {  /* cut from the tile pyramid beside the page */
          img.parentNode.replaceChild(tileChip(cfg.chipTiles, epoch, source), img);
          return;
        }
        var pair = SW.chips[key];
        var url = pair ? pair[epoch] : "";
        if (url && url.indexOf("data:image/") === 0) { img.src = url; }
      });
    });

    /* ---- links from alerts and earlier flags to their case */
    L.DomEvent.on(document.body, "click", function (ev) {
      var a = ev.target && ev.target.closest ? ev.target.closest("a.sw-go") : null;
      if (!a) { return; }
      ev.preventDefault();
      SW.focusCase(a.getAttribute("data-case"));
    });

    /* ---- alert rings shrink at city scale, where hundreds of them would hide the flags */
    function ringSize() {
      var z = map.getZoom(), r = z >= 16 ? 9 : (z >= 14 ? 5 : 3);
      (SW.all.alerts || []).forEach(function (l) { if (l.setRadius) { l.setRadius(r); } });
    }
    map.on("zoomend", ringSize);
    ringSize();

    /* ---- phone layout: collapsed control and legend */
    if (PHONE()) {
      if (legend) { legend.removeAttribute("open"); }
      document.body.classList.add("sw-phone");
      map.on("popupopen", function () { document.body.classList.add("sw-popup-open"); });
      map.on("popupclose", function () { document.body.classList.remove("sw-popup-open"); });
    } else if (cfg.control && cfg.control.expand) {
      cfg.control.expand();
    }
    SW.ready = true;
  };
}());
