"""Quality and reproducibility of a month, as the report states them in words and numbers.

:func:`imagery_quality` reads the aligned pair's ``pair.json`` and ``qa.json`` (keys of
:mod:`pipeline.formats`) into plain facts: the epochs and their sheets, valid coverage, the delivered vs
the grid pixel, the co-registration shift and residuals, and the ``usable`` verdict when align wrote one.
:func:`model_card` names the checkpoint (arch, SHA-256, thresholds) and its validation scores from
``models/metrics.json``; :func:`code_version` is ``git describe``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.formats import PAIR_JSON, QA_BLOCK_AFTER, QA_BLOCKS, QA_USABLE, read_checkpoint

log = logging.getLogger(__name__)

"""The qa.json key of the month's fitness verdict (``{"ok", "reasons", "cloud_fraction", "textured_fraction"}``)."""


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def imagery_quality(qa: Mapping[str, Any] | None, pair_dir: Path | None) -> dict[str, Any]:
    """The month's imagery facts (every value may be None where the file does not hold it).

    Returns:
        ``epochs`` ([{role, month, sheets: [names]}]), ``valid_fraction``, ``res_m`` (grid pixel),
        ``delivery_res_m`` ({prev, curr}), ``coregister``, ``shift_px`` ([dx, dy]), ``residual_before_px``,
        ``residual_after_px`` (medians), ``residual_max_px``, ``blocks_measured``, ``blocks``, ``usable``
        (None, or ``{"ok", "reasons", "cloud_fraction", "textured_fraction"}``).
    """
    qa = qa or {}
    meta: dict[str, Any] = {}
    if pair_dir is not None and (Path(pair_dir) / PAIR_JSON).is_file():
        meta = json.loads((Path(pair_dir) / PAIR_JSON).read_text(encoding="utf-8"))
    epochs = []
    for role, month in (("prev", qa.get("prev")), ("curr", qa.get("month"))):
        sheets = ((meta.get("epochs") or {}).get(role) or {}).get("sheets") or []
        epochs.append({"role": role, "month": month, "sheets": [Path(str(s.get("path", ""))).name for s in sheets]})
    blocks = [b for b in qa.get(QA_BLOCKS) or [] if isinstance(b, Mapping)]
    after = [b[QA_BLOCK_AFTER] for b in blocks if isinstance(b.get(QA_BLOCK_AFTER), list | tuple)]
    shift = qa.get("shift_applied_px")
    delivery: Mapping[str, Any] = qa["delivery_res"] if isinstance(qa.get("delivery_res"), Mapping) else {}
    usable = qa.get(QA_USABLE)
    return {
        "epochs": epochs,
        "valid_fraction": _num(qa.get("valid_fraction")),
        "res_m": _num(qa.get("res")),
        "delivery_res_m": {k: _num(delivery.get(k)) for k in ("prev", "curr")},
        "coregister": qa.get("coregister"),
        "histogram_matching": qa.get("histogram_matching"),
        "shift_px": [round(float(v), 3) for v in shift]
        if isinstance(shift, list | tuple) and len(shift) == 2
        else None,
        "residual_before_px": _num(qa.get("residual_before_median_px")),
        "residual_after_px": _num(qa.get("residual_after_median_px")),
        "residual_max_px": round(max((float(dx) ** 2 + float(dy) ** 2) ** 0.5 for dx, dy in after), 3)
        if after
        else None,
        "blocks_measured": qa.get("blocks_measured"),
        "blocks": len(blocks),
        "usable": dict(usable) if isinstance(usable, Mapping) else None,
    }


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_card(model_path: Path | None, metrics_path: Path | None) -> dict[str, Any] | None:
    """The checkpoint the month was detected with and its validation scores, or None without a checkpoint.

    Returns:
        ``name``, ``path``, ``sha256`` (first 12 hex), ``threshold``, ``object_threshold``, ``scores``:
        ``[{dataset, kind, precision, recall, f1}]`` (object level) of the shipped model in metrics.json.
    """
    if model_path is None or not Path(model_path).is_file():
        return None
    ckpt = read_checkpoint(Path(model_path))
    meta = ckpt.get("meta") or {}
    scores: list[dict[str, Any]] = []
    if metrics_path is not None and Path(metrics_path).is_file():
        metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
        shipped = (metrics.get("methods") or {}).get("shipped") or {}
        for dataset, kinds in sorted((shipped.get("scores") or {}).items()):
            for kind, levels in sorted(kinds.items()):
                obj = levels.get("object") or {}
                if obj:
                    scores.append(
                        {
                            "dataset": dataset,
                            "kind": kind,
                            **{k: round(float(obj[k]), 3) for k in ("precision", "recall", "f1") if k in obj},
                        }
                    )
    return {
        "name": str(ckpt.get("arch", "?")),
        "path": str(model_path),
        "sha256": file_sha256(Path(model_path))[:12],
        "threshold": _num(meta.get("threshold")),
        "object_threshold": _num(meta.get("object_threshold")),
        "scores": scores,
    }


def code_version(repo: Path | None = None) -> str:
    """``git describe --always --dirty --tags`` of the code, or "unknown" outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=repo or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def params_digest(params_path: Path | None) -> dict[str, Any] | None:
    """The params file's path and SHA-256 (first 12 hex), or None without one."""
    if params_path is None or not Path(params_path).is_file():
        return None
    return {"path": str(params_path), "sha256": file_sha256(Path(params_path))[:12]}
