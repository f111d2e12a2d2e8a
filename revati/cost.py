"""Cost models: how long an op keeps the GPU stream busy and the host busy issuing it.

The emulator asks a `CostModel`; a fitted profile implements it from recorded traces, and
`Roofline` implements it from the hardware table alone, for ops or GPUs never recorded.

Roofline constants, and where they come from (all are estimates to be replaced by fitted values):
- Compute efficiency 0.75 for matmuls: large bf16 / fp8 cuBLAS GEMMs on H100 sustain about 70-80 %
  of the datasheet's dense peak. 0.40 for attention: FlashAttention-2 forward reaches about
  350 TFLOP/s on H100 (FlashAttention-3 paper), ~35-40 % of dense bf16 peak.
- Memory efficiency 0.85: streaming kernels reach about 80-90 % of the datasheet HBM bandwidth.
- Kernel floor, added to every kernel's time: 2 µs for a tiny elementwise kernel, 4 µs for a GEMM,
  6 µs for attention (split-KV decode runs a second, combining kernel) — typical of the shortest
  kernels of each kind in Nsight traces of H100 inference; 10 µs plus a ring's bandwidth term for
  a collective (NCCL small-message latency over NVLink is of that order).
- Host time per op, eager PyTorch on a fast x86 core: 10 µs for an op that launches a kernel
  (Python binding + dispatcher + cudaLaunchKernel, usually measured at 5-15 µs), 3 µs for a
  view or allocation (dispatcher only).
- Launch latency 5 µs: from a launch call to the earliest start of its kernel on an idle stream
  (commonly measured at 4-6 µs).
- Sync latency 4 µs: from the stream draining to the host returning from a blocking sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from revati.hardware import GpuSpec
from revati.op_features import Features, launches_kernel, op_family

IDLE_GAP = 0.01  # seconds between engine steps after which the next step counts as a wake-up (CostModel)
# Host seconds per kernel node to end a CUDA graph capture (cudaStreamEndCapture, cudaGraphInstantiate):
# fitted on `traces/h200/cb-graph` (11 ms after each capture of an 8B model's 1,497 kernels); a profile
# fitted on traces with captures carries its own figure.
GRAPH_INSTANTIATE = 7.5e-6


@runtime_checkable
class CostModel(Protocol):
    """What the emulator needs to advance its clocks: device time, host time, latencies, in seconds."""

    name: str
    launch_latency: float  # from a launch on the host to the kernel's earliest start
    sync_latency: float  # from the stream draining to a blocking host call returning
    synchronous: bool  # the host waits for every op (a CPU): host time per op includes its device time
    # optional `wake_factor`: the first step after IDLE_GAP without one runs this much slower (cold caches)
    # optional `graph_instantiate`: host seconds per kernel node when a CUDA graph capture ends

    def device_time(self, key: str, features: Features, dtype: torch.dtype | None) -> float:
        """Seconds the op's kernels occupy its stream; 0 for an op that launches none."""
        ...

    def host_time(self, key: str) -> float:
        """Seconds of host time to issue the op (Python, dispatch, launch)."""
        ...

    def describe(self) -> str:
        """One line for the CLI: where the numbers come from."""
        ...


_FLOOR = {"matmul": 4e-6, "attention": 6e-6, "collective": 10e-6}
_DEFAULT_FLOOR = 2e-6
# Ring algorithms over n ranks: (bytes each rank sends per byte of payload, steps). A step costs a hop's
# latency: about 1 µs over NVLink, 5 µs over InfiniBand (NCCL's tuning tables are of that order).
_RING = {
    "revati::all_reduce": lambda n: (2 * (n - 1) / n, 2 * (n - 1)),
    "revati::reduce": lambda n: (2 * (n - 1) / n, 2 * (n - 1)),
    "revati::all_gather": lambda n: ((n - 1) / n, n - 1),
    "revati::gather": lambda n: ((n - 1) / n, n - 1),
    "revati::scatter": lambda n: ((n - 1) / n, n - 1),
    "revati::reduce_scatter": lambda n: ((n - 1) / n, n - 1),
    "revati::all_to_all": lambda n: ((n - 1) / n, n - 1),
    "revati::broadcast": lambda n: (1.0, n - 1),
    "revati::send_recv": lambda n: (1.0, 1),
}
_HOP_LATENCY = {"nvlink": 1e-6, "network": 5e-6}


@dataclass(frozen=True)
class Roofline:
    """Roofline predictions from datasheet figures: floor + max(flops / compute, bytes / memory).

    >>> h100 = Roofline(gpu("h100"))
    >>> h100.device_time("aten::mm", {"flops": 2 * 8192**3, "bytes": 3 * 2 * 8192**2}, torch.bfloat16)
    0.00148...
    """

    gpu: GpuSpec
    matmul_efficiency: float = 0.75
    attention_efficiency: float = 0.40
    memory_efficiency: float = 0.85
    host_kernel_op: float = 10e-6
    host_view_op: float = 3e-6
    launch_latency: float = 5e-6
    sync_latency: float = 4e-6
    synchronous: bool = False
    graph_instantiate: float = GRAPH_INSTANTIATE
    name: str = field(default="roofline")

    def device_time(self, key: str, features: Features, dtype: torch.dtype | None) -> float:
        """Seconds on the stream: a per-kernel floor plus the slower of compute and memory traffic."""
        if features.get("kernel") == 0.0:
            return 0.0
        family = op_family(key)
        floor = kernel_floor(key)
        nbytes = features.get("bytes", 0.0)
        if family == "collective":
            return floor + self._collective_time(
                key, nbytes, features.get("group_size"), features.get("nodes")
            )
        if features.get("cross_device"):  # a host <-> device copy crosses PCIe once: half of read + write
            return floor + nbytes / 2 / (self.gpu.pcie_bandwidth * self.memory_efficiency)
        memory = nbytes / (self.gpu.hbm_bandwidth * self.memory_efficiency)
        flops = features.get("flops", 0.0)
        if not flops:
            return floor + memory
        efficiency = self.attention_efficiency if family == "attention" else self.matmul_efficiency
        compute = flops / (peak_flops(self.gpu, dtype) * efficiency)
        return floor + max(compute, memory)

    def host_time(self, key: str) -> float:
        """Seconds of host time per op: a kernel-launching op costs more than a view."""
        return self.host_kernel_op if launches_kernel(key) else self.host_view_op

    def describe(self) -> str:
        """One line for the CLI."""
        return (
            f"roofline from {self.gpu.name} datasheet figures ({self.matmul_efficiency:.0%} of dense peak "
            f"for matmuls, {self.attention_efficiency:.0%} for attention, "
            f"{self.memory_efficiency:.0%} of HBM bandwidth)"
        )

    def _collective_time(
        self, key: str, nbytes: float, group_size: float | None, nodes: float | None
    ) -> float:
        return collective_time(
            self.gpu, key, nbytes, int(group_size or 2), int(nodes or 1), self.memory_efficiency
        )


def collective_time(
    spec: GpuSpec, key: str, nbytes: float, group_size: int, nodes: int = 1, efficiency: float = 0.85
) -> float:
    """Seconds of a collective over `group_size` ranks on `nodes` nodes, floor not included: a ring's
    steps and traffic, and for all-reduce the cheaper of ring and tree (a tree has log2(n) steps each way,
    which wins for small payloads). Within a node the link is NVLink (PCIe without it); across nodes, the
    per-GPU network link.

    >>> collective_time(gpu("h100"), "revati::all_reduce", 16 * 2**20, 8)  # 16 MiB over NVLink
    9.07...e-05
    """
    n = group_size
    if n <= 1:
        return 0.0
    if nodes > 1:
        link, hop = min(spec.network_bandwidth, spec.nvlink_bandwidth or spec.pcie_bandwidth), "network"
    else:
        link, hop = spec.nvlink_bandwidth or spec.pcie_bandwidth, "nvlink"
    rate = link * efficiency
    traffic, steps = _RING.get(key, _RING["revati::all_reduce"])(n)
    ring = steps * _HOP_LATENCY[hop] + traffic * nbytes / rate
    if key not in ("revati::all_reduce", "revati::reduce"):
        return ring
    depth = math.ceil(math.log2(n))
    tree = 2 * depth * _HOP_LATENCY[hop] + 2 * nbytes / rate
    return min(ring, tree)


def host_collective_time(nbytes: float, group_size: int) -> float:
    """Seconds of a collective on host tensors (gloo between processes of a node): tens of µs per message
    and a few GB/s over loopback TCP."""
    return 30e-6 + nbytes / 5e9 if group_size > 1 else 0.0


def kernel_floor(key: str) -> float:
    """Seconds of a kernel's time that no GPU's FLOP/s or bandwidth shortens (launch, tail, sync)."""
    return _FLOOR.get(op_family(key), _DEFAULT_FLOOR)


def peak_flops(spec: GpuSpec, dtype: torch.dtype | None) -> float:
    # Integer and unknown dtypes run on CUDA cores; dtype None (no tensor argument) is taken as bf16.
    if dtype is None:
        return spec.bf16_flops
    if not dtype.is_floating_point or dtype == torch.float64:
        return spec.fp32_flops
    return spec.peak_flops(dtype)
