"""A tiny ledger, flags, layers and fake aligned pair for the map and report tests (EPSG:4551).

The story of 2026-03: three new illegal structures (C-001..C-003, 450 m²), one permitted build (C-004,
300 m², dismissed with a permit), a seed case demolished and seen removed from imagery (C-005), a scar
repaired and closed (C-006), an expansion after a stop order (C-008). C-007 opens in April.

Written with the pipeline's own writers and ids (vectorize's flag ids and columns, the ledger store's
``write_ledger``, :meth:`pipeline.ledger.events.Event.create`), so the readers see exactly what the stages
write; flags are named by a label here (``F-0301``) and :data:`FLAG_IDS` gives their real ids.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from affine import Affine
from shapely.geometry import box

from pipeline.formats import FLAG_COLUMNS, MU_M2, flag_id
from pipeline.ledger.alerts import ALERT_COLUMNS
from pipeline.ledger.builder import CASE_COLUMNS
from pipeline.ledger.events import Event, events_frame
from pipeline.ledger.lifecycle import fold_kinds
from pipeline.ledger.store import write_ledger

CRS = "EPSG:4551"
X0, Y0 = 500000.0, 4860000.0
MONTH = "2026-03"


def rect(x: float, y: float, area: float, aspect: float = 1.0) -> Any:
    """A rectangle of ``area`` m² with lower-left corner at (X0 + x, Y0 + y)."""
    w = (area * aspect) ** 0.5
    return box(X0 + x, Y0 + y, X0 + x + w, Y0 + y + area / w)


FLAGS = [  # flag_id, month, kind, area, x, y, district, street
    ("F-0301", MONTH, "new", 120.0, 200, 1500, "南关区", "a1"),
    ("F-0302", MONTH, "new", 250.0, 600, 1200, "南关区", "a2"),
    ("F-0303", MONTH, "new", 80.0, 1300, 1600, "朝阳区", "b1"),
    ("F-0304", MONTH, "removed", 150.0, 400, 300, "南关区", "a2"),
    ("F-0305", MONTH, "new", 300.0, 1600, 400, "朝阳区", "b2"),
    ("F-0201", "2026-02", "new", 60.0, 900, 900, "南关区", "a2"),
]
N_FLAGS_MONTH = 5
OTHER_FLAGS = {  # flags of other files the ledger's events name (label: month, kind, polygon)
    "F-0306": (MONTH, "new", rect(100, 800, 200.0, 2.0)),  # C-008's expansion, beyond the map's flags file
    "F-0401": ("2026-04", "new", rect(1800, 1800, 90.0)),
}
FLAG_IDS = {f[0]: flag_id(f[1], f[2], rect(f[4], f[5], f[3])) for f in FLAGS} | {
    label: flag_id(*spec) for label, spec in OTHER_FLAGS.items()
}
"""Each flag's label in this story -> its id as vectorize makes it (``F<YYYYMM>-<N|R>-<hash>``)."""

CASES = [  # case_id, state (final), category, first_month, district, street, area, geometry, deadline
    ("C-001", "closed", "illegal_construction", MONTH, "南关区", "a1", 120.0, rect(200, 1500, 120.0), ""),
    ("C-002", "confirmed", "illegal_construction", MONTH, "南关区", "a2", 250.0, rect(600, 1200, 250.0), ""),
    ("C-003", "stopped", "illegal_construction", MONTH, "朝阳区", "b1", 80.0, rect(1300, 1600, 80.0), ""),
    ("C-004", "dismissed", "illegal_construction", MONTH, "朝阳区", "b2", 300.0, rect(1600, 400, 300.0), ""),
    (
        "C-005",
        "demolished",
        "illegal_construction",
        "2026-01",
        "南关区",
        "a2",
        150.0,
        rect(400, 300, 150.0),
        "2026-02-28",
    ),
    ("C-006", "closed", "scar", "2026-01", "朝阳区", "b1", 500.0, rect(1500, 1200, 500.0), ""),
    ("C-007", "warning", "illegal_construction", "2026-04", "朝阳区", "b2", 90.0, rect(1800, 1800, 90.0), ""),
    ("C-008", "stopped", "illegal_construction", "2026-02", "南关区", "a1", 200.0, rect(100, 800, 200.0), ""),
]
N_CASES_MONTH = 7

EVENTS = [  # case_id, at, kind, source, actor, evidence (flags by their label in FLAGS)
    ("C-005", "2026-01-10", "flagged", "seed", "seed", "ledger/cases.gpkg:1"),
    ("C-006", "2026-01-10", "flagged", "seed", "seed", "ledger/cases.gpkg:2"),  # seed events share a date: `seq`
    ("C-006", "2026-01-10", "confirmed", "seed", "seed", "ledger/cases.gpkg:2"),
    ("C-006", "2026-01-10", "demolished", "seed", "seed", "ledger/cases.gpkg:2"),
    ("C-005", "2026-02-05", "confirmed", "field", "李", "field_updates/2026-02.csv:2"),
    ("C-005", "2026-02-10", "ordered", "field", "李", "field_updates/2026-02.csv:3"),
    ("C-008", "2026-02-15", "flagged", "imagery", "scarwatch", "F-0201"),
    ("C-008", "2026-02-18", "confirmed", "field", "张", "field_updates/2026-02.csv:4"),
    ("C-008", "2026-02-20", "stopped", "field", "张", "field_updates/2026-02.csv:5"),
    ("C-001", "2026-03-31", "flagged", "imagery", "scarwatch", "F-0301"),
    ("C-002", "2026-03-31", "flagged", "imagery", "scarwatch", "F-0302"),
    ("C-002", "2026-03-31", "confirmed", "field", "张", "field_updates/2026-03.csv:2"),
    ("C-003", "2026-03-31", "flagged", "imagery", "scarwatch", "F-0303"),
    ("C-003", "2026-03-31", "confirmed", "field", "张", "field_updates/2026-03.csv:3"),
    ("C-003", "2026-03-31", "stopped", "field", "张", "field_updates/2026-03.csv:4"),
    ("C-004", "2026-03-31", "flagged", "imagery", "scarwatch", "F-0305"),
    ("C-004", "2026-03-31", "dismissed", "permit", "permit", "layers/permits.gpkg:P-2026-007"),
    ("C-005", "2026-03-15", "demolished", "field", "李", "field_updates/2026-03.csv:5"),
    ("C-005", "2026-03-31", "observed_removed", "imagery", "scarwatch", "F-0304"),
    ("C-006", "2026-03-12", "repaired", "field", "王", "field_updates/2026-03.csv:6"),
    ("C-006", "2026-03-20", "closed", "field", "王", "field_updates/2026-03.csv:7"),
    ("C-008", "2026-03-31", "expanded", "imagery", "scarwatch", "F-0306"),
    ("C-001", "2026-05-10", "confirmed", "field", "张", "field_updates/2026-05.csv:2"),
    ("C-001", "2026-05-15", "demolished", "field", "张", "field_updates/2026-05.csv:3"),
    ("C-001", "2026-05-20", "closed", "field", "张", "field_updates/2026-05.csv:4"),
    ("C-007", "2026-04-30", "flagged", "imagery", "scarwatch", "F-0401"),
]

ALERTS = [  # case_id, kind, month
    ("C-008", "expansion_after_stop", MONTH, "责令停止后仍在扩建", "Expansion after a stop order"),
    ("C-005", "overdue", MONTH, "逾期未拆除", "demolition overdue"),
    ("C-005", "overdue", "2026-02", "逾期未拆除", "demolition overdue"),
]
N_ALERTS_MONTH = 2


def write_flags(path: Path, month: str, rows: list[tuple[str, Any, str, str]]) -> gpd.GeoDataFrame:
    """Write a month's flags as vectorize does (its columns, ids and 亩) from (kind, polygon, district, street)."""
    frame = gpd.GeoDataFrame(
        {
            "flag_id": [flag_id(month, kind, geom) for kind, geom, _, _ in rows],
            "month": [month] * len(rows),
            "kind": [kind for kind, _, _, _ in rows],
            "area_m2": [round(geom.area, 2) for _, geom, _, _ in rows],
            "area_mu": [round(geom.area / MU_M2, 4) for _, geom, _, _ in rows],
            "p_mean": [0.81] * len(rows),
            "p_max": [0.97] * len(rows),
            "lon": [125.0] * len(rows),
            "lat": [43.9] * len(rows),
            "district": [d for _, _, d, _ in rows],
            "street": [s for _, _, _, s in rows],
        },
        geometry=gpd.GeoSeries([geom for _, geom, _, _ in rows], crs=CRS),
        crs=CRS,
    )[[*FLAG_COLUMNS, "geometry"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_file(path, layer="flags", driver="GPKG", engine="pyogrio", geometry_type="Polygon")
    return frame


def _case_geom(case_id: str) -> Any:
    return next(c[7] for c in CASES if c[0] == case_id)


XSS_PAYLOADS = (
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    '"><svg onload=alert(3)>',
    "javascript:alert(4)",
)
"""What an inspector (or an attacker) could type into a field sheet; the map must show it as text."""
XSS_CASE = 'C-003"><svg onload=alert(5)>'
"""Case C-003's id in the inputs written with ``xss=True``."""


def _events(xss: bool = False) -> list[Event]:
    out = []
    for seq, (case_id, at, kind, source, actor, evidence) in enumerate(EVENTS, start=1):
        if xss and source == "field":
            actor = f"{XSS_PAYLOADS[seq % 4]}{actor}"
        case = next(c for c in CASES if c[0] == case_id)
        out.append(
            Event.create(
                seq=seq,
                case_id=case_id,
                at=at,
                kind=kind,
                source=source,
                actor=actor,
                evidence=FLAG_IDS.get(evidence, evidence),
                month=at[:7],
                # an imagery observation carries its flag's polygon, as the ledger builder writes it
                geometry=OTHER_FLAGS[evidence][2] if kind == "expanded" else case[7],
                deadline=case[8] if kind == "ordered" else "",
                category=case[2] if kind == "flagged" else "",
                note=" ".join(XSS_PAYLOADS) if xss and source == "field" else "",
            )
        )
    return out


def write_inputs(root: Path, *, xss: bool = False) -> dict[str, Path]:
    """Write flags, ledger and layers GeoPackages under ``root`` with the pipeline's writers; return their paths.

    The flags are written as vectorize writes them (one file per month, its ids); the ledger with
    :func:`pipeline.ledger.store.write_ledger`, its events made by :meth:`Event.create`, its cases'
    states the fold of their events. ``xss=True`` puts :data:`XSS_PAYLOADS` into field actors and notes,
    an alert message, a street, a grid unit and a permit note, and renames C-003 to :data:`XSS_CASE`.
    """
    paths = {
        "flags": root / "flags" / f"{MONTH}.gpkg",
        "flags_feb": root / "flags" / "2026-02.gpkg",
        "ledger": root / "ledger.gpkg",
        "layers": root / "layers",
    }
    for path, month in ((paths["flags"], MONTH), (paths["flags_feb"], "2026-02")):
        rows = [(f[2], rect(f[4], f[5], f[3]), f[6], f[7]) for f in FLAGS if f[1] == month]
        if xss and month == MONTH:
            rows[0] = (rows[0][0], rows[0][1], rows[0][2], XSS_PAYLOADS[2])
        write_flags(path, month, rows)
    events = _events(xss)
    rows = []
    for case_id, state, category, first_month, district, street, area, _, deadline in CASES:
        mine = [e for e in events if e.case_id == case_id]
        assert fold_kinds(e.kind for e in mine) == state, case_id  # the cases layer holds the fold of the log
        rows.append(
            {
                "case_id": case_id,
                "state": state,
                "category": category,
                "opened_at": mine[0].at,
                "last_event_at": max(e.at for e in mine),
                "deadline": deadline,
                "district": district,
                "street": street,
                "area_m2": area,
                "n_events": len(mine),
                "first_month": first_month,
                "permit_id": "P-2026-007" if case_id == "C-004" else "",
            }
        )
    cases = gpd.GeoDataFrame(pd.DataFrame(rows, columns=list(CASE_COLUMNS)), geometry=[c[7] for c in CASES], crs=CRS)
    alerts = gpd.GeoDataFrame(
        pd.DataFrame([dict(zip(ALERT_COLUMNS, a, strict=True)) for a in ALERTS], columns=list(ALERT_COLUMNS)),
        geometry=[_case_geom(a[0]) for a in ALERTS],
        crs=CRS,
    )
    events_layer = events_frame(events, CRS)
    if xss:
        for frame in (events_layer, cases, alerts):
            frame["case_id"] = frame["case_id"].replace({"C-003": XSS_CASE})
        alerts["message_zh"] = alerts["message_zh"] + XSS_PAYLOADS[1]
    write_ledger(paths["ledger"], events_layer, cases, alerts)
    paths["layers"].mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame(
        {"district": ["南关区", "朝阳区"]},
        geometry=[box(X0, Y0, X0 + 1000, Y0 + 2000), box(X0 + 1000, Y0, X0 + 2000, Y0 + 2000)],
        crs=CRS,
    ).to_file(paths["layers"] / "districts.gpkg", driver="GPKG")
    streets = [
        ("a1", "南关区", 0, 1000),
        ("a2", "南关区", 0, 0),
        ("b1", "朝阳区", 1000, 1000),
        ("b2", "朝阳区", 1000, 0),
    ]
    gpd.GeoDataFrame(
        {"street": [s[0] for s in streets], "district": [s[1] for s in streets]},
        geometry=[box(X0 + s[2], Y0 + s[3], X0 + s[2] + 1000, Y0 + s[3] + 1000) for s in streets],
        crs=CRS,
    ).to_file(paths["layers"] / "streets.gpkg", driver="GPKG")
    cells = [(i, j) for i in range(4) for j in range(4)]
    gpd.GeoDataFrame(
        {"cell_id": [f"G{i}{j}" for i, j in cells], "unit": [f"网格员{i * 4 + j:02d}" for i, j in cells]},
        geometry=[box(X0 + 500 * i, Y0 + 500 * j, X0 + 500 * (i + 1), Y0 + 500 * (j + 1)) for i, j in cells],
        crs=CRS,
    ).to_file(paths["layers"] / "grid.gpkg", driver="GPKG")
    gpd.GeoDataFrame(
        {
            "permit_id": ["P-2026-007"],
            "valid_from": ["2026-01-01"],
            "valid_to": ["2026-12-31"],
            "note": [XSS_PAYLOADS[3] if xss else "仓库 warehouse"],
        },
        geometry=[rect(1600, 400, 600.0)],
        crs=CRS,
    ).to_file(paths["layers"] / "permits.gpkg", driver="GPKG")
    if xss:
        grid = gpd.read_file(paths["layers"] / "grid.gpkg")
        grid.loc[0, "unit"] = XSS_PAYLOADS[0]
        grid.to_file(paths["layers"] / "grid.gpkg", driver="GPKG")
        streets = gpd.read_file(paths["layers"] / "streets.gpkg")
        streets.loc[0, "street"] = XSS_PAYLOADS[2]
        streets.to_file(paths["layers"] / "streets.gpkg", driver="GPKG")
    return paths


@dataclass
class FakePair:
    """Stands in for ``pipeline.pair.AlignedPair``: 4 m pixels over the 2 km town, new roofs bright."""

    res: float = 4.0
    count: int = 3
    prev: str = "2026-02"
    reads: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        from rasterio.crs import CRS as RioCRS
        from rasterio.features import rasterize

        self.crs = RioCRS.from_user_input(CRS)
        self.width = self.height = int(2000 / self.res)
        self.transform = Affine(self.res, 0, X0, 0, -self.res, Y0 + 2000)
        yy, xx = np.mgrid[0 : self.height, 0 : self.width]
        ground = (0.35 + 0.1 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype("float32")
        new = rasterize(
            [rect(f[4], f[5], f[3]) for f in FLAGS if f[2] == "new"], out_shape=ground.shape, transform=self.transform
        ).astype(bool)
        gone = rasterize(
            [rect(f[4], f[5], f[3]) for f in FLAGS if f[2] == "removed"],
            out_shape=ground.shape,
            transform=self.transform,
        ).astype(bool)
        prev = np.stack([ground, ground * 1.1, ground * 0.8])
        curr = prev.copy()
        prev[:, gone] = 0.9
        curr[:, new] = 0.95
        self.images = np.stack([prev, curr]).clip(0, 1)
        self.valid = np.ones(ground.shape, dtype=bool)
        self.valid[:, :10] = False

    def read(self, window: Any) -> tuple[np.ndarray, np.ndarray]:
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        self.reads.append(window)
        return self.images[:, :, r0 : r0 + h, c0 : c0 + w], self.valid[r0 : r0 + h, c0 : c0 + w]


@contextmanager
def fake_open(pair: FakePair) -> Any:
    """A context manager yielding ``pair``, like ``AlignedPair.open``."""
    yield pair


def build_fixture_map(root: Path, settings: Any = None, *, tiles: bool = True, xss: bool = False) -> Path:
    """The map of :data:`MONTH` from :func:`write_inputs` under ``root``, imagery from a :class:`FakePair`.

    With ``tiles`` the pyramid is built first (``<root>/maps/<month>_tiles``) and the page links it.
    """
    import pytest

    from pipeline.config import MapSettings
    from pipeline.publish import maps
    from pipeline.publish.tiles import build_pyramid

    inputs = write_inputs(root, xss=xss)
    pair = FakePair()
    pair.month = MONTH  # type: ignore[attr-defined]
    tiles_dir = root / "maps" / f"{MONTH}_tiles"
    if tiles:
        build_pyramid(pair, tiles_dir, MapSettings(tiles_workers=1))
    mp = pytest.MonkeyPatch()
    mp.setattr(maps, "_open_pair", lambda _d: fake_open(pair))
    try:
        return maps.build_map(
            MONTH,
            inputs["ledger"],
            inputs["flags"],
            root / "maps" / f"{MONTH}.html",
            settings=settings or MapSettings(),
            layers_dir=inputs["layers"],
            pair_dir=root,
            tiles_dir=tiles_dir if tiles else None,
        )
    finally:
        mp.undo()
