"""Render page 1 of a monthly report's PDF to docs/report_page1.png (the README's picture) and time the report.

Builds the report of the test fixture (tests/maps_report_data.py: a tiny ledger, flags, layers and a fake
aligned pair) with the real code, HTML + PDF + Markdown, then runs ``pdftoppm`` on page 1. Usage:
``PYTHONPATH=. python scripts/report_page1.py [--out docs/report_page1.png] [--dpi 80]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    """Build the fixture's report, print how long it took, write page 1 as PNG."""
    from maps_report_data import MONTH, FakePair, fake_open, write_inputs

    from pipeline.config import ReportSettings
    from pipeline.pair import AlignedPair
    from pipeline.publish.report import build_report

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report_page1.png")
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_inputs(root)
        qa = {
            "month": MONTH,
            "prev": "2026-02",
            "shift_applied_px": [0.5, -0.25],
            "valid_fraction": 0.98,
            "res": 0.5,
            "delivery_res": {"prev": 0.5, "curr": 0.8},
            "coregister": True,
            "residual_before_median_px": 1.8,
            "residual_after_median_px": 0.2,
            "blocks_measured": 48,
        }
        (root / "qa.json").write_text(json.dumps(qa), encoding="utf-8")
        pair = FakePair()
        AlignedPair.open = classmethod(lambda cls, path: fake_open(pair))  # type: ignore[method-assign,assignment]
        start = time.perf_counter()
        build_report(
            MONTH,
            paths["ledger"],
            paths["flags"],
            root / "monthly",
            settings=ReportSettings(),
            qa_path=root / "qa.json",
            layers_dir=paths["layers"],
            pair_dir=root,
            model_path=ROOT / "models" / "scarnet.pt",
            model_metrics_path=ROOT / "models" / "metrics.json",
            params_path=ROOT / "params.yaml",
        )
        took = time.perf_counter() - start
        pdf = root / "monthly" / f"{MONTH}.pdf"
        prefix = root / "page"
        subprocess.run(
            ["pdftoppm", "-f", "1", "-l", "1", "-r", str(args.dpi), "-png", "-singlefile", str(pdf), str(prefix)],
            check=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(prefix.with_suffix(".png").read_bytes())
    print(f"report (HTML + PDF + Markdown) in {took:.1f} s; page 1 -> {args.out}")


if __name__ == "__main__":
    main()
