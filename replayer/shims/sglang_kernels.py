"""SGLang's Triton attention kernels on the virtual device, priced as the attention they compute.

SGLang's `triton` attention backend hands each kernel the whole KV pool (`K_Buffer`, `V_Buffer`: every
token slot the memory pool holds, tens of GB for an 8B model on an H100) and reads the rows of each request
through `kv_indices`, between offsets in `kv_indptr`. Priced by its arguments' bytes, one decode layer would
cost milliseconds; here each launch is 'revati::attention' (the key every attention spelling shares, and the
one a profile fits) over the sequence lengths in its metadata:

- decode, `_fwd_kernel_stage1` and `_fwd_grouped_kernel_stage1`: one query per request, over the longest
  of the lengths `kv_indptr` holds (as vLLM's flash attention is priced over `max_seqlen_k`); in a CUDA
  graph, each replay prices it again over the lengths its `kv_indptr` then holds. Its second stage, which
  merges the splits, stays a Triton launch priced by its (small) arguments;
- extend (prefill, chunks), `_fwd_kernel`: the new tokens (`qo_indptr`) after each request's cached prefix
  (`kv_indptr`), causal over the new ones.

Metadata without values (none here in practice: SGLang builds it on the host from known lengths) prices
the kernel over one key per request.

SGLang's decode also launches `get_num_kv_splits_triton` every step (how many pieces each request's keys are
split into): one program, run here as the same computation on the host (`@exact`) rather than in Triton's
interpreter, which took 3.6 ms a step (24 s of an 8B run). tests/test_sglang.py checks it against the kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from replayer.shims.triton import exact, flat, priced
from revati.op_features import attention_of

_DECODE = "sglang.kernels.ops.attention.decode_attention"
_EXTEND = "sglang.kernels.ops.attention.extend_attention"


def _lengths(indptr, batch: int) -> torch.Tensor | None:
    """Per-request lengths from the first `batch` + 1 running sums of `indptr`, if it has a value."""
    value = indptr.value() if hasattr(indptr, "value") else indptr
    if value is None or value.numel() < batch + 1:
        return None
    value = value[: batch + 1].to(torch.int64)
    return value[1:] - value[:-1]


def _heads(q, k_buffer) -> tuple[int, int]:
    return q.shape[-2], k_buffer.shape[-2]  # a pool is (slots, heads, dim) or (pages, page size, heads, dim)


@priced(f"{_DECODE}._fwd_kernel_stage1", f"{_DECODE}._fwd_grouped_kernel_stage1")
def decode(a: dict):
    q, k = a["Q"], a["K_Buffer"]
    batch = q.shape[0]
    heads, kv_heads = _heads(q, k)
    lengths = _lengths(a["kv_indptr"], batch)
    kv_len = int(lengths.max()) if lengths is not None and lengths.numel() else 1
    features = attention_of(
        batch, heads, kv_heads, 1, kv_len, a["Lk"], a["Lv"], causal=False, lower_right=True,
        kv_element_size=k.element_size(), other_bytes=2 * q.numel() * q.element_size(),
    )  # fmt: skip
    return "revati::attention", features, (a["kv_indptr"], batch + 1, k.element_size())


@priced(f"{_EXTEND}._fwd_kernel")
def extend(a: dict):
    q, k = a["Q_Extend"], a["K_Buffer"]
    tokens = q.shape[0]
    heads, kv_heads = _heads(q, k)
    qo = a["qo_indptr"]
    batch = max(qo.shape[0] - 1, 1)
    new, prefix = _lengths(qo, batch), _lengths(a["kv_indptr"], batch)
    q_len = tokens / batch
    kv_len = int((new + prefix).max()) if new is not None and prefix is not None else q_len
    features = attention_of(
        batch, heads, kv_heads, q_len, kv_len, a["Lq"], a["Lv"], causal=bool(a.get("IS_CAUSAL", True)),
        lower_right=True, kv_element_size=k.element_size(),
        other_bytes=2 * q.numel() * q.element_size() + 2 * a["K_Extend"].numel() * k.element_size(),
    )  # fmt: skip
    return "revati::attention", features, None


def _cdiv(a, b):
    """`tl.cdiv` on integers; 0 where the divisor is 0, as the interpreter's numpy gives."""
    if isinstance(b, torch.Tensor):
        return torch.where(b == 0, 0, (a + b - 1) // torch.where(b == 0, 1, b))
    return (a + b - 1) // b if b else 0


@exact("get_num_kv_splits_triton")
def num_kv_splits(a: dict, grid: tuple) -> None:
    """SGLang's split count per request for decode attention, as its kernel computes it (the float steps in
    float32, as on the GPU)."""
    n, groups = int(a["num_seq"]), int(a["num_group"])
    seq_lens = flat(a["seq_lens_ptr"])[:n].to(torch.int64)
    longest = int(seq_lens.max()) if n else 0
    shortest = int(seq_lens.min()) if n else 0
    if longest * 8 < shortest * 10:
        shortest = longest
    if a["uneven_batch_ptr"] is not None:
        flat(a["uneven_batch_ptr"])[0] = int(shortest < longest)
    if not n:
        return
    max_splits = int(a["max_kv_splits"])
    chunk_1 = _cdiv(longest, min(_cdiv(longest, shortest), max_splits))
    log_len = np.maximum(np.log2(np.float32(longest) / np.float32(64.0)), np.float32(1.0))
    cores = int(np.float32(int(a["device_core_count"])) * log_len)
    heads, kv_heads = int(a["num_head"]), int(a["num_kv_head"])
    kv_group = heads // kv_heads
    per_seq = heads if kv_group == 1 else _cdiv(heads, min(16, kv_group))
    chunk_2 = _cdiv(longest, min(_cdiv(cores, n * groups * per_seq), max_splits))
    splits = torch.maximum(_cdiv(seq_lens, torch.tensor(chunk_1)), _cdiv(seq_lens, torch.tensor(chunk_2)))
    out = flat(a["num_kv_splits_ptr"])
    out[: n * groups] = splits.repeat_interleave(groups).to(out.dtype)
