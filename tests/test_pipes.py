"""One virtual time across processes that talk through multiprocessing queues (replayer.pipes), as
`transformers serve` 5.25+ talks to its model's process, or over ZeroMQ to a thread that hands requests on, as
vLLM's engine core gets them: a toy front end and the model process it spawns, both emulated from their
environment (Tree.catch_up)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replayer import ranks, tree

ENGINE = Path(__file__).parent / "fixtures" / "tree" / "queues.py"
STEPS = 3


def _serve(arrivals: list[float], tmp_path: Path, transport: str) -> dict:
    results = tmp_path / "results"
    results.mkdir()
    shared = tree.create(tmp_path)
    env = {**os.environ, **ranks.worker_environment("h100", None, "deterministic", results, shared)}
    proc = subprocess.run(
        [sys.executable, str(ENGINE), json.dumps(arrivals), str(STEPS), transport, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# request 1 arrives during request 0's first step; request 2 after a long idle stretch
ARRIVALS = [0.0, 0.001, 500.0]


@pytest.fixture(scope="module", params=["queues", "zmq"], ids=["transformers-serve-like", "vllm-like"])
def runs(tmp_path_factory, request):
    if request.param == "zmq":
        pytest.importorskip("zmq")
    return [_serve(ARRIVALS, tmp_path_factory.mktemp("queues"), request.param) for _ in range(2)]


def test_the_model_process_is_emulated_and_replies_are_read_at_their_send_time(runs):
    seen = runs[0]
    assert seen["ready"]["device"] == "NVIDIA H100 80GB HBM3"
    for r in seen["replies"]:
        assert len(r["steps"]) == STEPS
        assert r["received"] == pytest.approx(r["steps"][-1], abs=1e-9)  # sent when its last step ended
        assert r["steps"][0] - r["start"] > 1e-3  # 20 matmuls of 8192³ on an H100: milliseconds


def test_a_request_arriving_during_a_step_joins_the_next_one(runs):
    first, second, _ = runs[0]["replies"]
    assert first["start"] == pytest.approx(first["sent"], abs=1e-9)  # an idle engine takes it at once
    assert first["start"] < second["sent"] < first["steps"][0]  # it arrived during the first step ...
    assert second["start"] == first["steps"][0]  # ... and joined the step right after it
    assert second["steps"][:2] == first["steps"][1:]


def test_idle_time_is_skipped_and_runs_agree_exactly(runs):
    seen = runs[0]
    last = seen["replies"][2]
    assert last["sent"] - seen["t0"] == pytest.approx(500.0, abs=1e-3)  # a ZeroMQ poll waits whole ms
    assert last["start"] == pytest.approx(last["sent"], abs=1e-9)
    assert seen["wall_ns"] < 60e9  # 500 virtual seconds of waiting took no such wall time
    assert _from_t0(runs[0]) == _from_t0(runs[1])  # deterministic host time: the same instants, twice


def _from_t0(run: dict) -> list[tuple]:
    """Each reply's instants from t0 (the clocks' origin is the real one at each run's start)."""
    t0 = run["t0"]
    return [
        (r["sent"] - t0, r["start"] - t0, *(s - t0 for s in r["steps"]), r["received"] - t0)
        for r in run["replies"]
    ]
