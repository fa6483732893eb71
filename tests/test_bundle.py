"""The training bundle and the GPU trainer: the bundle reads back as the data it was written from, train()
takes data in memory, gpu_train runs (on the CPU) from a bundle, and neither needs rasterio or pydantic."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_train import _fake_train_settings

from pipeline.cli import cli
from pipeline.config import TrainSettings
from pipeline.errors import InputError
from pipeline.model.bundle import read_bundle, read_manifest, write_bundle
from pipeline.model.data import demo_pairs
from pipeline.model.gpu_train import PlainTrainSettings, main
from pipeline.model.sampler import TrainingSampler
from pipeline.model.train import TrainingData, load_training_data, settings_json, train
from pipeline.nets.checkpoint import ChangeModel
from pipeline.nets.device import cpu_name

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = {"widths": [4, 4, 8, 8, 8]}


def _settings(tmp_path: Path, **kw: object) -> TrainSettings:
    return _fake_train_settings(tmp_path, **{"steps": 3, "footprints": {"xbd-joplin": 0.3}, **kw})


@pytest.fixture(scope="module")
def fake_data(fake_shared: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return load_training_data(_settings(tmp_path_factory.mktemp("settings")), fake_shared)


@pytest.fixture(scope="module")
def png_bundle(fake_data: TrainingData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / ".bundle"
    write_bundle(fake_data, folder, demo_pairs=3, demo_size=96, image_format="png")
    return folder


def _assert_same(a: TrainingData, b: TrainingData, *, atol: float = 0) -> None:
    def images(x: np.ndarray, y: np.ndarray) -> None:
        assert x.shape == y.shape and x.dtype == y.dtype == np.uint8
        assert np.abs(x.astype(float) - y).mean() <= atol

    assert a.val_ids == b.val_ids and a.train == b.train
    assert [t.id for t in a.tiles] == [t.id for t in b.tiles]
    for s, t in zip(a.tiles, b.tiles, strict=True):
        images(s.pre, t.pre)
        images(s.post, t.post)
        assert s.cluster == t.cluster and s.boxes == t.boxes
        for name in ("valid", "change", "instances"):
            np.testing.assert_array_equal(getattr(s, name), getattr(t, name))
            assert getattr(s, name).dtype == getattr(t, name).dtype
    assert a.pairs.keys() == b.pairs.keys()
    for key in a.pairs:
        for p, q in zip(a.pairs[key], b.pairs[key], strict=True):
            assert (p.dataset, p.name, p.kind) == (q.dataset, q.name, q.kind)
            images(p.images, q.images)
            np.testing.assert_array_equal(p.change, q.change)
            np.testing.assert_array_equal(p.valid, q.valid)
    assert a.footprints.keys() == b.footprints.keys() == {"xbd-joplin"}
    for key in a.footprints:
        assert [t.id for t in a.footprints[key]] == [t.id for t in b.footprints[key]]
        for s, t in zip(a.footprints[key], b.footprints[key], strict=True):
            images(s.pre, t.pre)
            assert t.post is t.pre and s.boxes == t.boxes and len(t.boxes) == 9
            for name in ("valid", "change", "instances"):
                np.testing.assert_array_equal(getattr(s, name), getattr(t, name))
    assert a.quick_sets.keys() == b.quick_sets.keys()
    for key in a.quick_sets:
        assert len(a.quick_sets[key]) == len(b.quick_sets[key])
        for (im1, lab1, val1, k1), (im2, lab2, val2, k2) in zip(a.quick_sets[key], b.quick_sets[key], strict=True):
            images(im1, im2)
            np.testing.assert_array_equal(lab1, lab2)
            np.testing.assert_array_equal(val1, val2)
            assert k1 == k2 and lab2.dtype == val2.dtype == bool


def test_a_png_bundle_reads_back_exactly(fake_data: TrainingData, png_bundle: Path) -> None:
    back = read_bundle(png_bundle)
    _assert_same(fake_data, back)
    assert {"santa-rosa", "levir-dev", "whu-cd", "demo-town"} == set(back.quick_sets)
    assert set(back.pairs) == {"whu", "joplin"}
    # the demo-town pairs are rendered here, from train.seed + 1, for the synth source there
    expected = demo_pairs(3, fake_data.train["seed"] + 1, 96)
    assert back.synth is not None and len(back.synth) == 3
    for (im, lab), (im2, lab2) in zip(expected, back.synth, strict=True):
        np.testing.assert_array_equal(im[:, :3], im2)
        np.testing.assert_array_equal(lab, lab2)
    manifest = read_manifest(png_bundle)
    assert manifest["train"]["mix"] == fake_data.train["mix"] and manifest["synth"]["size"] == 96
    assert manifest["bytes"] == sum(p.stat().st_size for p in png_bundle.rglob("*.*") if p.name != "manifest.json")


def test_a_jpeg_bundle_is_close_and_its_masks_exact(fake_data: TrainingData, tmp_path: Path) -> None:
    manifest = write_bundle(fake_data, tmp_path / "b", demo_pairs=0)
    assert manifest["synth"]["items"] == [] and manifest["quality"] == 90
    assert (tmp_path / "b" / "santa" / f"{fake_data.tiles[0].id}_a.jpg").is_file()
    # the fake scenes are white noise, JPEG's worst case (real Santa Rosa tiles: 0.3 grey levels)
    _assert_same(fake_data, read_bundle(tmp_path / "b"), atol=8.0)
    # writing again replaces the bundle
    write_bundle(fake_data, tmp_path / "b", demo_pairs=0, image_format="png")
    assert not list((tmp_path / "b").rglob("*.jpg"))


def test_a_bundle_from_before_footprint_sets_reads_without_them(fake_data: TrainingData, tmp_path: Path) -> None:
    write_bundle(fake_data, tmp_path / "b", demo_pairs=0, image_format="png")
    assert (tmp_path / "b" / "footprints" / "xbd-joplin" / "joplin-tornado_00000000.png").is_file()  # one date
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["footprints"], manifest["train"]["footprints"]
    path.write_text(json.dumps(manifest))
    back = read_bundle(tmp_path / "b")
    assert back.footprints == {} and len(back.tiles) == len(fake_data.tiles)
    assert PlainTrainSettings.from_manifest(back.train).footprints == {}


def test_read_bundle_refuses_a_folder_that_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found; write the bundle first"):
        read_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(InputError, match="not a version-1 training bundle"):
        read_bundle(tmp_path)


def test_train_takes_the_data_in_memory(fake_shared: Path, fake_data: TrainingData, tmp_path: Path) -> None:
    a = train(_settings(tmp_path / "a"), tmp_path / "a" / "net.pt", data=fake_shared)
    b = train(_settings(tmp_path / "b"), tmp_path / "b" / "net.pt", data=fake_data)
    wa = torch.load(tmp_path / "a" / "net.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "net.pt", weights_only=True)["state_dict"]
    assert a.steps == b.steps == 3 and all(torch.equal(v, wb[k]) for k, v in wa.items())


def test_train_runs_from_a_bundle(png_bundle: Path, tmp_path: Path) -> None:
    result = train(
        _settings(tmp_path, mix={"synth": 1.0, "whu": 1.0}), tmp_path / "net.pt", data=read_bundle(png_bundle)
    )
    assert result.steps == 3
    assert result.history[-1]["mix"]["synth"] > 0  # drawn from the pre-rendered pairs


def test_sampler_crops_pre_rendered_synth_pairs(fake_data: TrainingData) -> None:
    rng = np.random.default_rng(0)
    sampler = TrainingSampler(fake_data.tiles, {"synth": 1.0}, rng, synth_pairs=demo_pairs(2, 5, 48))
    images, labels, weight = sampler.batch(3, 64)  # larger than the pairs: the whole pair, resized
    assert images.shape == (3, 2, 3, 64, 64) and labels.shape == (3, 2, 64, 64) and weight.all()
    images, labels, _ = sampler.batch(2, 32)
    assert images.shape == (2, 2, 3, 32, 32) and set(np.unique(labels)) <= {0.0, 1.0}
    assert sampler.counts["synth"] == 5
    with pytest.raises(InputError, match="no pre-rendered demo-town pairs"):
        TrainingSampler(fake_data.tiles, {"synth": 1.0}, rng, synth_pairs=[])


def test_plain_settings_mirror_train_settings() -> None:
    names = [f.name for f in dataclasses.fields(PlainTrainSettings)]
    assert names == list(TrainSettings.model_fields)
    pydantic_settings = TrainSettings(init_from=Path("models/x.pt"))
    plain = PlainTrainSettings.from_manifest(json.loads(settings_json(pydantic_settings)))
    assert json.loads(settings_json(plain)) == json.loads(settings_json(pydantic_settings))
    assert plain.init_from == Path("models/x.pt") and isinstance(plain.log_path, Path)
    with pytest.raises(InputError, match="lack"):
        PlainTrainSettings.from_manifest({"arch": "scarnet"})


def _gpu_args(bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["--bundle", str(bundle), "--out", str(out), "--device", "cpu", "--batch", "2", "--crop", "64"] + [
        "--chunk",
        "1",
        "--log-every",
        "1",
        "--val-minutes",
        "0",
        "--threads",
        "1",
        *extra,
    ]


def test_gpu_train_runs_on_the_cpu_from_a_bundle(
    png_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    tiny = json.dumps(TINY)
    assert main(_gpu_args(png_bundle, out, "--max-steps", "20", "--workers", "1", "--arch-kwargs", tiny)) == 0
    model = ChangeModel.load(out / "scarnet.pt")
    assert model.kwargs == TINY and model.meta["steps"] == 20 and model.meta["samples_seen"] == 40
    assert model.meta["finished"] and model.meta["device_name"] == cpu_name() and model.meta["train"]["batch_size"] == 2
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 21))
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["samples_seen"] == 40 and summary["finished"]
    assert set(summary["quick_val"]) == {"santa-rosa", "levir-dev", "whu-cd", "demo-town", "score"}
    assert set(summary["initial_quick_val"]) == set(summary["quick_val"])
    assert sum(summary["mix"].values()) >= 40  # every sample drawn counted (a worker may draw ahead)
    # and it fine-tunes from a checkpoint of the same architecture, in-process (no workers)
    again = tmp_path / "again"
    assert (
        main(_gpu_args(png_bundle, again, "--max-steps", "2", "--workers", "0", "--init", str(out / "scarnet.pt"))) == 0
    )
    second = ChangeModel.load(again / "scarnet.pt")
    assert second.kwargs == TINY and second.meta["init_from"] == str(out / "scarnet.pt")
    # with --arch-kwargs beside --init it grows the checkpoint wider, and starts out computing what it did
    wider = {"widths": [4, 4, 8, 16, 16]}
    grown = tmp_path / "grown"
    args = ["--max-steps", "2", "--workers", "0", "--init", str(out / "scarnet.pt")]
    assert main(_gpu_args(png_bundle, grown, *args, "--arch-kwargs", json.dumps(wider))) == 0
    assert ChangeModel.load(grown / "scarnet.pt").kwargs == wider
    start = json.loads((again / "summary.json").read_text())["initial_quick_val"]
    start_grown = json.loads((grown / "summary.json").read_text())["initial_quick_val"]
    assert start_grown == pytest.approx(start, abs=1e-3)
    # and refuses to shrink it, in one line
    narrower = json.dumps({"widths": [4, 4, 4, 4, 4]})
    capsys.readouterr()
    assert main(_gpu_args(png_bundle, tmp_path / "no", *args, "--arch-kwargs", narrower)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out / "scarnet.pt") in err[0] and "widths" in err[0], err


def test_gpu_train_needs_an_end(png_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_gpu_args(png_bundle, tmp_path, "--workers", "0")) == 2
    assert "give --minutes or --max-steps" in capsys.readouterr().err


def test_the_gpu_modules_import_without_rasterio_and_pydantic() -> None:
    code = (
        "import sys\n"
        "for name in ('rasterio', 'pydantic', 'geopandas', 'shapely'):\n"
        "    sys.modules[name] = None\n"
        "import pipeline.model.gpu_train, pipeline.model.bundle, pipeline.model.train\n"
        "import pipeline.fileio, pipeline.nets.checkpoint, pipeline.metrics\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_bundle_command(fake_shared: Path, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("train:\n  mix: {santa: 1.0, whu: 1.0, synth: 1.0}\n")
    args = ["--params", str(tmp_path / "params.yaml"), "--set", f"paths.shared={fake_shared}"]
    result = CliRunner().invoke(cli, [*args, "bundle", "--out", str(tmp_path / "b"), "--demo-pairs", "2"])
    assert result.exit_code == 0, result.output
    assert "training bundle: 6 Santa Rosa tiles, {'whu': 2} pairs, 2 demo pairs" in result.output
    manifest = read_manifest(tmp_path / "b")
    assert manifest["train"]["mix"] == {"santa": 1.0, "whu": 1.0, "synth": 1.0}
    assert manifest["source"] == str(fake_shared)
