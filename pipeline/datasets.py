"""Training and validation data for the change networks.

Sources (all real imagery except the demo town):

* **Santa Rosa pairs** (``xbd-santa-rosa``): read forward (pre → post) a destroyed building is
  *removed*; read backward (post → pre) it is *new*. Both images' masks define the valid pixels.
* **Footprint erasing** (single-temporal pairing, after ChangeStar): a pre image crop, and the same crop
  with some of its footprints painted over by nearby ground; the label is the erased footprints.
* **Copy-paste** ("house on soil"): real building instances cut by their footprints from pre images and
  pasted, with a cast shadow, onto ground elsewhere; the label is the pasted footprints.
* **No change**: one crop twice, with independent radiometric jitter.
* **Demo town**: ``pipeline.synth.training_pair`` when that module exists.

Every sample is ``(images uint8 (2, 3, s, s) as [a, b], labels uint8 (2, s, s) as [new, removed],
weight bool (s, s))`` where ``weight`` is False on invalid pixels and on ignored rings. The data is read
from ``paths.shared`` at run time and never copied.
"""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


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
    from PIL import Image

    label_dir = root / "label"
    if not label_dir.is_dir():
        raise MissingInputError(f"{label_dir}: not found; set paths.shared to the shared data folder")
    out = []
    for path in sorted(label_dir.glob("*.png")):
        a = np.asarray(Image.open(root / "A" / path.name).convert("RGB")).transpose(2, 0, 1)
        b = np.asarray(Image.open(root / "B" / path.name).convert("RGB")).transpose(2, 0, 1)
        out.append((path.stem, np.stack([a, b]), np.asarray(Image.open(path)) > 127))
    return out


def synth_pair_fn() -> Callable[..., tuple[np.ndarray, np.ndarray]] | None:
    """Return ``pipeline.synth.training_pair`` if the demo-town module provides it, else None."""
    try:
        mod = importlib.import_module("pipeline.synth")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available yet"
        log.debug("pipeline.synth not importable: %r", exc)
        return None
    fn = getattr(mod, "training_pair", None)
    return fn if callable(fn) else None


def demo_pairs(n: int, seed: int, size: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` demo-town pairs from a fixed seed (validation), or [] when synth is not available."""
    fn = synth_pair_fn()
    if fn is None:
        return []
    rng = np.random.default_rng(seed)
    return [fn(rng, size=size) for _ in range(n)]


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

    Args:
        tiles: the Santa Rosa training tiles.
        weights: source name → weight; names: ``santa``, ``erase``, ``paste``, ``nochange``, ``synth``.
        rng: the random generator (seeded by the caller).
        max_shift: largest shift, in pixels, between the two epochs.
        scale_range: range of the random rescale (applied to half of the samples).
    """

    def __init__(
        self,
        tiles: list[SantaRosaTile],
        weights: dict[str, float],
        rng: np.random.Generator,
        *,
        max_shift: int = 3,
        scale_range: tuple[float, float] = (0.6, 1.6),
    ) -> None:
        if not tiles:
            raise InputError("no Santa Rosa training tiles; check train.val_fraction and paths.shared")
        self.tiles = tiles
        self.weights = dict(weights)
        self.rng = rng
        self.max_shift = max_shift
        self.scale_range = scale_range
        self._synth_fn = synth_pair_fn()
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
        unknown = sorted(set(weights) - set(self._sources))
        if unknown:
            raise ValueError(f"unknown training sources {unknown!r}; valid: {sorted(self._sources)!r}")

    def refresh_synth(self) -> bool:
        """Look for ``pipeline.synth.training_pair`` again (it may appear while training runs)."""
        if self._synth_fn is None:
            self._synth_fn = synth_pair_fn()
            if self._synth_fn is not None:
                log.info("pipeline.synth.training_pair found: demo-town pairs join the mix")
        return self._synth_fn is not None

    def _source(self) -> str:
        names = [k for k, v in self.weights.items() if v > 0 and (k != "synth" or self._synth_fn is not None)]
        p = np.array([self.weights[k] for k in names], dtype=np.float64)
        return str(self.rng.choice(names, p=p / p.sum()))

    def sample(self, size: int) -> Sample:
        """One augmented sample ``(images float32 (2, 3, s, s), labels float32 (2, s, s), weight (s, s))``."""
        rng = self.rng
        src = self._source()
        scale = rng.uniform(*self.scale_range) if rng.random() < 0.5 else 1.0
        raw = max(32, int(round(size * scale)))
        try:
            images, labels, weight = self._sources[src](raw)
        except Exception as exc:  # noqa: BLE001 - a broken synth module must not stop a long training run
            if src != "synth":
                raise
            log.warning("pipeline.synth.training_pair failed (%r); dropping demo pairs from the mix", exc)
            self._synth_fn = None
            self.weights["synth"] = 0.0
            images, labels, weight = self._santa(raw)
            src = "santa"
        self.counts[src] = self.counts.get(src, 0) + 1
        if raw != size:
            images = _resize(images.astype(np.float32), size, order=1)
            labels = _resize(labels, size, order=0)
            weight = _resize(weight.astype(np.uint8), size, order=0) > 0
        images, labels, weight = _geometric([images, labels, weight], rng)
        a = _jitter(images[0].astype(np.float32) / 255.0, rng)
        b = _jitter(images[1].astype(np.float32) / 255.0, rng)
        return np.stack([a, b]), labels.astype(np.float32), weight.astype(bool)

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
        fn: Any = self._synth_fn
        images, labels = fn(self.rng, size=size)
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
