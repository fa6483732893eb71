"""Weight averaging (scarwatch average): the mean of the weights, BatchNorm recomputed, uncalibrated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ModelError
from pipeline.model.average import average_checkpoints, average_weights, recompute_batchnorm
from pipeline.nets import create_model
from pipeline.nets.checkpoint import ChangeModel, save_checkpoint

KW = {"widths": (4, 4, 8, 8, 8)}


def _saved(tmp_path: Path, name: str, seed: int, steps: int) -> Path:
    torch.manual_seed(seed)
    net = create_model("scarnet", **KW)
    meta = {"steps": steps, "threshold": 0.3, "object_threshold": 0.4, "calibration": {"0.3": 0.5}, "train": {"lr": 1}}
    return save_checkpoint(tmp_path / name, net, "scarnet", 3, KW, meta)


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 2, 3, 32, 32, generator=g) * 0.5 + 0.25 for _ in range(n)]


def test_weights_are_the_mean_and_counts_the_largest(tmp_path: Path) -> None:
    models = [ChangeModel.load(_saved(tmp_path, f"m{i}.pt", seed=i, steps=1000 * (i + 1))) for i in range(3)]
    avg = average_weights(models)
    states = [m.module.state_dict() for m in models]
    conv = next(k for k, v in avg.items() if v.ndim == 4)
    expected = (states[0][conv] + states[1][conv] + states[2][conv]) / 3
    assert torch.allclose(avg[conv], expected, atol=1e-7) and not torch.equal(avg[conv], states[0][conv])
    tracked = next(k for k in avg if k.endswith("num_batches_tracked"))
    assert avg[tracked].dtype == states[0][tracked].dtype


def test_batchnorm_statistics_are_recomputed_from_the_batches(tmp_path: Path) -> None:
    net = create_model("scarnet", **KW)
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.fill_(5.0)  # stale statistics that must not survive
    assert recompute_batchnorm(net, _batches(4)) == 4
    assert not net.training and bn.running_mean.abs().max() < 5.0
    again = create_model("scarnet", **KW)
    again.load_state_dict({k: v for k, v in net.state_dict().items() if "running" not in k}, strict=False)
    recompute_batchnorm(again, _batches(4))
    assert torch.allclose(
        next(m for m in again.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean, bn.running_mean
    )  # the same batches give the same statistics


def test_average_checkpoints_writes_an_uncalibrated_network(tmp_path: Path) -> None:
    paths = [_saved(tmp_path, f"m{i}.pt", seed=i, steps=1000 * (i + 1)) for i in range(2)]
    result = average_checkpoints(paths, tmp_path / "avg.pt", _batches(3))
    avg = ChangeModel.load(tmp_path / "avg.pt")
    assert result["averaged_steps"] == [1000, 2000] and result["bn_batches"] == 3
    assert avg.meta["averaged_from"] == [str(p) for p in paths] and avg.meta["steps"] == 2000
    assert avg.threshold == 0.5 and avg.object_threshold is None and "calibration" not in avg.meta
    assert avg.meta["train"] == {"lr": 1}  # what the run trained with travels on
    x = np.random.default_rng(1).random((1, 2, 3, 32, 32), dtype=np.float32)
    p = avg.predict(x)
    assert p.shape == (1, 2, 32, 32) and np.isfinite(p).all()


def test_average_refuses_one_checkpoint_or_mixed_runs(tmp_path: Path) -> None:
    one = _saved(tmp_path, "a.pt", seed=0, steps=1)
    with pytest.raises(ModelError, match="at least two"):
        average_checkpoints([one], tmp_path / "x.pt", _batches(1))
    other = save_checkpoint(
        tmp_path / "b.pt", create_model("scarnet", widths=(4, 8, 8, 8, 8)), "scarnet", 3, {"widths": (4, 8, 8, 8, 8)}
    )
    with pytest.raises(ModelError, match="cannot average .* one run"):
        average_checkpoints([one, other], tmp_path / "x.pt", _batches(1))
    assert not (tmp_path / "x.pt").exists()


def test_average_command_draws_batches_from_the_runs_mix(fake_shared: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    paths = []
    for i in range(2):
        torch.manual_seed(i)
        meta = {"steps": i + 1, "train": {"mix": {"santa": 0.5, "nochange": 0.5}, "crop": 32, "batch_size": 2}}
        paths.append(save_checkpoint(tmp_path / f"c{i}.pt", create_model("scarnet", **KW), "scarnet", 3, KW, meta))
    shared = ["--set", f"paths.shared={fake_shared}"]
    out = tmp_path / "avg.pt"
    res = CliRunner().invoke(cli, [*shared, "average", *map(str, paths), "--out", str(out), "--bn-batches", "2"])
    assert res.exit_code == 0, res.output
    assert ChangeModel.load(out).meta["bn_batches"] == 2 and "calibrate it next" in res.output
    bad = CliRunner().invoke(cli, [*shared, "average", str(paths[0]), "--out", str(out)])
    assert bad.exit_code == 2 and "at least two" in bad.output


def test_batchnorm_batches_draw_the_runs_footprint_sets(fake_shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.model.train as train_module
    from pipeline.config import load_settings
    from pipeline.model.average import training_batches

    read, drawn = [], []
    real_reader, real_pool = train_module.load_footprint_images, train_module.TrainingSampler._pool

    def reader(root: Path) -> list:
        read.append(root)
        return real_reader(root)

    def pool(self: object, buildings: bool) -> list:
        out = real_pool(self, buildings)
        drawn.append(out[0].id)
        return out

    monkeypatch.setattr(train_module, "load_footprint_images", reader)
    monkeypatch.setattr(train_module.TrainingSampler, "_pool", pool)
    settings = load_settings(Path(__file__).resolve().parents[1] / "params.yaml", {"paths.shared": str(fake_shared)})
    meta = {"mix": {"nochange": 1.0}, "footprints": {"xbd-joplin": 0.999}, "crop": 32, "batch_size": 2}
    (batch,) = training_batches(settings, meta, 1, seed=0)
    assert batch.shape == (2, 2, 3, 32, 32)
    assert read == [fake_shared / "xbd-joplin"] and drawn == ["joplin-tornado_00000000"] * 2
