"""Op keys and features: what the recorder and the replayer call an aten op, and what they measure of it.

A registry in the style of `torch.utils.flop_counter`: one small decorated function per op family
reads the metadata (shape, stride, dtype, device; never values) of an op's arguments and outputs and
returns named float features. Adding an op is adding it to a decorator, or one function beside its
siblings.

Key naming: the op's qualified name without its overload, as torch.profiler spells it
('aten::mm', 'aten::add', 'aten::add_'). Device-specific spellings of one computation share one key
in the `revati::` namespace, which no real library uses: every flash / efficient / cuDNN / CPU
variant of scaled-dot-product attention is 'revati::attention', and the c10d and functional
spellings of a collective are 'revati::all_reduce', 'revati::all_gather', 'revati::reduce_scatter',
'revati::all_to_all', 'revati::broadcast'.

Which ops launch no kernel (`launches_kernel`), decided from torch's own schema and tags:
- an op whose every return aliases an input without writing it (view, t, expand, slice, split,
  detach, alias, ...) only makes new metadata;
- an op tagged `inplace_view` (set_, resize_, as_strided_, t_, ...) only changes metadata;
- allocations (empty, empty_strided, new_empty, ...) and stream bookkeeping (record_stream,
  wait_tensor) reach the caching allocator or the stream, never a kernel;
- except the few composites that alias *or* copy (reshape, contiguous, to, flatten): those are
  decided per call, by whether the output shares the input's storage.
A no-kernel op's features are exactly {'kernel': 0.0}; a cost model gives it no device time.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._ops import OpOverload, OpOverloadPacket

Features = dict[str, float]
FeatureFn = Callable[[OpOverload, dict[str, Any], Any], Features]

aten = torch.ops.aten

_registry: dict[OpOverloadPacket, FeatureFn] = {}
_key_of: dict[str, str] = {}  # op name without overload -> canonical key, where they differ
_family_of: dict[str, str] = {}  # canonical key -> family (the feature function's name)


def register_features(*targets: OpOverloadPacket, key: str | None = None) -> Callable[[FeatureFn], FeatureFn]:
    """Register a feature function for ops; `key` maps all of them to one canonical key.

    The function takes (func, bound arguments by schema name, output) and returns features;
    its name is the family: `@register_features(aten.mm, aten.bmm) def matmul(func, a, out): ...`.
    """

    def register(fn: FeatureFn) -> FeatureFn:
        for target in targets:
            if not isinstance(target, OpOverloadPacket):
                raise TypeError(f"register_features: expected an op packet like aten.mm, got {target!r}")
            if target in _registry:
                raise RuntimeError(f"register_features: {target._qualified_op_name} is registered twice")
            _registry[target] = fn
            name = target._qualified_op_name
            if key is not None:
                _key_of[name] = key
            _family_of[key or name] = fn.__name__
        return fn

    return register


def canonical_op(func: OpOverload | OpOverloadPacket | str) -> str:
    """The key of an op in traces and profiles: canonical_op(aten.add.Tensor) == 'aten::add'.

    Accepts an overload, a packet, or a name as torch.profiler or a dispatch mode spells it
    ('aten::_scaled_dot_product_flash_attention' -> 'revati::attention').
    """
    if isinstance(func, OpOverload):
        name = func._schema.name
    elif isinstance(func, OpOverloadPacket):
        name = func._qualified_op_name
    else:
        ns, _, op = func.partition("::")
        name = f"{ns}::{op.partition('.')[0]}" if op else func.partition(".")[0]
    return _key_of.get(name, name)


def op_family(key: str) -> str:
    """The family of a canonical key: 'matmul', 'attention', ..., 'view' (no kernel) or 'elementwise'."""
    if key in _family_of:
        return _family_of[key]
    return "elementwise" if launches_kernel(key) else "view"


def op_features(func: OpOverload, args: tuple, kwargs: dict, out: Any) -> tuple[str, Features]:
    """Key and features of one op call, from metadata only; out is what the op returned.

    >>> op_features(aten.mm.default, (a, b), {}, a @ b)  # a: 8x16, b: 16x4 meta tensors
    ('aten::mm', {'m': 8.0, 'n': 4.0, 'k': 16.0, 'batch': 1.0, 'flops': 1024.0, 'bytes': ...})
    """
    key = canonical_op(func)
    if func.overloadpacket in _MAY_ALIAS:
        source = next(_tensors(args), None)
        if isinstance(out, torch.Tensor) and source is not None and _same_storage(out, source):
            return key, {"kernel": 0.0}
    elif not launches_kernel(func):
        return key, {"kernel": 0.0}
    fn = _registry.get(func.overloadpacket, elementwise)
    return key, fn(func, _bind(func, args, kwargs), out)


def op_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype a profile keys an op on: that of its first tensor argument (None for factories)."""
    first = next(_tensors((args, kwargs)), None)
    return None if first is None else first.dtype


def launches_kernel(func: OpOverload | OpOverloadPacket | str) -> bool:
    """Whether an op runs any kernel; False for views, metadata changes and allocations (module doc)."""
    if isinstance(func, OpOverload):
        return _overload_launches(func)
    if isinstance(func, OpOverloadPacket):
        return _packet_launches(func)
    return _key_launches(func)


@functools.cache
def _key_launches(key: str) -> bool:
    packet = _packet(canonical_op(key))
    return packet is None or _packet_launches(packet)


# --- matmuls ---------------------------------------------------------------------------------------

# (left, right, bias) operand names; linear's weight is (n, k), every other right operand is (..., k, n).
_MATMUL_OPERANDS = {
    "mm": ("self", "mat2", None),
    "addmm": ("mat1", "mat2", "self"),
    "addmm_": ("mat1", "mat2", "self"),
    "bmm": ("self", "mat2", None),
    "baddbmm": ("batch1", "batch2", "self"),
    "baddbmm_": ("batch1", "batch2", "self"),
    "addbmm": ("batch1", "batch2", "self"),
    "matmul": ("self", "other", None),
    "linear": ("input", "weight", "bias"),
    "mv": ("self", "vec", None),
    "addmv": ("mat", "vec", "self"),
    "dot": ("self", "tensor", None),
    "vdot": ("self", "other", None),
    "_scaled_mm": ("self", "mat2", "bias"),
    "_scaled_mm_v2": ("self", "mat2", "bias"),
    "_int_mm": ("self", "mat2", None),
    "_grouped_mm": ("self", "mat2", "bias"),
    "_scaled_grouped_mm": ("self", "mat2", "bias"),
}


@register_features(*(getattr(aten, name) for name in _MATMUL_OPERANDS))
def matmul(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """m, n, k, batch, flops = 2·m·n·k·batch, bytes; leading dims of a left operand against a
    2-D right operand fold into m (one GEMM, as cuBLAS runs linear); a 3-D right operand batches."""
    left_name, right_name, bias_name = _MATMUL_OPERANDS[func.overloadpacket.__name__]
    left, right, bias = a[left_name], a[right_name], a.get(bias_name) if bias_name else None
    result = _first_tensor(out)
    k = left.shape[-1] if left.dim() else 1
    n = (right.shape[0] if left_name == "input" else result.shape[-1]) if right.dim() >= 2 else 1
    if right.dim() <= 2:
        m, batch = left.numel() // max(k, 1), 1
    else:
        m = left.shape[-2] if left.dim() >= 2 else 1
        batch = result.numel() // max(m * n, 1)
    return {
        "m": float(m),
        "n": float(n),
        "k": float(k),
        "batch": float(batch),
        "flops": 2.0 * m * n * k * batch,
        "bytes": float(_nbytes(left) + _nbytes(right) + _nbytes(bias) + _out_bytes(out)),
    }


# --- attention -------------------------------------------------------------------------------------

# Ops whose q / k / v are (batch, heads, seq, dim); the raw kernels below take (batch, seq, heads, dim).
_SDPA_LAYOUT = {
    aten.scaled_dot_product_attention,
    aten._scaled_dot_product_attention_math,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_fused_attention_overrideable,
}


@register_features(
    *_SDPA_LAYOUT, aten._flash_attention_forward, aten._efficient_attention_forward, key="revati::attention"
)
def attention(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """batch, heads, kv_heads, q_len, kv_len, head_dim, causal, flops, bytes.

    flops = 2·batch·heads·pairs·(head_dim + v_head_dim), pairs = (query, key) pairs attended:
    q_len·kv_len without a causal mask, about half of q_len² in causal prefill. The SDPA ops align
    the causal mask top-left (torch's documented is_causal); the raw flash / efficient kernels
    bottom-right (FlashAttention-2, custom_mask_type 2), so a chunk of new queries sees the whole
    cache. Variable-length calls (cum_seq_q) report the mean q_len and max_k as kv_len, since the
    sequence lengths are values. bytes count q, out and the K / V rows read, not a paged cache's
    whole pool.
    """
    q, k, v = a["query"], a["key"], a["value"]
    if func.overloadpacket in _SDPA_LAYOUT:
        q_len, head_dim, v_dim = q.shape[-2], q.shape[-1], v.shape[-1]
        heads, kv_heads = _dim(q, -3), _dim(k, -3)
        batch, kv_len = q.numel() // max(q_len * heads * head_dim, 1), k.shape[-2]
        causal, lower_right = bool(a.get("is_causal")), False
    else:
        heads, head_dim, kv_heads, v_dim = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
        cum_seq_q = a.get("cum_seq_q", a.get("cu_seqlens_q"))
        if cum_seq_q is not None:  # varlen: q is (total tokens, heads, dim)
            batch = max(cum_seq_q.shape[0] - 1, 1)
            q_len = q.shape[0] / batch
            kv_len = int(a.get("max_k", a.get("max_seqlen_k")) or k.shape[0])
        else:
            batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
        if a.get("block_table") is not None:  # paged: k is (blocks, block size, heads, dim)
            kv_len = int(a.get("max_k") or kv_len)
        mask_type = a.get("custom_mask_type", 0)
        causal, lower_right = bool(a.get("is_causal")) or mask_type in (1, 2), mask_type != 1
    mask = a.get("attn_mask", a.get("attn_bias", a.get("bias")))
    return attention_of(
        batch, heads, kv_heads, q_len, kv_len, head_dim, v_dim, causal=causal, lower_right=lower_right,
        kv_element_size=k.element_size(), other_bytes=_nbytes(q) + _nbytes(mask) + _out_bytes(out),
    )  # fmt: skip


def attention_of(
    batch: float,
    heads: float,
    kv_heads: float,
    q_len: float,
    kv_len: float,
    head_dim: float,
    v_dim: float,
    *,
    causal: bool,
    lower_right: bool,
    kv_element_size: int,
    other_bytes: float,
) -> Features:
    """Attention's features from its sizes (`attention`'s doc), for a kernel known by name rather than by
    an aten schema (a Triton attention launch); `other_bytes`: what it moves besides the K / V rows read."""
    pairs = _attended_pairs(q_len, kv_len, causal, lower_right)
    kv_bytes = batch * kv_heads * kv_len * (head_dim + v_dim) * kv_element_size
    return {
        "batch": float(batch),
        "heads": float(heads),
        "kv_heads": float(kv_heads),
        "q_len": float(q_len),
        "kv_len": float(kv_len),
        "head_dim": float(head_dim),
        "causal": float(causal),
        "flops": 2.0 * batch * heads * pairs * (head_dim + v_dim),
        "bytes": float(other_bytes + kv_bytes),
    }


def attention_over(features: Features, kv_len: float, kv_element_size: int) -> Features:
    """The same attention call's features over `kv_len` keys per sequence (a CUDA graph captured with one
    length, replayed over others): flops and the K / V bytes follow; the raw kernels' bottom-right mask."""
    batch, heads, kv_heads, q_len, old = (
        features[k] for k in ("batch", "heads", "kv_heads", "q_len", "kv_len")
    )
    causal = bool(features["causal"])
    old_pairs = _attended_pairs(q_len, old, causal, True)
    dims = features["flops"] / (2.0 * batch * heads * old_pairs) if old_pairs else 0.0  # head + value dims
    return {
        **features,
        "kv_len": float(kv_len),
        "flops": 2.0 * batch * heads * _attended_pairs(q_len, kv_len, causal, True) * dims,
        "bytes": features["bytes"] + batch * kv_heads * (kv_len - old) * dims * kv_element_size,
    }


def _attended_pairs(q_len: float, kv_len: int, causal: bool, lower_right: bool) -> float:
    if not causal:
        return q_len * kv_len
    if lower_right:  # query i sees keys up to kv_len - q_len + i
        if q_len <= kv_len:
            return q_len * kv_len - q_len * (q_len - 1) / 2
        return kv_len * (kv_len + 1) / 2
    if q_len <= kv_len:  # top-left: query i sees keys up to i
        return q_len * (q_len + 1) / 2
    return kv_len * (kv_len + 1) / 2 + (q_len - kv_len) * kv_len


# --- embedding, gathers and scatters ---------------------------------------------------------------


@register_features(aten.embedding)
def embedding(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """tokens, dim, bytes: the indices, plus each looked-up row read once and written once."""
    indices = a["indices"]
    return {
        "tokens": float(indices.numel()),
        "dim": float(a["weight"].shape[-1]),
        "bytes": float(_nbytes(indices) + 2 * _out_bytes(out)),
    }


@register_features(aten.index, aten.index_select, aten.gather)
def gather(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """numel, bytes: indices, plus each gathered element read once and written once (not the source)."""
    indices = [t for name, t in a.items() if name != "self" for t in _tensors(t)]
    return {
        "numel": float(_numel(out)),
        "bytes": float(sum(_nbytes(t) for t in indices) + 2 * _out_bytes(out)),
    }


@register_features(aten.index_put_, aten.index_copy_, aten.index_add_, aten.scatter_, aten.scatter_add_)
def scatter(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """numel, bytes for in-place scatters (a KV-cache write): indices, plus updates read and written."""
    updates = a.get("values", a.get("source", a.get("src")))
    indices = a.get("indices", a.get("index"))
    index_tensors = list(_tensors(indices))
    if isinstance(updates, torch.Tensor):
        numel, update_bytes = updates.numel(), _nbytes(updates)
    else:  # scatter_.value: a scalar written at every index
        numel = max((t.numel() for t in index_tensors), default=0)
        update_bytes = numel * a["self"].element_size()
    return {
        "numel": float(numel),
        "bytes": float(sum(_nbytes(t) for t in index_tensors) + 2 * update_bytes),
    }


# --- copies ----------------------------------------------------------------------------------------


@register_features(aten.copy_, aten._to_copy, aten.clone, aten._copy_from, aten.lift_fresh_copy)
def copy(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """numel, bytes (source read + destination written), cross_device: 1 for a host <-> device copy."""
    source = a.get("src", a.get("self"))
    destination = _first_tensor(out) if out is not None else a.get("dst")
    devices = {t.device.type for t in (source, destination) if isinstance(t, torch.Tensor)}
    return {
        "numel": float(source.numel()),
        "bytes": float(_nbytes(source) + _nbytes(destination)),
        "cross_device": float(len(devices) > 1),
    }


# --- norms and softmax -----------------------------------------------------------------------------


@register_features(aten.rms_norm, aten._fused_rms_norm, aten.native_layer_norm, aten.layer_norm)
def norm(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """rows, dim (normalized size), bytes."""
    x = a["input"]
    dim = math.prod(a["normalized_shape"])
    return {
        "rows": float(x.numel() // max(dim, 1)),
        "dim": float(dim),
        "bytes": float(_nbytes(x) + _nbytes(a.get("weight")) + _nbytes(a.get("bias")) + _out_bytes(out)),
    }


@register_features(aten._softmax, aten._log_softmax, aten._safe_softmax, aten.softmax, aten.log_softmax)
def softmax(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """rows, dim (softmax length), numel, bytes."""
    x = a["self"]
    dim = x.shape[a["dim"]] if x.dim() else 1
    return {
        "rows": float(x.numel() // max(dim, 1)),
        "dim": float(dim),
        "numel": float(x.numel()),
        "bytes": float(_nbytes(x) + _out_bytes(out)),
    }


# --- collectives -----------------------------------------------------------------------------------


def _ops(namespace: str, *names: str) -> list[OpOverloadPacket]:
    # c10d ops exist only where torch was built with distributed support.
    ns = getattr(torch.ops, namespace)
    return [getattr(ns, name) for name in names if hasattr(ns, name)]


@register_features(
    *_ops("c10d", "allreduce_", "allreduce_coalesced_"),
    *_ops("_c10d_functional", "all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_"),
    key="revati::all_reduce",
)
@register_features(
    *_ops("c10d", "_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_"),
    *_ops("_c10d_functional", "all_gather_into_tensor", "all_gather_into_tensor_coalesced"),
    key="revati::all_gather",
)
@register_features(
    *_ops("c10d", "_reduce_scatter_base_", "reduce_scatter_", "reduce_scatter_tensor_coalesced_"),
    *_ops("_c10d_functional", "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"),
    key="revati::reduce_scatter",
)
@register_features(
    *_ops("c10d", "alltoall_base_", "alltoall_"),
    *_ops("_c10d_functional", "all_to_all_single"),
    key="revati::all_to_all",
)
@register_features(
    *_ops("c10d", "broadcast_"), *_ops("_c10d_functional", "broadcast"), key="revati::broadcast"
)
@register_features(*_ops("c10d", "reduce_", "barrier"), key="revati::reduce")
@register_features(*_ops("c10d", "gather_"), key="revati::gather")
@register_features(*_ops("c10d", "scatter_"), key="revati::scatter")
@register_features(*_ops("c10d", "send", "recv_", "recv_any_source_"), key="revati::send_recv")
def collective(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """bytes: the full-size side (all-gather's output, reduce-scatter's input); group_size where visible
    (the emulator's process group adds `nodes`, the nodes the group spans)."""
    sides = [sum(_nbytes(t) for t in _tensors(value)) for value in a.values()] + [_out_bytes(out)]
    features = {"bytes": float(max(sides))}
    size = _group_size(a)
    if size is not None:
        features["group_size"] = float(size)
    return features


def _group_size(a: dict[str, Any]) -> int | None:
    try:
        if a.get("group_size") is not None:
            return int(a["group_size"])
        if a.get("process_group") is not None:  # c10d ops carry the group as a boxed ScriptObject
            return int(torch.distributed.ProcessGroup.unbox(a["process_group"]).size())
        if a.get("group_name") is not None:
            from torch.distributed.distributed_c10d import _resolve_process_group

            return int(_resolve_process_group(a["group_name"]).size())
    except (RuntimeError, ValueError, AttributeError):  # a group this process cannot see: size unknown
        return None
    return None


# --- fallback: elementwise, reductions and anything unknown ----------------------------------------


def elementwise(func: OpOverload, a: dict[str, Any], out: Any) -> Features:
    """numel of the largest input or output, bytes = distinct input bytes + output bytes."""
    inputs = [t for name, value in a.items() if name != "out" for t in _tensors(value)]
    outputs = list(_tensors(out))
    return {
        "numel": float(max((t.numel() for t in inputs + outputs), default=0)),
        "bytes": float(sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)),
    }


# --- no-kernel rule --------------------------------------------------------------------------------

# Composites whose output aliases the input when it can and is a copy otherwise: decided per call.
_MAY_ALIAS = {aten.reshape, aten.reshape_as, aten.contiguous, aten.to, aten.flatten}
# By name: some of these register only when their Python module is imported.
_NO_KERNEL = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::empty_permuted",
    "aten::_unsafe_view",  # a view whose schema does not say so (autograd treats its output as new)
    "aten::record_stream",
    "aten::_assert_tensor_metadata",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
    "aten::sym_storage_offset",
    "_c10d_functional::wait_tensor",  # a stream wait, not a kernel
    "_c10d_functional::_wrap_tensor_autograd",
}


@functools.cache
def _overload_launches(func: OpOverload) -> bool:
    if func._schema.name in _NO_KERNEL or torch.Tag.inplace_view in func.tags:
        return False
    if func.overloadpacket in _MAY_ALIAS:
        return True
    returns = func._schema.returns
    aliases_only = bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )
    return not aliases_only


@functools.cache
def _packet_launches(packet: OpOverloadPacket) -> bool:
    # TorchScript builtins share names with aten ops (split.str, add.int): only tensor overloads count.
    overloads = [getattr(packet, name) for name in packet.overloads()]
    tensor_overloads = [op for op in overloads if any("Tensor" in str(x.type) for x in op._schema.arguments)]
    return any(_overload_launches(op) for op in tensor_overloads or overloads)


def _packet(key: str) -> OpOverloadPacket | None:
    ns, _, name = key.partition("::")
    try:
        packet = getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return None
    return packet if isinstance(packet, OpOverloadPacket) else None


# --- metadata helpers ------------------------------------------------------------------------------


def _bind(func: OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = {}
    for i, param in enumerate(func._schema.arguments):
        if i < len(args) and not param.kwarg_only:
            bound[param.name] = args[i]
        elif param.name in kwargs:
            bound[param.name] = kwargs[param.name]
        else:
            bound[param.name] = param.default_value if param.has_default_value() else None
    return bound


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _first_tensor(value: Any) -> torch.Tensor:
    return next(_tensors(value))


def _nbytes(t: Any) -> int:
    """Bytes of the distinct elements a tensor addresses: a broadcast (stride 0) dim is read once."""
    if not isinstance(t, torch.Tensor):
        return 0
    try:
        strides = t.stride()
    except RuntimeError:  # sparse and other layouts without strides
        return t.numel() * t.element_size()
    distinct = 1
    for size, stride in zip(t.shape, strides, strict=True):
        if size == 0:
            return 0
        if stride != 0:
            distinct *= size
    return distinct * t.element_size()


def _out_bytes(out: Any) -> int:
    return sum(_nbytes(t) for t in _tensors(out))


def _numel(out: Any) -> int:
    return sum(t.numel() for t in _tensors(out))


def _dim(t: torch.Tensor, index: int) -> int:
    return t.shape[index] if t.dim() >= -index else 1


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage()._cdata == b.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # subclasses without a storage: assume a copy
        return False


# --- features of a trace row -------------------------------------------------------------------------

_SCALAR_TYPES = ("Scalar", "int", "float", "bool", "SymInt", "number")
_overload_that_took: dict[tuple, str] = {}  # (key, tensors, scalar types) -> the overload last accepted


@functools.lru_cache(maxsize=65_536)
def row_features(key: str, shapes: tuple, dtypes: tuple, scalars: str | None) -> tuple[Features, bool]:
    """Features of an op from a trace row: its key, input shapes and dtypes, and scalars as written.

    Meta tensors stand in for the inputs, and the op's own registry function runs on them, so a recorded
    row and an emulated call of the same op get the same features. Returns (features, exact): exact is
    False when no overload of the op accepted the row (ops whose list arguments the trace does not keep),
    and the features are then the elementwise fallback on the inputs alone.
    Shapes and dtypes are tuples (hashable: results are cached per row signature).
    """
    if not launches_kernel(key):
        return {"kernel": 0.0}, True
    if op_family(key) == "collective":
        return _collective_row(shapes, dtypes, scalars)
    metas = [_meta(s, d) for s, d in zip(shapes, dtypes, strict=False)]
    values = _parse_scalars(scalars)
    if key == "revati::attention":
        return _attention_row(metas, values), True
    packet = _packet(key)
    overloads = packet.overloads() if packet is not None else []
    shape_of_call = (key, len(metas), tuple(type(v).__name__ for v in values))
    last = _overload_that_took.get(shape_of_call)
    if last is not None:  # rows of one op usually take the overload the previous row took: try it first
        overloads = [last, *(name for name in overloads if name != last)]
    for name in overloads:
        func = getattr(packet, name)
        args = _row_args(func, metas, values)
        if args is None:
            continue
        try:
            with torch.no_grad():
                out = func(*args)
        except Exception:  # noqa: BLE001 - this overload does not take the row; try the next
            continue
        _overload_that_took[shape_of_call] = name
        return op_features(func, tuple(args), {}, out)[1], True
    inputs = {f"input{i}": t for i, t in enumerate(metas)}
    return elementwise(aten.add.Tensor, inputs, None), False


def _collective_row(shapes: tuple, dtypes: tuple, scalars: str | None) -> tuple[Features, bool]:
    """A collective's row: its scalars hold its features as a JSON object (bytes, group_size, nodes), which
    shapes alone cannot tell; without them, the bytes of its tensors (exact: False)."""
    try:
        features = json.loads(scalars) if scalars else None
    except ValueError:
        features = None
    if isinstance(features, dict) and "bytes" in features:
        return {k: float(v) for k, v in features.items()}, True
    metas = [_meta(s, d) for s, d in zip(shapes, dtypes, strict=False)]
    return {"bytes": float(sum(_nbytes(t) for t in metas))}, False


def _meta(shape, dtype: str) -> torch.Tensor:
    dt = getattr(torch, dtype, None)
    return torch.empty(list(shape), dtype=dt if isinstance(dt, torch.dtype) else torch.float32, device="meta")


def _parse_scalars(text: str | None) -> list:
    if not text:
        return []
    import ast

    # repr() writes infinities and NaN as names, which literal_eval refuses: spell them as literals
    text = re.sub(r"\binf\b", "1e999", re.sub(r"\bnan\b", "None", text))
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return list(values) if isinstance(values, (list, tuple)) else []


def _row_args(func: OpOverload, metas: list[torch.Tensor], values: list) -> list | None:
    """Positional arguments for `func` from a row's tensors (in order) and scalars (in order), or None."""
    tensors, scalars, args = list(metas), list(values), []
    for param in func._schema.arguments:
        if param.kwarg_only:
            break
        optional = isinstance(param.type, torch.OptionalType)
        kind = str(param.type.getElementType() if optional else param.type)
        if kind == "Tensor":
            if tensors:
                args.append(tensors.pop(0))
            elif optional:
                args.append(None)
            else:
                return None
        elif kind in ("Tensor[]", "List[Tensor]", "List[Optional[Tensor]]", "Optional[Tensor][]"):
            args.append(tensors)
            tensors = []
        elif kind in _SCALAR_TYPES:
            if scalars and not isinstance(scalars[0], (list, str)):
                args.append(scalars.pop(0))
            elif param.has_default_value():
                args.append(param.default_value)
            else:
                return None
        elif param.has_default_value():
            args.append(param.default_value)
        else:
            return None
    return args if not tensors else None


def _attention_row(metas: list[torch.Tensor], values: list) -> Features:
    """Dispatch-level attention rows are the SDPA variants: q, k, v (batch, heads, seq, dim), then an
    optional mask; causal when a scalar says True (inference passes no other True flag)."""
    q, k, v = metas[:3]
    bound = {"query": q, "key": k, "value": v, "attn_mask": metas[3] if len(metas) > 3 else None}
    bound["is_causal"] = any(x is True for x in values)
    return attention(aten.scaled_dot_product_attention.default, bound, torch.empty_like(q))
