"""A tiny ledger, flags, layers and fake aligned pair for the map and report tests (EPSG:4551).

The story of 2026-03: three new illegal structures (C-001..C-003, 450 m²), one permitted build (C-004,
300 m², dismissed with a permit), a seed case demolished and seen removed from imagery (C-005), a scar
repaired and closed (C-006), an expansion after a stop order (C-008). C-007 opens in April.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
from affine import Affine
from shapely.geometry import box

from pipeline.formats import MU_M2
from pipeline.vectorize import COLUMNS, flag_id

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

EVENTS = [  # case_id, at, kind, source, actor, evidence
    ("C-005", "2026-01-10", "flagged", "seed", "system", ""),
    ("C-006", "2026-01-10", "flagged", "seed", "system", ""),  # seed events share a date: `seq` orders them
    ("C-006", "2026-01-10", "confirmed", "seed", "system", ""),
    ("C-006", "2026-01-10", "demolished", "seed", "system", ""),
    ("C-005", "2026-02-05", "confirmed", "field", "李", ""),
    ("C-005", "2026-02-10", "ordered", "field", "李", ""),
    ("C-008", "2026-02-15", "flagged", "imagery", "scarwatch", "F-0201"),
    ("C-008", "2026-02-18", "confirmed", "field", "张", ""),
    ("C-008", "2026-02-20", "stopped", "field", "张", ""),
    ("C-001", "2026-03-31", "flagged", "imagery", "scarwatch", "F-0301"),
    ("C-002", "2026-03-31", "flagged", "imagery", "scarwatch", "F-0302"),
    ("C-002", "2026-03-31", "confirmed", "field", "张", ""),
    ("C-003", "2026-03-31", "flagged", "imagery", "scarwatch", "F-0303"),
    ("C-003", "2026-03-31", "confirmed", "field", "张", ""),
    ("C-003", "2026-03-31", "stopped", "field", "张", ""),
    ("C-004", "2026-03-31", "flagged", "imagery", "scarwatch", "F-0305"),
    ("C-004", "2026-03-31", "dismissed", "permit", "permit", "layers/permits.gpkg:P-2026-007"),
    ("C-005", "2026-03-15", "demolished", "field", "李", ""),
    ("C-005", "2026-03-31", "observed_removed", "imagery", "scarwatch", "F-0304"),
    ("C-006", "2026-03-12", "repaired", "field", "王", ""),
    ("C-006", "2026-03-20", "closed", "field", "王", ""),
    ("C-008", "2026-03-31", "expanded", "imagery", "scarwatch", ""),
    ("C-001", "2026-05-10", "confirmed", "field", "张", ""),
    ("C-001", "2026-05-15", "demolished", "field", "张", ""),
    ("C-001", "2026-05-20", "closed", "field", "张", ""),
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
    )[[*COLUMNS, "geometry"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_file(path, layer="flags", driver="GPKG", engine="pyogrio", geometry_type="Polygon")
    return frame


def _case_geom(case_id: str) -> Any:
    return next(c[7] for c in CASES if c[0] == case_id)


def write_inputs(root: Path) -> dict[str, Path]:
    """Write flags, ledger and layers GeoPackages under ``root``; return their paths."""
    flags = gpd.GeoDataFrame(
        {
            "flag_id": [f[0] for f in FLAGS],
            "month": [f[1] for f in FLAGS],
            "kind": [f[2] for f in FLAGS],
            "area_m2": [f[3] for f in FLAGS],
            "area_mu": [f[3] / MU_M2 for f in FLAGS],
            "p_mean": [0.81] * len(FLAGS),
            "p_max": [0.97] * len(FLAGS),
            "lon": [125.0] * len(FLAGS),
            "lat": [43.9] * len(FLAGS),
            "district": [f[6] for f in FLAGS],
            "street": [f[7] for f in FLAGS],
        },
        geometry=[rect(f[4], f[5], f[3]) for f in FLAGS],
        crs=CRS,
    )
    cases = gpd.GeoDataFrame(
        {
            "case_id": [c[0] for c in CASES],
            "state": [c[1] for c in CASES],
            "category": [c[2] for c in CASES],
            "opened_at": [c[3] + "-10" for c in CASES],
            "last_event_at": ["2026-05-20"] * len(CASES),
            "deadline": [c[8] for c in CASES],
            "district": [c[4] for c in CASES],
            "street": [c[5] for c in CASES],
            "area_m2": [c[6] for c in CASES],
            "n_events": [1] * len(CASES),
            "first_month": [c[3] for c in CASES],
            "permit_id": ["P-2026-007" if c[0] == "C-004" else "" for c in CASES],
        },
        geometry=[c[7] for c in CASES],
        crs=CRS,
    )
    events = gpd.GeoDataFrame(
        {
            "event_id": [f"E-{len(EVENTS) - i:04d}" for i in range(len(EVENTS))],  # ids do not sort by time
            "seq": list(range(len(EVENTS))),
            "case_id": [e[0] for e in EVENTS],
            "at": [e[1] for e in EVENTS],
            "kind": [e[2] for e in EVENTS],
            "source": [e[3] for e in EVENTS],
            "actor": [e[4] for e in EVENTS],
            "evidence": [e[5] for e in EVENTS],
            "month": [e[1][:7] for e in EVENTS],
        },
        geometry=[_case_geom(e[0]) for e in EVENTS],
        crs=CRS,
    )
    alerts = gpd.GeoDataFrame(
        {
            "case_id": [a[0] for a in ALERTS],
            "kind": [a[1] for a in ALERTS],
            "month": [a[2] for a in ALERTS],
            "message_zh": [a[3] for a in ALERTS],
            "message_en": [a[4] for a in ALERTS],
        },
        geometry=[_case_geom(a[0]) for a in ALERTS],
        crs=CRS,
    )
    paths = {"flags": root / "flags" / f"{MONTH}.gpkg", "ledger": root / "ledger.gpkg", "layers": root / "layers"}
    for p in paths.values():
        (p if p.suffix == "" else p.parent).mkdir(parents=True, exist_ok=True)
    flags.to_file(paths["flags"], layer="flags", driver="GPKG")
    cases.to_file(paths["ledger"], layer="cases", driver="GPKG")
    events.to_file(paths["ledger"], layer="events", driver="GPKG")
    alerts.to_file(paths["ledger"], layer="alerts", driver="GPKG")
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
    return paths


@dataclass
class FakePair:
    """Stands in for ``pipeline.imagery.AlignedPair``: 4 m pixels over the 2 km town, new roofs bright."""

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
