"""Object-confidence calibration (synthetic maps with known objects) and the Santa Rosa flag check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import EvaluateSettings, VectorizeSettings
from pipeline.evaluate import _Item
from pipeline.flagcheck import calibrate_objects, seeded_objects
from pipeline.vectorize import clean_mask


def _map() -> tuple[np.ndarray, np.ndarray]:
    """A 64 x 96 probability map: two true objects, confident all over, and two confident-edged blobs.

    Returns the probabilities and the truth mask (the two true objects).
    """
    p = np.zeros((64, 96), np.float32)
    truth = np.zeros((64, 96), bool)
    p[4:20, 4:20] = 0.97  # true, mean 0.97
    truth[4:20, 4:20] = True
    p[30:50, 40:56] = 0.93  # true, mean 0.93
    truth[30:50, 40:56] = True
    p[4:24, 60:80] = 0.7  # false: a 4 x 20 strip at 0.95 seeds a blob of 0.7 -> mean 0.75
    p[4:8, 60:80] = 0.95
    p[40:60, 4:12] = 0.6  # false: seed row of 0.92 in a weak blob -> mean 0.632
    p[40:42, 4:12] = 0.92
    return p, truth


def test_seeded_objects_are_the_vectorize_objects() -> None:
    p, _ = _map()
    valid = np.ones_like(p, bool)
    valid[:, 90:] = False
    objs = seeded_objects(p, 0.9, 0.5, valid)
    np.testing.assert_array_equal(objs.mask(0.0), clean_mask(p, VectorizeSettings(high=0.9, low=0.5)))
    means = sorted(np.round(objs.means[1:], 4).tolist())
    assert means == pytest.approx([0.632, 0.75, 0.93, 0.97], abs=1e-4)
    assert objs.mask(0.9).sum() == 16 * 16 + 20 * 16  # only the two confident objects
    assert seeded_objects(p, 0.99, 0.5).labels.max() == 0  # nothing reaches the seed


def test_calibrate_objects_picks_the_threshold_that_drops_the_unsure_blobs() -> None:
    p, truth = _map()
    valid = np.ones_like(p, bool)
    items = [_Item(ds, "a", np.zeros((2, 3, 64, 96), np.uint8), truth, valid, "new") for ds in ("x", "y")]
    settings = EvaluateSettings(calibration_weights={"x": 1.0, "y": 1.0}, min_object_px=16)
    grid = (0.0, 0.7, 0.8, 0.95)
    out = calibrate_objects(items, [p, p], 0.9, settings, low=0.5, grid=grid)
    # at 0 and 0.7 one or two blobs are false alarms; 0.8 keeps exactly the two true objects; 0.95 loses one
    assert out["curve"] == {"0.0": pytest.approx(0.6667, abs=1e-4), "0.7": 0.8, "0.8": 1.0, "0.95": 0.6667}
    assert out["object_threshold"] == 0.8 and out["seed"] == 0.9 and out["low"] == 0.5
    assert out["scores"]["x"]["new"] == {**out["scores"]["x"]["new"], "tp": 2, "fp": 0, "fn": 0}


def test_calibrate_objects_ties_go_to_the_lower_threshold() -> None:
    p = np.zeros((32, 32), np.float32)
    p[4:20, 4:20] = 0.97
    truth = p > 0
    items = [_Item("x", "a", np.zeros((2, 3, 32, 32), np.uint8), truth, np.ones_like(truth), "new")]
    out = calibrate_objects(items, [p], 0.9, EvaluateSettings(calibration_weights={"x": 1.0}), grid=(0.0, 0.5, 0.9))
    assert out["object_threshold"] == 0.0 and set(out["curve"].values()) == {1.0}


@pytest.mark.realdata
def test_santa_rosa_truth_counts_destroyed_footprints(shared_data: Path) -> None:
    import pandas as pd

    from pipeline.flagcheck import santa_rosa_truth

    root = shared_data / "xbd-santa-rosa"
    tiles = pd.read_csv(root / "tiles.csv", dtype={"id": str}).set_index("id")
    for tile_id in ("00000021", "00000028"):
        truth = santa_rosa_truth(root, tile_id)
        row = tiles.loc[tile_id]
        assert len(truth) == int(row["n_destroyed"]) + int(row["n_major_damage"])
        assert set(truth["kind"]) <= {"removed"} and truth.crs.to_epsg() == 32610


def test_add_flag_check_merges_into_the_metrics_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from pipeline import flagcheck
    from pipeline.config import Settings
    from pipeline.errors import MissingInputError

    seen = {}

    def fake(settings: Settings, work_dir: Path, **_: object) -> dict:
        seen["model"], seen["work"] = settings.detect.model, work_dir
        return {"truth": 3, "scores": {"removed": {"iou50": {"tp": 1}}}}

    monkeypatch.setattr(flagcheck, "santa_rosa_flags", fake)
    metrics = tmp_path / "metrics.json"
    with pytest.raises(MissingInputError, match="metrics.json: metrics file not found"):
        flagcheck.add_flag_check(Settings(), tmp_path / "net.pt", metrics)
    metrics.write_text(json.dumps({"methods": {"shipped": {"threshold": 0.9}}}))
    flagcheck.add_flag_check(Settings(), tmp_path / "net.pt", metrics)
    stored = json.loads(metrics.read_text())
    assert stored["methods"] == {"shipped": {"threshold": 0.9}}  # the rest of the file is kept
    assert stored["flags"]["santa-rosa"]["truth"] == 3
    assert seen["model"] == tmp_path / "net.pt" and not seen["work"].exists()  # scratch removed


@pytest.mark.realdata
def test_santa_rosa_flags_run_the_real_chain_on_a_held_out_tile(shared_data: Path, tmp_path: Path) -> None:
    import geopandas as gpd

    from pipeline.config import Settings
    from pipeline.flagcheck import santa_rosa_flags

    checkpoint = Path(__file__).resolve().parents[1] / "models" / "scarnet.pt"
    settings = Settings.model_validate({"evaluate": {"data": shared_data}, "detect": {"model": checkpoint}})
    out = santa_rosa_flags(settings, tmp_path / "calibrated", tile_ids=["00000012"])
    removed = out["scores"]["removed"]
    assert out["tiles"] == ["00000012"] and out["truth"] == 158  # destroyed footprints, all in valid imagery
    assert removed["iou50"]["tp"] + removed["iou50"]["fn"] == 158
    # measured with the shipped checkpoint: 68 of 158 found at IoU >= 0.5 with 22 false removed flags
    assert removed["iou50"]["tp"] >= 50 and removed["iou50"]["precision"] >= 0.6
    assert removed["centroid"]["tp"] >= removed["iou50"]["tp"]
    flags = gpd.read_file(tmp_path / "calibrated" / "00000012" / "flags.gpkg", layer="flags")
    assert len(flags) == sum(out["flags"].values()) and set(flags["month"]) == {"2017-10"}
    assert flags.crs.to_epsg() == 32610
    # keeping every seeded object (no object threshold) adds false alarms
    loose = settings.model_copy(update={"vectorize": settings.vectorize.model_copy(update={"min_p_mean": 0.0})})
    everything = santa_rosa_flags(loose, tmp_path / "loose", tile_ids=["00000012"])
    assert sum(everything["flags"].values()) > sum(out["flags"].values())
    assert everything["scores"]["removed"]["iou50"]["fp"] > removed["iou50"]["fp"]


def test_demo_accuracy_pools_the_monthly_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from pipeline.errors import MissingInputError
    from pipeline.flagcheck import demo_accuracy, main

    def month(tp: int, fp: int, fn: int) -> dict:
        return {kind: {"tp": tp, "fp": fp, "fn": fn} for kind in ("new", "removed", "all")}

    for name, iou, hit in (("2026-02", (4, 1, 1), (5, 0, 0)), ("2026-03", (3, 1, 1), (3, 1, 1))):
        figures = {"accuracy": month(*iou), "accuracy_centroid": month(*hit)}
        (tmp_path / f"{name}.json").write_text(json.dumps(figures))
    (tmp_path / "city.json").write_text(json.dumps({"accuracy": None}))  # not the demo town: skipped
    out = demo_accuracy(tmp_path)
    assert out["iou50"]["months"] == ["2026-02", "2026-03"]
    assert (out["iou50"]["all"]["tp"], out["iou50"]["all"]["fp"], out["iou50"]["all"]["fn"]) == (7, 2, 2)
    assert out["iou50"]["all"]["f1"] == pytest.approx(14 / 18)
    assert (out["centroid"]["new"]["tp"], out["centroid"]["new"]["fn"]) == (8, 1)
    main([str(tmp_path)])
    assert "all      TP    7  FP    2  FN    2  P 0.778  R 0.778  F1 0.778" in capsys.readouterr().out
    (tmp_path / "2026-02.json").unlink()
    (tmp_path / "2026-03.json").unlink()
    with pytest.raises(MissingInputError, match="no monthly metrics with a demo accuracy section"):
        demo_accuracy(tmp_path)
    with pytest.raises(SystemExit, match="pipeline.flagcheck: error: .*run 'make demo'"):
        main([str(tmp_path)])
