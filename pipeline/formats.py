"""On-disk contracts shared by the writer and the reader of each file: one place per format.

Each section belongs to one file format the pipeline writes and later reads back; writers and readers
import the constants and helpers from here and keep no copies of their own.
"""

from __future__ import annotations

import numpy as np

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
