"""The arithmetic `make bench` derives its month figures with (benchmarks/run_all.py), on made-up figures."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def _run_all() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    spec = importlib.util.spec_from_file_location("run_all", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_map_figure_is_the_slope_between_two_map_sizes() -> None:
    ra = _run_all()
    args = argparse.Namespace(map_size=[1024, 4096])
    # 1024² = 0.262 km², 4096² = 4.194 km² at 0.5 m: 1 s fixed + 2 s per km²
    figs = {"map:1024": {"pyramid_s": 1 + 2 * 0.262144}, "map": {"pyramid_s": 1 + 2 * 4.194304}}
    rate, how = ra.map_s_per_km2(figs, args)
    assert rate == pytest.approx(2.0) and how == "slope between the 1024² and 4096² maps"
    one = argparse.Namespace(map_size=[1024])
    rate, how = ra.map_s_per_km2({"map": {"pyramid_s": 1.0}}, one)
    assert rate == pytest.approx(1 / 0.262144) and how == "time / area of one map"
    assert ra.map_s_per_km2({}, args) == (None, "not measured")


def test_detects_month_cost_per_tile_drops_the_fixed_start_up() -> None:
    ra = _run_all()
    args = argparse.Namespace(size=1536)
    figs = {
        "machine": {"shipped_mode": "bf16-compile"},
        "decode_floor": {"pairs_per_s": 100.0},
        "compute_floor:bf16-compile": {"pairs_per_s": 5.0},  # 0.2 s a tile
        "detect:bf16-compile": {"seconds": 30 + 16 * 0.25, "pairs": 16},  # 30 s compile + 0.25 s a tile
        "growth:4096:detect": {"seconds": 30 + 81 * 0.25, "pairs": 81},
    }
    rows = [{"size": 1536}, {"size": 4096}]
    d = ra.detect_marginal(figs, args, rows)
    assert d["marginal_s_per_tile:bf16-compile"] == pytest.approx(0.25)
    assert d["over_floor_marginal:bf16-compile"] == pytest.approx(1.25)
    assert d["marginal_between_tiles"] == [16, 81]
    assert ra.detect_marginal(figs, args, rows[:1]) == {}
    assert abs(ra.CITY_TILES - 9965) <= 1
