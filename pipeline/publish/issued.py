"""Issued report versions: what was sent upward for a month is archived, never silently overwritten.

``<reports>/issued/<M>/v<n>/`` holds one issued version of month M's report: ``<M>.html``, ``<M>.md``,
``<M>.pdf`` (when printed), ``<M>.json`` (every figure), ``states.json`` (each case's state at the month's
end) and ``manifest.json`` (``month``, ``version``, ``issued_at``, ``ledger_events`` and
``ledger_events_to_month`` (events in the ledger the report was built from, all and up to M), ``headline``
(the figures compared), ``files`` {name: SHA-256}, ``revision`` (None for v1)); v2 and later also hold
``revision.md``. A version folder is written whole (a temporary folder renamed into place) and never
replaced.

Rule (:func:`plan_issue`): the report's *figures* are its headline figures
(:func:`pipeline.publish.report.headline`, without the version itself) and every case's state at M. The
first report of M is v1. A later run whose figures equal the latest version's issues nothing (a
cosmetic rerender: new code, new wording); one whose figures differ (a late field update, a rebuilt
ledger) is the next version, with a revision note listing old → new for each headline figure and each
case whose state at M changed.

DVC: ``<reports>/issued`` is no output of any stage, so ``dvc repro`` (which deletes a stage's outputs
before running it) never removes it; back it up with the reports.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import CorruptFileError
from pipeline.publish.provenance import file_sha256

MANIFEST = "manifest.json"
STATES = "states.json"
REVISION = "revision.md"
UNCOMPARED: tuple[str, ...] = ("report_version",)
"""Headline keys that are no figures of the month (left out of the comparison)."""


@dataclass(frozen=True)
class Issue:
    """The version a report run shows: an existing one (``new`` False) or the one it issues now."""

    month: str
    version: int
    issued_at: str
    new: bool
    revision: dict[str, Any] | None = None
    headline: dict[str, Any] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)

    def as_figures(self) -> dict[str, Any]:
        """What the report's figures carry about its version (``figures["issue"]``)."""
        return {"version": self.version, "issued_at": self.issued_at, "revision": self.revision}


def _versions(month_dir: Path) -> list[int]:
    """The version numbers issued for the month (folders ``v<n>``), ascending."""
    if not month_dir.is_dir():
        return []
    return sorted(
        int(p.name[1:]) for p in month_dir.iterdir() if p.is_dir() and p.name[:1] == "v" and p.name[1:].isdigit()
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(
            f"{path}: unreadable ({exc}); an issued report is a record: restore it from the backup"
        ) from exc


def latest(issued_dir: Path, month: str) -> Issue | None:
    """The latest issued version of ``month`` (None before the first)."""
    versions = _versions(Path(issued_dir) / month)
    if not versions:
        return None
    folder = Path(issued_dir) / month / f"v{versions[-1]}"
    manifest = _read_json(folder / MANIFEST)
    states = _read_json(folder / STATES)
    if not isinstance(manifest, dict) or not isinstance(states, dict) or "headline" not in manifest:
        raise CorruptFileError(
            f"{folder / MANIFEST}: not an issued-report manifest; restore the folder from the backup"
        )
    return Issue(
        month,
        int(manifest["version"]),
        str(manifest["issued_at"]),
        False,
        manifest.get("revision"),
        dict(manifest["headline"]),
        {str(k): str(v) for k, v in states.items()},
    )


def _compared(headline: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headline.items() if k not in UNCOMPARED}


def plan_issue(issued_dir: Path, month: str, headline: Mapping[str, Any], states: Mapping[str, str]) -> Issue:
    """The version this run's figures are: the latest one if they equal it, else the next one (with its revision)."""
    figures, case_states = _compared(headline), {str(k): str(v) for k, v in states.items()}
    last = latest(issued_dir, month)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    if last is None:
        return Issue(month, 1, now, True, None, figures, case_states)
    if last.headline == figures and last.states == case_states:
        return last
    changed = [
        {"figure": k, "old": last.headline.get(k), "new": figures.get(k)}
        for k in [*figures, *(k for k in last.headline if k not in figures)]
        if last.headline.get(k) != figures.get(k)
    ]
    cases = [
        {"case_id": c, "old": last.states.get(c), "new": case_states.get(c)}
        for c in sorted(set(last.states) | set(case_states))
        if last.states.get(c) != case_states.get(c)
    ]
    revision = {"from_version": last.version, "from_issued_at": last.issued_at, "figures": changed, "cases": cases}
    return Issue(month, last.version + 1, now, True, revision, figures, case_states)


def revision_markdown(issue: Issue) -> str:
    """The revision note of a version after the first (Chinese, then English)."""
    rev = issue.revision or {}
    lines = [
        f"# {issue.month} 月报修订说明 Revision note: v{issue.version} replaces v{rev.get('from_version')}",
        "",
        f"- 本版签发 issued: {issue.issued_at}",
        f"- 上一版 previous: v{rev.get('from_version')}, {rev.get('from_issued_at')}",
        "",
        "## 指标变化 Figures changed (old → new)",
        "",
        "| 指标 figure | 原值 old | 新值 new |",
        "|---|--:|--:|",
        *(f"| {r['figure']} | {_text(r['old'])} | {_text(r['new'])} |" for r in rev.get("figures", [])),
        "",
        "## 案件状态变化 Case states changed at the month's end (old → new)",
        "",
        "| 案件编号 case | 原状态 old | 新状态 new |",
        "|---|---|---|",
        *(f"| {r['case_id']} | {_text(r['old'])} | {_text(r['new'])} |" for r in rev.get("cases", [])),
        "",
    ]
    return "\n".join(lines)


def _text(value: Any) -> str:
    return "–" if value is None else str(value)


def write_issue(
    issued_dir: Path, issue: Issue, files: Mapping[str, Path], *, ledger_events: int, ledger_events_to_month: int
) -> Path:
    """Archive ``files`` ({name in the version folder: the file written}) as ``issue``'s version folder.

    Written in a temporary folder beside it, then renamed into place; an existing version is never
    replaced (the rename fails, the temporary folder is removed).

    Returns:
        The version folder.
    """
    month_dir = Path(issued_dir) / issue.month
    month_dir.mkdir(parents=True, exist_ok=True)
    dest = month_dir / f"v{issue.version}"
    if dest.exists():
        raise CorruptFileError(f"{dest}: already issued; an issued version is never replaced")
    tmp = Path(tempfile.mkdtemp(prefix=f".v{issue.version}.", dir=month_dir))
    try:
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        (tmp / STATES).write_text(json.dumps(issue.states, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        if issue.revision is not None:
            (tmp / REVISION).write_text(revision_markdown(issue), encoding="utf-8")
        manifest = {
            "month": issue.month,
            "version": issue.version,
            "issued_at": issue.issued_at,
            "ledger_events": ledger_events,
            "ledger_events_to_month": ledger_events_to_month,
            "headline": issue.headline,
            "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())},
            "revision": issue.revision,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, dest)  # fails when dest appeared meanwhile: never replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
