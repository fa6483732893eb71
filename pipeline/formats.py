"""On-disk contracts shared by the writer and the reader of each file: one place per format.

Each section belongs to one file format the pipeline writes and later reads back; writers and readers
import the constants and helpers from here and keep no copies of their own.
"""

from __future__ import annotations

#: Square metres in one 亩 (mu), the Chinese land unit the bureaus report areas in.
MU_M2 = 2000.0 / 3.0

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
    "coregister",  # align.coregister
    "residual_before_median_px",  # median block residual |d| before the shift (null: none measured)
    "residual_after_median_px",  # and after it
    "blocks_measured",  # blocks textured enough to measure
)
"""The top-level values of qa.json (besides :data:`QA_BLOCKS`), in the order align writes them."""

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
