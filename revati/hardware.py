"""Hardware table: published figures of the GPUs Revati records on or emulates.

Sources: the NVIDIA datasheets of each part (H100, H200, A100, L40S, L4). Tensor-core figures
are *dense* (the datasheets headline the 2:4-sparse figure, twice as large); fp32 is the
CUDA-core figure, which is what an fp32 matmul gets with torch's default (TF32 off).
Bandwidths are per GPU and per direction: the datasheets quote NVLink and PCIe as the
bidirectional total, halved here. L2 sizes are in MiB as torch reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
GiB = 2**30
MiB = 2**20
TFLOPS = 10**12


@dataclass(frozen=True)
class GpuSpec:
    """One GPU kind: figures for device properties, roofline predictions and collective costs."""

    key: str  # short name used on the command line, e.g. 'h100'
    name: str  # as torch.cuda.get_device_name() reports it
    sm_count: int
    memory_bytes: int  # torch-visible total_memory where known, else the nominal size (see the entry)
    hbm_bandwidth: float  # device memory bandwidth, bytes/s
    bf16_flops: float  # dense tensor-core FLOP/s
    fp16_flops: float
    fp8_flops: float | None  # None where the part has no fp8 tensor cores
    fp32_flops: float  # CUDA cores, no TF32
    nvlink_bandwidth: float | None  # bytes/s per GPU per direction; None without NVLink
    pcie_bandwidth: float  # bytes/s per direction (x16 link)
    compute_capability: tuple[int, int]
    l2_bytes: int
    clock_mhz: int  # max boost clock
    price_per_hour: float | None = None  # USD per GPU-hour, where the user sets one
    # Between nodes: one 400 Gb/s InfiniBand NDR (ConnectX-7) port per GPU, as in DGX / HGX H100 and H200
    # systems; 8 GPUs per NVLink domain. Collectives spanning nodes run at this rate.
    network_bandwidth: float = 50 * GB  # bytes/s per GPU per direction
    gpus_per_node: int = 8

    def peak_flops(self, dtype: object) -> float:
        """Dense peak FLOP/s for a dtype given as a torch dtype or name ('bfloat16', 'fp8', ...)."""
        kind = _DTYPE_KINDS.get(str(dtype).removeprefix("torch."))
        if kind is None:
            raise ValueError(f"no peak FLOP/s for dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_KINDS))}")
        flops = getattr(self, f"{kind}_flops")
        if flops is None:
            raise ValueError(f"{self.name} has no {kind} tensor cores; pick bf16 or fp16 for it")
        return flops


_DTYPE_KINDS = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp16": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "fp32": "fp32",
    "fp8": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "float8_e4m3fnuz": "fp8",
    "float8_e5m2fnuz": "fp8",
}

GPUS: dict[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 80 GB. Memory: torch-visible total_memory.
    "h100": GpuSpec(
        key="h100",
        name="NVIDIA H100 80GB HBM3",
        sm_count=132,
        memory_bytes=85_029_158_912,
        hbm_bandwidth=3.35e12,
        bf16_flops=989.4 * TFLOPS,
        fp16_flops=989.4 * TFLOPS,
        fp8_flops=1978.9 * TFLOPS,
        fp32_flops=66.9 * TFLOPS,
        nvlink_bandwidth=450 * GB,
        pcie_bandwidth=64 * GB,
        compute_capability=(9, 0),
        l2_bytes=50 * MiB,
        clock_mhz=1980,
    ),
    # NVIDIA H100 Tensor Core GPU datasheet, PCIe 80 GB (an NVLink bridge pairs two cards).
    # Memory: nominal 80 GiB.
    "h100-pcie": GpuSpec(
        key="h100-pcie",
        name="NVIDIA H100 PCIe",
        sm_count=114,
        memory_bytes=80 * GiB,
        hbm_bandwidth=2.0e12,
        bf16_flops=756.5 * TFLOPS,
        fp16_flops=756.5 * TFLOPS,
        fp8_flops=1513 * TFLOPS,
        fp32_flops=51.2 * TFLOPS,
        nvlink_bandwidth=300 * GB,
        pcie_bandwidth=64 * GB,
        compute_capability=(9, 0),
        l2_bytes=50 * MiB,
        clock_mhz=1755,
    ),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM 141 GB (same compute as H100 SXM). Memory: nominal 141 GB.
    "h200": GpuSpec(
        key="h200",
        name="NVIDIA H200",
        sm_count=132,
        memory_bytes=141 * GB,
        hbm_bandwidth=4.8e12,
        bf16_flops=989.4 * TFLOPS,
        fp16_flops=989.4 * TFLOPS,
        fp8_flops=1978.9 * TFLOPS,
        fp32_flops=66.9 * TFLOPS,
        nvlink_bandwidth=450 * GB,
        pcie_bandwidth=64 * GB,
        compute_capability=(9, 0),
        l2_bytes=50 * MiB,
        clock_mhz=1980,
    ),
    # NVIDIA HGX B200 datasheet, per GPU: 180 GB HBM3e at 7.7 TB/s, dense BF16 2.25 PFLOPS (4.5 sparse),
    # dense FP8 4.5 PFLOPS, NVLink 5 at 1.8 TB/s bidirectional. SM count (148), L2 and clock are from
    # public architecture write-ups, not the datasheet. Memory: nominal 180 GB.
    "b200": GpuSpec(
        key="b200",
        name="NVIDIA B200",
        sm_count=148,
        memory_bytes=180 * GB,
        hbm_bandwidth=7.7e12,
        bf16_flops=2250 * TFLOPS,
        fp16_flops=2250 * TFLOPS,
        fp8_flops=4500 * TFLOPS,
        fp32_flops=75 * TFLOPS,
        nvlink_bandwidth=900 * GB,
        pcie_bandwidth=64 * GB,
        compute_capability=(10, 0),
        l2_bytes=126 * MiB,
        clock_mhz=1965,
    ),
    # NVIDIA A100 Tensor Core GPU datasheet, 80 GB SXM4 (no fp8). Memory: nominal 80 GiB.
    "a100": GpuSpec(
        key="a100",
        name="NVIDIA A100-SXM4-80GB",
        sm_count=108,
        memory_bytes=80 * GiB,
        hbm_bandwidth=2.039e12,
        bf16_flops=312 * TFLOPS,
        fp16_flops=312 * TFLOPS,
        fp8_flops=None,
        fp32_flops=19.5 * TFLOPS,
        nvlink_bandwidth=300 * GB,
        pcie_bandwidth=32 * GB,
        compute_capability=(8, 0),
        l2_bytes=40 * MiB,
        clock_mhz=1410,
    ),
    # NVIDIA L40S datasheet (GDDR6, PCIe only). Memory: nominal 48 GiB.
    "l40s": GpuSpec(
        key="l40s",
        name="NVIDIA L40S",
        sm_count=142,
        memory_bytes=48 * GiB,
        hbm_bandwidth=864 * GB,
        bf16_flops=362.05 * TFLOPS,
        fp16_flops=362.05 * TFLOPS,
        fp8_flops=733 * TFLOPS,
        fp32_flops=91.6 * TFLOPS,
        nvlink_bandwidth=None,
        pcie_bandwidth=32 * GB,
        compute_capability=(8, 9),
        l2_bytes=96 * MiB,
        clock_mhz=2520,
    ),
    # NVIDIA L4 Tensor Core GPU datasheet (GDDR6, PCIe only). Memory: nominal 24 GiB.
    "l4": GpuSpec(
        key="l4",
        name="NVIDIA L4",
        sm_count=58,
        memory_bytes=24 * GiB,
        hbm_bandwidth=300 * GB,
        bf16_flops=121 * TFLOPS,
        fp16_flops=121 * TFLOPS,
        fp8_flops=242.5 * TFLOPS,
        fp32_flops=30.3 * TFLOPS,
        nvlink_bandwidth=None,
        pcie_bandwidth=32 * GB,
        compute_capability=(8, 9),
        l2_bytes=48 * MiB,
        clock_mhz=2040,
    ),
}

_ALIASES = {
    "h100-sxm": "h100",
    "h100-sxm5": "h100",
    "h100-80gb": "h100",
    "h200-sxm": "h200",
    "a100-80gb": "a100",
    "a100-sxm": "a100",
    "a100-sxm4": "a100",
}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def gpu(name: str) -> GpuSpec:
    """The spec of a GPU kind by key, alias or torch device name, case-insensitively: gpu('H100-SXM')."""
    wanted = _normalize(name)
    by_torch_name = {_normalize(spec.name): key for key, spec in GPUS.items()}
    key = _ALIASES.get(wanted) or by_torch_name.get(wanted) or wanted.removeprefix("nvidia-")
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise ValueError(
            f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)} (aliases: {', '.join(_ALIASES)})"
        )
    return GPUS[key]
