"""Inspectors' field-update files, as inspectors write them: CSV or XLSX, read and checked whole.

**Files.** ``<raw>/field_updates/`` holds ``<YYYY-MM>.csv``, ``<YYYY-MM>.xlsx`` and, for more than one
file a month, ``<YYYY-MM>_<tag>.csv|.xlsx`` (``2026-03_unit-a.xlsx``; ``scarwatch ledger import`` names its
copies ``<YYYY-MM>_<UTC time>_<digest>.<ext>``). Every file is *month-bound*: each row is dated in the
file's month. An upper-case ``.CSV``, ``.xls``/``.ods`` or any other name is refused, naming the file.

**Encodings.** A CSV is decoded as UTF-8 (a BOM is accepted), else as GB18030 (a superset of GBK, what a
Chinese-locale Excel writes), both strictly; the encoding used is logged at INFO; a file neither decodes
is one error naming the byte offset. An XLSX is read with openpyxl (read-only): the sheet ``派单`` when
there is one, else the first sheet (a workbook with several sheets says which on stderr); header row 1.

**Columns** (contract C4): a header matches a field when, stripped, lower-cased and whitespace collapsed,
it equals one of the field's aliases or "<alias> <alias>" of that field (``案件编号 case_id``); other
columns (the dispatch list's GCJ-02 pair, thumbnails, areas) are ignored. Kinds in English or Chinese;
dates ISO, ``2026/3/2``, ``2026-3-2``, ``2026.3.2``, ``2026年3月2日``, Excel serial numbers, date(-time)
cells (the date is taken). A position is ``case_id``, else ``x``,``y`` in the ledger CRS, else ``lon``,
``lat`` in WGS84 (transformed to the ledger CRS). A row without finding and date is *not yet checked*:
skipped and counted. Row numbers count like the spreadsheet: the header is row 1.

Every row is checked and every problem collected (:class:`FieldUpdateProblems`) before any event is made.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pyproj import CRS, Transformer

from pipeline.errors import CorruptFileError, LedgerError
from pipeline.ledger.events import EVENT_KINDS, FIELD_KINDS, LIFECYCLE_KINDS, check_month_name

log = logging.getLogger(__name__)

FIELD_DIR = "field_updates"
SUFFIXES: tuple[str, ...] = (".csv", ".xlsx")
DISPATCH_SHEET = "派单"
NAME_RE = re.compile(r"^(?P<month>\d{4}-\d{2})(?:_(?P<tag>.+))?$")
NAME_RULE = "<YYYY-MM>.csv, <YYYY-MM>.xlsx or <YYYY-MM>_<tag>.csv|.xlsx"

ALIASES: dict[str, tuple[str, ...]] = {
    "case_id": ("case_id", "案件编号"),
    "at": ("at", "date", "checked_at", "核查日期", "日期"),
    "kind": ("kind", "finding", "核查结果", "结果"),
    "actor": ("actor", "inspector", "核查人"),
    "note": ("note", "备注"),
    "deadline": ("deadline", "限期"),
    "x": ("x",),
    "y": ("y",),
    "lon": ("lon", "lng", "longitude", "lon_wgs84", "经度", "经度wgs84"),
    "lat": ("lat", "latitude", "lat_wgs84", "纬度", "纬度wgs84"),
}
"""Field -> the header aliases it accepts (contract C4). GCJ-02 columns are never positions."""

CHINESE_KINDS: dict[str, str] = {
    "确认": "confirmed",
    "发现": "confirmed",
    "排除": "dismissed",
    "制止": "stopped",
    "限期处置": "ordered",
    "立案": "ordered",
    "限期拆除": "ordered",
    "拆除": "demolished",
    "修复": "repaired",
    "销号": "closed",
}
"""Chinese words for the field kinds (contract C4)."""

EXCEL_EPOCH = dt.date(1899, 12, 30)  # Excel's day 0 (its 1900 leap-year bug makes day 60 29 Feb 1900)
SERIAL_RANGE = (20000, 80000)  # 1954 .. 2119: a number outside is not taken for a date
DATE_RE = re.compile(r"^(\d{4})\s*[-/.年]\s*(\d{1,2})\s*[-/.月]\s*(\d{1,2})\s*日?(?:[ T].*)?$")
DATE_FIX = "write it like 2026-03-02 (also 2026/3/2, 2026.3.2, 2026年3月2日 or a date cell)"


@dataclass(frozen=True, slots=True)
class FieldUpdate:
    """One checked row of a field-update file (the case is resolved later, against the ledger)."""

    source: str  # the file as named in evidence, relative to raw_dir: field_updates/2026-03.csv
    path: Path
    row: int
    month: str
    at: str
    kind: str
    actor: str
    note: str
    deadline: str
    case_id: str
    x: float | None
    y: float | None

    @property
    def where(self) -> str:
        """The file and row, for messages."""
        return f"{self.path} row {self.row}"

    @property
    def evidence(self) -> str:
        """The ``file:row`` evidence of the event this update becomes."""
        return f"{self.source}:{self.row}"

    @property
    def fact(self) -> tuple[object, ...]:
        """What the row says, without where it was written: two rows with one fact are one event."""
        return (self.case_id, self.x, self.y, self.at, self.kind, self.actor, self.note, self.deadline)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a field-update file: where (file, sheet, row), and the message with its fix."""

    where: str
    text: str
    row: int = 0  # for sorting (0: the file or its header)

    def line(self) -> str:
        """The one line printed for it."""
        return f"{self.where}: {self.text}"


class FieldUpdateProblems(LedgerError):
    """A field-update file with problems; :attr:`problems` holds every one, the message the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        more = len(self.problems) - 1
        extra = f" (and {more} more problems; `scarwatch ledger import FILE --dry-run` lists them)" if more else ""
        super().__init__(self.problems[0].line() + extra)

    def lines(self, limit: int = 50) -> list[str]:
        """One line per problem, at most ``limit`` and then "and N more"."""
        out = [p.line() for p in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"... and {len(self.problems) - limit} more problems")
        return out


@dataclass
class FieldFile:
    """A field-update file read and checked on its own (no ledger yet)."""

    path: Path
    source: str
    month: str | None
    encoding: str  # utf-8 | utf-8-sig | gb18030 | xlsx
    sheet: str = ""
    updates: list[FieldUpdate] = field(default_factory=list)
    not_checked: int = 0  # rows without finding and date (a returned dispatch list is usually partly filled)
    repeats: int = 0  # rows that repeat an earlier row of the file (one event)
    problems: list[Problem] = field(default_factory=list)
    n_rows: int = 0  # data rows (blank ones excluded)


# -- the folder ---------------------------------------------------------------------------------------


def month_of_name(name: str) -> str | None:
    """The month a field-update file name gives (``2026-03_unit-a.xlsx`` -> ``2026-03``), else None."""
    stem = Path(name).name.rsplit(".", 1)[0]
    m = NAME_RE.match(stem)
    return m.group("month") if m else None


def field_update_files(field_dir: Path) -> dict[str, list[Path]]:
    """Return ``{month: [paths]}`` of the field-update files in ``field_dir`` (:data:`NAME_RULE`), sorted.

    Raises:
        LedgerError: a file there does not follow the naming rule (its updates would otherwise be lost).
    """
    if not field_dir.exists():
        log.warning("%s: no field-update folder; no field updates are applied", field_dir)
        return {}
    if not field_dir.is_dir():
        raise LedgerError(f"{field_dir}: is not a folder; field updates go in a folder of {NAME_RULE} files")
    out: dict[str, list[Path]] = {}
    for path in sorted(field_dir.iterdir()):
        if path.name.startswith((".", "~$")):  # editor lock, hidden and temporary files
            log.debug("skipping %s", path)
            continue
        suffix = path.suffix
        if suffix.lower() in (".xls", ".ods", ".et", ".numbers"):
            raise LedgerError(
                f"{path}: field updates must be CSV or XLSX; save the sheet as Excel Workbook (.xlsx) or "
                f"'CSV UTF-8' named {path.stem}.xlsx or {path.stem}.csv and remove this file"
            )
        if suffix not in SUFFIXES:
            hint = (
                f"rename it {path.stem}{suffix.lower()}" if suffix.lower() in SUFFIXES else "move it out of the folder"
            )
            raise LedgerError(f"{path}: not a field-update file ({NAME_RULE}, lower-case extension); {hint}")
        if not path.is_file():
            raise LedgerError(f"{path}: not a readable file (a folder, or a link to nothing); replace it with the file")
        month = month_of_name(path.name)
        if month is None:
            check_month_name(path.stem, f"{path}: field updates must be named {NAME_RULE}; file name")
        out.setdefault(check_month_name(str(month), f"{path}: file name"), []).append(path)
    return out


# -- reading the table --------------------------------------------------------------------------------


def decode(data: bytes, path: Path) -> tuple[str, str]:
    """Decode a CSV's bytes: UTF-8 (BOM accepted), else GB18030, both strictly; return text and encoding.

    Raises:
        CorruptFileError: neither decodes (the message gives the byte offset of the first bad byte).
    """
    try:
        text = data.decode("utf-8-sig")
        return text, "utf-8-sig" if data.startswith(codecs.BOM_UTF8) else "utf-8"
    except UnicodeDecodeError as utf8:
        try:
            return data.decode("gb18030"), "gb18030"
        except UnicodeDecodeError as gb:
            raise CorruptFileError(
                f"{path}: is neither UTF-8 (bad byte at offset {utf8.start}) nor GBK/GB18030 (bad byte at offset "
                f"{gb.start}); save it from Excel as 'CSV UTF-8' or as .xlsx"
            ) from None


def _csv_rows(path: Path) -> tuple[list[list[object]], str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot be read ({exc.strerror}); check the file") from exc
    text, encoding = decode(data, path)
    log.info("%s: read as %s", path, "UTF-8 with BOM" if encoding == "utf-8-sig" else encoding.upper())
    try:
        rows: list[list[object]] = [list(r) for r in csv.reader(io.StringIO(text, newline=""))]
    except csv.Error as exc:
        raise CorruptFileError(f"{path}: not a readable CSV ({exc}); re-export it as CSV UTF-8") from exc
    return rows, encoding


def _xlsx_rows(path: Path) -> tuple[list[list[object]], str]:
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - zipfile, XML and openpyxl raise many types for a broken workbook
        raise CorruptFileError(f"{path}: cannot be read as an Excel workbook ({exc}); save it again as .xlsx") from exc
    try:
        names = list(book.sheetnames)
        if not names:
            raise CorruptFileError(f"{path}: the workbook has no sheet; save the field updates in its first sheet")
        name = DISPATCH_SHEET if DISPATCH_SHEET in names else names[0]
        if len(names) > 1 and name != DISPATCH_SHEET:
            log.warning("%s: %d sheets, none named %s: reading the first, %r", path, len(names), DISPATCH_SHEET, name)
        try:
            rows = [list(r) for r in book[name].iter_rows(values_only=True)]
        except Exception as exc:  # noqa: BLE001
            raise CorruptFileError(f"{path}: sheet {name!r} cannot be read ({exc}); save the workbook again") from exc
    finally:
        book.close()
    return rows, name


def _norm_header(value: object) -> str:
    return " ".join(str(value if value is not None else "").split()).lower()


def header_field(header: object) -> str | None:
    """The field a column header names (contract C4), or None for a column the reader ignores."""
    text = _norm_header(header)
    for name, aliases in ALIASES.items():
        if text in aliases:
            return name
        parts = text.split(" ")
        if len(parts) == 2 and all(p in aliases for p in parts):
            return name
    return None


def _cell_text(value: object) -> str:
    """A cell as stripped text ("" for None/NaN; 12.0 -> "12")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_kind(value: object) -> str | None:
    """A finding in English or Chinese (``确认``, ``确认 confirmed``) as a field kind; None if not one."""
    words = _cell_text(value).lower().split()
    kinds = {CHINESE_KINDS.get(w, w) for w in words}
    if len(kinds) == 1:
        kind = kinds.pop()
        return kind if kind in FIELD_KINDS else None
    return None


def parse_field_date(value: object) -> str | None:
    """A date cell as ISO ``YYYY-MM-DD``; "" for an empty cell, None when it is not a date.

    Accepts date and datetime cells (the date is taken), Excel serial numbers (as numbers or digits) and
    the written forms of :data:`DATE_FIX`.
    """
    if value is None or value == "":
        return ""
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return _serial(float(value))
    text = str(value).strip()
    if not text:
        return ""
    try:
        return _serial(float(text)) if re.fullmatch(r"\d+(\.\d+)?", text) else _ymd(text)
    except (ValueError, OverflowError):
        return None


def _serial(number: float) -> str | None:
    if not math.isfinite(number) or not SERIAL_RANGE[0] <= number < SERIAL_RANGE[1]:
        return None
    return (EXCEL_EPOCH + dt.timedelta(days=int(number))).isoformat()


def _ymd(text: str) -> str | None:
    m = DATE_RE.match(text)
    if not m:
        return None
    y, mo, d = (int(g) for g in m.groups())
    return dt.date(y, mo, d).isoformat()


@lru_cache(maxsize=8)
def _to_crs(crs_wkt: str) -> tuple[Transformer, tuple[float, float, float, float] | None]:
    crs = CRS.from_wkt(crs_wkt)
    area = crs.area_of_use
    bounds = (area.west, area.south, area.east, area.north) if area is not None else None
    return Transformer.from_crs(CRS.from_epsg(4326), crs, always_xy=True), bounds


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# -- one file -----------------------------------------------------------------------------------------


def read_field_file(path: Path, *, source: str, month: str | None, crs: CRS | None = None) -> FieldFile:
    """Read one field-update file and check every row on its own; collect every problem (no raise).

    Args:
        path: the CSV or XLSX.
        source: the file as evidence names it (``field_updates/2026-03.csv``).
        month: the file's month (every row must be dated in it); None takes it from the rows' dates,
            which must then all fall in one month.
        crs: the ledger CRS (lon/lat are transformed to it; without it lon/lat positions are a problem).

    Raises:
        CorruptFileError: the file cannot be read at all (undecodable, not a workbook, not CSV).
    """
    path = Path(path)
    if path.suffix.lower() == ".xlsx":
        rows, sheet = _xlsx_rows(path)
        encoding, place = "xlsx", f"{path} sheet {sheet!r}"
    elif path.suffix.lower() == ".csv":
        rows, encoding = _csv_rows(path)
        sheet, place = "", str(path)
    else:
        raise CorruptFileError(f"{path}: a field-update file is .csv or .xlsx; save it as one of those")
    out = FieldFile(path, source, month, encoding, sheet)
    while rows and all(_cell_text(c) == "" for c in rows[-1]):
        rows.pop()
    if not rows:
        return out
    columns: dict[str, int] = {}
    for i, header in enumerate(rows[0]):
        name = header_field(header)
        if name is None:
            continue
        if name in columns:
            out.problems.append(
                Problem(
                    f"{place} row 1",
                    f"columns {_cell_text(rows[0][columns[name]])!r} and {_cell_text(header)!r} both give "
                    f"{name!r}; keep one",
                )
            )
        columns.setdefault(name, i)
    missing = [f for f in ("at", "kind") if f not in columns]
    if missing:
        out.problems.append(
            Problem(
                f"{place} row 1",
                f"no column for {' and '.join(missing)} (headers {[_cell_text(h) for h in rows[0]]!r}); add "
                "'at' (or 核查日期 checked_at) and 'kind' (or 核查结果 finding)",
            )
        )
    has_xy, has_lonlat = {"x", "y"} <= columns.keys(), {"lon", "lat"} <= columns.keys()
    if "case_id" not in columns and not has_xy and not has_lonlat:
        out.problems.append(
            Problem(
                f"{place} row 1",
                "field updates need a 'case_id' column, or 'x' and 'y' (ledger CRS), or 'lon' and 'lat' (WGS84); "
                "add them",
            )
        )
    if out.problems:
        return out
    cells = [(n, r) for n, r in enumerate(rows[1:], start=2) if any(_cell_text(c) for c in r)]
    out.n_rows = len(cells)
    parsed = [(n, r, {k: (r[i] if i < len(r) else None) for k, i in columns.items()}) for n, r in cells]
    if month is None:
        month = _month_from_rows(parsed, place, out)
        out.month = month
    seen: dict[tuple[object, ...], int] = {}
    for n, _, cell in parsed:
        update = _check_row(cell, n, place, out, month, crs)
        if update is None:
            continue
        if update.fact in seen:  # the same fact twice (a pasted row): one event, the first row's
            log.warning("%s row %d: repeats row %d; applied once", place, n, seen[update.fact])
            out.repeats += 1
            continue
        seen[update.fact] = n
        out.updates.append(update)
    return out


def _month_from_rows(parsed: Iterable[tuple[int, list[object], dict[str, object]]], place: str, out: FieldFile) -> str:
    months: dict[str, list[int]] = {}
    for n, _, cell in parsed:
        at = parse_field_date(cell.get("at"))
        if at:
            months.setdefault(at[:7], []).append(n)
    if len(months) > 1:
        shown = "; ".join(
            f"{m}: rows {', '.join(map(str, ns[:5]))}{' ...' if len(ns) > 5 else ''}" for m, ns in months.items()
        )
        out.problems.append(
            Problem(
                place,
                f"rows are dated in {len(months)} months ({shown}); a file is applied in one month: split it per "
                "month, or give --month M (rows of other months are then refused)",
            )
        )
    return next(iter(months)) if len(months) == 1 else ""  # several: that one problem, no row is 'outside'


def _check_row(
    cell: dict[str, object], n: int, place: str, out: FieldFile, month: str, crs: CRS | None
) -> FieldUpdate | None:
    where = f"{place} row {n}"
    problems: list[str] = []
    raw_kind, raw_at = _cell_text(cell.get("kind")), cell.get("at")
    at = parse_field_date(raw_at)
    if not raw_kind and at == "":
        out.not_checked += 1  # not yet checked: no finding, no date
        return None
    kind = parse_kind(raw_kind)
    if not raw_kind:
        problems.append("kind is empty but the row has a date; fill the finding (核查结果) or clear the date")
    elif kind is None:
        hint = " (imagery observations come from flags)" if raw_kind in EVENT_KINDS else ""
        zh = "/".join(CHINESE_KINDS)
        problems.append(
            f"kind {raw_kind!r} is not a field update kind{hint}; use one of {', '.join(FIELD_KINDS)} or {zh}"
        )
    if at is None:
        problems.append(f"at {_cell_text(raw_at)!r} is not a date; {DATE_FIX}")
    elif at == "":
        problems.append("column 'at' is empty but the row has a finding; give the date of the check (核查日期)")
    elif month and at[:7] != month:
        problems.append(
            f"at {at} is outside {month}; move the row to field_updates/{at[:7]}.csv "
            f"(or import it with --month {at[:7]})"
        )
    deadline = parse_field_date(cell.get("deadline"))
    if deadline is None:
        problems.append(f"deadline {_cell_text(cell.get('deadline'))!r} is not a date; {DATE_FIX}")
        deadline = ""
    elif kind == "ordered" and not deadline:
        problems.append("column 'deadline' is empty: 'ordered' (限期处置) sets a deadline; give it, like 2026-04-30")
    elif deadline and at and deadline < at:
        problems.append(f"deadline {deadline} is before at {at}; fix the deadline")
    case_id = _cell_text(cell.get("case_id"))
    x = y = None
    if not case_id:
        x, y = _position(cell, crs, problems)
    for text in problems:
        out.problems.append(Problem(where, text, n))
    if problems or kind is None or not at:
        return None
    return FieldUpdate(
        source=out.source,
        path=out.path,
        row=n,
        month=month,
        at=at,
        kind=kind,
        actor=_cell_text(cell.get("actor")),
        note=_cell_text(cell.get("note")),
        deadline=deadline,
        case_id=case_id,
        x=x,
        y=y,
    )


def _position(cell: dict[str, object], crs: CRS | None, problems: list[str]) -> tuple[float | None, float | None]:
    """x, y in the ledger CRS from the row's x/y or lon/lat (problems appended); None, None on failure."""
    tx, ty = _cell_text(cell.get("x")), _cell_text(cell.get("y"))
    tlon, tlat = _cell_text(cell.get("lon")), _cell_text(cell.get("lat"))
    if tx or ty:
        x, y = _number(tx), _number(ty)
        if x is None or y is None:
            problems.append(f"x {tx!r}, y {ty!r} are not finite numbers; give map coordinates in the ledger CRS")
            return None, None
        if abs(x) <= 180 and abs(y) <= 90:
            problems.append(
                f"x {tx}, y {ty} look like longitude/latitude, not map coordinates in the ledger CRS; "
                "put them in columns 'lon' and 'lat' (WGS84)"
            )
            return None, None
        return x, y
    if tlon or tlat:
        lon, lat = _number(tlon), _number(tlat)
        if lon is None or lat is None or not (-180 <= lon <= 180 and -90 <= lat <= 90):
            problems.append(f"lon {tlon!r}, lat {tlat!r} are not WGS84 degrees; give them like 125.32, 43.88")
            return None, None
        if crs is None:
            problems.append("lon/lat need the ledger CRS, which is not known here; give case_id")
            return None, None
        transformer, bounds = _to_crs(crs.to_wkt())
        if bounds is not None and not (bounds[0] <= lon <= bounds[2] and bounds[1] <= lat <= bounds[3]):
            problems.append(
                f"lon {tlon}, lat {tlat} lie outside the ledger CRS's area of use (lon {bounds[0]:g}..{bounds[2]:g}, "
                f"lat {bounds[1]:g}..{bounds[3]:g}); check the point (longitude first? WGS84, not GCJ-02?)"
            )
            return None, None
        x, y = transformer.transform(lon, lat)
        return float(x), float(y)
    problems.append("neither case_id nor x,y nor lon,lat is given; give the case id or the position")
    return None, None


def read_field_updates(path: Path, month: str, source: str, *, crs: CRS | None = None) -> list[FieldUpdate]:
    """Read and check one month's field-update file of the folder; every row before any event is made.

    Raises:
        CorruptFileError: the file cannot be read.
        FieldUpdateProblems: any row or header problem (all are collected; the message names the first).
    """
    ff = read_field_file(path, source=source, month=month, crs=crs)
    if ff.problems:
        raise FieldUpdateProblems(ff.problems)
    if ff.n_rows == 0:
        if path.stat().st_size == 0:
            log.warning("%s is empty: no field updates for %s (if they were lost, restore the file)", path, month)
        else:
            log.warning("%s holds a header but no rows: no field updates for %s", path, month)
    if ff.not_checked:
        log.info("%s: %d rows not yet checked (no finding, no date): skipped", path, ff.not_checked)
    return ff.updates


KIND_RANK: dict[str, int] = {k: i for i, k in enumerate(LIFECYCLE_KINDS)}


def order_updates(updates: Iterable[FieldUpdate]) -> list[FieldUpdate]:
    """A month's updates from all its files in the fold order.

    By date, then a stable key of the content (the lifecycle order of the kind, the case, ...), then file
    and row: the order files arrived in does not matter, and of two rows with one fact the earlier file's
    (imports sort by time) comes first.
    """
    return sorted(
        updates,
        key=lambda u: (
            u.at,
            KIND_RANK.get(u.kind, 99),
            u.case_id,
            u.x if u.x is not None else math.inf,
            u.y if u.y is not None else math.inf,
            u.actor,
            u.note,
            u.deadline,
            u.source,
            u.row,
        ),
    )
