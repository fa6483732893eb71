"""Training and validation data for the change networks: readers of the real sets and the demo town.

Sources (all real imagery except the demo town; the sampler's mix is in :mod:`pipeline.model.sampler`):

* **Santa Rosa pairs** (``xbd-santa-rosa``): read forward (pre → post) a destroyed building is
  *removed*; read backward (post → pre) it is *new*. Both images' masks define the valid pixels.
* **Footprint erasing** (single-temporal pairing, after ChangeStar): a pre image crop, and the same crop
  with some of its footprints painted over by nearby ground; the label is the erased footprints.
* **Copy-paste** ("house on soil"): real building instances cut by their footprints from pre images and
  pasted, with a cast shadow, onto ground elsewhere; the label is the pasted footprints.
* **No change**: one crop twice, with independent radiometric jitter.
* **WHU-CD** (``whu-cd``, 0.3 m, Christchurch): new buildings on cleared or green plots. Split by
  location: the ``ucdscm_*`` tiling trains, the ``lgpnet_*`` tiling validates (:func:`whu_split`).
* **Joplin** (``xbd-joplin``, about 0.55 m): pre → post destroyed buildings, a second disaster and city.
* **Demo town**: ``pipeline.synth.training_pair``.

Pixel size: the network works at :data:`NATIVE_GSD_M` (0.5 m). Every real source is resampled to it when
it is read (WHU 0.3 m → 0.5 m), as detect resamples a delivery that is finer or coarser. To cover
deliveries of 0.3-2 m (aerial orthophotos, GF-2/GF-1 scenes), a share of the samples is *coarsened*:
both epochs (or only one, for mixed sensors) are averaged down to a pixel of 0.6-2 m and resampled
back to 0.5 m, which is exactly what inference sees for a coarse delivery (:func:`coarsen`).

The data is read from ``train.data`` / ``evaluate.data`` (../shared/data) at run time and never copied.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


#: The pixel size (metres) the network is trained at; recorded in every checkpoint (``native_gsd_m``).
NATIVE_GSD_M = 0.5
#: Pixel size of each real source as delivered (metres). xBD Joplin is WorldView-2 at about 0.5-0.6 m.
SOURCE_GSD_M = {"whu-cd": 0.3, "xbd-joplin": 0.55, "levir-dev": 0.5, "xbd-santa-rosa": 0.5}


@dataclass
class SantaRosaTile:
    """One Santa Rosa tile in memory.

    Attributes:
        id: the 8-digit xBD tile id.
        cluster: the ``cluster_id`` of tiles.csv.
        pre: RGB uint8 (3, h, w), June 2017.
        post: RGB uint8 (3, h, w), October 2017 (after the fire).
        valid: bool (h, w), valid in both images.
        change: bool (h, w), destroyed buildings.
        instances: int32 (h, w), 0 = no building, k = footprint k (all buildings of the pre image).
    """

    id: str
    cluster: int
    pre: np.ndarray
    post: np.ndarray
    valid: np.ndarray
    change: np.ndarray
    instances: np.ndarray
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


def consecutive_ids(instances: np.ndarray) -> np.ndarray:
    """Renumber an instance map 1..n in order: a footprint hidden under later ones leaves no gap.

    The sampler takes box ``k`` of :func:`instance_boxes` to be instance ``k + 1``; with a gap (2 of Santa
    Rosa's 4,215 footprints are covered whole by others) every later box would point at its neighbour.
    """
    ids = np.unique(instances)
    ids = ids[ids > 0]
    lut = np.zeros(int(ids.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[instances]


def instance_boxes(instances: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of each footprint of an instance map whose ids run 1..n without gaps."""
    return [(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in ndimage.find_objects(instances) if s is not None]


def footprint_instances(
    polygons: Iterable[Any], shape: tuple[int, int], transform: Any
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Rasterise footprint polygons into an instance map (ids 1..n, :func:`consecutive_ids`) and its boxes.

    Args:
        polygons: footprint geometries (None and empty ones are skipped), in the coordinates of ``transform``.
        shape: the map's (h, w).
        transform: pixel → polygon coordinates (an affine.Affine).
    """
    from rasterio import features

    shapes = [(g, i + 1) for i, g in enumerate(polygons) if g is not None and not g.is_empty]
    inst = (
        features.rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="int32")
        if shapes
        else np.zeros(shape, np.int32)
    )
    inst = consecutive_ids(inst)
    return inst, instance_boxes(inst)


def _read_rgb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import rasterio

    if not path.is_file():
        raise MissingInputError(f"{path}: image not found; check train.data / evaluate.data points at ../shared/data")
    with rasterio.open(path) as src:
        return src.read([1, 2, 3]), src.dataset_mask() > 0


def load_santa_rosa(root: Path, ids: list[str] | None = None) -> list[SantaRosaTile]:
    """Read Santa Rosa tiles (images, masks, change labels, rasterised footprints) into memory.

    Args:
        root: the ``xbd-santa-rosa`` folder.
        ids: tile ids to read (default: all of tiles.csv).

    Returns:
        The tiles, in tiles.csv order.

    Raises:
        MissingInputError: the folder or tiles.csv is missing.
    """
    import geopandas as gpd
    import pandas as pd
    import rasterio

    table = root / "tiles.csv"
    if not table.is_file():
        raise MissingInputError(f"{table}: not found; set train.data / evaluate.data to the shared data folder")
    df = pd.read_csv(table, dtype={"id": str})
    tiles = []
    for row in df.to_dict("records"):
        tid = str(row["id"])
        if ids is not None and tid not in ids:
            continue
        pre, m_pre = _read_rgb(root / "pre" / f"{tid}.tif")
        post, m_post = _read_rgb(root / "post" / f"{tid}.tif")
        with rasterio.open(root / "labels" / f"{tid}_destroyed.tif") as src:
            change = src.read(1) > 0
            transform, crs = src.transform, src.crs
        h = min(pre.shape[1], post.shape[1], change.shape[0])
        w = min(pre.shape[2], post.shape[2], change.shape[1])
        pre, post, change = pre[:, :h, :w], post[:, :h, :w], change[:h, :w]
        valid = m_pre[:h, :w] & m_post[:h, :w]
        gdf = gpd.read_file(root / "buildings" / f"{tid}.geojson").to_crs(crs)
        inst, boxes = footprint_instances(gdf.geometry, (h, w), transform)
        tiles.append(SantaRosaTile(tid, int(row["cluster_id"]), pre, post, valid, change, inst, boxes))
    if not tiles:
        raise InputError(f"{root}: no tiles read; check tiles.csv and the ids asked for")
    log.info("read %d Santa Rosa tiles from %s", len(tiles), root)
    return tiles


def split_clusters(root: Path, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split Santa Rosa tile ids into train and held-out by ``cluster_id``.

    Clusters are visited in a seeded random order and held out until the held-out set has at least
    ``val_fraction`` of all changed pixels and ``0.75 * val_fraction`` of the tiles; a cluster that would
    push the held-out tiles above ``1.5 * val_fraction`` is skipped. Adjacent tiles (one cluster) never
    straddle the split.

    Args:
        root: the ``xbd-santa-rosa`` folder.
        val_fraction: target share of held-out tiles and changed pixels.
        seed: the split seed.

    Returns:
        ``(train_ids, val_ids)``, each sorted.
    """
    import pandas as pd

    df = pd.read_csv(root / "tiles.csv", dtype={"id": str})
    clusters = sorted(df["cluster_id"].unique().tolist())
    order = np.random.default_rng(seed).permutation(clusters)
    total_px, total_n = float(df["changed_pixels"].sum()), len(df)
    val: list[int] = []
    for c in order.tolist():
        sel = df["cluster_id"].isin(val)
        n_val, px_val = int(sel.sum()), float(df.loc[sel, "changed_pixels"].sum())
        if n_val >= 0.75 * val_fraction * total_n and px_val >= val_fraction * total_px:
            break
        if n_val + int((df["cluster_id"] == c).sum()) > 1.5 * val_fraction * total_n:
            continue  # a cluster that would make the held-out set too large
        val.append(c)
    is_val = df["cluster_id"].isin(val)
    return sorted(df.loc[~is_val, "id"].tolist()), sorted(df.loc[is_val, "id"].tolist())


def load_levir(root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Read the ``levir-dev`` pairs: ``(name, images uint8 (2, 3, h, w) [A, B], label bool (h, w))``."""
    return [(p.name, p.images, p.change) for p in load_png_pairs(root, "new")]


def demo_pairs(n: int, seed: int, size: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` demo-town pairs ``(images uint8 (2, 3, s, s), labels (2, s, s))`` from a fixed seed."""
    from pipeline.synth.training import training_pair

    rng = np.random.default_rng(seed)
    return [training_pair(rng, size=size) for _ in range(n)]


@dataclass
class RealPair:
    """One labelled real image pair in memory, resampled to :data:`NATIVE_GSD_M`.

    Attributes:
        dataset: the shared-data folder it came from (``whu-cd``, ``xbd-joplin``, ``levir-dev``).
        name: the file stem.
        images: uint8 (2, 3, h, w) as [earlier, later].
        change: bool (h, w), the change label.
        valid: bool (h, w).
        kind: what the label is when read earlier → later: ``"new"`` or ``"removed"``.
    """

    dataset: str
    name: str
    images: np.ndarray
    change: np.ndarray
    valid: np.ndarray
    kind: Literal["new", "removed"]


def resample_to(image: np.ndarray, shape: tuple[int, int], *, label: bool = False) -> np.ndarray:
    """Resample a (c, h, w) uint8 image or an (h, w) bool label to ``shape`` (h, w).

    Images use PIL's box filter going down (area averaging, as a coarser sensor integrates) and bilinear
    going up; labels are resampled as their area fraction and thresholded at one half.
    """
    from PIL import Image

    h, w = shape
    if label:
        frac = Image.fromarray(image.astype(np.float32)).resize((w, h), Image.Resampling.BOX)
        return np.asarray(frac) >= 0.5
    down = h < image.shape[-2]
    method = Image.Resampling.BOX if down else Image.Resampling.BILINEAR
    return np.stack([np.asarray(Image.fromarray(band).resize((w, h), method)) for band in image])


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise MissingInputError(f"{path}: not found; set train.data / evaluate.data to the shared data folder")
    return np.asarray(Image.open(path))


def load_png_pairs(
    root: Path,
    kind: Literal["new", "removed"],
    *,
    names: list[str] | None = None,
    label_dir: str = "label",
    gsd_m: float | None = None,
) -> list[RealPair]:
    """Read ``A/``, ``B/`` and ``<label_dir>/`` PNG pairs (LEVIR-CD, WHU-CD and xBD-Joplin layout).

    Args:
        root: the data set folder.
        kind: what the label marks when read A → B.
        names: file stems to read (default: every label).
        label_dir: the label folder (Joplin also has ``label_destroyed_or_major``).
        gsd_m: the source pixel size; default :data:`SOURCE_GSD_M` of the folder name. Pairs are
            resampled to :data:`NATIVE_GSD_M` when it differs by more than 5 %.

    Returns:
        The pairs, sorted by name.

    Raises:
        MissingInputError: the label folder or a file is missing.
    """
    labels = root / label_dir
    if not labels.is_dir():
        raise MissingInputError(f"{labels}: not found; set train.data / evaluate.data to the shared data folder")
    gsd = gsd_m if gsd_m is not None else SOURCE_GSD_M.get(root.name, NATIVE_GSD_M)
    out = []
    for path in sorted(labels.glob("*.png")):
        if names is not None and path.stem not in names:
            continue
        a = _read_png(root / "A" / path.name)[..., :3].transpose(2, 0, 1)
        b = _read_png(root / "B" / path.name)[..., :3].transpose(2, 0, 1)
        change = _read_png(path) > 127
        if change.ndim == 3:
            change = change[..., 0]
        if abs(gsd / NATIVE_GSD_M - 1) > 0.05:
            h, w = change.shape
            shape = (int(round(h * gsd / NATIVE_GSD_M)), int(round(w * gsd / NATIVE_GSD_M)))
            a, b = resample_to(a, shape), resample_to(b, shape)
            change = resample_to(change, shape, label=True)
        valid = np.ones(change.shape, bool)
        out.append(RealPair(root.name, path.stem, np.stack([a, b]), change, valid, kind))
    return out


#: Single-date footprint sets ``train.footprints`` can add to the erasing, copy-paste, no-change and shadow draws.
FOOTPRINT_SETS = ("xbd-joplin",)


def load_footprint_images(root: Path) -> list[SantaRosaTile]:
    """Read a set's pre-disaster images with their building footprints, as single-date tiles.

    For ``xbd-joplin``: ``A/<tile>.png`` (QuickBird-2, 2009) and the polygons of ``json/<tile>_pre_disaster.json``
    (pixel coordinates), resampled from :data:`SOURCE_GSD_M` to :data:`NATIVE_GSD_M`. Each tile's ``post`` is
    its ``pre`` (one date), ``change`` is empty and ``cluster`` is -1: the sampler only erases, pastes and
    pairs it with itself (:class:`pipeline.model.sampler.TrainingSampler`, ``footprints``).

    Raises:
        MissingInputError: the folder, an image or its label file is missing.
        InputError: a label file is not xBD JSON.
    """
    from affine import Affine
    from shapely import wkt

    if root.name not in FOOTPRINT_SETS:
        raise InputError(f"{root}: no footprint reader for {root.name!r}; known: {list(FOOTPRINT_SETS)!r}")
    images = sorted((root / "A").glob("*.png")) if (root / "A").is_dir() else []
    if not images:
        raise MissingInputError(f"{root / 'A'}: no images; set train.data to the shared data folder")
    gsd = SOURCE_GSD_M[root.name]
    tiles = []
    for path in images:
        label = root / "json" / f"{path.stem}_pre_disaster.json"
        if not label.is_file():
            raise MissingInputError(f"{label}: not found; the footprints of {path} are read from it")
        try:
            polys = [wkt.loads(f["wkt"]) for f in json.loads(label.read_text(encoding="utf-8"))["features"]["xy"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{label}: not an xBD label file ({exc}); restore it from the shared data") from exc
        img = _read_png(path)[..., :3].transpose(2, 0, 1)
        h0, w0 = img.shape[1:]
        shape = (int(round(h0 * gsd / NATIVE_GSD_M)), int(round(w0 * gsd / NATIVE_GSD_M)))
        img = resample_to(img, shape)
        # the polygons are in source pixels; one output pixel spans NATIVE / gsd of them
        transform = Affine.scale(NATIVE_GSD_M / gsd)
        inst, boxes = footprint_instances(polys, shape, transform)
        valid = img.max(axis=0) > 0  # xBD's black fill
        tiles.append(SantaRosaTile(path.stem, -1, img, img, valid, np.zeros(shape, bool), inst, boxes))
    log.info("read %d footprint images (%d buildings) from %s", len(tiles), sum(len(t.boxes) for t in tiles), root)
    return tiles


def whu_split(root: Path) -> tuple[list[str], list[str]]:
    """Split the WHU-CD pairs by location: ``(train names, validation names)``.

    The shared WHU-CD pairs are two tilings of one Christchurch scene (``ucdscm_*``, 1024², and
    ``lgpnet_*``, 512²) that may overlap, so a whole tiling stays on one side: ``ucdscm_*`` trains
    (3 pairs, 3.1 Mpx, among them an empty field that becomes a subdivision) and ``lgpnet_*`` validates
    (8 pairs from 8 places, more independent scenes for a steadier score). Normalised cross-correlation
    of every ``lgpnet`` tile against every ``ucdscm`` tile peaked at 0.43 (4× decimated, partial overlap
    allowed): no overlap was found, and the split would hold if there were one.
    """
    names = sorted(p.stem for p in (root / "label").glob("*.png"))
    if not names:
        raise MissingInputError(f"{root / 'label'}: no WHU-CD labels; set train.data to the shared data folder")
    return [n for n in names if not n.startswith("lgpnet_")], [n for n in names if n.startswith("lgpnet_")]


def coarsen(image: np.ndarray, factor: float) -> np.ndarray:
    """A (c, h, w) uint8 image as a sensor ``factor`` times coarser delivers it, resampled back to (h, w)."""
    h, w = image.shape[-2:]
    small = (max(1, int(round(h / factor))), max(1, int(round(w / factor))))
    return resample_to(resample_to(image, small), (h, w))
