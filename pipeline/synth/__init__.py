"""The demo town: a deterministic synthetic district with scripted change events.

Planning and rendering are separate. :func:`plan_demo` turns :class:`DemoSettings` into a
:class:`DemoPlan` (scene vectors, structures with their timelines, truth rows, field updates, permits,
seed cases) without touching a pixel; :func:`generate_demo` renders and writes it; :func:`training_pair`
renders a small random scene and two epochs with the same scene and rendering code.

Modules: :mod:`~pipeline.synth.scene` (layout: roads, blocks, roofs, trees), :mod:`~pipeline.synth.plan`
(the event script), :mod:`~pipeline.synth.render` (pixels), :mod:`~pipeline.synth.write` (files, atomic
output) and :mod:`~pipeline.synth.training` (training chips).

Conventions:
    * Month index 0 is ``first_month``. The randomness of month ``m`` comes from generators seeded with
      ``(seed, stream, m)`` and never from ``n_months``: adding a month leaves earlier months unchanged.
    * Truth geometries are true map coordinates. Each month's imagery is displaced by a global
      sub-pixel shift ``(dx, dy)`` in pixels (+x east, +y south), recorded in ``demo.json``: a feature at
      true pixel (row, col) appears at (row + dy, col + dx).
    * ``expanded`` truth rows carry the full new footprint (old part included).
    * Sheets are ``sheet_<r>_<c>.tif``, 0-based, row 0 in the north, column 0 in the west.
    * Field updates about a structure first seen in month ``m`` start in month ``m + 1``; an update
      ``demolished`` in month ``m`` means the imagery of month ``m`` shows rubble.
"""

from pipeline.synth.plan import AREA_FULL, DemoPlan, plan_demo
from pipeline.synth.render import (
    GROUND,
    LATITUDE,
    PAD_PX,
    SHADE,
    SHADOW_DIR,
    SUN_AZIMUTH,
    SUN_PIX,
    TREE_HEIGHTS,
)
from pipeline.synth.scene import ROOFS, Block, Roof, Scene, Structure, build_scene
from pipeline.synth.training import training_pair
from pipeline.synth.write import DemoSummary, generate_demo

__all__ = [
    "AREA_FULL",
    "GROUND",
    "LATITUDE",
    "PAD_PX",
    "ROOFS",
    "SHADE",
    "SHADOW_DIR",
    "SUN_AZIMUTH",
    "SUN_PIX",
    "TREE_HEIGHTS",
    "Block",
    "DemoPlan",
    "DemoSummary",
    "Roof",
    "Scene",
    "Structure",
    "build_scene",
    "generate_demo",
    "plan_demo",
    "training_pair",
]
