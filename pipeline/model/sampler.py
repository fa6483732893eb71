"""The training sampler: a seeded mix of real pairs, single-temporal pairing and demo-town pairs.

Sources and their weights are ``train.mix`` (see :mod:`pipeline.model.data` for what each source is);
augmentation is the same flips/rot90 for both epochs, independent radiometric jitter per epoch, a mild
rescale, and coarsening of a share of the samples to a 0.6-2 m delivery (:func:`coarsen`). Every sample
is ``(images float32 (2, 3, s, s) as [a, b], labels float32 (2, s, s) as [new, removed], weight bool
(s, s))`` where ``weight`` is False on invalid pixels and on ignored rings.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError
from pipeline.model.data import NATIVE_GSD_M, RealPair, SantaRosaTile, coarsen

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


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


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by ``(dy, dx)`` pixels, False where it moved in from outside (no wrap-around)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) < h and abs(dx) < w:
        out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
            max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
        ]
    return out


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


def _change_pixel(change: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random changed pixel of ``change`` (on a 4-pixel lattice), to centre a crop on."""
    ys, xs = np.nonzero(change[::4, ::4])
    i = int(rng.integers(len(ys)))
    return int(ys[i]) * 4, int(xs[i]) * 4


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
        weights: source name → weight; names: ``santa``, ``erase``, ``paste``, ``nochange``, ``shadow``,
            ``block``, ``synth`` and one per entry of ``pairs`` (``whu``, ``joplin``).
        rng: the random generator (seeded by the caller).
        pairs: other labelled real pairs by source name, at the native pixel size.
        max_shift: largest shift, in pixels, between the two epochs.
        scale_range: range of the random rescale (applied to half of the samples).
        coarsen_p: share of samples coarsened to a pixel of ``coarsen_range`` metres (:func:`coarsen`).
        coarsen_range: delivery pixel sizes simulated, metres.
        footprints: single-date footprint tiles by set (:func:`pipeline.model.data.load_footprint_images`)
            with the share of the ``erase``, ``paste``, ``nochange``, ``shadow`` and ``block`` draws taken from
            each set; the rest come from the Santa Rosa tiles.
        synth_pairs: pre-rendered demo-town pairs ``(images uint8 (2, c, s, s), labels (2, s, s))`` the
            ``synth`` source crops from (centred on change 75 % of the time); None renders a new pair per
            sample with :func:`pipeline.synth.training.training_pair` (which needs rasterio).
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
        synth_pairs: list[tuple[np.ndarray, np.ndarray]] | None = None,
        footprints: dict[str, tuple[float, list[SantaRosaTile]]] | None = None,
    ) -> None:
        if not tiles:
            raise InputError("no Santa Rosa training tiles; check train.val_fraction and paths.shared")
        if synth_pairs is not None and not synth_pairs and weights.get("synth", 0) > 0:
            raise InputError("no pre-rendered demo-town pairs for mix.synth; bundle some (--demo-pairs) or set it to 0")
        self.tiles = tiles
        self.weights = dict(weights)
        self.rng = rng
        self.pairs = {k: v for k, v in (pairs or {}).items() if v}
        self.max_shift = max_shift
        self.scale_range = scale_range
        self.coarsen_p = coarsen_p
        self.coarsen_range = coarsen_range
        self.synth_pairs = synth_pairs
        self.changed = [t for t in tiles if t.change.any()]
        self.with_buildings = [t for t in tiles if t.boxes]
        # the single-date pools erase / paste / nochange / shadow draw from: (share, tiles, tiles with buildings)
        self.footprints = [
            (share, list(ts), [t for t in ts if t.boxes]) for _, (share, ts) in sorted((footprints or {}).items())
        ]
        if any(share > 0 and not boxed for share, _, boxed in self.footprints):
            raise InputError("a footprint set in train.footprints has no buildings; check it or set its share to 0")
        self.counts: dict[str, int] = {k: 0 for k in weights}
        self._sources: dict[str, Callable[[int], Sample]] = {
            "santa": self._santa,
            "erase": self._erase,
            "paste": self._paste,
            "nochange": self._nochange,
            "shadow": self._shadow,
            "block": self._block,
            "synth": self._synth_pair,
        }
        for name in self.pairs:
            self._sources[name] = functools.partial(self._real, name)
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
        if raw != size or images.shape[-2:] != (size, size):  # a source smaller than raw returns what it has
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
            center = _change_pixel(pair.change, rng)
        y, x = _crop_origin(h, w, size, rng, center)
        imgs, valid, (y2, x2) = self._pair_crop(pair.valid, pair.images[0], pair.images[1], y, x, size)
        change = pair.change[y2 : y2 + size, x2 : x2 + size].astype(np.uint8)
        zero = np.zeros_like(change)
        forward = rng.random() < 0.5
        k = 0 if pair.kind == "new" else 1  # the label's channel when read earlier -> later
        labels = [zero, zero]
        labels[k if forward else 1 - k] = change
        if not forward:
            imgs = np.ascontiguousarray(imgs[::-1])
        return imgs, np.stack(labels), valid

    # each source returns (images uint8 (2, 3, s, s), labels uint8 (2, s, s), weight bool (s, s))

    def _pair_crop(
        self, valid_map: np.ndarray, first: np.ndarray, second: np.ndarray, y: int, x: int, size: int
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Crop both images; the second is shifted by up to ``max_shift`` px.

        Returns the images, the pixels valid in both crops of ``valid_map`` and the second crop's origin.
        """
        h, w = valid_map.shape
        s = self.max_shift
        dy, dx = (int(v) for v in self.rng.integers(-s, s + 1, size=2))
        y2, x2 = int(np.clip(y + dy, 0, h - size)), int(np.clip(x + dx, 0, w - size))
        imgs = np.stack([first[:, y : y + size, x : x + size], second[:, y2 : y2 + size, x2 : x2 + size]])
        valid = valid_map[y : y + size, x : x + size] & valid_map[y2 : y2 + size, x2 : x2 + size]
        return imgs, valid, (y2, x2)

    def _santa(self, size: int) -> Sample:
        rng = self.rng
        centred = self.changed and rng.random() < 0.75
        tile = self.changed[int(rng.integers(len(self.changed)))] if centred else self._any_tile()
        h, w = tile.valid.shape
        center = _change_pixel(tile.change, rng) if centred else None
        y, x = _crop_origin(h, w, size, rng, center)
        forward = rng.random() < 0.5
        first, second = (tile.pre, tile.post) if forward else (tile.post, tile.pre)
        imgs, valid, _ = self._pair_crop(tile.valid, first, second, y, x, size)
        change = tile.change[y : y + size, x : x + size].astype(np.uint8)
        zero = np.zeros_like(change)
        labels = np.stack([zero, change]) if forward else np.stack([change, zero])
        return imgs, labels, valid

    def _any_tile(self) -> SantaRosaTile:
        return self.tiles[int(self.rng.integers(len(self.tiles)))]

    def _pool(self, buildings: bool) -> list[SantaRosaTile]:
        """The tiles one single-date draw picks from: a footprint set by its share, else Santa Rosa's."""
        if self.footprints:  # no draw without footprint sets: older runs keep their random stream
            u, acc = float(self.rng.random()), 0.0
            for share, tiles, boxed in self.footprints:
                acc += share
                if u < acc:
                    return boxed if buildings else tiles
        return self.with_buildings if buildings else self.tiles

    def _single_date_tile(self, buildings: bool = False) -> SantaRosaTile:
        pool = self._pool(buildings)
        return pool[int(self.rng.integers(len(pool)))]

    def _nochange(self, size: int) -> Sample:
        tile = self._single_date_tile()
        h, w = tile.valid.shape
        y, x = _crop_origin(h, w, size, self.rng)
        img = tile.pre if self.rng.random() < 0.5 else tile.post
        imgs, valid, _ = self._pair_crop(tile.valid, img, img, y, x, size)
        return imgs, np.zeros((2, size, size), np.uint8), valid

    def _shadow(self, size: int) -> Sample:
        """No change but the shadows: one crop, its buildings casting shadows of another length and direction.

        Monthly deliveries are taken under another sun (season, time of day, satellite), so the shadows of
        standing buildings grow, shrink and turn between two epochs. That is not a change, and it is what
        a network trained only on pairs under one sun flags as a removed or new structure (the demo town's
        tall blocks did so every spring). Each epoch gets the cast shadows of the crop's footprints from its
        own sun (an azimuth within 40 degrees of the other's, a length of 1-20 px, so up to 10 m at 0.5 m),
        or none (a third of the epochs); the label is empty.
        """
        rng = self.rng
        tile, y, x = self._building_crop(size)
        img = tile.pre[:, y : y + size, x : x + size].astype(np.float32)
        foot = tile.instances[y : y + size, x : x + size] > 0
        valid = tile.valid[y : y + size, x : x + size]
        base = rng.uniform(0, 2 * np.pi)
        out = []
        for _ in range(2):
            epoch = img.copy()
            if rng.random() >= 1 / 3:
                az, length = base + rng.uniform(-0.35, 0.35), rng.uniform(1, 20)
                dy, dx = np.sin(az), np.cos(az)
                cast = np.zeros_like(foot)
                for step in range(1, int(np.ceil(length)) + 1):  # the footprint swept along the shadow
                    cast |= _shifted(foot, int(round(dy * step)), int(round(dx * step)))
                alpha = ndimage.gaussian_filter((cast & ~foot).astype(np.float32), 0.7) * ~foot  # roofs stay lit
                dark = rng.uniform(0.4, 0.75) * np.array([1.0, 1.04, 1.18], np.float32)[:, None, None]
                epoch = epoch * (1 - alpha * (1 - np.minimum(dark, 1.0)))
            out.append(np.clip(epoch, 0, 255).astype(np.uint8))
        return np.stack(out), np.zeros((2, size, size), np.uint8), valid.copy()

    def _building_crop(self, size: int) -> tuple[SantaRosaTile, int, int]:
        rng = self.rng
        tile = self._single_date_tile(buildings=True)
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

    def _emptiest_crop(self, size: int) -> tuple[SantaRosaTile, int, int]:
        """The emptiest of four random single-date crops (fewest footprint and invalid pixels): ground."""
        best = None
        for _ in range(4):
            tile = self._single_date_tile()
            h, w = tile.valid.shape
            y, x = _crop_origin(h, w, size, self.rng)
            occ = (tile.instances[y : y + size, x : x + size] > 0).mean() + (
                1 - tile.valid[y : y + size, x : x + size].mean()
            )
            if best is None or occ < best[0]:
                best = (occ, tile, y, x)
        assert best is not None
        return best[1], best[2], best[3]

    def _block(self, size: int) -> Sample:
        """A whole block built on open ground: a region of a built-up crop replaced by ground from elsewhere.

        New construction in a growing city comes a subdivision at a time (LEVIR-CD's Texas suburbs, WHU-CD's
        Christchurch): the earlier epoch shows fields, scrub or soil where the later one shows rows of houses,
        their drives and streets, with no standing building beside them to compare with. Erasing and
        copy-paste change single footprints inside an unchanged neighbourhood; here 40-100 % of a crop (the
        whole crop a third of the time; otherwise the side of a wavy line) is replaced by the emptiest of four
        random crops. Footprints lie wholly inside or outside the region (each goes with the side that holds
        most of it), and the label is the footprints inside, edges included: the later epoch is the original
        image, so its outlines are exact. Buildings of the ground crop inside the region are not labelled
        but ignored (on a burnt Santa Rosa image they are rubble). A random direction: half the pairs are
        the block removed.
        """
        rng = self.rng
        tile, y, x = self._building_crop(size)
        img = tile.pre[:, y : y + size, x : x + size].astype(np.float32)
        inst = tile.instances[y : y + size, x : x + size]
        valid = tile.valid[y : y + size, x : x + size]
        gtile, gy, gx = self._emptiest_crop(size)
        ground = (gtile.post if rng.random() < 0.5 else gtile.pre)[:, gy : gy + size, gx : gx + size].astype(np.float32)
        gfoot = gtile.instances[gy : gy + size, gx : gx + size] > 0
        gvalid = gtile.valid[gy : gy + size, gx : gx + size]
        if rng.random() < 1 / 3:
            region = np.ones((size, size), bool)
        else:  # the side of a line at a random angle, made wavy, covering a random share of the crop
            theta = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
            dist = yy * np.sin(theta) + xx * np.cos(theta)
            wobble = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), size / 8)
            dist += wobble / (np.abs(wobble).max() + 1e-6) * size / 12
            region = dist <= np.quantile(dist, rng.uniform(0.4, 1.0))
        ids = np.unique(inst[inst > 0])
        share = ndimage.mean(region, labels=inst, index=ids) if len(ids) else np.zeros(0)
        inside = np.isin(inst, ids[np.asarray(share) >= 0.5])
        outside = (inst > 0) & ~inside
        region = (region | ndimage.binary_dilation(inside, iterations=3)) & ~ndimage.binary_dilation(
            outside, iterations=2
        )
        alpha = ndimage.gaussian_filter(region.astype(np.float32), 1.5)
        built = tile.pre[:, y : y + size, x : x + size]
        open_ground = np.clip(img * (1 - alpha) + ground * alpha, 0, 255).astype(np.uint8)
        weight = valid & (gvalid | (alpha < 0.05)) & ~(ndimage.binary_dilation(gfoot, iterations=2) & (alpha > 0.05))
        lab = inside.astype(np.uint8)
        zero = np.zeros_like(lab)
        if rng.random() < 0.5:  # open ground -> built: the block is new
            return np.stack([open_ground, built]), np.stack([lab, zero]), weight
        return np.stack([built, open_ground]), np.stack([zero, lab]), weight

    def _paste(self, size: int) -> Sample:
        """Paste 1-6 real building instances, with a cast shadow, onto ground of another crop."""
        rng = self.rng
        tile, y, x = self._emptiest_crop(size)
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
            src = self._single_date_tile(buildings=True)
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
        if self.synth_pairs is not None:
            return self._rendered_synth(size)
        from pipeline.synth.training import training_pair

        images, labels = training_pair(self.rng, size=size)
        images = np.asarray(images, dtype=np.uint8)[:, :3]
        labels = (np.asarray(labels) > 0).astype(np.uint8)
        return images, labels, np.ones((size, size), bool)

    def _rendered_synth(self, size: int) -> Sample:
        """A crop of a pre-rendered demo-town pair (the whole pair when it is smaller than ``size``)."""
        rng = self.rng
        assert self.synth_pairs is not None
        images, labels = self.synth_pairs[int(rng.integers(len(self.synth_pairs)))]
        h, w = labels.shape[-2:]
        size = min(size, h, w)
        change = np.asarray(labels).max(axis=0) > 0
        center = _change_pixel(change, rng) if change.any() and rng.random() < 0.75 else None
        y, x = _crop_origin(h, w, size, rng, center)
        crop = (slice(y, y + size), slice(x, x + size))
        lab = (np.asarray(labels)[(slice(None), *crop)] > 0).astype(np.uint8)
        return np.asarray(images, dtype=np.uint8)[:, :3, crop[0], crop[1]], lab, np.ones((size, size), bool)

    def batch(self, batch_size: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch ``(images (b, 2, 3, s, s), labels (b, 2, s, s), weight (b, s, s))``, float32 / bool."""
        items = [self.sample(size) for _ in range(batch_size)]
        return (
            np.stack([i[0] for i in items]),
            np.stack([i[1] for i in items]),
            np.stack([i[2] for i in items]),
        )
