"""Flags ↔ cases: which case an imagery flag or an inspector's map point belongs to.

Rules (``d`` is ``ledger.match_distance_m``; distances are between polygons, 0 when they overlap):

* A ``new`` flag is matched to **one** case: among the non-dismissed cases within ``d`` of it, the one
  it overlaps most, then the nearest, then the smallest case id. Dismissed cases are not matched, so
  new construction on a dismissed site opens a new case. The observation is

  - ``rebuilt`` (反弹) when the case is demolished, repaired or closed (the builder then reopens it first:
    ``reopened`` → ``warning``), or imagery last saw it removed;
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
from collections.abc import Iterable, Sequence
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
    """The current footprint and state of every case, behind a spatial index (shapely ``STRtree``).

    Every query goes through the tree, never a scan of all cases, so a month of F flags against C cases
    costs about (F + C) log C, not F × C. Footprints change as the ledger grows (an observation widens
    them, a flag opens a case), while an ``STRtree`` is immutable, so the index keeps the tree of the last
    build and the short list of cases whose footprint changed since ("stale", checked one by one) and
    rebuilds the tree once that list exceeds :data:`STALE_LIMIT`. A month's ``new`` flags, which change
    footprints one after another, are joined by :meth:`month_join` instead (see :class:`MonthJoin`).
    """

    STALE_LIMIT = 256
    """Changed footprints checked one by one before the tree is rebuilt."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._geoms: list[BaseGeometry] = []
        self._states: list[str] = []
        self._removed_seen: list[bool] = []
        self._provisional: list[bool] = []
        self._tree: shapely.STRtree | None = None
        self._tree_size = 0  # positions below this were in the tree when it was built
        self._stale: dict[int, None] = {}  # positions whose footprint changed since (ordered set)

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
            i = self._pos[case_id] = len(self._ids)
            self._ids.append(case_id)
            self._geoms.append(footprint)
            self._states.append(state)
            self._removed_seen.append(removed_seen)
            self._provisional.append(provisional)
            self._stale[i] = None
        else:
            if footprint is not self._geoms[i]:
                self._geoms[i] = footprint
                self._stale[i] = None
            self._states[i] = state
            self._removed_seen[i] = removed_seen
            self._provisional[i] = provisional

    def footprint(self, case_id: str) -> BaseGeometry:
        """Return the current footprint of ``case_id``."""
        return self._geoms[self._pos[case_id]]

    def _fresh_tree(self) -> shapely.STRtree:
        """The tree over every current footprint (rebuilt now if any footprint changed since the last build)."""
        if self._tree is None or self._stale:
            self._tree = shapely.STRtree(self._geoms)
            self._tree_size = len(self._geoms)
            self._stale = {}
        return self._tree

    def _near(self, geom: BaseGeometry, distance: float) -> np.ndarray:
        """Positions (sorted) of every case, dismissed ones included, within ``distance`` of ``geom``."""
        if not self._ids:
            return np.zeros(0, dtype=np.intp)
        if self._tree is None or len(self._stale) > self.STALE_LIMIT:
            self._fresh_tree()
        assert self._tree is not None
        hits = self._tree.query(geom, predicate="dwithin", distance=distance)
        if not self._stale:
            return np.sort(hits)
        stale = np.fromiter(self._stale, dtype=np.intp, count=len(self._stale))
        kept = hits[~np.isin(hits, stale)]  # the tree's copy of a stale footprint is out of date
        geoms = np.asarray([self._geoms[i] for i in stale], dtype=object)
        again = stale[shapely.dwithin(geoms, geom, distance)]
        return np.sort(np.concatenate([kept, again]))

    def _live(self, positions: np.ndarray) -> np.ndarray:
        """``positions`` without dismissed cases (they are never matched)."""
        return np.asarray([i for i in positions if self._states[i] != "dismissed"], dtype=np.intp)

    def month_join(self, flags: Sequence[BaseGeometry], distance: float) -> MonthJoin:
        """Prepare the join of a month's ``new`` flags (in processing order) with the cases: two bulk queries."""
        tree = self._fresh_tree() if self._ids else None
        return MonthJoin(self, tree, list(flags), distance)

    def match_new(
        self,
        flag: BaseGeometry,
        distance: float,
        expand_ratio: float,
        *,
        candidates: Iterable[str] | None = None,
    ) -> Observation | None:
        """Return the observation a ``new`` flag makes on its best-matching case, or None (no case near).

        ``candidates``: case ids known to hold every case within ``distance`` (a :class:`MonthJoin`'s);
        without them the index is queried.
        """
        if candidates is None:
            near = self._near(flag, distance).tolist()
        else:  # a handful at most: scalar calls cost less than building arrays
            near = sorted(i for i in {self._pos[c] for c in candidates} if self._geoms[i].dwithin(flag, distance))
        hits = [i for i in near if self._states[i] != "dismissed"]
        if not hits:
            return None
        i = hits[0]
        if len(hits) > 1:  # the one it overlaps most, then the nearest, then the smallest case id
            geoms = np.asarray([self._geoms[k] for k in hits], dtype=object)
            overlap = shapely.area(shapely.intersection(geoms, flag))
            dist = shapely.distance(geoms, flag)
            best = min(
                range(len(hits)), key=lambda k: (-round(float(overlap[k]), 6), float(dist[k]), self._ids[hits[k]])
            )
            i = hits[best]
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
        return sorted(self._ids[int(i)] for i in self._live(self._near(flag, distance)))

    def match_removed_many(self, flags: Sequence[BaseGeometry], distance: float) -> list[list[str]]:
        """:meth:`match_removed` of many ``removed`` flags at once: one bulk tree query.

        Valid because ``observed_removed`` widens no footprint, so nothing changes between the flags.
        """
        out: list[list[str]] = [[] for _ in flags]
        if not flags or not self._ids:
            return out
        flag_pos, case_pos = self._fresh_tree().query(list(flags), predicate="dwithin", distance=distance)
        for f, c in zip(flag_pos.tolist(), case_pos.tolist(), strict=True):
            if self._states[c] != "dismissed":
                out[f].append(self._ids[c])
        return [sorted(ids) for ids in out]

    def locate(self, x: float, y: float, distance: float) -> list[str]:
        """Return the candidate cases for an inspector's point (sorted; exactly one means unambiguous).

        Every case counts here, dismissed ones included: an inspector may report on any case.
        """
        point = shapely.Point(x, y)
        near = self._near(point, distance)
        if near.size == 0:
            return []
        geoms = np.asarray([self._geoms[i] for i in near], dtype=object)
        inside = near[shapely.covers(geoms, point)]
        if inside.size == 1:
            return [self._ids[int(inside[0])]]
        return sorted(self._ids[int(i)] for i in near)


class MonthJoin:
    """The candidates of a month's ``new`` flags, from two bulk ``STRtree`` queries.

    While a month's flags are processed, the only footprints that change are those the month's own flags
    widen or open (a footprint is the union of its flags), so the cases within ``d`` of flag ``k`` are
    among the cases within ``d`` of their footprint at the month's start (the cases' tree, queried once
    for every flag) and the cases that earlier flags of the month within ``d`` of flag ``k`` were recorded
    on (the flags' own tree, queried once). :meth:`FootprintIndex.match_new` then checks the candidates'
    current footprints exactly, so the result equals a check against every case.
    """

    def __init__(
        self, index: FootprintIndex, tree: shapely.STRtree | None, flags: list[BaseGeometry], distance: float
    ) -> None:
        self._index = index
        self._flags = flags
        self._start: list[list[int]] = [[] for _ in flags]
        self._peers: list[list[int]] = [[] for _ in flags]
        self._case: list[str] = [""] * len(flags)
        if flags and tree is not None:
            flag_pos, case_pos = tree.query(flags, predicate="dwithin", distance=distance)
            for f, c in zip(flag_pos.tolist(), case_pos.tolist(), strict=True):
                self._start[f].append(c)
        if len(flags) > 1:
            own = shapely.STRtree(flags)
            a, b = own.query(flags, predicate="dwithin", distance=distance)
            for i, j in zip(a.tolist(), b.tolist(), strict=True):
                if j < i:
                    self._peers[i].append(j)

    def candidates(self, k: int) -> set[str]:
        """Case ids that may lie within the distance of flag ``k`` now."""
        ids = self._index._ids
        out = {ids[c] for c in self._start[k]}
        out.update(self._case[j] for j in self._peers[k] if self._case[j])
        return out

    def attach(self, k: int, case_id: str) -> None:
        """Record that flag ``k`` was recorded on (or opened) ``case_id``."""
        self._case[k] = case_id


def is_expansion(footprint: BaseGeometry, flag: BaseGeometry, expand_ratio: float) -> bool:
    """Return whether ``flag`` grows ``footprint`` by more than ``expand_ratio`` of its area."""
    before = float(footprint.area)
    after = float(shapely.union(footprint, flag).area)
    if before <= 0:
        return after > 0
    return after > before * (1.0 + expand_ratio)


class PermitIndex:
    """The permits valid in one month, grown by the match distance, behind an ``STRtree``.

    Built once per month (a month has thousands of flags and a city thousands of permits), so each flag
    costs one tree query instead of buffering every permit again.
    """

    def __init__(self, permits: gpd.GeoDataFrame, month: str, distance: float) -> None:
        """``permits``: columns ``permit_id``, ``valid_from``, ``valid_to`` (ISO dates or ""), geometry."""
        self._ids: np.ndarray = np.zeros(0, dtype=object)
        self._grown: np.ndarray = np.zeros(0, dtype=object)
        self._tree: shapely.STRtree | None = None
        if permits.empty:
            return
        start, end = f"{month}-01", month_end(month).isoformat()
        valid = permits[
            ((permits["valid_from"] == "") | (permits["valid_from"] <= end))
            & ((permits["valid_to"] == "") | (permits["valid_to"] >= start))
        ]
        if valid.empty:
            return
        self._ids = np.asarray([str(p) for p in valid["permit_id"]], dtype=object)
        self._grown = shapely.buffer(np.asarray(valid.geometry.values, dtype=object), distance)
        self._tree = shapely.STRtree(self._grown)

    def find(self, flag: BaseGeometry) -> str | None:
        """The smallest id of a permit whose polygon (grown by the distance) covers ``flag``, or None."""
        if self._tree is None:
            return None
        hits = self._tree.query(flag, predicate="covered_by")  # flag covered by the grown permit
        return min((str(self._ids[i]) for i in hits), default=None)


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
    return PermitIndex(permits, month, distance).find(flag)
