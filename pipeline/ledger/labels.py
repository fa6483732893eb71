"""The ledger's vocabulary in Chinese: states, event kinds, flag kinds, categories and alerts.

The English name of each is its key (the value stored in the ledger); the map and the report show the
Chinese name first, then the key. Colours are not ledger concepts: the map's styling keeps them
(:mod:`pipeline.publish.maplayers`).
"""

from __future__ import annotations

from typing import Final

STATE_ZH: Final[dict[str, str]] = {
    "warning": "预警",
    "confirmed": "已发现",
    "stopped": "已制止",
    "ordered": "处置中",
    "demolished": "已拆除",
    "repaired": "已修复",
    "closed": "已销号",
    "dismissed": "已排除",
}
"""Lifecycle state (:data:`pipeline.ledger.lifecycle.STATES`) → Chinese name."""

KIND_ZH: Final[dict[str, str]] = {
    "flagged": "预警",
    "confirmed": "确认",
    "dismissed": "排除",
    "stopped": "制止",
    "ordered": "限期处置",
    "demolished": "拆除",
    "repaired": "修复",
    "closed": "销号",
    "observed_present": "影像可见",
    "observed_removed": "影像已拆除",
    "expanded": "扩建",
    "rebuilt": "反弹重建",
    "reopened": "反弹重新立案",
    "dispatched": "派单",
}
"""Event kind (:data:`pipeline.ledger.events.EVENT_KINDS`) → Chinese name."""

FLAG_ZH: Final[dict[str, str]] = {"new": "新增", "removed": "消失"}
"""Flag kind (the ``kind`` of a flag) → Chinese name."""

CATEGORY_ZH: Final[dict[str, str]] = {"illegal_construction": "违法建设", "scar": "城市疮疤"}
"""Case category (:data:`pipeline.ledger.events.CATEGORIES`) → Chinese name."""

ALERT_ZH: Final[dict[str, str]] = {
    "overdue": "逾期未拆除",
    "rebuild": "反弹",
    "expansion_after_stop": "制止后扩建",
    "unrepaired_scar": "疮疤未修复",
    "demolition_unverified": "拆除未经影像核实",
    "removal_unrecorded": "影像已拆除但未登记",
    "check_overdue": "派单核查逾期",
}
"""Short Chinese names of the alert kinds (:data:`pipeline.ledger.alerts.ALERT_TEXT` holds the messages)."""
