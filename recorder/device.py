"""What the recording device is: name, SMs (or cores), memory, clocks, driver and CUDA versions.

CUDA facts come from torch and, where installed, cuda-python (clocks, driver version) and NVML (the
driver's release string); both are optional (`pip install revati[gpu]`): without them the facts they
add are left empty. Nothing here imports a GPU library at module import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re

import torch

from revati.hardware import GPUS


class DeviceError(RuntimeError):
    """The device asked for cannot be used on this machine."""


def check(device: str) -> None:
    """Fail with a clear message when `device` ('cpu' or 'cuda') cannot record here."""
    if device == "cpu":
        return
    if device != "cuda":
        raise DeviceError(f"--device {device!r}: use 'cuda' or 'cpu'")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA driver or GPU visible"
        raise DeviceError(f"--device cuda: CUDA is not available here ({build}); record with --device cpu")


def facts(device: str) -> dict:
    """Columns of the run table describing the device (device_kind, device_name, sm_count, ...) and extras."""
    return _cuda_facts() if device == "cuda" else _cpu_facts()


def kind_of(name: str) -> str:
    """The hardware-table key of a GPU name as the driver reports it ('NVIDIA H100 80GB HBM3' -> 'h100')."""
    for key, spec in GPUS.items():
        if spec.name.lower() == name.lower():
            return key
    lowered = name.lower().replace("-", " ")
    for key in sorted(GPUS, key=len, reverse=True):  # whole words: 'L40' is not 'L4', 'GH200' not 'H200'
        if re.search(rf"\b{re.escape(key.replace('-', ' '))}\b", lowered):
            return key
    return lowered.removeprefix("nvidia ").replace(" ", "-")


def _cuda_facts() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    extra: dict = {
        "compute_capability": f"{props.major}.{props.minor}",
        "l2_bytes": getattr(props, "L2_cache_size", None),
    }
    extra.update(_cuda_python_facts())
    driver = _nvml_driver() or extra.pop("driver_api_version", None)
    return {
        "device_kind": kind_of(props.name),
        "device_name": props.name,
        "sm_count": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "cuda_version": torch.version.cuda,
        "driver_version": driver,
        "extra": extra,
    }


def _cuda_python_facts() -> dict:
    try:
        from cuda.bindings import driver
    except ImportError:
        return {}
    try:
        (err,) = driver.cuInit(0)
        err, version = driver.cuDriverGetVersion()
        err, dev = driver.cuDeviceGet(torch.cuda.current_device())
        attr = driver.CUdevice_attribute
        out = {"driver_api_version": f"{version // 1000}.{version % 1000 // 10}"}
        for name, key in (
            ("sm_clock_mhz", "CU_DEVICE_ATTRIBUTE_CLOCK_RATE"),
            ("memory_clock_mhz", "CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE"),
        ):
            err, khz = driver.cuDeviceGetAttribute(getattr(attr, key), dev)
            if int(err) == 0:
                out[name] = khz // 1000
        return out
    except Exception:  # noqa: BLE001 - optional facts; a driver quirk must not stop a recording
        return {}


def _nvml_driver() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - optional fact
        return None


# (setting, mallopt parameter from malloc.h, value) a CPU recording runs with: freed blocks stay in the
# process. 32 MB is the largest mmap threshold glibc takes on 64-bit.
_STEADY = (("trim_threshold", -1, 1 << 30), ("top_pad", -2, 64 << 20), ("mmap_threshold", -3, 32 << 20))
_steady: dict[str, int] = {}


def steady_memory() -> dict[str, int]:
    """Keep memory that CPU ops free inside the process, so an op's time does not depend on page faults.

    glibc's malloc hands large blocks back to the kernel on free (blocks above its mmap threshold, and the
    top of the heap past its trim threshold); the next op that allocates as much then faults in fresh zeroed
    pages. On a 2-core VM that made a decode step's gather up to 20x slower at random, and the held-out error
    of a fit on such a recording 22-35 % instead of 9-12 %. Returns the settings applied (empty where the C
    library is not glibc); idempotent.
    """
    if _steady:
        return _steady
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return {}
    for setting, param, value in _STEADY:
        if mallopt(param, value) == 1:
            _steady[setting] = value
    return _steady


def _cpu_facts() -> dict:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {
        "device_kind": "cpu",
        "device_name": name,
        "sm_count": torch.get_num_threads(),  # the cores torch computes on
        "memory_bytes": memory,
        "cuda_version": None,
        "driver_version": None,
        "extra": {"cpu_count": os.cpu_count(), "malloc": dict(_steady)},
    }
