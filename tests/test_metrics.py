import numpy as np
import pytest
from shapely.geometry import Polygon, box

from pipeline.errors import CRSError, CRSMismatchError
from pipeline.metrics import (
    Scores,
    component_scores,
    label_scores,
    match_objects,
    object_fates,
    object_scores,
    pixel_scores,
    pool,
)


def test_scores_from_counts_hand_computed() -> None:
    s = Scores.from_counts(6, 2, 4)
    assert s.precision == pytest.approx(0.75)
    assert s.recall == pytest.approx(0.6)
    assert s.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert s.iou == pytest.approx(0.5)
    assert s.as_dict() == {"tp": 6, "fp": 2, "fn": 4, "precision": s.precision, "recall": 0.6, "f1": s.f1, "iou": 0.5}


def test_scores_empty_conventions() -> None:
    assert Scores.from_counts(0, 0, 0).f1 == 1.0
    miss = Scores.from_counts(0, 0, 5)
    assert (miss.precision, miss.recall, miss.f1, miss.iou) == (1.0, 0.0, 0.0, 0.0)
    alarm = Scores.from_counts(0, 3, 0)
    assert (alarm.precision, alarm.recall, alarm.f1) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        Scores.from_counts(-1, 0, 0)


def test_scores_pool_adds_counts() -> None:
    s = pool([Scores.from_counts(1, 2, 3), Scores.from_counts(4, 0, 1)])
    assert (s.tp, s.fp, s.fn) == (5, 2, 4)
    assert pool([]) == Scores.from_counts(0, 0, 0)


def test_pixel_scores_hand_computed() -> None:
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=np.uint8)
    pred = np.array([[1, 0, 1, 0], [1, 1, 1, 0]], dtype=bool)
    s = pixel_scores(pred, truth)
    assert (s.tp, s.fp, s.fn) == (3, 2, 1)
    assert s.precision == pytest.approx(0.6)
    assert s.recall == pytest.approx(0.75)
    assert s.iou == pytest.approx(0.5)
    valid = np.array([[1, 1, 0, 1], [1, 1, 0, 1]], dtype=bool)
    s = pixel_scores(pred, truth, valid)
    assert (s.tp, s.fp, s.fn) == (3, 0, 1)


def test_pixel_scores_errors() -> None:
    with pytest.raises(TypeError, match="threshold probabilities"):
        pixel_scores(np.zeros((2, 2), np.float32), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="differs from truth shape"):
        pixel_scores(np.zeros((2, 2), bool), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="valid shape"):
        pixel_scores(np.zeros((2, 2), bool), np.zeros((2, 2), bool), np.zeros((3, 2), bool))


def test_object_scores_iou_hand_computed() -> None:
    truth = [box(0, 0, 10, 10), box(20, 0, 30, 10), box(40, 0, 50, 10)]
    pred = [
        box(0, 0, 10, 8),  # IoU 0.8 with truth 0
        box(25, 0, 35, 10),  # IoU 50/150 = 1/3 with truth 1: not a match
        box(100, 100, 101, 101),  # nothing
    ]
    s = object_scores(pred, truth)
    assert (s.tp, s.fp, s.fn) == (1, 2, 2)
    assert s.precision == pytest.approx(1 / 3)
    assert s.recall == pytest.approx(1 / 3)
    s = object_scores(pred, truth, iou_threshold=0.3)
    assert (s.tp, s.fp, s.fn) == (2, 1, 1)


def test_object_scores_one_to_one_greedy_by_iou() -> None:
    truth = [box(0, 0, 10, 10)]
    pred = [box(0, 0, 10, 9), box(0, 0, 10, 10)]  # IoU 0.9 and 1.0: the exact one wins
    assert match_objects(pred, truth) == [(1, 0, 1.0)]
    s = object_scores(pred, truth)
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)


def test_object_scores_centroid_mode() -> None:
    truth = [box(0, 0, 4, 4), box(6, 0, 10, 4)]
    blob = [box(-1, -1, 11, 5)]  # covers both centroids but matches only one (one to one)
    s = object_scores(blob, truth, mode="centroid")
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    assert object_scores(blob, truth).tp == 0  # IoU 16/60 < 0.5
    # a prediction that misses the centroid does not count, whatever its overlap
    s = object_scores([box(0, 0, 1.9, 4)], [box(0, 0, 4, 4)], mode="centroid")
    assert (s.tp, s.fp, s.fn) == (0, 1, 1)


def test_object_scores_ignores_empty_and_repairs_invalid() -> None:
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    s = object_scores([Polygon(), None, box(0, 0, 10, 10)], [box(0, 0, 10, 10), bowtie])
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)


def test_object_scores_checks_crs_and_arguments() -> None:
    gpd = pytest.importorskip("geopandas")
    a = gpd.GeoSeries([box(0, 0, 1, 1)], crs="EPSG:4551")
    with pytest.raises(CRSMismatchError, match="to_crs"):
        object_scores(a, gpd.GeoSeries([box(0, 0, 1, 1)], crs="EPSG:32610"))
    with pytest.raises(CRSError, match="geographic"):
        object_scores(gpd.GeoSeries([box(0, 0, 1, 1)], crs="EPSG:4326"), a)
    with pytest.raises(ValueError, match="mode"):
        object_scores([], [], mode="area")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iou_threshold"):
        object_scores([], [], iou_threshold=0)
    assert object_scores(a, a).f1 == 1.0


def test_component_scores_hand_computed() -> None:
    truth = np.zeros((10, 10), bool)
    truth[0:3, 0:3] = True  # 9 px
    truth[6:9, 6:9] = True  # 9 px
    pred = np.zeros((10, 10), bool)
    pred[0:3, 0:2] = True  # 6 px inside the first: IoU 6/9
    pred[6:7, 6:7] = True  # 1 px inside the second: IoU 1/9
    pred[0, 9] = True  # lone false alarm
    s = component_scores(pred, truth)
    assert (s.tp, s.fp, s.fn) == (1, 2, 1)
    s = component_scores(pred, truth, min_pixels=2)
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)


def test_label_scores_keep_touching_objects_apart() -> None:
    truth = np.zeros((10, 20), bool)
    truth[2:8, 2:8] = True  # two houses 2 px apart
    truth[2:8, 10:16] = True
    labels = np.zeros((10, 20), np.int32)
    labels[2:8, 2:9] = 3  # one blob cut in two touching pieces (labels need not be 1..n)
    labels[2:8, 9:16] = 7
    labels[0, 19] = 9  # a 1-pixel false alarm
    s = label_scores(labels, truth)
    assert (s.tp, s.fp, s.fn) == (2, 1, 0)  # each piece matches its house (IoU 36/42)
    blob = component_scores(labels > 0, truth)  # as one mask the pieces are one component
    assert (blob.tp, blob.fp, blob.fn) == (0, 2, 2)
    assert object_fates(labels, truth, labelled=True) == {"hit": 2, "merged": 0, "partly": 0, "missed": 0}
    assert object_fates(labels > 0, truth) == {"hit": 0, "merged": 2, "partly": 0, "missed": 0}
    assert (label_scores(labels, truth, min_pixels=2).fp, label_scores(labels, truth, valid=labels != 7).tp) == (0, 1)


def test_object_fates_tell_hits_merges_partial_finds_and_misses_apart() -> None:
    truth = np.zeros((20, 40), bool)
    truth[1:5, 1:5] = True  # A: found alone
    truth[1:5, 10:14] = True  # B and C: neighbours 2 px apart ...
    truth[1:5, 16:20] = True
    truth[10:18, 1:9] = True  # D: 64 px, found as a 16 px corner only
    truth[10:14, 20:24] = True  # E: 1 px of it found
    truth[10:14, 30:34] = True  # F: nothing there
    pred = np.zeros_like(truth)
    pred[1:5, 1:5] = True
    pred[1:5, 10:20] = True  # ... grown into one blob
    pred[10:14, 1:5] = True
    pred[10, 20] = True
    fates = object_fates(pred, truth)
    assert fates == {"hit": 1, "merged": 2, "partly": 1, "missed": 2}
    assert fates["hit"] == component_scores(pred, truth).tp
    # a valid mask clears the pixels outside it: E's lone pixel goes and E stays missed; A is gone from both
    valid = np.ones_like(truth)
    valid[0:6, 0:6] = False
    assert object_fates(pred, truth, valid) == {"hit": 0, "merged": 2, "partly": 1, "missed": 2}
    empty = np.zeros_like(truth)
    assert object_fates(empty, truth) == {"hit": 0, "merged": 0, "partly": 0, "missed": 6}
    assert object_fates(pred, empty) == {"hit": 0, "merged": 0, "partly": 0, "missed": 0}
