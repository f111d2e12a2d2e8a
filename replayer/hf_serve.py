"""What `transformers serve` needs to run GPU-free where it runs its model in a process it spawns (5.25 and
later), applied around an emulated run.

Nothing of its own: the model's process is emulated from its environment on the time it shares with the
server's (replayer.workers), and the two talk through multiprocessing queues, whose pipes the shared time
counts (replayer.pipes). The server's own defaults are what it serves with.
"""

from __future__ import annotations

from replayer import workers

EMULATED: dict[str, object] = {}


def environment(gpu: str, profile: str | None, host_time: str):
    """The model's process emulated on one shared time (replayer.workers.environment)."""
    return workers.environment(gpu, profile, host_time, {})
