"""Pixel and object metrics for change maps, and the evaluation of a trained checkpoint.

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

from pipeline.errors import CRSError, CRSMismatchError

if TYPE_CHECKING:
    from pathlib import Path

    from shapely.geometry.base import BaseGeometry

    from pipeline.config import EvaluateSettings
    from pipeline.nets.checkpoint import ChangeModel


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
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_t: set[int] = set()
    used_p: set[int] = set()
    matches: list[tuple[int, int, float]] = []
    for iou, ti, pi in candidates:
        if ti in used_t or pi in used_p:
            continue
        used_t.add(ti)
        used_p.add(pi)
        matches.append((pi, ti, iou))
    return matches


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
    from scipy import ndimage

    p = np.asarray(pred) != 0
    t = np.asarray(truth) != 0
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"pred {p.shape!r} and truth {t.shape!r} must be 2-D masks of one shape")
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        p, t = p & v, t & v
    structure = np.ones((3, 3), dtype=bool)

    def _label(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lab, n = ndimage.label(mask, structure=structure)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes >= min_pixels
        keep[0] = False
        remap = np.zeros(n + 1, dtype=np.int64)
        remap[keep] = np.arange(1, int(keep.sum()) + 1)
        lab = remap[lab]
        return lab, np.bincount(lab.ravel(), minlength=int(keep.sum()) + 1)

    p_lab, p_sizes = _label(p)
    t_lab, t_sizes = _label(t)
    n_p, n_t = len(p_sizes) - 1, len(t_sizes) - 1
    both = (p_lab > 0) & (t_lab > 0)
    pairs, inter = np.unique(np.stack([t_lab[both], p_lab[both]]), axis=1, return_counts=True)
    candidates = []
    for (ti, pi), n in zip(pairs.T.tolist(), inter.tolist(), strict=True):
        iou = n / (t_sizes[ti] + p_sizes[pi] - n)
        if iou >= iou_threshold:
            candidates.append((iou, ti, pi))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_t: set[int] = set()
    used_p: set[int] = set()
    for _, ti, pi in candidates:
        if ti not in used_t and pi not in used_p:
            used_t.add(ti)
            used_p.add(pi)
    tp = len(used_t)
    return Scores.from_counts(tp, n_p - tp, n_t - tp)


# --------------------------------------------------------------------------- checkpoint evaluation

#: (data set, class) pairs scored, with the output channel of the class.
CLASSES = {"new": 0, "removed": 1}


@dataclass
class _Item:
    """One validation image pair: images uint8 (2, c, h, w), truth and valid bool (h, w), class."""

    dataset: str
    name: str
    images: np.ndarray
    truth: np.ndarray
    valid: np.ndarray
    cls: str
    swapped: bool = False  # images are [curr, prev] of the same pair as the unswapped item named ``name``


def validation_items(settings: EvaluateSettings) -> tuple[list[_Item], dict[str, Any]]:
    """Build every validation pair.

    Santa Rosa held-out clusters (removed: pre → post; new: post → pre), ``levir-dev`` (new) and
    demo-town pairs from the fixed ``demo_seed`` (new and removed).

    Returns:
        The items and a description of the sets (ids, counts, what was skipped).
    """
    from pipeline.datasets import demo_pairs, load_levir, load_santa_rosa, split_clusters

    items: list[_Item] = []
    santa_root = settings.data / "xbd-santa-rosa"
    _, val_ids = split_clusters(santa_root, settings.val_fraction, settings.split_seed)
    for tile in load_santa_rosa(santa_root, val_ids):
        items.append(_Item("santa-rosa", tile.id, np.stack([tile.pre, tile.post]), tile.change, tile.valid, "removed"))
        items.append(
            _Item("santa-rosa", tile.id, np.stack([tile.post, tile.pre]), tile.change, tile.valid, "new", True)
        )
    for name, images, label in load_levir(settings.data / "levir-dev"):
        items.append(_Item("levir-dev", name, images, label, np.ones_like(label), "new"))
    pairs = demo_pairs(settings.demo_pairs, settings.demo_seed, settings.demo_size)
    for i, (images, labels) in enumerate(pairs):
        valid = np.ones(labels.shape[1:], bool)
        for cls, k in CLASSES.items():
            items.append(_Item("demo-town", f"pair{i:02d}", np.asarray(images)[:, :3], labels[k] > 0, valid, cls))
    info = {
        "santa-rosa": {
            "held_out_tiles": val_ids,
            "split_seed": settings.split_seed,
            "val_fraction": settings.val_fraction,
        },
        "levir-dev": {"pairs": sum(1 for i in items if i.dataset == "levir-dev")},
        "demo-town": {
            "pairs": len(pairs),
            "seed": settings.demo_seed,
            "size": settings.demo_size,
            "available": bool(pairs),
        },
    }
    return items, info


def _pad16(images: np.ndarray) -> tuple[np.ndarray, int, int]:
    h, w = images.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        images = np.pad(images, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")
    return images, h, w


def _net_probabilities(model: ChangeModel, items: list[_Item]) -> list[np.ndarray]:
    """The class probability of each item; pairs are predicted once per direction.

    For a direction-symmetric network (``module.symmetric``, e.g. ScarNet) the swapped direction is the
    unswapped one with its two channels exchanged, so it is not predicted again.
    """
    symmetric = bool(getattr(model.module, "symmetric", False))
    cache: dict[tuple[str, str, bool], np.ndarray] = {}
    out = []
    for item in items:
        key = (item.dataset, item.name, item.swapped)
        twin = (item.dataset, item.name, not item.swapped)
        if key not in cache:
            if symmetric and twin in cache:
                cache[key] = cache[twin][::-1]
            else:
                padded, h, w = _pad16(item.images)
                x = padded[None].astype(np.float32) / 255.0
                cache[key] = model.predict(x)[0, :, :h, :w]
        out.append(cache[key][CLASSES[item.cls]])
    return out


def _cva_probability(item: _Item) -> np.ndarray:
    from pipeline.nets.cva import cva_probabilities

    return cva_probabilities(item.images, item.valid)[CLASSES[item.cls]]


def _scores_at(
    items: list[_Item],
    probs: list[np.ndarray],
    threshold: float,
    settings: EvaluateSettings,
    *,
    objects: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Pooled pixel and (unless ``objects`` is False) object scores per data set and class."""
    groups: dict[tuple[str, str], tuple[list[Scores], list[Scores]]] = {}
    for item, p in zip(items, probs, strict=True):
        pred = p >= threshold
        px = pixel_scores(pred, item.truth, item.valid)
        obj = (
            component_scores(
                pred, item.truth, item.valid, iou_threshold=settings.iou_threshold, min_pixels=settings.min_object_px
            )
            if objects
            else EMPTY
        )
        g = groups.setdefault((item.dataset, item.cls), ([], []))
        g[0].append(px)
        g[1].append(obj)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (ds, cls), (px_list, obj_list) in sorted(groups.items()):
        out.setdefault(ds, {})[cls] = {"pixel": pool(px_list).as_dict(), "object": pool(obj_list).as_dict()}
    return out


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


def flops_per_tile(model: ChangeModel, size: int = 512) -> float:
    """Floating-point operations (2 per multiply-add) of one forward pass on a ``size``² pair."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 2, model.in_channels, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.module.float()(x.to(model.device))
    return float(counter.get_total_flops())


def evaluate_model(checkpoint: str | Path, settings: EvaluateSettings) -> dict[str, Any]:
    """Score the CVA baseline, the trained baselines and ``checkpoint`` on every validation set.

    Each network's threshold is calibrated on the grid ``settings.thresholds`` by the weighted pixel F1
    (``settings.calibration_weights`` over data sets, classes averaged); CVA keeps its own Otsu decision
    (p >= 0.5). For the shipped checkpoint the object threshold (minimum mean probability of a flag) is
    calibrated too, by the weighted object F1 (:func:`pipeline.flagcheck.calibrate_objects`). With
    ``settings.calibrate`` both are written back into the shipped checkpoint.
    Writes ``settings.out`` (JSON) and, when ``settings.card`` exists, the metrics table into the card.

    Args:
        checkpoint: the shipped checkpoint.
        settings: the ``evaluate`` section of params.yaml.

    Returns:
        The metrics dict written to ``settings.out``: one entry per data set under ``"datasets"``, the
        per-method scores under ``"methods"``.

    Raises:
        ModelError: a checkpoint cannot be loaded.
        MissingInputError: the shared data is not at ``settings.data``.
    """
    import json
    from pathlib import Path

    import torch

    from pipeline.nets.checkpoint import ChangeModel, save_checkpoint

    checkpoint = Path(checkpoint)
    items, info = validation_items(settings)
    log.info("evaluating on %d validation pairs", len(items))
    methods: dict[str, dict[str, Any]] = {}

    probs = [_cva_probability(it) for it in items]
    methods["cva"] = {
        "kind": "change vector analysis + Otsu",
        "threshold": 0.5,
        "scores": _scores_at(items, probs, 0.5, settings),
    }
    del probs

    shipped: ChangeModel | None = None
    candidates = [(Path(p), False) for p in settings.baselines if Path(p) != checkpoint] + [(checkpoint, True)]
    for path, is_shipped in candidates:
        if not is_shipped and not path.is_file():
            log.warning("baseline %s not found; skipped (train it with python -m pipeline.train)", path)
            continue
        model = ChangeModel.load(path)
        name = "shipped" if is_shipped else model.arch
        probs = _net_probabilities(model, items)
        sweep = {}
        for t in settings.thresholds:
            sweep[t] = weighted_f1(_scores_at(items, probs, t, settings, objects=False), settings.calibration_weights)
        best_t = max(sweep, key=lambda t: (round(sweep[t], 6), -abs(t - 0.5)))
        methods[name] = {
            "kind": model.arch,
            "checkpoint": str(path),
            "parameters": sum(p.numel() for p in model.module.parameters()),
            "gflops_512": round(flops_per_tile(model) / 1e9, 2),
            "size_mb": round(path.stat().st_size / 2**20, 2),
            "steps": model.meta.get("steps"),
            "threshold": best_t,
            "calibration": {str(t): round(v, 4) for t, v in sweep.items()},
            "scores": _scores_at(items, probs, best_t, settings),
            "scores_at_0.5": _scores_at(items, probs, 0.5, settings),
        }
        if is_shipped:
            from pipeline.flagcheck import calibrate_objects

            shipped = model
            methods[name]["objects"] = calibrate_objects(items, probs, best_t, settings)
        del probs
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "datasets": info,
        "settings": json.loads(settings.model_dump_json()),
        "methods": methods,
        "bars": _bars(methods.get("shipped", {}).get("scores", {})),
        "shipped_beats_baselines": _beats(methods),
    }
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    log.info("wrote %s", out)
    if shipped is not None and settings.calibrate:
        meta = {
            **shipped.meta,
            "threshold": methods["shipped"]["threshold"],
            "calibration": methods["shipped"]["calibration"],
            "object_threshold": methods["shipped"]["objects"]["object_threshold"],
            "object_calibration": methods["shipped"]["objects"]["curve"],
        }
        with torch.no_grad():
            save_checkpoint(checkpoint, shipped.module.cpu(), shipped.arch, shipped.in_channels, shipped.kwargs, meta)
    if settings.card is not None and Path(settings.card).is_file():
        write_metrics_table(Path(settings.card), metrics)
    return metrics


BARS = {
    ("santa-rosa", "removed"): 0.80,
    ("levir-dev", "new"): 0.75,
    ("demo-town", "new"): 0.85,
    ("demo-town", "removed"): 0.85,
}


def _bars(scores: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for (ds, cls), bar in BARS.items():
        f1 = scores.get(ds, {}).get(cls, {}).get("pixel", {}).get("f1")
        out[f"{ds}/{cls}"] = {"bar": bar, "f1": f1, "met": None if f1 is None else f1 >= bar}
    return out


def _beats(methods: dict[str, Any]) -> dict[str, bool]:
    """Per data set: does the shipped net's mean pixel F1 beat every other method's?"""
    if "shipped" not in methods:
        return {}
    out = {}
    for ds, classes in methods["shipped"]["scores"].items():
        mine = float(np.mean([c["pixel"]["f1"] for c in classes.values()]))
        others = [
            float(np.mean([c["pixel"]["f1"] for c in m["scores"][ds].values()]))
            for name, m in methods.items()
            if name != "shipped" and ds in m["scores"]
        ]
        out[ds] = all(mine > o for o in others)
    return out


def metrics_table(metrics: dict[str, Any]) -> str:
    """The Markdown table of pixel P/R/F1/IoU and object F1 per method, data set and class."""
    lines = [
        "| data set | class | method | threshold | pixel P | pixel R | pixel F1 | pixel IoU | object F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    methods = metrics["methods"]
    sets = sorted({(ds, cls) for m in methods.values() for ds, c in m["scores"].items() for cls in c})
    for ds, cls in sets:
        for name, m in methods.items():
            s = m["scores"].get(ds, {}).get(cls)
            if s is None:
                continue
            px, ob = s["pixel"], s["object"]
            label = f"**{name}**" if name == "shipped" else name
            lines.append(
                f"| {ds} | {cls} | {label} | {m['threshold']:.2f} | {px['precision']:.3f} | {px['recall']:.3f} | "
                f"{px['f1']:.3f} | {px['iou']:.3f} | {ob['f1']:.3f} |"
            )
    return "\n".join(lines)


START, END = "<!-- metrics:start -->", "<!-- metrics:end -->"


def write_metrics_table(card: Path, metrics: dict[str, Any]) -> None:
    """Replace the text between the metrics markers of a model card with the current table."""
    text = card.read_text(encoding="utf-8")
    if START not in text or END not in text:
        log.warning("%s has no %s ... %s markers; metrics table not written", card, START, END)
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    card.write_text(f"{head}{START}\n{metrics_table(metrics)}\n{END}{tail}", encoding="utf-8")
    log.info("wrote the metrics table into %s", card)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m pipeline.evaluate --model models/scarnet.pt`` (as ``scarwatch evaluate``)."""
    import argparse
    from pathlib import Path

    from pipeline.config import load_settings

    parser = argparse.ArgumentParser(description="Score a checkpoint and the baselines on the validation sets.")
    parser.add_argument("--params", default="params.yaml", help="the parameters file")
    parser.add_argument("--model", default=None, help="checkpoint to score (default: detect.model)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for inference")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    metrics = evaluate_model(Path(args.model or settings.detect.model), settings.evaluate)
    log.info("shipped threshold %s; bars %r", metrics["methods"]["shipped"]["threshold"], metrics["bars"])


if __name__ == "__main__":  # pragma: no cover
    main()
