"""Shared fixtures: an emulator with a cost model whose durations the test chooses."""

from __future__ import annotations

import pytest


class FixedCost:
    """A cost model with known numbers: `device[key]` s on the stream, `host[key]` s on the host, else 0."""

    name = "fixed"

    def __init__(self, device=None, host=None, launch_latency=0.0, sync_latency=0.0, **extra):
        self.device = dict(device or {})
        self.host = dict(host or {})
        self.launch_latency = launch_latency
        self.sync_latency = sync_latency
        for name, value in extra.items():  # optional CostModel members: synchronous, wake_factor, host_slope
            setattr(self, name, value)

    def device_time(self, key, features, dtype):
        return self.device.get(key, 0.0)

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
