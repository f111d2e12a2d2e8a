"""The virtual allocator's counts and storages: the Python classes and their C twins (replayer/hot_path.cpp)
count the same bytes, peaks and OOMs, and free what a storage held however it dies."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch

from replayer import memory
from replayer.memory import Allocator

PYTHON = (memory.PyCounts, memory.PyStorage)


@pytest.fixture(params=["python", "c", "c storages, python counts"])
def kinds(request):
    """(Counts, Storage) of one implementation (or a C storage counting against the Python counts)."""
    if request.param == "python":
        return PYTHON
    if memory.Storage is memory.PyStorage:
        pytest.skip("the hot path's library (the C twins) is not built here")
    if request.param == "c":
        return memory.Counts, memory.Storage
    return memory.PyCounts, memory.Storage


def _allocator(capacity: int, kinds: tuple, name: str = "GPU") -> Allocator:
    a = Allocator(capacity, name)
    a.counts = kinds[0](a.counts.usable, a._oom)
    return a


def _exercise(kinds: tuple, seed: int = 7) -> list:
    """A random life of storages on a small device: allocations (some past capacity), frees, peaks reset,
    the cache emptied, a while unbounded; everything the allocator reports along the way."""
    rng = random.Random(seed)
    storage_type = kinds[1]
    a = _allocator(4 * 2**30, kinds, "test GPU")
    live: list = []
    seen: list = []
    for step in range(400):
        roll = rng.random()
        if roll < 0.55:
            try:
                live.append(storage_type(rng.choice([0, 1, 511, 513, 2**20, 2**28, 2**30]), a.counts, None))
            except torch.cuda.OutOfMemoryError as e:
                seen.append(("oom", str(e)))
        elif roll < 0.9 and live:
            live.pop(rng.randrange(len(live)))
        elif roll < 0.95:
            a.reset_peak()
        else:
            a.empty_cache()
        if step == 200:
            with a.unbounded():
                kept = [storage_type(2**30, a.counts, None) for _ in range(6)]
                seen.append(("unbounded", a.allocated))
            with pytest.raises(torch.cuda.OutOfMemoryError, match="takes .* GiB of a virtual test GPU"):
                a.check("six more GiB")
            del kept
        seen.append((a.stats(), a.free_bytes()))
    return seen


def test_the_c_counts_and_storages_count_exactly_as_the_python_ones(kinds):
    seen = _exercise(kinds)
    assert sum(1 for s in seen if s[0] == "oom") > 5  # the run went past capacity, often
    assert max(s[0]["allocated_bytes.all.peak"] for s in seen if isinstance(s[0], dict)) > 3 * 2**30
    assert seen == _exercise(PYTHON)


def test_a_failed_allocation_counts_nothing_and_raises_the_devices_error(kinds):
    counts, storage = kinds
    a = _allocator(2 * 2**30, kinds)
    assert type(a.counts) is counts
    kept = storage(2**30, a.counts, None)
    with pytest.raises(
        torch.cuda.OutOfMemoryError, match=r"Tried to allocate 1\.00 GiB.*total capacity of 2\.00"
    ):
        storage(2**30, a.counts, None)
    assert a.allocated == 2**30 and a.num_allocs == 1 and a.num_ooms == 1
    del kept
    assert a.allocated == 0 and a.peak == 2**30


def test_a_storage_in_a_reference_cycle_frees_its_bytes_when_collected(kinds):
    _, storage = kinds
    a = _allocator(2**34, kinds)
    s = storage(4096, a.counts, None)
    s.value = [s]  # a cycle: only the garbage collector frees it
    ref = weakref.ref(s)
    del s
    assert a.allocated == 4096
    gc.collect()
    assert ref() is None and a.allocated == 0


def test_a_storage_holds_its_value_and_may_count_nothing(kinds):
    _, storage = kinds
    value = torch.arange(4)
    s = storage(32, None, value)
    assert s.value is value and s.nbytes == 32
    s.value = None
    assert s.value is None
    s.value = True  # known, filled later
    assert s.value is True
