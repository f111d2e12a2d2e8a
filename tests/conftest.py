"""Shared fixtures: an emulator with a cost model whose durations the test chooses."""

from __future__ import annotations

import pytest


class FixedCost:
    """A cost model with known numbers: `device[key]` s on the stream (or a function of the op's features),
    `host[key]` s on the host, else 0."""

    name = "fixed"

    def __init__(self, device=None, host=None, launch_latency=0.0, sync_latency=0.0, **extra):
        self.device = dict(device or {})
        self.host = dict(host or {})
        self.launch_latency = launch_latency
        self.sync_latency = sync_latency
        for name, value in extra.items():  # optional CostModel members: synchronous, wake_factor, host_slope
            setattr(self, name, value)

    def device_time(self, key, features, dtype):
        duration = self.device.get(key, 0.0)
        return duration(features) if callable(duration) else duration  # a function of the op's features

    def host_time(self, key):
        return self.host.get(key, 0.0)

    def describe(self):
        return "fixed durations for tests"


@pytest.fixture
def emulate():
    """Activate an Emulator on a virtual H100: `emu = emulate(device={"aten::mm": 1e-3})`.

    Every emulator it made is deactivated at teardown, pass or fail.
    """
    from replayer.session import Emulator
    from revati.hardware import gpu

    made = []

    def start(device=None, host=None, launch_latency=0.0, sync_latency=0.0, cost_extra=None, **kwargs):
        cost = FixedCost(device, host, launch_latency, sync_latency, **(cost_extra or {}))
        emu = Emulator(gpu("h100"), cost, **{"host_time": "deterministic", **kwargs})
        emu.activate()
        made.append(emu)
        return emu

    yield start
    for emu in reversed(made):
        if emu.active:
            emu.deactivate()


@pytest.fixture
def recorded_trace():
    """Write a recorded GPU trace of single-op steps: `recorded_trace(path, steps, tp=1)`, where `steps`
    is a list of steps, each a list of ops (name, input_shapes, dtypes, scalars, device seconds); one
    request per step, 5 µs of host time per op."""
    import torch

    from revati.hardware import gpu
    from revati.schema import TraceWriter

    h100 = gpu("h100")

    def write(path, steps, tp: int = 1) -> None:
        with TraceWriter(path, run_id=f"synthetic-{path.name}") as w:
            w.write_run(
                {
                    "source": "recorded", "complete": True, "device_kind": "h100", "device_name": h100.name,
                    "sm_count": h100.sm_count, "memory_bytes": h100.memory_bytes,
                    "torch_version": torch.__version__, "engine": "test", "model": "test",
                    "model_config": "{}", "tp": tp, "pp": 1, "workload": "test", "extra": "{}",
                }
            )  # fmt: skip
            t, op_id = 0.0, 0
            for step, ops in enumerate(steps):
                start = t
                for name, shapes, dtypes, scalars, d in ops:
                    w.append_row(
                        "ops",
                        {
                            "rank": 0, "op_id": op_id, "name": name, "input_shapes": shapes, "dtypes": dtypes,
                            "scalars": scalars, "stream": 0, "host_start": t, "host_duration": 5e-6,
                            "device_start": t, "device_duration": d, "iteration_id": step,
                        },
                    )  # fmt: skip
                    op_id += 1
                    t += d + 5e-6
                w.append_row(
                    "requests",
                    {"request_id": str(step), "arrival": start, "prompt_tokens": 1, "output_tokens": 1,
                     "first_token": t, "completion": t, "token_times": [t]},
                )  # fmt: skip
                w.append_row(
                    "iterations",
                    {"rank": 0, "iteration_id": step, "phase": "decode", "batch_size": 1, "tokens": 1,
                     "kv_tokens": 1, "host_start": start, "host_end": t, "device_start": start,
                     "device_end": t},
                )  # fmt: skip

    return write
