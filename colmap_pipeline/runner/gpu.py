"""GPU capability, probed once at start-up in a child process (the API never imports pycolmap).

``python -m colmap_pipeline gpu-probe`` reports what pycolmap in the children can do; NVML
(nvidia-ml-py) is asked for the device names, which is safe from the API process.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from .executor import run_json_command

log = logging.getLogger("colmap_worker.gpu")

#: seconds the probe child may take (importing pycolmap-cuda can be slow on a cold disk)
GPU_PROBE_TIMEOUT_S = 120.0


@dataclass
class GpuInfo:
    """What the pipeline children can run on.

    Attributes:
        cuda: pycolmap was built with CUDA.
        device_count: CUDA devices visible to the children.
        enabled: GPU stages will use the GPU (``cuda and device_count > 0 and not COLMAP_CPU_ONLY``).
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

    def public(self) -> dict:
        """JSON form for ``/`` and ``/health``, with live NVML readings (memory, utilisation)
        of each GPU; cheap (NVML calls, no CUDA context), never raises."""
        return {"cuda": self.cuda, "device_count": self.device_count, "enabled": self.enabled,
                "cpu_only_forced": self.cpu_only_forced, "dense_possible": self.dense_possible,
                "pycolmap_version": self.pycolmap_version, "error": self.error,
                "devices": nvml_devices()}


def nvml_devices() -> list[dict]:
    """Each NVIDIA GPU as NVML reports it now; ``[]`` without a driver or nvidia-ml-py.

    Returns:
        ``[{"index": int, "name": str, "memory_total_bytes": int, "memory_used_bytes": int,
        "utilization_gpu_percent": int | None}]`` (utilisation: percent of the last sample
        period the GPU was busy, ``nvmlDeviceGetUtilizationRates``; ``None`` when unsupported).
    """
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: no GPU
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # noqa: BLE001 - e.g. NVML_ERROR_NOT_SUPPORTED on some vGPUs
                util = None
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                        "memory_total_bytes": int(mem.total), "memory_used_bytes": int(mem.used),
                        "utilization_gpu_percent": util})
    except Exception:  # noqa: BLE001 - report what was read
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return out


def nvml_device_names() -> list[str]:
    """Names of NVIDIA GPUs via NVML; ``[]`` when there is no driver or no NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


async def probe_gpu(*, cpu_only: bool) -> GpuInfo:
    """Run the GPU probe child once; never raises (a failed probe means CPU)."""
    info = GpuInfo(cpu_only_forced=cpu_only)
    try:
        rc, doc, err = await run_json_command(["gpu-probe"], timeout_s=GPU_PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means "no GPU"
        info.error = f"probe failed: {exc}"
        return info
    if rc != 0 or not isinstance(doc, dict):
        info.error = f"probe exited {rc}: {err[-300:]}"
        return info
    info.cuda = bool(doc.get("cuda"))
    info.device_count = int(doc.get("device_count") or 0)
    info.pycolmap_version = doc.get("pycolmap_version")
    if info.cuda:
        info.devices = await asyncio.to_thread(nvml_device_names)
    info.enabled = info.cuda and info.device_count > 0 and not cpu_only
    info.dense_possible = bool(doc.get("dense_possible")) and info.enabled
    if info.enabled:
        log.info("GPU detected: %s", ", ".join(info.devices) or f"{info.device_count} CUDA device(s)")
    elif cpu_only and info.cuda and info.device_count:
        log.info("GPU present but COLMAP_CPU_ONLY=true: every stage runs on the CPU")
    else:
        log.info("No usable CUDA GPU (pycolmap cuda=%s, devices=%d): sparse reconstruction on "
                 "the CPU, dense stages skipped", info.cuda, info.device_count)
    log.info("GPU probe: cuda=%s devices=%d enabled=%s dense=%s", info.cuda, info.device_count,
             info.enabled, info.dense_possible)
    return info
