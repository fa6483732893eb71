"""Flags ↔ cases: which case an imagery flag or an inspector's map point belongs to.

Rules (``d`` is ``ledger.match_distance_m``; distances are between polygons, 0 when they overlap):

* A ``new`` flag is matched to **one** case: among the non-dismissed cases within ``d`` of it, the one
  it overlaps most, then the nearest, then the smallest case id. Dismissed cases are not matched, so
  new construction on a dismissed site opens a new case. The observation is

  - ``rebuilt`` (反弹) when the case is demolished, repaired or closed, or imagery last saw it removed;
  - ``expanded`` when the union of footprint and flag exceeds the footprint area by more than
    ``ledger.expand_ratio`` (change detection flags only the added part of an extension, so the union,
    not the flag alone, is compared);
  - ``observed_present`` otherwise.
* A ``removed`` flag annotates **every** non-dismissed case within ``d`` (one demolition may clear
  several adjacent structures) with ``observed_removed``.
* A ``new`` flag matching no case lies in a permit when it lies within ``d`` of the inside of a permit
  polygon valid during the flag's month (``valid_from`` ≤ month end, ``valid_to`` ≥ month start; empty
  bounds are open). A flag that sticks out of the permit by more than ``d`` is not permitted.
* An inspector's point (``x``, ``y``) selects the case whose footprint contains it when exactly one
  does; otherwise the cases within ``d`` of it, which must be exactly one.
* A case an inspector opened in the field has a *provisional* footprint (a small disc around the
  point). The first ``new`` flag on it is ``observed_present`` and replaces that footprint, so it is
  never mistaken for an expansion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from pipeline.ledger.events import month_end
from pipeline.ledger.lifecycle import REMOVED_STATES

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Observation:
    """What a ``new`` flag says about an existing case."""

    case_id: str
    kind: str  # observed_present | expanded | rebuilt


class FootprintIndex:
    """The current footprint and state of every case, for vectorised distance queries.

    Footprints change as the ledger grows (an observation widens them), so the index is updated in
    place by :meth:`put` instead of being rebuilt.
    """

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._geoms: list[BaseGeometry] = []
        self._states: list[str] = []
        self._removed_seen: list[bool] = []
        self._provisional: list[bool] = []
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def put(
        self,
        case_id: str,
        footprint: BaseGeometry,
        state: str,
        *,
        removed_seen: bool = False,
        provisional: bool = False,
    ) -> None:
        """Add a case or update its footprint, state and flags.

        ``removed_seen``: imagery last saw it removed; ``provisional``: the footprint is only the disc
        around an inspector's point.
        """
        i = self._pos.get(case_id)
        if i is None:
            self._pos[case_id] = len(self._ids)
            self._ids.append(case_id)
            self._geoms.append(footprint)
            self._states.append(state)
            self._removed_seen.append(removed_seen)
            self._provisional.append(provisional)
        else:
            self._geoms[i] = footprint
            self._states[i] = state
            self._removed_seen[i] = removed_seen
            self._provisional[i] = provisional
        self._array = None

    def footprint(self, case_id: str) -> BaseGeometry:
        """Return the current footprint of ``case_id``."""
        return self._geoms[self._pos[case_id]]

    def _geom_array(self) -> np.ndarray:
        """The footprints as a shapely array (cached until the next :meth:`put`)."""
        if self._array is None:
            self._array = np.asarray(self._geoms, dtype=object)
        return self._array

    def _within(self, geom: BaseGeometry, distance: float) -> np.ndarray:
        """Return the positions of non-dismissed cases within ``distance`` of ``geom``."""
        if not self._ids:
            return np.zeros(0, dtype=int)
        near = shapely.dwithin(self._geom_array(), geom, distance)
        live = np.asarray([s != "dismissed" for s in self._states], dtype=bool)
        return np.flatnonzero(near & live)

    def match_new(self, flag: BaseGeometry, distance: float, expand_ratio: float) -> Observation | None:
        """Return the observation a ``new`` flag makes on its best-matching case, or None (no case near)."""
        hits = self._within(flag, distance)
        if hits.size == 0:
            return None
        geoms = self._geom_array()[hits]
        overlap = shapely.area(shapely.intersection(geoms, flag))
        dist = shapely.distance(geoms, flag)
        order = sorted(
            range(hits.size), key=lambda k: (-round(float(overlap[k]), 6), float(dist[k]), self._ids[hits[k]])
        )
        i = int(hits[order[0]])
        case_id, state, footprint = self._ids[i], self._states[i], self._geoms[i]
        if state in REMOVED_STATES or self._removed_seen[i]:
            return Observation(case_id, "rebuilt")
        if self._provisional[i]:
            return Observation(case_id, "observed_present")
        if is_expansion(footprint, flag, expand_ratio):
            return Observation(case_id, "expanded")
        return Observation(case_id, "observed_present")

    def match_removed(self, flag: BaseGeometry, distance: float) -> list[str]:
        """Return the ids (sorted) of every non-dismissed case within ``distance`` of a ``removed`` flag."""
        return sorted(self._ids[int(i)] for i in self._within(flag, distance))

    def locate(self, x: float, y: float, distance: float) -> list[str]:
        """Return the candidate cases for an inspector's point (sorted; exactly one means unambiguous).

        Every case counts here, dismissed ones included: an inspector may report on any case.
        """
        if not self._ids:
            return []
        point = shapely.Point(x, y)
        geoms = self._geom_array()
        inside = np.flatnonzero(shapely.covers(geoms, point))
        if inside.size == 1:
            return [self._ids[int(inside[0])]]
        near = np.flatnonzero(shapely.dwithin(geoms, point, distance))
        return sorted(self._ids[int(i)] for i in near)


def is_expansion(footprint: BaseGeometry, flag: BaseGeometry, expand_ratio: float) -> bool:
    """Return whether ``flag`` grows ``footprint`` by more than ``expand_ratio`` of its area."""
    before = float(footprint.area)
    after = float(shapely.union(footprint, flag).area)
    if before <= 0:
        return after > 0
    return after > before * (1.0 + expand_ratio)


def find_permit(flag: BaseGeometry, permits: gpd.GeoDataFrame, month: str, distance: float) -> str | None:
    """Return the id of a permit valid in ``month`` whose polygon holds ``flag`` (within ``distance``).

    Args:
        flag: the flag polygon.
        permits: columns ``permit_id``, ``valid_from``, ``valid_to`` (ISO dates or ""), geometry.
        month: the flag's month.
        distance: the tolerance in CRS units (metres).

    Returns:
        The smallest matching permit id, or None.
    """
    if permits.empty:
        return None
    start, end = f"{month}-01", month_end(month).isoformat()
    valid = permits[
        ((permits["valid_from"] == "") | (permits["valid_from"] <= end))
        & ((permits["valid_to"] == "") | (permits["valid_to"] >= start))
    ]
    if valid.empty:
        return None
    grown = shapely.buffer(np.asarray(valid.geometry.values, dtype=object), distance)
    inside = shapely.covers(grown, flag)
    ids = sorted(str(p) for p in valid["permit_id"].to_numpy()[inside])
    return ids[0] if ids else None
