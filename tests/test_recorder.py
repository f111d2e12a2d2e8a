"""`revati record`: real runs on the CPU (a real, synchronous device) and, when one is present, on CUDA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from recorder.run import RecordConfig, calibrate, record
from revati.models import load_config
from revati.schema import read_table
from revati.workloads import parse_workload

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = "poisson:rate=20,n=30,prompt=lognormal(48,0.5),output=uniform(4,12),seed=4"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path needs a GPU")


def revati(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "revati", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def cpu_trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "cpu"
    done = revati(
        "record", "--device", "cpu", "--model", "tiny-llama", "--engine", "hf-cb",
        "--workload", WORKLOAD, "--out", str(out), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def table(trace: Path, name: str) -> list[dict]:
    return read_table(trace, name).to_pylist()


def test_a_cpu_recording_reads_back_as_a_complete_valid_trace(cpu_trace):
    (run,) = table(cpu_trace, "run")
    assert run["source"] == "recorded" and run["complete"] and run["device_kind"] == "cpu"
    assert run["engine"] == "hf-cb" and run["model"] == "tiny-llama" and run["workload"] == WORKLOAD
    extra = json.loads(run["extra"])
    assert 0 < extra["profiler_event_overhead_us"] < 100
    for name in ("ops", "iterations", "requests"):
        rows = table(cpu_trace, name)
        assert rows and {r["run_id"] for r in rows} == {run["run_id"]}
    assert table(cpu_trace, "kernels") == []  # no kernels on a CPU


def test_cpu_ops_of_each_iteration_are_ordered_disjoint_and_inside_it(cpu_trace):
    ops = table(cpu_trace, "ops")
    iterations = {it["iteration_id"]: it for it in table(cpu_trace, "iterations")}
    assert len(iterations) >= 10
    by_iteration: dict[int, list[dict]] = {}
    for op in ops:
        if op["iteration_id"] is not None:
            by_iteration.setdefault(op["iteration_id"], []).append(op)
    assert set(by_iteration) == set(iterations)
    eps = 1e-9  # µs timestamps turned into seconds
    for k, rows in by_iteration.items():
        it = iterations[k]
        rows.sort(key=lambda r: r["host_start"])
        assert len(rows) > 20
        for a, b in zip(rows, rows[1:], strict=False):
            assert a["host_start"] + a["host_duration"] <= b["host_start"] + eps, (k, a["name"], b["name"])
        for r in rows:
            assert it["host_start"] - eps <= r["host_start"]
            assert r["host_start"] + r["host_duration"] <= it["host_end"] + eps
            assert r["device_start"] == r["host_start"]  # synchronous: the device is the host
            assert 0 <= r["device_duration"] <= r["host_duration"]
        assert it["device_start"] == it["host_start"] and it["device_end"] == it["host_end"]
    assert {op["name"] for op in ops} >= {"aten::mm", "revati::attention", "aten::embedding"}
    assert not any(op["warmup"] for op in ops if op["iteration_id"] is not None)


def test_cpu_request_times_are_consistent_with_the_workload(cpu_trace):
    requests = {r["request_id"]: r for r in table(cpu_trace, "requests")}
    workload = {r.request_id: r for r in parse_workload(WORKLOAD).requests}
    assert requests.keys() == workload.keys()
    for rid, r in requests.items():
        assert r["arrival"] == pytest.approx(workload[rid].arrival)
        assert r["output_tokens"] == workload[rid].output_tokens == len(r["token_times"])
        assert r["arrival"] <= r["first_token"] <= r["completion"]
        assert r["token_times"] == sorted(r["token_times"])
    iterations = table(cpu_trace, "iterations")
    first = min(r["first_token"] for r in requests.values())
    assert min(it["host_start"] for it in iterations) < first  # a token comes out of a step


def test_several_runs_are_separate_run_ids_and_warmup_is_marked(tmp_path):
    out = tmp_path / "runs"
    started = datetime.now(UTC)
    results = record(
        RecordConfig(engine="hf-generate", model="tiny-llama", runs=2, warmup_requests=1),
        parse_workload("poisson:rate=inf,n=4,prompt=fixed(16),output=fixed(3)"),
        out,
        load_config("tiny-llama"),
    )
    assert [r.trace_dir for r in results] == [out / "run-1", out / "run-2"]
    runs = read_table(str(out / "run-*"), "run").to_pylist()
    assert {row["run_id"] for row in runs} == {r.run_id for r in results} and len(runs) == 2
    ended = datetime.now(UTC)
    for row, result in zip(sorted(runs, key=lambda r: r["started_at"]), results, strict=True):
        assert (
            started <= row["started_at"]
            and (ended - row["started_at"]).total_seconds() >= result.wall_seconds
        )
    ops = read_table(out / "run-1", "ops").to_pylist()
    warm = [op for op in ops if op["warmup"]]
    assert warm and all(op["host_start"] < 0 and op["iteration_id"] is None for op in warm)
    assert all(op["host_start"] >= 0 for op in ops if not op["warmup"])


def test_sigkill_mid_run_leaves_every_written_part_readable(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "revati", "record", "--device", "cpu", "--model", "tiny-llama",
         "--engine", "hf-generate", "--workload", "poisson:rate=8,n=200,prompt=fixed(16),output=fixed(4)",
         "--out", str(out)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list((out / "requests").glob("part-*.parquet")) if out.exists() else True:
            assert proc.poll() is None, "the recording ended before a part was written"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (run,) = read_table(out, "run").to_pylist()
    assert not run["complete"]
    requests = read_table(out, "requests")
    assert requests.num_rows >= 16 and requests.num_rows % 16 == 0
    assert all(len(r["token_times"]) == 4 for r in requests.to_pylist())
    assert isinstance(requests, pa.Table)


_REFAULTS = """
import resource, sys, torch
from recorder import device
if sys.argv[1] == "steady":
    assert device.steady_memory()["mmap_threshold"] == 32 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(32):  # buffers a little larger each step, as a KV gather's while contexts grow
    torch.ones((1 << 18) + step * (1 << 14))  # 1 MB, then 64 KB more each step
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_recording_keeps_freed_memory_so_ops_do_not_fault_in_fresh_pages():
    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True, cwd=REPO
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    # glibc maps each new largest buffer afresh and unmaps it when freed: a fault per 4 KB page written
    default = faults("default")
    assert default > 32 * 256
    assert faults("steady") < default / 4  # kept in the process: only the growth is new pages


def test_recorder_overhead_per_profiler_event_is_measured():
    # calibrate's own tries: ~0.5 µs an event under a ~4 µs loop, which 3 tries of 2,000 calls once read as 0
    overhead = calibrate("cpu")
    assert 0 < overhead.per_event_us < 100
    assert 0 <= overhead.inside_us <= overhead.per_event_us


def test_script_mode_records_any_script(tmp_path):
    script = tmp_path / "work.py"
    script.write_text(
        "import torch\nx = torch.ones(64, 64)\nfor _ in range(3):\n    y = x @ x\n"
        "print('done', float(y[0, 0]))\n"
    )
    out = tmp_path / "script-trace"
    done = revati("record", "--device", "cpu", "--out", str(out), "--", sys.executable, str(script))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done 64.0" in done.stdout
    (run,) = read_table(out, "run").to_pylist()
    assert run["complete"] and run["engine"] == "script" and str(script) in run["workload"]
    mms = [op for op in read_table(out, "ops").to_pylist() if op["name"] == "aten::mm"]
    assert len(mms) == 3 and all(op["input_shapes"] == [[64, 64], [64, 64]] for op in mms)


@pytest.mark.parametrize(
    "case",
    ["occupied", "unwritable", "under-a-file", "bad-workload-rows", "script-and-workload"],
)
def test_bad_input_is_refused_with_exit_code_2_and_nothing_written(tmp_path, case):
    out = tmp_path / "out"
    args = ["record", "--device", "cpu", "--model", "tiny-llama", "--out", str(out)]
    if case == "occupied":
        (out / "requests").mkdir(parents=True)
        (out / "requests" / "part-00000.parquet").write_bytes(b"x")
        expect = "already holds a trace"
    elif case == "unwritable":
        args[-1] = "/proc/revati-no/trace"
        expect = "cannot write in /proc"
    elif case == "under-a-file":
        (tmp_path / "file").write_text("x")
        args[-1] = str(tmp_path / "file" / "trace")
        expect = "is a file"
    elif case == "bad-workload-rows":
        bad = tmp_path / "requests.csv"
        bad.write_text("arrival,prompt_tokens,output_tokens\n0.0,10,4\n0.5,-3,4\n")
        args += ["--workload", str(bad)]
        expect = "requests.csv"
    else:
        args += ["--workload", WORKLOAD, "--", "python", "x.py"]
        expect = "--workload"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    done = revati(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert expect in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(tmp_path):
    done = revati("record", "--device", "cuda", "--model", "tiny-llama", "--out", str(tmp_path / "t"))
    assert done.returncode == 2 and "CUDA is not available" in done.stderr
    assert not (tmp_path / "t").exists()


# --- CUDA (run where a GPU is present) ------------------------------------------------------------


@CUDA
def test_cuda_recording_links_kernels_to_ops_and_steps(tmp_path):
    (result,) = record(
        RecordConfig(engine="hf-generate", model="tiny-llama", device="cuda", warmup_requests=1),
        parse_workload("poisson:rate=inf,n=4,prompt=fixed(64),output=fixed(6)"),
        tmp_path / "t",
        load_config("tiny-llama"),
    )
    (run,) = read_table(result.trace_dir, "run").to_pylist()
    assert run["complete"] and run["device_kind"] in (
        "h100",
        "h200",
        "a100",
        "l40s",
        "l4",
        "b200",
        "h100-pcie",
    )
    assert run["sm_count"] > 0 and run["driver_version"]
    kernels = read_table(result.trace_dir, "kernels").to_pylist()
    ops = {op["op_id"]: op for op in read_table(result.trace_dir, "ops").to_pylist()}
    linked = [k for k in kernels if k["op_id"] is not None]
    assert len(linked) >= 0.95 * len(kernels) > 0
    assert all(k["end"] >= k["start"] for k in kernels)
    launched = [k for k in linked if not k["name"].startswith(("Memcpy", "Memset"))]  # copies have no grid
    assert launched and all(len(k["grid"]) == 3 and len(k["block"]) == 3 for k in launched)
    gemms = [op for op in ops.values() if op["name"] in ("aten::mm", "aten::addmm") and not op["warmup"]]
    assert gemms and all(op["device_duration"] > 0 for op in gemms)
    for op in gemms:  # a kernel starts after its op launched it
        assert op["device_start"] >= op["host_start"]
    iterations = read_table(result.trace_dir, "iterations").to_pylist()
    assert len(iterations) == 6 and all(it["device_end"] >= it["device_start"] for it in iterations)


@CUDA
def test_cuda_graph_replays_are_mapped_to_captured_ops(tmp_path):
    (result,) = record(
        RecordConfig(
            engine="hf-cb",
            model="tiny-llama",
            device="cuda",
            warmup_requests=1,
            options={"use_cuda_graph": True},
        ),
        parse_workload("poisson:rate=inf,n=4,prompt=fixed(32),output=fixed(6)"),
        tmp_path / "g",
        load_config("tiny-llama"),
    )
    (run,) = read_table(result.trace_dir, "run").to_pylist()
    extra = json.loads(run["extra"])
    assert extra["graph_replays"] > 0 and extra["unmapped_replay_kernels"] == 0
    kernels = read_table(result.trace_dir, "kernels").to_pylist()
    replayed = [k for k in kernels if k["graph_id"] is not None]
    assert replayed and all(k["op_id"] is not None for k in replayed)
    ops = {op["op_id"]: op for op in read_table(result.trace_dir, "ops").to_pylist()}
    assert all(ops[ops[k["op_id"]]["parent_id"]]["in_graph"] for k in replayed)
