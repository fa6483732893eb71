"""Choose vectorize's cutting of merged blobs (``vectorize.split*``) on the training side only (issue 9).

Scores a grid of rules on the flag-like objects of the *training* pairs: the WHU-CD training tiling
(``ucdscm_*``), 16 Santa Rosa training tiles (every ``n // 16``-th of the training clusters' tiles) and
24 demo-town pairs of seed 4242 (the validation pairs use seed 777), as evaluate scores flags (seeded at
the checkpoint's pixel threshold, grown, cleaned, cut, kept by the object threshold;
``pipeline.model.evaluate.flag_object_scores``). The score is the mean F1 over WHU-CD, Santa Rosa
*removed*, demo *new* and demo *removed*. The validation sets are not read unless ``--validation`` is
given, which prints the best rule's validation scores once, after the choice.

The shipped rule (keep-fill 0.7, h = max(3 px, 0.2 x the largest distance)) was chosen on 2026-12-04 in
two steps, at the object threshold the checkpoint then carried (0.70): keep-fill 0.6-0.8 x h 0.2-0.5,
then h 0.1-0.2 and keep-fill 0.65-0.75 around the best, taking 0.2 over 0.15 (+0.002) as the middle
of the plateau (0.1 drops WHU-CD to 0.748). This script's full grid, run afterwards, ranks at 0.70:
(0.8, 0.15, 3 px) 0.813, (0.7, 0.15, 3 px) 0.811, the shipped (0.7, 0.2, 3 px) 0.809, uncut 0.749; at
the recalibrated 0.80: 0.821, 0.818, 0.816, uncut 0.755. Differences of 0.004 are a few objects of 16
tiles and 3 pairs; a new choice would be made here again, on the training side.

Usage (about 3 min for the probabilities and 2-4 min for the grid on 1 CPU thread)::

    PYTHONPATH=. .venv/bin/python scripts/choose_split_rule.py [--model models/scarnet.pt]
        [--object-threshold 0.7] [--validation]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from pipeline.config import VectorizeSettings, load_settings
from pipeline.model import evaluate as ev
from pipeline.model.data import demo_pairs, load_png_pairs, load_santa_rosa, split_clusters, whu_split
from pipeline.nets.checkpoint import ChangeModel

KEEP_FILL = (0.6, 0.7, 0.8)
H_REL = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
H_PX = (2.0, 3.0, 4.0)
SCORED = (("T:whu", "new"), ("T:santa", "removed"), ("T:demo", "new"), ("T:demo", "removed"))


def training_items(settings_path: Path) -> list[ev.Item]:
    """The training-side pairs of the module docstring, as evaluate items."""
    s = load_settings(settings_path)
    data = s.paths.shared
    whu_train, _ = whu_split(data / "whu-cd")
    items = [
        ev.Item("T:whu", p.name, p.images, p.change, p.valid, "new")
        for p in load_png_pairs(data / "whu-cd", "new", names=whu_train)
    ]
    train_ids, _ = split_clusters(data / "xbd-santa-rosa", s.train.val_fraction, s.train.split_seed)
    for tile in load_santa_rosa(data / "xbd-santa-rosa", train_ids[:: max(1, len(train_ids) // 16)][:16]):
        items.append(ev.Item("T:santa", tile.id, np.stack([tile.pre, tile.post]), tile.change, tile.valid, "removed"))
    for i, (images, labels) in enumerate(demo_pairs(24, 4242, 256)):
        valid = np.ones(labels.shape[1:], bool)
        for cls, k in ev.CLASSES.items():
            items.append(ev.Item("T:demo", f"p{i}", np.asarray(images)[:, :3], labels[k] > 0, valid, cls))
    return items


def main() -> None:
    """Score the grid on the training side; print the ten best rules (and, asked, the best one's validation)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", type=Path, default=Path("models/scarnet.pt"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--validation", action="store_true", help="print the chosen rule's validation scores")
    p.add_argument("--object-threshold", type=float, default=None, help="default: the checkpoint's")
    args = p.parse_args()
    torch.set_num_threads(1)
    settings = load_settings(args.params)
    model = ChangeModel.load(args.model, precision=settings.detect.precision)
    assert model.object_threshold is not None, f"{args.model}: calibrate it first (scarwatch calibrate)"
    ot = model.object_threshold if args.object_threshold is None else args.object_threshold
    seed, low = model.threshold, settings.vectorize.low
    items = training_items(args.params)
    probs = ev.net_probabilities(model, items)
    base = settings.vectorize

    def score(vec: VectorizeSettings, its: list[ev.Item], prs: list[np.ndarray]) -> dict[tuple[str, str], float]:
        got = ev.flag_object_scores(its, prs, seed, low, (ot,), settings.evaluate, vec)[ot]
        return {(ds, cls): s.f1 for ds, cl in got.items() for cls, s in cl.items()}

    uncut = score(base.model_copy(update={"split": False}), items, probs)
    print(
        f"uncut: mean {np.mean([uncut[k] for k in SCORED]):.4f}",
        {f"{d}/{c}": round(uncut[(d, c)], 3) for d, c in SCORED},
    )
    results = []
    for kf, hr, hp in itertools.product(KEEP_FILL, H_REL, H_PX):
        rule = {"split": True, "split_keep_fill": kf, "split_h_rel": hr, "split_h_px": hp}
        got = score(base.model_copy(update=rule), items, probs)
        results.append((float(np.mean([got[k] for k in SCORED])), kf, hr, hp, got))
    results.sort(key=lambda r: -r[0])
    for mean, kf, hr, hp, got in results[:10]:
        print(
            f"keep_fill {kf} h_rel {hr} h_px {hp}: mean {mean:.4f}",
            {f"{d}/{c}": round(got[(d, c)], 3) for d, c in SCORED},
        )
    if args.validation:
        _, kf, hr, hp, _ = results[0]
        val, _ = ev.validation_items(settings, coarse=False)
        vprobs = ev.net_probabilities(model, val)
        chosen = base.model_copy(update={"split": True, "split_keep_fill": kf, "split_h_rel": hr, "split_h_px": hp})
        for name, vec in (("uncut", base.model_copy(update={"split": False})), ("chosen", chosen)):
            print(name, {f"{d}/{c}": round(f, 3) for (d, c), f in sorted(score(vec, val, vprobs).items())})


if __name__ == "__main__":
    main()
