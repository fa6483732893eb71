"""Evaluate a trained checkpoint and the baselines on every validation set; write the metrics once.

:func:`evaluate_model` reads checkpoints and never rewrites them: each network is scored at the
thresholds that :mod:`pipeline.model.calibrate` wrote into its checkpoint (CVA at its own Otsu
decision). :func:`write_metrics` then writes ``models/metrics.json`` and the model card's table, each
atomically, from that one result.

Validation sets (never trained on):

* ``santa-rosa``: the held-out Santa Rosa clusters, full tiles; *removed* read pre → post, *new* read
  post → pre.
* ``levir-dev``: the four LEVIR-CD pairs (*new*).
* ``whu-cd``: the WHU-CD validation tiling (``lgpnet_*``, *new*), resampled from 0.3 m to 0.5 m.
* ``demo-town``: demo-town pairs from the fixed ``evaluate.demo_seed`` (*new* and *removed*).
* ``<set>@2x`` for the three real sets: the same pairs as a sensor with twice the pixel size delivers
  them, resampled back to 0.5 m as detect resamples a coarse delivery.
* ``urban-2m``: general urban change at 2 m pixels, the WHU-CD validation pairs (*new*) and the Santa
  Rosa held-out tiles (*removed*) coarsened to 2 m and resampled back: the GF-1/GF-2 case, where CVA is
  the training-free alternative to beat.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.fileio import atomic_path
from pipeline.metrics import EMPTY, Scores, component_scores, label_scores, object_fates, pixel_scores, pool

if TYPE_CHECKING:
    from pipeline.config import EvaluateSettings, Settings, VectorizeSettings
    from pipeline.nets.checkpoint import ChangeModel


log = logging.getLogger(__name__)

#: Classes scored, with their output channel.
CLASSES = {"new": 0, "removed": 1}
#: The real sets that are scored again at twice their pixel size (``<set>@2x``).
COARSE_SETS = ("santa-rosa", "levir-dev", "whu-cd")
#: Pixel size (m) of the general urban change case ``urban-2m``.
URBAN_GSD_M = 2.0


@dataclass
class Item:
    """One validation image pair.

    Attributes:
        dataset: the validation set it belongs to.
        name: the pair's name within the set (one name per physical pair and pixel size).
        images: uint8 (2, c, h, w) as [earlier, later] for this item's reading.
        truth: bool (h, w), the change of class ``cls``.
        valid: bool (h, w).
        cls: ``"new"`` or ``"removed"``.
        swapped: the images are the unswapped item's epochs in reverse order (for symmetric networks the
            prediction is reused).
    """

    dataset: str
    name: str
    images: np.ndarray
    truth: np.ndarray
    valid: np.ndarray
    cls: str
    swapped: bool = False


def _coarse(items: list[Item], dataset: str, factor: float) -> list[Item]:
    """``items`` as a ``factor`` times coarser sensor delivers them, resampled back to the native pixel."""
    from pipeline.model.data import coarsen

    out: list[Item] = []
    done: dict[str, np.ndarray] = {}
    for it in items:
        if it.swapped and it.name in done:  # the same two images in the other order
            images = done[it.name][::-1]
        else:
            images = np.stack([coarsen(im, factor) for im in it.images])
            done[it.name] = images
        out.append(Item(dataset, it.name, images, it.truth, it.valid, it.cls, it.swapped))
    return out


def validation_items(settings: Settings, *, coarse: bool = True) -> tuple[list[Item], dict[str, Any]]:
    """Build every validation pair (see the module docstring).

    Args:
        settings: all settings (``paths.shared``; the Santa Rosa split is ``train.val_fraction`` and
            ``train.split_seed``, the same as training used; ``evaluate.demo_*``).
        coarse: add the ``@2x`` and ``urban-2m`` sets.

    Returns:
        The items and a description of the sets.
    """
    from pipeline.model.data import (
        NATIVE_GSD_M,
        demo_pairs,
        load_png_pairs,
        load_santa_rosa,
        split_clusters,
        whu_split,
    )

    ev, data = settings.evaluate, settings.paths.shared
    by_set: dict[str, list[Item]] = {}
    santa_root = data / "xbd-santa-rosa"
    _, val_ids = split_clusters(santa_root, settings.train.val_fraction, settings.train.split_seed)
    santa = by_set.setdefault("santa-rosa", [])
    for tile in load_santa_rosa(santa_root, val_ids):
        santa.append(Item("santa-rosa", tile.id, np.stack([tile.pre, tile.post]), tile.change, tile.valid, "removed"))
        santa.append(Item("santa-rosa", tile.id, np.stack([tile.post, tile.pre]), tile.change, tile.valid, "new", True))
    by_set["levir-dev"] = [
        Item("levir-dev", p.name, p.images, p.change, p.valid, "new") for p in load_png_pairs(data / "levir-dev", "new")
    ]
    _, whu_val = whu_split(data / "whu-cd")
    by_set["whu-cd"] = [
        Item("whu-cd", p.name, p.images, p.change, p.valid, "new")
        for p in load_png_pairs(data / "whu-cd", "new", names=whu_val)
    ]
    demo = by_set.setdefault("demo-town", [])
    pairs = demo_pairs(ev.demo_pairs, ev.demo_seed, ev.demo_size)
    for i, (images, labels) in enumerate(pairs):
        valid = np.ones(labels.shape[1:], bool)
        for cls, k in CLASSES.items():
            demo.append(Item("demo-town", f"pair{i:02d}", np.asarray(images)[:, :3], labels[k] > 0, valid, cls))
    if coarse:
        for name in COARSE_SETS:
            by_set[f"{name}@2x"] = _coarse(by_set[name], f"{name}@2x", 2.0)
        factor = URBAN_GSD_M / NATIVE_GSD_M
        urban = [it for it in by_set["whu-cd"]] + [it for it in by_set["santa-rosa"] if it.cls == "removed"]
        by_set["urban-2m"] = _coarse(urban, "urban-2m", factor)
    items = [it for group in by_set.values() for it in group]
    info: dict[str, Any] = {name: {"pairs": len({it.name for it in group})} for name, group in by_set.items()}
    info["santa-rosa"].update(
        held_out_tiles=val_ids, split_seed=settings.train.split_seed, val_fraction=settings.train.val_fraction
    )
    info["whu-cd"].update(names=whu_val, resampled_from_m=0.3)
    info["demo-town"].update(seed=ev.demo_seed, size=ev.demo_size)
    if coarse:
        info["urban-2m"].update(gsd_m=URBAN_GSD_M, sets=["whu-cd (new)", "santa-rosa (removed)"])
    return items, info


def net_probabilities(model: ChangeModel, items: list[Item]) -> list[np.ndarray]:
    """The class probability of each item; pairs are predicted once per direction.

    For a direction-symmetric network (``module.symmetric``, e.g. ScarNet) the swapped direction is the
    unswapped one with its two channels exchanged, so it is not predicted again, as detect predicts both
    directions from one forward. Pixels outside ``item.valid`` are given the later epoch's value in both,
    as detect gives them (:func:`pipeline.nets.blocks.unchanged_where_invalid`), so that what is calibrated
    and scored here is what detect computes.
    """
    from pipeline.nets.blocks import pad_to_multiple, unchanged_where_invalid

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
                h, w = item.images.shape[-2:]
                images = unchanged_where_invalid(np.array(item.images), item.valid)
                x = pad_to_multiple(images)[None].astype(np.float32) / 255.0
                cache[key] = model.predict(x)[0, :, :h, :w]
        out.append(cache[key][CLASSES[item.cls]])
    return out


def cva_probability(item: Item) -> np.ndarray:
    """The CVA baseline's probability of ``item``'s class (statistics fitted on the pair itself)."""
    from pipeline.nets.cva import cva_probabilities

    return cva_probabilities(item.images, item.valid)[CLASSES[item.cls]]


def scores_at(
    items: list[Item],
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


def fates_at(
    items: list[Item], probs: list[np.ndarray], threshold: float, settings: EvaluateSettings
) -> dict[str, dict[str, dict[str, int]]]:
    """Per data set and class, what became of the true objects at ``threshold`` (:func:`object_fates`)."""
    return _pooled_fates(items, [p >= threshold for p in probs], settings, labelled=False)


def _pooled_fates(
    items: list[Item], preds: list[np.ndarray], settings: EvaluateSettings, *, labelled: bool
) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    for item, pred in zip(items, preds, strict=True):
        got = object_fates(
            pred,
            item.truth,
            item.valid,
            iou_threshold=settings.iou_threshold,
            min_pixels=settings.min_object_px,
            labelled=labelled,
        )
        acc = out.setdefault(item.dataset, {}).setdefault(item.cls, dict.fromkeys(got, 0))
        for k, v in got.items():
            acc[k] += v
    return {ds: dict(sorted(cl.items())) for ds, cl in sorted(out.items())}


@dataclass
class Objects:
    """Seeded objects of one probability map: labels (h, w) as vectorize builds them and each label's mean p."""

    labels: np.ndarray
    means: np.ndarray  # index 0 (background) unused

    def kept(self, min_mean: float) -> np.ndarray:
        """The labels of the objects whose mean probability is at least ``min_mean`` (others set to 0)."""
        keep = self.means >= min_mean
        keep[0] = False
        return np.where(keep[self.labels], self.labels, 0)

    def mask(self, min_mean: float) -> np.ndarray:
        """The pixels of the objects whose mean probability is at least ``min_mean``."""
        return self.kept(min_mean) > 0


def seeded_objects(
    p: np.ndarray,
    seed: float,
    low: float,
    valid: np.ndarray | None = None,
    vectorize: VectorizeSettings | None = None,
) -> Objects:
    """Objects as vectorize builds them: hysteresis at (``low``, ``seed``), 3x3 opening and closing, cut at necks.

    Args:
        p: probabilities (h, w) in [0, 1].
        seed: seed threshold (the calibrated pixel threshold).
        low: grow threshold (capped at ``seed``).
        valid: pixels outside it count as p = 0.
        vectorize: the other vectorize settings (the cutting of blobs, ``split*``); default their defaults.

    Returns:
        The labelled objects with their mean probabilities.
    """
    from pipeline.config import VectorizeSettings
    from pipeline.vectorize import clean_mask, gate_means, label_objects, split_objects

    p = np.asarray(p, dtype=np.float32)
    if valid is not None:
        p = np.where(valid, p, 0.0).astype(np.float32)
    settings = (vectorize or VectorizeSettings.model_validate({})).model_copy(
        update={"high": seed, "low": min(low, seed)}
    )
    labels, sums, counts = label_objects(clean_mask(p, settings), p)
    cut, pieces = split_objects(labels, settings)
    # a piece is kept or dropped with the whole object it was cut from, as vectorize does
    return Objects(cut, gate_means(sums / np.maximum(counts, 1), int(cut.max()), pieces))


def flag_object_scores(
    items: list[Item],
    probs: list[np.ndarray],
    seed: float,
    low: float,
    object_thresholds: tuple[float, ...],
    settings: EvaluateSettings,
    vectorize: VectorizeSettings | None = None,
    *,
    fates_out: dict[str, Any] | None = None,
) -> dict[float, dict[str, dict[str, Scores]]]:
    """Object scores of flag-like objects (seeded, grown, cleaned, cut, kept by mean p) per threshold, set, class.

    With ``fates_out`` (a dict), it also receives the true objects' fates (:func:`object_fates`) at the
    last object threshold, per set and class.
    """
    per_t: dict[float, dict[str, dict[str, list[Scores]]]] = {t: {} for t in object_thresholds}
    kept_last: list[np.ndarray] = []
    for item, p in zip(items, probs, strict=True):
        objs = seeded_objects(p, seed, low, item.valid, vectorize)
        for t in object_thresholds:
            kept = objs.kept(t)
            s = label_scores(
                kept,
                item.truth,
                item.valid,
                iou_threshold=settings.iou_threshold,
                min_pixels=settings.min_object_px,
            )
            per_t[t].setdefault(item.dataset, {}).setdefault(item.cls, []).append(s)
        if fates_out is not None:
            kept_last.append(kept)  # the last threshold's
    if fates_out is not None:
        fates_out.update(_pooled_fates(items, kept_last, settings, labelled=True))
    return {
        t: {ds: {cls: pool(v) for cls, v in sorted(classes.items())} for ds, classes in sorted(groups.items())}
        for t, groups in per_t.items()
    }


def flops_per_tile(model: ChangeModel, size: int = 512) -> float:
    """Floating-point operations (2 per multiply-add) of one forward pass on a ``size``² pair."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 2, model.in_channels, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.module.float()(x.to(model.device))
    return float(counter.get_total_flops())


def _network_entry(
    model: ChangeModel, path: Path, items: list[Item], settings: Settings, *, shipped: bool
) -> dict[str, Any]:
    from pipeline.nets.device import precision_label

    ev = settings.evaluate
    probs = net_probabilities(model, items)
    t = model.threshold
    entry: dict[str, Any] = {
        "kind": model.arch,
        "checkpoint": str(path),
        "parameters": sum(p.numel() for p in model.module.parameters()),
        "gflops_512": round(flops_per_tile(model) / 1e9, 2),
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "steps": model.meta.get("steps"),
        "native_gsd_m": model.meta.get("native_gsd_m"),
        "threshold": t,
        "precision": precision_label(model.device, model.precision),
        "calibrated": "calibration" in model.meta,
        "calibration": model.meta.get("calibration"),
        "scores": scores_at(items, probs, t, ev),
        "scores_at_0.5": scores_at(items, probs, 0.5, ev, objects=False),
        "object_fates": fates_at(items, probs, t, ev),
    }
    if shipped and model.object_threshold is not None:
        ot = model.object_threshold
        fates: dict[str, Any] = {}
        flags = flag_object_scores(
            items, probs, t, settings.vectorize.low, (0.0, ot), ev, settings.vectorize, fates_out=fates
        )
        entry["objects"] = {
            "object_threshold": ot,
            "seed": t,
            "low": min(settings.vectorize.low, t),
            "curve": model.meta.get("object_calibration"),
            "scores": {ds: {c: s.as_dict() for c, s in cl.items()} for ds, cl in flags[ot].items()},
            "scores_without_object_threshold": {
                ds: {c: s.as_dict() for c, s in cl.items()} for ds, cl in flags[0.0].items()
            },
            "fates": fates,
        }
    return entry


def evaluate_model(checkpoint: str | Path, settings: Settings, *, flag_check: bool | None = None) -> dict[str, Any]:
    """Score CVA, the trained baselines and ``checkpoint`` on every validation set (reads only).

    Args:
        checkpoint: the shipped checkpoint (or a candidate).
        settings: all settings (``evaluate`` section, ``paths.shared``, the split from ``train``, and the
            monthly stages' settings for the flag check).
        flag_check: run the Santa Rosa flag check through the real pipeline (default
            ``evaluate.flag_check``).

    Returns:
        The metrics: ``checkpoint``, ``datasets``, ``settings``, ``methods`` (per-method scores),
        ``bars`` (the targets), ``shipped_beats_baselines`` and, with the flag check, ``flags``.

    Raises:
        ModelError: a checkpoint cannot be loaded.
        MissingInputError: the shared data is not at ``paths.shared``.
    """
    from pipeline.nets.checkpoint import ChangeModel

    checkpoint = Path(checkpoint)
    ev = settings.evaluate
    items, info = validation_items(settings)
    log.info("evaluating on %d validation items", len(items))
    methods: dict[str, dict[str, Any]] = {}
    probs = [cva_probability(it) for it in items]
    methods["cva"] = {
        "kind": "change vector analysis + Otsu",
        "threshold": 0.5,
        "scores": scores_at(items, probs, 0.5, ev),
        "object_fates": fates_at(items, probs, 0.5, ev),
    }
    del probs
    candidates = [(Path(p), False) for p in ev.baselines if Path(p) != checkpoint] + [(checkpoint, True)]
    for path, is_shipped in candidates:
        if not is_shipped and not path.is_file():
            log.warning("baseline %s not found; skipped (train it with scarwatch train --arch)", path)
            continue
        model = ChangeModel.load(path, precision=settings.detect.precision)
        methods["shipped" if is_shipped else model.arch] = _network_entry(
            model, path, items, settings, shipped=is_shipped
        )
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "datasets": info,
        "settings": json.loads(ev.model_dump_json()),
        "methods": methods,
        "bars": bars(methods.get("shipped", {}).get("scores", {})),
        "shipped_beats_baselines": beats(methods),
    }
    if ev.flag_check if flag_check is None else flag_check:
        from pipeline.model.fieldcheck import santa_rosa_flag_check

        metrics["flags"] = {"santa-rosa": santa_rosa_flag_check(settings, checkpoint)}
    return metrics


#: The targets of the shipped network: pixel F1 per (data set, class) at its calibrated threshold.
BARS = {
    ("levir-dev", "new"): 0.75,
    ("whu-cd", "new"): 0.80,
    ("santa-rosa", "removed"): 0.75,
    ("demo-town", "new"): 0.85,
    ("demo-town", "removed"): 0.85,
}


def bars(scores: dict[str, Any]) -> dict[str, Any]:
    """Each target of :data:`BARS` with the shipped net's pixel F1 and whether it is met."""
    out = {}
    for (ds, cls), bar in BARS.items():
        f1 = scores.get(ds, {}).get(cls, {}).get("pixel", {}).get("f1")
        out[f"{ds}/{cls}"] = {"bar": bar, "f1": f1, "met": None if f1 is None else f1 >= bar}
    return out


def beats(methods: dict[str, Any]) -> dict[str, Any]:
    """Per data set: the shipped net's mean pixel F1 (over classes), the best other method's, and the margin."""
    if "shipped" not in methods:
        return {}
    out: dict[str, Any] = {}
    for ds, classes in methods["shipped"]["scores"].items():
        mine = float(np.mean([c["pixel"]["f1"] for c in classes.values()]))
        others = {
            name: float(np.mean([c["pixel"]["f1"] for c in m["scores"][ds].values()]))
            for name, m in methods.items()
            if name != "shipped" and ds in m["scores"]
        }
        best = max(others, key=lambda k: others[k]) if others else None
        out[ds] = {
            "beats_all": all(mine > o for o in others.values()),
            "f1": round(mine, 4),
            "best_other": best,
            "margin": None if best is None else round(mine - others[best], 4),
        }
    return out


def metrics_table(metrics: dict[str, Any]) -> str:
    """The Markdown table of pixel P/R/F1/IoU, object F1 and the true objects' fates per method, set and class."""
    lines = [
        "| data set | class | method | threshold | pixel P | pixel R | pixel F1 | pixel IoU | object F1 "
        "| objects hit / merged / partly / missed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    methods = metrics["methods"]
    order = list(metrics.get("datasets", {}))
    sets = sorted(
        {(ds, cls) for m in methods.values() for ds, c in m["scores"].items() for cls in c},
        key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[0], k[1]),
    )
    for ds, cls in sets:
        for name, m in methods.items():
            s = m["scores"].get(ds, {}).get(cls)
            if s is None:
                continue
            px, ob = s["pixel"], s["object"]
            label = f"**{name}**" if name == "shipped" else name
            fates = m.get("object_fates", {}).get(ds, {}).get(cls)
            fate = " / ".join(str(v) for v in fates.values()) if fates else ""
            lines.append(
                f"| {ds} | {cls} | {label} | {m['threshold']:.2f} | {px['precision']:.3f} | {px['recall']:.3f} | "
                f"{px['f1']:.3f} | {px['iou']:.3f} | {ob['f1']:.3f} | {fate} |"
            )
    return "\n".join(lines)


START, END = "<!-- metrics:start -->", "<!-- metrics:end -->"


def write_metrics(metrics: dict[str, Any], out: Path, card: Path | None = None) -> None:
    """Write the metrics JSON and (when ``card`` exists and has the markers) the card's table, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    log.info("wrote %s", out)
    if card is None or not Path(card).is_file():
        return
    text = Path(card).read_text(encoding="utf-8")
    if START not in text or END not in text:
        log.warning("%s has no %s ... %s markers; metrics table not written", card, START, END)
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with atomic_path(Path(card)) as tmp:
        tmp.write_text(f"{head}{START}\n{metrics_table(metrics)}\n{END}{tail}", encoding="utf-8")
    log.info("wrote the metrics table into %s", card)
