"""The recorder's parsing of Kineto (torch.profiler) traces, on hand-built events in the format Kineto writes
and, where present, on a profile captured on a real H100 (tests/fixtures)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from recorder import kineto
from recorder.kineto import KinetoError, composite, parse

FIXTURES = Path(__file__).parent / "fixtures"
# hf-cb with CUDA graphs, tiny-llama, 3-4 requests: on an H100, and on an H200 as the second recording of
# one process (where Kineto numbers host threads apart from the CUDA API calls' threads).
PROFILES = sorted(FIXTURES.glob("kineto_*.json.gz"))


class Trace:
    """Builds a Chrome trace the way Kineto exports one: host ranges, API calls, device activity."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._ext = 0
        self._corr = 1000

    def host(self, name: str, ts: float, dur: float, *, cat: str = "cpu_op", tid: int = 1, **args) -> int:
        self._ext += 1
        self.events.append(
            {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur,
             "args": {"External id": self._ext, **args}}
        )  # fmt: skip
        return self._ext

    def mark(self, name: str, ts: float, dur: float, tid: int = 1) -> int:
        return self.host(name, ts, dur, cat="user_annotation", tid=tid)

    def api(self, name: str, ts: float, ext: int | None, tid: int = 1) -> int:
        self._corr += 1
        args = {"cbid": 1, "correlation": self._corr}
        if ext is not None:
            args["External id"] = ext
        self.events.append({"ph": "X", "cat": "cuda_runtime", "name": name, "pid": 1, "tid": tid, "ts": ts,
                            "dur": 2.0, "args": args})  # fmt: skip
        return self._corr

    def kernel(self, name: str, ts: float, dur: float, corr: int, ext: int | None, stream: int = 7, **extra):
        args = {"device": 0, "stream": stream, "correlation": corr, "grid": [4, 1, 1], "block": [128, 1, 1],
                "shared memory": 1024, **extra}  # fmt: skip
        if ext is not None:
            args["External id"] = ext
        self.events.append({"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream, "ts": ts,
                            "dur": dur, "args": args})  # fmt: skip

    def launch(self, op_ext: int, ts: float, kernel: str, k_ts: float, k_dur: float) -> None:
        self.kernel(kernel, k_ts, k_dur, self.api("cudaLaunchKernel", ts, op_ext), op_ext)

    def dict(self) -> dict:
        return {"traceEvents": list(self.events)}


MM = {"Input Dims": [[8, 64], [64, 32]], "Input type": ["c10::BFloat16", "c10::BFloat16"]}


def test_ops_are_what_dispatch_sees_and_own_the_kernels_of_nested_ops():
    t = Trace()
    t.mark(kineto.MARK_SERVING, 0.0, 0.1)
    t.mark(f"{kineto.MARK_ITERATION}0", 10.0, 100.0)
    t.host("aten::linear", 11.0, 50.0, **MM)  # composite: decomposes before dispatch
    t.host("aten::t", 12.0, 3.0, **{"Input Dims": [[32, 64]], "Input type": ["c10::BFloat16"]})
    t.host("aten::transpose", 12.5, 2.0)  # nested inside aten::t: its implementation
    mm = t.host("aten::mm", 20.0, 30.0, **MM)
    inner = t.host("aten::empty", 21.0, 1.0)  # allocation inside mm
    t.launch(mm, 25.0, "gemm", 40.0, 7.0)
    t.launch(inner, 21.5, "memset", 48.0, 1.0)  # a kernel of a nested op is its owner's
    parsed = parse(t.dict())
    assert [r["name"] for r in parsed.ops] == ["aten::t", "aten::mm"]
    mm_row = parsed.ops[1]
    assert mm_row["input_shapes"] == [[8, 64], [64, 32]] and mm_row["dtypes"] == ["bfloat16", "bfloat16"]
    assert mm_row["device_duration"] == pytest.approx(8e-6)
    assert mm_row["device_start"] == pytest.approx(40e-6)
    assert mm_row["host_start"] == pytest.approx(20e-6) and mm_row["host_duration"] == pytest.approx(30e-6)
    assert all(r["iteration_id"] == 0 and not r["warmup"] for r in parsed.ops)
    assert [k["op_id"] for k in parsed.kernels] == [mm_row["op_id"]] * 2
    assert parsed.kernels[0]["grid"] == [4, 1, 1] and parsed.kernels[0]["shared_memory"] == 1024
    it = parsed.iterations[0]
    assert (it["host_start"], it["host_end"]) == (pytest.approx(10e-6), pytest.approx(110e-6))
    assert (it["device_start"], it["device_end"]) == (pytest.approx(40e-6), pytest.approx(49e-6))


def test_times_are_from_serving_start_and_earlier_ops_are_warmup():
    t = Trace()
    t.host("aten::mm", 100.0, 5.0, **MM)
    t.mark(kineto.MARK_SERVING, 1000.0, 0.1)
    t.host("aten::mm", 1500.0, 5.0, **MM)
    rows = parse(t.dict()).ops
    assert [r["warmup"] for r in rows] == [True, False]
    assert rows[0]["host_start"] == pytest.approx(-900e-6) and rows[1]["host_start"] == pytest.approx(500e-6)


def test_cuda_graph_replays_map_back_to_the_captured_ops():
    t = Trace()
    t.mark(f"{kineto.MARK_CAPTURE}0", 0.0, 100.0)
    a = t.host("aten::mm", 10.0, 20.0, **MM)
    t.api("cudaLaunchKernel", 15.0, a)  # captured: no kernel runs
    b = t.host("aten::silu", 40.0, 10.0, **{"Input Dims": [[8, 32]], "Input type": ["c10::BFloat16"]})
    t.api("cudaLaunchKernel", 45.0, b)
    t.mark(kineto.MARK_SERVING, 150.0, 0.1)
    for i, start in enumerate((200.0, 400.0)):
        t.mark(f"{kineto.MARK_ITERATION}{i}", start, 60.0)
        replay = t.mark(f"{kineto.MARK_REPLAY}0", start + 5, 20.0)
        corr = t.api("cudaGraphLaunch", start + 10, replay)
        t.kernel("gemm", start + 30, 6.0, corr, None)
        t.kernel("silu", start + 37, 2.0 + i, corr, None)
    parsed = parse(t.dict())
    captured = [r for r in parsed.ops if r["parent_id"] is None]
    replayed = [r for r in parsed.ops if r["parent_id"] is not None]
    assert [r["name"] for r in captured] == ["aten::mm", "aten::silu"]
    assert all(r["in_graph"] and r["warmup"] and r["device_duration"] == 0 for r in captured)
    assert [r["parent_id"] for r in replayed] == [captured[0]["op_id"], captured[1]["op_id"]] * 2
    assert [r["iteration_id"] for r in replayed] == [0, 0, 1, 1]
    assert [r["device_duration"] for r in replayed] == pytest.approx([6e-6, 2e-6, 6e-6, 3e-6])
    assert all(r["in_graph"] and not r["warmup"] for r in replayed)
    assert parsed.replays == 2 and parsed.unmapped_replay_kernels == 0
    assert [(k["graph_id"], k["graph_node_id"]) for k in parsed.kernels] == [(0, 0), (0, 1)] * 2
    assert parsed.iterations[1]["device_start"] == pytest.approx(430e-6 - 150e-6)


def test_a_replay_that_does_not_match_its_capture_keeps_its_kernels_unmapped():
    t = Trace()
    t.mark(f"{kineto.MARK_CAPTURE}0", 0.0, 100.0)
    a = t.host("aten::mm", 10.0, 20.0, **MM)
    t.api("cudaLaunchKernel", 15.0, a)
    replay = t.mark(f"{kineto.MARK_REPLAY}0", 200.0, 20.0)
    corr = t.api("cudaGraphLaunch", 205.0, replay)
    t.kernel("gemm", 230, 6.0, corr, None)
    t.kernel("extra", 240, 6.0, corr, None)
    parsed = parse(t.dict())
    assert parsed.unmapped_replay_kernels == 2
    assert [k["op_id"] for k in parsed.kernels] == [None, None]
    assert len(parsed.ops) == 1


def test_on_a_synchronous_device_op_time_is_host_time_less_profiler_overhead():
    t = Trace()
    t.host("aten::addmm", 0.0, 20.0, **MM)
    t.host("aten::empty", 1.0, 1.0)
    t.host("aten::copy_", 3.0, 4.0)
    row = parse(t.dict(), synchronous=True, event_overhead_us=1.5, inside_overhead_us=0.5).ops[0]
    assert row["device_start"] == row["host_start"]
    assert row["device_duration"] == pytest.approx((20.0 - 0.5 - 1.5 * 2) * 1e-6)
    assert row["host_duration"] == pytest.approx(20e-6)


def test_collective_kernels_carry_the_collective_recorded_with_them():
    t = Trace()
    op = t.host("c10d::allreduce_", 0.0, 50.0, **{"Input Dims": [[[1024]]], "Input type": ["TensorList"]})
    comms = t.host(
        "record_param_comms", 5.0, 40.0,
        **{"Collective name": "allreduce", "dtype": "BFloat16", "In msg nelems": 1024, "Out msg nelems": 1024,
           "Group size": 4, "Seq": 7},
    )  # fmt: skip
    t.launch(comms, 10.0, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 60.0, 12.0)
    parsed = parse(t.dict())
    assert [r["name"] for r in parsed.ops] == ["revati::all_reduce"]  # c10d and functional spellings share it
    assert parsed.ops[0]["input_shapes"] == [[1024]]
    k = parsed.kernels[0]
    assert k["op_id"] == parsed.ops[0]["op_id"] == 0 and op
    assert (k["collective"], k["collective_bytes"], k["group_size"], k["seq"]) == ("all_reduce", 2048, 4, 7)


def test_scalars_and_overload_names_are_read_as_the_emulator_writes_them():
    t = Trace()
    t.host(
        "aten::sum.dim_IntList", 0.0, 5.0,
        **{"Input Dims": [[2, 3], [], [], []], "Input type": ["float", "ScalarList", "Scalar", ""],
           "Concrete Inputs": ["", "[1]", "False", ""]},
    )  # fmt: skip
    t.host(
        "aten::add.Tensor", 10.0, 5.0,
        **{"Input Dims": [[4], [4], []], "Input type": ["long int", "long int", "Scalar"],
           "Concrete Inputs": ["", "", "2"]},
    )  # fmt: skip
    rows = parse(t.dict()).ops
    assert [r["name"] for r in rows] == ["aten::sum", "aten::add"]
    assert rows[0]["scalars"] == "[False]" and rows[0]["dtypes"] == ["float32"]
    assert rows[1]["scalars"] == "[2]" and rows[1]["dtypes"] == ["int64", "int64"]


def test_composite_ops_are_told_apart_from_backend_ops():
    assert composite("aten::linear") and composite("aten::scaled_dot_product_attention")
    assert composite("aten::to.dtype") and composite("aten::matmul")
    assert not composite("aten::mm") and not composite("aten::_to_copy") and not composite("aten::add.Tensor")
    assert not composite("aten::no_such_op") and not composite("c10d::allreduce_")


def test_traces_that_are_not_kineto_exports_are_refused_clearly(tmp_path):
    with pytest.raises(KinetoError, match="traceEvents"):
        parse({"events": []})
    with pytest.raises(KinetoError, match="'aten::mm'.*dur"):
        parse({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 0.0}]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KinetoError, match="bad.json"):
        kineto.load(bad)
    with pytest.raises(KinetoError, match=r"revati::iteration#x.*integer"):
        t = Trace()
        t.mark(f"{kineto.MARK_ITERATION}x", 0.0, 1.0)
        parse(t.dict())


@pytest.mark.parametrize("fixture", PROFILES, ids=lambda p: p.name.split(".")[0])
def test_profiles_captured_on_a_gpu_parse_with_every_replayed_kernel_mapped(fixture):
    trace = kineto.load(fixture)
    parsed = parse(trace)
    kernels = [e for e in trace["traceEvents"] if e.get("cat") == "kernel"]
    assert len(parsed.kernels) == len(
        [e for e in trace["traceEvents"] if e.get("cat") in kineto._DEVICE_CATS]
    )
    assert parsed.replays > 0 and parsed.unmapped_replay_kernels == 0
    mapped = [k for k in parsed.kernels if k["op_id"] is not None]
    assert len(mapped) >= 0.95 * len(kernels)
    by_id = {r["op_id"]: r for r in parsed.ops}
    replayed = [r for r in parsed.ops if r["parent_id"] is not None]
    assert replayed and all(by_id[r["parent_id"]]["in_graph"] for r in replayed)
    assert all(r["device_duration"] > 0 for r in replayed)
    gemms = [r for r in parsed.ops if r["name"] in ("aten::mm", "aten::addmm") and r["parent_id"] is None]
    assert any(r["device_duration"] > 0 for r in gemms), "eager GEMMs own their kernels"
    for it in parsed.iterations.values():
        if it["device_start"] is not None:
            assert it["device_start"] >= it["host_start"] - 1e-9
    json.dumps(parsed.ops[:10])  # rows are plain data
    with gzip.open(fixture, "rt") as f:
        assert json.load(f)["traceEvents"]


def test_both_gpu_profiles_are_shipped():
    assert len(PROFILES) >= 2, "tests/fixtures should hold the captured H100 and H200 profiles"


def test_replay_alignment_tolerates_copies_the_profiler_did_not_see_launched():
    ops = [kineto.HostEvent(f"aten::op{i}", "cpu_op", 1, 0.0, 1.0, i, {}) for i in range(3)]
    launches = [("kernel", ops[0]), ("gpu_memset", ops[1]), ("kernel", ops[1]), ("kernel", ops[2])]
    acts = [{"cat": c} for c in ("kernel", "gpu_memset", "kernel", "gpu_memset", "kernel")]
    # node 1 is the captured memset; the second memset had no visible launch: it is the next launch's
    assert [(n, op.name) for n, op in kineto.align(acts, launches)] == [
        (0, "aten::op0"), (1, "aten::op1"), (2, "aten::op1"), (None, "aten::op2"), (3, "aten::op2"),
    ]  # fmt: skip
    no_memset = [{"cat": "kernel"}] * 3  # a captured memset that left no activity made no node
    assert [n for n, _ in kineto.align(no_memset, launches)] == [0, 2, 3]
    assert kineto.align([{"cat": "kernel"}] * 4, launches) is None  # another graph


def test_a_steps_device_interval_counts_kernels_launched_outside_ops():
    t = Trace()
    t.mark(f"{kineto.MARK_ITERATION}0", 0.0, 100.0)
    replay = t.mark(f"{kineto.MARK_REPLAY}5", 10.0, 20.0)  # a graph never seen captured: unmapped
    t.kernel("graph kernel", 300.0, 50.0, t.api("cudaGraphLaunch", 15.0, replay), None)
    parsed = parse(t.dict())
    assert parsed.unmapped_replay_kernels == 1
    it = parsed.iterations[0]
    assert (it["device_start"], it["device_end"]) == (pytest.approx(300e-6), pytest.approx(350e-6))
