"""One virtual time across the processes of an engine (replayer.tree, replayer.sockets): a toy front end and
the worker it starts, both emulated from their environment, talking over ZeroMQ."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replayer import ranks, tree

pytest.importorskip("zmq")

ENGINE = Path(__file__).parent / "fixtures" / "tree" / "engine.py"


def _serve(arrivals: list[float], tmp_path: Path, front: str = "front") -> tuple[dict, list[dict]]:
    results = tmp_path / "results"
    results.mkdir()
    shared = tree.create(tmp_path)
    env = {**os.environ, **ranks.worker_environment("h100", None, "deterministic", results, shared)}
    proc = subprocess.run(
        [sys.executable, str(ENGINE), front, json.dumps(arrivals), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    figures = [json.loads(p.read_text()) for p in sorted(results.glob("process-*.json"))]
    return seen, figures


# request 1 arrives while request 0 is computing; request 2 after a long idle stretch
@pytest.fixture(scope="module", params=["front", "core"], ids=["sglang-like", "vllm-like"])
def served(tmp_path_factory, request):
    return _serve([0.0, 0.001, 500.0], tmp_path_factory.mktemp("tree"), request.param)


def test_the_worker_is_emulated_and_the_front_end_reads_its_send_times(served):
    seen, figures = served
    assert seen["ready"]["device"] == "NVIDIA H100 80GB HBM3"
    worker = max(figures, key=lambda f: f["ops"])
    assert worker["ops"] >= 3 * 20  # its matmuls ran on the virtual GPU
    for r in seen["replies"]:
        assert r["received"] == pytest.approx(r["done"], abs=1e-9)  # the reply is seen at its send time
        assert r["done"] - r["start"] > 1e-3  # 20 matmuls of 8192³ on an H100: milliseconds of device time


def test_a_request_arriving_while_the_worker_computes_waits_for_it(served):
    seen, _ = served
    first, second, _ = seen["replies"]
    assert first["start"] == pytest.approx(first["sent"], abs=1e-9)  # an idle worker takes it at once
    assert seen["t0"] + 0.001 < first["done"]  # the second arrived while the first was computing ...
    assert second["start"] >= first["done"]  # ... and was taken up only after it
    assert second["sent"] <= second["start"]


def test_idle_time_is_skipped_across_processes(served):
    seen, _ = served
    last = seen["replies"][2]
    assert last["sent"] - seen["t0"] == pytest.approx(500.0, abs=1e-6)
    assert last["start"] == pytest.approx(last["sent"], abs=1e-9)
    assert seen["virtual"] > 500.0
    assert seen["wall_ns"] < 60e9  # 500 virtual seconds of waiting took no such wall time


def test_time_stands_still_while_a_started_worker_starts_up(served):
    seen, _ = served
    # The vLLM-like front end polls for the handshake 5 virtual seconds at a time while its spawned worker
    # imports torch for real: a process that exists but has not met the clock yet holds time back.
    assert seen["ready"]["waited"] < 1.0
