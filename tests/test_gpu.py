"""GPU probe and NVML readings (``runner/gpu.py``), with stand-ins for pynvml and the probe
child (no GPU needed)."""
from __future__ import annotations

import sys
import types

import pytest

from colmap_pipeline.runner import gpu
from colmap_pipeline.runner.gpu import GpuDevice, GpuInfo, nvml_devices, probe_gpu


def fake_nvml(names: list[bytes | str], *, fail_at: int | None = None,
              util_supported: bool = True, init_fails: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.shutdowns = 0  # type: ignore[attr-defined]

    def init() -> None:
        if init_fails:
            raise RuntimeError("NVML Shared Library Not Found")

    def handle(i: int) -> int:
        if fail_at is not None and i >= fail_at:
            raise RuntimeError("GPU is lost")
        return i

    def util(h: int) -> types.SimpleNamespace:
        if not util_supported:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return types.SimpleNamespace(gpu=37)

    def shutdown() -> None:
        m.shutdowns += 1  # type: ignore[attr-defined]

    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(names)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: names[h]  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=80 * 2**30, used=2**30 * (h + 1))
    m.nvmlDeviceGetUtilizationRates = util  # type: ignore[attr-defined]
    return m


def test_nvml_devices_reads_each_gpu(monkeypatch):
    nvml = fake_nvml([b"NVIDIA H200", "NVIDIA H100"])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert nvml_devices() == [GpuDevice(0, "NVIDIA H200", 80 * 2**30, 2**30, 37),
                              GpuDevice(1, "NVIDIA H100", 80 * 2**30, 2 * 2**30, 37)]
    assert nvml.shutdowns == 1


def test_nvml_devices_degrades_instead_of_raising(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(["a", "b"], util_supported=False,
                                                         fail_at=1))
    assert nvml_devices() == [GpuDevice(0, "a", 80 * 2**30, 2**30, None)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(["a"], init_fails=True))
    assert nvml_devices() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert nvml_devices() == []


def test_public_form_carries_live_device_readings(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(["NVIDIA H200"]))
    pub = GpuInfo(cuda=True, device_count=1, enabled=True).public()
    assert pub["devices"] == [{"index": 0, "name": "NVIDIA H200",
                               "memory_total_bytes": 80 * 2**30, "memory_used_bytes": 2**30,
                               "utilization_gpu_percent": 37}]
    assert pub["enabled"] is True and pub["error"] is None


@pytest.mark.asyncio
@pytest.mark.parametrize(("doc", "cpu_only", "enabled", "dense"), [
    ({"cuda": True, "device_count": 1, "dense_possible": True, "pycolmap_version": "4.2.1"},
     False, True, True),
    ({"cuda": True, "device_count": 1, "dense_possible": True}, True, False, False),
    ({"cuda": False, "device_count": 0, "dense_possible": False}, False, False, False),
])
async def test_probe_gpu_combines_the_child_and_the_setting(monkeypatch, doc, cpu_only,
                                                            enabled, dense):
    async def fake_run(args, *, timeout_s):
        assert args == ["gpu-probe"] and timeout_s == gpu.GPU_PROBE_TIMEOUT_S
        return 0, doc, ""

    monkeypatch.setattr(gpu, "run_json_command", fake_run)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(["NVIDIA H200"]))
    info = await probe_gpu(cpu_only=cpu_only)
    assert (info.enabled, info.dense_possible, info.cpu_only_forced) == (enabled, dense,
                                                                          cpu_only)
    assert info.devices == (["NVIDIA H200"] if doc["cuda"] else [])


@pytest.mark.asyncio
async def test_a_failed_probe_means_cpu(monkeypatch):
    async def crashed(args, *, timeout_s):
        return -6, None, "Aborted (core dumped)"

    monkeypatch.setattr(gpu, "run_json_command", crashed)
    info = await probe_gpu(cpu_only=False)
    assert not info.enabled and info.error == "probe exited -6: Aborted (core dumped)"

    async def raises(args, *, timeout_s):
        raise OSError("no python")

    monkeypatch.setattr(gpu, "run_json_command", raises)
    info = await probe_gpu(cpu_only=False)
    assert not info.enabled and info.error == "probe failed: no python"
