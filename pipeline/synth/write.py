"""Writing the demo town: map sheets, GeoPackages, field-update CSVs and ``demo.json``, atomically.

:func:`generate_demo` plans (:func:`pipeline.synth.plan.plan_demo`), renders and writes everything into a
sibling temporary folder that replaces the output folder at the end; same settings give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError as RioCRSError
from shapely.geometry import box

from pipeline.config import DemoSettings
from pipeline.errors import ConfigError
from pipeline.fileio import replace_dir
from pipeline.synth.plan import DemoPlan, plan_demo
from pipeline.synth.render import (
    PAD_PX,
    finish_sheet,
    paint_roofs,
    paint_structures,
    render_ground,
    shadow_mask,
    sheet_profile,
)
from pipeline.synth.scene import seeded_rng

log = logging.getLogger(__name__)

_DISTRICTS = ("青禾区", "北澜区", "泰和区", "云岫区")
_STREETS = ("清水", "永安", "长丰", "曙光", "柳溪", "新民", "锦程", "富康", "春晖", "安澜", "瑞祥", "松涛")


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`generate_demo` wrote."""

    out_dir: Path
    months: list[str]
    n_structures: int
    n_changes: int
    crs: str


# ----------------------------------------------------------------------------------------------- writing
@contextmanager
def _fixed_gpkg_date() -> Iterator[None]:
    """Pin the GeoPackage ``last_change`` timestamps so that reruns give byte-identical files."""
    old = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": "2000-01-01T00:00:00.000Z"})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": old})


def _write_layer(
    path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str], crs: str, layer: str | None = None
) -> None:
    df = pd.DataFrame(list(rows), columns=[*columns, "geometry"])
    gdf = gpd.GeoDataFrame(df[list(columns)], geometry=list(df["geometry"]), crs=crs)
    path.parent.mkdir(parents=True, exist_ok=True)
    gdf.to_file(path, layer=layer or path.stem, driver="GPKG", engine="pyogrio")


def _admin_layers(out: Path, settings: DemoSettings) -> None:
    """Districts, streets (街道) and the 网格 management grid, covering the area."""
    rng = seeded_rng(settings.seed, 20)
    x0, y0 = settings.origin
    s = settings.size_m
    n = int(rng.integers(2, 5))
    xs, ys = x0 + s * rng.uniform(0.4, 0.6), y0 + s * rng.uniform(0.4, 0.6)
    parts = {
        2: [(x0, y0, xs, y0 + s), (xs, y0, x0 + s, y0 + s)],
        3: [(x0, y0, xs, y0 + s), (xs, ys, x0 + s, y0 + s), (xs, y0, x0 + s, ys)],
        4: [(x0, ys, xs, y0 + s), (xs, ys, x0 + s, y0 + s), (x0, y0, xs, ys), (xs, y0, x0 + s, ys)],
    }[n]
    names = [_DISTRICTS[int(i)] for i in rng.permutation(len(_DISTRICTS))[:n]]
    districts = [dict(district=nm, geometry=box(*b)) for nm, b in zip(names, parts, strict=True)]
    streets, pool = [], [_STREETS[int(i)] for i in rng.permutation(len(_STREETS))]
    for d, (bx0, by0, bx1, by1) in zip(names, parts, strict=True):
        cut = by0 + (by1 - by0) * rng.uniform(0.35, 0.65)
        for b in ((bx0, by0, bx1, cut), (bx0, cut, bx1, by1)):
            streets.append(dict(street=f"{pool.pop()}街道", district=d, geometry=box(*b)))
    cells, k = [], 0
    edges = np.r_[np.arange(0, s, 250.0), s]
    for r in range(len(edges) - 2, -1, -1):
        for c in range(len(edges) - 1):
            k += 1
            g = box(x0 + edges[c], y0 + edges[r], x0 + edges[c + 1], y0 + edges[r + 1])
            d = max(districts, key=lambda x: x["geometry"].intersection(g).area)["district"]
            cells.append(dict(cell_id=f"G{k:03d}", unit=f"第{k}网格 {d}城管中队", geometry=g))
    _write_layer(out / "districts.gpkg", districts, ["district"], settings.crs)
    _write_layer(out / "streets.gpkg", streets, ["street", "district"], settings.crs)
    _write_layer(out / "grid.gpkg", cells, ["cell_id", "unit"], settings.crs)


def _write_vectors(out: Path, plan: DemoPlan) -> None:
    settings, months, crs = plan.settings, plan.months, plan.settings.crs
    _write_layer(
        out / "ledger" / "cases.gpkg",
        plan.cases,
        ["case_id", "opened_at", "state", "category", "note", "deadline"],
        crs,
    )
    _write_layer(out / "layers" / "permits.gpkg", plan.permits, ["permit_id", "valid_from", "valid_to", "note"], crs)
    _admin_layers(out / "layers", settings)
    rows = [dict(c, month=months[c["month"]]) for c in plan.changes]
    _write_layer(
        out / "truth" / "truth.gpkg", rows, ["month", "kind", "structure_id", "legal", "event"], crs, layer="changes"
    )
    life = []
    for s in plan.structures:
        present = [m for m in range(len(months)) if (cur := s.at(m)) is not None and cur[0] == "roof"]
        present = present or [m for m in range(len(months)) if s.at(m) is not None]  # a scar: rubble only
        if present:
            life.append(
                dict(
                    structure_id=s.sid,
                    first_month=months[present[0]],
                    last_month=months[present[-1]],
                    category=s.category,
                    legal=s.legal,
                    geometry=s.at(present[-1])[1],  # type: ignore[index]
                )
            )
    _write_layer(
        out / "truth" / "truth.gpkg",
        life,
        ["structure_id", "first_month", "last_month", "category", "legal"],
        crs,
        layer="structures",
    )
    cols = ["at", "kind", "actor", "note", "deadline", "case_id", "x", "y"]
    (out / "field_updates").mkdir(parents=True, exist_ok=True)
    for m in range(1, len(months)):
        df = pd.DataFrame([u for u in plan.updates if u["month"] == m], columns=cols)
        df.to_csv(out / "field_updates" / f"{months[m]}.csv", index=False, lineterminator="\n")


def _check_settings(settings: DemoSettings) -> CRS:
    try:
        crs = CRS.from_user_input(settings.crs)
    except RioCRSError as exc:
        raise ConfigError(
            f"demo.crs {settings.crs!r} is not a CRS ({exc}); use e.g. 'EPSG:4551' in params.yaml"
        ) from exc
    if not crs.is_projected:
        raise ConfigError(f"demo.crs {settings.crs!r} is not projected; the demo needs metres (e.g. 'EPSG:4551')")
    px = settings.size_m / settings.gsd
    rows, cols = settings.sheets
    if abs(px - round(px)) > 1e-6 or rows < 1 or cols < 1 or round(px) < max(rows, cols) * 16:
        raise ConfigError(
            f"demo.size_m {settings.size_m} / demo.gsd {settings.gsd} must be a whole number of "
            f"pixels, at least 16 per sheet of demo.sheets {settings.sheets!r}; fix params.yaml"
        )
    return crs


def generate_demo(out_dir: Path | str, settings: DemoSettings) -> DemoSummary:
    """Render and write the demo town (imagery, ledger, layers, field updates, truth, ``demo.json``).

    Everything is written into a sibling temporary folder that replaces ``out_dir`` at the end, so a
    failed run leaves no half-written output. Same settings give byte-identical files.

    Args:
        out_dir: the folder to (re)create.
        settings: the demo settings.

    Returns:
        The summary of what was written.

    Raises:
        ConfigError: the CRS is unknown or not projected, or size, gsd and sheets do not fit together.
    """
    out_dir = Path(out_dir)
    crs = _check_settings(settings)
    plan = plan_demo(settings)
    n = round(settings.size_m / settings.gsd)
    full = (n + 2 * PAD_PX, n + 2 * PAD_PX)
    x0, y0 = settings.origin
    grid = Affine(settings.gsd, 0, x0, 0, -settings.gsd, y0 + settings.size_m)
    padded = grid * Affine.translation(-PAD_PX, -PAD_PX)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        base = render_ground(seeded_rng(settings.seed, 10), plan.scene, padded, full)
        first = [s for s in plan.structures if s.states[0][0] == 0]
        paint_structures(base, [s for s in first if s.states[0][1] != "roof"], 0, settings.seed)
        paint_roofs(base, [(s.states[0][2], s.roof) for s in first if s.states[0][1] == "roof"])
        rows = np.linspace(0, n, settings.sheets[0] + 1).round().astype(int)
        cols = np.linspace(0, n, settings.sheets[1] + 1).round().astype(int)
        dynamic = [s for s in plan.structures if s.changed_after_start()]
        for m, month in enumerate(plan.months):
            look = plan.looks[m]
            canvas = base
            if m > 0:
                canvas = base.copy()
                paint_structures(canvas, dynamic, m, settings.seed)
            shadow = shadow_mask(plan.structures, canvas, m, look["shadow_k"])
            folder = tmp / "imagery" / month
            folder.mkdir(parents=True)
            for r in range(settings.sheets[0]):
                for c in range(settings.sheets[1]):
                    r0, c0 = int(rows[r]), int(cols[c])
                    h, w = int(rows[r + 1]) - r0, int(cols[c + 1]) - c0
                    arr = finish_sheet(canvas, shadow, look, seeded_rng(settings.seed, 5, m, r, c), r0, c0, h, w)
                    profile = sheet_profile(look, crs, grid * Affine.translation(c0, r0), h, w)
                    with rasterio.open(folder / f"sheet_{r}_{c}.tif", "w", **profile) as dst:
                        dst.write(arr)
            log.info(
                "demo month %s rendered (%s, shift %.2f, %.2f px)", month, look["compress"], look["dx"], look["dy"]
            )
        with _fixed_gpkg_date():
            _write_vectors(tmp, plan)
        present = {s.sid for s in plan.structures for m in range(len(plan.months)) if s.at(m) is not None}
        summary = DemoSummary(out_dir, list(plan.months), len(present), len(plan.changes), settings.crs)
        meta = dict(
            months=summary.months,
            n_structures=summary.n_structures,
            n_changes=summary.n_changes,
            crs=summary.crs,
            seed=settings.seed,
            gsd=settings.gsd,
            size_m=settings.size_m,
            sheets=list(settings.sheets),
            shift_convention="feature at true (row, col) appears at (row + dy, col + dx), pixels",
            shifts={lk["month"]: dict(dx=lk["dx"], dy=lk["dy"]) for lk in plan.looks},
            compression={lk["month"]: lk["compress"] for lk in plan.looks},
        )
        (tmp / "demo.json").write_text(
            json.dumps(meta, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    log.info("demo town written to %s: %d months, %d changes", out_dir, len(plan.months), len(plan.changes))
    return summary
