"""On-disk contracts shared by the writer and the reader of each file: one place per format.

Each section belongs to one file format the pipeline writes and later reads back; writers and readers
import the constants and helpers from here and keep no copies of their own.
"""

from __future__ import annotations

#: Square metres in one 亩 (mu), the Chinese land unit the bureaus report areas in.
MU_M2 = 2000.0 / 3.0
