"""Training and validation data for the change networks.

Sources (all real imagery except the demo town):

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

Every sample is ``(images uint8 (2, 3, s, s) as [a, b], labels uint8 (2, s, s) as [new, removed],
weight bool (s, s))`` where ``weight`` is False on invalid pixels and on ignored rings. The data is read
from ``paths.shared`` at run time and never copied.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]

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


def _read_rgb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import rasterio

    if not path.is_file():
        raise MissingInputError(f"{path}: image not found; check paths.shared points at ../shared/data")
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
    from rasterio import features

    table = root / "tiles.csv"
    if not table.is_file():
        raise MissingInputError(f"{table}: not found; set paths.shared to the shared data folder")
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
        shapes = [(g, i + 1) for i, g in enumerate(gdf.geometry) if g is not None and not g.is_empty]
        inst = (
            features.rasterize(shapes, out_shape=(h, w), transform=transform, fill=0, dtype="int32")
            if shapes
            else np.zeros((h, w), np.int32)
        )
        boxes = [(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in ndimage.find_objects(inst) if s is not None]
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


# --------------------------------------------------------------------------- augmentation


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Independent radiometric jitter of one float (3, h, w) image in [0, 1]."""
    x = img
    gray = x.mean(axis=0, keepdims=True)
    x = gray + (x - gray) * rng.uniform(0.7, 1.3)  # saturation
    x = x * rng.uniform(0.9, 1.1, size=(3, 1, 1))  # per-band gain (hue/white balance)
    x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean() + rng.uniform(-0.1, 0.1)  # contrast, brightness
    x = np.clip(x, 0, 1) ** rng.uniform(0.8, 1.25)  # gamma
    if rng.random() < 0.25:
        x = ndimage.gaussian_filter(x, sigma=(0, rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)))
    if rng.random() < 0.5:
        x = x + rng.normal(0, rng.uniform(0.005, 0.025), size=x.shape)
    x = np.clip(x, 0, 1)
    if rng.random() < 0.25:
        x = _jpeg(x, int(rng.integers(35, 90)))
    return x.astype(np.float32)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((x.transpose(1, 2, 0) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf), dtype=np.float32).transpose(2, 0, 1) / 255.0


def _geometric(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip and rot90 on the last two axes of every array."""
    k = int(rng.integers(4))
    flip = rng.random() < 0.5
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        if flip:
            a = a[..., ::-1]
        out.append(np.ascontiguousarray(a))
    return out


def _resize(arr: np.ndarray, size: int, order: int) -> np.ndarray:
    zoom = [1.0] * (arr.ndim - 2) + [size / arr.shape[-2], size / arr.shape[-1]]
    out = ndimage.zoom(arr, zoom, order=order, grid_mode=True, mode="grid-constant" if order == 0 else "nearest")
    return out[..., :size, :size]


# --------------------------------------------------------------------------- samplers


def _crop_origin(
    h: int, w: int, size: int, rng: np.random.Generator, center: tuple[int, int] | None = None
) -> tuple[int, int]:
    if center is None:
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    cy, cx = center
    y = int(np.clip(cy - size // 2 + rng.integers(-size // 3, size // 3 + 1), 0, h - size))
    x = int(np.clip(cx - size // 2 + rng.integers(-size // 3, size // 3 + 1), 0, w - size))
    return y, x


class TrainingSampler:
    """Draws augmented training samples from a mix of sources.

    The sampler is a deterministic function of its generator's state: :meth:`state` and
    :meth:`set_state` capture and restore it, so a resumed run draws exactly the batches an
    uninterrupted run would have drawn.

    Args:
        tiles: the Santa Rosa training tiles.
        weights: source name → weight; names: ``santa``, ``erase``, ``paste``, ``nochange``, ``synth``
            and one per entry of ``pairs`` (``whu``, ``joplin``).
        rng: the random generator (seeded by the caller).
        pairs: other labelled real pairs by source name, at the native pixel size.
        max_shift: largest shift, in pixels, between the two epochs.
        scale_range: range of the random rescale (applied to half of the samples).
        coarsen_p: share of samples coarsened to a pixel of ``coarsen_range`` metres (:func:`coarsen`).
        coarsen_range: delivery pixel sizes simulated, metres.
    """

    def __init__(
        self,
        tiles: list[SantaRosaTile],
        weights: dict[str, float],
        rng: np.random.Generator,
        *,
        pairs: dict[str, list[RealPair]] | None = None,
        max_shift: int = 3,
        scale_range: tuple[float, float] = (0.8, 1.25),
        coarsen_p: float = 0.0,
        coarsen_range: tuple[float, float] = (0.6, 2.0),
    ) -> None:
        if not tiles:
            raise InputError("no Santa Rosa training tiles; check train.val_fraction and paths.shared")
        self.tiles = tiles
        self.weights = dict(weights)
        self.rng = rng
        self.pairs = {k: v for k, v in (pairs or {}).items() if v}
        self.max_shift = max_shift
        self.scale_range = scale_range
        self.coarsen_p = coarsen_p
        self.coarsen_range = coarsen_range
        self.changed = [t for t in tiles if t.change.any()]
        self.with_buildings = [t for t in tiles if t.boxes]
        self.counts: dict[str, int] = {k: 0 for k in weights}
        self._sources: dict[str, Callable[[int], Sample]] = {
            "santa": self._santa,
            "erase": self._erase,
            "paste": self._paste,
            "nochange": self._nochange,
            "synth": self._synth_pair,
        }
        for name in self.pairs:
            self._sources[name] = lambda size, name=name: self._real(name, size)
        unknown = sorted(set(weights) - set(self._sources))
        if unknown:
            raise ValueError(f"unknown training sources {unknown!r}; valid: {sorted(self._sources)!r}")

    def state(self) -> dict[str, Any]:
        """The generator state and source counts (JSON-like), for :meth:`set_state`."""
        return {"rng": self.rng.bit_generator.state, "counts": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.rng.bit_generator.state = state["rng"]
        self.counts = dict(state["counts"])

    def _source(self) -> str:
        names = [k for k, v in self.weights.items() if v > 0]
        p = np.array([self.weights[k] for k in names], dtype=np.float64)
        return str(self.rng.choice(names, p=p / p.sum()))

    def sample(self, size: int) -> Sample:
        """One augmented sample ``(images float32 (2, 3, s, s), labels float32 (2, s, s), weight (s, s))``."""
        rng = self.rng
        src = self._source()
        scale = rng.uniform(*self.scale_range) if rng.random() < 0.5 else 1.0
        raw = max(32, int(round(size * scale)))
        images, labels, weight = self._sources[src](raw)
        self.counts[src] = self.counts.get(src, 0) + 1
        if raw != size:
            images = _resize(images.astype(np.float32), size, order=1)
            labels = _resize(labels, size, order=0)
            weight = _resize(weight.astype(np.uint8), size, order=0) > 0
        images, labels, weight = _geometric([images, labels, weight], rng)
        images = np.clip(images, 0, 255).astype(np.uint8)
        if self.coarsen_p > 0 and rng.random() < self.coarsen_p:
            lo, hi = (np.log(g / NATIVE_GSD_M) for g in self.coarsen_range)
            f = float(np.exp(rng.uniform(lo, hi)))
            both = rng.random() < 0.7  # mostly one sensor for both epochs; sometimes aerial vs satellite
            k = int(rng.integers(2))
            images = np.stack([coarsen(im, f) if both or i == k else im for i, im in enumerate(images)])
        a = _jitter(images[0].astype(np.float32) / 255.0, rng)
        b = _jitter(images[1].astype(np.float32) / 255.0, rng)
        return np.stack([a, b]), labels.astype(np.float32), weight.astype(bool)

    def _real(self, name: str, size: int) -> Sample:
        """A crop of a labelled real pair (centred on change 75 % of the time), in a random direction."""
        rng = self.rng
        pairs = self.pairs[name]
        pair = pairs[int(rng.integers(len(pairs)))]
        h, w = pair.change.shape
        if size > min(h, w):
            size = min(h, w)
        center = None
        if pair.change.any() and rng.random() < 0.75:
            ys, xs = np.nonzero(pair.change[::4, ::4])
            i = int(rng.integers(len(ys)))
            center = (int(ys[i]) * 4, int(xs[i]) * 4)
        y, x = _crop_origin(h, w, size, rng, center)
        s = self.max_shift
        dy, dx = (int(v) for v in rng.integers(-s, s + 1, size=2))
        y2, x2 = int(np.clip(y + dy, 0, h - size)), int(np.clip(x + dx, 0, w - size))
        first = pair.images[0][:, y : y + size, x : x + size]
        second = pair.images[1][:, y2 : y2 + size, x2 : x2 + size]
        valid = pair.valid[y : y + size, x : x + size] & pair.valid[y2 : y2 + size, x2 : x2 + size]
        change = pair.change[y2 : y2 + size, x2 : x2 + size].astype(np.uint8)
        zero = np.zeros_like(change)
        forward = rng.random() < 0.5
        k = 0 if pair.kind == "new" else 1  # the label's channel when read earlier -> later
        labels = [zero, zero]
        labels[k if forward else 1 - k] = change
        imgs = np.stack([first, second]) if forward else np.stack([second, first])
        return imgs, np.stack(labels), valid

    # each source returns (images uint8 (2, 3, s, s), labels uint8 (2, s, s), weight bool (s, s))

    def _pair_crop(
        self, tile: SantaRosaTile, first: np.ndarray, second: np.ndarray, y: int, x: int, size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Crop both images; the second is shifted by up to ``max_shift`` px. Returns images, valid."""
        h, w = tile.valid.shape
        s = self.max_shift
        dy, dx = (int(v) for v in self.rng.integers(-s, s + 1, size=2))
        y2, x2 = int(np.clip(y + dy, 0, h - size)), int(np.clip(x + dx, 0, w - size))
        imgs = np.stack([first[:, y : y + size, x : x + size], second[:, y2 : y2 + size, x2 : x2 + size]])
        valid = tile.valid[y : y + size, x : x + size] & tile.valid[y2 : y2 + size, x2 : x2 + size]
        return imgs, valid

    def _santa(self, size: int) -> Sample:
        rng = self.rng
        centred = self.changed and rng.random() < 0.75
        tile = self.changed[int(rng.integers(len(self.changed)))] if centred else self._any_tile()
        h, w = tile.valid.shape
        center = None
        if centred:
            ys, xs = np.nonzero(tile.change[::4, ::4])
            i = int(rng.integers(len(ys)))
            center = (int(ys[i]) * 4, int(xs[i]) * 4)
        y, x = _crop_origin(h, w, size, rng, center)
        forward = rng.random() < 0.5
        first, second = (tile.pre, tile.post) if forward else (tile.post, tile.pre)
        imgs, valid = self._pair_crop(tile, first, second, y, x, size)
        change = tile.change[y : y + size, x : x + size].astype(np.uint8)
        zero = np.zeros_like(change)
        labels = np.stack([zero, change]) if forward else np.stack([change, zero])
        return imgs, labels, valid

    def _any_tile(self) -> SantaRosaTile:
        return self.tiles[int(self.rng.integers(len(self.tiles)))]

    def _nochange(self, size: int) -> Sample:
        tile = self._any_tile()
        h, w = tile.valid.shape
        y, x = _crop_origin(h, w, size, self.rng)
        img = tile.pre if self.rng.random() < 0.5 else tile.post
        imgs, valid = self._pair_crop(tile, img, img, y, x, size)
        return imgs, np.zeros((2, size, size), np.uint8), valid

    def _building_crop(self, size: int) -> tuple[SantaRosaTile, int, int]:
        rng = self.rng
        tile = self.with_buildings[int(rng.integers(len(self.with_buildings)))]
        y0, y1, x0, x1 = tile.boxes[int(rng.integers(len(tile.boxes)))]
        h, w = tile.valid.shape
        y, x = _crop_origin(h, w, size, rng, ((y0 + y1) // 2, (x0 + x1) // 2))
        return tile, y, x

    def _erase(self, size: int) -> Sample:
        """Paint over 30-100% of a pre crop's footprints (and a margin for shadows) with ground."""
        rng = self.rng
        tile, y, x = self._building_crop(size)
        img = tile.pre[:, y : y + size, x : x + size].astype(np.float32)
        inst = tile.instances[y : y + size, x : x + size]
        valid = tile.valid[y : y + size, x : x + size].copy()
        ids = np.unique(inst[inst > 0])
        chosen = ids[rng.random(len(ids)) < rng.uniform(0.3, 1.0)] if len(ids) else ids
        if len(ids) and not len(chosen):
            chosen = ids[:1]
        foot = np.isin(inst, chosen)
        margin = int(rng.integers(2, 6))
        region = ndimage.binary_dilation(foot, iterations=margin)
        # ground: inpaint by normalised convolution of the non-building pixels, plus real texture
        keep = (~ndimage.binary_dilation(inst > 0, iterations=2)).astype(np.float32)
        sig = float(rng.uniform(4, 10))
        num = ndimage.gaussian_filter(img * keep, sigma=(0, sig, sig))
        den = ndimage.gaussian_filter(keep, sigma=sig)[None] + 1e-3
        fill = num / den
        if rng.random() < 0.7 and keep.mean() > 0.2:
            # add high-frequency texture copied from a random ground patch of the same crop
            dy, dx = (int(v) for v in rng.integers(-size // 2, size // 2 + 1, size=2))
            tex = np.roll(img, (dy, dx), axis=(1, 2))
            tex = tex - ndimage.gaussian_filter(tex, sigma=(0, 3, 3))
            fill = fill + tex * rng.uniform(0.5, 1.0)
        alpha = ndimage.gaussian_filter(region.astype(np.float32), 1.0)[None]
        erased = np.clip(img * (1 - alpha) + fill * alpha, 0, 255).astype(np.uint8)
        orig = img.astype(np.uint8)
        ring = region & ~foot
        ring |= ndimage.binary_dilation(foot, iterations=margin + 2) & ~foot & ~region
        weight = valid & ~ring
        lab = foot.astype(np.uint8)
        zero = np.zeros_like(lab)
        if rng.random() < 0.5:  # erased -> original: the buildings are new
            return np.stack([erased, orig]), np.stack([lab, zero]), weight
        return np.stack([orig, erased]), np.stack([zero, lab]), weight

    def _paste(self, size: int) -> Sample:
        """Paste 1-6 real building instances, with a cast shadow, onto ground of another crop."""
        rng = self.rng
        # target: the emptiest of a few random crops
        best = None
        for _ in range(4):
            tile = self._any_tile()
            h, w = tile.valid.shape
            y, x = _crop_origin(h, w, size, rng)
            occ = (tile.instances[y : y + size, x : x + size] > 0).mean() + (
                1 - tile.valid[y : y + size, x : x + size].mean()
            )
            if best is None or occ < best[0]:
                best = (occ, tile, y, x)
        assert best is not None
        _, tile, y, x = best
        base_img = tile.post if rng.random() < 0.5 else tile.pre
        ground = base_img[:, y : y + size, x : x + size].astype(np.float32)
        occupied = ndimage.binary_dilation(tile.instances[y : y + size, x : x + size] > 0, iterations=3)
        valid = tile.valid[y : y + size, x : x + size]
        out = ground.copy()
        label = np.zeros((size, size), bool)
        ring = np.zeros((size, size), bool)
        sun = rng.uniform(0, 2 * np.pi)
        shadow_len = rng.uniform(1, 6)
        sdy, sdx = int(round(np.sin(sun) * shadow_len)), int(round(np.cos(sun) * shadow_len))
        for _ in range(int(rng.integers(1, 7))):
            src = self.with_buildings[int(rng.integers(len(self.with_buildings)))]
            k = int(rng.integers(len(src.boxes)))
            y0, y1, x0, x1 = src.boxes[k]
            if min(y1 - y0, x1 - x0) < 4 or max(y1 - y0, x1 - x0) > size - 8:
                continue
            mask = src.instances[y0:y1, x0:x1] == k + 1
            patch = src.pre[:, y0:y1, x0:x1].astype(np.float32)
            if not src.valid[y0:y1, x0:x1][mask].all():
                continue
            rot = int(rng.integers(4))
            mask, patch = np.rot90(mask, rot), np.rot90(patch, rot, axes=(1, 2))
            ph, pw = mask.shape
            for _try in range(6):
                py, px = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
                if not (occupied[py : py + ph, px : px + pw] & mask).any():
                    break
            else:
                continue
            full = np.zeros((size, size), bool)
            full[py : py + ph, px : px + pw] = mask
            shadow = np.roll(full, (sdy, sdx), axis=(0, 1)) & ~full & ~label
            out[:, shadow] *= rng.uniform(0.45, 0.75)
            alpha = ndimage.gaussian_filter(full.astype(np.float32), 0.6)
            canvas = np.zeros_like(out)
            canvas[:, py : py + ph, px : px + pw] = patch
            out = out * (1 - alpha) + canvas * alpha
            label |= full
            occupied |= ndimage.binary_dilation(full, iterations=3)
            ring |= ndimage.binary_dilation(full, iterations=2) & ~full
        ring &= ~label
        pasted = np.clip(out, 0, 255).astype(np.uint8)
        ground_u8 = ground.astype(np.uint8)
        lab = label.astype(np.uint8)
        zero = np.zeros_like(lab)
        weight = valid & ~ring
        if rng.random() < 0.5:
            return np.stack([ground_u8, pasted]), np.stack([lab, zero]), weight
        return np.stack([pasted, ground_u8]), np.stack([zero, lab]), weight

    def _synth_pair(self, size: int) -> Sample:
        from pipeline.synth.training import training_pair

        images, labels = training_pair(self.rng, size=size)
        images = np.asarray(images, dtype=np.uint8)[:, :3]
        labels = (np.asarray(labels) > 0).astype(np.uint8)
        return images, labels, np.ones((size, size), bool)

    def batch(self, batch_size: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch ``(images (b, 2, 3, s, s), labels (b, 2, s, s), weight (b, s, s))``, float32 / bool."""
        items = [self.sample(size) for _ in range(batch_size)]
        return (
            np.stack([i[0] for i in items]),
            np.stack([i[1] for i in items]),
            np.stack([i[2] for i in items]),
        )
