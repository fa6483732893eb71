"""On-disk contracts shared by the writer and the reader of each file: one place per format.

Each section belongs to one file format the pipeline writes and later reads back; writers and readers
import the constants and helpers from here and keep no copies of their own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

#: Square metres in one 亩 (mu), the Chinese land unit the bureaus report areas in.
MU_M2 = 2000.0 / 3.0


# ---------------------------------------------------------------------------------------------------
# The aligned pair folder (<interim>/aligned/<month>/): written by pipeline.imagery.align_pair, read by
# pipeline.pair.AlignedPair.

PAIR_JSON = "pair.json"
"""The pair's description: grid, sheets (paths relative to the folder), bands, shift and histogram tables."""
PAIR_VERSION = 1
"""The ``version`` key of ``pair.json``."""
VALID_TIF = "valid.tif"
"""uint8 COG over the grid: :data:`VALID_ON` where both epochs have data, 0 elsewhere."""
VALID_ON = 255


def encode_valid(valid: np.ndarray) -> np.ndarray:
    """The stored ``valid.tif`` values (uint8) of a bool mask."""
    return np.asarray(valid, bool) * np.uint8(VALID_ON)


def decode_valid(stored: np.ndarray) -> np.ndarray:
    """The bool mask of stored ``valid.tif`` values (anything above half of :data:`VALID_ON`, as GDAL masks)."""
    return np.asarray(stored) > VALID_ON // 2


# ---------------------------------------------------------------------------------------------------
# The probability COG (<processed>/prob/<month>.tif): written by pipeline.detect, read by pipeline.vectorize.
# Two uint8 bands, value = round(p * PROB_SCALE), PROB_NODATA outside the valid area.

PROB_BANDS = ("p_new", "p_removed")
"""Band descriptions, in band order (the order of :data:`FLAG_KINDS`)."""
PROB_SCALE = 254
PROB_NODATA = 255
PROB_ENCODING = f"round(p*{PROB_SCALE}), {PROB_NODATA}=nodata"
"""The value of the :data:`TAG_ENCODING` tag."""

TAG_MONTH = "month"
TAG_ENCODING = "encoding"
TAG_METHOD = "method"
"""``detect.method``: ``cnn`` or ``cva``."""
TAG_THRESHOLD = "threshold"
"""The model's calibrated decision threshold on p; vectorize seeds objects at it unless ``vectorize.high`` is set."""
TAG_OBJECT_THRESHOLD = "object_threshold"
"""The calibrated minimum mean p of a flag (absent: not calibrated); see :mod:`pipeline.flagcheck`."""


def encode_probabilities(probs: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Probabilities ``(2, h, w)`` to the stored uint8 values; :data:`PROB_NODATA` where ``ok`` is False."""
    out = np.rint(np.clip(probs, 0.0, 1.0) * PROB_SCALE).astype(np.uint8)
    out[:, ~ok] = PROB_NODATA
    return out


def decode_probabilities(stored: np.ndarray) -> np.ndarray:
    """Stored uint8 values to float32 probabilities; nodata reads as 0 (no change)."""
    return np.where(stored == PROB_NODATA, 0.0, stored / float(PROB_SCALE)).astype(np.float32)


def probability_tags(month: str, method: str, threshold: float, object_threshold: float | None) -> dict[str, str]:
    """The tags the probability COG carries (thresholds with 4 decimals; no object threshold: no tag)."""
    tags = {
        TAG_MONTH: month,
        TAG_ENCODING: PROB_ENCODING,
        TAG_METHOD: method,
        TAG_THRESHOLD: f"{float(threshold):.4f}",
    }
    if object_threshold is not None:
        tags[TAG_OBJECT_THRESHOLD] = f"{float(object_threshold):.4f}"
    return tags


def tag_float(tags: dict[str, str], name: str, default: float) -> float:
    """A number tag of the probability COG, ``default`` when it is absent or not a number."""
    try:
        return float(tags.get(name, default))
    except ValueError:
        return default


# ---------------------------------------------------------------------------------------------------
# The flags of a month (<processed>/flags/<month>.gpkg, layer FLAGS_LAYER, and its GeoParquet twin):
# written by pipeline.vectorize, read by the ledger, the map and the report.

FLAG_KINDS = ("new", "removed")
"""The kinds of flag, in the order of the probability bands (:data:`PROB_BANDS`)."""
FLAGS_LAYER = "flags"
FLAG_COLUMNS = ("flag_id", "month", "kind", "area_m2", "area_mu", "p_mean", "p_max", "lon", "lat", "district", "street")
"""The attribute columns of a flag, in order (then ``geometry``: a Polygon in the grid's CRS)."""
FLAG_FLOAT_COLUMNS = ("area_m2", "area_mu", "p_mean", "p_max", "lon", "lat")
"""The float64 columns of :data:`FLAG_COLUMNS`; the others are text."""


def flag_id(month: str, kind: str, geom: BaseGeometry) -> str:
    """Stable id of a flag: ``F<YYYYMM>-<N|R>-<first 8 hex of sha1(month|kind|geometry at 0.1 m)>``.

    The same polygon of the same month and kind gets the same id in every run.

    >>> from shapely.geometry import box
    >>> flag_id("2026-03", "new", box(0, 0, 10, 10))[:10]
    'F202603-N-'
    """
    import shapely

    wkt = shapely.to_wkt(shapely.normalize(geom), rounding_precision=1, trim=True)
    digest = hashlib.sha1(f"{month}|{kind}|{wkt}".encode()).hexdigest()[:8]
    return f"F{month.replace('-', '')}-{kind[0].upper()}-{digest}"


# --------------------------------------------------------------------------- checkpoints (models/*.pt)

#: ``format`` and ``version`` of a checkpoint file (a ``torch.save`` dict of plain values and tensors:
#: ``arch``, ``in_channels``, ``kwargs``, ``state_dict``, ``meta``).
CHECKPOINT_FORMAT = "scarwatch-checkpoint"
CHECKPOINT_VERSION = 1


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file's dict, checked to be a ScarWatch checkpoint (weights not yet fitted to a network).

    Loaded with ``weights_only=True``: no code in the file runs.

    Raises:
        ModelError: the file is missing, corrupt or not a ScarWatch checkpoint.
    """
    import pickle
    import zipfile

    import torch

    from pipeline.errors import ModelError

    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found; train one (scarwatch train) or fix detect.model")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise ModelError(
            f"{path}: checkpoint is corrupt or not a torch file ({type(exc).__name__}); "
            "restore it (git checkout / dvc pull) or retrain"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(
            f"{path}: not a ScarWatch checkpoint (no format={CHECKPOINT_FORMAT!r}); save it with save_checkpoint"
        )
    return payload


def checkpoint_native_gsd(path: Path) -> float | None:
    """The pixel size (metres) a checkpoint was trained at (``meta["native_gsd_m"]``), or None if unrecorded."""
    value = (read_checkpoint(path).get("meta") or {}).get("native_gsd_m")
    return None if value is None else float(value)


# --------------------------------------------------------------------------------------------- qa.json
# ``<interim>/aligned/<month>/qa.json``: written by the align stage (:func:`pipeline.imagery.align_pair`; the
# co-registration part and the per-block records by :func:`pipeline.coregister.qa_report`), read by the
# monthly report (:func:`pipeline.publish.report.summarize_qa`).

QA_FILE = "qa.json"
"""The file's name in the month's aligned-pair folder."""

QA_KEYS: tuple[str, ...] = (
    "month",  # the month, YYYY-MM
    "prev",  # the month it is compared with
    "max_shift_px",  # align.max_shift_px
    "shift_applied_px",  # [dx, dy] applied to the previous epoch (pixels)
    "histogram_matching",  # whether the previous epoch's histograms were matched to the current one's
    "valid_fraction",  # share of the grid valid in both epochs
    "res",  # the grid's pixel size (CRS units; the network's native pixel with align.resolution "model")
    "delivery_res",  # {"prev": m, "curr": m}: each epoch's delivered pixel size
    # {"ok": bool, "reasons": [str, ...], "cloud_fraction": float, "textured_fraction": float}: fit for
    # change detection (pipeline.imagery.usability); ok false means the month's flags may miss construction
    "usable",
    "coregister",  # align.coregister
    "residual_before_median_px",  # median block residual |d| before the shift (null: none measured)
    "residual_after_median_px",  # and after it
    "blocks_measured",  # blocks textured enough to measure
)
"""The top-level values of qa.json (besides :data:`QA_BLOCKS`), in the order align writes them."""

QA_USABLE = "usable"
"""The key of the fitness verdict (``ok``, ``reasons``, ``cloud_fraction``, ``textured_fraction``)."""

QA_BLOCKS = "blocks"
"""The key of the list of per-block records."""

QA_BLOCK_LAYOUT: tuple[str, ...] = ("col_off", "row_off", "width", "height")
"""Fields of a block record that say where the block is (grid pixels), not how well it aligned."""

QA_BLOCK_BEFORE = "before_px"
QA_BLOCK_AFTER = "after_px"
"""Fields of a block record: its residual shift [dx, dy] in pixels before / after co-registration (null
where it could not be measured). The residual the report shows is :data:`QA_BLOCK_AFTER`."""

QA_BLOCK_VALUES: tuple[str, ...] = ("valid_fraction", "texture", QA_BLOCK_BEFORE, QA_BLOCK_AFTER)
"""The fields of a block record besides :data:`QA_BLOCK_LAYOUT`."""
