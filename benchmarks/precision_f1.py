"""The calibrated F1 of one checkpoint at two inference precisions, side by side (issue 15).

``scarwatch evaluate`` runs at ``detect.precision``, so two runs of it on the same checkpoint (same
calibrated thresholds) differ only in precision; this prints their per-set pixel and object F1 and the
flag-level object F1 as a Markdown table, for the model card. Usage::

    scarwatch --set detect.precision=fp32 --set evaluate.out=/tmp/fp32.json evaluate --model COPY.pt --no-flag-check
    scarwatch --set detect.precision=bf16 --set evaluate.out=/tmp/bf16.json evaluate --model COPY.pt --no-flag-check
    python benchmarks/precision_f1.py /tmp/fp32.json /tmp/bf16.json

(evaluate a copy of ``models/scarnet.pt``: evaluating the shipped path rewrites the card's table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def table(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Markdown rows: set, class, pixel F1 at a and b, their difference, object F1 and flag F1 at both."""
    sa, sb = a["methods"]["shipped"], b["methods"]["shipped"]
    pa, pb = sa.get("precision", "?"), sb.get("precision", "?")
    rows = [
        f"| set | class | pixel F1 {pa} | pixel F1 {pb} | Δ | object F1 {pa} / {pb} | flag F1 {pa} / {pb} |",
        "|---|---|---|---|---|---|---|",
    ]
    flags_a = sa.get("objects", {}).get("scores", {})
    flags_b = sb.get("objects", {}).get("scores", {})
    for ds, classes in sa["scores"].items():
        for cls, s in classes.items():
            t = sb["scores"][ds][cls]
            fa, fb = s["pixel"]["f1"], t["pixel"]["f1"]
            fl = (flags_a.get(ds, {}).get(cls, {}).get("f1"), flags_b.get(ds, {}).get(cls, {}).get("f1"))
            flag = "n/a" if None in fl else f"{fl[0]:.3f} / {fl[1]:.3f}"
            rows.append(
                f"| {ds} | {cls} | {fa:.4f} | {fb:.4f} | {fb - fa:+.4f} | "
                f"{s['object']['f1']:.3f} / {t['object']['f1']:.3f} | {flag} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the table for two metrics JSONs of the same checkpoint; exit 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="metrics JSON of the first precision (scarwatch evaluate)")
    p.add_argument("b", type=Path, help="metrics JSON of the second precision")
    args = p.parse_args(argv)
    a, b = (json.loads(path.read_text()) for path in (args.a, args.b))
    if a["methods"]["shipped"]["threshold"] != b["methods"]["shipped"]["threshold"]:
        raise SystemExit(f"{args.b}: scored at another threshold than {args.a}; evaluate the same checkpoint twice")
    print("\n".join(table(a, b)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
