"""End to end, held out: a profile fitted on one CPU recording predicts other workloads' latencies.

Runs `benchmarks/accuracy.py` (both engines, two interleaved rounds, about 30 minutes on 2 cores).
The bounds are set by this machine: recordings of one workload on this VM differ from each other by
2-80 % (its speed drifts over minutes). The emulation is held to the held-out recordings' own
disagreement plus a margin, and to a cap that no amount of noise excuses. Throughput, set by the
arrivals, must hold to the issue's 5 %.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
LATENCIES = ("ttft_p50", "tpot_p50", "e2e_p50", "ttft_p99", "tpot_p99", "e2e_p99")
MARGIN = 0.20  # over the machine's own run-to-run error, mean of the six latency figures
CAP = 0.35  # mean of the six latency figures, whatever the noise


def _benchmark():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_emulated_held_out_workloads_stay_within_the_machines_own_noise(tmp_path):
    benchmark = _benchmark()
    if not benchmark.AZURE.exists():
        pytest.skip(f"{benchmark.AZURE} is not beside this checkout")
    assert benchmark.main(["--out", str(tmp_path)]) == 0
    rows = pq.read_table(tmp_path / "accuracy.parquet").to_pylist()
    assert {r["engine"] for r in rows} == {"hf-cb", "hf-generate"}

    def mean_latency_error(row):
        return sum(row[m] for m in LATENCIES) / len(LATENCIES)

    noise = {
        (r["engine"], r["workload"]): mean_latency_error(r) for r in rows if r["mode"] == "recorded again"
    }
    emulated = [r for r in rows if r["mode"] in benchmark.MODES]
    drift_out = [r for r in rows if r["speed"] is not None]  # the machine's speed, probed, taken out
    assert len(emulated) == len(drift_out) == 2 * len(benchmark.HELD_OUT) * len(benchmark.MODES)
    for row in emulated:
        assert row["throughput_tok_s"] <= 0.05, f"{row['engine']} · {row['workload']} · {row['mode']}"
    # the probe did not track the drift during a recording (it made errors larger, issue 5 notes): the
    # bound holds the emulation as measured
    for row in emulated:
        error = mean_latency_error(row)
        bound = min(CAP, noise[row["engine"], row["workload"]] + MARGIN)
        assert error <= bound, (
            f"{row['engine']} · {row['workload']} · {row['mode']}: {error:.1%} > {bound:.1%}"
        )
