"""Shape contracts, determinism, checkpoints and errors of the change networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, DeviceError, ModelError
from pipeline.nets import MODELS, create_model
from pipeline.nets.checkpoint import ChangeModel, save_checkpoint
from pipeline.nets.cva import FALLBACK_THRESHOLD, apply_cva, cva_probabilities, fit_cva
from pipeline.nets.device import autocast, inference_dtype, resolve_device

torch.set_num_threads(1)

SMALL = {"scarnet": {"widths": (4, 8, 8, 16, 16)}, "fc_siam_diff": {}}


class BaseNetTest:
    """Every architecture runs the same contract; subclasses set ``arch``."""

    arch: str

    def build(self, in_channels: int = 3) -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model(self.arch, in_channels=in_channels, **SMALL[self.arch]).eval()

    @pytest.mark.parametrize("batch", [1, 2])
    @pytest.mark.parametrize("channels", [3, 4])
    def test_shape_contract(self, batch: int, channels: int) -> None:
        net = self.build(channels)
        with torch.no_grad():
            out = net(torch.rand(batch, 2, channels, 32, 48))
        assert out.shape == (batch, 2, 32, 48)
        assert out.dtype == torch.float32

    def test_rejects_bad_sizes_and_bands(self) -> None:
        net = self.build(3)
        with pytest.raises(ValueError, match="multiples of 16"):
            net(torch.rand(1, 2, 3, 24, 32))
        with pytest.raises(ModelError, match="expects 3"):
            net(torch.rand(1, 2, 4, 32, 32))
        with pytest.raises(ValueError, match=r"\(b, 2, c, h, w\)"):
            net(torch.rand(1, 3, 32, 32))

    def test_deterministic_inference(self) -> None:
        net = self.build()
        x = torch.rand(2, 2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(net(x), net(x))

    def test_checkpoint_round_trip(self, tmp_path: Path) -> None:
        net = self.build(4)
        path = save_checkpoint(tmp_path / "m.pt", net, self.arch, 4, SMALL[self.arch], {"threshold": 0.35})
        model = ChangeModel.load(path)
        assert (model.arch, model.in_channels, model.threshold) == (self.arch, 4, 0.35)
        x = np.random.default_rng(0).random((1, 2, 4, 32, 32), dtype=np.float32)
        with torch.no_grad():
            expected = torch.sigmoid(net(torch.from_numpy(x))).numpy()
        got = model.predict(x)
        assert got.dtype == np.float32 and got.shape == (1, 2, 32, 32)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_array_equal(model.predict(torch.from_numpy(x)), got)
        np.testing.assert_allclose(model.predict(x[0]), got, atol=1e-6)  # a single pair is accepted
        with pytest.raises(ModelError, match="expects 4"):
            model.predict(x[:, :, :3])


class TestScarNet(BaseNetTest):
    arch = "scarnet"

    def test_removed_is_new_on_swapped_inputs(self) -> None:
        net = self.build()
        x = torch.rand(1, 2, 3, 32, 32)
        with torch.no_grad():
            out, swapped = net(x), net(x.flip(1))
        torch.testing.assert_close(out[:, 1], swapped[:, 0])

    def test_a_grown_network_computes_what_the_smaller_one_did_and_then_learns(self) -> None:
        small = self.build()
        for m in small.modules():  # trained-looking BatchNorm, so the test sees the statistics move over
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
        torch.manual_seed(1)
        big = create_model("scarnet", widths=(6, 8, 12, 24, 32)).eval()
        big.grow_from(small)
        x = torch.rand(2, 2, 3, 32, 48)
        with torch.no_grad():
            torch.testing.assert_close(big(x), small(x), atol=1e-5, rtol=1e-5)
        assert sum(p.numel() for p in big.parameters()) > 2 * sum(p.numel() for p in small.parameters())
        # the new channels are live: one step moves the zero weights the old channels read from them
        big.train()
        big(x).sum().backward()
        grad = big.fuse[4].proj[0].weight.grad
        assert grad is not None and grad[:16, 16:32].abs().sum() > 0  # old outputs <- new channels of a
        with pytest.raises(ValueError, match="at least the old one"):
            self.build().grow_from(big)


class TestFCSiamDiff(BaseNetTest):
    arch = "fc_siam_diff"


def test_registry_lists_architectures() -> None:
    assert {"scarnet", "fc_siam_diff"} <= set(MODELS)
    with pytest.raises(ModelError, match=r"unknown architecture 'unet'; valid names: \['fc_siam_diff', 'scarnet'\]"):
        create_model("unet")
    with pytest.raises(ModelError, match="in_channels 5"):
        create_model("scarnet", in_channels=5)
    with pytest.raises(ModelError, match="does not take options"):
        create_model("fc_siam_diff", depth=3)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    net = create_model("scarnet", **SMALL["scarnet"])
    return save_checkpoint(tmp_path / "ok.pt", net, "scarnet", 3, SMALL["scarnet"])


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.pt: checkpoint not found; train one"):
        ChangeModel.load(tmp_path / "nope.pt")


def test_load_corrupt_file(tmp_path: Path, saved: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(saved.read_bytes()[:200])
    with pytest.raises(ModelError, match=r"bad\.pt: checkpoint is corrupt"):
        ChangeModel.load(bad)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ModelError, match="corrupt"):
        ChangeModel.load(text)


def test_load_not_a_scarwatch_checkpoint(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ModelError, match="not a ScarWatch checkpoint"):
        ChangeModel.load(other)


def test_load_unknown_architecture(tmp_path: Path, saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    payload["arch"] = "transformer9000"
    path = tmp_path / "arch.pt"
    torch.save(payload, path)
    with pytest.raises(ModelError, match=r"arch\.pt: unknown architecture 'transformer9000'"):
        ChangeModel.load(path)


def test_load_state_dict_mismatch(tmp_path: Path, saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    payload["kwargs"] = {"widths": (8, 8, 8, 16, 16)}
    path = tmp_path / "mismatch.pt"
    torch.save(payload, path)
    with pytest.raises(ModelError, match=r"mismatch\.pt: weights do not fit architecture 'scarnet'"):
        ChangeModel.load(path)


def test_load_device_choice(saved: Path) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ChangeModel.load(saved, device="auto").device.type == expected
    with pytest.raises(ModelError, match="not a torch device"):
        ChangeModel.load(saved, device="tpu9")


def test_load_cuda_without_cuda(saved: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelError, match="CUDA is not available"):
        ChangeModel.load(saved, device="cuda")


def test_one_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert issubclass(DeviceError, ConfigError) and issubclass(DeviceError, ModelError)
    for name in ("tpu9", "mps", "meta", ""):
        with pytest.raises(DeviceError, match="unknown, not a torch device"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1", torch.device("cuda:0")):
        with pytest.raises(DeviceError, match="CUDA is not available.*no CUDA device.*--device cpu"):
            resolve_device(name)


def test_cpu_inference_is_float32() -> None:
    cpu = torch.device("cpu")
    assert inference_dtype(cpu) is None
    with autocast(cpu):
        y = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert y.dtype == torch.float32


def test_save_rejects_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown architecture"):
        save_checkpoint(tmp_path / "x.pt", torch.nn.Linear(1, 1), "linear", 3)


def test_cva_direction_and_threshold() -> None:
    rng = np.random.default_rng(0)
    prev = np.full((3, 64, 64), 0.3, np.float32) + rng.normal(0, 0.01, (3, 64, 64)).astype(np.float32)
    curr = prev.copy()
    curr[:, 10:20, 10:20] = 0.65  # a bright roof appears
    curr[:, 40:50, 40:50] = 0.0  # something dark: read as removed
    p = cva_probabilities(np.stack([prev, curr]), sigma=0)
    assert p.shape == (2, 64, 64) and p.dtype == np.float32
    assert p[0, 12:18, 12:18].min() > 0.9 and p[1, 12:18, 12:18].max() == 0
    assert p[1, 42:48, 42:48].min() > 0.9 and p[0, 42:48, 42:48].max() == 0
    assert p[:, 30, 5].max() < 0.5
    valid = np.ones((64, 64), bool)
    valid[:, :32] = False
    assert cva_probabilities(np.stack([prev, curr]), valid)[:, :, :32].max() == 0
    assert cva_probabilities((np.stack([prev, curr]) * 255).astype(np.uint8)).shape == (2, 64, 64)
    with pytest.raises(ValueError, match=r"\(2, c, h, w\)"):
        cva_probabilities(prev)


def _noisy_pair(rng: np.random.Generator, change: bool) -> np.ndarray:
    prev = np.full((3, 64, 64), 0.3, np.float32) + rng.normal(0, 0.02, (3, 64, 64)).astype(np.float32)
    curr = prev + rng.normal(0, 0.02, (3, 64, 64)).astype(np.float32)  # the same ground, another day
    if change:
        curr[:, 10:30, 10:30] = 0.8  # a new roof
    return np.stack([prev, curr])


def test_cva_is_one_recipe_with_statistics_fitted_once() -> None:
    rng = np.random.default_rng(1)
    changed, quiet = _noisy_pair(rng, True), _noisy_pair(rng, False)
    valid = np.ones((64, 64), bool)
    valid[:, :8] = False
    # a single pair is the same maths with the statistics fitted on that pair
    own = fit_cva([(changed, valid)])
    np.testing.assert_array_equal(cva_probabilities(changed, valid), apply_cva(changed, own, valid=valid))
    # statistics fitted on the whole month (both tiles) apply to a batch as to each pair alone
    month = fit_cva([(changed, None), (quiet, None)])
    batch = apply_cva(np.stack([changed, quiet]), month)
    np.testing.assert_allclose(batch[1], apply_cva(quiet, month), atol=1e-6)
    assert batch[0, 0, 12:28, 12:28].min() > 0.9
    # per tile, Otsu always splits: a tile without change gets spurious change; the month's threshold does not
    assert (cva_probabilities(quiet).max(axis=0) >= 0.5).mean() > 0.2
    assert (batch[1].max(axis=0) >= 0.5).mean() < 0.01


def test_cva_without_any_change_or_data() -> None:
    x = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    assert cva_probabilities(np.stack([x, x])).max() < 1e-3  # a constant magnitude is no change, not all change
    stats = fit_cva([(np.stack([x, x]), np.zeros((32, 32), bool))])
    assert stats.n_pixels == 0 and stats.threshold == FALLBACK_THRESHOLD and stats.std.shape == (3,)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from pipeline.nets.device import cpu_has_native_bf16

    def cpuinfo(flags: str) -> Path:
        path = tmp_path / f"cpuinfo_{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return path

    assert cpu_has_native_bf16(cpuinfo("fpu sse avx512f avx512_bf16 avx512vl"))  # AMD Zen 4, Cooper Lake
    assert cpu_has_native_bf16(cpuinfo("fpu avx512f amx_bf16 amx_tile"))  # Sapphire Rapids
    assert not cpu_has_native_bf16(cpuinfo("fpu sse avx2 avx512f avx512bw avx512_vnni"))  # emulated bf16 only
    assert not cpu_has_native_bf16(tmp_path / "absent")  # no /proc (another OS): fp32


def test_cpu_name_says_the_model_and_its_bf16(tmp_path: Path) -> None:
    from pipeline.nets.device import cpu_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2\n")
    assert cpu_name(info) == "AMD EPYC (no native bf16)"
    info2 = tmp_path / "cpuinfo2"
    info2.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx512f amx_bf16\n")
    assert cpu_name(info2) == "Intel(R) Xeon(R) Processor (native bf16)"
    assert cpu_name(tmp_path / "absent").endswith("(no native bf16)")  # the machine type stands in for the name


def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.nets import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.cpu_precision("auto") == "bf16" and device.inference_dtype(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.cpu_precision("auto") == "fp32" and device.inference_dtype(cpu, "auto") is None
    assert device.cpu_precision("bf16") == "bf16" and device.cpu_precision("fp32") == "fp32"  # explicit wins


def test_training_autocasts_to_bf16_only_where_the_cpu_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.model import train

    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.autocast_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)  # AVX2 only: bf16 would be emulated, 8x slower
    assert train.autocast_dtype("auto", cpu) is None
    assert train.autocast_dtype("bf16", cpu) is torch.bfloat16  # asked for, it is what it gets
    assert train.autocast_dtype("off", cpu) is None
    with pytest.raises(ModelError, match="fp16"):
        train.autocast_dtype("fp16", cpu)


def test_predict_runs_at_the_models_precision(saved: Path) -> None:
    x = np.random.default_rng(3).random((1, 2, 3, 32, 32), dtype=np.float32)
    fp32 = ChangeModel.load(saved, precision="fp32")
    bf16 = ChangeModel.load(saved, precision="bf16")
    p32, p16 = fp32.predict(x), bf16.predict(x)
    assert np.array_equal(p32, fp32.predict(x))  # fp32 is exact and repeatable
    assert not np.array_equal(p32, p16)  # bf16 really ran (autocast), not fp32 under another name
    assert np.abs(p32 - p16).max() < 0.05 and p16.dtype == np.float32
