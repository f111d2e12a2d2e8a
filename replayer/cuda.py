"""The `torch.cuda` surface of the virtual device: properties, streams, events, graphs, memory, RNG.

Each patched attribute is a distinct function object (torch._dynamo refuses one object under two
names). Times are virtual: events measure the clock, not the wall.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from revati.cost import GRAPH_INSTANTIATE
from revati.op_features import attention_over

if TYPE_CHECKING:
    from replayer.session import Emulator, Patcher

_stream_ids = itertools.count(1)
_pool_ids = itertools.count(1)


@dataclass(frozen=True)
class DeviceProperties:
    """What `torch.cuda.get_device_properties` reports for the virtual GPU."""

    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int
    L2_cache_size: int
    is_integrated: bool = False
    is_multi_gpu_board: bool = False
    max_threads_per_multi_processor: int = 2048
    warp_size: int = 32
    regs_per_multiprocessor: int = 65536
    gcnArchName: str = "NVIDIA"
    uuid: str = "00000000-0000-0000-0000-000000000000"
    pci_bus_id: int = 0
    pci_device_id: int = 0
    pci_domain_id: int = 0
    clock_rate: int = 0

    def __repr__(self):
        gib = self.total_memory / 2**20
        return (
            f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
            f"total_memory={gib:.0f}MB, multi_processor_count={self.multi_processor_count})"
        )


def make_stream_class(emu: Emulator):
    class Stream:
        """A virtual CUDA stream: its own device time line."""

        def __init__(self, device=None, priority=0, **kwargs):
            self.stream_id = next(_stream_ids)
            self.cuda_stream = 0x1000 + self.stream_id  # engines want distinct handles
            self.device = emu.device
            self.priority = priority
            self.device_index = emu.device.index or 0
            self.device_type = 1
            emu.clock.streams.setdefault(self.stream_id, emu.clock.now)

        def wait_event(self, event):
            event.wait(self)

        def wait_stream(self, stream):
            emu.clock.stream_wait(self.stream_id, emu.clock.stream_time(stream.stream_id))

        def record_event(self, event=None):
            event = event or torch.cuda.Event()
            event.record(self)
            return event

        def query(self):
            return emu.clock.stream_time(self.stream_id) <= emu.clock.now

        def synchronize(self):
            emu.clock.sync_stream(self.stream_id)

        def __eq__(self, other):
            return isinstance(other, Stream) and other.stream_id == self.stream_id

        def __hash__(self):
            return hash(self.stream_id)

        def __enter__(self):
            self._prev = emu.clock.current_stream()
            emu.clock.set_stream(self.stream_id)
            return self

        def __exit__(self, *exc):
            emu.clock.set_stream(self._prev)

        def __repr__(self):
            return f"<torch.cuda.Stream device=cuda:0 cuda_stream={self.cuda_stream:#x}>"

    return Stream


def make_event_class(emu: Emulator):
    class Event:
        """A virtual CUDA event: records a stream's device time; `elapsed_time` in virtual ms."""

        def __init__(self, enable_timing=False, blocking=False, interprocess=False, external=False):
            self.enable_timing = enable_timing
            self.time: float | None = None

        def record(self, stream=None):
            sid = stream.stream_id if stream is not None else emu.clock.current_stream()
            clock = emu.clock
            self.time = clock.start_time(sid)
            clock.streams[sid] = self.time
            clock.advance(emu.cost.host_time("cudaEventRecord") * 0.2)

        def wait(self, stream=None):
            if self.time is not None:
                sid = stream.stream_id if stream is not None else emu.clock.current_stream()
                emu.clock.stream_wait(sid, self.time)

        def query(self):
            return self.time is None or self.time <= emu.clock.now

        def synchronize(self):
            if self.time is not None:
                emu.clock.advance_to(self.time + emu.cost.sync_latency)

        def elapsed_time(self, end):
            if self.time is None or end.time is None:
                raise RuntimeError("Both events must be recorded before calculating elapsed time.")
            return (end.time - self.time) * 1000.0

    return Event


class Graph:
    """A virtual CUDA graph: capture sums the predicted device time; replay advances a stream in O(1)."""

    def __init__(self, emu: Emulator, keep_graph: bool = False):
        self._emu = emu
        self.duration = 0.0
        self.ops = 0
        self.kernels = 0
        self.replays = 0
        self.captured = False
        # Shadow-value updates a replay performs: captured ops on small known tensors (positions, token
        # ids) run again on the host; the device time stays one O(1) advance of the stream.
        self.on_replay: list = []
        # Attention kernels whose cost follows the sequence lengths in a buffer (`follow`): ((key, features as
        # a tuple, dtype, K / V element size), features, captured duration, lengths tensor, indptr entries).
        self.following: list = []

    def capture_begin(self, pool=None, capture_error_mode="global"):
        self._emu.clock.begin_capture(self)

    def capture_end(self):
        emu = self._emu
        emu.clock.end_capture()
        # ending the capture instantiates the graph on the host, node by node (cost.GRAPH_INSTANTIATE)
        emu.clock.advance(getattr(emu.cost, "graph_instantiate", GRAPH_INSTANTIATE) * self.kernels)
        self.captured = True
        emu.graphs_captured += 1

    def follow(self, key, features, dtype, duration, lengths, element_size, indptr: int = 0) -> None:
        """A captured kernel reads its sequence lengths from `lengths` (a static buffer; with `indptr` > 0,
        their running sums in its first `indptr` entries): a replay prices it over the longest of them then,
        as the GPU runs it over the lengths it finds."""
        same = (key, tuple(sorted(features.items())), dtype, element_size)  # the layers of a model share it
        self.following.append((same, features, duration, lengths, indptr))

    def _length_correction(self) -> float:
        """Device seconds the following kernels take at this replay beyond their captured durations."""
        emu, extra = self._emu, 0.0
        longest: dict[tuple, float | None] = {}  # every layer's attention reads the same lengths buffer
        for same, features, captured, lengths, indptr in self.following:
            seen = (id(lengths), indptr)
            if seen not in longest:
                value = lengths.value()
                if value is not None and indptr:
                    value = value[1:indptr] - value[: indptr - 1]
                longest[seen] = float(value.max()) if value is not None and value.numel() else None
            kv_len = longest[seen]
            if kv_len is None:
                continue
            price = emu.replay_prices.get((same, kv_len))
            if price is None:
                key, _, dtype, size = same
                price = emu.cost.device_time(key, attention_over(features, kv_len, size), dtype)
                emu.replay_prices[(same, kv_len)] = price
            extra += price - captured
        return extra

    def replay(self):
        emu = self._emu
        emu.clock.advance(emu.cost.host_time("cudaGraphLaunch"))
        duration = self.duration + (self._length_correction() if self.following else 0.0)
        emu.clock.advance_stream(emu.clock.current_stream(), duration)
        for update in self.on_replay:
            update()
        self.replays += 1
        emu.graph_replays += 1

    def reset(self):
        self.duration, self.ops, self.captured = 0.0, 0, False
        self.on_replay.clear()
        self.following.clear()

    def pool(self):
        return (0, id(self))

    def enable_debug_mode(self):
        pass

    def debug_dump(self, path):
        pass


def install(emu: Emulator, patch: Patcher) -> None:
    """Patch `torch.cuda` (and `torch.accelerator`, `torch.version.cuda`) to report the virtual GPU."""
    cuda = torch.cuda
    spec = emu.gpu
    props = DeviceProperties(
        name=spec.name,
        major=spec.compute_capability[0],
        minor=spec.compute_capability[1],
        total_memory=spec.memory_bytes,
        multi_processor_count=spec.sm_count,
        L2_cache_size=spec.l2_bytes,
        clock_rate=spec.clock_mhz * 1000,
    )
    Stream = make_stream_class(emu)
    Event = make_event_class(emu)
    default_stream = Stream()
    default_stream.stream_id, default_stream.cuda_stream = 0, 0
    streams: dict[int, object] = {0: default_stream}
    local = threading.local()

    def _stream_of(sid):
        return streams.get(sid, default_stream)

    def is_available():
        return True

    def device_count():
        return emu.device_count

    def current_device():
        return getattr(local, "device", emu.device.index or 0)

    def set_device(device):
        index = device if isinstance(device, int) else torch.device(device).index
        local.device = index or 0

    def get_device_name(device=None):
        return spec.name

    def get_device_properties(device=None):
        return props

    def get_device_capability(device=None):
        return tuple(spec.compute_capability)

    def synchronize(device=None):
        emu.clock.sync_all()
        emu.clock.advance(emu.cost.sync_latency)

    def current_stream(device=None):
        return _stream_of(emu.clock.current_stream())

    def default_stream_fn(device=None):
        return default_stream

    def set_stream(stream):
        streams[stream.stream_id] = stream
        emu.clock.set_stream(stream.stream_id)

    class StreamContext:
        """`torch.cuda.stream(s)`: reusable, as torch's is (SGLang keeps one and enters it every step)."""

        def __init__(self, stream):
            self.stream = stream
            self._previous: list[int] = []

        def __enter__(self):
            if self.stream is not None:
                streams[self.stream.stream_id] = self.stream
                self._previous.append(emu.clock.current_stream())
                emu.clock.set_stream(self.stream.stream_id)
            return self.stream

        def __exit__(self, *exc):
            if self.stream is not None:
                emu.clock.set_stream(self._previous.pop())
            return False

    def stream(stream):
        return StreamContext(stream)

    def mem_get_info(device=None):
        a = emu.allocator
        return (a.free_bytes(), a.capacity)

    def memory_allocated(device=None):
        return emu.allocator.allocated

    def max_memory_allocated(device=None):
        return emu.allocator.peak

    def memory_reserved(device=None):
        return emu.allocator.reserved

    def max_memory_reserved(device=None):
        return emu.allocator.peak_reserved

    def memory_stats(device=None):
        return emu.allocator.stats()

    def reset_peak_memory_stats(device=None):
        emu.allocator.reset_peak()

    def reset_max_memory_allocated(device=None):
        emu.allocator.reset_peak()

    def empty_cache():
        emu.allocator.empty_cache()

    def noop_seed(seed=None):
        return None

    def seed():
        return None

    def initial_seed():
        return 0

    def get_rng_state(device="cuda"):
        return torch.zeros(16, dtype=torch.uint8)

    def get_rng_state_all():
        return [torch.zeros(16, dtype=torch.uint8)]

    def set_rng_state(new_state, device="cuda"):
        return None

    def lazy_init():
        return None

    def is_initialized():
        return True

    def init():
        return None

    def is_bf16_supported(including_emulation=True):
        return spec.compute_capability >= (8, 0)

    def get_arch_list():
        return ["sm_80", "sm_86", "sm_90"]

    def is_current_stream_capturing():
        return emu.clock.capturing() is not None

    class CUDAGraph(Graph):  # a class, not a factory: engines annotate with it and check isinstance
        def __init__(self, keep_graph=False):
            super().__init__(emu, keep_graph)

    class MemPool:
        """A private memory pool (CUDA graphs share one): the virtual allocator counts bytes, not pools."""

        def __init__(self, allocator=None, use_on_oom=False, **kwargs):
            self.id = (0, next(_pool_ids))
            self.allocator = allocator

        def use_count(self):
            return 1

        def snapshot(self):
            return []

    @contextlib.contextmanager
    def use_mem_pool(pool, device=None):
        yield

    def graph_pool_handle():
        return (0, 0)

    class graph:  # noqa: N801 - torch.cuda.graph's name
        """`with torch.cuda.graph(g):` — capture on a side stream, as the real context manager does."""

        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            self.cuda_graph = cuda_graph
            self.stream = stream

        def __enter__(self):
            synchronize()
            self._prev = emu.clock.current_stream()
            if self.stream is not None:
                emu.clock.set_stream(self.stream.stream_id)
            self.cuda_graph.capture_begin()

        def __exit__(self, *exc):
            self.cuda_graph.capture_end()
            emu.clock.set_stream(self._prev)

    class device:  # noqa: N801 - torch.cuda.device's name
        def __init__(self, device):
            self.idx = device if isinstance(device, int) else getattr(torch.device(device), "index", 0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def nvtx_push(msg):
        return 0

    def nvtx_pop():
        return 0

    def nvtx_mark(msg):
        return None

    @contextlib.contextmanager
    def nvtx_range(msg, *args, **kwargs):
        yield

    patch.set(cuda, "is_available", is_available)
    patch.set(cuda, "device_count", device_count)
    patch.set(cuda, "current_device", current_device)
    patch.set(cuda, "set_device", set_device)
    patch.set(cuda, "get_device_name", get_device_name)
    patch.set(cuda, "get_device_properties", get_device_properties)
    patch.set(cuda, "get_device_capability", get_device_capability)
    patch.set(cuda, "synchronize", synchronize)
    patch.set(cuda, "current_stream", current_stream)
    patch.set(cuda, "default_stream", default_stream_fn)
    patch.set(cuda, "set_stream", set_stream)
    patch.set(cuda, "stream", stream)
    patch.set(cuda, "Stream", Stream)
    patch.set(cuda, "Event", Event)
    patch.set(cuda, "mem_get_info", mem_get_info)
    patch.set(cuda, "memory_allocated", memory_allocated)
    patch.set(cuda, "max_memory_allocated", max_memory_allocated)
    patch.set(cuda, "memory_reserved", memory_reserved)
    patch.set(cuda, "max_memory_reserved", max_memory_reserved)
    patch.set(cuda, "memory_stats", memory_stats)
    patch.set(cuda, "reset_peak_memory_stats", reset_peak_memory_stats)
    patch.set(cuda, "reset_max_memory_allocated", reset_max_memory_allocated)
    patch.set(cuda, "empty_cache", empty_cache)
    patch.set(cuda, "get_allocator_backend", lambda: "native")  # a caching allocator, as the virtual one is
    patch.set(cuda.memory, "get_allocator_backend", lambda: "native")
    patch.set(cuda, "manual_seed", noop_seed)
    patch.set(cuda, "manual_seed_all", lambda seed: None)
    patch.set(cuda, "seed", seed)
    patch.set(cuda, "seed_all", lambda: None)
    patch.set(cuda, "initial_seed", initial_seed)
    patch.set(cuda, "get_rng_state", get_rng_state)
    patch.set(cuda, "get_rng_state_all", get_rng_state_all)
    patch.set(cuda, "set_rng_state", set_rng_state)
    patch.set(cuda, "set_rng_state_all", lambda new_states: None)
    patch.set(cuda, "_lazy_init", lazy_init)
    patch.set(cuda, "is_initialized", is_initialized)
    patch.set(cuda, "init", init)
    patch.set(cuda, "is_bf16_supported", is_bf16_supported)
    patch.set(cuda, "get_arch_list", get_arch_list)
    patch.set(cuda, "is_current_stream_capturing", is_current_stream_capturing)
    patch.set(cuda, "CUDAGraph", CUDAGraph)
    patch.set(cuda, "MemPool", MemPool)
    patch.set(cuda, "use_mem_pool", use_mem_pool)
    patch.set(cuda, "graph", graph)
    patch.set(cuda, "graph_pool_handle", graph_pool_handle)
    patch.set(cuda, "device", device)
    patch.set(cuda.nvtx, "range_push", nvtx_push)
    patch.set(cuda.nvtx, "range_pop", nvtx_pop)
    patch.set(cuda.nvtx, "mark", nvtx_mark)
    patch.set(cuda.nvtx, "range", nvtx_range)
    patch.set(torch.version, "cuda", "12.8")
    real_get_device_module = torch.get_device_module

    def get_device_module(device=None):
        if device is None or torch.device(device).type == "cuda":
            return torch.cuda
        return real_get_device_module(device)

    patch.set(torch, "get_device_module", get_device_module)
    patch.set(torch, "Generator", _generator_class())
    _install_accelerator(emu, patch, synchronize)
    _install_runtime(emu, patch)


def _generator_class():
    """`torch.Generator(device="cuda")`: a CUDA generator needs the CUDA library, so it is a CPU generator
    that says it is on the GPU (what seeds it, and the shadow values it draws, are real; the rest has no
    data to draw). SGLang's dummy weights and vLLM's samplers make one."""

    class Generator(torch._C.Generator):
        def __new__(cls, device="cpu"):
            device = torch.device(device)
            if device.type != "cuda":
                return torch._C.Generator(device)
            generator = torch._C.Generator.__new__(cls)
            generator._virtual_device = torch.device("cuda", device.index or 0)
            return generator

        @property
        def device(self):
            return self._virtual_device

    return Generator


def _install_runtime(emu: Emulator, patch: Patcher) -> None:
    """cuda-python's CUDA runtime binding, where it is installed: an engine that asks the runtime itself, not
    torch, whether a stream captures (SGLang's breakable prefill graphs) gets the virtual clock's answer."""
    try:
        if importlib.util.find_spec("cuda.bindings") is None:
            return
        from cuda.bindings import runtime
    except ImportError:
        return

    def cudaStreamGetCaptureInfo(stream):  # noqa: N802 - the runtime's name
        status = runtime.cudaStreamCaptureStatus
        active = emu.clock.capturing() is not None  # the calling thread captures on its streams
        return (
            runtime.cudaError_t.cudaSuccess,
            status.cudaStreamCaptureStatusActive if active else status.cudaStreamCaptureStatusNone,
            0, None, None, None, 0,
        )  # fmt: skip

    patch.set(runtime, "cudaStreamGetCaptureInfo", cudaStreamGetCaptureInfo)


def _install_accelerator(emu: Emulator, patch: Patcher, synchronize) -> None:
    acc = getattr(torch, "accelerator", None)
    if acc is None:
        return

    def acc_is_available():
        return True

    def current_accelerator(check_available=False):
        return torch.device("cuda")

    def acc_device_count():
        return emu.device_count

    def current_device_index():
        return emu.device.index or 0

    def acc_synchronize(device=None):
        synchronize()

    patch.set(acc, "is_available", acc_is_available)
    patch.set(acc, "current_accelerator", current_accelerator)
    patch.set(acc, "device_count", acc_device_count)
    patch.set(acc, "current_device_index", current_device_index)
    patch.set(acc, "current_device_idx", lambda: emu.device.index or 0)
    patch.set(acc, "synchronize", acc_synchronize)
    patch.set(acc, "set_device_index", lambda device_index: torch.cuda.set_device(device_index))
    # transformers and DeviceMesh pick their device type from the C-level accelerator (cpu on a CPU build)
    patch.set(torch._C, "_get_accelerator", lambda check=False: torch.device("cuda"))
    # torch.accelerator re-exports its memory functions: both names are patched, each with its own function
    # object (torch._dynamo refuses one object under two names).
    a = emu.allocator
    memory = {
        "memory_allocated": lambda: lambda device=None: a.allocated,
        "max_memory_allocated": lambda: lambda device=None: a.peak,
        "memory_reserved": lambda: lambda device=None: a.reserved,
        "max_memory_reserved": lambda: lambda device=None: a.peak_reserved,
        "memory_stats": lambda: lambda device=None: a.stats(),
        "empty_cache": lambda: lambda: a.empty_cache(),
        "empty_host_cache": lambda: lambda: None,
        "reset_peak_memory_stats": lambda: lambda device=None: a.reset_peak(),
        "reset_accumulated_memory_stats": lambda: lambda device=None: None,
        "get_memory_info": lambda: lambda device=None: (a.free_bytes(), a.capacity),
    }
    for target in (acc, getattr(acc, "memory", None)):
        for name, make in memory.items():
            if target is not None and hasattr(target, name):
                patch.set(target, name, make())
