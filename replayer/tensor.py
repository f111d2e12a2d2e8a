"""Virtual tensors: device `cuda`, shape and dtype of a real tensor, no data — sometimes a shadow value.

A `VTensor` is a wrapper subclass reporting `cuda:N`. It holds a `Storage` (bytes counted by the
virtual allocator, shared by views) and, when known, a shadow value: a real CPU tensor with the same
shape, kept when every input had a value and the result is small (token ids, positions, masks, block
tables). Everything else is metadata computed once per op signature on the meta device and cached.
"""

from __future__ import annotations

import copy
import itertools

import torch

from replayer.memory import Borrowed, Storage

# Shadow values are kept up to these sizes (elements): ints and bools drive control flow and are
# cheap; floats rarely matter and cost real CPU time to compute.
INT_VALUE_LIMIT = 1 << 20
FLOAT_VALUE_LIMIT = 1 << 12

_INTEGRAL = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


def value_allowed(dtype: torch.dtype, numel: int) -> bool:
    """Whether a tensor of this dtype and size keeps a shadow value."""
    return numel <= (INT_VALUE_LIMIT if dtype in _INTEGRAL else FLOAT_VALUE_LIMIT)


class VTensor(torch.Tensor):
    """A tensor on the virtual CUDA device: metadata, a virtual storage, maybe a shadow value."""

    _d: Meta  # interned metadata: the tensor's part of an op's cache key
    _vstorage: Storage
    _value: torch.Tensor | None

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, *args, **kwargs):
        raise TypeError("VTensors are made by the emulator (replayer.tensor.make), not constructed directly")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs)

    def __repr__(self, *, tensor_contents=None):
        value = self.value()
        body = f"{value.tolist()}, " if value is not None and value.numel() <= 16 else ""
        return f"tensor({body}size={tuple(self.shape)}, dtype={self.dtype}, device='{self.device}')"

    def value(self) -> torch.Tensor | None:
        """The shadow value, or None when the contents are unknown."""
        if self._value is not None and self._vstorage.value is not None:
            return self._value
        return None

    def tolist(self):
        return self.cpu().tolist()

    # Autograd, which runs before any Python dispatch, gives every view of a tensor subclass a function that
    # replays it, chained onto its base's and copied whole at each new view. Serving code that keeps
    # slicing one tensor (SGLang's free-slot list: `free = free[n:]` at every step) pays for the chain's
    # length at every slice: 0.9 ms a slice after 3,000 of them, 18 s of an 8B run. Serving code takes no
    # gradients, so a view is indexed below autograd's view tracking: the same memory, no chain.
    def __getitem__(self, index):
        if self._is_view():
            with _BelowViewTracking():
                return _getitem(self, index)
        return _getitem(self, index)

    def __setitem__(self, index, value):
        if self._is_view():
            with _BelowViewTracking():
                return _setitem(self, index, value)
        return _setitem(self, index, value)

    def numpy(self, *, force: bool = False):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def __reduce_ex__(self, proto):
        raise TypeError("virtual tensors cannot be pickled: they hold no data")

    def __deepcopy__(self, memo):
        """A copy in new device memory, as `copy.deepcopy` makes on a GPU (serving code copies modules): the
        same metadata, a new storage counted against the same allocator (one per storage copied, so views
        copied together still share theirs), the value copied, the tensor's own attributes copied."""
        if id(self) in memo:
            return memo[id(self)]
        old = self._vstorage
        storage = memo.get(id(old))
        if storage is None:
            counts = old._allocator if isinstance(old, Storage) else None  # a weak view's copy owns nothing
            storage = Storage(old.nbytes, counts, True if old.value is not None else None)
            memo[id(old)] = storage
        value = copy.deepcopy(self._value, memo) if self._value is not None else None
        new = make(self._d, self.device, storage, value)
        if self.requires_grad:
            new.requires_grad_(True)
        for name, attr in self.__dict__.items():
            if name not in _OWN:
                setattr(new, name, copy.deepcopy(attr, memo))
        memo[id(self)] = new
        return new

    # `module.to(dtype)` assigns `param.data`; that swaps the C++ metadata only, so follow along here.
    @property
    def data(self):
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, new):
        torch._C.TensorBase.data.__set__(self, new)
        if isinstance(new, VTensor):
            self._d, self._vstorage, self._value = new._d, new._vstorage, new._value


_OWN = ("_d", "_vstorage", "_value")  # what `make` sets: a copy gets its own
_getitem, _setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__
_BelowViewTracking = torch._C._AutoDispatchBelowADInplaceOrView
_wrap = torch.Tensor._make_wrapper_subclass
_STRIDED = torch.strided


def _no_emulator(func, args, kwargs):
    raise RuntimeError(
        f"revati: {func} on a virtual CUDA tensor, but no emulator is active (it was deactivated)"
    )


# Set by the active emulator: where every op on a virtual tensor goes.
_dispatch = _no_emulator


def set_dispatch(fn, torch_dispatch=None) -> None:
    """Route ops on virtual tensors to `fn(func, args, kwargs)`; `torch_dispatch(func, types, args, kwargs)`,
    when given, is installed as `VTensor.__torch_dispatch__` itself, sparing a call per op."""
    global _dispatch
    _dispatch = fn if fn is not None else _no_emulator
    VTensor.__torch_dispatch__ = (
        staticmethod(torch_dispatch) if torch_dispatch is not None else _DEFAULT_DISPATCH
    )


_DEFAULT_DISPATCH = VTensor.__dict__["__torch_dispatch__"]


class Meta:
    """Interned tensor metadata, one object per (shape, stride, offset, dtype, storage size).

    An op's cache key holds its tensors' numbers: `n`, one per Meta, or `loose`, one per shape, stride and
    dtype (the same wherever the tensor starts in its memory). Keys of plain numbers are left alone by the
    garbage collector's scans, and there is one key per op signature seen, many in a long run."""

    __slots__ = ("shape", "stride", "offset", "dtype", "nbytes", "numel", "n", "loose")

    _interned: dict[tuple, Meta] = {}
    _loose: dict[tuple, int] = {}
    _numbers = itertools.count()

    def __init__(self, shape, stride, offset, dtype, nbytes):
        self.shape, self.stride, self.offset, self.dtype, self.nbytes = shape, stride, offset, dtype, nbytes
        self.numel = torch.Size(shape).numel()
        self.n = next(Meta._numbers)
        self.loose = Meta.number(tuple(shape), stride, dtype)

    @classmethod
    def number(cls, shape: tuple, stride: tuple, dtype: torch.dtype) -> int:
        """The number of a shape, stride and dtype: a tensor's part of a key that leaves out where it starts
        (a length of -1: any length along that dimension)."""
        return cls._loose.setdefault((shape, stride, dtype), len(cls._loose))

    @classmethod
    def of(cls, shape, stride, offset: int, dtype: torch.dtype, nbytes: int) -> Meta:
        key = (tuple(shape), tuple(stride), offset, dtype, nbytes)
        m = cls._interned.get(key)
        if m is None:
            m = cls(torch.Size(shape), tuple(stride), offset, dtype, nbytes)
            cls._interned[key] = m
        return m

    @classmethod
    def of_tensor(cls, t: torch.Tensor) -> Meta:
        return cls.of(t.shape, t.stride(), t.storage_offset(), t.dtype, t.untyped_storage().nbytes())


def make(meta: Meta, device: torch.device, storage: Storage, value: torch.Tensor | None) -> VTensor:
    """A VTensor with `meta`'s metadata over `storage`, with a shadow value or None."""
    # Positional arguments: the keyword form costs ~1.3 µs more per op in the argument parser.
    t = _wrap(VTensor, meta.shape, meta.stride, meta.offset, None, meta.dtype, _STRIDED, device)
    t._d = meta
    t._vstorage = storage
    t._value = value
    return t


def weak_view(t: torch.Tensor) -> torch.Tensor:
    """`t` again, over its memory but not keeping it allocated: a weak reference to GPU memory, as
    sgl_kernel.weak_ref_tensor makes (SGLang's breakable CUDA graphs hand these to eager break points)."""
    if type(t) is not VTensor:
        return t
    return make(t._d, t.device, Borrowed(t._vstorage), t._value)


def meta_of(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with `t`'s shape, strides, offset and dtype (over a storage as large as t's)."""
    if isinstance(t, VTensor):
        elems = max(t._vstorage.nbytes // t.element_size(), 1)
        base = torch.empty(elems, dtype=t.dtype, device="meta")
        return base.as_strided(t.shape, t.stride(), t.storage_offset())
    return t.to("meta")
