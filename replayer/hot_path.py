"""The hot path in C++ (hot_path.cpp): an op whose signature is cached runs without entering Python.

The common ops are registered on the Python dispatch key in place of PyTorch's Python fallback. A call keys
itself on its arguments in C++; on a hit it makes its output there: the wrapper tensor, its storage (the C
twin of `memory.Storage`, counted against the C twin of `memory.Counts`) and, for a small result of inputs
that all hold a value or a view of a tensor that holds one, its value (the CPU op run on the inputs'
values). It then calls `Dispatcher.account` for the clock. On a miss it goes to
`VTensor.__torch_dispatch__` as before, whose generic path offers what it decided (`Dispatcher.offer`). A
cached op costs ~2.8 µs here against ~6 µs in Python (an add on this 2-core VM; the plain CPU op: ~1.8 µs):
the serving code of the leanest engines issues an op every few µs. Without a compiler or Python's headers,
or with `REVATI_HOT_PATH=0`, every op is emulated in Python, with the same results.
"""

from __future__ import annotations

import os

import torch

from replayer import dispatch, memory, native
from replayer.tensor import VTensor

aten = torch.ops.aten

# Ops whose outputs are mostly new tensors or views: what a model's layers issue, and the small computations
# on tensors with values around them.
OPS = (
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar,
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.tanh.default, aten.neg.default,
    aten.exp.default, aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default,
    aten.cos.default, aten.sin.default, aten.mean.dim, aten.sum.dim_IntList, aten.amax.default,
    aten._softmax.default, aten.where.self, aten.cat.default, aten.embedding.default,
    aten.index_select.default,
    aten.clone.default, aten._unsafe_view.default, aten.view.default, aten.t.default, aten.transpose.int,
    aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
    aten.permute.default, aten.alias.default, aten.detach.default, aten.as_strided.default,
    aten._to_copy.default,
    # what serving code computes on small tensors with values: masks, stopping criteria
    aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor, aten.lt.Scalar, aten.le.Scalar,
    aten.gt.Scalar, aten.ge.Scalar, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default,
    aten.logical_not.default, aten.max.default, aten.min.default, aten.any.default, aten.all.default,
    aten.cumsum.default, aten.masked_fill.Scalar,
)  # fmt: skip

_registered: set[int] | None = None  # ids of the ops routed through C++ in this process

# The library, built first if needed; None where it cannot be (why: `unavailable()`).
load = native.load_hot_path
unavailable = native.hot_path_unavailable


def makes_outputs() -> bool:
    """Whether the hot path makes its outputs' wrappers itself, rather than through
    `_make_wrapper_subclass` (a torch whose headers lack `THPVariable_Wrap(tensor, type)`)."""
    lib = load()
    return lib is not None and lib.revati_hot_wraps() == 1


def enable(dispatcher) -> bool:
    """Route the registered ops of this process to `dispatcher` through C++; False where it is not built."""
    global _registered
    if os.environ.get("REVATI_HOT_PATH", "1") == "0":
        return False
    lib = load()
    if lib is None or memory.Storage is memory.PyStorage:  # new outputs' storages: the library's C ones
        return False
    if _registered is None:  # once per process: a registration lasts as long as the process
        _registered = set()
        special_ids = dispatch.special_ids()
        for op in OPS:
            if id(op) in special_ids:  # an op with rules of its own stays in Python
                continue
            schema = op._schema
            if lib.revati_hot_register(schema.name.encode(), schema.overload_name.encode(), op) == 1:
                _registered.add(id(op))
    dispatcher.hot_ids = _registered
    make = torch.Tensor._make_wrapper_subclass
    account, value = dispatcher.account, dispatcher.account_value
    lib.revati_hot_enable(VTensor, make, account, value, dispatcher.emu.clock, dispatcher.offer)
    return True


def disable() -> None:
    lib = native.load_hot_path()
    if lib is not None:
        lib.revati_hot_disable()


def served() -> int:
    """Calls the hot path has served itself in this process so far."""
    lib = native.load_hot_path()
    return lib.revati_hot_hits() if lib is not None else 0
