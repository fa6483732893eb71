"""Properties of the lifecycle, the fold and field-update import (issue 12), with hypothesis.

- Any order of valid field-update batches (files) gives the same ledger: the fold applies a month's
  updates by date, then a stable key of their content, whatever order the files came in.
- No sequence of events reaches a state outside STATES; a forbidden row is refused by the import's check
  exactly when the ledger build would refuse it, so it is refused before anything is written.
- Import is idempotent: the same rows again, under another name, in another encoding or as XLSX, add nothing.

In memory (the builder, as the build drives it) for speed; the CLI's own tests are tests/test_ledger_import.py.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import openpyxl
import pandas as pd
import pyproj
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import LedgerSettings
from pipeline.errors import IllegalTransitionError
from pipeline.ledger.builder import LedgerBuilder
from pipeline.ledger.events import EVENT_KINDS, FIELD_KINDS
from pipeline.ledger.fieldio import FieldFile, FieldUpdate, order_updates, read_field_file
from pipeline.ledger.importer import check_against_ledger
from pipeline.ledger.lifecycle import STATES, TRANSITIONS, apply
from tests.test_fieldio import write_csv
from tests.test_ledger import CRS, sq

PCRS = pyproj.CRS.from_user_input(CRS)
PROPS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
WORK = Path(tempfile.mkdtemp(prefix="scarwatch-props-"))
CASES = ("C-1", "C-2", "C-3")


def _builder() -> LedgerBuilder:
    b = LedgerBuilder(LedgerSettings(), None)
    b.seed(
        gpd.GeoDataFrame(
            {
                "case_id": list(CASES),
                "opened_at": ["2026-01-05"] * len(CASES),
                "state": ["warning"] * len(CASES),
                "category": ["illegal_construction"] * len(CASES),
                "note": [""] * len(CASES),
                "deadline": [""] * len(CASES),
            },
            geometry=[sq(100 * i, 0) for i in range(len(CASES))],
            crs=CRS,
        ),
        WORK / "cases.gpkg",
    )
    return b


def _update(case_id: str, day: int, kind: str, source: str, row: int, actor: str = "") -> FieldUpdate:
    at = f"2026-03-{day:02d}"
    return FieldUpdate(
        source=source,
        path=WORK / source,
        row=row,
        month="2026-03",
        at=at,
        kind=kind,
        actor=actor,
        note="",
        deadline="2026-04-30" if kind == "ordered" else "",
        case_id=case_id,
        x=None,
        y=None,
    )


def _ledger(updates: Sequence[FieldUpdate]) -> tuple[pd.DataFrame, dict[str, str]]:
    b = _builder()
    b.field(order_updates(updates))
    events, cases, _ = b.frames(PCRS)
    cols = ["event_id", "seq", "case_id", "at", "kind", "source", "actor", "evidence", "deadline"]
    return pd.DataFrame(events[cols]), dict(zip(cases["case_id"], cases["state"], strict=True))


@st.composite
def walks(draw: st.DrawFn) -> dict[str, list[tuple[int, str]]]:
    """A legal history per case: (day, kind) steps through TRANSITIONS from 'warning', days increasing.

    Only kinds an inspector may write (FIELD_KINDS): ``reopened`` is the ledger's own, from imagery.
    """
    out: dict[str, list[tuple[int, str]]] = {}
    for case_id in CASES:
        state, day, steps = "warning", 1, []
        for _ in range(draw(st.integers(0, 5))):
            kind = draw(st.sampled_from(sorted(k for k in TRANSITIONS[state] if k in FIELD_KINDS)))
            day += draw(st.integers(1, 5))
            steps.append((day, kind))
            state = TRANSITIONS[state][kind]
        out[case_id] = steps
    return out


@st.composite
def batched(draw: st.DrawFn) -> tuple[dict[str, list[tuple[int, str]]], list[list[FieldUpdate]]]:
    """Walks, their rows dealt into 1..4 files (each a batch, in row order), and the files in some order."""
    history = draw(walks())
    n = draw(st.integers(1, 4))
    files: list[list[FieldUpdate]] = [[] for _ in range(n)]
    for case_id, steps in history.items():
        for day, kind in steps:
            i = draw(st.integers(0, n - 1))
            files[i].append(_update(case_id, day, kind, f"field_updates/2026-03_{i}.csv", len(files[i]) + 2))
    return history, draw(st.permutations(files))


@settings(PROPS, max_examples=150)
@given(batched(), st.randoms(use_true_random=False))
def test_any_order_of_valid_batches_gives_the_same_ledger(
    case: tuple[dict[str, list[tuple[int, str]]], list[list[FieldUpdate]]], rnd: object
) -> None:
    history, files = case
    shuffled = list(files)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a_events, a_states = _ledger([u for f in files for u in f])
    b_events, b_states = _ledger([u for f in shuffled for u in f])
    pd.testing.assert_frame_equal(a_events.reset_index(drop=True), b_events.reset_index(drop=True))
    assert a_states == b_states
    for case_id, steps in history.items():  # and the state is the fold of the case's history by date
        expected = "warning"
        for _, kind in steps:
            expected = TRANSITIONS[expected][kind]
        assert a_states[case_id] == expected
    field = a_events[a_events["source"] == "field"].sort_values("seq")
    assert list(field["at"]) == sorted(field["at"])  # the log is in date order


@settings(PROPS, max_examples=300)
@given(st.lists(st.sampled_from(EVENT_KINDS), max_size=12))
def test_no_sequence_of_events_reaches_a_state_outside_states(kinds: list[str]) -> None:
    state: str | None = None
    for kind in kinds:
        try:
            state = apply(state, kind)
        except IllegalTransitionError:
            assert state is None or kind not in TRANSITIONS[state]
            return
        assert state is None or state in STATES


def _live(b: LedgerBuilder) -> tuple[pd.DataFrame, gpd.GeoDataFrame]:
    events, cases, _ = b.frames(PCRS)
    return pd.DataFrame(events), cases


@settings(PROPS, max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(CASES), st.sampled_from(FIELD_KINDS)), min_size=1, max_size=8))
def test_forbidden_rows_are_refused_before_writing(rows: list[tuple[str, str]]) -> None:
    updates = [_update(c, 2 + 3 * i, k, "field_updates/2026-03.csv", i + 2) for i, (c, k) in enumerate(rows)]
    live = _builder()
    ff = FieldFile(WORK / "2026-03.csv", "field_updates/2026-03.csv", "2026-03", "utf-8", updates=updates)
    problems, new, _ = check_against_ledger(ff, *_live(live), LedgerSettings())
    try:
        _, states = _ledger(updates)
    except IllegalTransitionError as exc:
        assert problems, f"the build refused ({exc}) what the import's check let through"
        first = min(p.row for p in problems)
        assert f"row {first}:" in str(exc)  # the same first row
        return
    assert not problems, [p.line() for p in problems]
    assert set(states.values()) <= set(STATES)
    assert sum(new.values()) == len(updates)


def _write(path: Path, updates: Sequence[FieldUpdate], form: str) -> Path:
    header = ["案件编号 case_id", "核查结果 finding", "核查日期 checked_at", "核查人 inspector", "限期 deadline"]
    zh = {"confirmed": "确认", "stopped": "制止", "demolished": "拆除", "ordered": "限期处置"}
    rows = [
        [u.case_id, zh.get(u.kind, u.kind), u.at.replace("-0", "/").replace("-", "/"), u.actor, u.deadline]
        for u in updates
    ]
    if form == "xlsx":
        book = openpyxl.Workbook()
        ws = book.active
        assert ws is not None
        ws.title = "派单"
        ws.append(header)
        for r, u in zip(rows, updates, strict=True):
            ws.append([r[0], r[1], dt.date.fromisoformat(u.at), *r[3:]])  # a real date cell
        book.save(path)
        return path
    return write_csv(path, header, rows, form)


@settings(PROPS, max_examples=40)
@given(
    walks(), st.sampled_from(["utf-8", "utf-8-sig", "gbk", "xlsx"]), st.sampled_from(["utf-8-sig", "gb18030", "xlsx"])
)
def test_import_is_idempotent_across_names_and_encodings(
    history: dict[str, list[tuple[int, str]]], first: str, second: str
) -> None:
    updates = [_update(c, day, kind, "", 0, actor="张三") for c, steps in history.items() for day, kind in steps]
    a = _write(WORK / f"2026-03_a.{'xlsx' if first == 'xlsx' else 'csv'}", updates, first)
    b = _write(WORK / f"另一个.{'xlsx' if second == 'xlsx' else 'csv'}", updates, second)
    fa = read_field_file(a, source=f"field_updates/{a.name}", month="2026-03", crs=PCRS)
    fb = read_field_file(b, source=f"field_updates/2026-03_z_{b.name}", month=None, crs=PCRS)
    assert fa.problems == [] and fb.problems == []
    assert [u.fact for u in order_updates(fa.updates)] == [u.fact for u in order_updates(fb.updates)]
    once, once_states = _ledger(fa.updates)
    twice, twice_states = _ledger([*fa.updates, *fa.updates, *fb.updates])  # the file again, and renamed
    pd.testing.assert_frame_equal(once.reset_index(drop=True), twice.reset_index(drop=True))
    assert once_states == twice_states
    b_live = _builder()
    b_live.field(order_updates(fa.updates))
    problems, new, already = check_against_ledger(fb, *_live(b_live), LedgerSettings())
    assert problems == [] and sum(new.values()) == 0 and already == len(fb.updates)


@pytest.mark.parametrize("kind", FIELD_KINDS)
def test_every_field_kind_is_reachable_from_warning(kind: str) -> None:
    """The walks above can produce every kind (the property is not vacuous for any)."""
    seen, frontier = set(), ["warning"]
    while frontier:
        s = frontier.pop()
        for k, nxt in TRANSITIONS[s].items():
            if (s, k) not in seen:
                seen.add((s, k))
                frontier.append(nxt)
    assert kind in {k for _, k in seen}
