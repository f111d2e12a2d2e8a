"""vLLM's CUDA ops (the `_C`, `_C_cache_ops` namespaces its GPU build registers) on the virtual device.

The emulated platform never loads a CPU build's own `_C` extension (it defines some of these names with
CPU kernels, and on a CPU without AVX-512 it dies at load with an illegal instruction).
"""

from __future__ import annotations

import torch

from replayer import session
from replayer.memory import Storage
from replayer.shims import define, host, no_output
from replayer.tensor import Meta, make
from revati.op_features import embedding, norm

_c = torch.library.Library("_C", "FRAGMENT")
_cache = torch.library.Library("_C_cache_ops", "FRAGMENT")


def _rms_norm(func, a, out):
    return norm(func, {"normalized_shape": a["input"].shape[-1:], **a}, out)


define(_c, "rms_norm(Tensor(a!) out, Tensor input, Tensor? weight, float epsilon) -> ()", no_output,
       features=_rms_norm, key="aten::rms_norm")  # fmt: skip
define(_c, "fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor? weight, float epsilon) -> ()",
       no_output, features=_rms_norm)  # fmt: skip
define(_c, "silu_and_mul(Tensor(a!) out, Tensor input) -> ()", no_output)
define(_c, "gelu_and_mul(Tensor(a!) out, Tensor input) -> ()", no_output)
define(_c, "gelu_tanh_and_mul(Tensor(a!) out, Tensor input) -> ()", no_output)
define(
    _c,
    "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size, "
    "Tensor cos_sin_cache, bool is_neox, int rope_dim_offset=0, bool inverse=False) -> ()",
    no_output,
)


def _shard_embedding(func, a, out):
    """A tensor-parallel rank's embedding lookup: rows it owns, zeros for the others (one fused kernel)."""
    return embedding(func, {"indices": a["input_ids"], "weight": a["weight"]}, a["out"])


define(
    _c,
    "vocab_parallel_embedding(Tensor(a!) out, Tensor input_ids, Tensor weight, int org_vocab_start_index, "
    "int org_vocab_end_index, int num_org_vocab_padding, int added_vocab_start_index, "
    "int added_vocab_end_index) -> ()",
    no_output,
    features=_shard_embedding,
    key="aten::embedding",
)


def _kv_write(func, a, out):
    """The new keys and values read and written into their cache slots (not the whole cache)."""
    moved = sum(t.numel() * t.element_size() for t in (a["key"], a["value"]))
    return {
        "numel": float(a["key"].numel() + a["value"].numel()),
        "bytes": float(2 * moved + a["slot_mapping"].numel() * a["slot_mapping"].element_size()),
    }


define(
    _cache,
    "reshape_and_cache_flash(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
    "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()",
    no_output,
    features=_kv_write,
)

# What the CUTLASS kernels of a GPU build support, by compute capability (major * 10 + minor), as vLLM's
# own answers read: FP8 GEMMs from Ada (89), block FP8 and grouped GEMMs from Hopper (90), FP4 on Blackwell.
host(_c, "cutlass_scaled_mm_supports_fp8(int cuda_device_capability) -> bool", lambda c: c >= 89)
host(_c, "cutlass_scaled_mm_supports_block_fp8(int cuda_device_capability) -> bool", lambda c: c >= 90)
host(_c, "cutlass_group_gemm_supported(int cuda_device_capability) -> bool", lambda c: c >= 90)
host(_c, "cutlass_scaled_mm_supports_fp4(int cuda_device_capability) -> bool", lambda c: c >= 100)
host(_c, "mxfp4_experts_quant_supported(int cuda_device_capability) -> bool", lambda c: c >= 100)


def _cuda_view(cpu_tensor: torch.Tensor) -> torch.Tensor:
    # Unified virtual addressing: the device reads the pinned host buffer itself, so the view's value is that
    # buffer (host writes show through) and it takes no device memory.
    emu = session.current()
    storage = Storage(cpu_tensor.untyped_storage().nbytes(), None, True)
    return make(Meta.of_tensor(cpu_tensor), emu.device, storage, cpu_tensor)


_c.define("get_cuda_view_from_cpu_tensor(Tensor(a!) cpu_tensor) -> Tensor")
_c.impl("get_cuda_view_from_cpu_tensor", _cuda_view, "CPU")
