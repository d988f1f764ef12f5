"""Which device and dtype a model runs on: ``auto`` resolved once, for loading and for profiles."""

from __future__ import annotations

import functools
import platform

import torch

from .errors import SpecdecError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA (also ROCm), then MPS, then the CPU; any other name must be a device this
    torch can use (else a :class:`SpecdecError` saying which ones it can)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SpecdecError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    usable = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    if not usable.get(dev.type, True):
        raise SpecdecError(
            f"device {device!r}: this torch ({torch.__version__}) sees no {dev.type.upper()} device",
            "use --device auto or cpu, or install the torch build for your GPU",
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpecdecError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0",
            "use --device cuda (the first) or cuda:N with N below the count",
        )
    return dev


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
# x86 instructions that compute each 16-bit float natively: (torch.cpu check, /proc/cpuinfo flag)
_NATIVE_16BIT: dict[torch.dtype, tuple[tuple[str, str], ...]] = {
    torch.bfloat16: (("_is_avx512_bf16_supported", "avx512_bf16"), ("_is_amx_tile_supported", "amx_bf16")),
    torch.float16: (("_is_amx_fp16_supported", "amx_fp16"),),
}


@functools.cache
def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for ``dtype``'s matmuls (float32: always).

    On x86, bfloat16 needs avx512_bf16 or AMX (float16 is counted native only with AMX-FP16); without them torch
    converts every row to float32 and back, so a forward's cost grows with its rows almost like
    that many one-row forwards and prefill is several times slower than in float32 (measured:
    docs/design.md, "Cost of a forward by row count"). Asked of torch, else of ``/proc/cpuinfo``;
    other architectures (ARM, ...) are assumed to have them (not measured by this project).
    """
    if dtype == torch.float32 or platform.machine().lower() not in _X86:
        return True
    return any(_cpu_has(check, flag) for check, flag in _NATIVE_16BIT.get(dtype, ()))


def _cpu_has(check_name: str, flag: str) -> bool:
    """torch's check ``torch.cpu.<check_name>()``; where this torch lacks it (or it fails), the flag."""
    check = getattr(torch.cpu, check_name, None)
    if check is not None:
        try:
            return bool(check())
        except Exception:
            pass
    return flag in _cpuinfo_flags()


def _cpuinfo_flags() -> frozenset[str]:
    """The first CPU's flags in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto``: on a CPU, bfloat16 where it computes bfloat16 natively (about 2x float32's speed,
    :func:`cpu_computes_natively`), else float32; on GPUs bfloat16 where supported, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return DTYPES[dtype]
        except KeyError:
            raise SpecdecError(f"unknown dtype {dtype!r}", f"choose one of: auto, {', '.join(DTYPES)}") from None
    device = device or resolve_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_computes_natively(torch.bfloat16) else torch.float32
