"""Pixel and object scores for change maps and flags: the leaf every evaluation builds on.

Conventions (the same for every function here):

* ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, ``f1 = 2 p r / (p + r)`` and
  ``iou = tp / (tp + fp + fn)`` (Jaccard index of the counts: the pixel IoU for pixel scores, the
  "critical success index" for object scores).
* An empty denominator counts as perfect: nothing predicted means precision 1.0, nothing to find means
  recall 1.0, and nothing predicted where nothing exists means ``f1 = iou = 1.0``. When either precision
  or recall is 0, ``f1`` is 0.
* Scores pool by adding counts (``a + b``), never by averaging ratios.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.errors import CRSError, CRSMismatchError, InputError
from pipeline.formats import FLAG_KINDS

if TYPE_CHECKING:
    import geopandas as gpd
    from shapely.geometry.base import BaseGeometry


log = logging.getLogger(__name__)

MatchMode = Literal["iou", "centroid"]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 1.0


@dataclass(frozen=True)
class Scores:
    """Counts and the ratios derived from them (see the module docstring for the conventions).

    Attributes:
        tp: true positives (pixels or matched objects).
        fp: false positives.
        fn: false negatives.
        precision: tp / (tp + fp).
        recall: tp / (tp + fn).
        f1: harmonic mean of precision and recall.
        iou: tp / (tp + fp + fn).
    """

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    iou: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int) -> Scores:
        """Build scores from counts.

        Args:
            tp: true positives.
            fp: false positives.
            fn: false negatives.

        Returns:
            The scores with all ratios filled in.

        Raises:
            ValueError: a count is negative.
        """
        if min(tp, fp, fn) < 0:
            raise ValueError(f"counts must be non-negative, got tp={tp!r} fp={fp!r} fn={fn!r}")
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return cls(int(tp), int(fp), int(fn), precision, recall, f1, _ratio(tp, tp + fp + fn))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scores:
        """Rebuild scores from :meth:`as_dict` output (only the counts are read)."""
        return cls.from_counts(int(d["tp"]), int(d["fp"]), int(d["fn"]))

    def __add__(self, other: Scores) -> Scores:
        """Pool two sets of scores by adding their counts."""
        if not isinstance(other, Scores):
            return NotImplemented
        return Scores.from_counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def as_dict(self) -> dict[str, float | int]:
        """Return the fields as a plain dict (JSON-ready)."""
        return asdict(self)


EMPTY = Scores.from_counts(0, 0, 0)


def pool(scores: Iterable[Scores]) -> Scores:
    """Add up the counts of many scores (an empty iterable gives the empty, perfect score)."""
    total = EMPTY
    for s in scores:
        total = total + s
    return total


def pixel_scores(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> Scores:
    """Count pixel true/false positives and negatives of a binary change map.

    Args:
        pred: predicted change, bool or integer 0/1 (non-zero counts as change), any shape.
        truth: true change, same shape and dtype rules as ``pred``.
        valid: optional bool mask of the same shape; pixels where it is False are ignored.

    Returns:
        The pixel scores.

    Raises:
        TypeError: ``pred`` or ``truth`` is a float array (threshold probabilities first).
        ValueError: the shapes differ.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    for name, arr in (("pred", pred), ("truth", truth)):
        if np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{name} is {arr.dtype}; pass a bool mask (threshold probabilities first: p >= t)")
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape!r} differs from truth shape {truth.shape!r}")
    p = pred != 0
    t = truth != 0
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != pred.shape:
            raise ValueError(f"valid shape {valid.shape!r} differs from pred shape {pred.shape!r}")
        p = p & valid
        t = t & valid
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return Scores.from_counts(tp, fp, fn)


def _polygons(objs: Any, name: str) -> tuple[list[BaseGeometry], Any]:
    """Return the non-empty, valid geometries of ``objs`` and its CRS (None for plain sequences)."""
    from shapely import make_valid

    crs = getattr(objs, "crs", None)
    if crs is not None and getattr(crs, "is_geographic", False):
        raise CRSError(f"{name} is in geographic CRS {crs!r}; reproject both to one projected CRS first (to_crs)")
    geoms = []
    for g in list(objs):
        if g is None or g.is_empty:
            continue
        geoms.append(g if g.is_valid else make_valid(g))
    return geoms, crs


def greedy_matches(candidates: Iterable[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    """One-to-one matches from qualifying ``(iou, truth, pred)`` pairs, taken greedily.

    Pairs are taken in order of IoU descending (ties: lower truth index, then lower prediction index),
    skipping any pair whose truth or prediction is already matched. The one matcher of polygons
    (:func:`match_objects`) and raster components (:func:`component_scores`).
    """
    used_t: set[int] = set()
    used_p: set[int] = set()
    out = []
    for iou, ti, pi in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        if ti not in used_t and pi not in used_p:
            used_t.add(ti)
            used_p.add(pi)
            out.append((iou, ti, pi))
    return out


def match_objects(
    pred: Sequence[BaseGeometry] | Any,
    truth: Sequence[BaseGeometry] | Any,
    *,
    iou_threshold: float = 0.5,
    mode: MatchMode = "iou",
) -> list[tuple[int, int, float]]:
    """Match predicted to true objects one to one, greedily.

    Candidate pairs are those that intersect. In ``"iou"`` mode a pair qualifies when its IoU (area of
    intersection over area of union) is at least ``iou_threshold``. In ``"centroid"`` mode a pair
    qualifies when the predicted polygon covers (contains, boundary included) the centroid of the true
    polygon; ``iou_threshold`` is ignored. Qualifying pairs are then taken in order of IoU descending
    (ties: lower truth index, then lower prediction index), skipping any pair whose prediction or truth is
    already matched. So one large prediction over two houses matches only one of them.

    Args:
        pred: predicted polygons (a sequence of shapely geometries or a GeoSeries), in a projected CRS.
        truth: true polygons, same CRS.
        iou_threshold: minimum IoU in ``"iou"`` mode, in (0, 1].
        mode: ``"iou"`` or ``"centroid"``.

    Returns:
        ``(pred_index, truth_index, iou)`` per match, indexes into the non-empty geometries in input order.

    Raises:
        ValueError: bad ``mode`` or ``iou_threshold``.
        CRSError: a GeoSeries is in a geographic CRS.
        CRSMismatchError: both are GeoSeries and their CRSs differ.
    """
    from shapely import STRtree

    if mode not in ("iou", "centroid"):
        raise ValueError(f"mode {mode!r} must be 'iou' or 'centroid'")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold {iou_threshold!r} must be in (0, 1]")
    p_geoms, p_crs = _polygons(pred, "pred")
    t_geoms, t_crs = _polygons(truth, "truth")
    if p_crs is not None and t_crs is not None and p_crs != t_crs:
        raise CRSMismatchError(f"pred CRS {p_crs!r} differs from truth CRS {t_crs!r}; reproject one (to_crs)")
    if not p_geoms or not t_geoms:
        return []
    tree = STRtree(p_geoms)
    t_idx, p_idx = tree.query(t_geoms, predicate="intersects")
    candidates: list[tuple[float, int, int]] = []
    for ti, pi in zip(t_idx.tolist(), p_idx.tolist(), strict=True):
        t, p = t_geoms[ti], p_geoms[pi]
        inter = t.intersection(p).area
        union = t.area + p.area - inter
        iou = inter / union if union > 0 else 0.0
        ok = iou >= iou_threshold if mode == "iou" else bool(p.covers(t.centroid))
        if ok:
            candidates.append((iou, ti, pi))
    return [(pi, ti, iou) for iou, ti, pi in greedy_matches(candidates)]


def object_scores(
    pred: Sequence[BaseGeometry] | Any,
    truth: Sequence[BaseGeometry] | Any,
    *,
    iou_threshold: float = 0.5,
    mode: MatchMode = "iou",
) -> Scores:
    """Score predicted against true objects after one-to-one greedy matching (see :func:`match_objects`).

    A matched pair is a true positive, an unmatched prediction a false positive, an unmatched truth a
    false negative. Empty and ``None`` geometries are ignored; invalid ones are repaired (make_valid).

    Args:
        pred: predicted polygons (sequence of shapely geometries or GeoSeries) in a projected CRS.
        truth: true polygons in the same CRS.
        iou_threshold: minimum IoU for a match in ``"iou"`` mode.
        mode: ``"iou"`` (match by IoU) or ``"centroid"`` (prediction covers the truth's centroid).

    Returns:
        The object scores.
    """
    matches = match_objects(pred, truth, iou_threshold=iou_threshold, mode=mode)
    n_pred = len(_polygons(pred, "pred")[0])
    n_truth = len(_polygons(truth, "truth")[0])
    tp = len(matches)
    return Scores.from_counts(tp, n_pred - tp, n_truth - tp)


def _relabel(lab: np.ndarray, min_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels without those under ``min_pixels``, renumbered 1..n: labels and sizes (index 0 unused)."""
    sizes = np.bincount(lab.ravel(), minlength=int(lab.max()) + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    remap = np.zeros(len(sizes), dtype=np.int64)
    remap[keep] = np.arange(1, int(keep.sum()) + 1)
    lab = remap[lab]
    return lab, np.bincount(lab.ravel(), minlength=int(keep.sum()) + 1)


def _components(mask: np.ndarray, min_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of ``mask`` without those under ``min_pixels``: labels and sizes (index 0 unused)."""
    from scipy import ndimage

    lab, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return _relabel(lab, min_pixels)


def _component_matches(
    pred: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray | None,
    iou_threshold: float,
    min_pixels: int,
    *,
    labelled: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[tuple[float, int, int]]]:
    """Both maps' component sizes, their overlapping (truth, pred) pairs with pixel counts, the matches.

    With ``labelled``, ``pred`` holds object labels (0 the background) that are taken as they are, so
    that touching objects stay apart; otherwise its 8-connected components are the objects.
    """
    p = np.asarray(pred)
    t = np.asarray(truth) != 0
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"pred {p.shape!r} and truth {t.shape!r} must be 2-D masks of one shape")
    p = p.astype(np.int64) if labelled else p != 0
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        p, t = np.where(v, p, 0) if labelled else p & v, t & v
    p_lab, p_sizes = _relabel(p, min_pixels) if labelled else _components(p, min_pixels)
    t_lab, t_sizes = _components(t, min_pixels)
    both = (p_lab > 0) & (t_lab > 0)
    pairs, inter = np.unique(np.stack([t_lab[both], p_lab[both]]), axis=1, return_counts=True)
    candidates = []
    for (ti, pi), n in zip(pairs.T.tolist(), inter.tolist(), strict=True):
        iou = n / (t_sizes[ti] + p_sizes[pi] - n)
        if iou >= iou_threshold:
            candidates.append((iou, ti, pi))
    return p_sizes, t_sizes, pairs, inter, greedy_matches(candidates)


def component_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    iou_threshold: float = 0.5,
    min_pixels: int = 1,
) -> Scores:
    """Object scores on the 8-connected components of two binary rasters (no polygonising).

    The IoU of two components is computed from pixel counts; matching is one to one and greedy by IoU
    descending, as in :func:`match_objects` ``"iou"`` mode. Components smaller than ``min_pixels`` are
    dropped from both maps first; pixels outside ``valid`` are cleared first.

    Args:
        pred: predicted change mask (h, w), bool or 0/1.
        truth: true change mask (h, w).
        valid: optional bool mask (h, w).
        iou_threshold: minimum IoU for a match.
        min_pixels: smallest component that counts as an object.

    Returns:
        The object scores.

    Raises:
        ValueError: the inputs are not 2-D or their shapes differ.
    """
    return _matched_scores(pred, truth, valid, iou_threshold, min_pixels, labelled=False)


def label_scores(
    labels: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    iou_threshold: float = 0.5,
    min_pixels: int = 1,
) -> Scores:
    """Object scores of labelled predicted objects (0 the background) against the truth's components.

    As :func:`component_scores`, but the predicted objects are the labels as given, so that touching
    objects (the pieces of a cut blob, :func:`pipeline.vectorize.split_objects`) stay apart.
    """
    return _matched_scores(labels, truth, valid, iou_threshold, min_pixels, labelled=True)


def _matched_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray | None,
    iou_threshold: float,
    min_pixels: int,
    *,
    labelled: bool,
) -> Scores:
    p_sizes, t_sizes, _, _, matches = _component_matches(
        pred, truth, valid, iou_threshold, min_pixels, labelled=labelled
    )
    tp = len(matches)
    return Scores.from_counts(tp, len(p_sizes) - 1 - tp, len(t_sizes) - 1 - tp)


OBJECT_FATES = ("hit", "merged", "partly", "missed")


def object_fates(
    pred: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    iou_threshold: float = 0.5,
    min_pixels: int = 1,
    missed_below: float = 0.2,
    labelled: bool = False,
) -> dict[str, int]:
    """What became of each true object, on the components :func:`component_scores` matches.

    ``hit``: matched one to one at IoU >= ``iou_threshold`` (so the count is ``component_scores``' TP).
    Of the others, by the predicted component that covers most of the object: ``missed`` when it covers
    less than ``missed_below`` of it (or none does); ``merged`` when that component also overlaps another
    true object (neighbours grown into one blob); ``partly`` otherwise (a blob too small, too large or
    in pieces).

    Args:
        pred: predicted change mask (h, w), bool or 0/1.
        truth: true change mask (h, w).
        valid: optional bool mask (h, w).
        iou_threshold: minimum IoU for a hit.
        min_pixels: smallest component that counts as an object.
        missed_below: the covered share under which an object counts as missed.
        labelled: ``pred`` holds object labels, taken as given (the flags' cut pieces, as
            :func:`label_scores` takes them).

    Returns:
        A count per fate, in :data:`OBJECT_FATES` order.
    """
    p_sizes, t_sizes, pairs, inter, matches = _component_matches(
        pred, truth, valid, iou_threshold, min_pixels, labelled=labelled
    )
    fates = dict.fromkeys(OBJECT_FATES, 0)
    fates["hit"] = len(matches)
    hit = {ti for _, ti, _ in matches}
    truths_per_pred = np.bincount(pairs[1], minlength=len(p_sizes))
    best: dict[int, tuple[int, int]] = {}
    for (ti, pi), n in zip(pairs.T.tolist(), inter.tolist(), strict=True):
        if n > best.get(ti, (0, 0))[0]:
            best[ti] = (n, pi)
    for ti in range(1, len(t_sizes)):
        if ti in hit:
            continue
        n, pi = best.get(ti, (0, 0))
        if n < missed_below * t_sizes[ti]:
            fates["missed"] += 1
        elif truths_per_pred[pi] > 1:
            fates["merged"] += 1
        else:
            fates["partly"] += 1
    return fates


def weighted_f1(scores: dict[str, dict[str, dict[str, Any]]], weights: dict[str, float], level: str = "pixel") -> float:
    """Weighted mean over data sets of the mean ``level`` (pixel or object) F1 over classes.

    ``scores`` is ``{data set: {class: {level: Scores.as_dict()}}}``; sets absent are left out.
    """
    total = norm = 0.0
    for ds, w in weights.items():
        if ds in scores and w > 0:
            f1s = [c[level]["f1"] for c in scores[ds].values()]
            total += w * float(np.mean(f1s))
            norm += w
    return total / norm if norm else 0.0


def flag_scores(flags_gdf: gpd.GeoDataFrame, truth_gdf: gpd.GeoDataFrame, month: str) -> dict[str, Any]:
    """Object-level scores of a month's flags against the truth (``changes`` layer of the demo truth).

    Per kind and for both kinds pooled (``all``): one-to-one matches at IoU >= 0.5 (``iou50``) and
    matches where the flag covers the true object's centroid (``centroid``), via
    :func:`object_scores`.

    Args:
        flags_gdf: flags (``month``, ``kind``, geometry), as from :func:`pipeline.vectorize.vectorize_month`.
        truth_gdf: true changes (``month``, ``kind``, geometry).
        month: the month to score.

    Returns:
        ``{kind: {"iou50": Scores.as_dict(), "centroid": Scores.as_dict()}}`` for ``new``, ``removed``, ``all``.

    Raises:
        InputError: a table lacks ``month`` or ``kind``.
        CRSError: either table has no CRS.
    """
    from pyproj import CRS

    for name, table in (("flags", flags_gdf), ("truth", truth_gdf)):
        missing = {"month", "kind"} - set(table.columns)
        if missing:
            raise InputError(f"{name} table lacks columns {sorted(missing)!r}; pass the flags / 'changes' layer")
        if table.crs is None and len(table):
            raise CRSError(f"{name} table has no CRS; set it (set_crs) before scoring")
    truth = truth_gdf[truth_gdf["month"].astype(str) == month]
    if (
        len(truth)
        and flags_gdf.crs is not None
        and CRS.from_user_input(truth.crs) != CRS.from_user_input(flags_gdf.crs)
    ):
        log.info("reprojecting truth from %s to the flags CRS for scoring", truth.crs)
        truth = truth.to_crs(flags_gdf.crs)
    flags = flags_gdf[flags_gdf["month"].astype(str) == month]
    out: dict[str, Any] = {}
    totals: dict[str, Any] = {}
    for kind in FLAG_KINDS:
        pred = flags.geometry[flags["kind"] == kind]
        true = truth.geometry[truth["kind"] == kind]
        out[kind] = {}
        by_mode = {
            "iou50": object_scores(pred, true, iou_threshold=0.5, mode="iou"),
            "centroid": object_scores(pred, true, mode="centroid"),
        }
        for key, scores in by_mode.items():
            out[kind][key] = scores.as_dict()
            totals[key] = scores if key not in totals else totals[key] + scores
    out["all"] = {key: s.as_dict() for key, s in totals.items()}
    return out
