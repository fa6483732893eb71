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


def _configure_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        fmt = "%(message)s"
    except ImportError:  # pragma: no cover - rich is a dependency
        handler = logging.StreamHandler()
        fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)


def stage(func: F) -> F:
    """Wrap a subcommand: load settings, time it, turn expected errors into one line and exit 2."""

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
            click.echo(f"scarwatch {ctx.info_name}: error: {' '.join(str(exc).split())}", err=True)
            sys.exit(EXIT_USAGE)
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


@cli.command()
@stage
def demo(settings: Settings) -> str:
    """Generate the synthetic demo town (imagery, ledger, layers, field updates, truth)."""
    from pipeline.synth import generate_demo

    summary = generate_demo(settings.demo.out, settings.demo)
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


@cli.command()
@month_option
@stage
def tile(settings: Settings, month: str) -> str:
    """Lay the tile grid over the aligned pair and write the GeoParquet tile index."""
    from pipeline.tiling import tile_pair

    settings.pair(month)
    out = settings.tiles_path(month)
    tiles = tile_pair(settings.pair_dir(month), out, settings.tile)
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
        settings.pair_dir(month),
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


@cli.command()
@stage
def ledger(settings: Settings) -> str:
    """Join every month's flags, the seed ledger, permits and field updates into the scar ledger."""
    from pipeline.ledger import build_ledger

    months = [p.month for p in settings.months]
    summary = build_ledger(
        [settings.flags_path(m) for m in months],
        settings.paths.raw,
        settings.ledger_path,
        settings.ledger,
        months=months,
    )
    return f"{summary.n_cases} cases, {summary.n_events} events, {summary.n_alerts} alerts -> {summary.out_path}"


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
        pair_dir=settings.pair_dir(month),
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
    with AlignedPair.open(settings.pair_dir(month)) as pair:
        summary = build_pyramid(pair, out, settings.map, month=month)
    p = summary.pyramid
    return (
        f"tile pyramid -> {out} (zoom {p.minzoom}-{p.maxzoom}, {p.n_tiles} tiles, {p.n_bytes / 1e6:.1f} MB, "
        f"{summary.seconds:.1f} s)"
    )


@cli.command()
@month_option
@stage
def report(settings: Settings, month: str) -> str:
    """Write the month's incremental-construction report (Chinese first, English too) and metrics."""
    from pipeline.publish.report import build_report

    settings.pair(month)
    qa = settings.pair_dir(month) / "qa.json"
    out = build_report(
        month,
        settings.ledger_path,
        settings.flags_path(month),
        settings.report_dir,
        settings=settings.report,
        qa_path=qa if qa.exists() else None,
        truth_path=settings.truth_path if settings.truth_path.exists() else None,
        metrics_path=settings.metrics_path(month),
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
@click.argument("metrics_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@stage
def demo_accuracy(settings: Settings, metrics_dir: Path | None) -> str:
    """The demo town's flags against its truth, all months pooled (from the monthly metrics files)."""
    from pipeline.model.fieldcheck import demo_accuracy as pooled

    result = pooled(metrics_dir or settings.metrics_dir)
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
