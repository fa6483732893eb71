"""The scar ledger (台账): an append-only event log of cases, folded through the lifecycle.

Public API: :func:`build_ledger` (the ``ledger`` stage; the live ledger is a store of record, see
:mod:`pipeline.ledger.record`), :func:`rebuild_ledger` (replay and prove equal), :func:`read_ledger`
and :func:`fold_state` (for the map and the report), :func:`load_month_view` (the ledger and flags cut
at a month, which the map and the report read), :class:`LedgerSummary`, :data:`ALERT_TEXT`. Formats:
docs/architecture.md.

Choices, in one place (details in the modules):

- Imagery events are dated the 1st of their month; a month's flags are processed before its field
  updates, so date order and log order agree. ``seq`` is the log order: sort by it, not by ``at``
  (seed events share one date).
- A ``new`` flag inside a valid permit opens a case that is dismissed at once (event ``dismissed``,
  source ``permit``, evidence ``layers/permits.gpkg:<permit_id>``; the case's ``permit_id`` is set), so
  permitted construction stays on record and is counted apart (``LedgerSummary.permitted_by_month``).
- Seed cases are reconstructed by the shortest legal run of events to their state, dated ``opened_at``.
- Field updates: row numbers count the header as row 1; ``at`` must fall in the file's month; a point
  selects the case that contains it, else the only case within ``match_distance_m``.
- Alerts are evaluated at the end of every month and repeat while they hold (``alerts.month``).
"""

from pipeline.ledger.alerts import ALERT_TEXT
from pipeline.ledger.build import LedgerSummary, RebuildSummary, build_ledger, fold_state, rebuild_ledger
from pipeline.ledger.events import EVENT_KINDS, LIFECYCLE_KINDS, OBSERVATION_KINDS, SOURCES
from pipeline.ledger.lifecycle import STATES, TRANSITIONS, allowed_kinds
from pipeline.ledger.store import read_ledger
from pipeline.ledger.view import MonthView, load_month_view

__all__ = [
    "ALERT_TEXT",
    "EVENT_KINDS",
    "LIFECYCLE_KINDS",
    "OBSERVATION_KINDS",
    "SOURCES",
    "STATES",
    "TRANSITIONS",
    "LedgerSummary",
    "RebuildSummary",
    "MonthView",
    "allowed_kinds",
    "build_ledger",
    "fold_state",
    "load_month_view",
    "read_ledger",
    "rebuild_ledger",
]
