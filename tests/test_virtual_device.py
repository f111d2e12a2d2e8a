"""The virtual CUDA device: what torch.cuda reports, how the clock moves, memory, graphs, shadow values."""

from __future__ import annotations

import asyncio
import copy
import gc
import queue
import threading
import time

import pytest
import torch

from replayer.memory import CONTEXT_BYTES
from replayer.tensor import VTensor
from revati.hardware import gpu

_real_perf_counter = time.perf_counter
_real_condition_wait = threading.Condition.wait
_real_thread_start = threading.Thread.start
_real_simple_queue = queue.SimpleQueue

D = 1e-3  # seconds one aten::mm keeps its stream busy, in most tests here
LONG = 1.0  # seconds one aten::bmm keeps its stream busy
H100 = gpu("h100")


def _mm():
    a = torch.empty(64, 64, device="cuda")
    return a @ a


def _stream_time(emu, stream=0):
    return emu.clock.streams[stream]


# -- the torch.cuda surface ----------------------------------------------------------------------


def test_torch_cuda_reports_the_virtual_h100(emulate):
    emulate()
    assert torch.cuda.is_available()
    assert torch.cuda.device_count() == 1
    assert torch.cuda.current_device() == 0
    assert torch.cuda.get_device_name() == H100.name == "NVIDIA H100 80GB HBM3"
    props = torch.cuda.get_device_properties(0)
    assert props.name == H100.name
    assert props.total_memory == H100.memory_bytes
    assert props.multi_processor_count == H100.sm_count == 132
    assert (props.major, props.minor) == H100.compute_capability == (9, 0)
    assert torch.cuda.get_device_capability() == (9, 0)
    assert torch.version.cuda is not None


def test_a_cuda_tensor_is_a_virtual_tensor_on_cuda0(emulate):
    emulate()
    x = torch.empty(3, 4, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(2, device="cpu").cuda()
    for t in (x, y, x.t(), x + 1):
        assert type(t) is VTensor
        assert t.device == torch.device("cuda", 0)
        assert t.is_cuda
    assert x.shape == (3, 4) and x.dtype == torch.bfloat16


def test_everything_is_restored_when_the_emulator_exits(emulate):
    built_for_cuda = torch.version.cuda  # None on a CPU build; the PyPI CUDA build has its own
    emu = emulate()
    assert time.perf_counter is not _real_perf_counter
    assert "Virtual" in type(asyncio.get_event_loop_policy()).__name__
    emu.deactivate()
    assert not torch.cuda.is_available()  # no GPU on this machine, whatever the build
    assert torch.version.cuda == built_for_cuda
    assert time.perf_counter is _real_perf_counter
    assert threading.Condition.wait is _real_condition_wait
    assert threading.Thread.start is _real_thread_start
    assert queue.SimpleQueue is _real_simple_queue
    assert "Virtual" not in type(asyncio.get_event_loop_policy()).__name__
    # no CUDA tensor any more: a CPU build says it was not compiled with CUDA (an AssertionError before its
    # device guard is loaded), a CUDA build that it finds no driver
    with pytest.raises((RuntimeError, AssertionError)):
        torch.empty(2, device="cuda")


def test_only_one_emulator_is_active_at_a_time(emulate):
    emulate()
    with pytest.raises(RuntimeError, match="already active"):
        emulate()


# -- the clock -----------------------------------------------------------------------------------


def test_events_on_a_busy_stream_measure_exactly_the_ops_between_them(emulate):
    emu = emulate(
        device={"aten::mm": D, "aten::bmm": LONG},
        host={"aten::mm": 10e-6, "aten::bmm": 10e-6, "cudaEventRecord": 5e-6},
        launch_latency=5e-6,
    )
    x = torch.empty(2, 64, 64, device="cuda")
    torch.bmm(x, x)  # keeps the stream busy long after the host has issued the rest
    assert _stream_time(emu) >= LONG
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    _mm()
    _mm()
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) == pytest.approx(2 * D * 1000, rel=1e-9)


def test_a_launch_on_an_idle_stream_starts_one_launch_latency_after_the_host_issues_it(emulate):
    emu = emulate(device={"aten::mm": D}, host={"aten::mm": 7e-6}, launch_latency=5e-6)
    torch.cuda.synchronize()
    host = emu.clock.now
    _mm()
    _, _, issued, host_cost, start, duration, stream, _ = emu.ops[-1]
    assert (issued, host_cost, duration, stream) == (host, 7e-6, D, 0)
    assert start == pytest.approx(host + 5e-6, abs=1e-15)
    assert emu.clock.now == pytest.approx(host + 7e-6, abs=1e-15)
    assert _stream_time(emu) == pytest.approx(host + 5e-6 + D, abs=1e-15)


def test_work_on_two_streams_overlaps(emulate):
    emu = emulate(device={"aten::mm": D})
    side = torch.cuda.Stream()
    for _ in range(5):
        _mm()
    with torch.cuda.stream(side):
        assert torch.cuda.current_stream() == side
        for _ in range(5):
            _mm()
    assert torch.cuda.current_stream() != side
    torch.cuda.synchronize()
    assert emu.clock.now == pytest.approx(5 * D)  # not 10 D: the streams ran side by side
    assert _stream_time(emu, side.stream_id) == pytest.approx(5 * D)


def test_a_stream_context_can_be_entered_again_and_nested(emulate):
    emu = emulate(device={"aten::mm": D})
    side, other = torch.cuda.Stream(), torch.cuda.Stream()
    context = torch.cuda.stream(side)  # kept and entered every step, as SGLang's scheduler does
    for _ in range(2):
        with context:
            assert torch.cuda.current_stream() == side
            with torch.cuda.stream(other):
                assert torch.cuda.current_stream() == other
            assert torch.cuda.current_stream() == side
            _mm()
        assert torch.cuda.current_stream() != side
    torch.cuda.synchronize()
    assert _stream_time(emu, side.stream_id) == pytest.approx(2 * D)


def test_engine_plumbing_a_cpu_build_lacks_works_under_emulation(emulate):
    from torch.utils._device import _device_constructors

    _device_constructors.cache_clear()  # as in a fresh process whose first device context is emulated
    emulate(device={"aten::mm": D})
    generator = torch.Generator(device="cuda")  # a CUDA generator needs the CUDA library
    assert generator.device == torch.device("cuda", 0) and isinstance(generator, torch.Generator)
    assert generator.manual_seed(7).initial_seed() == 7
    weights = torch.empty(8, 8, device="cuda").uniform_(-1, 1, generator=generator)
    assert weights.device.type == "cuda" and weights.shape == (8, 8)
    assert torch.Generator().device == torch.device("cpu")
    host = torch.zeros(4, dtype=torch.int64, pin_memory=True)  # no pinned allocator on a CPU-only build
    assert host.tolist() == [0, 0, 0, 0]
    with torch.device("cuda"):  # the factories, wrapped for pin_memory, still take the device context's
        assert type(torch.empty(3)) is VTensor and type(torch.ones(2, 2)) is VTensor
    ids = torch.ones(4, dtype=torch.int64, device="cuda")
    ids.record_stream(torch.cuda.current_stream())  # the caching allocator's bookkeeping: accepted
    host.copy_(ids, non_blocking=True)
    torch.cuda.synchronize()
    assert host.tolist() == [1, 1, 1, 1]


def test_generator_and_factories_are_torch_s_own_outside_emulation(emulate):
    emu = emulate()
    emu.deactivate()
    assert torch.Generator is torch._C.Generator
    assert torch.empty is torch._C._VariableFunctions.empty
    with pytest.raises(RuntimeError):
        torch.Generator(device="cuda")


def test_synchronize_brings_the_host_to_the_latest_stream(emulate):
    emu = emulate(device={"aten::mm": D})
    side = torch.cuda.Stream()
    _mm()
    with torch.cuda.stream(side):
        for _ in range(3):
            _mm()
    assert emu.clock.now < D
    torch.cuda.synchronize()
    assert emu.clock.now >= max(emu.clock.streams.values())
    assert emu.clock.now == pytest.approx(3 * D)


@pytest.mark.parametrize("read", ["item", "cpu", "tolist"])
def test_a_host_read_waits_for_the_stream(emulate, read):
    emu = emulate(device={"aten::mm": D})
    small = torch.tensor([7], device="cuda")
    for _ in range(4):
        _mm()
    assert emu.clock.now < D
    value = getattr(small, read)()
    assert emu.clock.now == pytest.approx(4 * D)
    assert emu.clock.now >= _stream_time(emu)
    if read == "cpu":
        assert torch.equal(value, torch.tensor([7]))
    else:
        assert value == {"item": 7, "tolist": [7]}[read]


def test_perf_counter_differences_are_virtual_time(emulate):
    emu = emulate(device={"aten::mm": D})
    p0, m0, v0 = time.perf_counter(), time.monotonic(), emu.clock.now
    for _ in range(10):
        _mm()
    torch.cuda.synchronize()
    assert time.perf_counter() - p0 == pytest.approx(emu.clock.now - v0, abs=1e-9)
    assert time.monotonic() - m0 == pytest.approx(10 * D, abs=1e-9)


# -- memory --------------------------------------------------------------------------------------


def test_a_weak_view_sees_a_tensor_without_keeping_its_memory_allocated(emulate):
    from replayer.tensor import weak_view

    emulate()
    before = torch.cuda.memory_allocated()
    positions = torch.arange(1024, device="cuda")  # 8 KB with a value
    weak = weak_view(positions)
    assert torch.cuda.memory_allocated() - before == 8192  # the view owns nothing
    assert weak.shape == positions.shape and weak.cpu().tolist() == list(range(1024))
    positions.add_(1)  # the owner's value changes: the view reads it
    assert weak.cpu()[0].item() == 1
    del positions
    assert torch.cuda.memory_allocated() == before  # gone with its owner, as on the GPU


def test_a_deep_copy_takes_new_device_memory_and_keeps_views_values_and_parameters(emulate):
    emulate()
    layer = torch.nn.Linear(64, 32, device="cuda")
    before = torch.cuda.memory_allocated()
    twin = copy.deepcopy(layer)
    assert torch.cuda.memory_allocated() - before == 64 * 32 * 4 + 512  # weight, bias rounded up
    assert twin.weight is not layer.weight and twin.weight.shape == (32, 64)
    assert type(twin.weight) is type(layer.weight) and twin.weight.requires_grad
    assert isinstance(twin.weight, torch.nn.Parameter) == isinstance(layer.weight, torch.nn.Parameter)
    del twin
    assert torch.cuda.memory_allocated() == before
    base = torch.arange(10, device="cuda")
    pair = copy.deepcopy([base, base[2:5]])  # copied together: the view still views the copy
    pair[0].add_(100)
    assert pair[1].tolist() == [102, 103, 104] and base.tolist() == list(range(10))


def test_memory_allocated_counts_live_tensors_rounded_to_512_bytes(emulate):
    emulate()
    before = torch.cuda.memory_allocated()
    x = torch.empty(1000, dtype=torch.uint8, device="cuda")
    assert torch.cuda.memory_allocated() - before == 1024
    y = torch.empty(256, 1024, dtype=torch.bfloat16, device="cuda")
    assert torch.cuda.memory_allocated() - before == 1024 + 512 * 1024
    view = y[:10]  # a view shares its base's storage
    assert torch.cuda.memory_allocated() - before == 1024 + 512 * 1024
    z = torch.empty(1000, 3, dtype=torch.bfloat16, device="cuda")  # 6000 bytes
    assert torch.cuda.memory_allocated() - before == 1024 + 512 * 1024 + 6144
    del y, z
    gc.collect()
    assert torch.cuda.memory_allocated() - before == 1024 + 512 * 1024  # the view keeps y's storage
    del view, x
    gc.collect()
    assert torch.cuda.memory_allocated() == before


def test_max_memory_allocated_is_the_peak(emulate):
    emulate()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    x = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
    del x
    gc.collect()
    y = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    assert torch.cuda.max_memory_allocated() == base + (4 << 20)
    assert torch.cuda.memory_allocated() == base + (1 << 20)
    del y


def test_mem_get_info_is_consistent_with_allocations(emulate):
    emulate()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    assert total == H100.memory_bytes
    assert free == total - CONTEXT_BYTES - torch.cuda.memory_reserved()
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    assert torch.cuda.mem_get_info() == (free - (1 << 30), total)
    del x
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.mem_get_info() == (free, total)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no noise from the failed one
def test_allocating_past_capacity_raises_out_of_memory_and_changes_nothing(emulate):
    emulate()
    x = torch.empty(10 << 30, dtype=torch.uint8, device="cuda")
    allocated = torch.cuda.memory_allocated()
    with pytest.raises(torch.cuda.OutOfMemoryError) as err:
        torch.empty(100 << 30, dtype=torch.uint8, device="cuda")
    assert isinstance(err.value, torch.OutOfMemoryError)
    message = str(err.value)
    assert "Tried to allocate 100.00 GiB" in message
    assert f"total capacity of {H100.memory_bytes / 2**30:.2f} GiB" in message
    assert torch.cuda.memory_allocated() == allocated
    with pytest.raises(torch.cuda.OutOfMemoryError):  # an op's output, too
        torch.empty(70 << 30, dtype=torch.uint8, device="cuda").add(x[:1])
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_stats()["num_ooms"] == 2
    del x


# -- CUDA graphs ---------------------------------------------------------------------------------


def _capture(n_ops: int):
    g = torch.cuda.CUDAGraph()
    a = torch.empty(64, 64, device="cuda")
    with torch.cuda.graph(g):
        for _ in range(n_ops):
            a @ a
    return g


def test_a_graph_replay_advances_the_stream_by_the_captured_duration(emulate):
    emu = emulate(device={"aten::mm": D}, host={"aten::mm": 1e-5, "cudaGraphLaunch": 1e-5})
    g = _capture(3)
    torch.cuda.synchronize()
    assert _stream_time(emu) == 0.0  # capture records the work, it does not run it
    t0 = emu.clock.now
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    assert emu.clock.now - t0 == pytest.approx(1e-5 + 10 * 3 * D)  # first launch, then back to back
    assert emu.graph_replays == 10


def test_ending_a_capture_instantiates_the_graph_on_the_host_node_by_node(emulate):
    # a profile that measured 7 µs of instantiation per captured kernel; views launch none
    emu = emulate(device={"aten::mm": D}, host={"aten::mm": 1e-5}, cost_extra={"graph_instantiate": 7e-6})
    t0 = time.perf_counter()
    _capture(4)
    captured = time.perf_counter() - t0
    t0 = time.perf_counter()
    _capture(8)
    assert time.perf_counter() - t0 - captured == pytest.approx(4 * (1e-5 + 7e-6))
    assert emu.graphs_captured == 2


_test_ops = torch.library.Library("revati_test", "FRAGMENT")


def _paged_attention_op():
    """A paged attention kernel as an engine's GPU library defines it (vLLM's FlashAttention 3)."""
    from replayer.shims import define
    from revati.op_features import attention

    schema = (
        "paged_attention(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor seqused_k, "
        "int max_seqlen_q, int max_seqlen_k, Tensor block_table, bool is_causal) -> Tensor"
    )
    define(_test_ops, schema, lambda query, *rest: torch.empty_like(query), features=attention,
           key="revati::attention")  # fmt: skip
    return torch.ops.revati_test.paged_attention


def test_a_replayed_attention_kernel_is_priced_over_the_lengths_its_buffer_then_holds(emulate):
    """vLLM captures its decode graphs with every sequence at the model's maximum length; each replay reads
    the lengths the engine has just written into the same buffer, and runs as long as they say."""
    emu = emulate(device={"revati::attention": lambda f: f["kv_len"] * 1e-6})
    attend = _paged_attention_op()
    batch, heads, kv_heads, dim = 4, 8, 2, 64
    q = torch.empty(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
    cache = torch.empty(64, 16, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    lengths = torch.full((batch,), 1024, dtype=torch.int32, device="cuda")
    table = torch.zeros(batch, 64, dtype=torch.int32, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        attend(q, cache, cache, cu, lengths, 1, 1024, table, True)

    def replayed(longest: int) -> float:
        lengths.fill_(17)
        lengths[2] = longest  # the engine refills the buffer; the longest sequence sets the pace
        torch.cuda.synchronize()
        before = max(_stream_time(emu), emu.clock.now)
        g.replay()
        torch.cuda.synchronize()
        return _stream_time(emu) - before

    assert replayed(1024) == pytest.approx(1024e-6)  # as captured
    assert replayed(100) == pytest.approx(100e-6)
    assert replayed(600) == pytest.approx(600e-6)


def test_graphs_and_memory_pools_are_the_classes_engines_expect(emulate):
    emu = emulate(device={"aten::mm": D})
    g = torch.cuda.CUDAGraph()
    assert isinstance(g, torch.cuda.CUDAGraph)
    pool = torch.cuda.MemPool()
    assert isinstance(pool.id, tuple)
    a = torch.empty(64, 64, device="cuda")
    with torch.cuda.use_mem_pool(pool), torch.cuda.graph(g, pool=pool.id, stream=torch.cuda.Stream()):
        assert torch.cuda.is_current_stream_capturing()
        a @ a
    assert not torch.cuda.is_current_stream_capturing()
    t0 = max(_stream_time(emu), emu.clock.now)  # the replay starts once the host has instantiated it
    g.replay()
    assert _stream_time(emu) - t0 == pytest.approx(D)


def test_a_graph_replay_updates_the_values_it_writes(emulate):
    emulate()
    pos = torch.tensor([0, 1, 2], device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pos.add_(1)
    assert pos.tolist() == [0, 1, 2]  # capturing records the kernel; it does not run it
    g.replay()
    g.replay()
    assert pos.tolist() == [2, 3, 4]


def test_a_view_of_a_known_value_reads_the_writes_made_after_it(emulate):
    emulate()
    buf = torch.zeros(4, 6, dtype=torch.int64, device="cuda")
    last = buf[:, -1:]  # a view made while the value is known: it shares the value's memory
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        col = buf.T[2]  # captured: a replay does not run it again, it reads whatever buf then holds
        buf.add_(1)
    buf[1, 5] = 7
    assert last.flatten().tolist() == [0, 7, 0, 0] and col.tolist() == [0, 0, 0, 0]
    g.replay()
    assert last.flatten().tolist() == [1, 8, 1, 1] and col.tolist() == [1, 1, 1, 1]
    assert last.value() is not None and last.value().untyped_storage().data_ptr() == (
        buf.value().untyped_storage().data_ptr()
    )


def test_memory_allocated_like_a_known_tensor_is_zeros_and_a_replay_keeps_what_was_written(emulate):
    emulate()
    src = torch.arange(1000, 1256, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        buf = torch.empty_like(src)  # memory taken at capture; a replay allocates nothing
        twice = src * 2
    assert buf.tolist() == [0] * 256
    for _ in range(3):
        buf.copy_(src)
        g.replay()
        assert buf.tolist() == src.tolist() and twice.tolist() == (src * 2).tolist()


def _attention_ops(emu, mask: bool) -> list[str]:
    """The op keys one grouped-query attention call issues (8 query heads over 4 KV heads)."""
    q = torch.empty(1, 8, 1, 32, device="cuda")
    k, v = torch.empty(1, 4, 50, 32, device="cuda"), torch.empty(1, 4, 50, 32, device="cuda")
    m = torch.ones(1, 1, 1, 50, dtype=torch.bool, device="cuda") if mask else None
    before = len(emu.ops)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    assert out.shape == (1, 8, 1, 32)
    return [emu.dispatcher.signatures[row[1]].key for row in emu.ops[before:]]


def test_attention_issues_the_kernels_of_the_device_the_profile_was_recorded_on(emulate):
    # a GPU: the efficient kernel, the KV heads repeated to the query heads first (two copies)
    emu = emulate(ops="all")
    gpu = _attention_ops(emu, mask=False)
    assert gpu.count("revati::attention") == 1 and gpu.count("aten::clone") == 2
    # a boolean mask: one `where` makes it additive, as a CUDA build's sdpa does too
    masked = _attention_ops(emu, mask=True)
    assert masked.count("aten::where") == 1 and "aten::masked_fill" not in masked, masked
    emu.deactivate()
    # a recorded CPU (a synchronous profile): its own flash kernel, grouped heads inside it, and a boolean
    # mask turned into an additive one by one `where`, as a CPU build does
    cpu = _attention_ops(emulate(ops="all", cost_extra={"synchronous": True}), mask=True)
    assert cpu[-2:] == ["aten::where", "revati::attention"], cpu
    assert set(cpu[:-2]) == {"aten::scalar_tensor"}  # the -inf `where` chooses, one op as a recording has it


def test_moving_a_host_tensor_to_the_device_is_a_copy_except_where_the_device_is_the_host(emulate):
    emu = emulate(device={"aten::copy_": 1e-3}, host={"aten::copy_": 1e-5})
    t0 = time.perf_counter()
    x = torch.tensor([1, 2, 3]).to("cuda")
    torch.cuda.synchronize()
    # the clock's origin is whole seconds of a large value: 33109.001 - 33109.0 rounds just under 1e-3
    assert time.perf_counter() - t0 >= 1e-3 - 1e-9 and x.tolist() == [1, 2, 3]
    emu.deactivate()
    # a CPU profile: a CPU run's `.to(device)` copies nothing, and its recording holds no such op
    emulate(device={"aten::copy_": 1e-3}, host={"aten::copy_": 1e-5}, cost_extra={"synchronous": True})
    t0 = time.perf_counter()
    x = torch.tensor([1, 2, 3]).to("cuda")
    assert time.perf_counter() - t0 < 1e-5 and x.tolist() == [1, 2, 3] and x.device.type == "cuda"


def test_a_filling_factory_is_one_kernel_of_its_own_key_as_recordings_hold_it(emulate):
    # not the allocation and `fill_` it is made of: a profile prices `full` as `full`
    emu = emulate(device={"aten::full": 2e-6, "aten::fill_": 9e-6}, ops="all")
    before = len(emu.ops)
    x = torch.full((2, 3), 7, device="cuda")
    big = torch.zeros(1 << 22, device="cuda")  # too big to keep a value: its metadata only
    rows = emu.ops[before:]
    assert [emu.dispatcher.signatures[r[1]].key for r in rows] == ["aten::full", "aten::zeros"]
    assert rows[0][5] == pytest.approx(2e-6)
    assert x.tolist() == [[7, 7, 7], [7, 7, 7]] and x.device.type == "cuda"
    assert big.value() is None and big.shape == (1 << 22,)


def test_a_factory_filled_on_the_device_is_its_own_kernel_not_a_copy(emulate):
    emu = emulate(device={"aten::arange": 2e-6, "aten::copy_": 9e-6}, ops="all")
    before = len(emu.ops)
    positions = torch.arange(3, 9, device="cuda")
    rows = emu.ops[before:]
    assert [emu.dispatcher.signatures[r[1]].key for r in rows] == ["aten::arange"]
    assert rows[0][5] == pytest.approx(2e-6)  # priced as arange, over its 6 elements
    assert positions.tolist() == [3, 4, 5, 6, 7, 8]


def test_a_graph_replay_draws_new_token_ids(emulate):
    emulate()
    logits = torch.empty(2, 1000, device="cuda")  # no values: argmax asks the token oracle
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ids = logits.argmax(-1)
    seen = set()
    for _ in range(5):
        g.replay()
        seen.add(tuple(ids.tolist()))
    assert len(seen) > 1
    assert all(0 <= i < 1000 for row in seen for i in row)


def test_a_graph_replay_dispatches_no_op_whatever_its_size(emulate):
    emu = emulate(device={"aten::mm": D})
    small, large = _capture(1), _capture(1000)
    for g, n in ((small, 1), (large, 1000)):
        ops, logged = emu.dispatcher.ops, len(emu.ops)
        t0 = max(_stream_time(emu), emu.clock.now)
        g.replay()
        assert (emu.dispatcher.ops, len(emu.ops)) == (ops, logged)
        assert _stream_time(emu) - t0 == pytest.approx(n * D)


# -- shadow values -------------------------------------------------------------------------------


def test_small_integer_tensors_keep_exact_values(emulate):
    emu = emulate()
    assert (torch.tensor([[1, 2, 3]], device="cuda") + 1).tolist() == [[2, 3, 4]]
    assert torch.arange(5, device="cuda").sum().item() == 10
    assert emu.synthesized() == {}


def test_argmax_over_logits_without_values_gives_valid_non_special_token_ids(emulate):
    special = {0, 1, 2, 3, 4, 5}
    emu = emulate(special_tokens=special)
    vocab = 8
    logits = torch.randn(4096, vocab, device="cuda")  # too large to keep a float value
    assert logits.value() is None
    ids = logits.argmax(dim=-1).cpu()
    assert ids.shape == (4096,)
    assert ids.dtype == torch.int64
    assert set(ids.tolist()) == set(range(vocab)) - special  # all of the others, none of the special
    assert emu.synthesized() == {"aten::argmax": 4096}


def test_reading_a_float_tensor_without_values_gives_zeros_and_is_counted(emulate):
    emu = emulate()
    x = torch.randn(200, 200, device="cuda")
    host = x.cpu()
    assert host.device.type == "cpu"
    assert torch.equal(host, torch.zeros(200, 200))
    assert emu.synthesized() == {"to_cpu": 200 * 200}


def test_ops_captured_into_a_graph_are_marked_in_the_op_log(emulate):
    emu = emulate(device={"aten::mm": D})
    a = torch.empty(64, 64, device="cuda")
    a @ a
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        a @ a
    rows = emu.take_op_rows()
    mm = [flag for name, flag in zip(rows["name"], rows["in_graph"], strict=True) if name == "aten::mm"]
    assert mm == [False, True]
    assert min(rows["stream"]) >= 0


# -- what vLLM's engine core leans on ----------------------------------------------------------------


def test_unbind_split_and_chunk_are_views_that_allocate_nothing(emulate):
    emulate()
    x = torch.zeros(4, 256, dtype=torch.int32, device="cuda")
    before = torch.cuda.memory_allocated()
    parts = [*x.unbind(0), *x.split(2), *x.chunk(4, dim=1)]
    assert torch.cuda.memory_allocated() == before  # they view x's storage (a list of views, `Tensor(a)[]`)
    x[1, 3] = 7
    assert parts[1][3].item() == 7 and parts[4][1, 3].item() == 7  # and see its writes


def test_a_tensor_sliced_again_and_again_keeps_its_memory_and_no_view_chain(emulate):
    # SGLang's free-slot list is sliced at every step (`free = free[n:]`). Autograd chains a replay function
    # onto each view of a view of a tensor subclass, copied whole at each slice: the slices grew slower with
    # the chain's length (0.9 ms each after 3,000).
    emulate()
    base = torch.arange(100, dtype=torch.int64, device="cuda")
    free = base
    for _ in range(30):
        if free._is_view():  # a slice of a slice is no autograd view: there is no chain to grow
            assert not free[:2]._is_view() and not free[2:]._is_view()
        taken, free = free[:2], free[2:]
    assert free.tolist() == list(range(60, 100)) and taken.tolist() == [58, 59]
    free[1:][0] = -1  # writes through a slice of a slice reach the base's memory
    with torch.inference_mode():
        free[2:][0] = -2
    assert base[61].item() == -1 and base[62].item() == -2 and free[:3].tolist() == [60, -1, -2]
    assert torch.cuda.memory_allocated() == 1024  # the base alone: slices allocate nothing


def test_an_op_on_views_at_other_offsets_reuses_its_signature_unless_it_is_a_view(emulate):
    # HF's paged cache reads each layer's keys through a view of the pool shifted to that layer
    emu = emulate()
    pool = torch.empty(4, 64, 8, device="cuda")
    index = torch.tensor([3, 1, 2], device="cuda")
    layers = list(pool)  # four views, one per offset
    misses = emu.dispatcher.misses
    rows = [torch.index_select(layer, 0, index) for layer in layers]
    assert emu.dispatcher.misses == misses + 1  # one signature for the four layers
    assert {r.shape for r in rows} == {torch.Size([3, 8])}
    shifted = [pool.view(256, 8)[64 * layer :] for layer in range(4)]  # lengths 256, 192, 128, 64
    misses = emu.dispatcher.misses
    rows = [torch.index_select(layer, 0, index[:2]) for layer in shifted]
    assert emu.dispatcher.misses == misses + 2  # the index's slice, then one gather: its source's length
    assert {r.shape for r in rows} == {torch.Size([2, 8])}  # along the dim makes no difference
    ids = torch.arange(64, device="cuda").view(16, 4)  # known values: each call computes its own
    assert [torch.index_select(ids[4 * i :], 0, index[:2])[:, 0].tolist() for i in range(3)] == [
        [12, 4], [28, 20], [44, 36]
    ]  # fmt: skip
    views = [pool[layer].narrow(0, 1, 2) for layer in range(4)]  # a view's offset follows its input's
    assert [v.storage_offset() for v in views] == [512 * layer + 8 for layer in range(4)]


def test_inference_mode_views_and_writes_of_tensors_made_outside_it(emulate):
    emulate()
    ids = torch.zeros(10, dtype=torch.int32, device="cuda")  # a buffer allocated once, before serving
    logits = torch.empty(4, 1000, device="cuda")
    with torch.inference_mode():
        ids[2:4] = 5  # a view of a normal tensor, made in inference mode, written through
        rows = list(logits)  # unbind
        host = ids.cpu()  # `to` reaches the emulator undecomposed in inference mode
    assert host.tolist() == [0, 0, 5, 5, 0, 0, 0, 0, 0, 0]
    assert type(host) is torch.Tensor and len(rows) == 4


def test_factories_under_a_cuda_device_context_build_virtual_tensors(emulate):
    emulate()
    with torch.device("cuda"):  # how engines build models: layers make their buffers with torch.tensor
        scale = torch.tensor(1.0)
        table = torch.as_tensor([1, 2, 3])
    assert type(scale) is VTensor and type(table) is VTensor and scale.dtype == torch.float32
    assert table.tolist() == [1, 2, 3]


def test_a_multiprocessing_wait_with_a_timeout_waits_in_virtual_time(emulate):
    import multiprocessing.connection

    emu = emulate()
    reader, writer = multiprocessing.connection.Pipe(duplex=False)
    start, real = time.perf_counter(), _real_perf_counter()
    assert multiprocessing.connection.wait([reader], timeout=30) == []  # nothing written: the timeout
    assert time.perf_counter() - start == pytest.approx(30, abs=1e-6)  # 30 s passed on the virtual clock
    assert _real_perf_counter() - real < 5
    writer.send(1)
    assert multiprocessing.connection.wait([reader], timeout=30) == [reader]
    assert emu.clock.now - start < 1  # ready at once: no time passed


def test_new_tensor_on_a_virtual_tensor_is_a_virtual_copy(emulate):
    emulate()
    logits = torch.empty(4, 1000, dtype=torch.float16, device="cuda")
    table = logits.new_tensor([1, 2, 3], dtype=torch.int32)  # vLLM's sampler builds its constants so
    assert type(table) is VTensor and table.dtype == torch.int32 and table.tolist() == [1, 2, 3]
    assert type(logits.new_tensor([0.5])) is VTensor and logits.new_tensor([0.5]).dtype == torch.float16
    host = torch.zeros(2).new_tensor([1.0, 2.0])
    assert type(host) is torch.Tensor and host.tolist() == [1.0, 2.0]
