"""Device probes: each one on fakes, every one failing, sizes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import types

import pytest

from specdec import hardware
from specdec.hardware import BACKENDS, GIB, MIB, DeviceInfo, detect, parse_size


def _raise(exc: BaseException):
    def probe(*args, **kwargs):
        raise exc

    return probe


def test_every_probe_failing_gives_an_unknown_cpu_and_the_reasons():
    probes = (
        ("nvml", _raise(RuntimeError("NVML Shared Library Not Found"))),
        ("torch.cuda", _raise(AssertionError("Torch not compiled with CUDA enabled"))),
        ("mps", lambda: None),
        ("nvidia-smi", _raise(subprocess.TimeoutExpired("nvidia-smi", 5))),
        ("cpu", _raise(OSError("no /proc"))),
    )
    info = detect(probes)
    assert info.backend == "cpu" and info.source == "none"
    assert info.total_bytes == 0 and info.available_bytes == 0
    assert [n.split(":")[0] for n in info.notes] == ["nvml", "torch.cuda", "mps", "nvidia-smi", "cpu"]
    assert "AssertionError" in info.notes[1] and "TimeoutExpired" in info.notes[3]


def test_the_first_probe_that_finds_something_wins():
    gpu = DeviceInfo("cuda", "fake", 8 * GIB, 6 * GIB, (8, 6), source="fake")
    info = detect((("a", _raise(ValueError("x"))), ("b", lambda: gpu), ("c", _raise(AssertionError()))))
    assert info == gpu and info.notes == ("a: ValueError: x",)


def test_default_chain_on_this_machine_never_raises():
    info = detect()
    assert info.backend in BACKENDS
    assert info.total_bytes >= 0 and info.free_bytes >= 0


def test_default_chain_with_every_backend_failing(monkeypatch):
    import torch

    broken = types.ModuleType("pynvml")
    broken.nvmlInit = _raise(RuntimeError("driver not loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", _raise(AssertionError("Torch not compiled with CUDA enabled")))
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    monkeypatch.setattr(hardware, "ram", lambda: (0, 0))
    info = detect()
    assert info.source == "none" and info.backend == "cpu"
    assert any("driver not loaded" in n for n in info.notes)
    assert any("AssertionError" in n for n in info.notes)


def test_nvml_probe_reads_memory_name_and_capability(monkeypatch):
    fake = types.ModuleType("pynvml")
    calls = []
    fake.nvmlInit = lambda: calls.append("init")
    fake.nvmlShutdown = lambda: calls.append("shutdown")
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: "h"
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=12 * GIB, free=10 * GIB, used=2 * GIB)
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA GeForce RTX 3060"
    fake.nvmlDeviceGetCudaComputeCapability = lambda h: (8, 6)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = hardware.probe_nvml()
    assert info == DeviceInfo("cuda", "NVIDIA GeForce RTX 3060", 12 * GIB, 10 * GIB, (8, 6), source="nvml")
    assert calls == ["init", "shutdown"]


def test_torch_cuda_probe_reports_rocm(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (3 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "AMD Radeon RX 7800 XT")
    monkeypatch.setattr(torch.version, "hip", "6.1", raising=False)
    info = hardware.probe_torch_cuda()
    assert (info.backend, info.total_bytes, info.free_bytes, info.compute_capability) == (
        "rocm",
        16 * GIB,
        3 * GIB,
        None,
    )


def _fake_smi(tmp_path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.skipif(os.name != "posix", reason="fake nvidia-smi is a shell script")
def test_nvidia_smi_probe_parses_csv(tmp_path, monkeypatch):
    exe = _fake_smi(tmp_path, 'echo "NVIDIA GeForce GTX 1650, 4096, 3800, 7.5"')
    monkeypatch.setattr(hardware.shutil, "which", lambda name: exe)
    info = hardware.probe_nvidia_smi()
    assert info == DeviceInfo("cuda", "NVIDIA GeForce GTX 1650", 4096 * MIB, 3800 * MIB, (7, 5), source="nvidia-smi")


@pytest.mark.skipif(os.name != "posix", reason="fake nvidia-smi is a shell script")
def test_a_hanging_nvidia_smi_is_cut_off_and_noted(tmp_path, monkeypatch):
    exe = _fake_smi(tmp_path, "exec sleep 30")
    monkeypatch.setattr(hardware.shutil, "which", lambda name: exe)
    info = detect((("nvidia-smi", lambda: hardware.probe_nvidia_smi(timeout=0.2)), ("cpu", hardware.probe_cpu)))
    assert info.backend == "cpu" and "TimeoutExpired" in info.notes[0]


def test_cpu_probe_and_detect_for_cpu():
    info = hardware.detect_for("cpu")
    assert info.backend == "cpu" and info.total_bytes > 0 and info.source == "cpu"


def test_device_info_json_fields():
    d = DeviceInfo("cuda", "x", 8 * GIB, 7 * GIB, (7, 5))
    assert d.to_dict() == {"backend": "cuda", "name": "x", "total_bytes": 8 * GIB, "free_bytes": 7 * GIB}
    assert not d.supports_bf16 and DeviceInfo("cuda", "y", 1, 1, (8, 0)).supports_bf16
    assert (
        DeviceInfo("cpu", "CPU", 1, 1).supports_bf16
        and not DeviceInfo("cpu", "CPU", 1, 1, cpu_bf16=False).supports_bf16
    )


@pytest.mark.parametrize(
    ("machine", "torch_says", "flags", "native"),
    [
        ("x86_64", {"_is_avx512_bf16_supported": True}, "", True),
        ("x86_64", {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, "", True),
        ("x86_64", {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, "avx512_bf16", False),
        ("x86_64", {}, "fpu avx2 avx512_bf16", True),  # a torch without the checks: /proc/cpuinfo's flags
        ("x86_64", {}, "fpu avx2", False),
        ("aarch64", {}, "", True),  # other architectures: assumed
    ],
)
def test_bfloat16_is_native_with_avx512_bf16_or_amx(monkeypatch, machine, torch_says, flags, native):
    import torch

    from specdec import devices

    monkeypatch.setattr(devices.platform, "machine", lambda: machine)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if name in torch_says:
            monkeypatch.setattr(torch.cpu, name, lambda answer=torch_says[name]: answer)
        else:
            monkeypatch.delattr(torch.cpu, name, raising=False)
    monkeypatch.setattr(devices, "_cpuinfo_flags", lambda: frozenset(flags.split()))
    devices.cpu_computes_natively.cache_clear()
    try:
        assert devices.cpu_computes_natively(torch.bfloat16) is native
        assert devices.cpu_computes_natively(torch.float32)
        assert devices.resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
        assert devices.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # asked for: kept
        assert hardware.probe_cpu().cpu_bf16 is native
    finally:
        devices.cpu_computes_natively.cache_clear()


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8GiB", 8 * GIB),
        ("8 GiB", 8 * GIB),
        ("8gib", 8 * GIB),
        ("8GB", 8 * 10**9),
        ("512MiB", 512 * MIB),
        ("1.5G", 1_500_000_000),
        ("4096", 4096),
        (123, 123),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "eight GiB", "8 XB", "-1GiB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
