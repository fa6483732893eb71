"""Alerts: the conditions on a case's folded state that need an inspector's attention at a month's end.

:func:`month_alerts` evaluates the rules of :data:`ALERT_TEXT` over every case after a month has been
processed; :func:`pipeline.ledger.build_ledger` calls it for each month and writes the rows to the
ledger's ``alerts`` layer (columns :data:`ALERT_COLUMNS` and the case's footprint).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from shapely.geometry.base import BaseGeometry

from pipeline.ledger.events import month_end, month_index
from pipeline.ledger.lifecycle import OPEN_STATES

ALERT_COLUMNS: tuple[str, ...] = ("case_id", "kind", "month", "message_zh", "message_en")

ALERT_TEXT: dict[str, tuple[str, str]] = {
    "overdue": (
        "限期拆除已逾期（期限 {deadline}），尚未拆除",
        "Demolition deadline {deadline} has passed; not demolished",
    ),
    "rebuild": ("已拆除点位出现反弹（重新搭建）", "Rebuild (反弹) at a demolished site"),
    "expansion_after_stop": ("责令停止后仍在扩建", "Expansion after a stop order"),
    "unrepaired_scar": ("拆除后 {months} 个月仍未修复", "Scar not repaired {months} months after demolition"),
    "demolition_unverified": (
        "现场上报已拆除，但影像仍见建筑，请核查",
        "Demolition reported in the field, but imagery still shows the structure; verify on site",
    ),
    "removal_unrecorded": (
        "影像显示已拆除，但台账无拆除记录，请核实",
        "Imagery shows the structure removed, but no demolition is recorded; verify and record it",
    ),
    "check_overdue": (
        "派单核查已逾期（{unit}，期限 {due}），尚无现场核查结果，已重新派单",
        "Field check overdue ({unit}, due {due}): no field report yet; dispatched again",
    ),
}
"""Alert kind → (Chinese, English) message templates.

Alerts are evaluated at the end of every processed month and repeat each month while they hold:

* ``overdue``: state ``ordered`` and its deadline is before the month's last day;
* ``rebuild``: a ``rebuilt`` observation not yet followed by any lifecycle event or removal;
* ``expansion_after_stop``: an ``expanded`` observation made while ``stopped``/``ordered``, not yet
  followed by a lifecycle event or removal;
* ``unrepaired_scar``: still ``demolished`` more than ``repair_grace_months`` months after the month
  of the demolition;
* ``demolition_unverified``: demolished in the field (state demolished or repaired), a later month's
  imagery has been processed, and imagery has not seen the structure removed;
* ``removal_unrecorded``: imagery saw the structure removed while the case is still open
  (warning … ordered);
* ``check_overdue``: the case was dispatched (``dispatched``), is still a ``warning`` with no field event
  since its last dispatch, and the dispatch's due date is before the month's last day (the ledger then
  dispatches it again, dated the month's last day).
"""


class AlertFacts(Protocol):
    """What the alert rules read from a case's folded view (the ledger builder's per-case state)."""

    state: str | None
    deadline: str
    footprint: BaseGeometry | None
    removed_seen: bool
    rebuild_pending: bool
    expansion_pending: bool
    demolished_month: str
    demolished_by_field: bool
    dispatch_due: str  # due date of the last dispatch's field check ("" when never dispatched)
    dispatch_unit: str
    checked_since_dispatch: bool  # a field event came after the last dispatch


def month_alerts(
    cases: Mapping[str, AlertFacts], month: str, *, repair_grace_months: int, last_imagery_month: str
) -> list[dict[str, object]]:
    """Return the alerts that hold at the end of ``month``, case by case in case-id order.

    Args:
        cases: each case's folded view after the month's imagery and field updates, by case id.
        month: the month just processed, ``YYYY-MM``.
        repair_grace_months: months a demolished site may wait for repair (``ledger.repair_grace_months``).
        last_imagery_month: the latest month whose flags have been processed (``""`` if none).

    Returns:
        Alert rows: ``case_id``, ``kind``, ``month``, ``message_zh``, ``message_en`` and ``geometry``
        (the case's footprint).
    """
    alerts: list[dict[str, object]] = []
    end = month_end(month).isoformat()
    grace = repair_grace_months
    for case_id in sorted(cases):
        c = cases[case_id]
        found: list[tuple[str, dict[str, object]]] = []
        if c.state == "ordered" and c.deadline and c.deadline < end:
            found.append(("overdue", {"deadline": c.deadline}))
        if c.rebuild_pending:
            found.append(("rebuild", {}))
        if c.expansion_pending:
            found.append(("expansion_after_stop", {}))
        if c.state == "demolished" and c.demolished_month:
            waited = month_index(month) - month_index(c.demolished_month)
            if waited > grace:
                found.append(("unrepaired_scar", {"months": waited}))
        if (
            c.state in ("demolished", "repaired")
            and c.demolished_by_field
            and not c.removed_seen
            and not c.rebuild_pending
            and last_imagery_month > c.demolished_month
        ):
            found.append(("demolition_unverified", {}))
        if c.state in OPEN_STATES and c.removed_seen:
            found.append(("removal_unrecorded", {}))
        if c.state == "warning" and c.dispatch_due and not c.checked_since_dispatch and c.dispatch_due < end:
            found.append(("check_overdue", {"due": c.dispatch_due, "unit": c.dispatch_unit or "未分配单位"}))
        for kind, values in found:
            zh, en = ALERT_TEXT[kind]
            alerts.append(
                {
                    "case_id": case_id,
                    "kind": kind,
                    "month": month,
                    "message_zh": zh.format(**values),
                    "message_en": en.format(**values),
                    "geometry": c.footprint,
                }
            )
    return alerts
