"""FlashAttention 3 as vLLM builds it (`vllm.vllm_flash_attn._vllm_fa3_C`, ops `torch.ops._vllm_fa3_C`).

vLLM's own Python API (`flash_attn_varlen_func`, `get_scheduler_metadata`) runs unchanged and calls these
ops; on the virtual device each is one kernel, priced as attention ('revati::attention', the key every
scaled-dot-product spelling shares). The schemas follow the positional calls in vLLM's
flash_attn_interface.py, with the argument names revati.op_features' attention features read.
"""

from __future__ import annotations

import torch

from replayer.shims import define
from revati.op_features import attention

_lib = torch.library.Library("_vllm_fa3_C", "FRAGMENT")


def _fwd(query, key, value, k_new, v_new, q_v, out, cu_seqlens_q, *rest):
    heads, tokens = query.shape[-2], query.shape[:-2].numel()
    lse = query.new_empty((heads, tokens), dtype=torch.float32)
    return (
        query.new_empty(query.shape) if out is None else out.new_empty(0),
        lse,
        lse.new_empty(0),
        lse.new_empty(0),
    )


define(
    _lib,
    "fwd(Tensor query, Tensor key, Tensor value, Tensor? k_new, Tensor? v_new, Tensor? q_v, Tensor(a!)? out, "
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? cu_seqlens_k_new, Tensor? seqused_q, "
    "Tensor? seqused_k, int? max_seqlen_q, int? max_seqlen_k, Tensor? block_table, Tensor? kv_batch_idx, "
    "Tensor? leftpad_k, Tensor? rotary_cos, Tensor? rotary_sin, Tensor? seqlens_rotary, Tensor? q_descale, "
    "Tensor? k_descale, Tensor? v_descale, float? softmax_scale, bool is_causal, int window_size_left, "
    "int window_size_right, float softcap, bool rotary_interleaved, Tensor? scheduler_metadata, "
    "int num_splits, bool? pack_gqa, int sm_margin, Tensor? s_aux, int cp_world_size, int cp_rank, "
    "Tensor? cp_tot_seqused_k) -> (Tensor, Tensor, Tensor, Tensor)",
    _fwd,
    features=attention,
    key="revati::attention",
)


def _scheduler_metadata(batch_size, *rest):
    return torch.empty((batch_size + 1,), dtype=torch.int32, device="meta")


define(
    _lib,
    "get_scheduler_metadata(int batch_size, int max_seqlen_q, int max_seqlen_k, int num_heads, "
    "int num_heads_k, int headdim, int headdim_v, ScalarType qkv_dtype, Tensor seqused_k, "
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? cu_seqlens_k_new, Tensor? seqused_q, "
    "Tensor? leftpad_k, int? page_size, int max_seqlen_k_new, bool is_causal, int window_size_left, "
    "int window_size_right, bool has_softcap, int num_splits, bool? pack_gqa, int sm_margin) -> Tensor",
    _scheduler_metadata,
)
