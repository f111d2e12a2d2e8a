"""Op interception: every aten op on a virtual tensor, and every factory call on `cuda`, lands here.

The hot path is a dictionary hit: an op's signature (op, shapes, strides, dtypes, scalars) maps to
what the op returns (metadata, aliasing), its predicted device time and host cost, all computed once
on the meta device. Values are computed for real, on the CPU, only when every input has one and the
result is small.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch._ops import OpOverload

from replayer.memory import Storage
from replayer.tensor import _INTEGRAL, _STRIDED, Meta, VTensor, _wrap, make, meta_of, value_allowed
from revati.op_features import op_dtype, op_features

if TYPE_CHECKING:
    from collections.abc import Callable

    from replayer.session import Emulator

aten = torch.ops.aten
_Tensor = torch.Tensor
_META = torch.device("meta")
_ATTENTION = "revati::attention"
_CPU = torch.device("cpu")

# Ops whose first argument is only written: its old contents do not matter.
_OVERWRITES = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}
# Ops that only allocate: uninitialised memory on the GPU, whose value starts as zeros here (as that of `cuda`
# factories does) so that it is the same at every run; a graph replay allocates nothing again.
_ALLOCATIONS = {aten.empty_like.default, aten.new_empty.default, aten.new_empty_strided.default}
# Index-producing ops: output position -> where the vocabulary size comes from.
_TOKEN_OPS = {aten.argmax.default: 0, aten.multinomial.default: 0, aten.topk.default: 1, aten.max.dim: 1}


class DataDependentError(RuntimeError):
    """An op whose output shape depends on values that no virtual tensor holds."""


@dataclass(eq=False)
class Signature:
    """What one op signature does: its outputs, cost and aliasing; computed once, then cached."""

    key: str
    duration: float
    host: float
    outs: list  # per output: None | ("self", arg) | ("view", arg, Meta) | ("new", Meta) | ("const", value)
    kind: type | None  # None: a single tensor; tuple / list: a sequence of outputs
    mutated: tuple  # argument references written by the op
    names: list  # the schema's argument names, to find arguments by reference
    value_ok: bool  # every output is small enough to keep a value
    fast: Meta | None  # the one new output of a plain op that keeps no value: the hot path
    fast_view: Meta | None  # the one output of a view of args[0], when args[0] has no value
    small_new: Meta | None = None  # like `fast`, for a small output: fast only when some input lacks a value
    # Tuples, not lists: one signature per shape seen makes them many, and a tuple of numbers or strings
    # leaves the garbage collector's scans (full collections took 4.7 s of a 35 s 8B run over lists).
    input_shapes: tuple = ()
    input_dtypes: tuple = ()
    scalars: str | None = None
    sig_id: int = 0
    extrapolated: bool = False
    per_request: float = 0.0  # host seconds per request in the engine step (`_host_per_request`)


def _schema_refs(func: OpOverload):
    """For each return: the argument it aliases and whether it writes it; and the written arguments."""
    schema = func._schema
    args = schema.arguments
    refs = []
    for ret in schema.returns:
        ref = None
        if ret.alias_info is not None:
            # A list of views (`Tensor(a)[]`: unbind, split, chunk) shows no alias set from Python; it views
            # the argument that aliases into the wildcard (`Tensor(a -> *) self`).
            sets = ret.alias_info.before_set
            for i, a in enumerate(args):
                if a.alias_info is not None and (
                    (a.alias_info.before_set & sets) or (not sets and "*" in a.alias_info.after_set)
                ):
                    ref = (i if not a.kwarg_only else a.name, bool(ret.alias_info.is_write))
                    break
        refs.append(ref)
    written = tuple(
        i if not a.kwarg_only else a.name
        for i, a in enumerate(args)
        if a.alias_info is not None and a.alias_info.is_write
    )
    return refs, written, [a.name for a in args]


def _arg(ref, args, kwargs, names):
    if isinstance(ref, int):
        return args[ref] if ref < len(args) else kwargs.get(names[ref])
    return kwargs.get(ref)


_INDEX_SELECT = aten.index_select.default


def _describe(x, parts, tensors, loose: bool = False):
    """Append x's part of a cache key: a tensor's interned metadata (its number; `loose`: its shape's),
    a list's items, a scalar itself."""
    if type(x) is VTensor:
        tensors.append(x)
        parts.append(x._d.loose if loose else x._d.n)
    elif isinstance(x, _Tensor):
        tensors.append(x)
        parts.append((x.dtype, x.shape, x.stride(), x.storage_offset(), x.device.type))
    elif isinstance(x, (list, tuple)):
        parts.append(len(x))
        for e in x:
            _describe(e, parts, tensors, loose)
    else:
        parts.append(x)


def _loose_key(func: OpOverload, args: tuple, kwargs: dict) -> tuple:
    """A call's cache key with each virtual tensor's shape, stride and dtype, not where it starts; for a
    gather along a dimension, not the source's length along it either (HF's paged cache hands each layer
    a view of the pool shifted to that layer: as many lengths as layers, one output)."""
    parts: list = [id(func)]
    if func is _INDEX_SELECT and len(args) > 1 and type(args[0]) is VTensor and type(args[1]) is int:
        m, dim = args[0]._d, args[1] % max(len(args[0]._d.shape), 1)
        shape = (*m.shape[:dim], -1, *m.shape[dim + 1 :])
        parts.append(Meta.number(shape, m.stride, m.dtype))
        args = args[1:]
    for a in args:
        _describe(a, parts, [], loose=True)
    for k, v in kwargs.items():
        parts.append(k)
        _describe(v, parts, [], loose=True)
    return tuple(parts)


_PLAIN = (int, float, bool, type(None), str, torch.dtype)
_ZEROS = "zeros"  # a factory's value: zeros (uninitialised integer memory)
_RUN = "run"  # a factory's value: the factory run on the CPU
_NO_KWARGS: dict = {}


class Dispatcher:
    """Runs aten ops on virtual tensors for one emulator."""

    def __init__(self, emu: Emulator):
        self.emu = emu
        self.device = emu.device
        self.counts = emu.allocator.counts  # what a new storage counts itself against
        self.cache: dict[tuple, Signature] = {}
        self.loose: dict[tuple, Signature] = {}  # signatures of ops that view no argument, keyed sans offsets
        self.signatures: list[Signature] = []
        self.unfitted: set[str] = set()  # op keys priced without a model fitted for them (family, roofline)
        self._schemas: dict[OpOverload, tuple] = {}
        self._factories: dict[tuple, tuple] = {}  # factory call signature -> (Meta, device, fill)
        self.ops = 0
        self.misses = 0
        self.value_ops = 0
        # The C++ hot path (replayer.hot_path): the ops routed through it, and what the generic path decided
        # for the call it sent here, for it to serve the next such call itself.
        self.hot_ids: set[int] = set()
        self.offer: list = []

    # -- entry points ----------------------------------------------------------------------------

    def _priced(self, key: str, dtype, duration: float) -> None:
        fits = getattr(self.emu.cost, "fits", None)  # a fitted profile says; the roofline fits nothing
        if duration > 0 and (fits is None or not fits(key, dtype)):
            self.unfitted.add(key)

    def dispatch(self, func: OpOverload, args: tuple, kwargs: dict | None) -> Any:
        """Every op on a virtual tensor: a few have their own rules, the rest take the generic path."""
        return self.torch_dispatch(func, None, args, kwargs)

    def torch_dispatch(self, func: OpOverload, types, args: tuple = (), kwargs: dict | None = None) -> Any:
        """`VTensor.__torch_dispatch__` while this dispatcher's emulator is active (one call level less)."""
        special = _SPECIAL_IDS.get(id(func))
        if special is not None:
            return special(self, func, args, kwargs or {})
        if func.namespace in _COLLECTIVE_NAMESPACES:
            return _collective(self, func, args, kwargs or {})
        return self.run(func, args, kwargs or _NO_KWARGS)

    def run(self, func: OpOverload, args: tuple, kwargs: dict) -> Any:
        """The generic path: cached signature, outputs, clock."""
        parts: list = [id(func)]  # OpOverload hashes in Python; its id is as unique (overloads live forever)
        tensors: list = []
        for a in args:
            if type(a) is VTensor:
                tensors.append(a)
                parts.append(a._d.n)
            elif type(a) in _PLAIN:
                parts.append(a)
            else:
                _describe(a, parts, tensors)
        if kwargs:
            for k, v in kwargs.items():
                parts.append(k)
                _describe(v, parts, tensors)
        key = tuple(parts)
        sig = self.cache.get(key)
        if sig is None:
            if _composite(func):  # reaches here only in inference mode, where autograd does not decompose it
                _SPECIAL_IDS[id(func)] = _decomposed
                return _decomposed(self, func, args, kwargs)
            if _implemented_in_python(func):
                _SPECIAL_IDS[id(func)] = _python_kernel
                return _python_kernel(self, func, args, kwargs)
            # Where an op views no argument, what it does depends on its arguments' shapes, not on where
            # they start in their memory (engines hand each layer a view of one pool): its signature is
            # filed under a key without offsets too (`_loose_key`).
            loose = _loose_key(func, args, kwargs)
            sig = self.loose.get(loose)
            if sig is None:
                clock = self.emu.clock
                clock.hold()
                try:
                    sig = self._signature(func, args, kwargs, tensors)
                    if sig is None:  # data-dependent output shape: no caching possible
                        return self._dynamic(func, args, kwargs, tensors)
                finally:
                    clock.release()
                if not any(o is not None and o[0] == "view" for o in sig.outs):
                    self.loose[loose] = sig
            self.cache[key] = sig
        self.ops += 1
        meta = sig.fast  # one new output, no value: most kernels
        if meta is None and sig.small_new is not None and not _all_valued(tensors):
            meta = sig.small_new  # small, but nothing to compute it from
        if meta is not None:
            out = _wrap(
                VTensor, meta.shape, meta.stride, meta.offset, None, meta.dtype, _STRIDED, self.device
            )
            out._d = meta
            out._vstorage = Storage(meta.nbytes, self.counts, None)
            out._value = None
            if id(func) in self.hot_ids and sig.key != _ATTENTION:
                # a small output is made without a value only while some input has none
                self._offer(func, sig, meta, (meta.nbytes, self.counts, None), meta is sig.small_new)
        else:
            meta = sig.fast_view
            base = args[0] if meta is not None else None
            if (
                meta is not None
                and type(base) is VTensor
                and (
                    base._value is None
                    or (sig.value_ok and base._vstorage.value is not None and len(tensors) == 1)
                )
            ):  # a view of no value, or of a known one: the same view of the value (its memory, replays too)
                if base._value is None:
                    value = None
                else:
                    self.value_ops += 1
                    value = func(base._value, *args[1:], **kwargs)
                wrap = _wrap if not _inference_mode() or base.is_inference() else _wrap_outside_inference
                out = wrap(
                    VTensor, meta.shape, meta.stride, meta.offset, None, meta.dtype, _STRIDED, self.device
                )
                out._d = meta
                out._vstorage = base._vstorage
                out._value = value
                if id(func) in self.hot_ids and sig.key != _ATTENTION:
                    self._offer(func, sig, meta, None, sig.value_ok and len(tensors) == 1)
            else:
                out = self._outputs(sig, func, args, kwargs, tensors)
        stream = self.emu.account(sig)
        if stream < 0 and sig.key == _ATTENTION:  # captured into a CUDA graph: see Graph.follow
            self._follow_lengths(sig, func, args, kwargs, sig.duration * self.emu.wake)
        return out

    def account(self, sig: Signature) -> None:
        """One op run outside the generic path (by the C++ hot path, a kernel launched outside aten):
        counted, on the clock, logged."""
        self.ops += 1
        self.emu.account(sig)

    def account_value(self, sig: Signature) -> None:
        """`account`, for an op whose value the C++ hot path computed."""
        self.value_ops += 1
        self.account(sig)

    def _offer(self, func, sig: Signature, meta: Meta, storage_args: tuple | None, values: bool) -> None:
        """What the C++ hot path needs to serve this call's signature itself (see replayer.hot_path).
        `values`: the output's value is computed from its inputs' whenever they all hold one (for a new
        output: a small one, else a view of the first argument)."""
        wrap_args = (VTensor, meta.shape, meta.stride, meta.offset, None, meta.dtype, _STRIDED, self.device)
        self.offer[:] = (func, sig, meta, wrap_args, storage_args, values, threading.get_ident())

    def _follow_lengths(self, sig: Signature, func, args, kwargs, duration: float) -> None:
        """An attention kernel captured into a CUDA graph reads its sequence lengths (`seqused_k`) from a
        buffer the engine refills before each replay: the replay prices it over the lengths it then holds."""
        if "seqused_k" not in sig.names:
            return
        lengths = _arg(sig.names.index("seqused_k"), args, kwargs, sig.names)
        if type(lengths) is not VTensor:
            return
        margs, mkwargs = _map_tensors(args, meta_of), _map_tensors(kwargs, meta_of)
        key, features = op_features(func, margs, mkwargs, func(*margs, **mkwargs))
        key_tensor = _arg(sig.names.index("key"), args, kwargs, sig.names) if "key" in sig.names else None
        size = key_tensor.element_size() if isinstance(key_tensor, _Tensor) else 2
        self.emu.clock.capturing().follow(key, features, op_dtype(margs, mkwargs), duration, lengths, size)

    def factory(self, func: OpOverload, args: tuple, kwargs: dict) -> Any:
        """A CUDA-key call with no virtual tensor in it: a factory (`torch.empty(..., device="cuda")`). What
        it builds is worked out on the meta device once per call signature; values are built at every call."""
        parts: list = [id(func)]
        tensors: list = []
        for a in args:
            _describe(a, parts, tensors)
        for k, v in kwargs.items():
            parts.append(k)
            _describe(v, parts, tensors)
        key = tuple(parts) if not tensors else None
        made = self._factories.get(key) if key is not None else None
        if made is None:
            made = self._factory(func, args, kwargs)
            if key is not None:
                self._factories[key] = made
        m, device, fill = made
        if fill is None:
            value = None
        elif fill is _ZEROS:
            value = torch.zeros(m.shape, dtype=m.dtype).as_strided(m.shape, m.stride)
        else:  # _RUN
            cpu_kwargs = dict(kwargs)
            cpu_kwargs["device"] = _CPU
            value = func(*args, **cpu_kwargs)
        return make(m, device, Storage(m.nbytes, self.counts, True if value is not None else None), value)

    def _factory(self, func: OpOverload, args: tuple, kwargs: dict) -> tuple:
        """A factory's (metadata, device, how its value is built: None, _ZEROS or _RUN)."""
        kwargs = dict(kwargs)
        device = kwargs.get("device")
        device = torch.device(device) if device is not None else self.device
        if device.index is None:
            device = torch.device("cuda", self.device.index or 0)
        kwargs["device"] = _META
        meta = func(*args, **kwargs)
        if not isinstance(meta, _Tensor):
            raise NotImplementedError(f"revati: CUDA call {func} with no virtual tensor is not emulated")
        fill = None
        if value_allowed(meta.dtype, meta.numel()):
            if func in (aten.empty.memory_format, aten.empty_strided.default):
                # Uninitialised memory: integer buffers (token ids, positions, block tables) start as zeros so
                # later partial writes keep them known; float contents stay unknown.
                if meta.dtype in _INTEGRAL:
                    fill = _ZEROS
            else:
                fill = _RUN
        return Meta.of_tensor(meta), device, fill

    def external_signature(
        self, key: str, features: dict, price: Callable[[], tuple[float, float]]
    ) -> Signature:
        """The signature of an op issued outside aten (a collective of the virtual process group, a Triton
        launch), from its key and features; `price()` gives its (device, host) seconds, asked once."""
        ckey = (key, *sorted(features.items()))
        sig = self.cache.get(ckey)
        if sig is None:
            duration, host = price()
            sig = Signature(
                key=key, duration=duration, host=host, outs=(), kind=None, mutated=(), names=(),
                value_ok=False, fast=None, fast_view=None, scalars=json.dumps(features, sort_keys=True),
                sig_id=len(self.signatures),
            )  # fmt: skip
            self.signatures.append(sig)
            self.cache[ckey] = sig
        return sig

    def launch_kernel(self, key: str, features: dict, dtype: torch.dtype | None = None) -> Signature:
        """One kernel issued outside aten dispatch (a Triton launch, a factory built on the host), priced as
        an aten op is (once per key and features, the emulator's own time off the clock), on the clock."""

        def price() -> tuple[float, float]:
            clock = self.emu.clock
            clock.hold()
            try:
                return self._costs(key, features, dtype)[:2]
            finally:
                clock.release()

        sig = self.external_signature(key, features, price)
        self.account(sig)
        return sig

    def _costs(self, key: str, features: dict, dtype) -> tuple[float, float, float]:
        """An op's (device, host, host per request) seconds from the cost model."""
        cost, wall = self.emu.cost, self.emu.clock.wall
        duration = cost.device_time(key, features, dtype)  # 0 for an op that launches no kernel
        self._priced(key, dtype, duration)
        return duration, _host_cost(cost, key, duration, wall), _host_per_request(cost, key, wall)

    # -- signatures ------------------------------------------------------------------------------

    def _schema(self, func: OpOverload):
        info = self._schemas.get(func)
        if info is None:
            info = self._schemas[func] = _schema_refs(func)
        return info

    def _signature(self, func: OpOverload, args: tuple, kwargs: dict, tensors: list) -> Signature | None:
        self.misses += 1
        margs = _map_tensors(args, meta_of)
        mkwargs = _map_tensors(kwargs, meta_of)
        if "device" in mkwargs and mkwargs["device"] is not None:
            mkwargs["device"] = _META
        try:
            mout = func(*margs, **mkwargs)
        except (
            torch._subclasses.fake_tensor.DynamicOutputShapeException,
            RuntimeError,
            NotImplementedError,
        ) as e:
            if _data_dependent(e):
                return None
            raise
        refs, written, names = self._schema(func)
        if torch.Tag.inplace_view in func.tags:
            raise NotImplementedError(
                f"revati: {func} changes a virtual tensor's shape in place; not emulated"
            )
        kind = None if isinstance(mout, _Tensor) or mout is None else type(mout)
        mouts = [mout] if kind is None else list(mout)
        outs = []
        for i, m in enumerate(mouts):
            ref = refs[min(i, len(refs) - 1)] if refs else None
            if m is None:
                outs.append(None)
            elif not isinstance(m, _Tensor):
                outs.append(("const", m))  # a shape-derived scalar (flash attention's max lengths)
            elif ref is not None and ref[1]:
                target = _arg(ref[0], args, kwargs, names)
                if isinstance(target, _Tensor) and target.shape != m.shape:
                    raise NotImplementedError(
                        f"revati: {func} resizes its output from {tuple(target.shape)} to {tuple(m.shape)}; "
                        "virtual tensors cannot be resized in place"
                    )
                outs.append(("self", ref[0]))
            elif ref is not None:
                outs.append(("view", ref[0], Meta.of_tensor(m)))
            else:
                outs.append(("new", Meta.of_tensor(m)))
        key, features = op_features(func, margs, mkwargs, mout)
        dtype = op_dtype(margs, mkwargs)
        duration, host, per_request = self._costs(key, features, dtype)
        cost = self.emu.cost
        value_ok = _runs_on_cpu(func) and all(
            o is None or o[0] == "const" or value_allowed(m.dtype, m.numel())
            for o, m in zip(outs, mouts, strict=True)
        )
        plain = kind is None and outs[0] is not None and outs[0][0] == "new" and not written
        sig = Signature(
            key=key,
            duration=duration,
            host=host,
            per_request=per_request,
            outs=tuple(outs),
            kind=kind,
            mutated=written,
            names=names,
            value_ok=value_ok,
            fast=outs[0][1] if plain and not value_ok and func not in _TOKEN_OPS else None,
            small_new=outs[0][1] if plain and value_ok and func not in _TOKEN_OPS else None,
            fast_view=outs[0][2]
            if kind is None
            and outs[0] is not None
            and outs[0][0] == "view"
            and outs[0][1] == 0
            and not written
            else None,
            input_shapes=tuple(tuple(t.shape) for t in tensors),
            input_dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in tensors),
            scalars=_scalars(args, kwargs),
            sig_id=len(self.signatures),
            extrapolated=_extrapolated(cost, key, features, dtype),
        )
        self.signatures.append(sig)
        return sig

    # -- outputs ---------------------------------------------------------------------------------

    def _outputs(self, sig: Signature, func: OpOverload, args: tuple, kwargs: dict, tensors: list) -> Any:
        names = sig.names
        overwrite = func in _OVERWRITES
        with_values = sig.value_ok
        if with_values:
            for i, t in enumerate(tensors):
                if type(t) is VTensor and (
                    t._value is None or (t._vstorage.value is None and not (overwrite and i == 0))
                ):
                    with_values = False
                    break
        graph = self.emu.clock.capturing() if (with_values or func in _TOKEN_OPS) else None
        if with_values:
            self.value_ops += 1
            meta = sig.small_new
            if meta is not None and graph is None and id(func) in self.hot_ids and func not in _ALLOCATIONS:
                self._offer(func, sig, meta, (meta.nbytes, self.counts, None), True)
            # Capturing records kernels without running them: a mutating op computes on copies then.
            if func in _ALLOCATIONS:  # memory, no kernel: zeros (see _ALLOCATIONS); no rerun on replays
                real = torch.zeros_like(func(*_cpu_args(args), **_cpu_kwargs(kwargs)))
                graph = None
            elif graph is not None and sig.mutated:
                real = func(*_map_tensors(args, _cpu_copy), **_cpu_kwargs(kwargs))
            else:
                real = func(*_cpu_args(args), **_cpu_kwargs(kwargs))
            reals = [real] if sig.kind is None else list(real)
            if overwrite:
                dst = args[0]
                if dst._vstorage.value is None and dst.numel() * dst.element_size() == dst._vstorage.nbytes:
                    dst._vstorage.value = True
        else:
            reals = None
            for ref in sig.mutated:
                t = _arg(ref, args, kwargs, names)
                if type(t) is VTensor:
                    t._vstorage.value = None
        results = []
        for i, o in enumerate(sig.outs):
            if o is None:
                results.append(None)
                continue
            tag = o[0]
            if tag == "const":
                results.append(o[1])
                continue
            if tag == "self":
                results.append(_arg(o[1], args, kwargs, names))
                continue
            value = reals[i] if reals is not None else None
            if tag == "view":
                base = _arg(o[1], args, kwargs, names)
                if isinstance(base, (list, tuple)):
                    base = base[0]
                meta = o[2]
                storage = base._vstorage if type(base) is VTensor else self._new_storage(meta, value)
                outside = _inference_mode() and type(base) is VTensor and not base.is_inference()
                results.append(
                    (_make_outside_inference if outside else make)(meta, self.device, storage, value)
                )
            else:
                results.append(make(o[1], self.device, self._new_storage(o[1], value), value))
        if reals is None and func in _TOKEN_OPS:
            self._synthesize_tokens(func, args, kwargs, results)
            if graph is not None:
                graph.on_replay.append(lambda: self._synthesize_tokens(func, args, kwargs, results))
        elif with_values and graph is not None:
            graph.on_replay.append(lambda: _rerun(func, args, kwargs, results, sig.kind))
        if sig.kind is None:
            return results[0]
        return sig.kind(results)

    def _new_storage(self, meta: Meta, value) -> Storage:
        return Storage(meta.nbytes, self.counts, True if value is not None else None)

    def _synthesize_tokens(self, func, args, kwargs, results) -> None:
        pos = _TOKEN_OPS[func]
        out = results[pos]
        src = args[0]
        if func is aten.multinomial.default:
            vocab = src.shape[-1]
        elif func is aten.argmax.default and (len(args) < 2 or args[1] is None) and kwargs.get("dim") is None:
            vocab = src.numel()
        else:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            if func is aten.topk.default:
                dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            vocab = src.shape[dim] if src.dim() else 1
        ids = self.emu.oracle.token_ids(tuple(out.shape), vocab, str(func.overloadpacket._qualified_op_name))
        ids = ids.to(out.dtype)
        if out._value is None:
            out._value = ids.as_strided(out.shape, out.stride(), 0)
        else:  # a graph replay refills the buffer that later views read
            out._value.copy_(ids)
        out._vstorage.value = True

    def _dynamic(self, func, args, kwargs, tensors) -> Any:
        """An op whose output shape depends on values: run it on the shadow values, or fail clearly."""
        # Value-less inputs (x in x[mask]) stand in as zero-stride zeros: the shape comes from the inputs
        # that have values; outputs computed from a stand-in have no value.
        partial = any(type(t) is VTensor and t.value() is None for t in tensors)
        if partial and all(type(t) is VTensor and t.value() is None for t in tensors):
            raise DataDependentError(
                f"revati: {func} needs the values of a virtual tensor that has none "
                "(its output shape depends on them); this op is not emulated on value-less tensors"
            )
        self.ops += 1
        self.value_ops += 1
        real = func(*_map_tensors(args, _cpu_value_or_standin), **_cpu_kwargs(kwargs))
        reals = [real] if isinstance(real, _Tensor) else list(real)
        outs = [_wrap_value(self, r, keep=not partial) if isinstance(r, _Tensor) else r for r in reals]
        key, features = op_features(func, _map_tensors(args, meta_of), {}, [meta_of(r) for r in reals])
        dtype = op_dtype(args, kwargs)
        duration, host, per_request = self._costs(key, features, dtype)
        sig = Signature(
            key=key, duration=duration, host=host, per_request=per_request,
            outs=(), kind=None, mutated=(), names=(), value_ok=True, fast=None, fast_view=None,
            input_shapes=tuple(tuple(t.shape) for t in tensors),
            input_dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in tensors),
            sig_id=len(self.signatures),
        )  # fmt: skip
        self.signatures.append(sig)  # one per call: its shapes depend on values, nothing to cache
        self.emu.account(sig)
        return outs[0] if isinstance(real, _Tensor) else type(real)(outs)

    # -- host reads ------------------------------------------------------------------------------

    def read(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """The host reads a virtual tensor: wait for the device, then hand over its value (or zeros)."""
        self.emu.host_sync()
        value = t.value() if type(t) is VTensor else t
        if value is None:
            return self.emu.oracle.zeros(tuple(t.shape), t.dtype, what)
        return value


def _wrap_value(d: Dispatcher, r: torch.Tensor, keep: bool = True) -> VTensor:
    meta = Meta.of_tensor(r)
    if not keep or not value_allowed(r.dtype, r.numel()):
        return make(meta, d.device, Storage(meta.nbytes, d.counts, None), None)
    return make(meta, d.device, Storage(meta.nbytes, d.counts, True), r)


def _cpu_value_or_standin(t: torch.Tensor) -> torch.Tensor:
    if type(t) is VTensor and t.value() is None:
        return torch.zeros((), dtype=t.dtype).expand(t.shape)
    return _cpu_value(t)


def _map_tensors(x, fn):
    if isinstance(x, _Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(e, fn) for e in x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    return x


def _cpu_value(t: torch.Tensor) -> torch.Tensor:
    return t._value if type(t) is VTensor else t


def _cpu_args(args: tuple) -> list:
    """`_map_tensors(args, _cpu_value)` unrolled for an op's positional arguments (the value path)."""
    out = []
    for a in args:
        if type(a) is VTensor:
            out.append(a._value)
        elif type(a) in _PLAIN:
            out.append(a)
        else:
            out.append(_map_tensors(a, _cpu_value))
    return out


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return _cpu_value(t).clone()


def _rerun(func, args, kwargs, results, kind) -> None:
    """A graph replay runs a captured value-carrying op again, writing into the outputs' values."""
    real = func(*_cpu_args(args), **_cpu_kwargs(kwargs))
    for r, out in zip([real] if kind is None else real, results, strict=True):
        if type(out) is VTensor and out._value is not None:
            if r is not out._value:
                out._value.copy_(r)
            out._vstorage.value = True


def _cpu_kwargs(kwargs: dict) -> dict:
    if not kwargs:
        return kwargs
    kw = _map_tensors(kwargs, _cpu_value)
    if kw.get("device") is not None:
        kw["device"] = _CPU
    return kw


def _scalars(args, kwargs) -> str | None:
    vals = [a for a in args if isinstance(a, (int, float, bool)) and not isinstance(a, _Tensor)]
    vals += [v for v in kwargs.values() if isinstance(v, (int, float, bool))]
    return repr(vals) if vals else None


def _data_dependent(e: Exception) -> bool:
    text = str(e)
    return isinstance(e, torch._subclasses.fake_tensor.DynamicOutputShapeException) or any(
        s in text
        for s in (
            "data-dependent",
            "data-independent",
            "cannot be called on meta",
            "data dependent",
            "Could not guard",
        )
    )


# -- ops with their own rules ------------------------------------------------------------------


def _local_scalar_dense(d: Dispatcher, func, args, kwargs):
    return d.read(args[0], "item").item()


def _to_copy(d: Dispatcher, func, args, kwargs):
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cpu":
        kw = {k: v for k, v in kwargs.items() if k in ("dtype", "memory_format")}
        return d.read(args[0], "to_cpu").to(**kw) if kw else d.read(args[0], "to_cpu").clone()
    return _generic(d, func, args, kwargs)


def _copy_(d: Dispatcher, func, args, kwargs):
    dst, src = args[0], args[1]
    if type(dst) is not VTensor:  # device to host
        dst.copy_(d.read(src, "to_cpu"))
        return dst
    return _generic(d, func, args, kwargs)


def _equal(d: Dispatcher, func, args, kwargs):
    a, b = d.read(args[0], "equal"), d.read(args[1], "equal")
    return bool(torch.equal(a, b))


def _is_nonzero(d: Dispatcher, func, args, kwargs):
    return bool(d.read(args[0], "item").item())


def _fused_sdp_choice(d: Dispatcher, func, args, kwargs):
    """The fused attention a CUDA build would pick: flash without a mask in half precision, else efficient."""
    q = args[0]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    half = q.dtype in (torch.float16, torch.bfloat16)
    flash = half and mask is None and q.shape[-1] <= 256
    return 1 if flash else 2  # SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION


_COLLECTIVE_NAMESPACES = {"c10d", "_c10d_functional"}
_CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
_WAIT_TENSOR = getattr(getattr(torch.ops, "_c10d_functional", None), "wait_tensor", None)
_WAIT_TENSOR = _WAIT_TENSOR.default if _WAIT_TENSOR is not None else None


def _collective(d: Dispatcher, func, args, kwargs):
    """A c10d or functional collective on virtual tensors: its CUDA kernel hands it to the process group
    (the `revati` backend under emulation: replayer.distributed), which prices and coordinates it."""
    out = func.redispatch(_CUDA_KEYS, *args, **kwargs)
    if func.namespace == "_c10d_functional" and func is not _WAIT_TENSOR:
        # The virtual group's work is done when issued (its time is on the clock already): take it off
        # torch's registry now, or every run ends with a warning about collectives nobody waited for.
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, _Tensor):
                _WAIT_TENSOR.redispatch(_CUDA_KEYS, t)
    return out


@functools.cache
def _composite(func: OpOverload) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def _decomposed(d: Dispatcher, func, args, kwargs):
    """A composite op runs as the ops it is made of, as it does outside inference mode."""
    return func.decompose(*args, **kwargs)


@functools.cache
def _runs_on_cpu(func: OpOverload) -> bool:
    """Whether shadow values can be computed: a shimmed GPU-only op has a fake but no CPU kernel."""
    return any(
        torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)
        for key in ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    )


@functools.cache
def _implemented_in_python(func: OpOverload) -> bool:
    """A library's own op whose CUDA kernel is Python (vLLM's attention layer op): it runs, on the virtual
    device, as the ops it calls. (On a CPU build of torch no compiled CUDA kernel exists to be found here.)"""
    return func.namespace not in ("aten", "prims") and torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), "CUDA"
    )


_CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _python_kernel(d: Dispatcher, func, args, kwargs):
    return func.redispatch(_CUDA_KEYS, *args, **kwargs)


# A view of a normal tensor made in inference mode shares its version counter, which an inference tensor
# cannot: the wrapper is made outside inference mode.
_inference_mode = torch.is_inference_mode_enabled


def _outside_inference(fn):
    def made(*args):
        with _InferenceMode(False):  # torch.inference_mode(False) without its Python wrapper
            return fn(*args)

    return made


_InferenceMode = torch._C._InferenceMode
_wrap_outside_inference = _outside_inference(_wrap)
_make_outside_inference = _outside_inference(make)


def _generic(d: Dispatcher, func, args, kwargs):
    return d.run(func, args, kwargs)


_SPECIAL = {
    aten._local_scalar_dense.default: _local_scalar_dense,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.equal.default: _equal,
    aten.is_nonzero.default: _is_nonzero,
    aten._fused_sdp_choice.default: _fused_sdp_choice,
}
_SPECIAL_IDS = {id(op): handler for op, handler in _SPECIAL.items()}


def special_ids() -> set[int]:
    """The ids of the ops with rules of their own that the C++ hot path must leave to them. `_to_copy` is not
    among them: its rule (a copy to the host) depends on its target device, which the hot path keys on too,
    and every other copy takes the generic path."""
    return set(_SPECIAL_IDS) - {id(aten._to_copy.default)}


def _all_valued(tensors: list) -> bool:
    for t in tensors:  # noqa: SIM110 - a plain loop beats all() on this path
        if type(t) is VTensor and (t._value is None or t._vstorage.value is None):
            return False
    return True


def _host_cost(cost, key: str, duration: float, wall: bool) -> float:
    """Host time to issue an op; on a synchronous device (a CPU profile) the host also waits it out. In
    `wall` mode the serving code's time between ops is measured, so a profile gives only the op's own call."""
    own = getattr(cost, "own_host_time", None) if wall else None
    host = own(key) if own is not None else cost.host_time(key)
    if not getattr(cost, "synchronous", False):
        return host
    # what a real CPU spends after a bigger op (freeing, first touches) no virtual tensor makes: both modes
    slope = getattr(cost, "host_slope", None)
    return host + duration * (1.0 + (slope(key) if slope is not None else 0.0))


def _host_per_request(cost, key: str, wall: bool) -> float:
    """Host time to issue an op per request in the current engine step (serving code that loops over the
    batch, as a profile fitted it); none in `wall` mode, which measures the serving code itself."""
    per_request = getattr(cost, "host_per_request", None)
    return per_request(key) if per_request is not None and not wall else 0.0


def _extrapolated(cost, key: str, features, dtype) -> bool:
    check = getattr(cost, "extrapolated", None)
    return bool(check(key, features, dtype)) if check is not None else False
