"""The emulator: one virtual GPU, its clock and memory, and the patches that make `cuda` mean it.

with Emulator(gpu("h100"), Roofline(gpu("h100"))) as emu:
    x = torch.randn(4096, 4096, device="cuda")   # a VTensor: shape, no data
    y = x @ x                                    # no kernel runs; the clock advances
    torch.cuda.synchronize()
    print(emu.clock.now)
"""

from __future__ import annotations

import functools
import gc
import multiprocessing.process
from collections import Counter
from typing import Any

import torch

from replayer import cuda as _cuda
from replayer import distributed, hot_path, meta_kernels, native, pipes, sockets, tensor, timewarp
from replayer.clock import Clock, _real_perf_counter, concrete
from replayer.dispatch import Dispatcher, Signature
from replayer.memory import Allocator
from replayer.oracle import TokenOracle
from replayer.shims import triton as triton_shim
from replayer.tensor import VTensor, value_allowed
from revati.cost import IDLE_GAP, CostModel
from revati.hardware import GpuSpec
from revati.op_features import canonical_op

_canonical = functools.cache(canonical_op)  # a filling factory's key, once per overload

# Which ops an emulated trace keeps: every one, those of one engine step in SAMPLE_EVERY, or none
# (iterations and requests only). A real workload makes millions of ops.
OPS_MODES = ("all", "sample", "none")
SAMPLE_EVERY = 20
FLUSH_OPS = 200_000  # logged ops kept in memory before they go to the trace as a Parquet part

_CURRENT: Emulator | None = None
_LIBRARY: torch.library.Library | None = None
_MISSING = object()


class Patcher:
    """Sets attributes and puts every one back, in reverse order, on `restore()`."""

    def __init__(self):
        self._saved: list[tuple[Any, str, Any]] = []
        self._hooks: list = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self._saved.append(
            (obj, name, obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING)
        )
        setattr(obj, name, value)

    def on_restore(self, fn) -> None:
        self._hooks.append(fn)

    def restore(self) -> None:
        for fn in reversed(self._hooks):
            fn()
        for obj, name, old in reversed(self._saved):
            if old is _MISSING:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)
        self._saved.clear()
        self._hooks.clear()


def current() -> Emulator:
    """The active emulator; a virtual tensor used outside one is an error."""
    if _CURRENT is None:
        raise RuntimeError("revati: a virtual CUDA tensor was used after its emulator was deactivated")
    return _CURRENT


class Emulator:
    """A virtual GPU of kind `gpu` whose op durations come from `cost`."""

    def __init__(
        self,
        gpu: GpuSpec,
        cost: CostModel,
        *,
        host_time: str = "deterministic",
        ops: str = "all",
        special_tokens: set[int] | None = None,
        seed: int = 0,
        device_count: int = 1,
        device_index: int = 0,  # a rank's own GPU on its node (LOCAL_RANK): tensors live on cuda:device_index
    ):
        if host_time not in ("wall", "deterministic"):
            raise ValueError(f"host_time must be 'wall' or 'deterministic', not {host_time!r}")
        self.gpu = gpu
        self.cost = cost
        self.host_time = host_time
        self.device = torch.device("cuda", device_index)
        self.device_count = max(device_count, device_index + 1)
        self.clock = Clock(launch_latency=cost.launch_latency, wall=host_time == "wall")
        self.allocator = Allocator(gpu.memory_bytes, gpu.name)
        self.oracle = TokenOracle(special_tokens, seed)
        self.dispatcher = Dispatcher(self)
        if ops not in OPS_MODES:
            raise ValueError(f"ops must be one of {', '.join(OPS_MODES)}, not {ops!r}")
        self.ops_mode = ops
        self._log_ops = ops == "all"
        self.ops: list[tuple] = []
        self.ops_sink = None  # called with the log full, between engine steps: writes it out
        self.iterations: list[dict] = []
        self.origin = 0.0  # virtual time when serving started (the engine's t0); trace times count from it
        self.origin_wall: float | None = None  # and the real perf_counter then
        self.graphs_captured = 0
        self.replay_prices: dict = {}  # (key, features, kv_len) -> device seconds (cuda.Graph.follow)
        self.graph_replays = 0
        self.active = False
        self.hot_path = False  # ops served by the C++ hot path (replayer.hot_path)
        self._hot_path_hits = 0  # what it served in earlier activations
        self._hot_path_since = 0  # its process-wide count when this activation began
        self.extra_syncs: Counter[str] = Counter()
        self._iteration: int | None = None
        self._iteration_open: dict | None = None
        self._patch = Patcher()
        self.measure_leak = True  # wall mode: measure `clock.leak` when activated
        # A step after the engine sat idle runs `wake_factor` slower (a profile measures it; cost.IDLE_GAP)
        self.wake = 1.0  # the factor on the ops of the current step
        self.batch = 0  # requests in the current engine step (0 outside steps): per-request host costs
        self._wake_factor = float(getattr(cost, "wake_factor", 1.0))
        self._last_step_end: float | None = None

    # -- activation ------------------------------------------------------------------------------

    def __enter__(self) -> Emulator:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Make `cuda` mean this virtual GPU in every thread of the process."""
        global _CURRENT
        if _CURRENT is not None:
            raise RuntimeError("revati: an emulator is already active in this process")
        if self.clock.wall and self.measure_leak:
            self.clock.leak = _measure_leak(self.gpu, self.cost)
        _CURRENT = self
        native.load()
        _register_fallback()
        _override_cuda_factories(self._patch)
        meta_kernels.use_native(self._patch)
        if self.clock.wall:
            tensor.set_dispatch(self.dispatch)
            gc.callbacks.append(self.clock.collecting)
            self._patch.on_restore(lambda: gc.callbacks.remove(self.clock.collecting))
        else:
            tensor.set_dispatch(self.dispatcher.dispatch, self.dispatcher.torch_dispatch)
            # wall mode keeps every op in Python: each is timed as the emulator's (`outside`)
            self.hot_path = hot_path.enable(self.dispatcher)
            self._hot_path_since = hot_path.served()
        _cuda.install(self, self._patch)
        distributed.install(self._patch)
        triton_shim.install(self._patch)
        _install_entry_points(self, self._patch)
        timewarp.install(self, self._patch)
        self.active = True

    def share_time(self, tree) -> None:
        """Share virtual time with an engine's other processes (replayer.tree), counting the ZeroMQ and pipe
        messages between them (replayer.sockets, replayer.pipes); undone by `deactivate`."""
        self.clock.tree = tree
        self.clock.observe(tree.now())
        readers: dict = {}  # channel → the clock's state of the thread last blocked reading it
        sockets.install(self, tree, self._patch, readers)
        pipes.install(self, tree, self._patch, readers)
        self.clock.synced = lambda t: tree.catch_up(t, self.clock, readers)
        self._patch.on_restore(lambda: setattr(self.clock, "synced", None))
        self._patch.on_restore(lambda: setattr(self.clock, "tree", None))
        real_start = multiprocessing.process.BaseProcess.start

        def start(process):  # the child holds time back from the moment it exists (Tree.expect)
            real_start(process)
            if process.pid is not None:
                tree.expect(process.pid)

        self._patch.set(multiprocessing.process.BaseProcess, "start", start)

    def deactivate(self) -> None:
        global _CURRENT
        self._hot_path_hits = self.hot_path_ops()
        self.active = False
        distributed.uninstall()
        hot_path.disable()
        tensor.set_dispatch(None)
        self._patch.restore()
        _CURRENT = None

    # -- the hot path ----------------------------------------------------------------------------

    def dispatch(self, func, args, kwargs):
        """An op on a virtual tensor (wall mode: its time is the emulator's, not the serving code's)."""
        return self.outside(self.dispatcher.dispatch, func, args, kwargs)

    def factory(self, func, args, kwargs):
        """A factory call on `cuda` (wall mode: its time is the emulator's, not the serving code's)."""
        return self.outside(self.dispatcher.factory, func, args, kwargs)

    def account(self, sig: Signature) -> int:
        """Advance the clocks for one op and log it; returns its stream (< 0: captured into a CUDA graph)."""
        w = self.wake
        host_cost = (sig.host + sig.per_request * self.batch) * w
        host, start, stream = self.clock.launch(sig.duration * w, host_cost)
        if self._log_ops:
            self.ops.append(
                (
                    self.dispatcher.ops,
                    sig.sig_id,
                    host,
                    host_cost,
                    start,
                    sig.duration * w,
                    stream,
                    self._iteration,
                ),
            )
        return stream

    def outside(self, fn, *args):
        """Run emulator work called from serving code (an op, a factory, a collective): in wall mode its time
        is the emulator's, not the serving code's."""
        if not self.clock.wall:
            return fn(*args)
        st = self.clock.enter()
        try:
            return fn(*args)
        finally:
            self.clock.leave(st)

    def collective_launched(
        self, key: str, features: dict, duration: float, host_cost: float, launched
    ) -> None:
        """Count and log a collective the process group issued (`launched`: host time, start, stream)."""
        d = self.dispatcher
        d.ops += 1
        if self._log_ops:
            host, start, stream = launched
            sig = d.external_signature(key, features, lambda: (duration, host_cost))
            self.ops.append((d.ops, sig.sig_id, host, host_cost, start, duration, stream, self._iteration))

    def host_sync(self) -> None:
        """A host read of device data: wait for the calling thread's stream."""
        self.clock.sync_stream(self.clock.current_stream())
        self.clock.advance(self.cost.sync_latency)

    def from_host(
        self, t: torch.Tensor, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> VTensor:
        """A host-to-device copy of a real CPU tensor."""
        if dtype is not None and dtype != t.dtype:
            t = t.to(dtype)
        dst = self._laid_out_like(t)
        if not getattr(self.cost, "synchronous", False):
            dst.copy_(t)
        elif value_allowed(t.dtype, t.numel()):
            # A CPU profile's device is the host: a CPU run's `.to(device)` copies nothing, so no copy is
            # priced (as the recorded copies, hf-cb's inputs cost 0.33 ms a step on small-llama, against
            # 0.03 ms for every copy the recording holds outside steps); the value is the host tensor's
            dst._value, dst._vstorage.value = t.clone(), True
        return dst

    def _laid_out_like(self, host: torch.Tensor) -> VTensor:
        """Uninitialised device memory with a host tensor's shape, strides and dtype."""
        return self.factory(
            torch.ops.aten.empty_strided.default,
            (host.shape, host.stride()),
            {"dtype": host.dtype, "device": self.device},
        )

    def filled_on_device(self, host: torch.Tensor, key: str) -> VTensor:
        """A tensor a factory kernel (`key`: aten::arange, ...) fills on the GPU, its value built on the host:
        one kernel over its elements, as `op_features` prices a factory (no inputs)."""
        out = self._laid_out_like(host)
        if value_allowed(host.dtype, host.numel()):
            out._value, out._vstorage.value = host, True
        nbytes = host.numel() * host.element_size()
        self.outside(
            self.dispatcher.launch_kernel, key, {"numel": float(host.numel()), "bytes": float(nbytes)}
        )
        return out

    def filling_factory(self, op, args: tuple, kwargs: dict) -> VTensor:
        """A factory that fills what it allocates (`torch.full`, `zeros`, `ones` on cuda): built as any
        factory is (`Dispatcher.factory`), priced as one kernel of its own key, as a recording holds it, not
        as the allocation and `fill_` it is made of (a CPU profile priced hf-generate's `torch.full` as a
        `fill_` at 37 µs of host time, against 3 µs recorded for `full`). Wall mode: the emulator's time."""
        return self.outside(self._filled, op, args, kwargs)

    def _filled(self, op, args: tuple, kwargs: dict) -> VTensor:
        out = self.dispatcher.factory(op, args, kwargs)
        meta = out._d
        features = {"numel": float(meta.numel), "bytes": float(meta.numel * meta.dtype.itemsize)}
        self.dispatcher.launch_kernel(_canonical(op), features)
        return out

    # -- engine steps (the Observer protocol of revati.engines) ---------------------------------

    def serving_start(self) -> None:
        """The engine's t0: request times count from here, and so do the trace's (as in a recorded trace)."""
        self.origin = self.clock.read()
        self.origin_wall = _real_perf_counter()

    def iteration_rows(self) -> list[dict]:
        """The iterations so far, their times in seconds from serving start."""
        o = self.origin
        keys = ("host_start", "host_end", "device_start", "device_end")
        return [{**row, **{k: row[k] - o for k in keys}} for row in self.iterations]

    def iteration_start(self, phase: str, batch_size: int, tokens: int, kv_tokens: int) -> None:
        clock = self.clock
        now = clock.read()
        stream = clock.current_stream()
        self._iteration = len(self.iterations)
        idle = self._last_step_end is not None and now - self._last_step_end > IDLE_GAP
        self.wake = self._wake_factor if idle else 1.0
        self.batch = batch_size
        if self.ops_mode == "sample":
            self._log_ops = self._iteration % SAMPLE_EVERY == 0
        self._iteration_open = {
            "rank": 0,
            "iteration_id": self._iteration,
            "phase": phase,
            "batch_size": batch_size,
            "tokens": tokens,
            "kv_tokens": kv_tokens,
            "host_start": now,
            "device_start": max(clock.stream_time(stream), now),
        }

    def iteration_end(self) -> None:
        row = self._iteration_open
        if row is None:
            return
        clock = self.clock
        row["host_end"] = clock.read()
        # the step's work may run on streams other than the calling thread's (hf-cb computes on its own)
        row["device_end"] = max(clock.device_time(), row["device_start"])
        self.iterations.append(row)
        self._last_step_end = row["host_end"]
        self.wake = 1.0
        self.batch = 0
        self._iteration_open = None
        self._iteration = None
        if self.ops_sink is not None and len(self.ops) >= FLUSH_OPS:
            self.ops_sink()  # between engine steps, off the hot path: bounded memory, crash-safe parts
        self._log_ops = self.ops_mode == "all"

    # -- reporting -------------------------------------------------------------------------------

    def synthesized(self) -> dict[str, int]:
        return dict(self.oracle.synthesized)

    def hot_path_ops(self) -> int:
        """Ops the C++ hot path served while this emulator was active (0 where it is not built or is off)."""
        return self._hot_path_hits + (hot_path.served() - self._hot_path_since if self.active else 0)

    def take_op_rows(self) -> dict[str, list]:
        """The op log so far as columns of the trace's `ops` table; the log starts empty again."""
        sigs = self.dispatcher.signatures
        logged, self.ops = self.ops, []
        if not logged:
            return {}
        op_id, sid, host, hdur, start, dur, stream, it = (list(c) for c in zip(*logged, strict=True))
        used = [sigs[i] for i in sid]
        n = len(op_id)
        return {
            "rank": [0] * n,
            "op_id": op_id,
            "name": [s.key for s in used],
            "input_shapes": [s.input_shapes for s in used],
            "dtypes": [s.input_dtypes for s in used],
            "scalars": [s.scalars for s in used],
            "stream": [x if x >= 0 else -x - 1 for x in stream],
            "host_start": [h - self.origin for h in host],
            "host_duration": hdur,
            "device_start": [concrete(d) - self.origin for d in start],
            "device_duration": dur,
            "in_graph": [x < 0 for x in stream],
            "iteration_id": it,
            "warmup": [h < self.origin for h in host],
            "predicted": [True] * n,
            "extrapolated": [s.extrapolated for s in used],
        }


def _measure_leak(gpu: GpuSpec, cost: CostModel, rounds: int = 400) -> float:
    """Real seconds per op that `wall` mode would count as the serving code's but are the emulator's own:
    torch's subclass dispatch before and after the handler, wrapping and unwrapping (about 7 µs per op on
    this project's CPU). Measured on a throw-away emulator over a mix of common ops; the minimum over
    five batches, since other work can only add to it."""
    probe = Emulator(gpu, cost, host_time="wall", ops="none")
    probe.measure_leak = False
    with probe:
        x = torch.empty(64, 64, device="cuda")
        y = torch.empty(64, 64, device="cuda")

        def ops() -> None:
            for _ in range(rounds):
                z = x + y
                z = torch.mm(z, y).view(-1)
                z = torch.nn.functional.silu(x[0])
                z = x.transpose(0, 1).contiguous()
            del z

        ops()  # signatures cached, as on the hot path
        per_op = []
        for _ in range(5):
            counted, done = probe.clock.counted, probe.dispatcher.ops
            ops()
            per_op.append((probe.clock.counted - counted) / max(1, probe.dispatcher.ops - done))
    return min(per_op)


def _register_fallback() -> None:
    """Route calls on the CUDA dispatch key (factories with device='cuda') to the active emulator."""
    global _LIBRARY
    if _LIBRARY is not None:
        return

    def fallback(op, *args, **kwargs):
        emu = _CURRENT
        if emu is None:
            raise RuntimeError(
                f"{op}: PyTorch is not linked with support for cuda devices (no emulator active)"
            )
        return emu.factory(op, args, kwargs)

    lib = torch.library.Library("_", "IMPL")
    lib.fallback(fallback, dispatch_key="CUDA")
    _LIBRARY = lib  # must stay alive, or the registration goes with it


def _override_cuda_factories(patch: Patcher) -> None:
    """CUDA-key kernels of the active emulator for factories: those that fill what they allocate are one
    priced kernel each (`filling_factory`); on a CUDA build of torch, allocations too, whose real CUDA
    kernels need a driver (a CPU build sends them to the fallback, `_register_fallback`)."""
    import warnings

    taken = [(op, "filling_factory") for op in _FILLING]
    if torch.backends.cuda.is_built():
        taken += [
            (op, "factory")
            for op in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default)
        ]

    def on_emulator(op, method: str):
        def impl(*args, **kwargs):
            return getattr(current(), method)(op, args, kwargs)

        return impl

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
        for op, method in taken:
            lib.impl(op, on_emulator(op, method), "CUDA")
    patch.on_restore(lib._destroy)


_FILLING = (
    torch.ops.aten.full.default,
    torch.ops.aten.zeros.default,
    torch.ops.aten.ones.default,
    torch.ops.aten.scalar_tensor.default,
)


_HOST = torch.device("cpu")


def _builds_on_cuda(device) -> bool:
    """Whether a factory given `device` (None: the default one) builds on cuda."""
    return _is_cuda(device) if device is not None else _default_is_cuda()


def _default_is_cuda() -> bool:
    """Whether factories without a device build on cuda (`with torch.device("cuda"):`, set_default_device).
    Not torch.get_default_device(): for a device without an index it builds a tensor to find one."""
    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, torch.utils._device.DeviceContext):
            return _is_cuda(mode.device)
    context = getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)
    return context is not None and _is_cuda(context.device)


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _install_entry_points(emu: Emulator, patch: Patcher) -> None:
    """Host tensors that move to `cuda` fail in C++ on a CPU build before any dispatch; catch them here."""
    Tensor = torch.Tensor
    real_to, real_tensor, real_as_tensor = Tensor.to, torch.tensor, torch.as_tensor

    def to(self, *args, **kwargs):
        if not kwargs and len(args) == 1 and type(args[0]) is _DTYPE:  # `t.to(dtype)`: no device in it
            return real_to(self, args[0])
        if type(self) is not VTensor and self.device.type != "cuda":  # a DTensor over VTensors is on cuda
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*_int_device(args), **kwargs)
            if _is_cuda(device):
                return emu.from_host(self, dtype, non_blocking)
        return real_to(self, *args, **kwargs)

    def cuda(self, device=None, non_blocking=False, memory_format=None):
        if type(self) is VTensor or self.device.type == "cuda":
            return self
        return emu.from_host(self, None, non_blocking)

    def pin_memory(self, device=None):
        return self

    def is_pinned(self, device=None):
        return False

    # Without a device these build on the default one, which `with torch.device("cuda"):` makes cuda.
    def tensor(data, *, dtype=None, device=None, requires_grad=False, pin_memory=False):
        if _builds_on_cuda(device):
            host = real_tensor(data, dtype=dtype, device="cpu")
            return emu.from_host(host, None).requires_grad_(requires_grad)
        return real_tensor(data, dtype=dtype, device=device, requires_grad=requires_grad)

    def as_tensor(data, dtype=None, device=None):
        if _builds_on_cuda(device):
            if isinstance(data, VTensor):
                return data if dtype in (None, data.dtype) else data.to(dtype)
            return emu.from_host(real_as_tensor(data, dtype=dtype, device="cpu"), None)
        return real_as_tensor(data, dtype=dtype, device=device)

    def host_built(name):
        # Composite factories that fill through an `out=` argument after allocating it empty; a wrapper
        # tensor cannot be resized in place, so these are built on the host, and priced as their kernel.
        real = getattr(torch, name)

        def factory(*args, device=None, **kwargs):
            if _builds_on_cuda(device):
                return emu.filled_on_device(real(*args, device=_HOST, **kwargs), key)
            return real(*args, device=device, **kwargs)

        key = f"aten::{name}"

        factory.__name__ = name
        return factory

    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    aten = torch.ops.aten
    cpu_profile = getattr(emu.cost, "synchronous", False)  # the virtual device is a recorded CPU

    def scaled_dot_product_attention(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        # A CPU build decomposes this into bmm + softmax (the math path) on a device it has no fused kernel
        # for; call the fused kernel a CUDA build picks instead: flash without a mask in half precision, else
        # efficient (with grouped query heads repeated first). A CPU profile gets the kernel a CPU build runs.
        if type(query) is not VTensor:
            return real_sdpa(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # as both builds turn a boolean mask into an additive one (`convert_boolean_attn_mask`)
            minus_inf = torch.scalar_tensor(float("-inf"), dtype=query.dtype, device=query.device)
            attn_mask = torch.where(attn_mask, 0.0, minus_inf)
        if cpu_profile:  # what a CPU build runs: its flash kernel, grouped query heads inside it
            return cpu_flash(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        heads, kv_heads = query.shape[-3], key.shape[-3]
        half = query.dtype in (torch.float16, torch.bfloat16)
        if attn_mask is None and half and query.shape[-1] == value.shape[-1] <= 256:
            return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]
        if heads != kv_heads and enable_gqa:
            key = key.repeat_interleave(heads // kv_heads, dim=-3)
            value = value.repeat_interleave(heads // kv_heads, dim=-3)
        return efficient(query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale)[0]

    # the overloads themselves: a packet resolves its overload at every call
    cpu_flash = aten._scaled_dot_product_flash_attention_for_cpu.default
    flash = aten._scaled_dot_product_flash_attention.default
    efficient = aten._scaled_dot_product_efficient_attention.default

    patch.set(torch.nn.functional, "scaled_dot_product_attention", scaled_dot_product_attention)
    for name in (
        "arange",
        "range",
        "linspace",
        "logspace",
        "randperm",
        "eye",
        "tril_indices",
        "triu_indices",
    ):
        patch.set(torch, name, host_built(name))
    patch.set(Tensor, "to", to)
    patch.set(Tensor, "cuda", cuda)
    real_new_tensor = Tensor.new_tensor

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False, layout=None, pin_memory=False):
        # A copy of `data` with self's dtype, on self's device unless told: a virtual tensor's is cuda.
        if not _is_cuda(device if device is not None else self.device):
            return real_new_tensor(self, data, dtype=dtype, device=device, requires_grad=requires_grad)
        dtype = dtype or self.dtype
        if isinstance(data, VTensor):
            return data.detach().to(dtype).clone().requires_grad_(requires_grad)
        host = real_as_tensor(data, dtype=dtype, device="cpu").clone()
        return emu.from_host(host, None).requires_grad_(requires_grad)

    patch.set(Tensor, "new_tensor", new_tensor)
    patch.set(Tensor, "pin_memory", pin_memory)
    patch.set(Tensor, "is_pinned", is_pinned)
    # The caching allocator's note that another stream uses a block; the virtual allocator frees at once.
    patch.set(Tensor, "record_stream", lambda self, stream: None)
    # `with torch.device(...)` recognises its factories by identity, from a set built once on first use:
    # build it from torch's own functions before they are wrapped.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in ("empty", "zeros", "ones", "full", "empty_strided", "empty_like", "zeros_like", "ones_like"):
        patch.set(torch, name, _unpinned(getattr(torch, name)))
    patch.set(torch, "tensor", tensor)
    patch.set(torch, "as_tensor", as_tensor)


def _unpinned(real):
    """A host-tensor factory whose `pin_memory=True` is dropped: a CPU-only build has no pinned allocator
    and raises, and a pinned host tensor holds and copies the same values (`is_pinned` says False)."""

    def factory(*args, pin_memory=False, **kwargs):
        return real(*args, **kwargs)

    factory.__name__ = real.__name__
    return factory


_DTYPE = torch.dtype


def _int_device(args: tuple) -> tuple:
    """`t.to(0)` means cuda:0; the parser would ask for an accelerator that a CPU build lacks."""
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return (torch.device("cuda", args[0]),) + tuple(args[1:])
    return args


__all__ = ["Emulator", "Patcher", "current"]
