"""Virtual device memory: live bytes of virtual storages, peaks, and out-of-memory like the device's."""

from __future__ import annotations

import contextlib
import operator
import threading
import weakref

import torch

from replayer import native

# The CUDA caching allocator rounds requests up to 512 bytes; engines size caches from these numbers.
_ROUND = 512
# What the CUDA context itself takes on a real H100 (driver, cuBLAS workspaces): seen as the gap between
# total memory and what mem_get_info reports free before the first allocation.
CONTEXT_BYTES = 500 * 2**20
_UNBOUNDED = 1 << 62  # a usable size no allocation reaches


class Allocator:
    """The virtual GPU's memory: what its `counts` hold (bytes live, peaks) against its capacity, in the
    figures `torch.cuda`'s memory functions report; past capacity, `torch.cuda.OutOfMemoryError` as the
    device's."""

    def __init__(self, capacity: int, device_name: str = "GPU"):
        self.capacity = capacity
        self.device_name = device_name
        self.counts = Counts(capacity - CONTEXT_BYTES, self._oom)  # what storages count themselves against

    allocated = property(operator.attrgetter("counts.allocated"))
    peak = property(operator.attrgetter("counts.peak"))
    reserved = property(operator.attrgetter("counts.reserved"))
    peak_reserved = property(operator.attrgetter("counts.peak_reserved"))
    num_allocs = property(operator.attrgetter("counts.num_allocs"))
    num_ooms = property(operator.attrgetter("counts.num_ooms"))

    def empty_cache(self) -> None:
        self.counts.reserved = self.counts.allocated

    @contextlib.contextmanager
    def unbounded(self):
        """Allocate past capacity for a while (a model built whole, then sharded); peaks start over after."""
        c = self.counts
        usable, c.usable = c.usable, _UNBOUNDED
        try:
            yield
        finally:
            c.usable = usable
            self.reset_peak()
            c.reserved = c.allocated

    def check(self, what: str = "what is allocated") -> None:
        """Raise `torch.cuda.OutOfMemoryError` if what is allocated exceeds the GPU (after `unbounded`)."""
        c = self.counts
        if c.allocated > c.usable:
            c.num_ooms += 1
            gib = 2**30
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory: {what} takes {c.allocated / gib:.2f} GiB of a virtual "
                f"{self.device_name} with {c.usable / gib:.2f} GiB usable"
            )

    def reset_peak(self) -> None:
        c = self.counts
        c.peak = c.allocated
        c.peak_reserved = c.reserved

    def free_bytes(self) -> int:
        return max(0, self.capacity - CONTEXT_BYTES - self.reserved)

    def _oom(self, size: int) -> torch.cuda.OutOfMemoryError:
        gib = 2**30
        free = self.capacity - CONTEXT_BYTES - self.allocated
        return torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {size / gib:.2f} GiB. GPU 0 has a total capacity of "
            f"{self.capacity / gib:.2f} GiB of which {max(free, 0) / gib:.2f} GiB is free. "
            f"Of the allocated memory {self.allocated / gib:.2f} GiB is allocated by PyTorch "
            f"(virtual {self.device_name})."
        )

    def stats(self) -> dict[str, int]:
        """The subset of `torch.cuda.memory_stats()` keys that engines read."""
        out = {}
        for name, cur, peak in (
            ("allocated_bytes", self.allocated, self.peak),
            ("reserved_bytes", self.reserved, self.peak_reserved),
            ("active_bytes", self.allocated, self.peak),
            ("requested_bytes", self.allocated, self.peak),
        ):
            out[f"{name}.all.current"] = cur
            out[f"{name}.all.peak"] = peak
            out[f"{name}.all.allocated"] = peak
            out[f"{name}.all.freed"] = peak - cur
        out["num_alloc_retries"] = 0
        out["num_ooms"] = self.num_ooms
        out["allocation.all.current"] = self.num_allocs
        return out


class PyCounts:
    """What the virtual allocator counts: bytes live, peaks, allocations, OOMs. (`Counts` is this class's C
    twin in replayer/hot_path.cpp where that is built: the same fields and rules, no lock needed.)"""

    __slots__ = (
        "usable", "allocated", "peak", "reserved", "peak_reserved", "num_allocs", "num_ooms",
        "on_oom", "_lock",
    )  # fmt: skip

    def __init__(self, usable: int, on_oom):
        self.usable = usable
        self.on_oom = on_oom  # on_oom(size): the OutOfMemoryError to raise for an allocation of `size` bytes
        self.allocated = self.peak = self.reserved = self.peak_reserved = self.num_allocs = self.num_ooms = 0
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> int:
        """Count `nbytes` allocated; returns the size counted (rounded as the caching allocator rounds)."""
        size = (nbytes + _ROUND - 1) // _ROUND * _ROUND
        with self._lock:
            allocated = self.allocated + size
            if allocated > self.usable:
                self.num_ooms += 1
                raise self.on_oom(size)
            self.allocated = allocated
            self.num_allocs += 1
            if allocated > self.peak:
                self.peak = allocated
                # A caching allocator keeps what it once held: reserved follows the high-water mark.
                if allocated > self.reserved:
                    self.reserved = allocated
                    if allocated > self.peak_reserved:
                        self.peak_reserved = allocated
        return size

    def free(self, size: int) -> None:
        with self._lock:
            self.allocated -= size


class PyStorage:
    """A virtual storage: its bytes count against the allocator's counts while any tensor viewing it lives.
    (`Storage` is this class's C twin in replayer/hot_path.cpp where that is built.)

    `value` is the shadow value's CPU storage (a real tensor over the whole storage) or None when the
    contents are unknown; every view of the storage reads its value through it.
    """

    __slots__ = ("nbytes", "_size", "_allocator", "value", "__weakref__")

    def __init__(self, nbytes: int, allocator: Counts | None, value: torch.Tensor | None = None):
        self.nbytes = nbytes
        self._allocator = allocator
        self.value = value
        self._size = 0  # set before alloc: a failed allocation still runs __del__
        if nbytes and allocator is not None:
            self._size = allocator.alloc(nbytes)

    def __del__(self):
        if self._size and self._allocator is not None:
            self._allocator.free(self._size)


def _types() -> tuple[type, type]:
    """(Counts, Storage): the C twins where the hot path's library builds, else the Python classes."""
    lib = native.load_hot_path()
    return lib.revati_memory_types() if lib is not None else (PyCounts, PyStorage)


Counts, Storage = _types()


class Borrowed:
    """A storage seen through a weak reference to its memory (`replayer.tensor.weak_view`): it counts
    nothing against the allocator, and its value is the owner's while the owner lives."""

    __slots__ = ("nbytes", "_owner", "__weakref__")

    def __init__(self, owner: Storage | Borrowed):
        self.nbytes = owner.nbytes
        self._owner = owner._owner if isinstance(owner, Borrowed) else weakref.ref(owner)

    @property
    def value(self) -> torch.Tensor | None:
        owner = self._owner()
        return owner.value if owner is not None else None

    @value.setter
    def value(self, value) -> None:
        owner = self._owner()
        if owner is not None:
            owner.value = value
