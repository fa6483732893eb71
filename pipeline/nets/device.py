"""Where the networks run: the one device resolution and the one inference precision policy.

:func:`resolve_device` turns a ``device`` setting into a :class:`torch.device`; every stage that runs a
network (``detect``, checkpoint loading, and training) resolves through it, so the same setting means
the same device and fails with the same message everywhere.

Inference precision (:func:`autocast`, the ``detect.precision`` setting): on CUDA, autocast to bfloat16
where the GPU has native bf16 (compute capability 8.0 and later), else float16, whatever the setting
(bf16 is what ``train.amp: auto`` trains under there, so the calibrated thresholds were found at that
precision). On the CPU, ``fp32`` runs float32 without autocast (exact and reproducible); ``bf16``
autocasts to bfloat16; ``auto`` (the default) is ``bf16`` where the CPU has bf16 instructions
(:func:`cpu_has_native_bf16`: AVX512-BF16 or AMX), else ``fp32``, since a CPU without them emulates
bf16 at no gain. The calibrated F1 on every validation set at bf16 against fp32, and the masks'
agreement, are in the model card and BENCHMARKS.md. ``ChangeModel.predict`` (calibrate, evaluate, the
card) and ``detect`` (the monthly COG) both run under it, so the card measures what detect runs.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from pipeline.errors import DeviceError

Precision = Literal["auto", "fp32", "bf16"]
"""The CPU inference precisions ``detect.precision`` names (CUDA always autocasts; module docstring)."""

#: CPU flags (Linux ``/proc/cpuinfo``) of native bf16 arithmetic: AVX512-BF16 (AMD Zen 4, Intel Cooper
#: Lake on) and AMX-BF16 (Intel Sapphire Rapids on).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (:data:`NATIVE_BF16_FLAGS`); False where the flags can't be read.

    torch offers no public query of these flags (``torch.backends.cpu.get_cpu_capability`` says
    ``AVX512`` for a CPU with or without them), so they are read from the kernel's CPU description.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(NATIVE_BF16_FLAGS & set(line.partition(":")[2].split()))
    return False


@functools.cache
def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and whether it has native bf16, for logs: ``"AMD EPYC (no native bf16)"``.

    ``platform.processor()`` is empty on Linux, so the name is read from the kernel's CPU description
    (the machine type where it can't be read).
    """
    name = platform.machine()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip() or name
                break
    except OSError:
        pass
    return f"{name} ({'native' if cpu_has_native_bf16(cpuinfo) else 'no native'} bf16)"


def cpu_precision(precision: Precision) -> Literal["fp32", "bf16"]:
    """What a ``detect.precision`` setting runs at on this CPU (``auto`` resolved; module docstring)."""
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


def precision_label(device: torch.device, precision: Precision) -> str:
    """What the network runs at on ``device``: ``fp32`` or ``bf16`` on the CPU, ``autocast`` on CUDA."""
    return cpu_precision(precision) if device.type == "cpu" else "autocast"


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device a ``device`` setting names.

    Args:
        name: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
            :class:`torch.device` of those types.

    Returns:
        The device.

    Raises:
        DeviceError: an unknown name, or CUDA asked for (``cuda``, ``cuda:N``) where torch sees no such device.
    """
    label = str(name)
    device: torch.device | None
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError, ValueError):
            device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceError(
            f"device {label!r} is unknown, not a torch device ScarWatch runs on; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
        which = "" if device.index is None else f" {device.index}"
        raise DeviceError(
            f"device {label!r} asked for but CUDA is not available (torch sees no CUDA device{which}); "
            "set detect.device or train.device to 'auto' or 'cpu' in params.yaml (or pass --device cpu)"
        )
    return device


def inference_dtype(device: torch.device, precision: Precision = "fp32") -> torch.dtype | None:
    """The autocast dtype inference runs at on ``device`` (None: float32, no autocast); see the module docstring."""
    if device.type != "cuda":
        return torch.bfloat16 if cpu_precision(precision) == "bf16" else None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision = "fp32") -> Iterator[None]:
    """Run the network under the inference precision policy for ``device`` (module docstring)."""
    dtype = inference_dtype(device, precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


CompileSetting = bool | Literal["auto"]
"""``detect.compile``: always, never, or ``auto`` (:func:`resolve_compile`)."""


def inductor_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would call, where it is on the PATH, else None."""
    import shutil

    from torch._inductor import config as inductor_config

    names = [c for c in inductor_config.cpp.cxx if c]
    return next((found for c in names if (found := shutil.which(c))), None)


def resolve_compile(setting: CompileSetting, device: torch.device, n_tiles: int, min_tiles: int) -> tuple[bool, str]:
    """Whether to ``torch.compile`` the network for a run of ``n_tiles`` tiles on ``device``, and why.

    ``True``/``False`` are taken as they are. ``auto`` compiles on the CPU when the run has at least
    ``min_tiles`` tiles (``detect.compile_min_tiles``: compiling costs a fixed 10-75 s, with and without
    inductor's on-disk cache, against a few hundredths of a second saved per tile, BENCHMARKS.md) and a
    C++ compiler is there; on CUDA it stays eager (not measured on a GPU yet).
    """
    if isinstance(setting, bool):
        return setting, f"detect.compile is {str(setting).lower()}"
    if setting != "auto":
        raise DeviceError(f"detect.compile {setting!r}: use true, false or auto")
    if device.type != "cpu":
        return False, f"detect.compile auto stays eager on {device.type}"
    if n_tiles < min_tiles:
        return False, f"{n_tiles} tiles, fewer than detect.compile_min_tiles {min_tiles}"
    if inductor_compiler() is None:
        return False, "no C++ compiler for torch.compile on the PATH (install g++)"
    return True, f"{n_tiles} tiles, at least detect.compile_min_tiles {min_tiles}"
