"""The ``scarwatch`` command: one subcommand per pipeline stage.

Thin by design: parse options, load params.yaml, call one stage function, print one line saying what was
written where. Every expected error (a :class:`~pipeline.errors.ScarWatchError`) becomes one line on
stderr and exit status 2. Heavy libraries (torch, the warping stack) are imported inside the commands
that need them so ``scarwatch --help`` and the light stages start fast.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline import __version__
from pipeline.config import Settings, load_settings
from pipeline.errors import ScarWatchError

log = logging.getLogger("pipeline")
F = TypeVar("F", bound=Callable[..., Any])
EXIT_USAGE = 2
EXIT_MACHINE = 1  # the disk is full or a path is not writable: not the inputs' fault


def _configure_logging(verbosity: int) -> None:
    """Log records go to stderr, one line each (stdout carries each stage's one result line)."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _OneLine(logging.Formatter):
    """A formatter that keeps every record on one line (a multi-line message is joined)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(super().format(record).split("\n"))


def _command_name(ctx: click.Context) -> str:
    """``scarwatch ledger build`` for a subcommand of a group, ``scarwatch align`` for a stage."""
    names: list[str] = []
    c: click.Context | None = ctx
    while c is not None and c.parent is not None:
        names.append(str(c.info_name))
        c = c.parent
    return " ".join(["scarwatch", *reversed(names)])


def _fail(ctx: click.Context, text: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"{_command_name(ctx)}: error: {' '.join(text.split())}", err=True)
    sys.exit(code)


def _os_error_line(exc: BaseException) -> str | None:
    """One line for a failure of the machine rather than of the inputs (disk full, permissions), else None."""
    import errno

    text = " ".join(str(exc).split())
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left on device" in text:
        return f"{text or 'no space left on device'}; free disk space and run again (the previous output is unchanged)"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}{exc.strerror or text}; check the path, free space and permissions, then run again"
    return None


def stage(func: F) -> F:
    """Wrap a subcommand: load settings, time it, turn expected errors into one line and exit 2.

    Errors of the machine (a full disk, a permission denied: :class:`OSError` and GDAL's or pyogrio's
    errors that say "No space left on device") are one line and exit 1, never a traceback; every stage
    writes through a temporary file or folder, so the previous output is intact.
    """

    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> None:
        from pipeline.fileio import gdal_env  # bounded GDAL block cache for every stage that reads rasters

        start = time.perf_counter()
        try:
            settings = load_settings(ctx.obj["params"], ctx.obj.get("overrides"))
            with gdal_env():
                message = func(settings, *args, **kwargs)
        except ScarWatchError as exc:
            _fail(ctx, str(exc))
        except Exception as exc:  # noqa: BLE001 - only machine errors are turned into a line; the rest re-raise
            line = _os_error_line(exc)
            if line is None:
                raise
            _fail(ctx, line, EXIT_MACHINE)
        if message:
            click.echo(f"{message} ({time.perf_counter() - start:.1f} s)")

    return wrapper  # type: ignore[return-value]


month_option = click.option("--month", "-m", required=True, help="Month to process, YYYY-MM (listed in params.yaml).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scarwatch")
@click.option(
    "--params",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("params.yaml"),
    show_default=True,
    help="Parameters file.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one value of the parameters file for this run (the value is read as YAML); repeatable.",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.pass_context
def cli(ctx: click.Context, params: Path, overrides: tuple[str, ...], verbose: int, quiet: bool) -> None:
    """ScarWatch: monthly aerial imagery -> change flags -> scar ledger -> inspector maps and reports."""
    _configure_logging(-1 if quiet else verbose)
    ctx.ensure_object(dict)
    ctx.obj["params"] = params
    ctx.obj["overrides"] = _parse_overrides(overrides)


def _parse_overrides(items: tuple[str, ...]) -> dict[str, Any]:
    """``("train.steps=10", ...)`` -> ``{"train.steps": 10}``; values are parsed as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise click.BadParameter(f"{item!r} is not SECTION.KEY=VALUE (e.g. train.steps=3000)", param_hint="--set")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{item!r}: the value is not valid YAML ({exc})", param_hint="--set") from exc
    return out


DEMO_MANIFEST = ".scarwatch-demo.json"
"""What ``scarwatch demo`` wrote (path -> SHA-256), so it can tell a user's edit from its own files."""


def _demo_edits(out: Path) -> list[str] | None:
    """The files under ``out`` that differ from what the demo wrote; None when the demo did not write it."""
    import json

    from pipeline.fileio import tree_manifest

    manifest = out / DEMO_MANIFEST
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return None
    current = tree_manifest(out, skip=[DEMO_MANIFEST])
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


@cli.command()
@click.option("--force", is_flag=True, help="Regenerate even over files edited since the demo wrote them.")
@stage
def demo(settings: Settings, force: bool = False) -> str:
    """Generate the synthetic demo town (imagery, ledger, layers, field updates, truth).

    Refuses (exit 2) to replace a folder with files edited or added since the demo wrote it, so neither
    `scarwatch demo` nor `dvc repro` discards a user's edits.
    """
    import json

    from pipeline.errors import InputError
    from pipeline.fileio import atomic_path, tree_manifest
    from pipeline.synth import generate_demo

    out = settings.demo.out
    if out.exists() and any(out.iterdir()) and not force:
        edits = _demo_edits(out)
        fix = (
            f"to keep them, copy the folder (e.g. `cp -r {out} data/raw`), set paths.raw to the copy and leave "
            "the demo as it was; to discard them, run `scarwatch demo --force`"
        )
        if edits is None:
            raise InputError(f"{out}: was not written by `scarwatch demo` (no {DEMO_MANIFEST}); {fix}")
        if edits:
            shown = ", ".join(edits[:3]) + (f" and {len(edits) - 3} more" if len(edits) > 3 else "")
            raise InputError(f"{out}: {len(edits)} files changed since the demo wrote them ({shown}); {fix}")
    summary = generate_demo(out, settings.demo)
    with atomic_path(out / DEMO_MANIFEST) as tmp:
        tmp.write_text(json.dumps({"files": tree_manifest(out, skip=[DEMO_MANIFEST])}, indent=1), encoding="utf-8")
    return (
        f"demo town: {len(summary.months)} months, {summary.n_structures} structures, "
        f"{summary.n_changes} scripted changes -> {summary.out_dir}"
    )


@cli.command()
@month_option
@stage
def align(settings: Settings, month: str) -> str:
    """Mosaic, reproject, co-register and normalise a month and its previous month onto one grid."""
    from pipeline.imagery import align_pair, model_resolution

    pair = settings.pair(month)
    summary = align_pair(
        settings.imagery_dir(pair.prev),
        settings.imagery_dir(pair.month),
        settings.pair_dir(month),
        settings.align,
        month=pair.month,
        prev=pair.prev,
        model_res=model_resolution(settings.align, settings.detect),
    )
    return (
        f"aligned {pair.prev} -> {pair.month}: {summary.width}x{summary.height} px at {summary.res:g} m, "
        f"shift ({summary.shift_px[0]:+.2f}, {summary.shift_px[1]:+.2f}) px -> {summary.out_dir}"
    )


def _pair_dir(settings: Settings, month: str) -> Path:
    """The month's aligned pair folder, its sheet paths confined to ``paths.raw``.

    An edited pair.json that points elsewhere is refused before the stage reads anything.
    """
    from pipeline.pair import check_sheet_paths

    out = settings.pair_dir(month)
    check_sheet_paths(out, [settings.paths.raw])
    return out


@cli.command()
@month_option
@stage
def tile(settings: Settings, month: str) -> str:
    """Lay the tile grid over the aligned pair and write the GeoParquet tile index."""
    from pipeline.tiling import tile_pair

    settings.pair(month)
    out = settings.tiles_path(month)
    tiles = tile_pair(_pair_dir(settings, month), out, settings.tile)
    return f"{len(tiles)} tiles of {settings.tile.size} px -> {out}"


@cli.command()
@month_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Override detect.device.")
@click.option("--scheduler", default=None, help="Run on an existing dask.distributed cluster (tcp://host:port).")
@click.option("--method", type=click.Choice(["cnn", "cva"]), default=None, help="Override detect.method.")
@stage
def detect(settings: Settings, month: str, device: str | None, scheduler: str | None, method: str | None) -> str:
    """Run the change detector over every tile and write the probability COG."""
    from pipeline.detect import detect_pair

    settings.pair(month)
    overrides = {k: v for k, v in {"device": device, "method": method}.items() if v is not None}
    detect_settings = settings.detect.model_copy(update=overrides)
    out = settings.prob_path(month)
    summary = detect_pair(
        _pair_dir(settings, month),
        settings.tiles_path(month),
        out,
        detect_settings,
        overlap=settings.tile.overlap,
        scheduler=scheduler,
    )
    return (
        f"{summary.n_tiles} tiles on {summary.device}, {summary.tiles_per_s:.2f} tiles/s "
        f"({summary.km2_per_hour:.1f} km²/h) -> {out}"
    )


@cli.command()
@month_option
@stage
def vectorize(settings: Settings, month: str) -> str:
    """Turn the probability COG into flag polygons (GeoPackage + GeoParquet)."""
    from pipeline.vectorize import vectorize_month

    settings.pair(month)
    out = settings.flags_path(month)
    layers = settings.layers_dir if settings.layers_dir.is_dir() else None
    flags = vectorize_month(settings.prob_path(month), out, settings.vectorize, month=month, layers_dir=layers)
    counts = flags["kind"].value_counts().to_dict() if len(flags) else {}
    return f"{len(flags)} flags ({counts.get('new', 0)} new, {counts.get('removed', 0)} removed) -> {out}"


@cli.group(invoke_without_command=True)
@click.pass_context
def ledger(ctx: click.Context) -> None:
    """The scar ledger (台账), a store of record: build (the monthly stage; the default) and the commands below."""
    if ctx.invoked_subcommand is None:  # `scarwatch ledger` is `scarwatch ledger build`
        ctx.invoke(ledger_build)


def _ledger_inputs(settings: Settings) -> dict[str, Any]:
    months = [p.month for p in settings.months]
    return {
        "flags_paths": [settings.flags_path(m) for m in months],
        "raw_dir": settings.paths.raw,
        "settings": settings.ledger,
        "months": months,
    }


@ledger.command(name="build")
@click.option(
    "--allow-shrink",
    metavar="REASON",
    default=None,
    help="Let this run lose or change events of the live ledger; the reason is recorded in its audit log.",
)
@stage
def ledger_build(settings: Settings, allow_shrink: str | None = None) -> str:
    """Replay every month's flags, the seed ledger, permits and field updates into the ledger.

    Refused (exit 2, nothing written) when the result would lose or change an event or a case of the
    live ledger; case ids never change.
    """
    from pipeline.ledger import build_ledger

    summary = build_ledger(out_path=settings.ledger_path, allow_shrink=allow_shrink, **_ledger_inputs(settings))
    return (
        f"{summary.n_cases} cases, {summary.n_events} events ({summary.n_added} new), {summary.n_alerts} alerts "
        f"-> {summary.out_path}"
    )


def _day(value: Any) -> Any:
    """``--as-of`` as a date (today when not given)."""
    import datetime as dt

    return value.date() if value is not None else dt.date.today()


_as_of_option = click.option(
    "--as-of",
    "as_of",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="Judge due dates on this day, YYYY-MM-DD (default: today).",
)
_print_format = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="A table to read, or CSV / JSON (English column names) for scripts.",
)


def _print_rows(frame: Any, columns: list[tuple[str, str]], fmt: str, title: str) -> None:
    """Print ``frame``'s ``columns`` ((header, column) pairs) as a rich table, or as CSV/JSON with English names."""
    if fmt != "table":
        out = frame[[c for _, c in columns]]
        text = out.to_csv(index=False) if fmt == "csv" else out.to_json(orient="records", force_ascii=False, indent=1)
        click.echo(text.rstrip("\n"))
        return
    from rich.console import Console
    from rich.table import Table

    if not len(frame):
        click.echo(title)
        return
    table = Table(title=title, title_justify="left", header_style="bold")
    for header, column in columns:
        table.add_column(header, no_wrap=column in ("case_id", "at", "due", "month"), overflow="fold")
    for row in frame[[c for _, c in columns]].itertuples(index=False):
        table.add_row(*("" if v is None or v != v else str(v) for v in row))
    Console(width=None if sys.stdout.isatty() else 240).print(table)  # a pipe gets whole lines


def _bilingual(frame: Any, zh: str, en: str, out: str) -> Any:
    return frame.assign(**{out: frame[zh].astype(str) + " " + frame[en].astype(str)})


@ledger.command(name="list")
@click.option(
    "--state", "states", multiple=True, help="Only cases in this state (stopped, 已制止 or 制止); repeatable."
)
@click.option("--district", "districts", multiple=True, help="Only cases in this district (区); repeatable.")
@click.option("--unit", "units", multiple=True, help="Only cases of this responsible unit (网格 unit); repeatable.")
@click.option("--overdue", is_flag=True, help="Only cases past their due date (a demolition order or a field check).")
@click.option("--month", default=None, help="Only cases first seen this month, YYYY-MM.")
@_as_of_option
@_print_format
@stage
def ledger_list(
    settings: Settings,
    states: tuple[str, ...],
    districts: tuple[str, ...],
    units: tuple[str, ...],
    overdue: bool,
    month: str | None,
    as_of: Any,
    fmt: str,
) -> str:
    """List the cases of the live ledger (filters combine): state, place, unit, due date, overdue."""
    from pipeline.ledger.query import case_table, open_ledger, select_cases

    ledger = open_ledger(settings.ledger_path)
    table = case_table(ledger, settings.layers_dir, as_of=_day(as_of))
    rows = select_cases(table, states=states, districts=districts, units=units, overdue=overdue, month=month)
    rows = _bilingual(_bilingual(rows, "state_zh", "state", "state_both"), "category_zh", "category", "category_both")
    if fmt == "table":
        rows = rows.assign(
            overdue=rows["overdue"].map({True: "逾期 overdue", False: ""}),
            area_m2=rows["area_m2"].map("{:.1f}".format),
            area_mu=rows["area_mu"].map("{:.3f}".format),
        )
    columns = [
        ("案件 case", "case_id"),
        ("状态 state", "state_both" if fmt == "table" else "state"),
        ("类别 category", "category_both" if fmt == "table" else "category"),
        ("面积 m²", "area_m2"),
        ("亩 mu", "area_mu"),
        ("区 district", "district"),
        ("街道 street", "street"),
        ("网格 cell", "cell_id"),
        ("责任单位 unit", "unit"),
        ("立案 opened", "opened_at"),
        ("最近 last event", "last_event_at"),
        ("到期 due", "due"),
        ("逾期 overdue", "overdue"),
    ]
    if fmt != "table":
        columns[3:3] = [("", "state_zh")]
    _print_rows(rows, columns, fmt, f"台账 ledger {settings.ledger_path}: {len(rows)} of {len(table)} cases")
    return ""


@ledger.command(name="show")
@click.argument("case_id")
@_print_format
@stage
def ledger_show(settings: Settings, case_id: str, fmt: str) -> str:
    """Show one case: its current state and its timeline (every event, in log order)."""
    from pipeline.ledger.labels import CATEGORY_ZH, STATE_ZH
    from pipeline.ledger.query import case_timeline, open_ledger

    ledger = open_ledger(settings.ledger_path)
    case, events = case_timeline(ledger, case_id)
    if fmt == "table":
        click.echo(
            f"{case['case_id']}: {STATE_ZH.get(case['state'], '')} {case['state']} · "
            f"{CATEGORY_ZH.get(case['category'], '')} {case['category']} · {case['district']} {case['street']} · "
            f"{float(case['area_m2']):.1f} m² · opened {case['opened_at']}, last event {case['last_event_at']}"
            + (f" · deadline {case['deadline']}" if case["deadline"] else "")
        )
    rows = _bilingual(events, "kind_zh", "kind", "kind_both")
    columns = [
        ("#", "seq"),
        ("日期 date", "at"),
        ("事件 event", "kind_both" if fmt == "table" else "kind"),
        ("来源 source", "source"),
        ("执行人 actor", "actor"),
        ("依据 evidence", "evidence"),
        ("期限 deadline", "deadline"),
        ("备注 note", "note"),
    ]
    if fmt != "table":  # each event row also says which case, and the case's state now
        rows = rows.assign(case_id=case["case_id"], state=case["state"])
        columns = [("", "case_id"), ("", "state"), *columns, ("", "kind_zh"), ("", "event_id")]
    _print_rows(rows, columns, fmt, f"时间线 timeline ({len(rows)} events)")
    return ""


@ledger.command(name="export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["xlsx", "csv", "geojson", "gpkg"]),
    default=None,
    help="xlsx (cases, events, alerts sheets), csv (cases), geojson (cases, WGS84), gpkg (QGIS/ArcGIS, styled). "
    "Default: from the suffix of -o.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="The file to write (its folder must exist). Default: <reports>/ledger/ledger.<format>.",
)
@_as_of_option
@stage
def ledger_export(settings: Settings, fmt: str | None, out: Path | None, as_of: Any) -> str:
    """Export the live ledger for Excel, scripts, phone apps or QGIS/ArcGIS (written atomically)."""
    from pipeline.errors import InputError
    from pipeline.ledger.export import FORMATS, SUFFIX, Palette, export_ledger
    from pipeline.ledger.query import open_ledger
    from pipeline.publish.maplayers import ALERT_COLOR, STATE_COLORS

    if fmt is None:
        by_suffix = {v: k for k, v in SUFFIX.items()}
        if out is None or out.suffix.lower() not in by_suffix:
            raise InputError(
                f"give --format ({', '.join(FORMATS)}) or an -o ending in one of {', '.join(SUFFIX.values())}"
            )
        fmt = by_suffix[out.suffix.lower()]
    if out is None:
        out = settings.paths.reports / "ledger" / f"ledger{SUFFIX[fmt]}"
        out.parent.mkdir(parents=True, exist_ok=True)
    ledger = open_ledger(settings.ledger_path)
    summary = export_ledger(
        ledger, out, fmt, layers_dir=settings.layers_dir, as_of=_day(as_of), palette=Palette(STATE_COLORS, ALERT_COLOR)
    )
    return f"{summary.n_cases} cases, {summary.n_events} events, {summary.n_alerts} alerts -> {summary.out_path}"


@ledger.command(name="alerts")
@click.option("--month", default=None, help="Only the alerts of this month's end, YYYY-MM.")
@_print_format
@stage
def ledger_alerts(settings: Settings, month: str | None, fmt: str) -> str:
    """List the alerts of the live ledger (overdue, rebuild, expansion after a stop, ...), by month."""
    from pipeline.ledger.labels import STATE_ZH
    from pipeline.ledger.query import alert_table, open_ledger

    ledger = open_ledger(settings.ledger_path)
    rows = alert_table(ledger, month)
    months = sorted(set(ledger.alerts["month"]))
    rows = _bilingual(rows, "kind_zh", "kind", "kind_both")
    rows = rows.assign(state_both=rows["state"].map(lambda s: f"{STATE_ZH.get(s, '')} {s}".strip()))
    columns = [
        ("月份 month", "month"),
        ("案件 case", "case_id"),
        ("提醒 alert", "kind_both" if fmt == "table" else "kind"),
        ("状态 state", "state_both" if fmt == "table" else "state"),
        ("说明", "message_zh"),
        ("message", "message_en"),
    ]
    where = f"in {month}" if month else "in all months"
    title = f"提醒 alerts {where}: {len(rows)}" + (
        "" if len(rows) or not months else f" (months with alerts: {', '.join(months)})"
    )
    _print_rows(rows, columns, fmt, title)
    return ""


@ledger.command(name="rebuild")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the fresh ledger here (the live ledger is never written).",
)
@stage
def ledger_rebuild(settings: Settings, out: Path | None) -> str:
    """Replay every input into a fresh ledger and prove it equals the live one (audited; exit 2 if not)."""
    from pipeline.errors import LedgerError
    from pipeline.ledger import rebuild_ledger

    result = rebuild_ledger(ledger_path=settings.ledger_path, out_path=out, **_ledger_inputs(settings))
    if not result.equal:
        raise LedgerError(
            f"{result.ledger_path}: the rebuild differs from the live ledger in {len(result.differences)} ways "
            f"(first: {result.differences[0]}); see the audit log {result.ledger_path.with_suffix('.log.jsonl')}"
        )
    return f"rebuild equals the live ledger: {result.n_events} events, {result.n_cases} cases ({result.ledger_path})"


@ledger.command(name="import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Only check the file against the live ledger; say what it would add.")
@click.option("--month", "-m", default=None, help="The file's month, YYYY-MM (default: from its name, else its dates).")
@stage
def ledger_import(settings: Settings, file: Path, dry_run: bool, month: str | None) -> str:
    """Check an inspector's field-update file (CSV or XLSX, a returned dispatch list) and add it to the ledger.

    Every problem is one line on stderr (exit 2, nothing written). Otherwise the file is copied into the
    field-update folder and its events are appended; importing the same rows again adds nothing.
    """
    from pipeline.errors import LedgerError
    from pipeline.ledger.fieldio import FieldUpdateProblems
    from pipeline.ledger.importer import import_field_file

    try:
        s = import_field_file(
            file, ledger_path=settings.ledger_path, month=month, dry_run=dry_run, **_ledger_inputs(settings)
        )
    except FieldUpdateProblems as exc:
        for line in exc.lines():
            click.echo(line, err=True)
        n = len(exc.problems)
        raise LedgerError(
            f"{file}: {n} problem{'s' if n > 1 else ''} (listed above); nothing was imported: fix "
            f"{'them' if n > 1 else 'it'} and import again"
        ) from None
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(s.new_events.items())) or "none"
    read = f"{s.encoding}{f', sheet {s.sheet}' if s.sheet else ''}"
    skipped = f"{s.not_checked} rows not yet checked skipped, {s.already} already in the ledger"
    head = f"{file} ({read}, month {s.month})"
    if dry_run:
        return f"{head}: would add {sum(s.new_events.values())} events ({kinds}); {skipped}; nothing written"
    if s.copy is None or (not s.copied and s.n_added == 0):
        return f"{file}: {'already imported, ' if s.already else ''}nothing added ({skipped})"
    where = f"copied to {s.copy}" if s.copied else f"already in the folder as {s.copy}"
    return f"{head}: {s.n_added} events added ({kinds}); {skipped}; {where} -> {settings.ledger_path}"


@cli.command(name="map")
@month_option
@stage
def map_(settings: Settings, month: str) -> str:
    """Build the month's offline inspector map (HTML)."""
    from pipeline.publish.maps import build_map

    settings.pair(month)
    pyramid = settings.map.imagery == "pyramid"
    out = build_map(
        month,
        settings.ledger_path,
        settings.flags_path(month),
        settings.map_path(month),
        settings=settings.map,
        layers_dir=settings.layers_dir if settings.layers_dir.is_dir() else None,
        pair_dir=_pair_dir(settings, month),
        tiles_dir=settings.map_tiles_dir(month) if pyramid else None,
    )
    return f"inspector map -> {out}"


@cli.command(name="map-tiles")
@month_option
@stage
def map_tiles(settings: Settings, month: str) -> str:
    """Write the month's imagery tile pyramid beside its map (both epochs, down to the native pixel)."""
    from pipeline.pair import AlignedPair
    from pipeline.publish.tiles import build_pyramid

    settings.pair(month)
    out = settings.map_tiles_dir(month)
    with AlignedPair.open(_pair_dir(settings, month)) as pair:
        summary = build_pyramid(pair, out, settings.map, month=month)
    p = summary.pyramid
    return (
        f"tile pyramid -> {out} (zoom {p.minzoom}-{p.maxzoom}, {p.n_tiles} tiles, {p.n_bytes / 1e6:.1f} MB, "
        f"{summary.seconds:.1f} s)"
    )


@cli.command()
@month_option
@stage
def dispatch(settings: Settings, month: str) -> str:
    """Write the month's dispatch lists (派单): per responsible unit an XLSX, a CSV and a GeoJSON, and an index."""
    from pipeline.publish.dispatch import write_dispatch

    settings.pair(month)
    pair_dir = _pair_dir(settings, month)
    out = settings.dispatch_dir(month)
    summary = write_dispatch(
        month,
        settings.ledger_path,
        out,
        settings=settings.dispatch,
        pair_dir=pair_dir if pair_dir.is_dir() else None,
    )
    if not summary.n_cases:
        return f"dispatch lists -> {out}: nothing dispatched in {month} (dispatch.json says so)"
    return f"dispatch lists -> {out}: {summary.n_cases} cases to {len(summary.units)} units (dispatch.json)"


@cli.command()
@month_option
@stage
def report(settings: Settings, month: str) -> str:
    """Write the month's report (HTML, A4 PDF, Markdown; Chinese first, English too), its figures and metrics."""
    from pipeline.publish.report import build_report

    pair = settings.pair(month)
    pair_dir = _pair_dir(settings, month)
    qa = pair_dir / "qa.json"
    model = settings.detect.model if settings.detect.method == "cnn" else None
    out = build_report(
        month,
        settings.ledger_path,
        settings.flags_path(month),
        settings.report_dir,
        settings=settings.report,
        qa_path=qa if qa.exists() else None,
        truth_path=settings.truth_path if settings.truth_path.exists() else None,
        metrics_path=settings.metrics_path(month),
        trend_path=settings.paths.reports / "plots" / f"{month}.csv",
        layers_dir=settings.layers_dir if settings.layers_dir.is_dir() else None,
        pair_dir=pair_dir if pair_dir.is_dir() else None,
        prev_month=pair.prev,
        model_path=model,
        model_metrics_path=settings.evaluate.out,
        params_path=Path(click.get_current_context().obj["params"]),
        params={
            "detect": {"method": settings.detect.method, "model": str(settings.detect.model)},
            "vectorize": settings.vectorize.model_dump(mode="json"),
        },
        issued_dir=settings.paths.reports / "issued",  # no DVC output: `dvc repro` never deletes it
    )
    return f"monthly report -> {out}"


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Checkpoint path.")
@click.option("--arch", default=None, help="Override train.arch (e.g. fc_siam_diff for the baseline).")
@click.option("--resume", is_flag=True, help="Continue the stopped run whose state lies beside the checkpoint.")
@stage
def train(settings: Settings, out: Path | None, arch: str | None, resume: bool) -> str:
    """Train the change-detection network (a deliberate step; the monthly run never retrains).

    The checkpoint goes to --out (default detect.model, or models/<arch>.pt for another --arch); the
    thresholds are set afterwards by 'scarwatch calibrate'.
    """
    from pipeline.model.train import train as run_training

    train_settings = settings.train
    if arch is not None and arch != train_settings.arch:
        # A baseline trained beside the shipped net keeps its own checkpoint and log.
        train_settings = train_settings.model_copy(
            update={"arch": arch, "log_path": train_settings.log_path.with_name(f"train_log_{arch}.jsonl")}
        )
        out = out or settings.detect.model.with_name(f"{arch}.pt")
    target = out or settings.detect.model
    result = run_training(train_settings, target, data=settings.paths.shared, resume=resume)
    if not result.finished:
        why = f" by {result.signal}" if result.signal else ""
        return f"paused{why} at step {result.steps}, state saved -> {target}; continue with --resume"
    return f"trained {result.arch} for {result.steps} steps -> {target}"


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".bundle"),
    show_default=True,
    help="The bundle folder (replaced).",
)
@click.option(
    "--demo-pairs",
    type=click.IntRange(min=0),
    default=48,
    show_default=True,
    help="Demo-town pairs (448 px, about 165 KB each) to pre-render for the synth source (the GPU cannot).",
)
@stage
def bundle(settings: Settings, out: Path, demo_pairs: int) -> str:
    """Write the training data (params train section, paths.shared) as a bundle for a GPU machine.

    The bundle needs neither rasterio nor pydantic to read; 'python -m pipeline.model.gpu_train' trains
    from it (scripts/gpu_train.sh).
    """
    from pipeline.model.bundle import write_bundle
    from pipeline.model.train import load_training_data

    data = load_training_data(settings.train, settings.paths.shared)
    manifest = write_bundle(data, out, demo_pairs=demo_pairs, source=settings.paths.shared)
    return (
        f"training bundle: {len(manifest['tiles'])} Santa Rosa tiles, "
        f"{ {k: len(v) for k, v in manifest['pairs'].items()} } pairs, {len(manifest['synth']['items'])} demo pairs, "
        f"{manifest['bytes'] / 2**20:.1f} MiB -> {out}"
    )


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The averaged checkpoint.")
@click.option(
    "--bn-batches",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Training batches (the checkpoints' own mix, crop and batch size) to recompute BatchNorm statistics over.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler drawing those batches.")
@stage
def average(settings: Settings, checkpoints: tuple[Path, ...], out: Path, bn_batches: int, seed: int) -> str:
    """Average several checkpoints of one run into one network (SWA), BatchNorm recomputed; calibrate it next."""
    from pipeline.model.average import average_checkpoints, training_batches
    from pipeline.nets.checkpoint import ChangeModel

    train_meta = dict(ChangeModel.load(checkpoints[-1]).meta.get("train") or {})
    batches = training_batches(settings, train_meta, bn_batches, seed=seed)
    result = average_checkpoints(checkpoints, out, batches)
    return f"averaged {len(checkpoints)} checkpoints (steps {result['averaged_steps']}) -> {out}; calibrate it next"


@cli.command()
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Checkpoint to calibrate.")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here instead of over --model."
)
@stage
def calibrate(settings: Settings, model: Path | None, out: Path | None) -> str:
    """Choose a checkpoint's pixel and object thresholds on the validation sets and write them into it."""
    from pipeline.model.calibrate import calibrate_model

    result = calibrate_model(model or settings.detect.model, settings, out=out)
    return (
        f"calibrated: threshold {result['threshold']:.2f}, object threshold {result['object_threshold']:.2f} "
        f"-> {result['out']}"
    )


@cli.command()
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Checkpoint to score.")
@click.option("--flag-check/--no-flag-check", default=None, help="Run the Santa Rosa flag check (evaluate.flag_check).")
@stage
def evaluate(settings: Settings, model: Path | None, flag_check: bool | None) -> str:
    """Score a checkpoint (and the baselines) on every validation set; write the metrics file and card table.

    Reads the checkpoints only: the thresholds scored are those 'scarwatch calibrate' wrote.
    """
    from pipeline.model.evaluate import evaluate_model, write_metrics

    checkpoint = model or settings.detect.model
    metrics = evaluate_model(checkpoint, settings, flag_check=flag_check)
    card = settings.evaluate.card if checkpoint == settings.detect.model else None
    write_metrics(metrics, settings.evaluate.out, card)
    beats = all(v["beats_all"] for v in metrics.get("shipped_beats_baselines", {}).values())
    flags = ""
    if "flags" in metrics:
        removed = metrics["flags"]["santa-rosa"]["scores"]["removed"]
        flags = (
            f"; Santa Rosa flags (removed, IoU >= 0.5): P {removed['iou50']['precision']:.2f} "
            f"R {removed['iou50']['recall']:.2f}, centroid hit R {removed['centroid']['recall']:.2f}"
        )
    return (
        f"evaluated {len(metrics['datasets'])} data sets, shipped net beats the baselines on all: {beats}{flags} "
        f"-> {settings.evaluate.out}"
    )


@cli.command("demo-accuracy")
@click.argument("figures_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@stage
def demo_accuracy(settings: Settings, figures_dir: Path | None) -> str:
    """The demo town's flags against its truth, all months pooled (from the reports' figures, reports/monthly)."""
    from pipeline.model.fieldcheck import demo_accuracy as pooled

    result = pooled(figures_dir or settings.report_dir)
    lines = []
    for mode, kinds in result.items():
        lines.append(f"{mode} ({', '.join(kinds['months'])}):")
        for kind in ("all", "new", "removed"):
            s = kinds.get(kind)
            if s:
                lines.append(
                    f"  {kind:8s} TP {s['tp']:4d}  FP {s['fp']:4d}  FN {s['fn']:4d}  "
                    f"P {s['precision']:.3f}  R {s['recall']:.3f}  F1 {s['f1']:.3f}"
                )
    click.echo("\n".join(lines))
    return ""


def main() -> None:
    """Console entry point."""
    cli(obj={})


if __name__ == "__main__":  # pragma: no cover
    main()
