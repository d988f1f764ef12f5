"""What accelerator (or how much RAM) this machine has, found without ever failing.

:func:`detect` runs an ordered chain of probes and returns the first
:class:`DeviceInfo` one of them produces:

1. NVML (package ``nvidia-ml-py``, extra ``nvidia``): exact free/total per GPU,
   even when torch is a CPU build.
2. ``torch.cuda.mem_get_info``: CUDA and ROCm builds of torch.
3. Apple MPS: unified memory, sized by ``torch.mps.recommended_max_memory``.
4. ``nvidia-smi`` (with a timeout): a driver without NVML bindings.
5. CPU RAM (``/proc/meminfo``, else ``sysconf``).

Every probe fails softly: an exception, a missing package or a missing
device just moves on to the next probe, and the reason is kept in
:attr:`DeviceInfo.notes`. Profile selection is a pure function of a
``DeviceInfo`` (see :mod:`specdec.profiles`), so tests build fake ones.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Backend = Literal["cuda", "rocm", "mps", "cpu"]
BACKENDS: tuple[str, ...] = ("cuda", "rocm", "mps", "cpu")

NVIDIA_SMI_TIMEOUT_S = 5.0

GIB = 1 << 30
MIB = 1 << 20

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}


@dataclass(frozen=True)
class DeviceInfo:
    """One device that models can be placed on.

    Attributes:
        backend: ``cuda``, ``rocm``, ``mps`` or ``cpu``.
        name: e.g. ``"NVIDIA GeForce RTX 3060"`` or ``"CPU"``.
        total_bytes: memory of the device (for ``cpu`` and ``mps``: RAM).
        free_bytes: memory available now (the target may already be loaded);
            0 when unknown.
        compute_capability: ``(major, minor)`` for NVIDIA GPUs, else None.
        source: which probe produced this (``nvml``, ``torch.cuda``,
            ``mps``, ``nvidia-smi``, ``cpu``, ``assumed``, ``none``).
        notes: why earlier probes gave nothing, in probe order.
        cpu_bf16: for ``cpu``, whether the CPU computes bfloat16 natively
            (:func:`specdec.devices.cpu_computes_natively`); the CPU probe asks.
    """

    backend: Backend
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] | None = None
    source: str = "assumed"
    notes: tuple[str, ...] = field(default=(), compare=False)
    cpu_bf16: bool = True

    @property
    def available_bytes(self) -> int:
        """What a configuration may use: free memory when known, else the total."""
        return self.free_bytes if self.free_bytes > 0 else self.total_bytes

    @property
    def supports_bf16(self) -> bool:
        """bfloat16 runs natively: Apple, ROCm, NVIDIA from Ampere (8.0) on, CPUs with bfloat16 instructions."""
        if self.backend == "cuda":
            return self.compute_capability is None or self.compute_capability >= (8, 0)
        if self.backend == "cpu":
            return self.cpu_bf16
        return True

    def to_dict(self) -> dict[str, Any]:
        """The ``device`` object of ``specdec-local detect --json``."""
        return {
            "backend": self.backend,
            "name": self.name,
            "total_bytes": int(self.total_bytes),
            "free_bytes": int(self.free_bytes),
        }


Probe = Callable[[], "DeviceInfo | None"]


# ---------------------------------------------------------------------- probes
def probe_nvml(index: int = 0) -> DeviceInfo | None:
    """NVIDIA GPU ``index`` through NVML; None without the package or a GPU."""
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        try:
            capability = tuple(int(x) for x in pynvml.nvmlDeviceGetCudaComputeCapability(handle))[:2]
        except Exception:  # older drivers
            capability = None
        return DeviceInfo("cuda", str(name), int(mem.total), int(mem.free), capability, source="nvml")  # type: ignore[arg-type]
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def probe_torch_cuda(index: int = 0) -> DeviceInfo | None:
    """A CUDA or ROCm device through torch; raises (AssertionError...) without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(index)
    backend: Backend = "rocm" if getattr(torch.version, "hip", None) else "cuda"
    capability = None
    if backend == "cuda":
        capability = tuple(int(x) for x in torch.cuda.get_device_capability(index))[:2]
    return DeviceInfo(
        backend,
        torch.cuda.get_device_name(index),
        int(total),
        int(free),
        capability,  # type: ignore[arg-type]
        source="torch.cuda",
    )


def probe_mps() -> DeviceInfo | None:
    """Apple silicon: unified memory, of which Metal recommends a share for the GPU."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return None
    ram_total, _ = ram()
    limit = int(torch.mps.recommended_max_memory())
    used = int(torch.mps.current_allocated_memory())
    total = limit or ram_total
    return DeviceInfo("mps", "Apple GPU (unified memory)", total, max(total - used, 0), None, source="mps")


def probe_nvidia_smi(index: int = 0, timeout: float = NVIDIA_SMI_TIMEOUT_S) -> DeviceInfo | None:
    """``nvidia-smi --query-gpu``, for drivers without NVML bindings in Python."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    for fields in ("name,memory.total,memory.free,compute_cap", "name,memory.total,memory.free"):
        proc = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode == 0:
            break
    else:
        raise RuntimeError(f"nvidia-smi exited with {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if len(lines) <= index:
        return None
    parts = [p.strip() for p in lines[index].split(",")]
    capability = None
    if len(parts) > 3 and re.fullmatch(r"\d+\.\d+", parts[3]):
        major, minor = parts[3].split(".")
        capability = (int(major), int(minor))
    return DeviceInfo(
        "cuda", parts[0], int(float(parts[1])) * MIB, int(float(parts[2])) * MIB, capability, source="nvidia-smi"
    )


def probe_cpu() -> DeviceInfo | None:
    """System RAM: total and available."""
    total, available = ram()
    if total <= 0:
        return None
    return DeviceInfo("cpu", "CPU", total, available, None, source="cpu", cpu_bf16=_cpu_bf16())


def _cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively; True where that cannot be asked (torch missing)."""
    try:
        import torch

        from .devices import cpu_computes_natively
    except ImportError:
        return True
    return cpu_computes_natively(torch.bfloat16)


def ram() -> tuple[int, int]:
    """``(total, available)`` bytes of RAM; ``(0, 0)`` when unknown."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)}
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        try:
            available = page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            available = 0
        return int(total), int(available)
    except (ValueError, OSError, AttributeError):
        return 0, 0


DEFAULT_PROBES: tuple[tuple[str, Probe], ...] = (
    ("nvml", probe_nvml),
    ("torch.cuda", probe_torch_cuda),
    ("mps", probe_mps),
    ("nvidia-smi", probe_nvidia_smi),
    ("cpu", probe_cpu),
)

UNKNOWN_DEVICE = DeviceInfo("cpu", "unknown", 0, 0, None, source="none")


def detect(probes: Sequence[tuple[str, Probe]] = DEFAULT_PROBES) -> DeviceInfo:
    """The first device a probe finds; a CPU of unknown size if every probe fails.

    Never raises: each probe's exception (``AssertionError`` from a CPU build of
    torch, ``subprocess.TimeoutExpired``, an NVML error...) is caught and noted.
    """
    notes: list[str] = []
    for name, probe in probes:
        try:
            info = probe()
        except Exception as e:  # noqa: BLE001 - a probe must never take the caller down
            notes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'failed'}")
            continue
        if info is None:
            notes.append(f"{name}: nothing found")
            continue
        return replace(info, notes=tuple(notes))
    return replace(UNKNOWN_DEVICE, notes=tuple(notes))


def detect_for(device: str = "auto") -> DeviceInfo:
    """:func:`detect` restricted to what a torch device string names (``auto``, ``cpu``, ``cuda:1``, ``mps``)."""
    kind, _, index = device.partition(":")
    i = int(index) if index.isdigit() else 0
    if kind == "cpu":
        return detect((("cpu", probe_cpu),))
    if kind == "mps":
        return detect((("mps", probe_mps), ("cpu", probe_cpu)))
    if kind == "cuda":
        return detect(
            (
                ("nvml", lambda: probe_nvml(i)),
                ("torch.cuda", lambda: probe_torch_cuda(i)),
                ("nvidia-smi", lambda: probe_nvidia_smi(i)),
                ("cpu", probe_cpu),
            )
        )
    return detect()


def assumed_gpu(
    total_bytes: int,
    free_bytes: int | None = None,
    backend: Backend = "cuda",
    name: str | None = None,
    compute_capability: tuple[int, int] | None = None,
) -> DeviceInfo:
    """A hypothetical device, for ``detect --vram 8GiB`` and for tests."""
    label = name or f"assumed {format_bytes(total_bytes)} {'GPU' if backend in ('cuda', 'rocm') else backend}"
    return DeviceInfo(
        backend,
        label,
        int(total_bytes),
        int(total_bytes if free_bytes is None else free_bytes),
        compute_capability,
        source="assumed",
    )


# ---------------------------------------------------------------------- sizes
def parse_size(text: str | int) -> int:
    """Bytes in ``"8GiB"``, ``"8 GB"``, ``"512MiB"``, ``"1.5G"`` or ``4096``.

    ``GiB``/``MiB`` are powers of two, ``GB``/``MB``/``G``/``M`` powers of ten.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 8GiB, 8GB, 512MiB, 4096)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: int | float) -> str:
    """``8589934592`` -> ``"8.0 GiB"``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
