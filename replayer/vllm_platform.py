"""vLLM's CUDA platform on the virtual GPU (imported by vLLM itself, through replayer.vllm.platform).

vLLM's non-NVML CUDA platform reads the device through `torch.cuda`, which the emulator provides; what
it would read through NVML or the driver is answered from the hardware table.
"""

from __future__ import annotations

from vllm.platforms.cuda import NonNvmlCudaPlatform


class Emulated(NonNvmlCudaPlatform):
    """The CUDA platform as vLLM sees it on a real GPU, on the emulator's virtual one."""

    @classmethod
    def import_kernels(cls) -> None:
        from replayer.shims import vllm_kernels, vllm_ops  # noqa: F401 - vLLM's CUDA ops and Triton kernels

    @classmethod
    def is_fully_connected(cls, physical_device_ids: list[int]) -> bool:
        return True  # the GPUs of one virtual node share NVLink (hardware table)

    @classmethod
    def log_warnings(cls) -> None:
        pass
