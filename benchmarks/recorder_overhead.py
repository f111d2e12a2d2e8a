"""The recorder's overhead on the CPU: a recorded run's wall time over an unrecorded run of the same workload.

    python benchmarks/recorder_overhead.py [--model tiny-llama] [--engine hf-generate] [--repeats 3]

Both runs serve the same closed workload (every request arrives at 0, so wall time is compute, not waiting)
with the same engine and model; they alternate, `--repeats` times each, and the medians are compared in
this one process (these machines are noisy). Also printed: the median engine step (decode) as the
unrecorded run times it with a bare perf_counter observer, as the recording measured it, and as the
recording measured it less the profiler's own cost (calibrated per event, times the events in that
step), i.e. how close what the trace holds comes to an unrecorded run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from recorder.run import RecordConfig, record
from revati.engines import run_engine
from revati.models import build_model, load_config
from revati.schema import read_table
from revati.workloads import parse_workload


class StepTimer:
    """An observer that only times engine steps."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []
        self._t = 0.0

    def iteration_start(self, phase, batch_size, tokens, kv_tokens) -> None:
        self._t = time.perf_counter()

    def iteration_end(self) -> None:
        self.steps.append(("", time.perf_counter() - self._t))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--engine", default="hf-generate")
    parser.add_argument(
        "--workload", default="poisson:rate=inf,n=32,prompt=lognormal(96,0.4),output=fixed(32)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.model)
    work = parse_workload(args.workload)
    model = build_model(config, "cpu", torch.float32)
    run_engine(args.engine, model, work.requests[:2])  # warm-up, as the recorder does
    plain_walls, plain_steps, rec_walls, raw_steps, fixed_steps, ratios_e2e = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            timer = StepTimer()
            t = time.perf_counter()
            plain = run_engine(args.engine, model, work.requests, observer=timer)
            plain_walls.append(time.perf_counter() - t)
            plain_steps += [d for _, d in timer.steps[1:]]
            (rec,) = record(
                RecordConfig(engine=args.engine, model=args.model, warmup_requests=0),
                work,
                Path(tmp) / f"r{i}",
                config,
                model=model,
            )
            rec_walls.append(rec.wall_seconds)
            its = read_table(rec.trace_dir, "iterations").to_pylist()
            events = rec.iteration_events
            for it in its[1:]:
                raw = it["host_end"] - it["host_start"]
                raw_steps.append(raw)
                fixed_steps.append(raw - rec.event_overhead_us * 1e-6 * events.get(it["iteration_id"], 0))
            e2e_plain = statistics.median(r.token_times[-1] - r.arrival for r in plain)
            e2e_rec = statistics.median(r.token_times[-1] - r.arrival for r in rec.results)
            ratios_e2e.append(e2e_rec / e2e_plain)
    plain_wall, rec_wall = statistics.median(plain_walls), statistics.median(rec_walls)
    step, raw, fixed = (statistics.median(x) for x in (plain_steps, raw_steps, fixed_steps))
    print(f"{args.engine} · {args.model} · CPU ({torch.get_num_threads()} threads) · {work.describe()}")
    print(f"unrecorded run   {plain_wall:8.3f} s  (median of {args.repeats})")
    print(
        f"recorded run     {rec_wall:8.3f} s  → overhead ratio {rec_wall / plain_wall:.2f}× (target ≤ 1.3×)"
    )
    print(f"  median E2E latency, recorded / unrecorded: {statistics.median(ratios_e2e):.2f}×")
    print(
        f"median engine step: unrecorded {step * 1e3:.3f} ms · recorded {raw * 1e3:.3f} ms"
        f" ({raw / step - 1:+.1%})"
        f" · recorded less profiler cost {fixed * 1e3:.3f} ms ({fixed / step - 1:+.1%})"
    )
    print(f"profiler cost per event: {rec.event_overhead_us:.2f} µs (calibrated on this host)")


if __name__ == "__main__":
    main()
