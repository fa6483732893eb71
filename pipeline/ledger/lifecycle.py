"""The case lifecycle as a state machine: 预警 → 发现 → 制止 → 处置 → 拆除 → 修复 → 销号.

A case's state is a fold of its lifecycle events through :data:`TRANSITIONS`. Imagery observations
(``observed_present``, ``observed_removed``, ``expanded``, ``rebuilt``) never change the state and never
fail: they only annotate the case. The table allows a step to be skipped forward where cities do so in
practice (an owner demolishes after confirmation, an order without a prior stop), and it allows a
closed-out case to be reopened with ``confirmed`` (复查: a rebuild confirmed on site, a dismissal
reviewed). ``flagged`` only opens a case. ``reopened`` is the ledger's own reopening of a closed-out case
when imagery sees the structure back (反弹): the case goes back to ``warning``, so it is dispatched and
checked again like a new warning and counts as open (not closed, not demolished) from that month on.
Two kinds may repeat: ``ordered`` (a new deadline) and ``dismissed`` (an inspector confirming on site a
case the ledger already dismissed, e.g. one inside a permit, which the ledger dismisses on its own).

======================  ===================================================
state                   allowed lifecycle kinds → next state
======================  ===================================================
(none)                  flagged → warning
warning                 confirmed, dismissed
confirmed               stopped, ordered, demolished, dismissed
stopped                 ordered, demolished
ordered                 ordered (new deadline), demolished
demolished              repaired, closed, confirmed (reopen), reopened → warning (rebuild)
repaired                closed, confirmed (reopen), reopened → warning (rebuild)
closed                  confirmed (reopen), reopened → warning (rebuild)
dismissed               confirmed (reopen), dismissed (confirmed on site)
======================  ===================================================
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from functools import cache
from typing import Final

from pipeline.errors import IllegalTransitionError
from pipeline.ledger.events import ADMIN_KINDS, OBSERVATION_KINDS

log = logging.getLogger(__name__)

STATES: Final[tuple[str, ...]] = (
    "warning",
    "confirmed",
    "stopped",
    "ordered",
    "demolished",
    "repaired",
    "closed",
    "dismissed",
)
"""Every lifecycle state, in the order of the loop."""

OPEN_STATES: Final[frozenset[str]] = frozenset({"warning", "confirmed", "stopped", "ordered"})
"""States in which the structure is still expected to stand (imagery 'new' flags are observations)."""

REMOVED_STATES: Final[frozenset[str]] = frozenset({"demolished", "repaired", "closed"})
"""States after demolition (an imagery 'new' flag here is a rebuild, 反弹)."""

STOP_STATES: Final[frozenset[str]] = frozenset({"stopped", "ordered"})
"""States under a stop or demolition order (expansion here raises an alert)."""

TRANSITIONS: Final[dict[str | None, dict[str, str]]] = {
    None: {"flagged": "warning"},
    "warning": {"confirmed": "confirmed", "dismissed": "dismissed"},
    "confirmed": {"stopped": "stopped", "ordered": "ordered", "demolished": "demolished", "dismissed": "dismissed"},
    "stopped": {"ordered": "ordered", "demolished": "demolished"},
    "ordered": {"ordered": "ordered", "demolished": "demolished"},
    "demolished": {"repaired": "repaired", "closed": "closed", "confirmed": "confirmed", "reopened": "warning"},
    "repaired": {"closed": "closed", "confirmed": "confirmed", "reopened": "warning"},
    "closed": {"confirmed": "confirmed", "reopened": "warning"},
    "dismissed": {"confirmed": "confirmed", "dismissed": "dismissed"},
}
"""state (None before the first event) → {lifecycle kind: next state}."""


def allowed_kinds(state: str | None) -> tuple[str, ...]:
    """Return the lifecycle kinds allowed from ``state`` (None: a case not yet opened)."""
    return tuple(TRANSITIONS.get(state, {}))


def next_state(state: str | None, kind: str, *, case_id: str = "?", where: str = "") -> str:
    """Return the state after a lifecycle event of ``kind`` in ``state``.

    Args:
        state: the current state, or None for a case without events yet.
        kind: a lifecycle event kind (observations are not accepted here; see :func:`apply`).
        case_id: named in the error message.
        where: the place the event comes from (``"field_updates/2026-03.csv row 4: "``), prefixed to the
            error message.

    Raises:
        IllegalTransitionError: ``kind`` is not allowed from ``state``; the message names the case, its
            state and the allowed kinds.
    """
    table = TRANSITIONS.get(state)
    if table is None:
        raise IllegalTransitionError(
            f"{where}case {case_id} has unknown state {state!r}; states are {', '.join(STATES)}"
        )
    if kind not in table:
        allowed = ", ".join(table) or "none"
        current = "not opened yet" if state is None else f"in state {state!r}"
        raise IllegalTransitionError(
            f"{where}case {case_id} is {current}; event {kind!r} is not allowed (allowed: {allowed}); "
            "fix the kind or record the missing steps first"
        )
    return table[kind]


def apply(state: str | None, kind: str, *, case_id: str = "?", where: str = "") -> str | None:
    """Like :func:`next_state`, but observations and administrative events (``dispatched``) leave the state."""
    if kind in OBSERVATION_KINDS or kind in ADMIN_KINDS:
        return state
    return next_state(state, kind, case_id=case_id, where=where)


@cache  # one search per state, not per seed case (a city seeds tens of thousands)
def seed_path(state: str) -> tuple[str, ...]:
    """Return the shortest sequence of lifecycle kinds that leads from no case to ``state``.

    Seed cases carry only their current state; the ledger reconstructs it with the fewest steps so that
    it invents no stop or demolition order that may not have happened (``closed`` →
    ``flagged, confirmed, demolished, closed``). Ties follow the order of :data:`TRANSITIONS`.

    Raises:
        ValueError: ``state`` is not a lifecycle state.
    """
    if state not in STATES:
        raise ValueError(f"state {state!r} is not a lifecycle state; use one of {', '.join(STATES)}")
    queue: deque[tuple[str | None, tuple[str, ...]]] = deque([(None, ())])
    seen: set[str | None] = {None}
    while queue:
        current, path = queue.popleft()
        if current == state:
            return path
        for kind, nxt in TRANSITIONS.get(current, {}).items():
            if nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, (*path, kind)))
    raise ValueError(f"state {state!r} cannot be reached from a new case")  # pragma: no cover


def fold_kinds(kinds: Iterable[str], *, case_id: str = "?") -> str:
    """Fold a sequence of event kinds (in log order) into the resulting state.

    Raises:
        IllegalTransitionError: the sequence holds an illegal transition.
        ValueError: the sequence opens no case (empty, or observations only).
    """
    state: str | None = None
    for kind in kinds:
        if (kind in OBSERVATION_KINDS or kind in ADMIN_KINDS) and state is not None:
            continue
        state = next_state(state, kind, case_id=case_id)  # an observation before 'flagged' is refused
    if state is None:
        raise ValueError(f"case {case_id}: no 'flagged' event opens it; its events cannot be folded")
    return state
