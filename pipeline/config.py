"""params.yaml -> validated, typed settings. The one place that knows defaults."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError, MissingInputError

MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    """Where inputs and outputs live, relative to the project root."""

    raw: Path = Path("data/demo")
    interim: Path = Path("data/interim")
    processed: Path = Path("data/processed")
    reports: Path = Path("reports")
    shared: Path = Path("../shared/data")  # real training/validation data (train, calibrate, evaluate read it)


def check_month(value: str) -> str:
    """Return ``value`` when it is a ``YYYY-MM`` month, else raise ValueError."""
    if not isinstance(value, str) or not MONTH_RE.match(value):
        raise ValueError(f"month {value!r} is not of the form 'YYYY-MM' (quote it in YAML: \"2026-03\")")
    return value


class MonthPair(_Section):
    """A month and the month its imagery is compared with."""

    month: str
    prev: str

    _check = field_validator("month", "prev")(classmethod(lambda cls, v: check_month(v)))

    @model_validator(mode="after")
    def _ordered(self) -> MonthPair:
        if self.prev >= self.month:
            raise ValueError(f"prev {self.prev!r} must come before month {self.month!r}")
        return self


class DemoSettings(_Section):
    """The synthetic demo town."""

    out: Path = Path("data/demo")
    seed: int = 20260101
    first_month: str = "2026-01"
    n_months: int = Field(7, ge=2, le=36)
    size_m: float = Field(2000.0, gt=100)
    gsd: float = Field(0.5, gt=0)
    crs: str = "EPSG:4551"
    origin: tuple[float, float] = (500000.0, 4860000.0)
    sheets: tuple[int, int] = (2, 2)

    _check = field_validator("first_month")(classmethod(lambda cls, v: check_month(v)))


class AlignSettings(_Section):
    """Mosaic, reprojection, co-registration and radiometric normalisation."""

    target_crs: str | None = None
    # the grid's pixel size: "model" = the change network's native pixel (its checkpoint's native_gsd_m),
    # so a coarser or finer delivery is resampled to what the network was trained at; "delivery" (or null)
    # = the finer of the two epochs; a number = that size in CRS units
    resolution: Annotated[float, Field(gt=0)] | Literal["model", "delivery"] | None = "model"
    resampling: Literal["nearest", "bilinear", "cubic", "lanczos", "average"] = "bilinear"
    bands: tuple[int, ...] = (1, 2, 3)
    scale16: tuple[float, float] | None = None
    coregister: bool = True
    max_shift_px: float = Field(8.0, gt=0)
    normalize: bool = True

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) not in (3, 4) or any(b < 1 for b in v):
            raise ValueError(f"bands {v!r} must list 3 (RGB) or 4 (RGB+NIR) 1-based band indexes")
        return v

    @field_validator("scale16")
    @classmethod
    def _scale(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"scale16 {v!r} must be [low, high] with low < high")
        return v


class TileSettings(_Section):
    """The tile grid laid over an aligned pair."""

    size: int = Field(512, ge=32)
    overlap: int = Field(64, ge=0)
    min_valid: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _overlap(self) -> TileSettings:
        if self.overlap * 2 >= self.size:
            raise ValueError(f"overlap {self.overlap} must be less than half the tile size {self.size}")
        return self


class DetectSettings(_Section):
    """Change detection over the tiles."""

    method: Literal["cnn", "cva"] = "cnn"
    model: Path = Path("models/scarnet.pt")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(4, ge=1)
    workers: int = Field(2, ge=0)
    prefetch: int = Field(default=2, ge=1)  # batches read ahead of the model
    cva_sample_tiles: int = Field(default=64, ge=1)  # tiles sampled to fit the CVA threshold
    # CPU inference: bf16 autocast where the CPU has bf16 instructions (auto), float32, or bf16 (pipeline.nets.device)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile the network once per run (inductor, freezing); falls back to eager on failure. auto: on
    # the CPU, for runs of at least compile_min_tiles tiles where a C++ compiler is found (pipeline.nets.device)
    compile: bool | Literal["auto"] = "auto"
    compile_min_tiles: int = Field(default=1000, ge=1)  # about the cold-cache break-even measured here


class VectorizeSettings(_Section):
    """Probability rasters -> flag polygons."""

    high: float | None = Field(None, gt=0, lt=1)  # None: the detector's calibrated threshold (COG tag)
    low: float = Field(0.5, gt=0, lt=1)
    # drop objects whose mean probability is below this; None: the model's calibrated object threshold
    # (COG tag object_threshold, from scarwatch evaluate), else 0 (keep every seeded object)
    min_p_mean: float | None = Field(None, ge=0, le=1)
    min_area_m2: float = Field(12.0, ge=0)
    simplify_m: float = Field(0.5, ge=0)
    regularize: bool = True
    rect_fill: float = Field(default=0.8, gt=0, le=1)  # regularise to a rectangle when area / rectangle >= this
    sliver_m: float = Field(default=1.0, ge=0)  # drop polygons narrower than this (metres)
    # cut objects that are not one rectangle at their narrow necks (vectorize.split_objects): neighbours
    # grown into one blob. Chosen on the training pairs only (the model card, Flags), not on validation.
    split: bool = True
    split_keep_fill: float = Field(default=0.7, gt=0, le=1)  # objects filling their min. rectangle this well stay whole
    split_h_rel: float = Field(default=0.2, ge=0, lt=1)  # markers: h-maxima of the distance to the background,
    split_h_px: float = Field(default=3.0, ge=0)  # h = max(split_h_px, split_h_rel x the object's largest distance)
    split_min_px: int = Field(default=60, ge=2)  # smaller objects are never cut (pixels)
    split_min_piece_px: int = Field(default=20, ge=1)  # a cut leaving a smaller piece is not made (pixels)
    window_px: int = Field(default=2048, ge=64)  # processing window (pixels a side)
    halo_px: int = Field(default=64, ge=0)  # context read around each window

    @model_validator(mode="after")
    def _hysteresis(self) -> VectorizeSettings:
        if self.high is not None and self.low > self.high:
            raise ValueError(f"low threshold {self.low} must not exceed high threshold {self.high}")
        return self


class LedgerSettings(_Section):
    """Joining flags to the scar ledger."""

    match_distance_m: float = Field(5.0, ge=0)
    expand_ratio: float = Field(0.2, ge=0)
    repair_grace_months: int = Field(2, ge=0)
    field_radius_m: float = Field(3.0, gt=0)  # footprint of a case an inspector opened at a point
    dispatch_due_days: int = Field(3, ge=0)  # working days (Mon-Fri) a dispatched case's field check may take
    dispatch_holidays: tuple[dt.date, ...] = ()  # public holidays that are no working day (ISO dates)


class DispatchSettings(_Section):
    """The monthly dispatch lists (派单) of the responsible units."""

    thumbnail_px: int = Field(120, ge=32, le=512)  # before/after chips embedded in the XLSX
    chip_margin_m: float = Field(10.0, ge=0)


class MapSettings(_Section):
    """The inspector map."""

    max_flags: int = Field(5000, ge=1)
    max_chips: int = Field(300, ge=0)
    chip_px: int = Field(128, ge=16, le=512)
    chip_margin_m: float = Field(10.0, ge=0)
    overlay_max_px: int = Field(2048, ge=64, le=8192)
    overlay_quality: int = Field(80, ge=10, le=95)
    tiles: str | None = None  # a tile URL template; makes the page fetch tiles when online (offline: None)
    tiles_attribution: str | None = None
    # imagery: "pyramid" = local XYZ tiles beside the page (the map_tiles stage), "inline" = one embedded overlay
    imagery: Literal["pyramid", "inline"] = "pyramid"
    tiles_format: Literal["webp", "jpeg"] = "webp"
    tiles_quality: int = Field(80, ge=10, le=95)
    tiles_meta: int = Field(4, ge=1, le=16)  # metatile side in tiles: one pair read and one warp each
    tiles_max_zoom: int | None = Field(None, ge=0, le=24)  # None: the native pixel
    tiles_workers: int | None = Field(None, ge=1)  # None: one thread per CPU
    language: Literal["zh-en", "zh", "en"] = "zh-en"  # labels of the controls, layers and legend


class ReportSettings(_Section):
    """The monthly report."""

    languages: tuple[Literal["zh", "en"], ...] = ("zh", "en")  # one section each, in this order
    pdf: bool = True  # print the HTML to an A4 PDF (WeasyPrint + Pango: `make sysdeps`)
    thumbnails: int = Field(default=6, ge=0, le=50)  # the largest new structures shown with before/after chips
    thumbnail_px: int = Field(default=160, ge=32, le=512)
    list_limit: int = Field(default=50, ge=1)  # rows of each case list (overdue, alerts, new cases) before "… more"


#: The sets ``train.footprints`` accepts: pipeline.model.data.FOOTPRINT_SETS, which has the readers. Not
#: imported from there: that module pulls in scipy (0.5 s on every command), and it must not need pydantic
#: (the GPU trainer); tests/test_train.py keeps the two equal.
FOOTPRINT_SETS = ("xbd-joplin",)


class TrainSettings(_Section):
    """Training the change network (``scarwatch train``; see pipeline/model/train.py)."""

    arch: str = "scarnet"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    in_channels: Literal[3, 4] = 3
    seed: int = 20260401
    steps: int = Field(3000, ge=1)
    # stop (and finish the LR schedule) by this wall time; None: the schedule runs on steps alone, so a
    # stopped and resumed run (scarwatch train --resume) equals one long run exactly
    time_limit_min: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    crop: int = Field(128, ge=32, multiple_of=16)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    mix: dict[str, float] = Field(
        default_factory=lambda: {
            "santa": 0.2,
            "whu": 0.2,
            "joplin": 0.05,
            "erase": 0.15,
            "paste": 0.15,
            "nochange": 0.1,
            "synth": 0.15,
        }
    )
    coarsen_p: float = Field(0.3, ge=0, le=1)  # share of samples coarsened to a 0.6-2 m delivery
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    val_fraction: float = Field(0.2, gt=0, lt=1)  # Santa Rosa share held out by cluster (evaluate uses it too)
    split_seed: int = 0
    log_every: int = Field(50, ge=1)
    val_every: int = Field(300, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    log_path: Path = Path("models/train_log.jsonl")
    threads: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    init_from: Path | None = None  # fine-tune from this checkpoint
    max_steps_this_run: int | None = Field(None, ge=1)  # stop after this many steps (resume later)
    # cosine: warm up, then decay to 2 % of lr by the end; constant: warm up, then hold lr (for runs whose
    # checkpoints are averaged, `scarwatch average`). New fields go last, in the order of the GPU trainer's
    # mirror (gpu_train.py), whose fields after max_steps_this_run have defaults for older bundles
    schedule: Literal["cosine", "constant"] = "cosine"
    # single-date footprint images beside the Santa Rosa training tiles, by shared-data folder, with the share
    # of the erasing, copy-paste and no-change draws taken from each (the rest from Santa Rosa): more cities
    # and sensors for the pairs made from one date. Known folders: FOOTPRINT_SETS (pipeline/model/data.py)
    footprints: dict[str, float] = Field(default_factory=dict)
    # also keep a copy of the checkpoint every this many steps, `<out>.step<N>.pt` (None: only the latest
    # and the best quick validation): a long run's candidates for scoring and averaging outlive it
    keep_every: int | None = Field(None, ge=1)
    # U-Net border weights (Ronneberger et al., 2015): the background between two labelled structures gets
    # BCE weight 1 + w0·exp(-(d1 + d2)² / 2σ²), d1, d2 the distances (px) to the nearest and second-nearest
    # structure, so the network learns to keep neighbouring houses apart (0: off). σ in pixels
    separation_weight: float = Field(0.0, ge=0)
    separation_sigma_px: float = Field(5.0, gt=0)

    @field_validator("footprints")
    @classmethod
    def _footprint_shares(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(FOOTPRINT_SETS))
        if unknown:
            raise ValueError(f"unknown footprint sets {unknown!r}; known: {list(FOOTPRINT_SETS)!r}")
        if any(s < 0 for s in v.values()) or sum(v.values()) >= 1:
            raise ValueError(f"footprint shares {v!r} must be >= 0 and sum to less than 1 (the rest is Santa Rosa)")
        return v


class EvaluateSettings(_Section):
    """Calibrating and scoring checkpoints on the validation sets (pipeline/model/calibrate.py, evaluate.py)."""

    out: Path = Path("models/metrics.json")
    card: Path | None = Path("models/scarnet.md")  # model card to fill with the metrics table
    baselines: tuple[Path, ...] = (Path("models/fc_siam_diff.pt"),)  # trained baselines (CVA always runs)
    demo_pairs: int = Field(24, ge=0)
    demo_seed: int = 777  # fixed; training draws demo pairs from other seeds
    demo_size: int = Field(256, ge=32, multiple_of=16)
    iou_threshold: float = Field(0.5, gt=0, le=1)  # object match
    min_object_px: int = Field(16, ge=1)  # smaller components are not objects (4 m² at 0.5 m)
    thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # calibration grid
    calibration_weights: dict[str, float] = Field(
        default_factory=lambda: {"levir-dev": 0.3, "whu-cd": 0.3, "demo-town": 0.2, "santa-rosa": 0.2}
    )
    object_thresholds: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.95)
    flag_check: bool = True  # run the real pipeline on the held-out Santa Rosa tiles (pipeline/model/fieldcheck.py)


class Settings(_Section):
    """All of params.yaml."""

    paths: Paths = Paths()
    months: tuple[MonthPair, ...] = ()
    demo: DemoSettings = DemoSettings()  # type: ignore[call-arg]
    align: AlignSettings = AlignSettings()  # type: ignore[call-arg]
    tile: TileSettings = TileSettings()  # type: ignore[call-arg]
    detect: DetectSettings = DetectSettings()  # type: ignore[call-arg]
    vectorize: VectorizeSettings = VectorizeSettings()  # type: ignore[call-arg]
    ledger: LedgerSettings = LedgerSettings()  # type: ignore[call-arg]
    map: MapSettings = MapSettings()  # type: ignore[call-arg]
    report: ReportSettings = ReportSettings()
    dispatch: DispatchSettings = DispatchSettings()  # type: ignore[call-arg]
    train: TrainSettings = TrainSettings()  # type: ignore[call-arg]
    evaluate: EvaluateSettings = EvaluateSettings()  # type: ignore[call-arg]

    @field_validator("months", mode="before")
    @classmethod
    def _months_mapping(cls, v: Any) -> Any:
        # params.yaml keys months by name ("2026-03": {prev: "2026-02"}) so DVC names stages align@2026-03.
        if isinstance(v, dict):
            return tuple({"month": k, **(p or {})} for k, p in v.items())
        return v

    @model_validator(mode="after")
    def _unique_months(self) -> Settings:
        seen = [p.month for p in self.months]
        dupes = sorted({m for m in seen if seen.count(m) > 1})
        if dupes:
            raise ValueError(f"months lists {dupes!r} more than once")
        return self

    def pair(self, month: str) -> MonthPair:
        """Return the configured pair for ``month``, or raise ConfigError naming the known months."""
        for p in self.months:
            if p.month == month:
                return p
        known = [p.month for p in self.months]
        raise ConfigError(f"month {month!r} is not in params.yaml 'months' (known: {known!r}); add it there")

    # Where each stage reads and writes. dvc.yaml spells the same layout with ${paths.*} templates.
    def imagery_dir(self, month: str) -> Path:
        """Folder of one month's map sheets."""
        return self.paths.raw / "imagery" / month

    @property
    def layers_dir(self) -> Path:
        """Folder of the reference layers (permits, districts, streets, grid)."""
        return self.paths.raw / "layers"

    @property
    def truth_path(self) -> Path:
        """Ground truth of the demo town (absent for real cities)."""
        return self.paths.raw / "truth" / "truth.gpkg"

    def pair_dir(self, month: str) -> Path:
        """Aligned pair of ``month`` and its previous month."""
        return self.paths.interim / "aligned" / month

    def tiles_path(self, month: str) -> Path:
        """GeoParquet tile index of ``month``."""
        return self.paths.interim / "tiles" / f"{month}.parquet"

    def prob_path(self, month: str) -> Path:
        """Change probability COG of ``month``."""
        return self.paths.processed / "prob" / f"{month}.tif"

    def flags_path(self, month: str) -> Path:
        """Flag GeoPackage of ``month``."""
        return self.paths.processed / "flags" / f"{month}.gpkg"

    @property
    def ledger_path(self) -> Path:
        """The scar ledger GeoPackage."""
        return self.paths.processed / "ledger.gpkg"

    def map_path(self, month: str) -> Path:
        """The inspector map of ``month``."""
        return self.paths.reports / "maps" / f"{month}.html"

    def map_tiles_dir(self, month: str) -> Path:
        """The tile pyramid of ``month``'s map, beside the page."""
        return self.paths.reports / "maps" / f"{month}_tiles"

    def dispatch_dir(self, month: str) -> Path:
        """The dispatch lists (派单) of ``month``, one XLSX/CSV/GeoJSON per unit and ``dispatch.json``."""
        return self.paths.reports / "dispatch" / month

    @property
    def report_dir(self) -> Path:
        """Folder of the monthly reports."""
        return self.paths.reports / "monthly"

    @property
    def metrics_dir(self) -> Path:
        """Folder of the monthly metrics files."""
        return self.paths.reports / "metrics"

    def metrics_path(self, month: str) -> Path:
        """Metrics JSON of ``month`` (a DVC metrics file)."""
        return self.metrics_dir / f"{month}.json"

    @property
    def all_months(self) -> list[str]:
        """Every month that has imagery (previous months included), sorted."""
        return sorted({m for p in self.months for m in (p.prev, p.month)})


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the constructor raise its own error
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is given twice (first on line {first}); keep one",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 (GBK from a Chinese-locale editor) is one clear error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        try:
            data.decode("gbk")
            guess = " (it looks like GBK, as a Chinese-locale editor saves it)"
        except UnicodeDecodeError:
            guess = ""
        raise ConfigError(
            f"{path} line {line}: not UTF-8{guess}; save it as UTF-8 (e.g. `iconv -f GBK -t UTF-8`)"
        ) from None


def load_settings(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate params.yaml (missing sections take defaults).

    Raises:
        MissingInputError: the file does not exist.
        ConfigError: the YAML is malformed or a value is invalid (the message names the key).
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: parameters file not found; run from the project root or pass --params")
    if not path.is_file():
        raise ConfigError(f"{path}: is not a file; pass the parameters file with --params")
    try:
        raw = yaml.load(_read_utf8(path), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"{path}: section {section!r} is not a mapping, so --set {key} cannot apply; fix it")
        raw[section][name] = value
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: {loc}: {err['msg']}; fix that key in params.yaml") from exc
