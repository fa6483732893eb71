"""A training bundle: :class:`~pipeline.model.train.TrainingData` as plain files, for a GPU machine.

The lent GPU machine has torch, numpy, scipy and PIL but neither rasterio nor pydantic.

``scarwatch bundle --out .bundle`` reads the shared data as ``scarwatch train`` does
(:func:`pipeline.model.train.load_training_data`), renders demo-town pairs for the sampler's ``synth``
source (:mod:`pipeline.synth` needs rasterio, so they are drawn from this fixed list there) and writes::

    manifest.json                                   format, version, train settings, val_ids, every item
    santa/<id>_a.jpg, <id>_b.jpg, <id>.npz          pre, post; valid, change (packed bits), instances
    pairs/<source>/<name>_a.jpg, _b.jpg, .npz       earlier, later; change, valid
    footprints/<set>/<id>.jpg, .npz                 a single-date image (``train.footprints``); valid, instances
    quick/<set>/<i>_a.jpg, _b.jpg, .npz             the quick-validation items; label, valid
    synth/<i>_a.jpg, _b.jpg, .npz                   pre-rendered demo-town pairs; labels (2, s, s)

Images are JPEG (quality 90, chroma not subsampled: re-encoding the JPEG-compressed Santa Rosa sources
so costs 0.3 grey levels of mean absolute error, against 0.65 at quality 92 with 4:2:0 chroma, for about
10 % more bytes) or PNG (lossless); masks, labels and instance maps are lossless, in
compressed npz files (boolean arrays bit-packed, instances uint16). :func:`read_bundle` reads it back
with numpy and PIL alone; ``.bundle/`` is ignored by git and travels to the device machine as a carried
path (``scripts/gpu_train.sh``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import InputError, MissingInputError
from pipeline.fileio import replace_dir
from pipeline.model.data import RealPair, SantaRosaTile, instance_boxes
from pipeline.model.train import QuickItem, TrainingData

log = logging.getLogger(__name__)

FORMAT = "scarwatch-training-bundle"
VERSION = 1
#: Side of the pre-rendered demo-town pairs: crops up to this size (the sampler's rescale included) fit.
DEMO_SIZE = 448
_EXT = {"jpeg": ".jpg", "png": ".png"}


def _save_image(path: Path, image: np.ndarray, quality: int) -> None:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[:3].transpose(1, 2, 0)))
    if path.suffix == ".jpg":
        img.save(path, format="JPEG", quality=quality, subsampling=0)  # 4:4:4
    else:
        img.save(path, format="PNG", compress_level=6)


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise MissingInputError(f"{path}: missing from the bundle; write it again (scarwatch bundle)")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy()


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Compressed npz; boolean arrays are bit-packed with their shape beside them."""
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == bool:
            out[f"{name}__bits"] = np.packbits(a, axis=None)
            out[f"{name}__shape"] = np.array(a.shape, np.int64)
        else:
            out[name] = a
    np.savez_compressed(path, **out)  # type: ignore[arg-type]


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MissingInputError(f"{path}: missing from the bundle; write it again (scarwatch bundle)")
    out: dict[str, np.ndarray] = {}
    with np.load(path) as z:
        for key in z.files:
            if key.endswith("__bits"):
                name = key[: -len("__bits")]
                shape = tuple(int(v) for v in z[f"{name}__shape"])
                out[name] = np.unpackbits(z[key], count=int(np.prod(shape))).astype(bool).reshape(shape)
            elif not key.endswith("__shape"):
                out[key] = z[key]
    return out


class _Writer:
    """Writes one item (two images, or one for a single date, and an npz) per call under the bundle folder."""

    def __init__(self, root: Path, ext: str, quality: int) -> None:
        self.root, self.ext, self.quality = root, ext, quality

    def __call__(self, stem: str, images: np.ndarray, **arrays: np.ndarray) -> str:
        base = self.root / stem
        base.parent.mkdir(parents=True, exist_ok=True)
        for suffix, image in zip(_suffixes(len(images)), images, strict=True):
            _save_image(base.with_name(base.name + suffix + self.ext), image, self.quality)
        _save_arrays(base.with_name(base.name + ".npz"), **arrays)
        return stem


def _suffixes(n: int) -> tuple[str, ...]:
    if n not in (1, 2):
        raise ValueError(f"a bundle item holds one or two images, not {n}")
    return ("_a", "_b") if n == 2 else ("",)


def _read_item(root: Path, stem: str, ext: str, n: int = 2) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    base = root / stem
    images = np.stack([_load_image(base.with_name(base.name + s + ext)) for s in _suffixes(n)])
    return images, _load_arrays(base.with_name(base.name + ".npz"))


def write_bundle(
    data: TrainingData,
    folder: str | Path,
    *,
    demo_pairs: int,
    demo_size: int = DEMO_SIZE,
    demo_seed: int | None = None,
    image_format: Literal["jpeg", "png"] = "jpeg",
    quality: int = 90,
    source: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``data`` as a bundle folder (replacing one already there, atomically).

    Args:
        data: the training data (:func:`pipeline.model.train.load_training_data`).
        folder: the bundle folder to write (``.bundle``).
        demo_pairs: demo-town pairs to render for the ``synth`` source (needs :mod:`pipeline.synth`); 0
            keeps ``data.synth`` (none when it is None).
        demo_size: their side in pixels.
        demo_seed: their seed; default ``train.seed + 1`` (the quick validation and evaluate use others).
        image_format: ``jpeg`` (``quality``) or ``png`` (lossless).
        quality: JPEG quality (chroma is not subsampled).
        source: the shared data folder it was read from (recorded).

    Returns:
        The manifest written (``bytes`` is the bundle's size).
    """
    from pipeline.model.data import demo_pairs as render_demo_pairs

    if image_format not in _EXT:
        raise InputError(f"image_format {image_format!r} must be one of {sorted(_EXT)!r}")
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ext = _EXT[image_format]
    write = _Writer(tmp, ext, quality)
    seed = int(data.train.get("seed", 0)) + 1 if demo_seed is None else demo_seed
    if demo_pairs > 0:
        synth = [(im[:, :3], lab) for im, lab in render_demo_pairs(demo_pairs, seed, demo_size)]
    else:
        synth = list(data.synth or [])
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": None if source is None else str(source),
        "image_format": image_format,
        "quality": quality if image_format == "jpeg" else None,
        "train": data.train,
        "val_ids": list(data.val_ids),
        "tiles": [
            {
                "stem": write(f"santa/{t.id}", np.stack([t.pre, t.post]), **_tile_arrays(t)),
                "id": t.id,
                "cluster": t.cluster,
            }
            for t in data.tiles
        ],
        "pairs": {
            source_name: [
                {
                    "stem": write(f"pairs/{source_name}/{p.name}", p.images, change=p.change, valid=p.valid),
                    "dataset": p.dataset,
                    "name": p.name,
                    "kind": p.kind,
                }
                for p in pairs
            ]
            for source_name, pairs in data.pairs.items()
        },
        "footprints": {
            set_name: [
                {"stem": write(f"footprints/{set_name}/{t.id}", t.pre[None], **_tile_arrays(t)), "id": t.id}
                for t in tiles
            ]
            for set_name, tiles in data.footprints.items()
        },
        "quick": {
            name: [
                {"stem": write(f"quick/{name}/{i:03d}", imgs, label=lab, valid=valid), "channel": int(k)}
                for i, (imgs, lab, valid, k) in enumerate(items)
            ]
            for name, items in data.quick_sets.items()
        },
        "synth": {
            "seed": seed if demo_pairs > 0 else None,
            "size": demo_size if demo_pairs > 0 else None,
            "items": [write(f"synth/{i:04d}", im, labels=np.asarray(lab) > 0) for i, (im, lab) in enumerate(synth)],
        },
    }
    manifest["bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    replace_dir(tmp, folder)
    log.info("wrote training bundle %s (%.1f MB)", folder, manifest["bytes"] / 1e6)
    return manifest


def _tile_arrays(tile: SantaRosaTile) -> dict[str, np.ndarray]:
    if int(tile.instances.max(initial=0)) > np.iinfo(np.uint16).max:
        raise InputError(f"Santa Rosa tile {tile.id}: more than 65535 footprints do not fit the bundle's uint16")
    return {"valid": tile.valid, "change": tile.change, "instances": tile.instances.astype(np.uint16)}


def _tile(
    tile_id: str, cluster: int, pre: np.ndarray, post: np.ndarray, arrays: dict[str, np.ndarray]
) -> SantaRosaTile:
    """A tile from its images and the arrays :func:`_tile_arrays` stored (the boxes are derived again)."""
    inst = arrays["instances"].astype(np.int32)
    return SantaRosaTile(tile_id, cluster, pre, post, arrays["valid"], arrays["change"], inst, instance_boxes(inst))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The bundle's ``manifest.json``.

    Raises:
        MissingInputError: no manifest in ``folder``.
        InputError: not a training bundle of this version.
    """
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise MissingInputError(f"{path}: not found; write the bundle first (scarwatch bundle --out {folder})")
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise InputError(
            f"{path}: not a version-{VERSION} training bundle (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r}); write it again (scarwatch bundle)"
        )
    return manifest


def read_bundle(folder: str | Path) -> TrainingData:
    """Read a bundle written by :func:`write_bundle` back into memory (numpy and PIL only).

    Raises:
        MissingInputError: the manifest or a file it lists is missing.
        InputError: not a training bundle of this version.
    """
    root = Path(folder)
    manifest = read_manifest(root)
    ext = _EXT[manifest["image_format"]]
    tiles = []
    for entry in manifest["tiles"]:
        (pre, post), arrays = _read_item(root, entry["stem"], ext)
        tiles.append(_tile(entry["id"], int(entry["cluster"]), pre, post, arrays))
    pairs: dict[str, list[RealPair]] = {}
    for name, entries in manifest["pairs"].items():
        pairs[name] = []
        for entry in entries:
            images, arrays = _read_item(root, entry["stem"], ext)
            pairs[name].append(
                RealPair(entry["dataset"], entry["name"], images, arrays["change"], arrays["valid"], entry["kind"])
            )
    footprints: dict[str, list[SantaRosaTile]] = {}
    for name, entries in manifest.get("footprints", {}).items():  # bundles before train.footprints have none
        footprints[name] = []
        for entry in entries:
            (image,), arrays = _read_item(root, entry["stem"], ext, n=1)
            footprints[name].append(_tile(entry["id"], -1, image, image, arrays))  # one date: post is pre
    quick: dict[str, list[QuickItem]] = {}
    for name, entries in manifest["quick"].items():
        quick[name] = []
        for entry in entries:
            images, arrays = _read_item(root, entry["stem"], ext)
            quick[name].append((images, arrays["label"], arrays["valid"], int(entry["channel"])))
    synth = []
    for stem in manifest["synth"]["items"]:
        images, arrays = _read_item(root, stem, ext)
        synth.append((images, arrays["labels"].astype(np.uint8)))
    log.info(
        "read training bundle %s: %d tiles, %s pairs, %d demo pairs",
        root,
        len(tiles),
        {k: len(v) for k, v in pairs.items()},
        len(synth),
    )
    return TrainingData(
        tiles,
        pairs,
        quick,
        list(manifest["val_ids"]),
        synth=synth,
        train=dict(manifest["train"]),
        footprints=footprints,
    )
