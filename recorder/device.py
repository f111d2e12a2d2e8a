"""What the recording device is: name, SMs (or cores), memory, clocks, driver and CUDA versions.

CUDA facts come from torch and, where installed, cuda-python (clocks, driver version) and NVML (the
driver's release string); both are optional (`pip install revati[gpu]`): without them the facts they
add are left empty. Nothing here imports a GPU library at module import.
"""

from __future__ import annotations

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
        "extra": {"cpu_count": os.cpu_count()},
    }
