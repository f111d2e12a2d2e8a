"""Import-only stand-in for sgl_kernel (its real wheel loads a CUDA library at import)."""

import sys
import types

__version__ = "0.4.10"


def _missing(name):
    def call(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} called under emulation (stand-in)")

    call.__name__ = name
    return call


def weak_ref_tensor(t):
    """A tensor over `t`'s memory that does not keep it allocated (SGLang's breakable CUDA graphs hand these
    to eager break points between captured segments)."""
    from replayer.tensor import weak_view

    return weak_view(t)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)


class _Sub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "is_arch_support_pdl":
            return lambda *a, **k: False
        return _missing(f"{self.__name__}.{name}")


_SUBMODULES = (
    "kvcacheio", "quantization", "utils", "elementwise", "gemm", "sampling", "allreduce", "moe", "attention",
    "speculative", "top_k", "memory", "flash_attn", "load_utils", "mamba", "expert_specialization",
)  # fmt: skip
for _name in _SUBMODULES:
    _m = _Sub(f"sgl_kernel.{_name}")
    sys.modules[f"sgl_kernel.{_name}"] = _m
    globals()[_name] = _m
