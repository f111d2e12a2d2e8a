"""Real HF serving code on a virtual H100: lengths, determinism, queueing, memory, trace."""

from __future__ import annotations

import time

import pytest

from replayer.run import EmulationConfig, emulate
from revati.cost import Roofline
from revati.hardware import gpu
from revati.models import load_config, param_bytes
from revati.schema import read_table
from revati.workloads import Request, Workload, parse_workload

_real_perf_counter = time.perf_counter
H100 = gpu("h100")


def _run(engine: str, workload: Workload, out=None, **options):
    config = EmulationConfig(engine=engine, model="tiny-llama", gpu="h100", options=options)
    return emulate(config, workload, H100, Roofline(H100), load_config("tiny-llama"), out=out)


def _workload(*requests: tuple[float, int, int]) -> Workload:
    reqs = tuple(Request(str(i), a, p, o) for i, (a, p, o) in enumerate(requests))
    return Workload("test", reqs)


@pytest.mark.parametrize("engine", ["hf-generate", "hf-cb", "hf-serve"])
def test_every_request_gets_exactly_its_output_length(engine):
    work = parse_workload("poisson:rate=20,n=6,prompt=uniform(8,40),output=uniform(2,12),seed=3")
    result = _run(engine, work)
    by_id = {r.request_id: r for r in result.results}
    for request in work.requests:
        got = by_id[request.request_id]
        assert len(got.token_times) == request.output_tokens
        assert got.token_times[0] > request.arrival
        assert got.token_times == sorted(got.token_times)
    assert result.synthesized.get("aten::argmax", 0) > 0  # token ids came from the oracle


@pytest.mark.parametrize("engine", ["hf-generate", "hf-cb", "hf-serve"])
def test_deterministic_mode_is_bit_identical_across_runs(engine):
    # hf-serve too: its load generator reads each token over loopback the moment the server writes it
    # (tests/test_engines.py: no Nagle delay on the server's connections)
    work = parse_workload("poisson:rate=10,n=5,prompt=uniform(8,32),output=uniform(2,8),seed=1")
    first, second = _run(engine, work), _run(engine, work)
    assert [r.token_times for r in first.results] == [r.token_times for r in second.results]
    assert first.metrics.to_dict() == second.metrics.to_dict()


@pytest.mark.parametrize("engine", ["hf-generate", "hf-cb"])
def test_a_request_arriving_while_the_engine_is_busy_waits(engine):
    # Request 0 arrives alone at an idle engine; request 1 arrives while request 0 is decoding a long output.
    # Request 2 arrives long after everything finished: idle again.
    work = _workload((0.0, 64, 200), (0.01, 64, 4), (30.0, 64, 4))
    result = {r.request_id: r for r in _run(engine, work).results}
    ttft = {k: r.token_times[0] - r.arrival for k, r in result.items()}
    assert ttft["1"] > ttft["2"]
    if engine == "hf-generate":  # static batches: request 1 waits for request 0's whole batch
        assert result["1"].token_times[0] > result["0"].token_times[-1]


def test_served_tokens_reach_the_client_one_engine_step_apart():
    # Server and load generator talk over loopback: each token must reach the client at the virtual
    # time its step ended, not in a clump when the engine next goes idle.
    work = _workload((0.0, 16, 6), (0.5, 16, 6))
    served = {r.request_id: r.token_times for r in _run("hf-serve", work).results}
    batched = {r.request_id: r.token_times for r in _run("hf-cb", work).results}
    for request_id, times in served.items():
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert min(gaps) > 0
        steps = [b - a for a, b in zip(batched[request_id], batched[request_id][1:], strict=False)]
        assert gaps == pytest.approx(steps, rel=0.05)


def test_idle_time_between_arrivals_costs_no_wall_time():
    work = _workload((0.0, 16, 2), (600.0, 16, 2))  # ten virtual minutes apart
    start = _real_perf_counter()
    result = _run("hf-cb", work)
    assert result.results[1].token_times[0] > 600.0
    assert _real_perf_counter() - start < 60


def test_virtual_memory_holds_the_weights():
    work = _workload((0.0, 16, 2))
    result = _run("hf-generate", work)
    config = load_config("tiny-llama")
    assert result.weights_memory >= param_bytes(config, __import__("torch").bfloat16)
    assert result.peak_memory >= result.weights_memory


def test_the_trace_has_one_row_per_request_and_an_iteration_per_step(tmp_path):
    work = _workload((0.0, 16, 3), (0.0, 24, 5))
    result = _run("hf-generate", work, out=tmp_path / "trace")
    requests = read_table(tmp_path / "trace", "requests").to_pylist()
    assert sorted(r["request_id"] for r in requests) == ["0", "1"]
    assert {r["request_id"]: len(r["token_times"]) for r in requests} == {"0": 3, "1": 5}
    iterations = read_table(tmp_path / "trace", "iterations").to_pylist()
    phases = [i["phase"] for i in iterations]
    assert phases[0] == "prefill" and phases.count("prefill") == 1  # one static batch of two
    assert phases.count("decode") == 4  # 5 tokens: one from the prefill, four decode steps
    run = read_table(tmp_path / "trace", "run").to_pylist()[0]
    assert (run["source"], run["device_kind"], run["complete"]) == ("emulated", "h100", True)
    assert result.trace_dir == tmp_path / "trace"


@pytest.mark.slow
def test_llama_70b_emulates_on_a_b200_in_little_host_memory(tmp_path):
    import json
    import resource
    import subprocess
    import sys
    from pathlib import Path

    import torch

    revati = Path(sys.executable).with_name("revati")
    cmd = [
        str(revati),
        "emulate",
        "--model",
        "llama-3.1-70b",
        "--gpu",
        "b200",
        "--json",
        "--out",
        str(tmp_path / "t"),
    ]
    cmd += ["--workload", "poisson:rate=2,n=3,prompt=fixed(256),output=fixed(4)"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    weights = param_bytes(load_config("llama-3.1-70b"), torch.bfloat16)
    assert figures["weights_memory_gib"] * 2**30 == pytest.approx(weights, rel=0.01)  # 141 GB of weights
    assert (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 2**20
    )  # KiB: under 2 GiB of host memory


def test_a_run_that_fails_midway_leaves_a_readable_trace_marked_incomplete(tmp_path, monkeypatch):
    import revati.engines

    def failing_engine(name, model, requests, *, observer=None, on_result=None, **options):
        import torch

        ids = torch.tensor([[3, 4, 5]], device="cuda")
        for _ in range(3):
            observer.iteration_start("decode", 1, 1, 3)
            model(ids)
            observer.iteration_end()
        raise RuntimeError("the engine fell over")

    monkeypatch.setattr(revati.engines, "run_engine", failing_engine)
    with pytest.raises(RuntimeError, match="fell over"):
        _run("hf-generate", _workload((0.0, 16, 2)), out=tmp_path / "trace")
    run = read_table(tmp_path / "trace", "run").to_pylist()[0]
    assert run["complete"] is False
    assert len(read_table(tmp_path / "trace", "iterations")) == 3


def test_continuous_batching_with_cuda_graphs_replays_instead_of_dispatching():
    work = parse_workload("poisson:rate=20,n=6,prompt=fixed(32),output=fixed(16),seed=2")
    eager, graphs = _run("hf-cb", work), _run("hf-cb", work, use_cuda_graph=True)
    for result in (eager, graphs):
        assert [len(r.token_times) for r in result.results] == [16] * 6
    assert graphs.ops < eager.ops / 2  # decode steps replay a captured graph: no op is dispatched
    assert graphs.metrics.tpot.p50 < eager.metrics.tpot.p50  # and pay no per-kernel host cost
