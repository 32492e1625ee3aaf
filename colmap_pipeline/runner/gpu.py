"""GPU capability, probed once at start-up in a child process (the API never imports pycolmap).

``python -m colmap_pipeline gpu-probe`` reports what pycolmap in the children can do; NVML
(nvidia-ml-py, :func:`nvml_devices`, the one NVML reader) is asked for the devices and their
live readings, which is safe from the API process (no CUDA context is created).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from .executor import run_json_command

log = logging.getLogger("colmap_worker.gpu")

#: seconds the probe child may take (importing pycolmap-cuda can be slow on a cold disk)
GPU_PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GpuDevice:
    """One NVIDIA GPU as NVML reports it now.

    Attributes:
        index: NVML device index.
        name: e.g. ``"NVIDIA H100 80GB HBM3"``.
        memory_total_bytes / memory_used_bytes: ``nvmlDeviceGetMemoryInfo`` (bytes).
        utilization_gpu_percent: percent of the last sample period the GPU was busy
            (``nvmlDeviceGetUtilizationRates``); ``None`` where unsupported (some vGPUs).
    """

    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_gpu_percent: int | None


def _read_device(nvml: Any, index: int) -> GpuDevice:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        util: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001 - e.g. NVML_ERROR_NOT_SUPPORTED on some vGPUs
        util = None
    return GpuDevice(index, name.decode() if isinstance(name, bytes) else str(name),
                     int(mem.total), int(mem.used), util)


def nvml_devices() -> list[GpuDevice]:
    """Every NVIDIA GPU as NVML reports it now; ``[]`` without a driver or nvidia-ml-py, and
    the devices read so far when NVML fails midway. Cheap (no CUDA context); never raises.
    Blocking (NVML calls): call it in a thread from async code."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: no GPU
        return []
    out: list[GpuDevice] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            out.append(_read_device(pynvml, i))
    except Exception:  # noqa: BLE001 - report what was read
        log.debug("NVML stopped answering after %d device(s)", len(out), exc_info=True)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - nothing left to release
            pass
    return out


@dataclass
class GpuInfo:
    """What the pipeline children can run on.

    Attributes:
        cuda: pycolmap was built with CUDA.
        device_count: CUDA devices visible to the children.
        enabled: GPU stages will use the GPU
            (``cuda and device_count > 0 and not COLMAP_CPU_ONLY``).
        cpu_only_forced: ``COLMAP_CPU_ONLY`` was set.
        devices: NVML device names, when NVML answers.
        dense_possible: PatchMatch stereo can run (CUDA pycolmap, a device, not CPU-only).
        pycolmap_version: version string from the child, if the probe ran.
        error: why the probe failed, if it did.
    """

    cuda: bool = False
    device_count: int = 0
    enabled: bool = False
    cpu_only_forced: bool = False
    devices: list[str] = field(default_factory=list)
    dense_possible: bool = False
    pycolmap_version: str | None = None
    error: str | None = None

    def public(self) -> dict[str, Any]:
        """JSON form for ``/`` and ``/health``: the probe's fields plus ``devices``, each GPU's
        live NVML readings (:class:`GpuDevice` as a dict). Blocking (NVML): call in a thread."""
        return {"cuda": self.cuda, "device_count": self.device_count, "enabled": self.enabled,
                "cpu_only_forced": self.cpu_only_forced, "dense_possible": self.dense_possible,
                "pycolmap_version": self.pycolmap_version, "error": self.error,
                "devices": [asdict(d) for d in nvml_devices()]}


def _log_probe(info: GpuInfo, cpu_only: bool) -> None:
    if info.enabled:
        log.info("GPU detected: %s",
                 ", ".join(info.devices) or f"{info.device_count} CUDA device(s)")
    elif cpu_only and info.cuda and info.device_count:
        log.info("GPU present but COLMAP_CPU_ONLY=true: every stage runs on the CPU")
    else:
        log.info("No usable CUDA GPU (pycolmap cuda=%s, devices=%d): sparse reconstruction on "
                 "the CPU, dense stages skipped", info.cuda, info.device_count)
    log.info("GPU probe: cuda=%s devices=%d enabled=%s dense=%s", info.cuda, info.device_count,
             info.enabled, info.dense_possible)


async def probe_gpu(*, cpu_only: bool) -> GpuInfo:
    """Run the GPU probe child (``python -m colmap_pipeline gpu-probe``) once.

    Never raises: a probe that fails, times out (:data:`GPU_PROBE_TIMEOUT_S`) or prints no
    JSON object means "CPU only", with the reason in :attr:`GpuInfo.error`.
    """
    info = GpuInfo(cpu_only_forced=cpu_only)
    try:
        rc, doc, err = await run_json_command(["gpu-probe"], timeout_s=GPU_PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means "no GPU"
        info.error = f"probe failed: {exc}"
        return info
    if rc != 0 or doc is None:
        info.error = f"probe exited {rc}: {err[-300:]}"
        return info
    info.cuda = bool(doc.get("cuda"))
    info.device_count = int(doc.get("device_count") or 0)
    info.pycolmap_version = doc.get("pycolmap_version")
    if info.cuda:
        info.devices = [d.name for d in await asyncio.to_thread(nvml_devices)]
    info.enabled = info.cuda and info.device_count > 0 and not cpu_only
    info.dense_possible = bool(doc.get("dense_possible")) and info.enabled
    _log_probe(info, cpu_only)
    return info
