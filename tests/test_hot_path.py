"""The C++ hot path (replayer.hot_path) serves cached ops exactly as the Python path would."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from replayer import hot_path
from revati.engines import run_engine
from revati.models import build_model, load_config
from revati.workloads import parse_workload

# Without Python's headers the hot path cannot build, and every op is emulated in Python (the rest of the
# suite covers that); with them, a fresh install must prove it builds.
pytestmark = pytest.mark.skipif(
    not Path(sysconfig.get_paths()["include"], "Python.h").exists(),
    reason="Python's headers are not installed: the hot path cannot build here",
)


def test_the_hot_path_builds_and_loads():
    assert hot_path.load() is not None, hot_path.unavailable()
    # torch 2.13 and 2.14 (checked) can wrap a tensor in a given class: the outputs are made in C++
    assert hot_path.makes_outputs() or torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


def _served(fn, times: int = 3) -> int:
    """Calls of `fn` after the first that the hot path served itself."""
    fn()
    before = hot_path.served()
    for _ in range(times):
        fn()
    return hot_path.served() - before


def _serve_tiny_llama(emulate, monkeypatch, engine: str, hot: bool):
    monkeypatch.setenv("REVATI_HOT_PATH", "1" if hot else "0")
    emu = emulate(ops="all")
    assert emu.hot_path is hot
    config = load_config("tiny-llama")
    config.eos_token_id = None
    model = build_model(config, "cuda", torch.bfloat16)
    work = parse_workload("poisson:rate=50,n=6,prompt=lognormal(40,0.5),output=fixed(6),seed=3")
    before = hot_path.served()
    results = run_engine(engine, model, work.requests)
    served = hot_path.served() - before
    # streams renumbered in order of first use: a process numbers the streams of all its emulators in turn
    streams: dict = {}
    log = [(*row[:6], streams.setdefault(row[6], len(streams)), *row[7:]) for row in emu.ops]
    log.append(("values computed", emu.dispatcher.value_ops))
    emu.deactivate()
    return results, log, served


@pytest.mark.parametrize("engine", ["hf-generate", "hf-cb"])
def test_a_run_served_by_the_hot_path_logs_the_same_ops_at_the_same_times_as_one_in_python(
    emulate, monkeypatch, engine
):
    results, log, served = _serve_tiny_llama(emulate, monkeypatch, engine, hot=True)
    py_results, py_log, py_served = _serve_tiny_llama(emulate, monkeypatch, engine, hot=False)
    assert py_served == 0 and served > len(log) / 2, (served, len(log))
    assert [r.token_times for r in results] == [r.token_times for r in py_results]
    assert len(log) == len(py_log) > 1000
    assert log == py_log  # op by op: signature, host time, host cost, start, duration, stream, step


def _looks(t: torch.Tensor) -> tuple:
    """Everything about a tensor that code can see, but its contents."""
    keys = str(torch._C._dispatch_keys(t))
    return (type(t), t.shape, t.stride(), t.storage_offset(), t.dtype, t.device, t.untyped_storage().nbytes(),
            t.requires_grad, t.is_inference(), t._is_view(), t._d, keys)  # fmt: skip


@pytest.mark.parametrize("make", [
    lambda x: x[1:, 2:5].t(),  # a view at an offset
    lambda x: torch.cat([x, x], 1),  # a new tensor
    lambda x: x.to(torch.bfloat16).unsqueeze(0).expand(3, -1, -1),  # zero strides
])  # fmt: skip
def test_an_output_the_hot_path_makes_looks_exactly_like_the_one_python_makes(emulate, monkeypatch, make):
    def outputs(hot: bool) -> list:
        monkeypatch.setenv("REVATI_HOT_PATH", "1" if hot else "0")
        emu = emulate()
        x = torch.empty(4, 6, device="cuda")
        before = hot_path.served()
        out = [_looks(make(x)) for _ in range(3)]
        with torch.inference_mode():
            out += [_looks(make(torch.empty(4, 6, device="cuda"))) for _ in range(3)]
        assert (hot_path.served() > before) is hot
        emu.deactivate()
        return out

    assert outputs(hot=True) == outputs(hot=False)


def test_a_small_result_of_inputs_with_values_gets_its_value_though_its_signature_is_cached(emulate):
    emu = emulate()
    assert emu.hot_path
    unknown = torch.empty(3, device="cuda").long()  # integers computed from unknown floats: no value
    assert unknown.value() is None
    assert _served(lambda: unknown + unknown) == 3  # filed: a small output made without a value
    known = torch.tensor([1, 2, 3], device="cuda")  # the same metadata, with a value
    assert (known + known).tolist() == [2, 4, 6]
    assert (known * 2 + known).tolist() == [3, 6, 9]


def test_a_view_of_a_tensor_with_a_value_gets_the_value_of_the_view(emulate):
    emulate()
    unknown = torch.empty(10, device="cuda").long()
    assert _served(lambda: unknown[2:5]) == 3
    known = torch.arange(10, device="cuda")  # same metadata, a value
    assert _served(lambda: known[2:5]) == 3
    assert known[2:5].tolist() == [2, 3, 4]
    view = known[2:5]
    known.add_(10)  # the view's value shares the value's memory, as a view shares the tensor's
    assert view.tolist() == [12, 13, 14]


def test_small_computations_on_values_are_served_with_their_values_and_counted(emulate):
    # a decoding loop's masks and stopping checks: eq, bitwise ops, a Python number added (a wrapped number,
    # keyed by its value: `x + 1` and `x + 2` are not the same call)
    emu = emulate()
    done = torch.tensor([False, True, False], device="cuda")
    lengths = torch.tensor([3, 7, 9], device="cuda")
    value_ops = emu.dispatcher.value_ops
    assert _served(lambda: (lengths == 7) | done) == 6
    assert ((lengths == 7) | done).tolist() == [False, True, False]
    assert ((lengths == 9) | done).tolist() == [False, True, True]
    assert (~done & (lengths > 5)).tolist() == [False, False, True]
    assert _served(lambda: lengths + 1) == 3
    assert (lengths + 1).tolist() == [4, 8, 10] and (lengths + 2).tolist() == [5, 9, 11]
    assert (lengths * 0.5).tolist() == [1.5, 3.5, 4.5]
    assert emu.dispatcher.value_ops - value_ops == 4 * 2 + 2 + 2 + 3 + 4 + 2 + 1  # one per op above


def test_a_computation_on_values_captured_into_a_graph_is_computed_again_at_each_replay(emulate):
    emulate()
    pos = torch.tensor([0, 1, 2], device="cuda")
    assert _served(lambda: pos + 1) == 3  # cached before the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        nxt = pos + 1
        pos.add_(1)
    assert nxt.tolist() == [1, 2, 3] and pos.tolist() == [0, 1, 2]
    g.replay()
    assert nxt.tolist() == [1, 2, 3] and pos.tolist() == [1, 2, 3]
    g.replay()
    assert nxt.tolist() == [2, 3, 4] and pos.tolist() == [2, 3, 4]


def test_a_view_made_in_inference_mode_of_a_tensor_made_outside_it_is_not_an_inference_tensor(emulate):
    emulate()
    weight = torch.empty(64, 32, device="cuda")
    with torch.inference_mode():
        assert _served(weight.t) == 3
        assert not weight.t().is_inference()
        assert torch.empty(4, device="cuda").t().is_inference()


def test_a_dispatch_mode_sees_every_op_even_one_the_hot_path_has_cached(emulate):
    emulate()
    x = torch.empty(256, 256, device="cuda")
    assert _served(lambda: x @ x) == 3
    seen = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Seen():
        out = x @ x
    assert seen == [torch.ops.aten.mm.default] and out.shape == (256, 256)


def test_the_hot_path_keeps_memory_and_the_clock_as_python_does(emulate):
    emu = emulate(device={"aten::mm": 1e-3})
    x = torch.empty(1024, 1024, device="cuda")
    x @ x  # filed
    allocated = torch.cuda.memory_allocated()
    start = emu.clock.stream_time(0)
    outs = [x @ x for _ in range(3)]
    assert torch.cuda.memory_allocated() == allocated + 3 * 1024 * 1024 * 4
    assert emu.clock.stream_time(0) == pytest.approx(start + 3e-3)
    del outs
    assert torch.cuda.memory_allocated() == allocated
    a, b = torch.empty(65536, 1024, device="cuda"), torch.empty(1024, 65536, device="cuda")
    kept = [a @ b]  # 16 GiB each: the fifth does not fit in the H100's 80 GB
    before = hot_path.served()
    with pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA out of memory"):
        for _ in range(9):
            kept.append(a @ b)
    assert len(kept) == 4 and hot_path.served() - before == 3  # the OOM came from the hot path


def test_a_copy_to_the_host_is_still_a_host_tensor_once_copies_on_the_device_are_cached(emulate):
    emulate()
    x = torch.empty(8, 16, device="cuda", dtype=torch.bfloat16)
    assert _served(lambda: x.to(torch.float32)) == 3
    assert _served(lambda: x.to("cuda", torch.float32)) == 3
    host = x.to("cpu", torch.float32)
    assert type(host) is torch.Tensor and host.device.type == "cpu" and host.dtype == torch.float32
    assert x.to(torch.float32).device.type == "cuda"
